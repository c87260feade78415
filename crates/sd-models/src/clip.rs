//! transformers' `CLIPTextModel`: the text encoder of SD 1.x (CLIP-L) and SD 2.x
//! (OpenCLIP-H, as converted by diffusers).

use burn::nn::{Embedding, EmbeddingConfig, Linear};
use burn::prelude::*;
use sd_core::{HiddenLayer, TextEncoderOutput};
use sd_kernels::ops::{gelu, quick_gelu};

use crate::attention::{
    linear, linear_forward, linear_forward_many, linear_forward_residual, multi_head_attention,
};
use crate::config::{ClipActivation, ClipTextConfig};
use crate::error::ConfigError;
use crate::norm::LayerNorm;

/// Token and position embeddings.
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings {
    /// `[vocab, hidden]`.
    pub token_embedding: Embedding,
    /// `[max_positions, hidden]`.
    pub position_embedding: Embedding,
}

/// Causal multi-head self-attention with biased projections.
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    heads: usize,
}

/// The two-layer MLP.
#[derive(Module, Debug)]
pub struct ClipMlp {
    /// Up projection.
    pub fc1: Linear,
    /// Down projection.
    pub fc2: Linear,
}

/// A pre-norm transformer layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    /// Self-attention.
    pub self_attn: ClipAttention,
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// MLP.
    pub mlp: ClipMlp,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    /// A layer of width `d` with `heads` heads and an MLP `intermediate` wide.
    pub(crate) fn new(
        d: usize,
        heads: usize,
        intermediate: usize,
        eps: f64,
        device: &Device,
    ) -> Self {
        Self {
            self_attn: ClipAttention {
                q_proj: linear(d, d, true, device),
                k_proj: linear(d, d, true, device),
                v_proj: linear(d, d, true, device),
                out_proj: linear(d, d, true, device),
                heads,
            },
            layer_norm1: LayerNorm::new(d, eps, device),
            mlp: ClipMlp {
                fc1: linear(d, intermediate, true, device),
                fc2: linear(intermediate, d, true, device),
            },
            layer_norm2: LayerNorm::new(d, eps, device),
        }
    }

    /// The layer over `x` `[b, seq, d]`: attention (`causal` for text), then the MLP
    /// with `quick_gelu` (OpenAI CLIP) or the exact `gelu` (OpenCLIP).
    pub(crate) fn forward(&self, x: Tensor<3>, causal: bool, quick: bool) -> Tensor<3> {
        let a = &self.self_attn;
        let h = self.layer_norm1.forward(x.clone());
        let [q, k, v] = linear_forward_many([&a.q_proj, &a.k_proj, &a.v_proj], h);
        let attn = multi_head_attention(q, k, v, a.heads, causal);
        let x = linear_forward_residual(&a.out_proj, attn, x);
        let h = linear_forward(&self.mlp.fc1, self.layer_norm2.forward(x.clone()));
        let h = if quick { quick_gelu(h) } else { gelu(h) };
        linear_forward_residual(&self.mlp.fc2, h, x)
    }
}

/// The stack of layers.
#[derive(Module, Debug)]
pub struct ClipEncoder {
    /// Layers.
    pub layers: Vec<ClipEncoderLayer>,
}

/// `CLIPTextTransformer`.
#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    /// Embeddings.
    pub embeddings: ClipTextEmbeddings,
    /// Layers.
    pub encoder: ClipEncoder,
    /// Final LayerNorm.
    pub final_layer_norm: LayerNorm,
}

/// `CLIPTextModel` (keys `text_model.*`).
#[derive(Module, Debug)]
pub struct ClipTextModel {
    /// The transformer.
    pub text_model: ClipTextTransformer,
    /// `CLIPTextModelWithProjection`'s bias-free projection of the pooled output
    /// (SDXL's second encoder).
    pub text_projection: Option<Linear>,
    quick_gelu: bool,
    eos_token_id: i64,
    hidden_size: usize,
    max_positions: usize,
}

impl ClipTextModel {
    /// The dtype it computes in: its weights' (on the CPU backend half-precision
    /// weights compute in f32, as its norms are stored).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.text_model.final_layer_norm.weight.val().dtype()
    }

    /// Builds the model from a config.
    pub fn new(config: &ClipTextConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                ClipEncoderLayer::new(
                    d,
                    config.num_attention_heads,
                    config.intermediate_size,
                    eps,
                    device,
                )
            })
            .collect();
        Ok(Self {
            text_model: ClipTextTransformer {
                embeddings: ClipTextEmbeddings {
                    token_embedding: EmbeddingConfig::new(config.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(config.max_position_embeddings, d)
                        .init(device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: LayerNorm::new(d, eps, device),
            },
            text_projection: config
                .text_projection_dim()
                .map(|p| linear(d, p, false, device)),
            quick_gelu: config.hidden_act == ClipActivation::QuickGelu,
            eos_token_id: config.eos_token_id,
            hidden_size: d,
            max_positions: config.max_position_embeddings,
        })
    }

    fn layer_forward(&self, layer: &ClipEncoderLayer, x: Tensor<3>) -> Tensor<3> {
        layer.forward(x, true, self.quick_gelu)
    }

    /// All hidden states: the embeddings, then each layer's output (no final norm).
    ///
    /// # Shapes
    /// - `input_ids`: `[b, seq]`; output: `num_hidden_layers + 1` tensors `[b, seq, hidden]`
    pub fn hidden_states(&self, input_ids: Tensor<2, Int>) -> Vec<Tensor<3>> {
        self.hidden_states_upto(input_ids, self.text_model.encoder.layers.len())
    }

    fn hidden_states_upto(&self, input_ids: Tensor<2, Int>, n_layers: usize) -> Vec<Tensor<3>> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let emb = &self.text_model.embeddings;
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
        // Half-precision tables on the CPU give rows to compute with in f32.
        let x = emb.token_embedding.forward(input_ids) + emb.position_embedding.forward(positions);
        let mut x = crate::norm::to_dtype(x, self.dtype());
        let mut states = vec![x.clone()];
        for layer in self.text_model.encoder.layers.iter().take(n_layers) {
            x = self.layer_forward(layer, x);
            states.push(x.clone());
        }
        states
    }

    /// The final hidden state at the end-of-text token of each row (argmax of the ids
    /// when `eos_token_id == 2`, the legacy SD configs; else the first `eos_token_id`).
    fn pool(&self, last: Tensor<3>, input_ids: Tensor<2, Int>) -> Tensor<2> {
        let [b, _, d] = last.dims();
        let idx = if self.eos_token_id == 2 {
            input_ids.argmax(1)
        } else {
            input_ids.equal_elem(self.eos_token_id).int().argmax(1)
        };
        let idx = idx.reshape([b, 1, 1]).repeat_dim(2, d);
        last.gather(1, idx).reshape([b, d])
    }

    /// Encodes `input_ids`, returning the requested layer and the pooled output,
    /// the inputs checked first (the same as [`sd_core::TextEncoder::encode`]).
    ///
    /// # Shapes
    /// - `input_ids`: `[b, seq]`, seq <= max_position_embeddings
    /// - output: hidden states `[b, seq, hidden]`, pooled `[b, hidden]`
    ///
    /// # Errors
    /// [`sd_core::CoreError::Shape`] for more ids than positions,
    /// [`sd_core::CoreError::InvalidArgument`] for a skip of every layer or more
    /// (never clamped silently).
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        layer: HiddenLayer,
    ) -> Result<TextEncoderOutput, sd_core::CoreError> {
        sd_core::check_text_encoder_inputs(self, input_ids.dims(), layer)?;
        Ok(self.forward_unchecked(input_ids, layer))
    }

    /// [`Self::forward`] without the checks.
    ///
    /// # Panics
    /// A skip of every layer or more, more ids than positions.
    pub fn forward_unchecked(
        &self,
        input_ids: Tensor<2, Int>,
        layer: HiddenLayer,
    ) -> TextEncoderOutput {
        let n = self.text_model.encoder.layers.len();
        let k = layer.skipped();
        assert!(
            k == 0 || k < n,
            "skipping {k} layers leaves none of the {n}"
        );
        let states = self.hidden_states_upto(input_ids.clone(), n);
        let ln = &self.text_model.final_layer_norm;
        let last = ln.forward(states[n].clone());
        let hidden_states = match layer {
            HiddenLayer::Last | HiddenLayer::Skip(0) => last.clone(),
            HiddenLayer::Skip(k) => ln.forward(states[n - k].clone()),
            HiddenLayer::SkipRaw(k) => states[n - k].clone(),
        };
        let pooled = self.pool(last, input_ids);
        TextEncoderOutput {
            hidden_states,
            text_embeds: self
                .text_projection
                .as_ref()
                .map(|p| linear_forward(p, pooled.clone())),
            pooled,
        }
    }
}

impl sd_core::TextEncoder for ClipTextModel {
    fn encode(
        &self,
        input_ids: Tensor<2, Int>,
        layer: HiddenLayer,
    ) -> Result<TextEncoderOutput, sd_core::CoreError> {
        self.forward(input_ids, layer)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn max_position_embeddings(&self) -> usize {
        self.max_positions
    }

    fn num_hidden_layers(&self) -> usize {
        self.text_model.encoder.layers.len()
    }
}
