//! transformers' `T5EncoderModel`: SD 3's third text encoder (T5-v1.1-XXL), the
//! encoder half of T5 with relative position buckets, RMS layer norms and a gated-GELU
//! feed-forward.

use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::{relu, silu};
use sd_kernels::ops::{
    biased_attention, gelu, gelu_tanh, linear_forward, linear_forward_many,
    linear_forward_residual, merge_heads, split_heads,
};

use crate::attention::linear;
use crate::config::{T5Activation, T5Config};
use crate::error::ConfigError;
use crate::norm::RmsNorm;

/// `T5LayerNorm`: diffusers' and T5's RMS norm (a scale, no shift or mean).
pub type T5LayerNorm = RmsNorm;

/// `T5Attention` of the encoder: bias-free projections, no `1 / sqrt(d)` scaling,
/// and (in the first block only) the relative position bias table.
#[derive(Module, Debug)]
pub struct T5Attention {
    /// Query.
    pub q: Linear,
    /// Key.
    pub k: Linear,
    /// Value.
    pub v: Linear,
    /// Output.
    pub o: Linear,
    /// `[num_buckets, heads]`, the first block's.
    pub relative_attention_bias: Option<Embedding>,
    heads: usize,
}

/// `T5LayerSelfAttention` (`layer.0`): norm, attention, residual.
#[derive(Module, Debug)]
pub struct T5LayerSelfAttention {
    /// `SelfAttention`.
    pub self_attention: T5Attention,
    /// Pre-norm.
    pub layer_norm: T5LayerNorm,
}

/// `T5DenseGatedActDense` (`wi_0`, `wi_1`, `wo`) or `T5DenseActDense` (`wi`, `wo`).
#[derive(Module, Debug)]
pub struct T5DenseActDense {
    /// Ungated input projection.
    pub wi: Option<Linear>,
    /// Gated: the activated projection.
    pub wi_0: Option<Linear>,
    /// Gated: the linear projection.
    pub wi_1: Option<Linear>,
    /// Output projection.
    pub wo: Linear,
    #[module(skip)]
    activation: T5Activation,
}

/// `T5LayerFF` (`layer.1`): norm, feed-forward, residual.
#[derive(Module, Debug)]
pub struct T5LayerFF {
    /// `DenseReluDense`.
    pub dense_relu_dense: T5DenseActDense,
    /// Pre-norm.
    pub layer_norm: T5LayerNorm,
}

/// `T5Block` of the encoder: self-attention then feed-forward.
#[derive(Module, Debug)]
pub struct T5Block {
    /// `layer.0`.
    pub layer_0: T5LayerSelfAttention,
    /// `layer.1`.
    pub layer_1: T5LayerFF,
}

/// `T5Stack` (the encoder).
#[derive(Module, Debug)]
pub struct T5Stack {
    /// Blocks.
    pub block: Vec<T5Block>,
    /// Final RMS norm.
    pub final_layer_norm: T5LayerNorm,
}

/// `T5EncoderModel` (keys `shared.weight`, `encoder.block.{i}.layer.{0,1}...`; see
/// [`t5_key`]).
#[derive(Module, Debug)]
pub struct T5EncoderModel {
    /// Token embeddings `[vocab, d_model]` (tied to `encoder.embed_tokens`).
    pub shared: Embedding,
    /// The encoder.
    pub encoder: T5Stack,
    num_buckets: usize,
    max_distance: usize,
    d_model: usize,
}

/// The stored key of a T5 parameter path: transformers names the block's layers
/// `layer.0` / `layer.1` and their modules `SelfAttention` / `DenseReluDense`.
pub fn t5_key(path: &str) -> String {
    path.split('.')
        .map(|seg| match seg {
            "layer_0" => "layer.0",
            "layer_1" => "layer.1",
            "self_attention" => "SelfAttention",
            "dense_relu_dense" => "DenseReluDense",
            s => s,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// T5's bidirectional bucket of a relative position `key - query`: exact below a
/// quarter of the buckets, logarithmic up to `max_distance`, the sign choosing the
/// half (the logarithm in f32, truncated, as transformers computes it).
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return base + n;
    }
    let scale = (max_distance as f64 / max_exact as f64).ln() as f32;
    let log = (n as f32 / max_exact as f32).ln() / scale * (half - max_exact) as f32;
    base + (max_exact + log as usize).min(half - 1)
}

impl T5DenseActDense {
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        let act = |h: Tensor<3>| match self.activation {
            T5Activation::Relu => relu(h),
            T5Activation::GeluNew => gelu_tanh(h),
            T5Activation::Gelu => gelu(h),
            T5Activation::Silu => silu(h),
        };
        let h = match (&self.wi, &self.wi_0, &self.wi_1) {
            (Some(wi), _, _) => act(linear_forward(wi, x)),
            (None, Some(w0), Some(w1)) => {
                let [a, b] = linear_forward_many([w0, w1], x);
                act(a) * b
            }
            _ => unreachable!("built with wi or wi_0 and wi_1"),
        };
        linear_forward_residual(&self.wo, h, residual)
    }
}

impl T5Block {
    fn new(c: &T5Config, first: bool, device: &Device) -> Result<Self, ConfigError> {
        let (d, inner, eps) = (c.d_model, c.num_heads * c.d_kv, c.layer_norm_epsilon);
        let (gated, activation) = c.activation()?;
        Ok(Self {
            layer_0: T5LayerSelfAttention {
                self_attention: T5Attention {
                    q: linear(d, inner, false, device),
                    k: linear(d, inner, false, device),
                    v: linear(d, inner, false, device),
                    o: linear(inner, d, false, device),
                    relative_attention_bias: first.then(|| {
                        EmbeddingConfig::new(c.relative_attention_num_buckets, c.num_heads)
                            .init(device)
                    }),
                    heads: c.num_heads,
                },
                layer_norm: T5LayerNorm::new(d, eps, device),
            },
            layer_1: T5LayerFF {
                dense_relu_dense: T5DenseActDense {
                    wi: (!gated).then(|| linear(d, c.d_ff, false, device)),
                    wi_0: gated.then(|| linear(d, c.d_ff, false, device)),
                    wi_1: gated.then(|| linear(d, c.d_ff, false, device)),
                    wo: linear(c.d_ff, d, false, device),
                    activation,
                },
                layer_norm: T5LayerNorm::new(d, eps, device),
            },
        })
    }

    fn forward(&self, x: Tensor<3>, position_bias: Tensor<4>) -> Tensor<3> {
        let a = &self.layer_0.self_attention;
        let h = self.layer_0.layer_norm.forward(x.clone());
        let [q, k, v] = linear_forward_many([&a.q, &a.k, &a.v], h);
        let out = biased_attention(
            split_heads(q, a.heads),
            split_heads(k, a.heads),
            split_heads(v, a.heads),
            position_bias,
            1.0,
        );
        let x = linear_forward_residual(&a.o, merge_heads(out), x);
        let h = self.layer_1.layer_norm.forward(x.clone());
        self.layer_1.dense_relu_dense.forward(h, x)
    }
}

impl T5EncoderModel {
    /// Builds the model from a config (parameters initialised lazily).
    pub fn new(config: &T5Config, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let block = (0..config.num_layers)
            .map(|i| T5Block::new(config, i == 0, device))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            shared: EmbeddingConfig::new(config.vocab_size, config.d_model).init(device),
            encoder: T5Stack {
                block,
                final_layer_norm: T5LayerNorm::new(
                    config.d_model,
                    config.layer_norm_epsilon,
                    device,
                ),
            },
            num_buckets: config.relative_attention_num_buckets,
            max_distance: config.relative_attention_max_distance,
            d_model: config.d_model,
        })
    }

    /// The dtype it computes in: its weights' (on the CPU backend half-precision
    /// weights compute in f32, as its norms are stored).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.encoder.final_layer_norm.weight.val().dtype()
    }

    /// Model width (`d_model`).
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// The relative position bias of a `seq`-token sequence from the first block's
    /// table, `[batch, heads, seq, seq]`.
    fn position_bias(&self, batch: usize, seq: usize, device: &Device) -> Tensor<4> {
        let table = self.encoder.block[0]
            .layer_0
            .self_attention
            .relative_attention_bias
            .as_ref()
            .expect("the first block holds the table");
        let buckets: Vec<i64> = (0..seq as i64)
            .flat_map(|q| {
                (0..seq as i64).map(move |k| {
                    relative_position_bucket(k - q, self.num_buckets, self.max_distance) as i64
                })
            })
            .collect();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(buckets, [seq * seq]), device);
        let heads = table.weight.dims()[1];
        table
            .weight
            .val()
            .select(0, idx)
            .reshape([seq, seq, heads])
            .permute([2, 0, 1])
            .reshape([1, heads, seq, seq])
            .expand([batch, heads, seq, seq])
    }

    /// The encoder's last hidden state (after the final norm), as the SD 3 pipeline
    /// takes it: every token attends to every other, padding included (no mask).
    ///
    /// # Shapes
    /// - `input_ids`: `[b, seq]`; output `[b, seq, d_model]`
    ///
    /// # Errors
    /// [`sd_core::CoreError::Shape`] for an empty batch or sequence.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Result<Tensor<3>, sd_core::CoreError> {
        let [b, seq] = input_ids.dims();
        if b == 0 || seq == 0 {
            return Err(sd_core::CoreError::shape(
                "input_ids",
                format!("[{b}, {seq}]: needs at least one row and one token"),
            ));
        }
        let device = input_ids.device();
        // A half-precision table on the CPU gives rows to compute with in f32.
        let mut x = crate::norm::to_dtype(self.shared.forward(input_ids), self.dtype());
        let bias = crate::norm::to_dtype(self.position_bias(b, seq, &device), x.dtype());
        for block in &self.encoder.block {
            x = block.forward(x, bias.clone());
        }
        Ok(self.encoder.final_layer_norm.forward(x))
    }
}

impl sd_core::SequenceEncoder for T5EncoderModel {
    fn encode_sequence(&self, input_ids: Tensor<2, Int>) -> Result<Tensor<3>, sd_core::CoreError> {
        self.forward(input_ids)
    }

    fn hidden_size(&self) -> usize {
        self.d_model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' buckets for 32 buckets, distance 128: exact within +-7, the
    /// logarithmic range, the far end clamped, the sign choosing the half.
    #[test]
    fn buckets_match_transformers() {
        let b = |r| relative_position_bucket(r, 32, 128);
        assert_eq!([b(0), b(1), b(7), b(-1), b(-7)], [0, 17, 23, 1, 7]);
        assert_eq!(
            [b(8), b(12), b(16), b(64), b(127), b(1000)],
            [24, 25, 26, 30, 31, 31]
        );
        assert_eq!([b(-8), b(-16), b(-1000)], [8, 10, 15]);
    }

    #[test]
    fn keys_follow_transformers() {
        assert_eq!(
            t5_key("encoder.block.0.layer_0.self_attention.relative_attention_bias.weight"),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        );
        assert_eq!(
            t5_key("encoder.block.3.layer_1.dense_relu_dense.wi_0.weight"),
            "encoder.block.3.layer.1.DenseReluDense.wi_0.weight"
        );
    }
}
