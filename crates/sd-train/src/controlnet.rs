//! ControlNet training (diffusers' `examples/controlnet/train_controlnet.py`): the
//! U-Net frozen, a ControlNet (from [`sd_models::ControlNetModel::from_unet`], or
//! one to fine-tune) trained on (image, caption, control image) triples.

use burn::prelude::*;
use sd_core::{AddedConditioning, ControlSignals};
use sd_models::{ControlNetModel, UNet2DConditionModel};

use crate::objective::Objective;

/// The training loss of one batch: the latents noised at `timesteps`, the
/// ControlNet's residuals of the noisy latents and the control images added to the
/// U-Net's skip connections, the U-Net's prediction against the objective's target
/// (mean squared error, min-SNR weighted when the objective says so). Gradients flow
/// to the ControlNet; freeze the U-Net with `Module::no_grad` so that only the
/// ControlNet's parameters get them. `added` is SDXL's text-time conditioning
/// (`text_embeds`, `time_ids`; default for SD 1.x / 2.x), as
/// `train_controlnet_sdxl.py` passes it to both models.
///
/// # Shapes
/// - `latents`, `noise`: `[b, 4, h, w]` (scaled latents); `timesteps`: `b` values
/// - `context`: `[b, seq, d]` prompt embeddings
/// - `controlnet_cond`: `[b, 3, h * f, w * f]` control images in `[0, 1]`
/// - output: `[1]`
#[allow(clippy::too_many_arguments)]
pub fn controlnet_loss(
    objective: &Objective,
    unet: &UNet2DConditionModel,
    controlnet: &ControlNetModel,
    latents: Tensor<4>,
    noise: Tensor<4>,
    timesteps: &[usize],
    context: Tensor<3>,
    added: AddedConditioning,
    controlnet_cond: Tensor<4>,
) -> Tensor<1> {
    let device = latents.device();
    let noisy = objective.add_noise(latents.clone(), noise.clone(), timesteps);
    let target = objective.target(latents, noise, timesteps);
    let t = Objective::timestep_tensor(timesteps, &device);
    let pred = controlled_prediction(unet, controlnet, noisy, t, context, added, controlnet_cond);
    objective.loss(pred, target, timesteps)
}

/// The U-Net's prediction with the ControlNet's residuals of `controlnet_cond` in its
/// skip connections (conditioning scale 1, no guess mode), both models given the same
/// text and added conditioning: the forward pass of ControlNet training.
///
/// # Shapes
/// - `noisy`: `[b, 4, h, w]`; `t`: `[b]`; `context`: `[b, seq, d]`;
///   `controlnet_cond`: `[b, 3, h * f, w * f]`; output: `[b, 4, h, w]`
pub fn controlled_prediction(
    unet: &UNet2DConditionModel,
    controlnet: &ControlNetModel,
    noisy: Tensor<4>,
    t: Tensor<1>,
    context: Tensor<3>,
    added: AddedConditioning,
    controlnet_cond: Tensor<4>,
) -> Tensor<4> {
    let residuals = controlnet.forward_with_intermediates(
        noisy.clone(),
        t.clone(),
        context.clone(),
        controlnet_cond,
        1.0,
        false,
        &added,
        |_, _| {},
    );
    let control = ControlSignals::residuals(residuals);
    unet.forward_controlled_with_intermediates(noisy, t, context, &added, &control, |_, _| {})
}

/// ControlNet training in the [`crate::Trainer`] (`TrainConfig::controlnet`): the
/// U-Net frozen, a ControlNet trained on the data folder's pictures, captions and
/// control images.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ControlNetTrainConfig {
    /// The control images: a folder with a picture of the same file name for every
    /// training picture (`cat.png` for `data/cat.png`), resized and cropped as the
    /// pictures, in `[0, 1]` (diffusers' `conditioning_image`). Default:
    /// `data/conditioning/`.
    #[serde(default)]
    pub conditioning_data: Option<std::path::PathBuf>,
    /// Start from this ControlNet (a diffusers folder or a single file); default: a
    /// copy of the U-Net's encoder with zero convolutions
    /// ([`sd_models::ControlNetModel::from_unet`], diffusers' `from_unet`).
    #[serde(default)]
    pub init: Option<std::path::PathBuf>,
    /// The control-image encoder's channels of a new ControlNet (diffusers' default
    /// `[16, 32, 96, 256]`).
    #[serde(default = "d_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
}

fn d_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

impl Default for ControlNetTrainConfig {
    fn default() -> Self {
        Self {
            conditioning_data: None,
            init: None,
            conditioning_embedding_out_channels: d_embedding_channels(),
        }
    }
}
