//! diffusers' `UNet2DConditionModel` for Stable Diffusion 1.x / 2.x and SDXL.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::config::{UNet2DConditionConfig, UpBlockType};
use crate::embeddings::{TimeProjection, TimestepEmbedding};
use crate::error::ConfigError;
use crate::norm::{GroupNorm, to_dtype};
use crate::resnet::{conv, conv_forward};
use crate::unet_2d_blocks::{DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D};
use crate::unet_encoder::{UNetEncoder, block_attention, resnet_settings};

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
    /// The dtype its weights are stored and computed in (f32, or f16 / bf16 as
    /// loaded); inputs are cast to it and outputs back.
    pub fn dtype(&self) -> burn::tensor::DType {
        crate::norm::compute_dtype_conv(&self.conv_in)
    }

    /// Builds the model from a config (weights lazily initialised at random, to be
    /// replaced by loading).
    pub fn new(config: &UNet2DConditionConfig, device: &Device) -> Result<Self, ConfigError> {
        let UNetEncoder {
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
        } = UNetEncoder::new(config, device)?;
        let blocks = config.blocks()?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let resnet = resnet_settings(config);
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = boc[n - 1];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let rev = n - 1 - i;
            let prev = c_out;
            c_out = boc[rev];
            let c_in = boc[rev.saturating_sub(1)];
            let attn =
                (*kind == UpBlockType::CrossAttnUpBlock2D).then(|| block_attention(&blocks, rev));
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
            conv_in,
            time_embedding,
            add_embedding,
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
        let dtype = self.dtype();
        let proj = TimeProjection {
            dim: self.time_proj_dim,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        };
        proj.embed(&self.time_embedding, timesteps, timestep_cond, dtype)
    }

    /// SDXL's `aug_emb`: `add_embedding([text_embeds, time_proj(time_ids)])`, when
    /// the model has a `text_time` addition and both inputs are given.
    ///
    /// # Shapes
    /// - `text_embeds` `[b, d]`, `time_ids` `[b, n]`; output `[b, 4 * c0]`
    pub fn text_time_embed(&self, added: &sd_core::AddedConditioning) -> Option<Tensor<2>> {
        let proj = TimeProjection {
            dim: self.addition_time_embed_dim,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
        };
        let dtype = self.dtype();
        proj.embed_text_time(self.add_embedding.as_ref()?, added, dtype)
    }

    /// The width of the embedded guidance scale (`time_cond_proj_dim`), if any.
    pub fn time_cond_proj_dim(&self) -> Option<usize> {
        self.time_embedding
            .cond_proj
            .as_ref()
            .map(|p| p.weight.dims()[0])
    }

    /// Predicts the noise (or `v`) for noisy latents, the inputs checked first (the
    /// same as [`sd_core::Denoiser::forward`]).
    ///
    /// # Shapes
    /// - `sample`: `[b, in_channels, h, w]` (any h, w; SD uses multiples of 8)
    /// - `timesteps`: `[b]` (fractional allowed)
    /// - `encoder_hidden_states`: `[b, seq, cross_attention_dim]`
    /// - output: `[b, out_channels, h, w]`, in `sample`'s dtype
    ///
    /// # Errors
    /// [`sd_core::CoreError::Shape`] for channels, a timestep count other than the
    /// batch, a conditioning width other than `cross_attention_dim`; a missing SDXL
    /// `text_time` conditioning.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<4>, sd_core::CoreError> {
        sd_core::Denoiser::forward(self, sample, timesteps, encoder_hidden_states)
    }

    /// [`Self::forward`] with conditioning beyond the text (SDXL's pooled embedding
    /// and time ids, LCM's guidance embedding, ControlNet residuals, adapter
    /// features), checked (the same as [`sd_core::Denoiser::forward_added`]).
    ///
    /// # Errors
    /// As [`Self::forward`]; added conditioning or residuals that do not fit.
    pub fn forward_added(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &sd_core::AddedConditioning,
    ) -> Result<Tensor<4>, sd_core::CoreError> {
        sd_core::Denoiser::forward_added(self, sample, timesteps, encoder_hidden_states, added)
    }

    /// [`Self::forward_added`] with control models' signals (ControlNet residuals,
    /// T2I-Adapter features), checked (the same as
    /// [`sd_core::Denoiser::forward_controlled`]).
    ///
    /// # Errors
    /// As [`Self::forward_added`]; residuals or features that do not fit the blocks.
    pub fn forward_controlled(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &sd_core::AddedConditioning,
        control: &sd_core::ControlSignals,
    ) -> Result<Tensor<4>, sd_core::CoreError> {
        sd_core::Denoiser::forward_controlled(
            self,
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            control,
        )
    }

    /// The U-Net without the input checks (training loops over shapes they made),
    /// handing each named intermediate (`conv_in`, `down_blocks.i`,
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

    /// [`Self::forward_with_intermediates`] with conditioning beyond the text, not
    /// checked: [`Self::forward_added`] checks first.
    pub fn forward_added_with_intermediates(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &sd_core::AddedConditioning,
        observe: impl FnMut(&str, &Tensor<4>),
    ) -> Tensor<4> {
        let control = sd_core::ControlSignals::default();
        self.forward_controlled_with_intermediates(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            &control,
            observe,
        )
    }

    /// [`Self::forward_added_with_intermediates`] with control signals, not checked:
    /// [`Self::forward_controlled`] checks first.
    pub fn forward_controlled_with_intermediates(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &sd_core::AddedConditioning,
        control: &sd_core::ControlSignals,
        mut observe: impl FnMut(&str, &Tensor<4>),
    ) -> Tensor<4> {
        let in_dtype = sample.dtype();
        let dtype = self.dtype();
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
        let mut intrablock: std::collections::VecDeque<Tensor<4>> = control
            .down_intrablock_additional_residuals
            .iter()
            .flatten()
            .map(|r| to_dtype(r.clone(), dtype))
            .collect();
        for (i, block) in self.down_blocks.iter().enumerate() {
            // T2I-Adapter features: inside a cross-attention block, after a plain one.
            let cross = !block.attentions.is_empty();
            let inside = if cross { intrablock.pop_front() } else { None };
            let (out, mut states) = block.forward_with_residual(h, &temb, &context, inside);
            h = out;
            // diffusers adds in place (`sample += r`), and the block's output is
            // also its last skip state: both get the feature.
            if !cross && let Some(r) = intrablock.pop_front() {
                h = h + r.clone();
                if let Some(last) = states.last_mut() {
                    *last = last.clone() + r;
                }
            }
            skips.extend(states);
            observe(&format!("down_blocks.{i}"), &h);
        }
        if let Some(residuals) = &control.down_block_additional_residuals {
            for (skip, r) in skips.iter_mut().zip(residuals) {
                *skip = skip.clone() + to_dtype(r.clone(), dtype);
            }
        }
        h = self.mid_block.forward(h, &temb, &context);
        if let Some(r) = intrablock.pop_front().filter(|r| r.dims() == h.dims()) {
            h = h + r;
        }
        if let Some(r) = &control.mid_block_additional_residual {
            h = h + to_dtype(r.clone(), dtype);
        }
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

impl UNet2DConditionModel {
    /// The channels of the skip connections a ControlNet adds residuals to, in
    /// order, the mid block's last.
    pub fn skip_channels(&self) -> Vec<usize> {
        crate::unet_encoder::skip_shapes(&self.conv_in, &self.down_blocks, [1, 1, 8, 8])
            .iter()
            .map(|s| s[1])
            .collect()
    }

    /// Checks control signals (ControlNet residuals, adapter features) against this
    /// U-Net's skip connections for a sample of shape `sample`.
    ///
    /// # Errors
    /// [`sd_core::CoreError::Shape`] naming the residual that does not fit.
    pub fn check_control_residuals(
        &self,
        sample: [usize; 4],
        control: &sd_core::ControlSignals,
    ) -> Result<(), sd_core::CoreError> {
        let expected = crate::unet_encoder::skip_shapes(&self.conv_in, &self.down_blocks, sample);
        crate::unet_encoder::check_residuals(&expected, control)?;
        let expected = crate::unet_encoder::intrablock_shapes(&self.down_blocks, sample, &expected);
        crate::unet_encoder::check_intrablock(&expected, control)
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
        let control = sd_core::ControlSignals::default();
        sd_core::Denoiser::forward_controlled(
            self,
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            &control,
        )
    }

    fn forward_controlled(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &sd_core::AddedConditioning,
        control: &sd_core::ControlSignals,
    ) -> Result<Tensor<4>, sd_core::CoreError> {
        sd_core::check_denoiser_inputs(
            self,
            sample.dims(),
            timesteps.dims(),
            encoder_hidden_states.dims(),
        )?;
        sd_core::check_added_conditioning(self, sample.dims()[0], added)?;
        self.check_control_residuals(sample.dims(), control)?;
        Ok(self.forward_controlled_with_intermediates(
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            control,
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

    fn takes_control_residuals(&self) -> bool {
        true
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
