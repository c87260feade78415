//! The borrowing composition: [`StableDiffusion`] runs the pipelines over any
//! implementations of the sd-core traits (a user's own text encoder, U-Net or VAE),
//! behaving as diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
//! and `StableDiffusionInpaintPipeline`. The tasks live in their own files
//! (`txt2img.rs`, `img2img.rs`, `inpaint.rs`, `outpaint.rs`, `interpolate.rs`) around
//! the one loop of `denoise.rs`.

use burn::prelude::*;
use sd_core::{Autoencoder, CoreError, Denoiser, NoiseSource, Scheduler, SchedulerRun, Steps};

use sd_io::watermark::DwtDctWatermark;

use crate::conditioner::TextConditioner;
use crate::control::{AdapterUnit, ControlNetUnit};
use crate::preview::latent_preview;
use crate::sdxl::MicroConditioning;

/// diffusers' default classifier-free guidance scale.
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;

/// diffusers' default number of denoising steps.
pub const DEFAULT_STEPS: usize = 50;

/// Options shared by every task of [`StableDiffusion`].
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// What to draw.
    pub prompt: String,
    /// What to avoid; `None` is the empty prompt (diffusers' default; SDXL base:
    /// zeros, `force_zeros_for_empty_prompt`).
    pub negative_prompt: Option<String>,
    /// SDXL's `prompt_2`, for the second text encoder; `None` (or empty): `prompt`.
    pub prompt_2: Option<String>,
    /// SDXL's `negative_prompt_2`, for the second text encoder; `None` (or empty):
    /// the negative prompt.
    pub negative_prompt_2: Option<String>,
    /// SD 3's `prompt_3`, for the T5 encoder; `None` (or empty): `prompt`.
    pub prompt_3: Option<String>,
    /// SD 3's `negative_prompt_3`, for the T5 encoder; `None` (or empty): the
    /// negative prompt.
    pub negative_prompt_3: Option<String>,
    /// SD 3's `max_sequence_length`: the T5 tokens (256 by default, at most 512).
    pub max_sequence_length: Option<usize>,
    /// SD 3.5's skip-layer guidance (`None`: off).
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
    /// How the scheduler picks its steps.
    pub steps: Steps,
    /// Classifier-free guidance scale (finite); `<= 1` runs no unconditional pass.
    pub guidance_scale: f64,
    /// Image width in pixels (a multiple of 8).
    pub width: usize,
    /// Image height in pixels (a multiple of 8).
    pub height: usize,
    /// diffusers' `clip_skip` (applied to the positive prompt only).
    pub clip_skip: Option<usize>,
    /// Images per prompt, batched through the U-Net.
    pub batch_size: usize,
    /// Initial latents `[batch, 4, h / 8, w / 8]` instead of drawing them (before
    /// scaling by `init_noise_sigma`, as diffusers' `latents=`).
    pub init_latents: Option<Tensor<4>>,
    /// Prompts longer than 75 tokens are encoded in 75-token windows and concatenated
    /// (A1111 / ComfyUI); off by default, where diffusers truncates.
    pub long_prompts: bool,
    /// A1111 attention syntax `(word:1.3)`, `(word)`, `[word]`; off by default.
    pub prompt_weighting: bool,
    /// SDXL's micro-conditioning (ignored by SD 1.x/2.x).
    pub micro: MicroConditioning,
    /// diffusers' `denoising_end` (text to image): stop before the timesteps below
    /// `round(T - fraction * T)` and return the partly denoised latents, for a
    /// refiner to finish with [`StableDiffusion::img2img_from_latents`].
    pub denoising_end: Option<f64>,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            prompt_2: None,
            negative_prompt_2: None,
            prompt_3: None,
            negative_prompt_3: None,
            max_sequence_length: None,
            skip_layer_guidance: None,
            steps: Steps::Count(DEFAULT_STEPS),
            guidance_scale: DEFAULT_GUIDANCE_SCALE,
            width: 512,
            height: 512,
            clip_skip: None,
            batch_size: 1,
            init_latents: None,
            long_prompts: false,
            prompt_weighting: false,
            micro: MicroConditioning::default(),
            denoising_end: None,
        }
    }
}

/// SD 3.5's skip-layer guidance (diffusers' `skip_guidance_layers` and the
/// `skip_layer_guidance_*` arguments of `StableDiffusion3Pipeline`): at the steps `i`
/// with `steps * start < i < steps * stop`, the positive prompt's prediction with
/// `layers` skipped is taken away after classifier-free guidance,
/// `pred += (cond - skipped) * scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct SkipLayerGuidance {
    /// The transformer blocks skipped (SD 3.5 Medium: 7, 8, 9).
    pub layers: Vec<usize>,
    /// `skip_layer_guidance_scale` (2.8).
    pub scale: f64,
    /// `skip_layer_guidance_start`, a fraction of the steps (0.01).
    pub start: f64,
    /// `skip_layer_guidance_stop`, a fraction of the steps (0.2).
    pub stop: f64,
}

impl SkipLayerGuidance {
    /// diffusers' defaults (scale 2.8, from 1 % to 20 % of the steps) over `layers`.
    pub fn new(layers: Vec<usize>) -> Self {
        Self {
            layers,
            scale: 2.8,
            start: 0.01,
            stop: 0.2,
        }
    }

    /// diffusers' defaults over `layers` with the settings given (`None`: the
    /// default).
    pub fn with_settings(
        layers: Vec<usize>,
        scale: Option<f64>,
        start: Option<f64>,
        stop: Option<f64>,
    ) -> Self {
        let d = Self::new(layers);
        Self {
            scale: scale.unwrap_or(d.scale),
            start: start.unwrap_or(d.start),
            stop: stop.unwrap_or(d.stop),
            ..d
        }
    }

    /// Whether step `i` of `steps` gets the extra pass.
    pub fn applies(&self, i: usize, steps: usize) -> bool {
        let (i, n) = (i as f64, steps as f64);
        i > n * self.start && i < n * self.stop
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`CoreError::InvalidArgument`] for no layers, a non-finite scale, or a
    /// start / stop outside `[0, 1]`.
    pub fn check(&self) -> Result<(), CoreError> {
        if self.layers.is_empty() {
            return Err(invalid("skip_layer_guidance", "no layers to skip"));
        }
        if !self.scale.is_finite() {
            return Err(invalid("skip_layer_guidance", "the scale must be finite"));
        }
        if !(0.0..=1.0).contains(&self.start) || !(0.0..=1.0).contains(&self.stop) {
            return Err(invalid(
                "skip_layer_guidance",
                "start and stop are fractions of the steps in [0, 1]",
            ));
        }
        Ok(())
    }
}

/// What a step callback sees.
pub struct StepInfo<'a> {
    /// Index of the step just taken (into the run's timesteps).
    pub step: usize,
    /// Total steps of the run.
    pub total: usize,
    /// The step's timestep.
    pub timestep: f64,
    /// The latents after the step, `[b, 4, h, w]`.
    pub latents: &'a Tensor<4>,
    /// The preview decoder of the run ([`StableDiffusion::preview_decoder`]).
    pub(crate) preview_decoder: Option<&'a dyn Autoencoder>,
}

impl std::fmt::Debug for StepInfo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepInfo")
            .field("step", &self.step)
            .field("total", &self.total)
            .field("timestep", &self.timestep)
            .field("latents", &self.latents.dims())
            .field("preview_decoder", &self.preview_decoder.is_some())
            .finish()
    }
}

impl StepInfo<'_> {
    /// A preview of the latents in `[0, 1]`: decoded by the run's preview decoder
    /// (the tiny autoencoder, `[b, 3, H, W]` at full size) when it has one, else
    /// [`Self::cheap_preview`]. The latents are a noisy estimate until the last
    /// steps; the preview shows them as they are.
    pub fn preview(&self) -> Tensor<4> {
        self.preview_decoder
            .and_then(|d| {
                d.decode(d.unscale_latents(self.latents.clone()))
                    .ok()
                    .map(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0))
            })
            .unwrap_or_else(|| self.cheap_preview())
    }

    /// The cheapest preview (no decoder): `[b, 3, h, w]` in `[0, 1]` at latent
    /// resolution; see [`latent_preview`].
    pub fn cheap_preview(&self) -> Tensor<4> {
        latent_preview(self.latents)
    }

    /// Whether [`Self::preview`] decodes with a preview decoder.
    pub fn has_preview_decoder(&self) -> bool {
        self.preview_decoder.is_some()
    }
}

/// A per-step callback; returning `false` cancels the run
/// ([`CoreError::Cancelled`]).
pub type StepCallback<'c> = &'c mut dyn FnMut(&StepInfo<'_>) -> bool;

/// The result of a task of [`StableDiffusion`].
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// The final latents, before decoding, `[b, 4, h, w]`.
    pub latents: Tensor<4>,
    /// Decoded images `[b, 3, H, W]` in `[0, 1]`.
    pub images: Tensor<4>,
}

/// A Stable Diffusion model assembled from borrowed parts: any implementations of
/// the sd-core traits. [`crate::StableDiffusionPipeline`] owns its parts and lends
/// them to this type for every run.
pub struct StableDiffusion<'a> {
    /// The text conditioner (the family's tokenizers and text encoders):
    /// [`TextConditioner::clip`] for SD 1.x / 2.x, [`TextConditioner::Sdxl`].
    pub conditioner: TextConditioner<'a>,
    /// The denoiser (a 4-channel or a 9-channel inpainting U-Net).
    pub unet: &'a dyn Denoiser,
    /// The autoencoder.
    pub vae: &'a dyn Autoencoder,
    /// Decodes the final latents instead of `vae` when set (the tiny autoencoder:
    /// faster, a little less detail).
    pub decoder: Option<&'a dyn Autoencoder>,
    /// Decodes [`StepInfo::preview`] (the tiny autoencoder); `None`: the cheap
    /// linear preview.
    pub preview_decoder: Option<&'a dyn Autoencoder>,
    /// The invisible watermark put into the pictures ([`Self::decode`]) as
    /// diffusers' SDXL pipelines do; `None`: none.
    pub watermark: Option<&'a DwtDctWatermark>,
    /// The scheduler.
    pub scheduler: &'a dyn Scheduler,
    /// ControlNets guiding every step, with their images (empty: none).
    pub controlnets: Vec<ControlNetUnit<'a>>,
    /// T2I-Adapters guiding the run, with their images (empty: none).
    pub adapters: Vec<AdapterUnit<'a>>,
    /// Where tensors are created.
    pub device: Device,
}

/// `raw` (`[b, 3, H, W]` around `[-1, 1]`) with `wm` in every picture, clamped to
/// `[-1, 1]` where marked (diffusers' `apply_watermark`).
fn watermarked(raw: Tensor<4>, wm: &DwtDctWatermark) -> Tensor<4> {
    let [b, c, h, w] = raw.dims();
    if !DwtDctWatermark::applies(w, h) || c != 3 {
        return raw;
    }
    let device = raw.device();
    let Ok(mut values) = raw.clone().into_data().convert::<f32>().try_to_vec::<f32>() else {
        return raw;
    };
    for picture in values.chunks_exact_mut(c * h * w).take(b) {
        wm.apply_to_decoded(picture, w, h);
    }
    Tensor::from_data(TensorData::new(values, [b, c, h, w]), &device)
}

pub(crate) fn invalid(name: &'static str, message: impl Into<String>) -> CoreError {
    CoreError::invalid(name, message)
}

/// Checks an image size is positive and divisible by 8.
///
/// # Errors
/// [`CoreError::InvalidArgument`] naming the side.
pub fn check_size(width: usize, height: usize) -> Result<(), CoreError> {
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 || !v.is_multiple_of(8) {
            return Err(invalid(
                name,
                format!("{v} is not a positive multiple of 8"),
            ));
        }
    }
    Ok(())
}

/// Checks the options every task shares: a finite guidance scale, a positive
/// batch, a step count above zero.
///
/// # Errors
/// [`CoreError::InvalidArgument`] naming the option.
pub fn check_options(o: &GenerationOptions) -> Result<(), CoreError> {
    if !o.guidance_scale.is_finite() {
        return Err(invalid(
            "guidance_scale",
            format!("{} is not a finite number", o.guidance_scale),
        ));
    }
    if o.batch_size == 0 {
        return Err(invalid(
            "batch_size",
            "must be at least 1 (a request's num_images)",
        ));
    }
    if o.steps == Steps::Count(0) {
        return Err(invalid("steps", "must be at least 1"));
    }
    Ok(())
}

impl StableDiffusion<'_> {
    /// Decodes scaled latents to the pictures in `[0, 1]`, with the watermark when
    /// the composition has one (marked before clamping, as diffusers does).
    ///
    /// # Shapes
    /// - `[b, 4, h, w]` to `[b, 3, h * 8, w * 8]`
    ///
    /// # Errors
    /// As [`Autoencoder::decode`].
    pub fn decode(&self, latents: Tensor<4>) -> Result<Tensor<4>, CoreError> {
        let raw = self.decode_raw(latents)?;
        let raw = match self.watermark {
            Some(wm) => watermarked(raw, wm),
            None => raw,
        };
        Ok((raw / 2.0 + 0.5).clamp(0.0, 1.0))
    }

    /// [`Self::decode`] without the watermark, for pictures that are not the run's
    /// result (the hires fix's first pass).
    pub(crate) fn decode_unmarked(&self, latents: Tensor<4>) -> Result<Tensor<4>, CoreError> {
        Ok((self.decode_raw(latents)? / 2.0 + 0.5).clamp(0.0, 1.0))
    }

    /// The decoder's output, around `[-1, 1]`.
    fn decode_raw(&self, latents: Tensor<4>) -> Result<Tensor<4>, CoreError> {
        // The denoiser's pooled kernel scratch (up to 256 MB) would sit idle through
        // the decode, where a picture's memory peaks.
        sd_kernels::release_scratch();
        let vae = self.decoder.unwrap_or(self.vae);
        vae.decode(vae.unscale_latents(latents))
    }

    /// The latent shape `[batch, c, h / f, w / f]` of the options, checked.
    pub(crate) fn latent_shape(&self, o: &GenerationOptions) -> Result<[usize; 4], CoreError> {
        check_options(o)?;
        check_size(o.width, o.height)?;
        let f = self.vae.downscale_factor();
        if !o.width.is_multiple_of(f) || !o.height.is_multiple_of(f) {
            return Err(invalid(
                "width",
                format!("must be a multiple of the VAE factor {f}"),
            ));
        }
        let m = f * self.unet.sample_multiple();
        if !o.width.is_multiple_of(m) || !o.height.is_multiple_of(m) {
            return Err(invalid(
                "width",
                format!(
                    "{}x{}: the sides must be multiples of {m} (the VAE factor {f} times the                      transformer's patch {})",
                    o.width,
                    o.height,
                    self.unet.sample_multiple()
                ),
            ));
        }
        Ok([
            o.batch_size,
            self.vae.latent_channels(),
            o.height / f,
            o.width / f,
        ])
    }

    /// `vae.encode(image)` posterior sample times the scaling factor, repeated to
    /// `batch`.
    pub(crate) fn encode_image(
        &self,
        image: Tensor<4>,
        batch: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<4>, CoreError> {
        Ok(self.encode_image_sampled(image, batch, noise)?.0)
    }

    /// [`Self::encode_image`] and whether it drew a posterior sample (an
    /// `AutoencoderKL`; TAESD's encoding is deterministic).
    pub(crate) fn encode_image_sampled(
        &self,
        image: Tensor<4>,
        batch: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor<4>, bool), CoreError> {
        let dist = self.vae.encode(image)?;
        // diffusers draws from the posterior only when there is one (not for TAESD).
        let sampled = dist.is_random();
        let l = self.vae.scale_latents(if sampled {
            let eps = noise.normal(dist.mean.dims(), &self.device)?;
            dist.sample(eps)
        } else {
            dist.mode()
        });
        let b = l.dims()[0];
        let l = if b == batch {
            l
        } else {
            l.repeat_dim(0, batch / b.max(1))
        };
        Ok((l, sampled))
    }

    /// Starts a run and skips to diffusers' img2img `t_start` for `strength`.
    pub(crate) fn start_at_strength(
        &self,
        steps: &Steps,
        strength: f64,
    ) -> Result<(Box<dyn SchedulerRun>, usize), CoreError> {
        let mut run = self.scheduler.start(steps)?;
        let start = self.conditioner.img2img_start_in(run.as_ref(), strength)?;
        if start >= run.len() {
            return Err(invalid(
                "strength",
                format!("{strength} leaves no step to run"),
            ));
        }
        run.skip_to(start)?;
        Ok((run, start))
    }

    /// Checks an input image `[b, 3, H, W]` and returns the options at its size.
    pub(crate) fn options_for_image(
        &self,
        options: &GenerationOptions,
        image: &Tensor<4>,
    ) -> Result<GenerationOptions, CoreError> {
        let [b, c, h, w] = image.dims();
        if c != 3 {
            return Err(invalid("image", format!("{c} channels, 3 expected")));
        }
        if b != 1 && b != options.batch_size {
            return Err(invalid(
                "image",
                format!("{b} images for a batch of {}", options.batch_size),
            ));
        }
        Ok(GenerationOptions {
            width: w,
            height: h,
            ..options.clone()
        })
    }
}
