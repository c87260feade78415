//! transformers' `CLIPVisionTransformer`: CLIP's image tower (patch embedding, class
//! token, position embeddings, pre-norm encoder without causal mask, the class
//! token's final state normed as the pooled output), as the SD 1.x/2.x safety checker
//! uses it.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::prelude::*;

use crate::clip::{ClipEncoder, ClipEncoderLayer};
use crate::config::{ClipActivation, ClipVisionConfig};
use crate::error::ConfigError;
use crate::norm::LayerNorm;
use crate::resnet::conv_forward;

/// `CLIPVisionEmbeddings`.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings {
    /// The class token `[d]`.
    pub class_embedding: Param<Tensor<1>>,
    /// Patches to `d` channels (no bias), stride = kernel = the patch size.
    pub patch_embedding: Conv2d,
    /// `[patches + 1, d]`.
    pub position_embedding: Embedding,
}

/// `CLIPVisionTransformer` (keys `vision_model.*` in a `CLIPVisionModel`).
#[derive(Module, Debug)]
pub struct ClipVisionTransformer {
    /// Embeddings.
    pub embeddings: ClipVisionEmbeddings,
    /// The norm before the encoder (transformers' spelling).
    pub pre_layrnorm: LayerNorm,
    /// Layers.
    pub encoder: ClipEncoder,
    /// The norm of the pooled (class token) output.
    pub post_layernorm: LayerNorm,
    quick_gelu: bool,
    image_size: usize,
    channels: usize,
}

impl ClipVisionTransformer {
    /// Builds the tower from a config.
    ///
    /// # Errors
    /// Sizes the config cannot honour.
    pub fn new(config: &ClipVisionConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let d = config.hidden_size;
        let p = config.patch_size;
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                let (heads, ff) = (config.num_attention_heads, config.intermediate_size);
                ClipEncoderLayer::new(d, heads, ff, eps, device)
            })
            .collect();
        Ok(Self {
            embeddings: ClipVisionEmbeddings {
                class_embedding: Param::from_tensor(Tensor::zeros([d], device)),
                patch_embedding: Conv2dConfig::new([config.num_channels, d], [p, p])
                    .with_stride([p, p])
                    .with_bias(false)
                    .init(device),
                position_embedding: EmbeddingConfig::new(config.num_patches() + 1, d).init(device),
            },
            pre_layrnorm: LayerNorm::new(d, eps, device),
            encoder: ClipEncoder { layers },
            post_layernorm: LayerNorm::new(d, eps, device),
            quick_gelu: config.hidden_act == ClipActivation::QuickGelu,
            image_size: config.image_size,
            channels: config.num_channels,
        })
    }

    /// The side of the square pictures it takes.
    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// The last hidden state and the pooled output (the class token's state through
    /// `post_layernorm`).
    ///
    /// # Shapes
    /// - `pixel_values`: `[b, channels, image_size, image_size]`, normalised as the
    ///   image processor does
    /// - output: `[b, patches + 1, d]`, `[b, d]`
    ///
    /// # Errors
    /// A picture of another size or channel count.
    pub fn forward(
        &self,
        pixel_values: Tensor<4>,
    ) -> Result<(Tensor<3>, Tensor<2>), sd_core::CoreError> {
        let [b, c, h, w] = pixel_values.dims();
        let s = self.image_size;
        if [c, h, w] != [self.channels, s, s] {
            return Err(sd_core::CoreError::shape(
                "pixel_values",
                format!(
                    "{:?}, expected [b, {}, {s}, {s}]",
                    pixel_values.dims(),
                    self.channels
                ),
            ));
        }
        let e = &self.embeddings;
        let patches = conv_forward(&e.patch_embedding, pixel_values);
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let class = e.class_embedding.val().reshape([1, 1, d]).repeat_dim(0, b);
        let positions = e
            .position_embedding
            .weight
            .val()
            .reshape([1, gh * gw + 1, d]);
        let positions = crate::norm::to_dtype(positions, patches.dtype());
        let mut x = Tensor::cat(vec![class, patches], 1) + positions;
        x = self.pre_layrnorm.forward(x);
        for layer in &self.encoder.layers {
            x = layer.forward(x, false, self.quick_gelu);
        }
        let pooled = x.clone().narrow(1, 0, 1).reshape([b, d]);
        let pooled = self
            .post_layernorm
            .forward(pooled.reshape([b, 1, d]))
            .reshape([b, d]);
        Ok((x, pooled))
    }
}
