//! transformers' `Dinov2Backbone`: the ViT that Depth Anything reads its features
//! from. Module paths are those of the hub checkpoints (`embeddings.cls_token`,
//! `encoder.layer.{i}.attention.attention.query`, `...attention.output.dense`,
//! `layer_scale1.lambda1`, `mlp.fc1`), so weight keys map 1:1.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear};
use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use sd_kernels::ops::{conv_forward, gelu, to_dtype, to_f32};

use crate::attention::{linear, linear_forward, linear_forward_many, multi_head_attention};
use crate::config::Dinov2Config;
use crate::error::ConfigError;
use crate::norm::LayerNorm;

/// `Dinov2PatchEmbeddings`: a `patch_size`-strided convolution.
#[derive(Module, Debug)]
pub struct Dinov2PatchEmbeddings {
    /// `[hidden, channels, patch, patch]`.
    pub projection: Conv2d,
}

/// `Dinov2Embeddings`: patches, the CLS token and the position embeddings.
#[derive(Module, Debug)]
pub struct Dinov2Embeddings {
    /// `[1, 1, hidden]`.
    pub cls_token: Param<Tensor<3>>,
    /// Patch projection.
    pub patch_embeddings: Dinov2PatchEmbeddings,
    /// `[1, 1 + (image_size / patch_size)^2, hidden]`: the CLS position, then the
    /// patch grid row by row.
    pub position_embeddings: Param<Tensor<3>>,
    patch_size: usize,
}

/// `Dinov2SelfAttention`'s projections.
#[derive(Module, Debug)]
pub struct Dinov2SelfAttention {
    /// Query projection.
    pub query: Linear,
    /// Key projection.
    pub key: Linear,
    /// Value projection.
    pub value: Linear,
}

/// `Dinov2SelfOutput`.
#[derive(Module, Debug)]
pub struct Dinov2SelfOutput {
    /// Output projection.
    pub dense: Linear,
}

/// `Dinov2Attention` (keys `attention.attention.*`, `attention.output.dense`).
#[derive(Module, Debug)]
pub struct Dinov2Attention {
    /// q, k, v.
    pub attention: Dinov2SelfAttention,
    /// Output projection.
    pub output: Dinov2SelfOutput,
}

/// `Dinov2LayerScale`: a learnt per-channel scale of a residual branch.
#[derive(Module, Debug)]
pub struct Dinov2LayerScale {
    /// `[hidden]`.
    pub lambda1: Param<Tensor<1>>,
}

impl Dinov2LayerScale {
    fn new(d: usize, value: f64, device: &Device) -> Self {
        Self {
            lambda1: Initializer::Constant { value }.init([d], device),
        }
    }

    /// # Shapes
    /// - `[b, n, hidden]` to the same
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = self.lambda1.dims()[0];
        x * self.lambda1.val().reshape([1, 1, d])
    }
}

/// `Dinov2MLP`: `fc2(gelu(fc1(x)))`.
#[derive(Module, Debug)]
pub struct Dinov2Mlp {
    /// Up projection.
    pub fc1: Linear,
    /// Down projection.
    pub fc2: Linear,
}

/// `Dinov2Layer`: pre-norm attention and MLP, each branch layer-scaled.
#[derive(Module, Debug)]
pub struct Dinov2Layer {
    /// Norm before attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attention: Dinov2Attention,
    /// Scale of the attention branch.
    pub layer_scale1: Dinov2LayerScale,
    /// Norm before the MLP.
    pub norm2: LayerNorm,
    /// MLP.
    pub mlp: Dinov2Mlp,
    /// Scale of the MLP branch.
    pub layer_scale2: Dinov2LayerScale,
    heads: usize,
}

impl Dinov2Layer {
    fn new(c: &Dinov2Config, device: &Device) -> Self {
        let d = c.hidden_size;
        let eps = c.layer_norm_eps;
        let m = c.mlp_hidden_size();
        Self {
            norm1: LayerNorm::new(d, eps, device),
            attention: Dinov2Attention {
                attention: Dinov2SelfAttention {
                    query: linear(d, d, c.qkv_bias, device),
                    key: linear(d, d, c.qkv_bias, device),
                    value: linear(d, d, c.qkv_bias, device),
                },
                output: Dinov2SelfOutput {
                    dense: linear(d, d, true, device),
                },
            },
            layer_scale1: Dinov2LayerScale::new(d, c.layerscale_value, device),
            norm2: LayerNorm::new(d, eps, device),
            mlp: Dinov2Mlp {
                fc1: linear(d, m, true, device),
                fc2: linear(m, d, true, device),
            },
            layer_scale2: Dinov2LayerScale::new(d, c.layerscale_value, device),
            heads: c.num_attention_heads,
        }
    }

    /// # Shapes
    /// - `[b, n, hidden]` to the same
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let a = &self.attention.attention;
        let h = self.norm1.forward(x.clone());
        let [q, k, v] = linear_forward_many([&a.query, &a.key, &a.value], h);
        let h = multi_head_attention(q, k, v, self.heads, false);
        let h = linear_forward(&self.attention.output.dense, h);
        let x = x + self.layer_scale1.forward(h);
        let h = linear_forward(&self.mlp.fc1, self.norm2.forward(x.clone()));
        let h = linear_forward(&self.mlp.fc2, gelu(h));
        x + self.layer_scale2.forward(h)
    }
}

/// `Dinov2Encoder`.
#[derive(Module, Debug)]
pub struct Dinov2Encoder {
    /// Layers.
    pub layer: Vec<Dinov2Layer>,
}

/// `Dinov2Backbone`: the feature maps of the configured layers (`out_indices`), each
/// through the final LayerNorm, as token sequences (CLS first).
#[derive(Module, Debug)]
pub struct Dinov2Backbone {
    /// Patch, CLS and position embeddings.
    pub embeddings: Dinov2Embeddings,
    /// Transformer layers.
    pub encoder: Dinov2Encoder,
    /// Final LayerNorm.
    pub layernorm: LayerNorm,
    out_indices: Vec<usize>,
    apply_layernorm: bool,
}

impl Dinov2Backbone {
    /// Builds the backbone from its config.
    pub fn new(c: &Dinov2Config, device: &Device) -> Result<Self, ConfigError> {
        c.validate()?;
        let d = c.hidden_size;
        let p = c.patch_size;
        let grid = c.image_size / p;
        let normal = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        Ok(Self {
            embeddings: Dinov2Embeddings {
                cls_token: normal.init([1, 1, d], device),
                patch_embeddings: Dinov2PatchEmbeddings {
                    projection: Conv2dConfig::new([c.num_channels, d], [p, p])
                        .with_stride([p, p])
                        .init(device),
                },
                position_embeddings: normal.init([1, 1 + grid * grid, d], device),
                patch_size: p,
            },
            encoder: Dinov2Encoder {
                layer: (0..c.num_hidden_layers)
                    .map(|_| Dinov2Layer::new(c, device))
                    .collect(),
            },
            layernorm: LayerNorm::new(d, c.layer_norm_eps, device),
            out_indices: c.feature_layers()?,
            apply_layernorm: c.apply_layernorm,
        })
    }

    /// Patch side in pixels.
    pub fn patch_size(&self) -> usize {
        self.embeddings.patch_size
    }

    /// The feature maps, one per configured layer.
    ///
    /// # Shapes
    /// - `pixel_values`: `[b, channels, h, w]` (h, w >= patch_size; a partial last
    ///   patch is dropped, as the strided convolution drops it)
    /// - output: `out_indices.len()` tensors `[b, 1 + (h / p) * (w / p), hidden]`
    pub fn forward(&self, pixel_values: Tensor<4>) -> Vec<Tensor<3>> {
        let mut x = self.embeddings.forward(pixel_values);
        let last = self.out_indices.iter().copied().max().unwrap_or(0);
        let mut states = vec![x.clone()];
        for layer in self.encoder.layer.iter().take(last) {
            x = layer.forward(x);
            states.push(x.clone());
        }
        self.out_indices
            .iter()
            .map(|&i| {
                let s = states[i].clone();
                if self.apply_layernorm {
                    self.layernorm.forward(s)
                } else {
                    s
                }
            })
            .collect()
    }
}

impl Dinov2Embeddings {
    /// # Shapes
    /// - `[b, channels, h, w]` to `[b, 1 + (h / p) * (w / p), hidden]`
    pub fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let [b, _, h, w] = pixel_values.dims();
        let x = conv_forward(&self.patch_embeddings.projection, pixel_values);
        let [_, d, gh, gw] = x.dims();
        let x = x.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let cls = self.cls_token.val().repeat_dim(0, b);
        Tensor::cat(vec![cls, x], 1) + self.interpolate_pos_encoding(h, w)
    }

    /// The position embeddings for an `h x w` input: as stored at the trained size
    /// of a square input, else the patch grid resized bicubically (in f32, align
    /// corners off) to `(h / p, w / p)`, as transformers does.
    ///
    /// # Shapes
    /// - output: `[1, 1 + (h / p) * (w / p), hidden]`
    pub fn interpolate_pos_encoding(&self, h: usize, w: usize) -> Tensor<3> {
        let pos = self.position_embeddings.val();
        let [_, n, d] = pos.dims();
        let positions = n - 1;
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        if gh * gw == positions && h == w {
            return pos;
        }
        let side = (positions as f64).sqrt() as usize;
        let dtype = pos.dtype();
        let class = pos.clone().narrow(1, 0, 1);
        let grid = to_f32(pos.narrow(1, 1, positions))
            .reshape([1, side, side, d])
            .permute([0, 3, 1, 2]);
        let grid = interpolate(
            grid,
            InterpolateOptions::new(InterpolateMode::Bicubic)
                .with_align_corners(false)
                .with_output_size([gh, gw]),
        );
        let grid = grid.permute([0, 2, 3, 1]).reshape([1, gh * gw, d]);
        Tensor::cat(vec![class, to_dtype(grid, dtype)], 1)
    }
}
