//! diffusers' `ControlNetModel`: a trainable copy of the U-Net's encoder half that
//! sees a control image (edges, depth, a pose) and returns residuals for the U-Net's
//! skip connections, each through a zero-initialised 1x1 conv.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;
use sd_core::{AddedConditioning, ControlResiduals, CoreError};

use crate::UNet2DConditionModel;
use crate::config::{ControlNetConfig, UNet2DConditionConfig};
use crate::embeddings::{TimeProjection, TimestepEmbedding};
use crate::error::ConfigError;
use crate::norm::to_dtype;
use crate::resnet::{conv, conv_forward, conv_strided};
use crate::unet_2d_blocks::{DownBlock2D, UNetMidBlock2DCrossAttn};
use crate::unet_encoder::{UNetEncoder, skip_shapes};

/// `ControlNetConditioningEmbedding`: brings the control image to latent resolution
/// (conv_in, SiLU, then per step a conv and a stride-2 conv each followed by SiLU,
/// then conv_out).
#[derive(Module, Debug)]
pub struct ControlNetConditioningEmbedding {
    /// First conv, image channels to the first width.
    pub conv_in: Conv2d,
    /// Pairs of (3x3 conv, 3x3 stride-2 conv), flattened as diffusers' `blocks`.
    pub blocks: Vec<Conv2d>,
    /// Last conv to the U-Net's first width (zero-initialised in training).
    pub conv_out: Conv2d,
}

impl ControlNetConditioningEmbedding {
    /// From `channels` image channels through `widths` to `out` channels.
    pub fn new(channels: usize, widths: &[usize], out: usize, device: &Device) -> Self {
        let mut blocks = Vec::with_capacity(2 * widths.len().saturating_sub(1));
        for pair in widths.windows(2) {
            blocks.push(conv(pair[0], pair[0], 3, device));
            blocks.push(conv_strided(pair[0], pair[1], 3, 2, true, device));
        }
        Self {
            conv_in: conv(channels, widths[0], 3, device),
            blocks,
            conv_out: conv(widths[widths.len() - 1], out, 3, device),
        }
    }

    /// # Shapes
    /// - `[b, channels, H, W]` to `[b, out, H / f, W / f]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = silu(conv_forward(&self.conv_in, x));
        for block in &self.blocks {
            h = silu(conv_forward(block, h));
        }
        conv_forward(&self.conv_out, h)
    }
}

/// Gives every parameter a new id (a trainable copy must not share the ids of the
/// module it was copied from: gradients and optimizer state are keyed by them).
struct FreshParamIds;

impl burn::module::ModuleMapper for FreshParamIds {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<D>>,
    ) -> burn::module::Param<Tensor<D>> {
        let (_, tensor, mapper) = param.consume();
        // The copy is a model to train: on an autodiff device every parameter is a
        // tracked leaf (the records loaded from a frozen U-Net, and the zeroed
        // convolutions, are not).
        let tensor = if tensor.is_autodiff() {
            tensor.detach().require_grad()
        } else {
            tensor
        };
        burn::module::Param::from_mapped_value(burn::module::ParamId::new(), tensor, mapper)
    }
}

/// The ControlNet. Field names are diffusers' module names.
#[derive(Module, Debug)]
pub struct ControlNetModel {
    /// Input conv (the U-Net's).
    pub conv_in: Conv2d,
    /// MLP on the sinusoidal timestep features.
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `text_time` addition.
    pub add_embedding: Option<TimestepEmbedding>,
    /// The control image's encoder, added to `conv_in`'s output.
    pub controlnet_cond_embedding: ControlNetConditioningEmbedding,
    /// Down blocks, as the U-Net's.
    pub down_blocks: Vec<DownBlock2D>,
    /// One 1x1 conv per skip state.
    pub controlnet_down_blocks: Vec<Conv2d>,
    /// Mid block, as the U-Net's.
    pub mid_block: UNetMidBlock2DCrossAttn,
    /// The 1x1 conv of the mid block's output.
    pub controlnet_mid_block: Conv2d,
    time_proj_dim: usize,
    addition_time_embed_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    in_channels: usize,
    cross_attention_dim: usize,
    conditioning_channels: usize,
    downscale_factor: usize,
    bgr: bool,
    global_pool_conditions: bool,
}

impl ControlNetModel {
    /// The dtype its weights are stored and computed in.
    pub fn dtype(&self) -> burn::tensor::DType {
        crate::norm::compute_dtype_conv(&self.conv_in)
    }

    /// Builds the model from a config (weights initialised at random, to be
    /// replaced by loading).
    pub fn new(config: &ControlNetConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let u = &config.unet;
        let UNetEncoder {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
        } = UNetEncoder::new(u, device)?;
        let boc = &u.block_out_channels;
        let controlnet_down_blocks = skip_shapes(&conv_in, &down_blocks, [1, 1, 8, 8])
            .iter()
            .rev()
            .skip(1)
            .rev()
            .map(|s| conv(s[1], s[1], 1, device))
            .collect();
        Ok(Self {
            controlnet_cond_embedding: ControlNetConditioningEmbedding::new(
                config.conditioning_channels,
                &config.conditioning_embedding_out_channels,
                boc[0],
                device,
            ),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            controlnet_down_blocks,
            controlnet_mid_block: conv(boc[boc.len() - 1], boc[boc.len() - 1], 1, device),
            mid_block,
            time_proj_dim: boc[0],
            addition_time_embed_dim: u.addition_time_embed_dim.unwrap_or(0),
            flip_sin_to_cos: u.flip_sin_to_cos,
            freq_shift: u.freq_shift,
            in_channels: u.in_channels,
            cross_attention_dim: u.blocks()?.cross_attention_dim[0],
            conditioning_channels: config.conditioning_channels,
            downscale_factor: config.downscale_factor(),
            bgr: config.controlnet_conditioning_channel_order == "bgr",
            global_pool_conditions: config.global_pool_conditions,
        })
    }

    /// diffusers' `ControlNetModel.from_unet`: the ControlNet of `unet` (built from
    /// `unet_config`) whose encoder half starts as a copy of the U-Net's (conv_in,
    /// time and text-time embeddings, down and mid blocks), with a freshly
    /// initialised control-image encoder of `conditioning_embedding_out_channels`
    /// and zero-initialised output convs (`controlnet_cond_embedding.conv_out`,
    /// `controlnet_down_blocks`, `controlnet_mid_block`): before training it adds
    /// nothing. The copy's parameters are its own (new parameter ids).
    ///
    /// # Errors
    /// A config a ControlNet cannot have (an embedded guidance scale, an
    /// encoder whose factor is not a power of two).
    pub fn from_unet(
        unet: &UNet2DConditionModel,
        unet_config: &UNet2DConditionConfig,
        conditioning_embedding_out_channels: &[usize],
        device: &Device,
    ) -> Result<Self, ConfigError> {
        let mut config = ControlNetConfig {
            unet: unet_config.clone(),
            conditioning_embedding_out_channels: conditioning_embedding_out_channels.to_vec(),
            ..ControlNetConfig::default()
        };
        config.mirror_up_blocks();
        let mut cn = Self::new(&config, device)?;
        if cn.skip_channels() != unet.skip_channels() {
            return Err(ConfigError::unsupported(
                "block_out_channels",
                "the U-Net's config does not describe this U-Net",
            ));
        }
        cn.conv_in = cn.conv_in.load_record(unet.conv_in.clone().into_record());
        cn.time_embedding = cn
            .time_embedding
            .load_record(unet.time_embedding.clone().into_record());
        if let (Some(a), Some(u)) = (cn.add_embedding.take(), &unet.add_embedding) {
            cn.add_embedding = Some(a.load_record(u.clone().into_record()));
        }
        cn.down_blocks = cn
            .down_blocks
            .load_record(unet.down_blocks.clone().into_record());
        cn.mid_block = cn
            .mid_block
            .load_record(unet.mid_block.clone().into_record());
        let zero = |c: Conv2d| Conv2d {
            weight: c.weight.map(|t| t.zeros_like()),
            bias: c.bias.map(|b| b.map(|t| t.zeros_like())),
            ..c
        };
        cn.controlnet_cond_embedding.conv_out = zero(cn.controlnet_cond_embedding.conv_out);
        cn.controlnet_down_blocks = cn.controlnet_down_blocks.into_iter().map(zero).collect();
        cn.controlnet_mid_block = zero(cn.controlnet_mid_block);
        // Loaded records carry the U-Net's parameter ids (and its frozen state): the
        // copy gets its own, trainable.
        Ok(cn.map(&mut FreshParamIds))
    }

    /// The time embedding, plus SDXL's text-time embedding when given.
    fn embed_time(&self, timesteps: Tensor<1>, added: &AddedConditioning) -> Tensor<2> {
        let dtype = self.dtype();
        let proj = |dim| TimeProjection {
            dim,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        };
        let (_, temb) =
            proj(self.time_proj_dim).embed(&self.time_embedding, timesteps, None, dtype);
        let aug = self
            .add_embedding
            .as_ref()
            .and_then(|add| proj(self.addition_time_embed_dim).embed_text_time(add, added, dtype));
        match aug {
            Some(aug) => temb + aug,
            None => temb,
        }
    }

    /// The residuals for the U-Net, scaled (see [`sd_core::ControlNet::forward`]),
    /// handing `conv_in`, `controlnet_cond_embedding`, `down_blocks.i` and
    /// `mid_block` (before its zero conv) to `observe`.
    ///
    /// # Shapes
    /// - `sample` `[b, in_channels, h, w]`, `timesteps` `[b]`,
    ///   `encoder_hidden_states` `[b, seq, d]`,
    ///   `controlnet_cond` `[b, conditioning_channels, h * f, w * f]`
    /// - output: residuals in `sample`'s dtype
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_intermediates(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        controlnet_cond: Tensor<4>,
        conditioning_scale: f64,
        guess_mode: bool,
        added: &AddedConditioning,
        mut observe: impl FnMut(&str, &Tensor<4>),
    ) -> ControlResiduals {
        let in_dtype = sample.dtype();
        let dtype = self.dtype();
        let context = to_dtype(encoder_hidden_states, dtype);
        let cond = to_dtype(controlnet_cond, dtype);
        let cond = if self.bgr { cond.flip([1]) } else { cond };
        let temb = self.embed_time(timesteps, added);

        let h = conv_forward(&self.conv_in, to_dtype(sample, dtype));
        observe("conv_in", &h);
        let cond = self.controlnet_cond_embedding.forward(cond);
        observe("controlnet_cond_embedding", &cond);
        let mut h = h + cond;
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, states) = block.forward(h, &temb, &context);
            h = out;
            skips.extend(states);
            observe(&format!("down_blocks.{i}"), &h);
        }
        let mid = self.mid_block.forward(h, &temb, &context);
        observe("mid_block", &mid);

        let n = skips.len();
        // Guess mode: logspace(-1, 0, n + 1), shallow residuals weakest.
        let scale = |j: usize| {
            if guess_mode && !self.global_pool_conditions {
                10f64.powf(-1.0 + j as f64 / n as f64) * conditioning_scale
            } else {
                conditioning_scale
            }
        };
        let finish = |t: Tensor<4>, s: f64| {
            let t = t * s;
            let t = if self.global_pool_conditions {
                t.mean_dim(2).mean_dim(3)
            } else {
                t
            };
            to_dtype(t, in_dtype)
        };
        let down = skips
            .into_iter()
            .zip(&self.controlnet_down_blocks)
            .enumerate()
            .map(|(j, (s, c))| finish(conv_forward(c, s), scale(j)))
            .collect();
        ControlResiduals {
            down_block_res_samples: down,
            mid_block_res_sample: finish(conv_forward(&self.controlnet_mid_block, mid), scale(n)),
        }
    }

    /// The channels of its residuals, in order, the mid block's last (they must be
    /// the U-Net's [`crate::UNet2DConditionModel::skip_channels`]).
    pub fn skip_channels(&self) -> Vec<usize> {
        skip_shapes(&self.conv_in, &self.down_blocks, [1, 1, 8, 8])
            .iter()
            .map(|s| s[1])
            .collect()
    }

    /// The width of the text conditioning it cross-attends to.
    pub fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dim
    }

    /// Checks inputs against the model's sizes.
    fn check_inputs(
        &self,
        sample: [usize; 4],
        timesteps: [usize; 1],
        context: [usize; 3],
        cond: [usize; 4],
        added: &AddedConditioning,
    ) -> Result<(), CoreError> {
        let [b, c, h, w] = sample;
        if c != self.in_channels {
            return Err(CoreError::shape(
                "sample",
                format!("{c} channels, the ControlNet takes {}", self.in_channels),
            ));
        }
        if timesteps[0] != b || context[0] != b {
            return Err(CoreError::shape(
                "timesteps",
                format!(
                    "{} timesteps and {} prompt embeddings for a batch of {b}",
                    timesteps[0], context[0]
                ),
            ));
        }
        if context[2] != self.cross_attention_dim {
            return Err(CoreError::shape(
                "encoder_hidden_states",
                format!(
                    "width {}, the ControlNet cross-attends to {}",
                    context[2], self.cross_attention_dim
                ),
            ));
        }
        let f = self.downscale_factor;
        let want = [b, self.conditioning_channels, h * f, w * f];
        if cond != want {
            return Err(CoreError::shape(
                "controlnet_cond",
                format!("shape {cond:?}, expected {want:?} (latents x {f})"),
            ));
        }
        match (&self.add_embedding, &added.text_embeds, &added.time_ids) {
            (Some(_), Some(_), Some(_)) | (None, None, None) => Ok(()),
            (Some(_), _, _) => Err(CoreError::shape(
                "text_embeds",
                "this ControlNet (text_time, SDXL) needs text_embeds and time_ids",
            )),
            (None, _, _) => Err(CoreError::shape(
                "text_embeds",
                "this ControlNet takes no pooled text embedding or time ids",
            )),
        }
    }
}

impl sd_core::ControlNet for ControlNetModel {
    fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        controlnet_cond: Tensor<4>,
        conditioning_scale: f64,
        guess_mode: bool,
        added: &AddedConditioning,
    ) -> Result<ControlResiduals, CoreError> {
        self.check_inputs(
            sample.dims(),
            timesteps.dims(),
            encoder_hidden_states.dims(),
            controlnet_cond.dims(),
            added,
        )?;
        Ok(self.forward_with_intermediates(
            sample,
            timesteps,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale,
            guess_mode,
            added,
            |_, _| {},
        ))
    }

    fn conditioning_channels(&self) -> usize {
        self.conditioning_channels
    }

    fn downscale_factor(&self) -> usize {
        self.downscale_factor
    }

    fn global_pool_conditions(&self) -> bool {
        self.global_pool_conditions
    }
}
