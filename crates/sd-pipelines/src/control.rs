//! ControlNet in the denoising loop (diffusers' `StableDiffusionControlNetPipeline`
//! and its image-to-image, inpainting and SDXL siblings): each control model sees
//! the U-Net's input and its control image, and the sum of their residuals goes into
//! the U-Net's skip connections.

use burn::prelude::*;
use sd_core::{Adapter, AddedConditioning, ControlNet, ControlResiduals, CoreError};

/// One control model of a run with its image and settings.
#[derive(Clone)]
pub struct ControlNetUnit<'a> {
    /// The model.
    pub model: &'a dyn ControlNet,
    /// The control image `[1 or b, c, H, W]` in `[0, 1]` at the picture's size (not
    /// `[-1, 1]` like an init image).
    pub image: Tensor<4>,
    /// Multiplies every residual (diffusers' `controlnet_conditioning_scale`).
    pub conditioning_scale: f64,
    /// Fraction of the steps before which the model is off (`control_guidance_start`).
    pub guidance_start: f64,
    /// Fraction of the steps after which it is off (`control_guidance_end`).
    pub guidance_end: f64,
    /// Guess mode: the model sees the conditional half only, with residuals growing
    /// from 0.1 to 1 times the scale, shallow to deep.
    pub guess_mode: bool,
}

impl std::fmt::Debug for ControlNetUnit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlNetUnit")
            .field("image", &self.image.dims())
            .field("conditioning_scale", &self.conditioning_scale)
            .field("guidance_start", &self.guidance_start)
            .field("guidance_end", &self.guidance_end)
            .field("guess_mode", &self.guess_mode)
            .finish_non_exhaustive()
    }
}

impl<'a> ControlNetUnit<'a> {
    /// `model` with `image`, scale 1, on for the whole run, no guess mode.
    pub fn new(model: &'a dyn ControlNet, image: Tensor<4>) -> Self {
        Self {
            model,
            image,
            conditioning_scale: 1.0,
            guidance_start: 0.0,
            guidance_end: 1.0,
            guess_mode: false,
        }
    }

    /// Guess mode, or a model that pools globally (it always runs so).
    fn guess(&self) -> bool {
        self.guess_mode || self.model.global_pool_conditions()
    }

    /// diffusers' `controlnet_keep` at step `k` of `n`: 0 before `start` or after
    /// `end`, else 1.
    pub fn keep(&self, k: usize, n: usize) -> f64 {
        let (k, n) = (k as f64, n.max(1) as f64);
        if k / n < self.guidance_start || (k + 1.0) / n > self.guidance_end {
            0.0
        } else {
            1.0
        }
    }
}

/// Checks units against a run: settings in range, an image per unit of the
/// picture's size (the latents' times the model's factor) and batch 1 or `batch`.
///
/// # Errors
/// [`CoreError::InvalidArgument`] naming the setting.
pub fn check_units(
    units: &[ControlNetUnit<'_>],
    latents: [usize; 4],
    vae_factor: usize,
) -> Result<(), CoreError> {
    let [b, _, h, w] = latents;
    for (i, u) in units.iter().enumerate() {
        let f = u.model.downscale_factor();
        if f != vae_factor {
            return Err(CoreError::invalid(
                "controlnet",
                format!(
                    "ControlNet {i} works at 1/{f} of the image, the VAE's latents at 1/{vae_factor}"
                ),
            ));
        }
        let [ib, c, ih, iw] = u.image.dims();
        let want = [u.model.conditioning_channels(), h * f, w * f];
        if [c, ih, iw] != want || (ib != 1 && ib != b) {
            return Err(CoreError::invalid(
                "control_image",
                format!(
                    "ControlNet {i}'s image is {:?}, expected [{}, {}, {}, {}]",
                    u.image.dims(),
                    if b == 1 {
                        "1".to_string()
                    } else {
                        format!("1 or {b}")
                    },
                    want[0],
                    want[1],
                    want[2]
                ),
            ));
        }
        if !u.conditioning_scale.is_finite() {
            return Err(CoreError::invalid(
                "controlnet_conditioning_scale",
                format!("{} is not finite", u.conditioning_scale),
            ));
        }
        if !(0.0..=1.0).contains(&u.guidance_start)
            || !(0.0..=1.0).contains(&u.guidance_end)
            || u.guidance_start >= u.guidance_end
        {
            return Err(CoreError::invalid(
                "control_guidance_start",
                format!(
                    "start {} and end {} must satisfy 0 <= start < end <= 1",
                    u.guidance_start, u.guidance_end
                ),
            ));
        }
    }
    Ok(())
}

/// The units of a run with their images batched for the U-Net's batch: doubled for
/// classifier-free guidance, except in guess mode.
pub(crate) struct PreparedControl<'u, 'a> {
    units: &'u [ControlNetUnit<'a>],
    images: Vec<Tensor<4>>,
    cfg: bool,
}

/// The second half of a CFG batch.
fn cond_half<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    let b = t.dims()[0];
    t.narrow(0, b / 2, b / 2)
}

impl<'u, 'a> PreparedControl<'u, 'a> {
    pub fn new(units: &'u [ControlNetUnit<'a>], batch: usize, cfg: bool) -> Self {
        let images = units
            .iter()
            .map(|u| {
                let img = if u.image.dims()[0] == batch {
                    u.image.clone()
                } else {
                    u.image.clone().repeat_dim(0, batch)
                };
                if cfg && !u.guess() {
                    Tensor::cat(vec![img.clone(), img], 0)
                } else {
                    img
                }
            })
            .collect();
        Self { units, images, cfg }
    }

    /// The summed residuals of step `k` of `n` for the U-Net's input `x` (scaled,
    /// doubled for CFG, without an inpainting U-Net's extra channels); `None`
    /// without units.
    pub fn residuals(
        &self,
        x: &Tensor<4>,
        t: f64,
        embeds: &Tensor<3>,
        added: &AddedConditioning,
        (k, n): (usize, usize),
    ) -> Result<Option<ControlResiduals>, CoreError> {
        let mut sum: Option<ControlResiduals> = None;
        for (u, image) in self.units.iter().zip(&self.images) {
            let scale = u.conditioning_scale * u.keep(k, n);
            let half = self.cfg && u.guess();
            let (x, embeds, added) = if half {
                let added = AddedConditioning {
                    text_embeds: added.text_embeds.clone().map(cond_half),
                    time_ids: added.time_ids.clone().map(cond_half),
                    ..Default::default()
                };
                (cond_half(x.clone()), cond_half(embeds.clone()), added)
            } else {
                let added = AddedConditioning {
                    text_embeds: added.text_embeds.clone(),
                    time_ids: added.time_ids.clone(),
                    ..Default::default()
                };
                (x.clone(), embeds.clone(), added)
            };
            let ts = Tensor::<1>::full([x.dims()[0]], t, &x.device());
            let r = u
                .model
                .forward(x, ts, embeds, image.clone(), scale, u.guess(), &added)?;
            let r = if half { r.with_zero_uncond() } else { r };
            sum = Some(match sum {
                Some(s) => s.sum(r)?,
                None => r,
            });
        }
        Ok(sum)
    }
}

/// One T2I-Adapter of a run with its image and settings (diffusers'
/// `StableDiffusionAdapterPipeline` arguments for one adapter; several adapters'
/// scaled features are summed, as `MultiAdapter` does).
#[derive(Clone)]
pub struct AdapterUnit<'a> {
    /// The adapter.
    pub model: &'a dyn Adapter,
    /// The control image `[1 or b, c, H, W]` in `[0, 1]` at the picture's size.
    pub image: Tensor<4>,
    /// Multiplies the features (`adapter_conditioning_scale`).
    pub conditioning_scale: f64,
    /// Fraction of the steps the features guide, from the first
    /// (`adapter_conditioning_factor` of the SDXL adapter pipeline; 1: all).
    pub conditioning_factor: f64,
}

impl std::fmt::Debug for AdapterUnit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterUnit")
            .field("image", &self.image.dims())
            .field("conditioning_scale", &self.conditioning_scale)
            .field("conditioning_factor", &self.conditioning_factor)
            .finish_non_exhaustive()
    }
}

impl<'a> AdapterUnit<'a> {
    /// `model` with `image`, scale 1, for every step.
    pub fn new(model: &'a dyn Adapter, image: Tensor<4>) -> Self {
        Self {
            model,
            image,
            conditioning_scale: 1.0,
            conditioning_factor: 1.0,
        }
    }
}

/// The adapters' features of a run, computed once: each adapter's features times
/// its scale, summed over adapters, repeated to the batch and doubled for CFG;
/// with the number of steps they guide.
pub(crate) struct PreparedAdapters {
    features: Option<Vec<Tensor<4>>>,
    steps: usize,
}

impl PreparedAdapters {
    pub fn new(
        units: &[AdapterUnit<'_>],
        batch: usize,
        cfg: bool,
        n_steps: usize,
    ) -> Result<Self, CoreError> {
        let mut sum: Option<Vec<Tensor<4>>> = None;
        let mut steps = 0;
        for (i, u) in units.iter().enumerate() {
            if !u.conditioning_scale.is_finite() || !(0.0..=1.0).contains(&u.conditioning_factor) {
                return Err(CoreError::invalid(
                    "adapter_conditioning_scale",
                    format!(
                        "adapter {i}: scale {} must be finite, factor {} in [0, 1]",
                        u.conditioning_scale, u.conditioning_factor
                    ),
                ));
            }
            let [ib, ..] = u.image.dims();
            if ib != 1 && ib != batch {
                return Err(CoreError::invalid(
                    "adapter_image",
                    format!("adapter {i}: {ib} images for a batch of {batch}"),
                ));
            }
            let f: Vec<Tensor<4>> = u
                .model
                .features(u.image.clone())?
                .into_iter()
                .map(|t| t * u.conditioning_scale)
                .collect();
            sum = Some(match sum {
                None => f,
                Some(s) if s.len() == f.len() => s.into_iter().zip(f).map(|(a, b)| a + b).collect(),
                Some(s) => {
                    return Err(CoreError::invalid(
                        "adapter",
                        format!(
                            "adapter {i} gives {} features, the first {}",
                            f.len(),
                            s.len()
                        ),
                    ));
                }
            });
            steps = steps.max((n_steps as f64 * u.conditioning_factor) as usize);
        }
        let features = sum.map(|s| {
            s.into_iter()
                .map(|t| {
                    let t = if t.dims()[0] == batch {
                        t
                    } else {
                        t.repeat_dim(0, batch)
                    };
                    if cfg {
                        Tensor::cat(vec![t.clone(), t], 0)
                    } else {
                        t
                    }
                })
                .collect()
        });
        Ok(Self { features, steps })
    }

    /// The features for step `k` of the run, `None` past the factor or without
    /// adapters.
    pub fn at(&self, k: usize) -> Option<Vec<Tensor<4>>> {
        self.features.clone().filter(|_| k < self.steps)
    }
}
