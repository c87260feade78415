//! [`StableDiffusionPipeline`]: the owning pipeline, from a folder, a file or the hub
//! to pictures.

use burn::prelude::*;
use burn::tensor::DType;
use sd_core::{Autoencoder, NoiseRng, NoiseSource, Scheduler, Steps};
use sd_io::ClipTokenizer;
use sd_io::image::{GenerationParameters, fit_size, image_to_tensor, mask_to_tensor, read_image};
use sd_io::watermark::DwtDctWatermark;
use sd_models::{
    AutoencoderKL, AutoencoderKLConfig, AutoencoderTiny, ClipTextModel, ControlNetModel,
    T2IAdapter, UNet2DConditionModel,
};
use sd_schedulers::{AnyScheduler, SchedulerConfig, SchedulerName};

use crate::composed::{GenerationOptions, GenerationOutput, StableDiffusion, StepInfo};
use crate::conditioner::{PromptEmbeddings, TextConditioner, TextEncoders};
use crate::denoiser_model::DenoiserModel;
use crate::error::PipelineError;
use crate::interpolate::Endpoints;
use crate::load::{
    LoadOptions, Loaded, LoraSpec, LoraTargets, ModelFamily, ModelSource, apply_lora_file,
};
use crate::memory::{RunShape, available_bytes, estimate_bytes, estimate_bytes_sd3};
use crate::output::{GeneratedImage, Generation};
use crate::plan::{RunPlan, TaskPlan};
use crate::request::{AdapterInput, ControlInput, GenerationRequest, ImageInput, SchedulerChoice};
use crate::safety::SafetyChecker;

/// A Stable Diffusion 1.x / 2.x / XL or SD 3 / 3.5 model that owns its parts:
/// tokenizers, text encoders, denoiser (U-Net or SD 3 transformer), VAE and scheduler. [`Self::from_pretrained`] loads one; [`Self::generate`]
/// runs a [`GenerationRequest`] (txt2img, img2img, inpainting or outpainting, from
/// what the request sets).
pub struct StableDiffusionPipeline {
    pub(crate) text_encoders: TextEncoders,
    pub(crate) denoiser: DenoiserModel,
    pub(crate) vae: AutoencoderKL,
    pub(crate) tiny_vae: Option<AutoencoderTiny>,
    pub(crate) watermark: Option<DwtDctWatermark>,
    pub(crate) safety_checker: Option<SafetyChecker>,
    pub(crate) controlnets: Vec<(String, ControlNetModel)>,
    pub(crate) adapters: Vec<(String, T2IAdapter)>,
    pub(crate) vae_config: AutoencoderKLConfig,
    pub(crate) scheduler_config: SchedulerConfig,
    pub(crate) scheduler: AnyScheduler,
    pub(crate) family: ModelFamily,
    pub(crate) name: String,
    pub(crate) device: Device,
}

/// The denoiser and text conditioner of a run.
type RunModels<'a> = (&'a dyn sd_core::Denoiser, TextConditioner<'a>);

/// The parts of a task, resolved from a request.
#[allow(clippy::large_enum_variant, reason = "one value per request")]
pub(crate) enum Task {
    Txt2Img,
    Refine(Tensor<4>, f64),
    Img2Img(Tensor<4>, f64),
    Inpaint(Tensor<4>, Tensor<4>, f64),
    Outpaint(Tensor<4>, crate::outpaint::Extend, usize),
}

impl StableDiffusionPipeline {
    /// Loads a model: a diffusers folder (SD 1.x / 2.x / XL, or SD 3 / 3.5 where it
    /// has `transformer/`), a single-file `.safetensors` checkpoint (SD 1.x, 2.x, XL
    /// and 9-channel inpainting models recognised from the tensors) or,
    /// with the `hub` feature, a hub repository id such as
    /// `"stable-diffusion-v1-5/stable-diffusion-v1-5"`.
    ///
    /// # Errors
    /// A device that cannot run ([`sd_core::CoreError::Device`]), a source that does
    /// not exist, unreadable or mismatched weights and configs, a LoRA that does not
    /// fit.
    pub fn from_pretrained(
        source: impl Into<ModelSource>,
        device: &Device,
        options: &LoadOptions,
    ) -> Result<Self, PipelineError> {
        // A GPU device without its driver fails here, with the backend's words,
        // rather than as a panic halfway through loading.
        sd_core::check_device(device)?;
        let (path, name) = match source.into() {
            ModelSource::Path(p) => (p, None),
            ModelSource::Hub { repo, revision } => {
                let name = repo.rsplit('/').next().map(String::from);
                (
                    crate::hub::download(&repo, revision.as_deref(), options)?,
                    name,
                )
            }
        };
        let mut loaded = crate::load::load_path(&path, device, options)?;
        let safety_checker = match options.safety_checker {
            Some(false) => None,
            wanted if path.is_dir() => {
                let checker = SafetyChecker::from_pipeline_dir(&path, device)?;
                if wanted == Some(true) && checker.is_none() {
                    return Err(PipelineError::Source {
                        source_name: path.display().to_string(),
                        message: "no safety_checker/ and feature_extractor/ for the safety checker asked for".into(),
                    });
                }
                checker
            }
            Some(true) => {
                return Err(PipelineError::Source {
                    source_name: path.display().to_string(),
                    message: "a single file has no safety checker; load the model's folder".into(),
                });
            }
            None => None,
        };
        if let Some(name) = name {
            loaded.name = name;
        }
        let mut pipeline = Self::from_loaded(loaded, device)?;
        // diffusers marks SDXL's pictures (add_watermarker) and no others.
        let watermark = options
            .watermark
            .unwrap_or(pipeline.family == ModelFamily::Sdxl);
        pipeline.set_watermark(watermark.then(DwtDctWatermark::sdxl));
        pipeline.safety_checker = safety_checker;
        if let Some(dir) = &options.tiny_vae {
            pipeline.load_tiny_vae(dir)?;
        }
        // Paths, or hub repository ids where no such path exists.
        let source = |p: &std::path::PathBuf| ModelSource::parse(&p.to_string_lossy());
        for path in &options.controlnets {
            pipeline.load_controlnet_with(source(path), &options.hub)?;
        }
        for path in &options.adapters {
            pipeline.load_adapter_with(source(path), &options.hub)?;
        }
        Ok(pipeline)
    }

    /// Loads a tiny autoencoder (TAESD for SD 1.x/2.x: `madebyollin/taesd`'s
    /// diffusers folder) for every later run: [`StepInfo::preview`] decodes with it,
    /// and [`GenerationRequest::tiny_decoder`] decodes the final picture with it.
    ///
    /// # Errors
    /// An unreadable folder, weights that do not fit, a latent space that is not the
    /// VAE's (channels or factor).
    pub fn load_tiny_vae(&mut self, dir: impl AsRef<std::path::Path>) -> Result<(), PipelineError> {
        let options = sd_io::ComponentOptions::default();
        let tiny = sd_io::model::tiny_vae_from_dir(dir.as_ref(), &self.device, &options)?;
        self.set_tiny_vae(Some(tiny))
    }

    /// Sets (or with `None` removes) the tiny autoencoder; see [`Self::load_tiny_vae`].
    ///
    /// # Errors
    /// A latent space that is not the VAE's (channels or downscale factor).
    pub fn set_tiny_vae(&mut self, tiny: Option<AutoencoderTiny>) -> Result<(), PipelineError> {
        if let Some(t) = &tiny
            && (t.latent_channels() != self.vae.latent_channels()
                || t.downscale_factor() != self.vae.downscale_factor())
        {
            return Err(PipelineError::request(
                "tiny_vae",
                format!(
                    "{} latent channels at 1/{} scale, the VAE has {} at 1/{}",
                    t.latent_channels(),
                    t.downscale_factor(),
                    self.vae.latent_channels(),
                    self.vae.downscale_factor()
                ),
            ));
        }
        self.tiny_vae = tiny;
        Ok(())
    }

    /// Decodes latents (a [`Generation`]'s `latents`, a step's [`StepInfo::latents`])
    /// to 8-bit pictures: by the VAE, or with `tiny` by the tiny autoencoder (TAESD,
    /// several times faster).
    ///
    /// # Shapes
    /// - `latents`: `[b, c, h, w]` scaled as the U-Net sees them; `b` pictures of
    ///   `w * f` x `h * f` out
    ///
    /// # Errors
    /// `tiny` without a tiny autoencoder loaded; latents the decoder cannot take.
    pub fn decode_latents(
        &self,
        latents: Tensor<4>,
        tiny: bool,
    ) -> Result<Vec<image::RgbImage>, PipelineError> {
        self.check_tiny_decoder(tiny)?;
        let sd = self.run_parts(self.own_models(), &self.scheduler, tiny);
        Ok(sd_io::image::tensor_to_images(&sd.decode(latents)?))
    }

    /// Sets (or with `None` turns off) the invisible watermark put into every
    /// picture of 256x256 pixels or more ([`LoadOptions::watermark`]; on for SDXL
    /// by default, as diffusers).
    pub fn set_watermark(&mut self, watermark: Option<DwtDctWatermark>) {
        self.watermark = watermark;
    }

    /// Sets (or with `None` turns off) the safety checker run on every picture
    /// ([`LoadOptions::safety_checker`]).
    pub fn set_safety_checker(&mut self, checker: Option<SafetyChecker>) {
        self.safety_checker = checker;
    }

    /// The safety checker, if the pipeline has one.
    pub fn safety_checker(&self) -> Option<&SafetyChecker> {
        self.safety_checker.as_ref()
    }

    /// The invisible watermark the pictures get, if any.
    pub fn watermark(&self) -> Option<&DwtDctWatermark> {
        self.watermark.as_ref()
    }

    /// The tiny autoencoder, when one is loaded.
    pub fn tiny_vae(&self) -> Option<&AutoencoderTiny> {
        self.tiny_vae.as_ref()
    }

    fn from_loaded(l: Loaded, device: &Device) -> Result<Self, PipelineError> {
        let scheduler = AnyScheduler::from_config(&l.scheduler_config)?;
        Ok(Self {
            text_encoders: l.text_encoders,
            denoiser: l.denoiser,
            vae: l.vae,
            tiny_vae: None,
            watermark: None,
            safety_checker: None,
            controlnets: Vec::new(),
            adapters: Vec::new(),
            vae_config: l.vae_config,
            scheduler_config: l.scheduler_config,
            scheduler,
            family: l.family,
            name: l.name,
            device: device.clone(),
        })
    }

    /// The model's name (its folder or file name), recorded in the images.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SD 1.x, 2.x, XL or 3.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// Whether the U-Net is a 9-channel inpainting one.
    pub fn is_inpainting(&self) -> bool {
        self.denoiser.as_denoiser().in_channels() == 2 * self.vae.latent_channels() + 1
    }

    /// The default picture side in pixels (the denoiser's `sample_size` times the
    /// VAE's factor: 512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL and SD 3).
    pub fn default_size(&self) -> usize {
        self.denoiser.sample_size() * self.vae.downscale_factor()
    }

    /// The device the models live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The tokenizers and text encoders, by conditioning family.
    pub fn text_encoders(&self) -> &TextEncoders {
        &self.text_encoders
    }

    /// The text conditioner over the pipeline's own encoders (no LoRAs merged).
    pub fn conditioner(&self) -> TextConditioner<'_> {
        self.text_encoders.conditioner()
    }

    /// The first tokenizer (`None` for the SDXL refiner, which has only the second).
    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        self.text_encoders.tokenizer()
    }

    /// The first text encoder (`None` for the SDXL refiner).
    pub fn text_encoder(&self) -> Option<&ClipTextModel> {
        self.text_encoders.text_encoder()
    }

    /// The U-Net (`None` for SD 3, whose denoiser is a transformer).
    pub fn unet(&self) -> Option<&UNet2DConditionModel> {
        self.denoiser.unet()
    }

    /// The denoiser: the U-Net or the SD 3 transformer, with its config.
    pub fn denoiser(&self) -> &DenoiserModel {
        &self.denoiser
    }

    /// The VAE.
    pub fn vae(&self) -> &AutoencoderKL {
        &self.vae
    }

    /// The default scheduler (the model's `scheduler_config.json`).
    pub fn scheduler(&self) -> &AnyScheduler {
        &self.scheduler
    }

    /// The model's scheduler config, which scheduler names are built over.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Replaces the default scheduler.
    pub fn set_scheduler(&mut self, scheduler: AnyScheduler) {
        self.scheduler = scheduler;
    }

    /// Merges a LoRA into the weights for every later request.
    ///
    /// # Errors
    /// An unreadable file or layers that do not fit the model.
    pub fn fuse_lora(&mut self, lora: &LoraSpec) -> Result<(), PipelineError> {
        let t = apply_lora_file(self.lora_targets(), lora)?;
        let (denoiser, te, te2) = t.into_owned();
        self.denoiser = denoiser;
        self.text_encoders.replace(te, te2);
        Ok(())
    }

    /// The borrowing composition over these parts with `scheduler`, for the
    /// lower-level task methods ([`StableDiffusion::txt2img`], ...).
    pub fn composed<'a>(&'a self, scheduler: &'a dyn Scheduler) -> StableDiffusion<'a> {
        self.run_parts(self.own_models(), scheduler, false)
    }

    /// The pipeline's own U-Net and text encoders (no LoRAs merged for a run).
    pub(crate) fn own_models(&self) -> RunModels<'_> {
        (
            self.denoiser.as_denoiser(),
            self.text_encoders.conditioner(),
        )
    }

    /// A run's U-Net and text encoders: `t`'s (LoRAs merged) with the pipeline's
    /// tokenizers.
    fn run_models<'a>(&'a self, t: &'a LoraTargets<'_>) -> RunModels<'a> {
        let conditioner = self
            .text_encoders
            .conditioner_with(t.text_encoder.as_deref(), t.text_encoder_2.as_deref());
        (t.denoiser.as_ref().as_denoiser(), conditioner)
    }

    /// The composition of one run: the pipeline's tokenizer and VAE with the run's
    /// U-Net and text encoder (LoRAs merged) and scheduler; the tiny autoencoder,
    /// when loaded, decodes the previews and, with `tiny_decoder`, the pictures.
    pub(crate) fn run_parts<'a>(
        &'a self,
        (unet, conditioner): RunModels<'a>,
        scheduler: &'a dyn Scheduler,
        tiny_decoder: bool,
    ) -> StableDiffusion<'a> {
        let tiny = self.tiny_vae.as_ref().map(|t| t as &dyn Autoencoder);
        StableDiffusion {
            conditioner,
            unet,
            vae: &self.vae,
            decoder: tiny.filter(|_| tiny_decoder),
            preview_decoder: tiny,
            watermark: self.watermark.as_ref(),
            scheduler,
            controlnets: Vec::new(),
            adapters: Vec::new(),
            device: self.device.clone(),
        }
    }

    /// SDXL's second text encoder, when the model has one.
    pub fn text_encoder_2(&self) -> Option<&ClipTextModel> {
        self.text_encoders.text_encoder_2()
    }

    /// The scheduler a request asks for, with its sigma schedule and eta.
    pub(crate) fn scheduler_for(
        &self,
        r: &GenerationRequest<'_>,
    ) -> Result<(AnyScheduler, String), PipelineError> {
        let base = self.shifted_config(r)?;
        let (s, label) = match &r.scheduler {
            SchedulerChoice::Model if r.shift.is_some() => {
                let s = AnyScheduler::from_config(&base)?;
                let label = sampler_label(&s);
                (s, label)
            }
            SchedulerChoice::Model => (self.scheduler.clone(), sampler_label(&self.scheduler)),
            SchedulerChoice::Name(n) => {
                let s = AnyScheduler::from_name(n, &base)?;
                let label = SchedulerName::label(n).to_string();
                (s, label)
            }
            SchedulerChoice::Config(json) => {
                let s = AnyScheduler::from_json(json)?;
                let label = sampler_label(&s);
                (s, label)
            }
            SchedulerChoice::Scheduler(s) => (s.clone(), sampler_label(s)),
        };
        let s = match &r.sigma_schedule {
            Some(schedule) => s.with_sigmas(schedule.clone())?,
            None => s,
        };
        let s = match r.eta {
            Some(eta) => s.with_eta(eta)?,
            None => s,
        };
        // Resolution-dependent shifting (flow matching's `use_dynamic_shifting`)
        // needs the image's patch count, as diffusers' SD 3 pipeline computes it.
        let f = self.vae.downscale_factor() * self.denoiser.as_denoiser().sample_multiple();
        let (w, h) = (
            r.width.unwrap_or_else(|| self.default_size()),
            r.height.unwrap_or_else(|| self.default_size()),
        );
        Ok((s.with_image_seq_len((h / f).saturating_mul(w / f)), label))
    }

    /// The model's scheduler config with the request's flow-matching shift.
    fn shifted_config(&self, r: &GenerationRequest<'_>) -> Result<SchedulerConfig, PipelineError> {
        let Some(shift) = r.shift else {
            return Ok(self.scheduler_config.clone());
        };
        if !SchedulerName::is_flow_config(&self.scheduler_config) {
            return Err(PipelineError::request(
                "shift",
                "the shift is a flow-matching (SD 3.x) setting; this model's scheduler is not one",
            ));
        }
        if matches!(
            r.scheduler,
            SchedulerChoice::Config(_) | SchedulerChoice::Scheduler(_)
        ) {
            return Err(PipelineError::request(
                "shift",
                "a shift applies to the model's scheduler or a named one; a given config or scheduler carries its own",
            ));
        }
        if !(shift.is_finite() && shift > 0.0) {
            return Err(PipelineError::request(
                "shift",
                format!("{shift} is not > 0"),
            ));
        }
        Ok(SchedulerConfig {
            shift: Some(shift),
            ..self.scheduler_config.clone()
        })
    }

    /// The pipeline's own models, borrowed.
    fn lora_targets(&self) -> LoraTargets<'_> {
        LoraTargets::borrowed(&self.denoiser, &self.text_encoders)
    }

    /// Copies of the models with the request's LoRAs merged, or the pipeline's own
    /// when it has none.
    fn models_for(&self, loras: &[LoraSpec]) -> Result<LoraTargets<'_>, PipelineError> {
        let mut models = self.lora_targets();
        for lora in loras {
            models = apply_lora_file(models, lora)?;
        }
        Ok(models)
    }

    fn image_tensor(
        &self,
        input: ImageInput,
        r: &GenerationRequest<'_>,
        mask: bool,
    ) -> Result<Tensor<4>, PipelineError> {
        let f = self.size_factor();
        let image = match input {
            ImageInput::Tensor(t) => return Ok(t),
            ImageInput::Image(i) => i,
            ImageInput::Path(p) => read_image(&p)?,
        };
        let image = fit_size(image, f, r.size_mode)?;
        Ok(if mask {
            mask_to_tensor(&image, &self.device)
        } else {
            image_to_tensor(&image, &self.device)
        })
    }

    /// The planned task with its inputs: the request's images read and fitted, or
    /// the latents a hand-over continues.
    fn task(&self, plan: &TaskPlan, r: &mut GenerationRequest<'_>) -> Result<Task, PipelineError> {
        let image = r.init_image.take();
        let mask = r.mask.take();
        let read = |input: Option<ImageInput>, mask: bool| match input {
            Some(i) => self.image_tensor(i, r, mask),
            None => Err(PipelineError::request("init_image", "missing")),
        };
        Ok(match *plan {
            TaskPlan::Txt2Img { .. } => Task::Txt2Img,
            TaskPlan::Refine { denoising_start } => {
                let latents = r.init_latents.take().ok_or_else(|| {
                    PipelineError::request("denoising_start", "needs init_latents")
                })?;
                Task::Refine(latents, denoising_start)
            }
            TaskPlan::Img2Img { strength } => Task::Img2Img(read(image, false)?, strength),
            TaskPlan::Inpaint { strength } => {
                Task::Inpaint(read(image, false)?, read(mask, true)?, strength)
            }
            TaskPlan::Outpaint { extend, seam } => {
                Task::Outpaint(read(image, false)?, extend, seam)
            }
        })
    }

    /// Refuses a run whose activations cannot fit in the memory available.
    pub(crate) fn check_memory(&self, o: &GenerationOptions) -> Result<(), PipelineError> {
        let Some(available) = available_bytes() else {
            return Ok(());
        };
        let tiling = self.vae.tiling();
        let tile = self.vae.tile_pixels();
        let shape = RunShape {
            batch: o.batch_size,
            guidance: o.guidance_scale > 1.0
                && self.denoiser.as_denoiser().time_cond_proj_dim().is_none(),
            height: o.height,
            width: o.width,
            vae_tile: tiling.applies(o.height, o.width, tile).then_some(tile),
            unet_bytes: if self.denoiser.dtype() == DType::F32 {
                4
            } else {
                2
            },
        };
        let needed = match &self.denoiser {
            DenoiserModel::UNet { config, .. } => estimate_bytes(config, &self.vae_config, shape),
            DenoiserModel::Sd3 { config, .. } => {
                let t5 = o
                    .max_sequence_length
                    .unwrap_or(crate::conditioner::DEFAULT_MAX_SEQUENCE_LENGTH);
                estimate_bytes_sd3(config, 77 + t5, &self.vae_config, shape)
            }
        };
        if needed > available {
            return Err(PipelineError::OutOfMemory {
                what: format!("{} image(s) of {}x{}", o.batch_size, o.width, o.height),
                needed_bytes: needed,
                available_bytes: available,
            });
        }
        Ok(())
    }

    /// Runs a request: text to image, image to image, inpainting or outpainting, as
    /// the request says; `num_images` pictures batched through the U-Net.
    ///
    /// # Errors
    /// Invalid requests (sizes not multiples of 8, non-finite guidance, a clip skip
    /// past the text encoder, contradictory inputs), unreadable inputs, LoRAs that do
    /// not fit, requests too large for the memory available, cancellation by the
    /// callback ([`sd_core::CoreError::Cancelled`]).
    pub fn generate(
        &self,
        mut request: GenerationRequest<'_>,
    ) -> Result<Generation, PipelineError> {
        // A text-to-image request without a size takes the first control image's.
        let control = self.read_control_images(&mut request)?;
        let adapters = self.read_adapter_images(&mut request)?;
        let plan = self.validate(&request)?;
        self.execute(plan, request, (control, adapters))
    }

    /// Runs a request as `plan` ([`Self::validate`]'s) says.
    fn execute(
        &self,
        plan: RunPlan,
        mut request: GenerationRequest<'_>,
        (control, adapters): (Vec<ControlInput>, Vec<AdapterInput>),
    ) -> Result<Generation, PipelineError> {
        let models = self.models_for(&request.loras)?;
        let task = self.task(&plan.task, &mut request)?;
        let mut sd = self.run_parts(
            self.run_models(&models),
            &plan.scheduler,
            request.tiny_decoder,
        );
        sd.controlnets = self.control_units(control, &plan, request.guess_mode)?;
        sd.adapters = self.adapter_units(adapters, &plan)?;
        let seed = request.seed.unwrap_or_else(rand::random::<u64>);
        let mut options = plan.options.clone();
        options.init_latents = request.init_latents.take();
        // Text to image draws image i from seed + i, so each can be made again alone.
        let per_image_seed = matches!(task, Task::Txt2Img)
            && options.init_latents.is_none()
            && request.noise.is_none();
        if per_image_seed {
            options.init_latents = Some(self.batch_noise(&sd, &options, seed)?);
        }
        let mut noise: Box<dyn NoiseSource + '_> = match request.noise.take() {
            Some(n) => n,
            None => Box::new(NoiseRng::seed(seed)),
        };
        let mut callback = request.callback.take();
        let cb = callback
            .as_mut()
            .map(|c| &mut **c as &mut dyn FnMut(&StepInfo<'_>) -> bool);
        let hires = match &plan.task {
            TaskPlan::Txt2Img { hires } => *hires,
            _ => None,
        };
        let out = match task {
            Task::Txt2Img => match &hires {
                Some(h) => sd.txt2img_hires(&options, h, noise.as_mut(), cb)?,
                None => sd.txt2img(&options, noise.as_mut(), cb)?,
            },
            Task::Refine(latents, start) => {
                sd.img2img_from_latents(&options, latents, start, noise.as_mut(), cb)?
            }
            Task::Img2Img(image, strength) => {
                sd.img2img(&options, image, strength, noise.as_mut(), cb)?
            }
            Task::Inpaint(image, mask, strength) => {
                sd.inpaint(&options, image, mask, strength, noise.as_mut(), cb)?
            }
            Task::Outpaint(image, extend, seam) => {
                sd.outpaint(&options, image, extend, seam, noise.as_mut(), cb)?
            }
        };
        self.output(out, &plan, seed, per_image_seed)
    }

    /// The prompt embeddings a request runs with, as [`Self::generate`] computes them:
    /// `[negative; positive]` with classifier-free guidance, else the positive;
    /// SDXL's pooled embedding besides. The request's LoRAs are merged for it.
    ///
    /// # Errors
    /// A clip skip past the encoders, a second prompt for a model with one encoder,
    /// LoRAs that do not fit, tokenizer failures.
    pub fn encode_prompt(
        &self,
        request: &GenerationRequest<'_>,
    ) -> Result<PromptEmbeddings, PipelineError> {
        let models = self.models_for(&request.loras)?;
        let sd = self.run_parts(self.run_models(&models), &self.scheduler, false);
        Ok(sd.prompt_embeddings(&self.options(request))?)
    }

    pub(crate) fn options(&self, r: &GenerationRequest<'_>) -> GenerationOptions {
        GenerationOptions {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            prompt_2: r.prompt_2.clone(),
            negative_prompt_2: r.negative_prompt_2.clone(),
            prompt_3: r.prompt_3.clone(),
            negative_prompt_3: r.negative_prompt_3.clone(),
            max_sequence_length: r.max_sequence_length,
            skip_layer_guidance: r.skip_layer_guidance.clone(),
            steps: r.steps.clone(),
            guidance_scale: r.guidance,
            width: r.width.unwrap_or_else(|| self.default_size()),
            height: r.height.unwrap_or_else(|| self.default_size()),
            clip_skip: r.clip_skip,
            batch_size: r.num_images,
            init_latents: None,
            long_prompts: r.long_prompts,
            prompt_weighting: r.prompt_weighting,
            micro: r.micro,
            denoising_end: r.denoising_end,
        }
    }

    /// Initial noise of a text-to-image batch of a [`RunPlan`]'s options: image `i`
    /// from seed `seed + i`, so each can be made again alone.
    pub(crate) fn batch_noise(
        &self,
        sd: &StableDiffusion<'_>,
        o: &GenerationOptions,
        seed: u64,
    ) -> Result<Tensor<4>, PipelineError> {
        // The options are a plan's: the image count and size are checked.
        let f = sd.vae.downscale_factor();
        let shape = [1, sd.vae.latent_channels(), o.height / f, o.width / f];
        let parts = (0..o.batch_size as u64)
            .map(|i| NoiseRng::seed(seed.wrapping_add(i)).normal(shape, &self.device))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::cat(parts, 0))
    }

    /// The pictures of a run with their parameters; image `i`'s seed is `seed + i`
    /// where each was drawn from its own (`per_image_seed`), else `seed`.
    pub(crate) fn output(
        &self,
        out: GenerationOutput,
        plan: &RunPlan,
        seed: u64,
        per_image_seed: bool,
    ) -> Result<Generation, PipelineError> {
        let o = &plan.options;
        let mut pictures = sd_io::image::tensor_to_images(&out.images);
        let flags = match &self.safety_checker {
            Some(checker) => checker
                .run(&mut pictures, &self.device)?
                .into_iter()
                .map(Some)
                .collect(),
            None => vec![None; pictures.len()],
        };
        let steps = match &o.steps {
            Steps::Count(n) => *n,
            Steps::Timesteps(t) => t.len(),
            Steps::Sigmas(s) => s.len().saturating_sub(1),
        };
        let images = pictures
            .into_iter()
            .zip(flags)
            .enumerate()
            .map(|(i, (image, nsfw_content_detected))| GeneratedImage {
                parameters: GenerationParameters {
                    prompt: o.prompt.clone(),
                    negative_prompt: o.negative_prompt.clone().unwrap_or_default(),
                    steps,
                    sampler: plan.sampler.clone(),
                    cfg_scale: o.guidance_scale,
                    seed: if per_image_seed {
                        seed.wrapping_add(i as u64)
                    } else {
                        seed
                    },
                    width: image.width() as usize,
                    height: image.height() as usize,
                    model: self.name.clone(),
                },
                image,
                nsfw_content_detected,
            })
            .collect();
        Ok(Generation {
            images,
            latents: out.latents,
        })
    }

    /// Latent interpolation from request `a` to request `b` in `frames` pictures:
    /// prompt embeddings linearly, initial noise spherically (each request's seed
    /// draws its end's noise). Size, steps, guidance and scheduler are `a`'s.
    ///
    /// # Errors
    /// As [`Self::generate`], and no frames.
    pub fn interpolate(
        &self,
        mut a: GenerationRequest<'_>,
        b: GenerationRequest<'_>,
        frames: usize,
    ) -> Result<Vec<GeneratedImage>, PipelineError> {
        let plan = self.validate(&a)?;
        let ob = self.validate(&b)?.options;
        let models = self.models_for(&a.loras)?;
        let sd = self.run_parts(self.run_models(&models), &plan.scheduler, a.tiny_decoder);
        let oa = plan.options.clone();
        let seed_a = a.seed.unwrap_or_else(rand::random::<u64>);
        let seed_b = b.seed.unwrap_or_else(rand::random::<u64>);
        let ends = Endpoints {
            a: &oa,
            b: &ob,
            noise_a: self.batch_noise(&sd, &oa, seed_a)?,
            noise_b: self.batch_noise(&sd, &oa, seed_b)?,
        };
        let mut noise = NoiseRng::seed(seed_a);
        let mut callback = a.callback.take();
        let cb = callback
            .as_mut()
            .map(|c| &mut **c as &mut dyn FnMut(&StepInfo<'_>) -> bool);
        let outs = sd.interpolate(ends, frames, &mut noise, cb)?;
        let mut images = Vec::with_capacity(outs.len());
        for o in outs {
            images.extend(self.output(o, &plan, seed_a, true)?.images);
        }
        Ok(images)
    }
}

fn sampler_label(s: &AnyScheduler) -> String {
    s.class_name().to_string()
}
