//! diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x / 2.x and SDXL.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::config::{DownBlockType, UNet2DConditionConfig, UpBlockType};
use crate::embeddings::{TimestepEmbedding, timestep_embedding};
use crate::error::ConfigError;
use crate::norm::{GroupNorm, to_dtype};
use crate::resnet::{ResnetSettings, conv, conv_forward};
use crate::unet_2d_blocks::{BlockAttention, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D};

/// The conditional U-Net. Field names are diffusers' module names.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    /// Input conv.
    pub conv_in: Conv2d,
    /// MLP on the sinusoidal timestep features.
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `text_time` addition: an MLP on [pooled text embedding, sinusoidal
    /// time ids], added to the time embedding.
    pub add_embedding: Option<TimestepEmbedding>,
    /// Down blocks, highest resolution first.
    pub down_blocks: Vec<DownBlock2D>,
    /// Mid block.
    pub mid_block: UNetMidBlock2DCrossAttn,
    /// Up blocks, lowest resolution first.
    pub up_blocks: Vec<UpBlock2D>,
    /// Output norm.
    pub conv_norm_out: GroupNorm,
    /// Output conv.
    pub conv_out: Conv2d,
    time_proj_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
    in_channels: usize,
    out_channels: usize,
    cross_attention_dim: usize,
    addition_time_embed_dim: usize,
}

impl UNet2DConditionModel {
    /// Builds the model from a config (weights lazily initialised at random, to be
    /// replaced by loading).
    pub fn new(config: &UNet2DConditionConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let blocks = config.blocks()?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let temb_dim = boc[0] * 4;
        let resnet = ResnetSettings {
            temb_channels: Some(temb_dim),
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            output_scale_factor: config.resnet_out_scale_factor,
        };
        let attention = |i: usize| BlockAttention {
            heads: blocks.num_heads[i],
            layers: blocks.transformer_layers[i],
            context_dim: blocks.cross_attention_dim[i],
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = boc[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = boc[i];
            let attn = (*kind == DownBlockType::CrossAttnDownBlock2D).then(|| attention(i));
            down_blocks.push(DownBlock2D::new(
                c_in,
                c_out,
                blocks.layers_per_block[i],
                resnet,
                attn,
                i + 1 < n,
                config.downsample_padding,
                device,
            ));
        }

        let mid_resnet = ResnetSettings {
            output_scale_factor: config.mid_block_scale_factor,
            ..resnet
        };
        let mid_block =
            UNetMidBlock2DCrossAttn::new(boc[n - 1], mid_resnet, attention(n - 1), device);

        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = boc[n - 1];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let rev = n - 1 - i;
            let prev = c_out;
            c_out = boc[rev];
            let c_in = boc[rev.saturating_sub(1)];
            let attn = (*kind == UpBlockType::CrossAttnUpBlock2D).then(|| attention(rev));
            up_blocks.push(UpBlock2D::new(
                c_in,
                c_out,
                prev,
                blocks.layers_per_block[rev] + 1,
                resnet,
                attn,
                i + 1 < n,
                device,
            ));
        }

        Ok(Self {
            conv_in: conv(config.in_channels, boc[0], config.conv_in_kernel, device),
            time_embedding: TimestepEmbedding::new(
                boc[0],
                temb_dim,
                config.time_cond_proj_dim,
                device,
            ),
            add_embedding: config
                .projection_class_embeddings_input_dim
                .filter(|_| config.addition_embed_type.is_some())
                .map(|d| TimestepEmbedding::new(d, temb_dim, None, device)),
            addition_time_embed_dim: config.addition_time_embed_dim.unwrap_or(0),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(config.norm_num_groups, boc[0], config.norm_eps, device),
            conv_out: conv(boc[0], config.out_channels, config.conv_out_kernel, device),
            time_proj_dim: boc[0],
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
            center_input_sample: config.center_input_sample,
            in_channels: config.in_channels,
            out_channels: config.out_channels,
            cross_attention_dim: blocks.cross_attention_dim[0],
        })
    }

    /// The sinusoidal features (`time_proj`) and their embedding (`time_embedding`).
    ///
    /// # Shapes
    /// - `timesteps`: `[b]`; outputs `[b, c0]` and `[b, 4 * c0]`
    pub fn time_embed(&self, timesteps: Tensor<1>) -> (Tensor<2>, Tensor<2>) {
        self.time_embed_with_cond(timesteps, None)
    }

    /// [`Self::time_embed`] with diffusers' `timestep_cond` (`[b,
    /// time_cond_proj_dim]`, the embedded guidance scale of LCM-distilled U-Nets).
    pub fn time_embed_with_cond(
        &self,
        timesteps: Tensor<1>,
        timestep_cond: Option<Tensor<2>>,
    ) -> (Tensor<2>, Tensor<2>) {
        let dtype = self.conv_in.weight.val().dtype();
        let t = crate::norm::to_f32(timesteps);
        let proj = timestep_embedding(t, self.time_proj_dim, self.flip_sin_to_cos, self.freq_shift);
        let cond = timestep_cond.map(|c| to_dtype(c, dtype));
        let emb = self
            .time_embedding
            .forward(to_dtype(proj.clone(), dtype), cond);
        (proj, emb)
    }

    /// SDXL's `aug_emb`: `add_embedding([text_embeds, time_proj(time_ids)])`, when
    /// the model has a `text_time` addition and both inputs are given.
    ///
    /// # Shapes
    /// - `text_embeds` `[b, d]`, `time_ids` `[b, n]`; output `[b, 4 * c0]`
    pub fn text_time_embed(&self, added: &sd_core::AddedConditioning) -> Option<Tensor<2>> {
        let (add, text, ids) = (
            self.add_embedding.as_ref()?,
            added.text_embeds.clone()?,
            added.time_ids.clone()?,
        );
        let dtype = self.conv_in.weight.val().dtype();
        let [b, n] = ids.dims();
        let d = self.addition_time_embed_dim;
        let ids = crate::norm::to_f32(ids).reshape([b * n]);
        let time =
            timestep_embedding(ids, d, self.flip_sin_to_cos, self.freq_shift).reshape([b, n * d]);
        let input = Tensor::cat(vec![crate::norm::to_f32(text), time], 1);
        Some(add.forward(to_dtype(input, dtype), None))
    }

    /// The width of the embedded guidance scale (`time_cond_proj_dim`), if any.
    pub fn time_cond_proj_dim(&self) -> Option<usize> {
        self.time_embedding
            .cond_proj
            .as_ref()
            .map(|p| p.weight.dims()[0])
    }

    /// Predicts the noise (or `v`) for noisy latents.
    ///
    /// # Shapes
    /// - `sample`: `[b, in_channels, h, w]` (any h, w; SD uses multiples of 8)
    /// - `timesteps`: `[b]` (fractional allowed)
    /// - `encoder_hidden_states`: `[b, seq, cross_attention_dim]`
    /// - output: `[b, out_channels, h, w]`, in `sample`'s dtype
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Tensor<4> {
        self.forward_with_intermediates(sample, timesteps, encoder_hidden_states, |_, _| {})
    }

    /// [`Self::forward`], handing each named intermediate (`conv_in`, `down_blocks.i`,
    /// `mid_block`, `up_blocks.i`, `conv_norm_out`) to `observe`, to localise a mismatch.
    pub fn forward_with_intermediates(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        observe: impl FnMut(&str, &Tensor<4>),
    ) -> Tensor<4> {
        let added = sd_core::AddedConditioning::default();
        self.forward_added_with_intermediates(
            sample,
            timesteps,
            encoder_hidden_states,
            &added,
            observe,
        )
    }

    /// [`Self::forward_with_intermediates`] with conditioning beyond the text
    /// (`timestep_cond`).
    pub fn forward_added_with_intermediates(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &sd_core::AddedConditioning,
        mut observe: impl FnMut(&str, &Tensor<4>),
    ) -> Tensor<4> {
        let in_dtype = sample.dtype();
        let dtype = self.conv_in.weight.val().dtype();
        let sample = to_dtype(sample, dtype);
        let context = to_dtype(encoder_hidden_states, dtype);
        let sample = if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };
        let (_, temb) = self.time_embed_with_cond(timesteps, added.timestep_cond.clone());
        let temb = match self.text_time_embed(added) {
            Some(aug) => temb + aug,
            None => temb,
        };

        let mut h = conv_forward(&self.conv_in, sample);
        observe("conv_in", &h);
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let (out, states) = block.forward(h, &temb, &context);
            h = out;
            skips.extend(states);
            observe(&format!("down_blocks.{i}"), &h);
        }
        h = self.mid_block.forward(h, &temb, &context);
        observe("mid_block", &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let remaining = skips.len() - block.resnets.len();
            let upsample_size = (remaining > 0).then(|| {
                let [_, _, sh, sw] = skips[remaining - 1].dims();
                [sh, sw]
            });
            h = block.forward(h, &mut skips, &temb, &context, upsample_size);
            observe(&format!("up_blocks.{i}"), &h);
        }
        // Unfused: the fixtures record `conv_norm_out` before the activation (one
        // small norm at the end of the network).
        let h = self.conv_norm_out.forward(h);
        observe("conv_norm_out", &h);
        let out = conv_forward(&self.conv_out, silu(h));
        to_dtype(out, in_dtype)
    }
}

impl sd_core::Denoiser for UNet2DConditionModel {
    fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<4>, sd_core::CoreError> {
        let added = sd_core::AddedConditioning::default();
        sd_core::Denoiser::forward_added(self, sample, timesteps, encoder_hidden_states, &added)
    }

    fn forward_added(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &sd_core::AddedConditioning,
    ) -> Result<Tensor<4>, sd_core::CoreError> {
        sd_core::check_denoiser_inputs(
            self,
            sample.dims(),
            timesteps.dims(),
            encoder_hidden_states.dims(),
        )?;
        sd_core::check_added_conditioning(self, sample.dims()[0], added)?;
        Ok(self.forward_added_with_intermediates(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            |_, _| {},
        ))
    }

    fn time_cond_proj_dim(&self) -> Option<usize> {
        UNet2DConditionModel::time_cond_proj_dim(self)
    }

    fn text_time_dims(&self) -> Option<sd_core::TextTimeDims> {
        self.add_embedding.as_ref().map(|a| sd_core::TextTimeDims {
            input_dim: a.linear_1.weight.dims()[0],
            time_embed_dim: self.addition_time_embed_dim,
        })
    }

    fn in_channels(&self) -> usize {
        self.in_channels
    }

    fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dim
    }
}
