//! What to generate: [`GenerationRequest`], a builder over every setting of a run.

use std::fmt;
use std::path::PathBuf;

use burn::prelude::*;
use sd_core::{NoiseSource, Steps};
use sd_io::image::SizeMode;
use sd_schedulers::{AnyScheduler, SigmaSchedule};

use crate::composed::{DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, SkipLayerGuidance, StepInfo};
use crate::hires::HiresFix;
use crate::load::LoraSpec;
use crate::outpaint::Extend;
use crate::sdxl::MicroConditioning;

/// An input image of a request: an `image` crate image, a tensor `[1, 3, H, W]` in
/// `[-1, 1]` (masks: `[1, 1, H, W]` in `[0, 1]`), or a file (PNG, JPEG, WebP).
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "one value per input of a request"
)]
pub enum ImageInput {
    /// A decoded image (any colour type).
    Image(image::DynamicImage),
    /// A tensor, used as it is.
    Tensor(Tensor<4>),
    /// A file, read when the request runs.
    Path(PathBuf),
}

impl From<image::DynamicImage> for ImageInput {
    fn from(image: image::DynamicImage) -> Self {
        Self::Image(image)
    }
}

impl From<image::RgbImage> for ImageInput {
    fn from(image: image::RgbImage) -> Self {
        Self::Image(image.into())
    }
}

impl From<image::GrayImage> for ImageInput {
    fn from(image: image::GrayImage) -> Self {
        Self::Image(image.into())
    }
}

impl From<Tensor<4>> for ImageInput {
    fn from(t: Tensor<4>) -> Self {
        Self::Tensor(t)
    }
}

impl From<PathBuf> for ImageInput {
    fn from(p: PathBuf) -> Self {
        Self::Path(p)
    }
}

impl From<&std::path::Path> for ImageInput {
    fn from(p: &std::path::Path) -> Self {
        Self::Path(p.to_path_buf())
    }
}

/// One ControlNet's part of a request: which of the pipeline's ControlNets
/// ([`crate::StableDiffusionPipeline::load_controlnet`] returns its index), its
/// control image and settings. A tensor image is `[1, 3, H, W]` in `[0, 1]`; files
/// and images are resized to the picture's size as diffusers does.
#[derive(Debug, Clone)]
pub struct ControlInput {
    pub(crate) controlnet: usize,
    pub(crate) image: ImageInput,
    pub(crate) scale: Option<f64>,
    pub(crate) start: f64,
    pub(crate) end: f64,
}

impl ControlInput {
    /// ControlNet `controlnet` with its control image, for the whole run at the
    /// task's default scale (diffusers': 1.0 text to image, 0.8 image to image, 0.5
    /// inpainting).
    pub fn new(controlnet: usize, image: impl Into<ImageInput>) -> Self {
        Self {
            controlnet,
            image: image.into(),
            scale: None,
            start: 0.0,
            end: 1.0,
        }
    }

    /// `controlnet_conditioning_scale`: multiplies the model's residuals.
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// `control_guidance_start` / `control_guidance_end`: the model is on from
    /// fraction `start` to fraction `end` of the steps.
    pub fn guidance_range(mut self, start: f64, end: f64) -> Self {
        self.start = start;
        self.end = end;
        self
    }
}

/// One T2I-Adapter's part of a request: which of the pipeline's adapters
/// ([`crate::StableDiffusionPipeline::load_adapter`] returns its index), its control
/// image (a tensor `[1, c, H, W]` in `[0, 1]`, or an image or file resized to the
/// picture's size) and settings.
#[derive(Debug, Clone)]
pub struct AdapterInput {
    pub(crate) adapter: usize,
    pub(crate) image: ImageInput,
    pub(crate) scale: f64,
    pub(crate) factor: f64,
}

impl AdapterInput {
    /// Adapter `adapter` with its control image, scale 1, for every step.
    pub fn new(adapter: usize, image: impl Into<ImageInput>) -> Self {
        Self {
            adapter,
            image: image.into(),
            scale: 1.0,
            factor: 1.0,
        }
    }

    /// `adapter_conditioning_scale`: multiplies the features.
    pub fn scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// `adapter_conditioning_factor`: the fraction of the steps, from the first,
    /// the features guide.
    pub fn conditioning_factor(mut self, factor: f64) -> Self {
        self.factor = factor;
        self
    }
}

/// Which scheduler a request runs with.
#[derive(Debug, Clone)]
pub enum SchedulerChoice {
    /// The model's own (its `scheduler_config.json`).
    Model,
    /// A name of [`sd_schedulers::SCHEDULER_NAMES`] (A1111 spellings too) over the
    /// model's scheduler config.
    Name(String),
    /// A diffusers `scheduler_config.json` text whose `_class_name` picks the class.
    Config(String),
    /// A scheduler built by the caller.
    Scheduler(AnyScheduler),
}

/// The callback of a request: called after every step with the step's
/// [`StepInfo`] (index, total, timestep, latents and [`StepInfo::preview`], decoded
/// by the tiny autoencoder when the pipeline has one); returning `false` cancels the
/// run.
pub type RequestCallback<'a> = Box<dyn FnMut(&StepInfo<'_>) -> bool + 'a>;

/// What to generate. Built with [`GenerationRequest::new`] and the setters; the task
/// follows from what is set: an init image makes it img2img, a mask inpainting,
/// outpaint margins outpainting, nothing text to image.
pub struct GenerationRequest<'a> {
    pub(crate) prompt: String,
    pub(crate) negative_prompt: Option<String>,
    pub(crate) prompt_2: Option<String>,
    pub(crate) negative_prompt_2: Option<String>,
    pub(crate) prompt_3: Option<String>,
    pub(crate) negative_prompt_3: Option<String>,
    pub(crate) max_sequence_length: Option<usize>,
    pub(crate) skip_layer_guidance: Option<SkipLayerGuidance>,
    pub(crate) shift: Option<f64>,
    pub(crate) width: Option<usize>,
    pub(crate) height: Option<usize>,
    pub(crate) steps: Steps,
    pub(crate) guidance: f64,
    pub(crate) seed: Option<u64>,
    pub(crate) scheduler: SchedulerChoice,
    pub(crate) sigma_schedule: Option<SigmaSchedule>,
    pub(crate) eta: Option<f64>,
    pub(crate) num_images: usize,
    pub(crate) clip_skip: Option<usize>,
    pub(crate) init_image: Option<ImageInput>,
    pub(crate) strength: Option<f64>,
    pub(crate) mask: Option<ImageInput>,
    pub(crate) outpaint: Option<(Extend, usize)>,
    pub(crate) size_mode: SizeMode,
    pub(crate) loras: Vec<LoraSpec>,
    pub(crate) long_prompts: bool,
    pub(crate) prompt_weighting: bool,
    pub(crate) hires: Option<HiresFix>,
    pub(crate) micro: MicroConditioning,
    pub(crate) denoising_end: Option<f64>,
    pub(crate) denoising_start: Option<f64>,
    pub(crate) tiny_decoder: bool,
    pub(crate) control: Vec<ControlInput>,
    pub(crate) guess_mode: bool,
    pub(crate) adapters: Vec<AdapterInput>,
    pub(crate) init_latents: Option<Tensor<4>>,
    pub(crate) noise: Option<Box<dyn NoiseSource + 'a>>,
    pub(crate) callback: Option<RequestCallback<'a>>,
}

impl fmt::Debug for GenerationRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerationRequest")
            .field("prompt", &self.prompt)
            .field("negative_prompt", &self.negative_prompt)
            .field("prompt_2", &self.prompt_2)
            .field("negative_prompt_2", &self.negative_prompt_2)
            .field("prompt_3", &self.prompt_3)
            .field("negative_prompt_3", &self.negative_prompt_3)
            .field("max_sequence_length", &self.max_sequence_length)
            .field("skip_layer_guidance", &self.skip_layer_guidance)
            .field("shift", &self.shift)
            .field("size", &(self.width, self.height))
            .field("steps", &self.steps)
            .field("guidance", &self.guidance)
            .field("seed", &self.seed)
            .field("scheduler", &self.scheduler)
            .field("num_images", &self.num_images)
            .field("init_image", &self.init_image.is_some())
            .field("mask", &self.mask.is_some())
            .field("outpaint", &self.outpaint)
            .field("loras", &self.loras)
            .field("hires", &self.hires)
            .field("tiny_decoder", &self.tiny_decoder)
            .field("control", &self.control)
            .field("guess_mode", &self.guess_mode)
            .field("adapters", &self.adapters)
            .finish_non_exhaustive()
    }
}

impl<'a> GenerationRequest<'a> {
    /// A text-to-image request for `prompt` with diffusers' defaults: the model's
    /// size, 50 steps, guidance 7.5, the model's scheduler, one image, a random seed
    /// (recorded in the result).
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            prompt_3: None,
            negative_prompt_3: None,
            max_sequence_length: None,
            skip_layer_guidance: None,
            shift: None,
            width: None,
            height: None,
            steps: Steps::Count(DEFAULT_STEPS),
            guidance: DEFAULT_GUIDANCE_SCALE,
            seed: None,
            scheduler: SchedulerChoice::Model,
            sigma_schedule: None,
            eta: None,
            num_images: 1,
            clip_skip: None,
            init_image: None,
            strength: None,
            mask: None,
            outpaint: None,
            size_mode: SizeMode::Exact,
            loras: Vec::new(),
            long_prompts: false,
            prompt_weighting: false,
            hires: None,
            micro: MicroConditioning::default(),
            denoising_end: None,
            denoising_start: None,
            tiny_decoder: false,
            control: Vec::new(),
            guess_mode: false,
            adapters: Vec::new(),
            init_latents: None,
            noise: None,
            callback: None,
        }
    }

    /// What to avoid.
    pub fn negative_prompt(mut self, text: impl Into<String>) -> Self {
        self.negative_prompt = Some(text.into());
        self
    }

    /// SDXL's `prompt_2`: what the second text encoder (OpenCLIP bigG) reads; unset
    /// or empty, it reads the prompt. Refused by models with one text encoder.
    pub fn prompt_2(mut self, text: impl Into<String>) -> Self {
        self.prompt_2 = Some(text.into());
        self
    }

    /// SDXL's `negative_prompt_2`, for the second text encoder; unset or empty, the
    /// negative prompt. Without a negative prompt SDXL base's negative is zeros
    /// (`force_zeros_for_empty_prompt`) and this is not read, as in diffusers.
    pub fn negative_prompt_2(mut self, text: impl Into<String>) -> Self {
        self.negative_prompt_2 = Some(text.into());
        self
    }

    /// SD 3's `prompt_3`: what the T5 encoder reads; unset or empty, the prompt.
    /// Refused by models without T5.
    pub fn prompt_3(mut self, text: impl Into<String>) -> Self {
        self.prompt_3 = Some(text.into());
        self
    }

    /// SD 3's `negative_prompt_3`, for the T5 encoder; unset or empty, the negative
    /// prompt.
    pub fn negative_prompt_3(mut self, text: impl Into<String>) -> Self {
        self.negative_prompt_3 = Some(text.into());
        self
    }

    /// SD 3's `max_sequence_length`: T5 tokens (256 by default, at most 512).
    pub fn max_sequence_length(mut self, tokens: usize) -> Self {
        self.max_sequence_length = Some(tokens);
        self
    }

    /// SD 3.5's skip-layer guidance ([`SkipLayerGuidance`]).
    pub fn skip_layer_guidance(mut self, slg: SkipLayerGuidance) -> Self {
        self.skip_layer_guidance = Some(slg);
        self
    }

    /// The flow-matching shift (SD 3.x; SD 3.5's config says 3.0) of the model's
    /// scheduler or a named one; refused for diffusion models' schedulers.
    pub fn shift(mut self, shift: f64) -> Self {
        self.shift = Some(shift);
        self
    }

    /// Output size in pixels (multiples of 8); default: the model's.
    pub fn size(mut self, width: usize, height: usize) -> Self {
        self.width = Some(width);
        self.height = Some(height);
        self
    }

    /// Guides the run with one of the pipeline's ControlNets (repeatable: several
    /// ControlNets' residuals are summed). Without an explicit size a text-to-image
    /// run takes the first control image's size (rounded down to a multiple of 8).
    pub fn control(mut self, input: ControlInput) -> Self {
        self.control.push(input);
        self
    }

    /// Guides the run with one of the pipeline's T2I-Adapters (repeatable: the
    /// adapters' scaled features are summed).
    pub fn adapter(mut self, input: AdapterInput) -> Self {
        self.adapters.push(input);
        self
    }

    /// diffusers' `guess_mode` for every ControlNet of the request: with guidance
    /// the ControlNets see the conditional half only, their residuals growing from
    /// 0.1 to 1 times the scale; meant for prompts that say little.
    pub fn guess_mode(mut self, on: bool) -> Self {
        self.guess_mode = on;
        self
    }

    /// Denoising steps.
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = Steps::Count(steps);
        self
    }

    /// Explicit timesteps or sigmas instead of a step count.
    pub fn schedule(mut self, steps: Steps) -> Self {
        self.steps = steps;
        self
    }

    /// Classifier-free guidance scale (finite; `<= 1` disables guidance).
    pub fn guidance(mut self, scale: f64) -> Self {
        self.guidance = scale;
        self
    }

    /// Seed of the noise. Image `i` of a text-to-image batch is drawn from `seed + i`,
    /// so it can be made again alone.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// A scheduler by a name of [`sd_schedulers::SCHEDULER_NAMES`] (A1111 spellings
    /// too).
    pub fn scheduler(mut self, name: impl Into<String>) -> Self {
        self.scheduler = SchedulerChoice::Name(name.into());
        self
    }

    /// A scheduler from a diffusers `scheduler_config.json` text, or built by hand.
    pub fn scheduler_choice(mut self, choice: SchedulerChoice) -> Self {
        self.scheduler = choice;
        self
    }

    /// Another sigma schedule (Karras, exponential, Align Your Steps, custom).
    pub fn sigma_schedule(mut self, schedule: SigmaSchedule) -> Self {
        self.sigma_schedule = Some(schedule);
        self
    }

    /// DDIM's eta (noise per step; 0 deterministic).
    pub fn eta(mut self, eta: f64) -> Self {
        self.eta = Some(eta);
        self
    }

    /// Images per prompt, batched through the U-Net.
    pub fn num_images(mut self, n: usize) -> Self {
        self.num_images = n;
        self
    }

    /// diffusers' `clip_skip`: layers skipped at the end of the text encoder.
    pub fn clip_skip(mut self, layers: usize) -> Self {
        self.clip_skip = Some(layers);
        self
    }

    /// Image to image: start from `image`, keeping `1 - strength` of it
    /// (`strength` in (0, 1]).
    pub fn init_image(mut self, image: impl Into<ImageInput>, strength: f64) -> Self {
        self.init_image = Some(image.into());
        self.strength = Some(strength);
        self
    }

    /// Inpainting: repaint where the mask is white (needs [`Self::init_image`]; the
    /// strength defaults to 1).
    pub fn mask(mut self, mask: impl Into<ImageInput>) -> Self {
        self.mask = Some(mask.into());
        self
    }

    /// Outpainting: extend the init image by `extend` (multiples of 8), blending over
    /// `seam` pixels.
    pub fn outpaint(mut self, image: impl Into<ImageInput>, extend: Extend, seam: usize) -> Self {
        self.init_image = Some(image.into());
        self.outpaint = Some((extend, seam));
        self
    }

    /// What to do with input images whose sides are not multiples of 8 (default:
    /// refuse them).
    pub fn size_mode(mut self, mode: SizeMode) -> Self {
        self.size_mode = mode;
        self
    }

    /// A LoRA merged for this request only, at `strength` (1.0: as trained).
    pub fn lora(mut self, path: impl Into<PathBuf>, strength: f32) -> Self {
        self.loras.push(LoraSpec {
            path: path.into(),
            strength,
        });
        self
    }

    /// Prompts over 75 tokens in 75-token windows (A1111 / ComfyUI).
    pub fn long_prompts(mut self, on: bool) -> Self {
        self.long_prompts = on;
        self
    }

    /// A1111 attention syntax: `(word:1.3)`, `(word)`, `[word]`.
    pub fn prompt_weighting(mut self, on: bool) -> Self {
        self.prompt_weighting = on;
        self
    }

    /// SDXL's micro-conditioning: original size, crop corner, target size, their
    /// negatives, the refiner's aesthetic scores (ignored by SD 1.x/2.x).
    pub fn micro_conditioning(mut self, micro: MicroConditioning) -> Self {
        self.micro = micro;
        self
    }

    /// The base half of a base-to-refiner hand-over (diffusers' `denoising_end`):
    /// stop before the timesteps below `round(T - fraction * T)`; the result's
    /// `latents` go to the refiner's request with [`Self::denoising_start`].
    pub fn denoising_end(mut self, fraction: f64) -> Self {
        self.denoising_end = Some(fraction);
        self
    }

    /// The refiner half of a hand-over (diffusers' `denoising_start`): continue the
    /// latents given by [`Self::init_latents`] (the base's output) from the same
    /// fraction, without adding noise; `steps` is the whole run's count.
    pub fn denoising_start(mut self, fraction: f64) -> Self {
        self.denoising_start = Some(fraction);
        self
    }

    /// Hires fix (text to image only): generate at the request's size, upscale, and
    /// denoise again at the larger size (see [`HiresFix`]).
    pub fn hires_fix(mut self, hires: HiresFix) -> Self {
        self.hires = Some(hires);
        self
    }

    /// Decode the final picture with the pipeline's tiny autoencoder (TAESD) instead
    /// of the VAE: several times faster, a little less detail. Needs one loaded
    /// ([`crate::StableDiffusionPipeline::load_tiny_vae`]).
    pub fn tiny_decoder(mut self, on: bool) -> Self {
        self.tiny_decoder = on;
        self
    }

    /// Initial latents `[n, 4, h / 8, w / 8]` instead of drawn noise.
    pub fn init_latents(mut self, latents: Tensor<4>) -> Self {
        self.init_latents = Some(latents);
        self
    }

    /// Every random draw from this source instead of the seeded one (e.g. recorded
    /// noise to replay a diffusers run).
    pub fn noise(mut self, source: impl NoiseSource + 'a) -> Self {
        self.noise = Some(Box::new(source));
        self
    }

    /// Called after every step; return `false` to cancel.
    pub fn on_step(mut self, callback: impl FnMut(&StepInfo<'_>) -> bool + 'a) -> Self {
        self.callback = Some(Box::new(callback));
        self
    }
}
