//! The denoiser contract (the U-Net of Stable Diffusion).

use burn::prelude::*;

use crate::error::CoreError;

/// A model predicting noise (or `v`, or `x0`, as its scheduler's `prediction_type`
/// says) from noisy latents, timesteps and text conditioning.
pub trait Denoiser {
    /// One forward pass.
    ///
    /// # Shapes
    /// - `sample`: `[batch, in_channels, h, w]` latents (already scaled by the scheduler)
    /// - `timesteps`: `[batch]`, float, may be fractional (Karras / AYS sigmas)
    /// - `encoder_hidden_states`: `[batch, seq_len, cross_attention_dim]`
    /// - output: `[batch, out_channels, h, w]`, in the dtype of `sample`
    ///
    /// # Errors
    /// [`CoreError::Shape`] when the inputs do not fit the model (channels other than
    /// [`Self::in_channels`], a timestep count or conditioning batch other than the
    /// sample's, a conditioning width other than [`Self::cross_attention_dim`]).
    fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<4>, CoreError>;

    /// Channels expected in `sample` (4, or 9 for an inpainting U-Net).
    fn in_channels(&self) -> usize;

    /// Channels of the prediction (4 for SD latents).
    fn out_channels(&self) -> usize;

    /// Width of the conditioning the model cross-attends to.
    fn cross_attention_dim(&self) -> usize;
}

/// Checks the inputs of [`Denoiser::forward`] against a denoiser's sizes; the check
/// implementations run before their forward pass.
///
/// # Errors
/// [`CoreError::Shape`] naming the first input that does not fit.
pub fn check_denoiser_inputs(
    denoiser: &(impl Denoiser + ?Sized),
    sample: [usize; 4],
    timesteps: [usize; 1],
    encoder_hidden_states: [usize; 3],
) -> Result<(), CoreError> {
    let [b, c, _, _] = sample;
    if c != denoiser.in_channels() {
        return Err(CoreError::shape(
            "sample",
            format!(
                "{c} channels, the denoiser takes {}",
                denoiser.in_channels()
            ),
        ));
    }
    if timesteps[0] != b {
        return Err(CoreError::shape(
            "timesteps",
            format!("{} timesteps for a batch of {b}", timesteps[0]),
        ));
    }
    let [cb, _, d] = encoder_hidden_states;
    if cb != b {
        return Err(CoreError::shape(
            "encoder_hidden_states",
            format!("batch {cb}, the sample's is {b}"),
        ));
    }
    if d != denoiser.cross_attention_dim() {
        return Err(CoreError::shape(
            "encoder_hidden_states",
            format!(
                "width {d}, the denoiser cross-attends to {}",
                denoiser.cross_attention_dim()
            ),
        ));
    }
    Ok(())
}
