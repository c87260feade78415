//! The one denoising loop every task runs, and the extra conditioning a task adds to
//! it.

use burn::prelude::*;
use sd_core::{AddedConditioning, ControlSignals, CoreError, NoiseSource, SchedulerRun};

use crate::composed::{
    GenerationOutput, SkipLayerGuidance, StableDiffusion, StepCallback, StepInfo,
};
use crate::control::{PreparedAdapters, PreparedControl, check_units};

/// Legacy inpainting with an ordinary U-Net: after every step the known region is
/// replaced by the original latents noised to the next step's level.
#[derive(Debug, Clone)]
pub struct KnownRegion {
    /// The original image's scaled latents `[b, 4, h, w]`.
    pub image_latents: Tensor<4>,
    /// The noise the original is re-noised with at every step, `[b, 4, h, w]`.
    pub noise: Tensor<4>,
    /// 1 where the model repaints, 0 where the original is kept, `[b, 1, h, w]`.
    pub mask: Tensor<4>,
}

/// What a task adds to the denoising loop beyond the prompt embeddings.
#[derive(Debug, Clone, Default)]
#[allow(clippy::large_enum_variant, reason = "one value per run")]
pub enum ExtraConditioning {
    /// Nothing: txt2img and img2img.
    #[default]
    None,
    /// Channels concatenated to the denoiser's input after scaling (a 9-channel
    /// inpainting U-Net: the latent mask and the masked image's latents,
    /// `[b, 5, h, w]`).
    Concat(Tensor<4>),
    /// The known region blended back after every step ([`KnownRegion`]).
    Blend(KnownRegion),
}

/// Everything the denoiser is conditioned on in a run.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Prompt embeddings: `[2b, seq, d]` = `[negative; positive]` with guidance,
    /// else `[b, seq, d]`.
    pub embeds: Tensor<3>,
    /// Classifier-free guidance scale; `<= 1` runs no unconditional pass.
    pub guidance: f64,
    /// What the task adds.
    pub extra: ExtraConditioning,
    /// What the U-Net takes besides the text, batched as `embeds` (SDXL's pooled
    /// embeddings and time ids; see [`StableDiffusion::encode_conditioning`]).
    pub added: AddedConditioning,
    /// SD 3.5's skip-layer guidance (with classifier-free guidance only).
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
}

/// A `Blend` prepared for the loop: the complement mask computed once.
struct Blend {
    region: KnownRegion,
    keep: Tensor<4>,
}

impl StableDiffusion<'_> {
    /// The denoising loop from the run's current step to its end: classifier-free
    /// guidance with one batched denoiser call (`[uncond, cond]`), the task's
    /// extra conditioning, the callback after every step.
    ///
    /// # Shapes
    /// - `latents`: `[b, 4, h, w]` (already scaled by the run's noise level)
    ///
    /// # Errors
    /// The scheduler's and denoiser's errors; [`CoreError::Cancelled`] when the
    /// callback returns `false`.
    pub fn denoise(
        &self,
        run: &mut dyn SchedulerRun,
        latents: Tensor<4>,
        conditioning: Conditioning,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<Tensor<4>, CoreError> {
        let end = run.len();
        self.denoise_until(run, latents, conditioning, noise, callback, end)
    }

    /// [`Self::denoise`] stopping before step `end` (diffusers' `denoising_end`: a
    /// base model handing its latents to a refiner; the scheduler still plans the
    /// whole run, as diffusers' does).
    ///
    /// # Errors
    /// As [`Self::denoise`].
    pub fn denoise_until(
        &self,
        run: &mut dyn SchedulerRun,
        mut latents: Tensor<4>,
        conditioning: Conditioning,
        noise: &mut dyn NoiseSource,
        mut callback: Option<StepCallback<'_>>,
        end: usize,
    ) -> Result<Tensor<4>, CoreError> {
        let Conditioning {
            embeds,
            guidance,
            extra,
            added,
            skip_layer_guidance,
        } = conditioning;
        let cfg = self.uses_cfg(guidance);
        let slg = match skip_layer_guidance {
            Some(s) if cfg => Some(SkipLayerPass::new(s, &embeds, &added)?),
            _ => None,
        };
        let added = AddedConditioning {
            timestep_cond: self.guidance_embedding(guidance, latents.dims()[0]),
            ..added
        };
        let double = |x: Tensor<4>| {
            if cfg {
                Tensor::cat(vec![x.clone(), x], 0)
            } else {
                x
            }
        };
        // Loop invariants: the extra channels (doubled for CFG), the blend's keep mask.
        let (concat, blend) = match extra {
            ExtraConditioning::None => (None, None),
            ExtraConditioning::Concat(e) => (Some(double(e)), None),
            ExtraConditioning::Blend(region) => {
                let keep = region.mask.clone().neg().add_scalar(1.0);
                (None, Some(Blend { region, keep }))
            }
        };
        check_units(
            &self.controlnets,
            latents.dims(),
            self.vae.downscale_factor(),
        )?;
        let control = PreparedControl::new(&self.controlnets, latents.dims()[0], cfg);
        let (begin, total) = (run.begin_index(), end.min(run.len()));
        let adapters =
            PreparedAdapters::new(&self.adapters, latents.dims()[0], cfg, run.len() - begin)?;
        for i in begin..total {
            let t = run.timestep(i)?;
            let x = double(run.scale_model_input(latents.clone(), i)?);
            let residuals =
                control.residuals(&x, t, &embeds, &added, (i - begin, run.len() - begin))?;
            let x = match &concat {
                Some(e) => Tensor::cat(vec![x, e.clone()], 1),
                None => x,
            };
            let mut signals =
                residuals.map_or_else(ControlSignals::default, ControlSignals::residuals);
            signals.down_intrablock_additional_residuals = adapters.at(i - begin);
            let ts = Tensor::<1>::full([x.dims()[0]], t, &self.device);
            let out = self
                .unet
                .forward_controlled(x, ts, embeds.clone(), &added, &signals)?;
            let pred = match &slg {
                Some(s) if s.slg.applies(i - begin, run.len() - begin) => {
                    let x = run.scale_model_input(latents.clone(), i)?;
                    let ts = Tensor::<1>::full([x.dims()[0]], t, &self.device);
                    s.guide(self.unet, out, guidance, x, ts)?
                }
                _ => guide(out, cfg, guidance)?,
            };
            latents = run.step(pred, i, latents, noise)?.prev_sample;
            if let Some(Blend { region, keep }) = &blend {
                let known = if i + 1 < total {
                    run.add_noise(region.image_latents.clone(), region.noise.clone(), i + 1)?
                } else {
                    region.image_latents.clone()
                };
                latents = known * keep.clone() + latents * region.mask.clone();
            }
            if let Some(cb) = callback.as_mut() {
                let info = StepInfo {
                    step: i,
                    total,
                    timestep: t,
                    latents: &latents,
                    preview_decoder: self.preview_decoder,
                };
                if !cb(&info) {
                    return Err(CoreError::Cancelled(i));
                }
            }
        }
        Ok(latents)
    }
}

/// Skip-layer guidance prepared for the loop: the positive halves of the
/// conditioning.
struct SkipLayerPass {
    slg: SkipLayerGuidance,
    embeds: Tensor<3>,
    added: AddedConditioning,
}

/// The positive (second) half of a `[negative; positive]` batch.
fn positive_half<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let b = x.dims()[0];
    x.narrow(0, b / 2, b / 2)
}

impl SkipLayerPass {
    fn new(
        slg: SkipLayerGuidance,
        embeds: &Tensor<3>,
        added: &AddedConditioning,
    ) -> Result<Self, CoreError> {
        slg.check()?;
        Ok(Self {
            slg,
            embeds: positive_half(embeds.clone()),
            added: AddedConditioning {
                timestep_cond: added.timestep_cond.clone().map(positive_half),
                text_embeds: added.text_embeds.clone().map(positive_half),
                time_ids: added.time_ids.clone().map(positive_half),
            },
        })
    }

    /// Classifier-free guidance plus `(c - skipped) * scale`, the skipped
    /// prediction from the positive prompt with the layers passed over.
    fn guide(
        &self,
        denoiser: &dyn sd_core::Denoiser,
        out: Tensor<4>,
        guidance: f64,
        x: Tensor<4>,
        ts: Tensor<1>,
    ) -> Result<Tensor<4>, CoreError> {
        let c = positive_half(out.clone());
        let pred = guide(out, true, guidance)?;
        let skipped =
            denoiser.forward_skipping(x, ts, self.embeds.clone(), &self.added, &self.slg.layers)?;
        Ok(pred + (c - skipped) * self.slg.scale)
    }
}

/// Classifier-free guidance: `u + (c - u) * guidance` over the `[uncond; cond]`
/// halves of `out`, or `out` without guidance.
fn guide(out: Tensor<4>, cfg: bool, guidance: f64) -> Result<Tensor<4>, CoreError> {
    if !cfg {
        return Ok(out);
    }
    let [u, c]: [Tensor<4>; 2] = out
        .chunk(2, 0)
        .try_into()
        .map_err(|_| CoreError::shape("model_output", "not two CFG halves"))?;
    Ok(u.clone() + (c - u) * guidance)
}

impl StableDiffusion<'_> {
    /// Whether a run at `guidance` uses classifier-free guidance (an unconditional
    /// pass): a scale above 1 and a denoiser that does not embed the scale
    /// (diffusers: `guidance_scale > 1 and time_cond_proj_dim is None`).
    pub fn uses_cfg(&self, guidance: f64) -> bool {
        guidance > 1.0 && self.unet.time_cond_proj_dim().is_none()
    }

    /// For a guidance-embedding (LCM-distilled) U-Net,
    /// `get_guidance_scale_embedding(guidance - 1)` per image.
    fn guidance_embedding(&self, guidance: f64, batch: usize) -> Option<Tensor<2>> {
        self.unet.time_cond_proj_dim().map(|d| {
            let w = Tensor::<1>::full([batch], guidance - 1.0, &self.device);
            sd_models::embeddings::guidance_scale_embedding(w, d)
        })
    }

    /// [`Self::denoise`], then the VAE: the end of every task.
    pub(crate) fn denoise_and_decode(
        &self,
        run: &mut dyn SchedulerRun,
        latents: Tensor<4>,
        conditioning: Conditioning,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let latents = self.denoise(run, latents, conditioning, noise, callback)?;
        Ok(GenerationOutput {
            images: self.decode(latents.clone())?,
            latents,
        })
    }
}
