//! The denoiser contract (the U-Net of Stable Diffusion).

use burn::prelude::*;

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
    fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Tensor<4>;

    /// Channels expected in `sample` (4, or 9 for an inpainting U-Net).
    fn in_channels(&self) -> usize;

    /// Channels of the prediction (4 for SD latents).
    fn out_channels(&self) -> usize;

    /// Width of the conditioning the model cross-attends to.
    fn cross_attention_dim(&self) -> usize;
}
