//! Every check of a request, without running a model: what
//! [`StableDiffusionPipeline::generate`] does first, and a dry run for callers.

use sd_core::{Autoencoder, Scheduler};
use sd_io::image::{SizeMode, fitted_size};

use crate::composed::{GenerationOptions, check_options, check_size};
use crate::error::PipelineError;
use crate::pipeline::StableDiffusionPipeline;
use crate::plan::{RunPlan, TaskPlan};
use crate::request::{GenerationRequest, ImageInput};

/// The task the request's inputs describe (their combination checked by
/// [`check_inputs`]).
///
/// # Errors
/// A hand-over without the latents it continues.
fn task_plan(r: &GenerationRequest<'_>) -> Result<TaskPlan, PipelineError> {
    if let Some(denoising_start) = r.denoising_start {
        if r.init_latents.is_none() {
            return Err(PipelineError::request(
                "denoising_start",
                "continues a base run's latents: set them with init_latents",
            ));
        }
        return Ok(TaskPlan::Refine { denoising_start });
    }
    let strength = r.strength.unwrap_or(1.0);
    Ok(match (&r.init_image, &r.mask, r.outpaint) {
        (None, _, _) => TaskPlan::Txt2Img { hires: r.hires },
        (Some(_), None, None) => TaskPlan::Img2Img { strength },
        (Some(_), Some(_), None) => TaskPlan::Inpaint { strength },
        (Some(_), _, Some((extend, seam))) => TaskPlan::Outpaint { extend, seam },
    })
}

/// How a request's inputs may combine: a mask or outpaint margins need an init
/// image, and outpainting makes its own mask.
///
/// # Errors
/// [`PipelineError::Request`] naming the input that does not fit.
fn check_inputs(r: &GenerationRequest<'_>) -> Result<(), PipelineError> {
    if r.init_image.is_none() && (r.mask.is_some() || r.outpaint.is_some()) {
        return Err(PipelineError::request(
            "init_image",
            "a mask or outpaint margins need an init image",
        ));
    }
    if r.denoising_start.is_some()
        && (r.init_image.is_some() || r.hires.is_some() || r.denoising_end.is_some())
    {
        return Err(PipelineError::request(
            "denoising_start",
            "continues latents given by init_latents; it takes no init image, hires fix or denoising_end",
        ));
    }
    if r.hires.is_some() && r.init_image.is_some() {
        return Err(PipelineError::request(
            "hires_fix",
            "the hires fix is a text-to-image pass; for an init image raise the size instead",
        ));
    }
    if r.mask.is_some() && r.outpaint.is_some() {
        return Err(PipelineError::request(
            "mask",
            "outpainting makes its own mask: set either a mask or outpaint margins",
        ));
    }
    Ok(())
}

impl StableDiffusionPipeline {
    /// Checks a request without running anything and resolves it into the plan
    /// [`Self::generate`] executes: the scheduler and its steps, the guidance scale,
    /// image count and size, clip skip and second prompts, the input images and how
    /// they combine, the strength, the hires fix, and the memory the run would need.
    ///
    /// # Errors
    /// What [`Self::generate`] would refuse before denoising.
    pub fn validate(&self, r: &GenerationRequest<'_>) -> Result<RunPlan, PipelineError> {
        check_inputs(r)?;
        let (scheduler, sampler) = self.scheduler_for(r)?;
        let options = self.options(r);
        check_options(&options)?;
        self.conditioner().check(&options)?;
        let run = scheduler.start(&options.steps)?;
        let task = task_plan(r)?;
        let size = self.task_size(r, &options)?;
        if let TaskPlan::Img2Img { strength } | TaskPlan::Inpaint { strength } = task
            && self
                .conditioner()
                .img2img_start_in(run.as_ref(), strength)?
                >= run.len()
        {
            return Err(PipelineError::request(
                "strength",
                format!("{strength} leaves no step to run"),
            ));
        }
        self.check_size_factor(size.0, size.1)?;
        self.check_tiny_decoder(r.tiny_decoder)?;
        let output_size = match &r.hires {
            Some(h) => {
                let (w, ht) = h.target_size(size.0, size.1)?;
                self.check_size_factor(w, ht)?;
                let second = scheduler.start(&h.second_pass_steps(&options.steps))?;
                if self
                    .conditioner()
                    .img2img_start_in(second.as_ref(), h.strength)?
                    >= second.len()
                {
                    return Err(PipelineError::request(
                        "hires_fix",
                        format!("strength {} leaves no step to run", h.strength),
                    ));
                }
                (w, ht)
            }
            None => size,
        };
        let plan = RunPlan {
            task,
            scheduler,
            sampler,
            options,
            size,
            output_size,
        };
        self.check_memory(&plan.output_options())?;
        Ok(plan)
    }

    /// Decoding with the tiny autoencoder needs one loaded.
    pub(crate) fn check_tiny_decoder(&self, tiny: bool) -> Result<(), PipelineError> {
        if tiny && self.tiny_vae.is_none() {
            return Err(PipelineError::request(
                "tiny_decoder",
                "the pipeline has no tiny autoencoder: load one with load_tiny_vae",
            ));
        }
        Ok(())
    }

    /// Sizes must be multiples of 8 and of the VAE's factor.
    pub(crate) fn size_factor(&self) -> usize {
        let f = self.vae.downscale_factor().max(1);
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        8 / gcd(8, f) * f
    }

    fn check_size_factor(&self, width: usize, height: usize) -> Result<(), PipelineError> {
        check_size(width, height)?;
        let f = self.size_factor();
        if !width.is_multiple_of(f) || !height.is_multiple_of(f) {
            return Err(PipelineError::request(
                "size",
                format!("{width}x{height}: the sides must be multiples of {f}"),
            ));
        }
        Ok(())
    }

    /// The size the task runs at: the request's, the init image's (as fitted), or the
    /// init image's grown by the outpaint margins; the inputs' combination checked.
    fn task_size(
        &self,
        r: &GenerationRequest<'_>,
        o: &GenerationOptions,
    ) -> Result<(usize, usize), PipelineError> {
        let Some(image) = &r.init_image else {
            return Ok((o.width, o.height));
        };
        let (w, h) = self.input_size(image, r.size_mode, 3)?;
        if let Some(mask) = &r.mask {
            let (mw, mh) = self.input_size(mask, r.size_mode, 1)?;
            if (mw, mh) != (w, h) {
                return Err(PipelineError::request(
                    "mask",
                    format!("{mw}x{mh} pixels, the image is {w}x{h}"),
                ));
            }
        }
        match r.outpaint {
            Some((extend, _)) => {
                extend.check()?;
                let grow = |a: usize, b: usize, c: usize| a.checked_add(b)?.checked_add(c);
                match (
                    grow(w, extend.left, extend.right),
                    grow(h, extend.top, extend.bottom),
                ) {
                    (Some(cw), Some(ch)) => Ok((cw, ch)),
                    _ => Err(PipelineError::request(
                        "outpaint",
                        "the canvas is too large",
                    )),
                }
            }
            None => Ok((w, h)),
        }
    }

    /// An input's size once fitted (`channels`: 3 for images, 1 for masks; tensors
    /// are taken as they are).
    fn input_size(
        &self,
        input: &ImageInput,
        mode: SizeMode,
        channels: usize,
    ) -> Result<(usize, usize), PipelineError> {
        let f = self.size_factor();
        let (w, h) = match input {
            ImageInput::Tensor(t) => {
                let [_, c, h, w] = t.dims();
                if c != channels {
                    return Err(PipelineError::request(
                        "image",
                        format!("a tensor of {c} channels, {channels} expected"),
                    ));
                }
                return Ok((w, h));
            }
            ImageInput::Image(i) => (i.width() as usize, i.height() as usize),
            ImageInput::Path(p) => {
                let (w, h) = image::image_dimensions(p).map_err(|e| {
                    PipelineError::from(sd_io::IoError::Unsupported(format!(
                        "{}: not a readable PNG, JPEG or WebP image: {e}",
                        p.display()
                    )))
                })?;
                (w as usize, h as usize)
            }
        };
        Ok(fitted_size(w, h, f, mode)?)
    }
}
