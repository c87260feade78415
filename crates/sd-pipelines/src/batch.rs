//! Several text-to-image requests through one U-Net batch:
//! [`StableDiffusionPipeline::generate_batch`], what a server does with compatible
//! jobs from different clients.

use burn::prelude::*;
use sd_core::{AddedConditioning, CoreError, NoiseRng, NoiseSource, Steps};

use crate::composed::{GenerationOptions, StepInfo};
use crate::denoise::{Conditioning, ExtraConditioning};
use crate::error::PipelineError;
use crate::output::Generation;
use crate::pipeline::StableDiffusionPipeline;
use crate::plan::RunPlan;
use crate::request::{GenerationRequest, SchedulerChoice};

/// What requests must share to run as one batch: the latent shape, the schedule,
/// the guidance (one classifier-free guidance pass for the whole batch) and the
/// model weights (no per-request LoRAs).
#[derive(Debug, Clone, PartialEq)]
struct BatchShape {
    width: Option<usize>,
    height: Option<usize>,
    steps: Steps,
    guidance: u64,
    scheduler: Option<String>,
    sigma_schedule: String,
    eta: Option<u64>,
    tiny_decoder: bool,
    /// SD 3: the T5 length (the embeddings' length), the shift, skip-layer guidance.
    max_sequence_length: Option<usize>,
    shift: Option<u64>,
    skip_layer_guidance: String,
}

/// The shape a request batches under, or `None` when it runs alone (anything but
/// plain text to image: init images, LoRAs, control, hires fix, given latents or
/// noise, hand-overs, long prompts whose embedding length varies).
fn batch_shape(r: &GenerationRequest<'_>) -> Option<BatchShape> {
    let plain = r.init_image.is_none()
        && r.mask.is_none()
        && r.outpaint.is_none()
        && r.loras.is_empty()
        && r.hires.is_none()
        && r.control.is_empty()
        && r.adapters.is_empty()
        && r.init_latents.is_none()
        && r.noise.is_none()
        && r.denoising_end.is_none()
        && r.denoising_start.is_none()
        && !r.long_prompts;
    let scheduler = match &r.scheduler {
        SchedulerChoice::Model => None,
        SchedulerChoice::Name(n) => Some(n.to_ascii_lowercase()),
        SchedulerChoice::Config(_) | SchedulerChoice::Scheduler(_) => return None,
    };
    plain.then(|| BatchShape {
        width: r.width,
        height: r.height,
        steps: r.steps.clone(),
        guidance: r.guidance.to_bits(),
        scheduler,
        sigma_schedule: format!("{:?}", r.sigma_schedule),
        eta: r.eta.map(f64::to_bits),
        tiny_decoder: r.tiny_decoder,
        max_sequence_length: r.max_sequence_length,
        shift: r.shift.map(f64::to_bits),
        skip_layer_guidance: format!("{:?}", r.skip_layer_guidance),
    })
}

/// Whether `a` and `b` can run in one batch of [`StableDiffusionPipeline::generate_batch`]:
/// both plain text to image (no init image, LoRA, control, hires fix, given noise or
/// long-prompt windows) with the same size, steps, guidance, scheduler and decoder
/// (and, for SD 3, the same T5 length, shift and skip-layer guidance).
/// Prompts, negative prompts, seeds, image counts, clip skip and SDXL
/// micro-conditioning may differ.
pub fn batchable(a: &GenerationRequest<'_>, b: &GenerationRequest<'_>) -> bool {
    matches!((batch_shape(a), batch_shape(b)), (Some(x), Some(y)) if x == y)
}

/// What [`StableDiffusionPipeline::batch_plan`] settles for the whole batch.
struct BatchPlan {
    /// Each request's plan ([`StableDiffusionPipeline::validate`]'s).
    plans: Vec<RunPlan>,
    /// The first request's options with the batch's image count.
    total: GenerationOptions,
}

/// The noise of a batch: each request's rows drawn from its own generator, so every
/// request gets the numbers it would get alone (ancestral samplers included).
struct RowNoise {
    parts: Vec<(NoiseRng, usize)>,
}

impl NoiseSource for RowNoise {
    fn normal(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>, CoreError> {
        let total: usize = self.parts.iter().map(|(_, rows)| rows).sum();
        if shape[0] != total {
            return Err(CoreError::InvalidArgument {
                name: "noise",
                message: format!("a batch of {total} rows asked for {}", shape[0]),
            });
        }
        let parts = self
            .parts
            .iter_mut()
            .map(|(rng, rows)| rng.normal([*rows, shape[1], shape[2], shape[3]], device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(parts, 0))
    }
}

/// Joins per-request conditioning tensors `[2b_i | b_i, ...]` into the batch's: with
/// guidance every negative half first, then every positive half (the loop's
/// `[uncond; cond]` layout).
fn join_halves<const D: usize>(parts: Vec<Tensor<D>>, cfg: bool) -> Tensor<D> {
    if !cfg {
        return Tensor::cat(parts, 0);
    }
    let (mut neg, mut pos) = (Vec::new(), Vec::new());
    for t in parts {
        let half = t.dims()[0] / 2;
        neg.push(t.clone().narrow(0, 0, half));
        pos.push(t.narrow(0, half, half));
    }
    neg.extend(pos);
    Tensor::cat(neg, 0)
}

fn join_optional(parts: Vec<Option<Tensor<2>>>, cfg: bool) -> Option<Tensor<2>> {
    let parts: Option<Vec<_>> = parts.into_iter().collect();
    parts.filter(|p| !p.is_empty()).map(|p| join_halves(p, cfg))
}

impl StableDiffusionPipeline {
    /// Runs several requests, batching those that fit together ([`batchable`] with the
    /// first) through one U-Net call per step; the others run one after another as
    /// [`Self::generate`]. Each request gets the pictures it would get alone (its own
    /// seeds and noise; equal up to float rounding of the larger batch), its own
    /// callback (its rows of the latents; returning `false` cancels that request
    /// alone, and the batch stops when every request has), and its own result.
    ///
    /// # Errors
    /// Per request: what [`Self::generate`] returns; a batch-wide failure (the
    /// model, memory for the whole batch) is every batched request's error.
    pub fn generate_batch(
        &self,
        mut requests: Vec<GenerationRequest<'_>>,
    ) -> Vec<Result<Generation, PipelineError>> {
        let shape = requests.first().and_then(batch_shape);
        let together = requests.len() > 1
            && shape.is_some()
            && requests.iter().all(|r| batch_shape(r) == shape);
        let Some(plan) = together.then(|| self.batch_plan(&requests)).flatten() else {
            return requests.into_iter().map(|r| self.generate(r)).collect();
        };
        let n = requests.len();
        match self.run_batch(&mut requests, plan) {
            Ok(results) => results,
            Err(e) => {
                let cancelled = match e {
                    PipelineError::Core(CoreError::Cancelled(step)) => Some(step),
                    _ => None,
                };
                let message = e.to_string();
                (0..n)
                    .map(|_| {
                        Err(match cancelled {
                            Some(step) => CoreError::Cancelled(step).into(),
                            None => PipelineError::request("batch", message.clone()),
                        })
                    })
                    .collect()
            }
        }
    }

    /// The batch's scheduler and options when every request passes its own checks
    /// and the whole batch fits in the memory available; otherwise `None`, and the
    /// requests run one by one (each then gets its own error, or runs in the memory
    /// a single request needs).
    fn batch_plan(&self, requests: &[GenerationRequest<'_>]) -> Option<BatchPlan> {
        let plans: Vec<RunPlan> = requests
            .iter()
            .map(|r| self.validate(r))
            .collect::<Result<_, _>>()
            .ok()?;
        let mut total = plans[0].options.clone();
        total.batch_size = plans.iter().map(|p| p.options.batch_size).sum();
        self.check_memory(&total).ok()?;
        Some(BatchPlan { plans, total })
    }

    /// One batch of compatible text-to-image requests, planned by [`Self::batch_plan`].
    fn run_batch(
        &self,
        requests: &mut [GenerationRequest<'_>],
        plan: BatchPlan,
    ) -> Result<Vec<Result<Generation, PipelineError>>, PipelineError> {
        let BatchPlan { plans, total } = plan;
        let sd = self.run_parts(
            self.own_models(),
            &plans[0].scheduler,
            requests[0].tiny_decoder,
        );
        let seeds: Vec<u64> = requests
            .iter()
            .map(|r| r.seed.unwrap_or_else(rand::random::<u64>))
            .collect();
        let cfg = sd.uses_cfg(total.guidance_scale);
        let (mut embeds, mut added, mut noise) = (Vec::new(), Vec::new(), Vec::new());
        for (plan, seed) in plans.iter().zip(&seeds) {
            let (e, a) = sd.encode_conditioning(&plan.options, false)?;
            embeds.push(e);
            added.push(a);
            noise.push(self.batch_noise(&sd, &plan.options, *seed)?);
        }
        let (text_embeds, time_ids) = added
            .into_iter()
            .map(|a| (a.text_embeds, a.time_ids))
            .unzip();
        let conditioning = Conditioning {
            embeds: join_halves(embeds, cfg),
            guidance: total.guidance_scale,
            extra: ExtraConditioning::None,
            added: AddedConditioning {
                text_embeds: join_optional(text_embeds, cfg),
                time_ids: join_optional(time_ids, cfg),
                ..AddedConditioning::default()
            },
            skip_layer_guidance: total.skip_layer_guidance.clone(),
        };
        let rows: Vec<usize> = plans.iter().map(|p| p.options.batch_size).collect();
        let mut callbacks: Vec<_> = requests.iter_mut().map(|r| r.callback.take()).collect();
        let mut cancelled: Vec<Option<usize>> = vec![None; requests.len()];
        let mut step_all = |info: &StepInfo<'_>| {
            let mut offset = 0;
            for (i, cb) in callbacks.iter_mut().enumerate() {
                let latents = info.latents.clone().narrow(0, offset, rows[i]);
                offset += rows[i];
                if let Some(cb) = cb
                    && cancelled[i].is_none()
                {
                    let own = StepInfo {
                        latents: &latents,
                        ..*info
                    };
                    if !cb(&own) {
                        cancelled[i] = Some(info.step);
                    }
                }
            }
            cancelled.iter().any(Option::is_none)
        };
        let mut run = sd.scheduler.start(&total.steps)?;
        let latents = Tensor::cat(noise, 0) * run.init_noise_sigma();
        let mut source = RowNoise {
            parts: seeds
                .iter()
                .zip(&rows)
                .map(|(s, r)| (NoiseRng::seed(*s), *r))
                .collect(),
        };
        let latents = sd.denoise(
            run.as_mut(),
            latents,
            conditioning,
            &mut source,
            Some(&mut step_all),
        )?;
        let images = sd.decode(latents.clone())?;
        let mut offset = 0;
        let mut results = Vec::with_capacity(requests.len());
        for (i, plan) in plans.iter().enumerate() {
            if let Some(step) = cancelled[i] {
                results.push(Err(CoreError::Cancelled(step).into()));
            } else {
                let out = crate::composed::GenerationOutput {
                    images: images.clone().narrow(0, offset, rows[i]),
                    latents: latents.clone().narrow(0, offset, rows[i]),
                };
                results.push(self.output(out, plan, seeds[i], true));
            }
            offset += rows[i];
        }
        Ok(results)
    }
}
