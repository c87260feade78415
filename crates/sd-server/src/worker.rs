//! The generation threads: each takes a batch of compatible jobs from the queue,
//! gets the model from the registry (loading it if need be), runs the batch
//! through [`sd_pipelines::StableDiffusionPipeline::generate_batch`] and reports
//! progress, previews and results to the jobs. Generation never runs on the async
//! runtime.

use std::sync::Arc;
use std::time::Instant;

use image::DynamicImage;
use sd_pipelines::{ControlInput, GenerationRequest, HiresFix, PipelineError, StepInfo};

use crate::Shared;
use crate::error::{ApiError, from_pipeline};
use crate::job::{JobImage, JobSpec};
use crate::provenance::PictureSigner;
use crate::registry::LoadedModel;
use crate::store::JobHandle;

/// Runs batches until the queue is closed and empty.
pub fn run(shared: Arc<Shared>) {
    while let Some(batch) = shared.queue.pop_batch(shared.config.max_batch) {
        run_batch(&shared, batch);
    }
}

/// Drops the jobs that were cancelled or passed their deadline while waiting.
fn still_wanted(job: &Arc<JobHandle>) -> bool {
    if job.cancel_requested() {
        job.finish(Err(ApiError::Cancelled));
        false
    } else if job.past_deadline() {
        job.finish(Err(deadline_error(job)));
        false
    } else {
        true
    }
}

fn deadline_error(job: &JobHandle) -> ApiError {
    ApiError::Deadline(
        job.spec
            .deadline
            .map(|d| d.saturating_duration_since(job.submitted))
            .unwrap_or_default(),
    )
}

pub(crate) fn run_batch(shared: &Shared, batch: Vec<Arc<JobHandle>>) {
    let batch: Vec<_> = batch.into_iter().filter(still_wanted).collect();
    let Some(first) = batch.first() else {
        return;
    };
    let model_name = first.spec.model.clone();
    let span = tracing::info_span!("batch", model = %model_name, jobs = batch.len());
    let _enter = span.enter();
    let model = match shared.registry.get(&model_name) {
        Ok(m) => m,
        Err(e) => {
            for job in &batch {
                job.finish(Err(e.clone()));
            }
            return;
        }
    };
    let mut requests = Vec::with_capacity(batch.len());
    let mut running = Vec::with_capacity(batch.len());
    for job in batch {
        match request_for(&job, &model, shared) {
            Ok(r) => {
                requests.push(r);
                running.push(job);
            }
            Err(e) => {
                job.finish(Err(e));
            }
        }
    }
    for job in &running {
        job.start(job.spec.steps, running.len());
        tracing::info!(job = %job.id, task = job.spec.task(), "job started");
    }
    if let Some(job) = running.first() {
        shared.store.set_current(job);
    }
    let started = Instant::now();
    let results = model.pipeline.generate_batch(requests);
    let seconds = started.elapsed().as_secs_f64();
    let steps: usize = running.iter().map(|j| j.progress().step).max().unwrap_or(0);
    crate::metrics::batch(&model_name, running.len(), steps, seconds);
    for (job, result) in running.iter().zip(results) {
        finish(job, result, &shared.signer);
    }
}

fn finish(
    job: &Arc<JobHandle>,
    result: Result<sd_pipelines::Generation, PipelineError>,
    signer: &PictureSigner,
) {
    let result = match result {
        Ok(generation) => generation
            .images
            .into_iter()
            .map(|g| {
                job_image(
                    &job.spec,
                    g.image,
                    g.parameters,
                    g.nsfw_content_detected,
                    signer,
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Arc::new),
        Err(e) => match from_pipeline(&e) {
            ApiError::Cancelled if job.past_deadline() => Err(deadline_error(job)),
            ApiError::Cancelled => job.take_partial().map(Arc::new).ok_or(ApiError::Cancelled),
            other => Err(other),
        },
    };
    match &result {
        Ok(images) => {
            let latency = job.submitted.elapsed().as_secs_f64();
            crate::metrics::job_done(&job.spec.model, job.spec.task(), images.len(), latency);
            tracing::info!(job = %job.id, seconds = latency, "job succeeded");
        }
        Err(e) => {
            crate::metrics::error(e.kind());
            tracing::info!(job = %job.id, error = %e, "job ended");
        }
    }
    job.finish(result);
}

/// The pipeline request of a job, its callback reporting to the job.
fn request_for<'m>(
    job: &Arc<JobHandle>,
    model: &'m LoadedModel,
    shared: &Shared,
) -> Result<GenerationRequest<'m>, ApiError> {
    let s: &JobSpec = &job.spec;
    let mut r = GenerationRequest::new(s.prompt.clone())
        .steps(s.steps)
        .guidance(s.guidance)
        .seed(s.seed)
        .num_images(s.n);
    // An empty negative prompt is none: SDXL base then zeros the negative half, as
    // diffusers does without one (SD 1.x/2.x encode "" either way).
    if !s.negative_prompt.is_empty() {
        r = r.negative_prompt(s.negative_prompt.clone());
    }
    if let Some(p) = &s.prompt_2 {
        r = r.prompt_2(p.clone());
    }
    if let Some(n) = &s.negative_prompt_2 {
        r = r.negative_prompt_2(n.clone());
    }
    let mut r = s.sd3.apply(r);
    if let Some((w, h)) = s.size {
        r = r.size(w, h);
    }
    if let Some(name) = &s.scheduler {
        r = r.scheduler(name.clone());
    }
    if let Some(schedule) = &s.sigma_schedule {
        r = r.sigma_schedule(schedule.clone());
    }
    if let Some(skip) = s.clip_skip {
        r = r.clip_skip(skip);
    }
    let loras = shared.registry.loras(&s.model);
    for (name, strength) in &s.loras {
        let path = loras.get(name).ok_or_else(|| ApiError::NotFound {
            what: "lora",
            name: name.clone(),
            hint: String::new(),
        })?;
        r = r.lora(path.clone(), *strength);
    }
    if let Some(init) = &s.init {
        r = r.init_image(DynamicImage::ImageRgb8(init.image.clone()), init.strength);
        if let Some(mask) = &init.mask {
            r = r.mask(DynamicImage::ImageLuma8(mask.clone()));
        }
    }
    if let Some(h) = &s.hires {
        r = r.hires_fix(HiresFix {
            scale: h.scale,
            strength: h.strength,
            steps: h.steps,
            upscaler: h.upscaler,
        });
    }
    for c in &s.control {
        if c.index >= model.controlnets.len() {
            return Err(ApiError::Internal(format!(
                "ControlNet `{}` is not loaded",
                c.name
            )));
        }
        let image = DynamicImage::ImageRgb8(c.image.clone());
        let image = match (&model.depth, c.depth) {
            (_, false) => image,
            (Some(estimator), true) => DynamicImage::ImageRgb8(
                estimator
                    .depth_map(&image)
                    .map_err(|e| ApiError::Generation(format!("depth estimation: {e}")))?,
            ),
            (None, true) => return Err(ApiError::Internal("no depth model is loaded".into())),
        };
        r = r.control(
            ControlInput::new(c.index, image)
                .scale(c.scale)
                .guidance_range(c.start, c.end),
        );
    }
    r = r.guess_mode(s.guess_mode);
    let every = shared.config.preview_every;
    let watcher = job.clone();
    let pipeline = &model.pipeline;
    let signer = shared.signer.clone();
    Ok(r.on_step(move |info: &StepInfo<'_>| {
        if watcher.interrupt_requested() {
            watcher.set_partial(partial_images(pipeline, info, &watcher.spec, &signer));
            return false;
        }
        let done = info.step + 1;
        let preview = (every > 0 && (done.is_multiple_of(every) || done == info.total))
            .then(|| preview_png(info))
            .flatten();
        watcher.step(done, info.total, preview);
        !(watcher.cancel_requested() || watcher.past_deadline())
    }))
}

/// A picture of a job as clients get it: pasted over the original (A1111's
/// inpainting), its parameters naming the model as clients know it and giving the
/// final size, encoded as PNG (signed when the server has content credentials).
fn job_image(
    spec: &JobSpec,
    image: image::RgbImage,
    mut parameters: sd_io::image::GenerationParameters,
    nsfw_content_detected: Option<bool>,
    signer: &PictureSigner,
) -> Result<JobImage, ApiError> {
    let image = match &spec.overlay {
        Some(o) => o.apply(&image),
        None => image,
    };
    parameters.model = spec.model.clone();
    parameters.width = image.width() as usize;
    parameters.height = image.height() as usize;
    let png = sd_io::image::encode_rgb_png(&image, Some(&parameters))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let png = signer.sign_png(png, &parameters)?;
    Ok(JobImage {
        png,
        parameters,
        nsfw_content_detected,
    })
}

/// The pictures of the latents as they are at this step, decoded by the VAE, with
/// the job's parameters (AUTOMATIC1111 answers an interrupt with them).
fn partial_images(
    pipeline: &sd_pipelines::StableDiffusionPipeline,
    info: &StepInfo<'_>,
    spec: &JobSpec,
    signer: &PictureSigner,
) -> Vec<JobImage> {
    let Ok(images) = pipeline
        .composed(pipeline.scheduler())
        .decode(info.latents.clone())
    else {
        return Vec::new();
    };
    // The label the pipeline gives a named scheduler.
    let sampler = spec
        .scheduler
        .as_deref()
        .map_or("model default", sd_schedulers::SchedulerName::label);
    sd_io::image::tensor_to_images(&images)
        .into_iter()
        .enumerate()
        .filter_map(|(i, image)| {
            let parameters = sd_io::image::GenerationParameters {
                prompt: spec.prompt.clone(),
                negative_prompt: spec.negative_prompt.clone(),
                steps: spec.steps,
                sampler: sampler.to_string(),
                cfg_scale: spec.guidance,
                seed: spec.seed.wrapping_add(i as u64),
                // Size and model: set by `job_image`.
                width: 0,
                height: 0,
                model: String::new(),
            };
            job_image(spec, image, parameters, None, signer).ok()
        })
        .collect()
}

/// The step's preview (the tiny autoencoder's when loaded, else the latents' colours)
/// of the job's first image, as PNG.
fn preview_png(info: &StepInfo<'_>) -> Option<Vec<u8>> {
    let images = sd_io::image::tensor_to_images(&info.preview());
    sd_io::image::encode_rgb_png(images.first()?, None).ok()
}
