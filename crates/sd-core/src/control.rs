//! The control contract: a model that turns a control image (edges, depth, a pose)
//! into residuals for the denoiser's skip connections (diffusers' `ControlNetModel`).

use burn::prelude::*;

use crate::denoiser::AddedConditioning;
use crate::error::CoreError;

/// What a control model hands the denoiser (diffusers' `ControlNetOutput`), with its
/// conditioning scale applied.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// One residual per skip state of the U-Net's down blocks, `[b, c_j, h_j, w_j]`
    /// (`[b, c_j, 1, 1]` when the model pools globally).
    pub down_block_res_samples: Vec<Tensor<4>>,
    /// The residual of the mid block's output, `[b, c, h, w]` (or `[b, c, 1, 1]`).
    pub mid_block_res_sample: Tensor<4>,
}

impl ControlResiduals {
    /// The sum of two models' residuals (diffusers' `MultiControlNetModel`).
    ///
    /// # Errors
    /// [`CoreError::Shape`] when the two do not have the same number of residuals.
    pub fn sum(self, other: Self) -> Result<Self, CoreError> {
        if self.down_block_res_samples.len() != other.down_block_res_samples.len() {
            return Err(CoreError::shape(
                "down_block_res_samples",
                format!(
                    "{} and {} residuals cannot be summed",
                    self.down_block_res_samples.len(),
                    other.down_block_res_samples.len()
                ),
            ));
        }
        Ok(Self {
            down_block_res_samples: self
                .down_block_res_samples
                .into_iter()
                .zip(other.down_block_res_samples)
                .map(|(a, b)| a + b)
                .collect(),
            mid_block_res_sample: self.mid_block_res_sample + other.mid_block_res_sample,
        })
    }

    /// For classifier-free guidance in guess mode: zeros for the unconditional half
    /// before the residuals of the conditional one (`[b, ..]` to `[2b, ..]`).
    pub fn with_zero_uncond(self) -> Self {
        let pad = |t: Tensor<4>| Tensor::cat(vec![t.zeros_like(), t], 0);
        Self {
            down_block_res_samples: self.down_block_res_samples.into_iter().map(pad).collect(),
            mid_block_res_sample: pad(self.mid_block_res_sample),
        }
    }
}

/// A control model (ControlNet): it sees the denoiser's input and a control image and
/// returns residuals for the denoiser's skip connections.
pub trait ControlNet {
    /// One forward pass.
    ///
    /// # Shapes
    /// - `sample`: `[b, 4, h, w]` latents as the denoiser gets them (scaled)
    /// - `timesteps`: `[b]`
    /// - `encoder_hidden_states`: `[b, seq, cross_attention_dim]`
    /// - `controlnet_cond`: `[b, conditioning_channels, h * f, w * f]` in `[0, 1]`,
    ///   `f` = [`Self::downscale_factor`]
    /// - `added`: SDXL's pooled embedding and time ids when the model has a
    ///   `text_time` addition
    ///
    /// `conditioning_scale` multiplies every residual; in `guess_mode` the residuals
    /// grow from 0.1 to 1.0 times the scale, shallow to deep (the model is meant to
    /// recognise the content without a prompt).
    ///
    /// # Errors
    /// [`CoreError::Shape`] for inputs that do not fit the model.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        controlnet_cond: Tensor<4>,
        conditioning_scale: f64,
        guess_mode: bool,
        added: &AddedConditioning,
    ) -> Result<ControlResiduals, CoreError>;

    /// Channels of the control image (3: RGB).
    fn conditioning_channels(&self) -> usize;

    /// How much larger the control image is than the latents (8 for SD: it matches
    /// the VAE's factor).
    fn downscale_factor(&self) -> usize;

    /// Whether the model pools its residuals over space (`global_pool_conditions`,
    /// e.g. shuffle ControlNets): such models always run in guess mode.
    fn global_pool_conditions(&self) -> bool {
        false
    }
}

/// What control models hand a denoiser, apart from what the denoiser itself is
/// conditioned on ([`AddedConditioning`]): ControlNet residuals and T2I-Adapter
/// features, for [`crate::Denoiser::forward_controlled`]. Empty by default. The
/// fields are the U-Net's (diffusers' names); a transformer denoiser's control
/// models add theirs beside them.
#[derive(Debug, Clone, Default)]
pub struct ControlSignals {
    /// ControlNet residuals added to the U-Net's skip connections, one per skip
    /// state in the order the down blocks produce them (diffusers'
    /// `down_block_additional_residuals`); each `[batch, c, h, w]` as its skip, or
    /// `[batch, c, 1, 1]` from a globally pooled ControlNet.
    pub down_block_additional_residuals: Option<Vec<Tensor<4>>>,
    /// The ControlNet residual added to the mid block's output
    /// (`mid_block_additional_residual`), `[batch, c, h, w]` or `[batch, c, 1, 1]`.
    pub mid_block_additional_residual: Option<Tensor<4>>,
    /// T2I-Adapter features added inside the down blocks, in order (diffusers'
    /// `down_intrablock_additional_residuals`): to the last resnet/attention output
    /// of a cross-attention block (before its downsampler), to the output of a plain
    /// block, and (SDXL adapters) a last one of the mid block's shape to its output.
    pub down_intrablock_additional_residuals: Option<Vec<Tensor<4>>>,
}

impl ControlSignals {
    /// ControlNet residuals (several ControlNets' summed).
    pub fn residuals(r: ControlResiduals) -> Self {
        Self {
            down_block_additional_residuals: Some(r.down_block_res_samples),
            mid_block_additional_residual: Some(r.mid_block_res_sample),
            down_intrablock_additional_residuals: None,
        }
    }

    /// Whether there is no signal.
    pub fn is_empty(&self) -> bool {
        self.down_block_additional_residuals.is_none()
            && self.mid_block_additional_residual.is_none()
            && self.down_intrablock_additional_residuals.is_none()
    }
}

/// A T2I-Adapter: a light encoder of a control image whose feature maps are added
/// inside the denoiser's down blocks (diffusers' `down_intrablock_additional_residuals`),
/// computed once per run.
pub trait Adapter {
    /// The feature maps of `image`, one per down block of the denoiser (SD's full
    /// adapter: `[b, c_i, h_i, w_i]` at the latents' size, then halving).
    ///
    /// # Shapes
    /// - `image`: `[b, in_channels, H, W]` in `[0, 1]`, `H` and `W` multiples of
    ///   [`Self::downscale_factor`]
    ///
    /// # Errors
    /// [`CoreError::Shape`] for an image that does not fit.
    fn features(&self, image: Tensor<4>) -> Result<Vec<Tensor<4>>, CoreError>;

    /// Channels of the control image (3, or 1 for grey sketches).
    fn in_channels(&self) -> usize;

    /// How much smaller the first feature map is than the image.
    fn downscale_factor(&self) -> usize;
}
