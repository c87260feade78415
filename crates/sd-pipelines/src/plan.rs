//! [`RunPlan`]: a request checked and resolved once, by
//! [`crate::StableDiffusionPipeline::validate`], into what
//! [`crate::StableDiffusionPipeline::generate`] executes: the task, the scheduler,
//! the options and the sizes. A per-run option lives in the request, here, and the
//! one place that uses it.

use sd_schedulers::AnyScheduler;

use crate::composed::GenerationOptions;
use crate::hires::HiresFix;
use crate::outpaint::Extend;

/// The task a request describes, resolved from what it sets: an init image makes it
/// image to image, a mask inpainting, outpaint margins outpainting, a
/// `denoising_start` the refiner's half of a hand-over, nothing text to image.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TaskPlan {
    /// Text to image, with the hires fix's second pass when asked.
    Txt2Img {
        /// The hires fix.
        hires: Option<HiresFix>,
    },
    /// The refiner's half of a base-to-refiner hand-over, from given latents.
    Refine {
        /// diffusers' `denoising_start`.
        denoising_start: f64,
    },
    /// Image to image.
    Img2Img {
        /// How much of the image is repainted, in (0, 1].
        strength: f64,
    },
    /// Inpainting where the mask is white.
    Inpaint {
        /// As image to image's.
        strength: f64,
    },
    /// Outpainting: the image extended by margins.
    Outpaint {
        /// The margins.
        extend: Extend,
        /// Pixels blended across the seam.
        seam: usize,
    },
}

impl TaskPlan {
    /// diffusers' default `controlnet_conditioning_scale` for the task's pipeline:
    /// 1.0 text to image, 0.8 image to image, 0.5 inpainting.
    pub fn default_control_scale(&self) -> f64 {
        match self {
            Self::Img2Img { .. } => 0.8,
            Self::Inpaint { .. } => 0.5,
            _ => 1.0,
        }
    }
}

/// A checked request: everything [`crate::StableDiffusionPipeline::generate`] needs
/// to decide, decided once.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// The task.
    pub task: TaskPlan,
    /// The scheduler, with the request's sigma schedule and eta.
    pub scheduler: AnyScheduler,
    /// Its name in the pictures' parameters (A1111's label).
    pub sampler: String,
    /// The options of the run: prompts, steps, guidance, the request's size (or the
    /// model's), image count, clip skip, prompt handling, micro-conditioning.
    pub options: GenerationOptions,
    /// `(width, height)` the first pass runs at: the request's, the init image's as
    /// fitted, or the outpainting canvas.
    pub size: (usize, usize),
    /// `(width, height)` of the pictures: [`Self::size`], or the hires fix's target.
    pub output_size: (usize, usize),
}

impl RunPlan {
    /// The options at the size of the pictures, for the memory estimate.
    pub(crate) fn output_options(&self) -> GenerationOptions {
        GenerationOptions {
            width: self.output_size.0,
            height: self.output_size.1,
            ..self.options.clone()
        }
    }
}
