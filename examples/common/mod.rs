//! What the generation examples share: the common flags, model loading, scheduler
//! choice, noise, progress bar and output.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use stable_diffusion::burn::prelude::*;
use stable_diffusion::burn::tensor::DType;
use stable_diffusion::core::{
    CoreError, GenerationOptions, NoiseRng, NoiseSource, RecordedNoise, StableDiffusion, StepInfo,
    Steps,
};
use stable_diffusion::io::image::GenerationParameters;
use stable_diffusion::io::model::{
    builtin_configs, text_encoder_from_dir, unet_from_dir, vae_from_dir,
};
use stable_diffusion::io::{
    ClipTokenizer, ComponentOptions, DiffusersDir, SingleFile, WeightSource,
};
use stable_diffusion::models::{AutoencoderKL, ClipTextModel, UNet2DConditionModel, VaeTiling};
use stable_diffusion::schedulers::{AnyScheduler, AysPreset, SchedulerConfig, SigmaSchedule};

/// The examples allocate with mimalloc, told never to hand freed memory back to the
/// kernel: the models' activations are tens of MB each, and glibc's malloc (or
/// mimalloc's default 10 ms purge) returns such blocks on free, so every layer paid a
/// page fault per 4 KiB, with zeroing, again. On the CPU backend this took the SD 1.5
/// U-Net from ~10.4 s to ~9.5 s here; see docs/performance.md. Peak memory is
/// unchanged; memory freed after the peak stays with the process.
struct KeepingAllocator;

/// mimalloc's `mi_option_purge_delay` (`-1`: never purge).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

static TUNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

// SAFETY: forwards to mimalloc; setting an option neither allocates nor frees.
unsafe impl std::alloc::GlobalAlloc for KeepingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use std::sync::atomic::Ordering::Relaxed;
        if !TUNED.load(Relaxed) {
            TUNED.store(true, Relaxed);
            // SAFETY: a plain option setter.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
        }
        // SAFETY: forwarded.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded (alloc above has run first in any program that frees).
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: KeepingAllocator = KeepingAllocator;

/// The demo model shipped in the repository, used without `--model`: trained from
/// scratch by `--example train_demo` on 64x64 pictures of one shape ("a red circle
/// on a white background, top left"; circle/square/triangle, red/green/blue/yellow,
/// white/black/gray backgrounds, top left/top right/bottom left/bottom right/center).
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo-shapes");

/// The tiny random-weight stand-in of the test fixtures (real SD 1.5 architecture).
#[allow(dead_code)]
pub const TINY_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd15");

/// Flags every generation example takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Diffusers folder or single-file .safetensors checkpoint (default: the tiny test model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Take the U-Net from this folder (a pipeline folder or a `unet/` folder).
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// Take the VAE from this folder (a pipeline folder or a `vae/` folder).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// What to draw.
    #[arg(long, default_value = "a red circle on a white background, top left")]
    pub prompt: String,
    /// What to avoid.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale (<= 1 disables guidance).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed of the noise.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Width in pixels (multiple of 8; default: the model's size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (multiple of 8; default: the model's size).
    #[arg(long)]
    pub height: Option<usize>,
    /// CLIP skip (diffusers' clip_skip: layers skipped at the end).
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, lms, pndm (default: the model's own).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// A diffusers scheduler_config.json whose `_class_name` picks the scheduler.
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,
    /// Explicit timesteps, comma separated, descending.
    #[arg(long, value_delimiter = ',')]
    pub timesteps: Option<Vec<f64>>,
    /// Explicit sigmas, comma separated, descending, ending in 0.
    #[arg(long, value_delimiter = ',')]
    pub sigmas: Option<Vec<f64>>,
    /// Align Your Steps schedule: sd15 or sdxl.
    #[arg(long)]
    pub ays: Option<String>,
    /// Initial latents (safetensors, tensor `latents`).
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// Recorded noise (safetensors `noise_000`, `noise_001`, ...) replayed in draw order.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Write the final latents (before decoding) to this safetensors file.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output PNG.
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A LoRA file (kohya or diffusers layout), optionally `PATH:STRENGTH`
    /// (default 1.0); repeatable. Merged into the weights.
    #[arg(long)]
    pub lora: Vec<String>,
    /// Run the U-Net in f16 (the VAE stays f32).
    #[arg(long)]
    pub f16: bool,
    /// Encode prompts longer than 77 tokens in 75-token windows (A1111 style).
    #[arg(long)]
    pub long_prompts: bool,
    /// A1111 prompt weighting: `(word:1.3)`, `(word)`, `[word]`.
    #[arg(long)]
    pub prompt_weighting: bool,
    /// VAE in tiles: auto (above 1024x1024 pixels), on (diffusers' enable_tiling) or off.
    #[arg(long, default_value = "auto")]
    pub vae_tiling: String,
}

/// The `--vae-tiling` value.
pub fn vae_tiling(name: &str) -> Result<VaeTiling, AnyError> {
    Ok(match name {
        "auto" => VaeTiling::default(),
        "on" => VaeTiling::On,
        "off" => VaeTiling::Off,
        other => return Err(format!("--vae-tiling {other}: expected auto, on or off").into()),
    })
}

/// Errors of the examples: one line for the user.
pub type AnyError = Box<dyn std::error::Error>;

/// The loaded model.
pub struct Loaded {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    /// Default image size in pixels (set from the U-Net's latent `sample_size`).
    pub sample_size: usize,
    pub name: String,
}

impl Loaded {
    /// The pipeline over these models.
    pub fn pipeline<'a>(
        &'a self,
        scheduler: &'a AnyScheduler,
        device: &Device,
    ) -> StableDiffusion<'a> {
        StableDiffusion {
            tokenizer: &self.tokenizer,
            text_encoder: &self.text_encoder,
            unet: &self.unet,
            vae: &self.vae,
            scheduler,
            device: device.clone(),
        }
    }

    /// Pixels per latent.
    pub fn vae_factor(&self) -> usize {
        use stable_diffusion::core::Autoencoder;
        self.vae.downscale_factor()
    }
}

pub fn device(name: &str) -> Result<Device, AnyError> {
    match name {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => Err("--device wgpu: rebuild with `--features wgpu`".into()),
        #[cfg(not(feature = "cuda"))]
        "cuda" => Err(
            "--device cuda: rebuild with `--features cuda` (needs network at build time)".into(),
        ),
        o => Err(format!("--device {o}: expected cpu, wgpu or cuda").into()),
    }
}

fn component_dir(dir: &Path, component: &str) -> PathBuf {
    if dir.join(component).join("config.json").exists() {
        dir.join(component)
    } else {
        dir.to_path_buf()
    }
}

/// A diffusers folder as it is (no `--unet`/`--vae` overrides, LoRAs or tiling):
/// f32 components, the U-Net with `unet_opts`; `sample_size` in latents.
pub fn load_dir(
    model: &Path,
    device: &Device,
    unet_opts: &ComponentOptions,
) -> Result<Loaded, AnyError> {
    let f32_opts = ComponentOptions::default();
    let dir = DiffusersDir::open(model)?;
    let unet_cfg = dir.unet_config()?;
    Ok(Loaded {
        tokenizer: dir.tokenizer()?,
        text_encoder: dir.text_encoder(device, &f32_opts)?,
        unet: dir.unet(device, unet_opts)?,
        vae: dir.vae(device, &f32_opts)?,
        scheduler_config: SchedulerConfig::from_json(&dir.scheduler_config_text()?)?,
        sample_size: unet_cfg.sample_size.unwrap_or(64),
        name: model
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
    })
}

pub fn load(args: &CommonArgs, device: &Device) -> Result<Loaded, AnyError> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            eprintln!(
                "no --model given: using the demo model shipped in the repo ({DEFAULT_MODEL}). \
                 It draws 64x64 pictures of one shape from prompts such as \
                 \"a blue triangle on a gray background, bottom right\" \
                 (circle/square/triangle; red/green/blue/yellow; white/black/gray; \
                 top left/top right/bottom left/bottom right/center)"
            );
            PathBuf::from(DEFAULT_MODEL)
        }
    };
    if !model.exists() {
        return Err(format!("--model {}: no such file or folder", model.display()).into());
    }
    let f32_opts = ComponentOptions::default();
    let unet_opts = ComponentOptions {
        dtype: args.f16.then_some(DType::F16),
        ..Default::default()
    };
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut loaded = if model.is_dir() {
        load_dir(&model, device, &unet_opts)?
    } else {
        let ckpt = SingleFile::open(&model)?;
        let sd2 = ckpt.text_encoder_config().hidden_size == 1024;
        let (pad, sched) = if sd2 {
            ("!", builtin_configs::SD21_SCHEDULER)
        } else {
            ("<|endoftext|>", builtin_configs::SD15_SCHEDULER)
        };
        Loaded {
            tokenizer: ClipTokenizer::clip(pad)?,
            text_encoder: ckpt.text_encoder(device, &f32_opts)?,
            unet: ckpt.unet(device, &unet_opts)?,
            vae: ckpt.vae(device, &f32_opts)?,
            scheduler_config: SchedulerConfig::from_json(sched)?,
            sample_size: ckpt.unet_config().sample_size.unwrap_or(64),
            name,
        }
    };
    if let Some(dir) = &args.unet {
        loaded.unet = unet_from_dir(&component_dir(dir, "unet"), device, &unet_opts)?;
    }
    if let Some(dir) = &args.vae {
        loaded.vae = vae_from_dir(&component_dir(dir, "vae"), device, &f32_opts)?;
    }
    loaded.vae = loaded.vae.with_tiling(vae_tiling(&args.vae_tiling)?);
    apply_loras(&args.lora, &mut loaded)?;
    // diffusers' default size: unet.sample_size x the VAE's scale factor.
    loaded.sample_size *= loaded.vae_factor();
    let _ = text_encoder_from_dir;
    Ok(loaded)
}

/// Merges `--lora PATH[:STRENGTH]` files into the U-Net and text encoder.
fn apply_loras(specs: &[String], loaded: &mut Loaded) -> Result<(), AnyError> {
    use stable_diffusion::io::{LoraComponent, LoraFile};
    use stable_diffusion::models::lora::{LoraMode, apply_lora};
    for spec in specs {
        let (path, strength) = match spec.rsplit_once(':') {
            Some((p, s)) if s.parse::<f32>().is_ok() => (p, s.parse::<f32>()?),
            _ => (spec.as_str(), 1.0),
        };
        let file = LoraFile::open(path)?;
        if file.has(LoraComponent::Unet) {
            let w = file.weights_for(LoraComponent::Unet, &loaded.unet)?;
            loaded.unet = apply_lora(loaded.unet.clone(), &[(&w, strength)], LoraMode::Merge)?;
        }
        if file.has(LoraComponent::TextEncoder) {
            let w = file.weights_for(LoraComponent::TextEncoder, &loaded.text_encoder)?;
            loaded.text_encoder = apply_lora(
                loaded.text_encoder.clone(),
                &[(&w, strength)],
                LoraMode::Merge,
            )?;
        }
        eprintln!("LoRA {path} merged at strength {strength}");
    }
    Ok(())
}

pub fn scheduler(args: &CommonArgs, loaded: &Loaded) -> Result<(AnyScheduler, String), AnyError> {
    let (s, label) = if let Some(path) = &args.scheduler_config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let s = AnyScheduler::from_json(&text)?;
        let class = s.class_name_str();
        (s, class)
    } else if let Some(name) = &args.scheduler {
        (
            AnyScheduler::from_name(name, &loaded.scheduler_config)?,
            name.clone(),
        )
    } else {
        let s = AnyScheduler::from_config(&loaded.scheduler_config)?;
        let class = s.class_name_str();
        (s, class)
    };
    let s = match args.ays.as_deref() {
        Some(p) => {
            let preset = AysPreset::from_name(p)
                .ok_or_else(|| format!("--ays {p}: expected sd15 or sdxl"))?;
            s.with_sigmas(SigmaSchedule::AlignYourSteps(preset))?
        }
        None => s,
    };
    Ok((s, label))
}

trait ClassName {
    fn class_name_str(&self) -> String;
}

impl ClassName for AnyScheduler {
    fn class_name_str(&self) -> String {
        use stable_diffusion::core::Scheduler;
        self.class_name().to_string()
    }
}

pub fn steps(args: &CommonArgs) -> Result<Steps, AnyError> {
    match (&args.timesteps, &args.sigmas) {
        (Some(_), Some(_)) => Err("--timesteps and --sigmas exclude each other".into()),
        (Some(t), None) => Ok(Steps::Timesteps(t.clone())),
        (None, Some(s)) => Ok(Steps::Sigmas(s.clone())),
        (None, None) => Ok(Steps::Count(args.steps)),
    }
}

fn read_tensor(path: &Path, key: &str, device: &Device) -> Result<Tensor<4>, AnyError> {
    let source = WeightSource::open(path)?;
    let t = source
        .get(key)
        .ok_or_else(|| format!("{}: no tensor `{key}`", path.display()))?;
    if t.shape.len() != 4 {
        return Err(format!(
            "{}: `{key}` has shape {:?}, 4 axes expected",
            path.display(),
            t.shape
        )
        .into());
    }
    let shape = t.shape.clone();
    let data = source.read_float(key, DType::F32, shape)?;
    Ok(Tensor::from_data(data, device))
}

pub fn options(
    args: &CommonArgs,
    loaded: &Loaded,
    device: &Device,
) -> Result<GenerationOptions, AnyError> {
    Ok(GenerationOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: steps(args)?,
        guidance_scale: args.guidance,
        width: args.width.unwrap_or(loaded.sample_size),
        height: args.height.unwrap_or(loaded.sample_size),
        clip_skip: args.clip_skip,
        batch_size: 1,
        init_latents: match &args.init_latents {
            Some(p) => Some(read_tensor(p, "latents", device)?),
            None => None,
        },
        long_prompts: args.long_prompts,
        prompt_weighting: args.prompt_weighting,
    })
}

pub fn noise(args: &CommonArgs, device: &Device) -> Result<Box<dyn NoiseSource>, AnyError> {
    match &args.noise {
        Some(path) => {
            let source = WeightSource::open(path)?;
            let mut tensors = Vec::new();
            for i in 0.. {
                let key = format!("noise_{i:03}");
                if source.get(&key).is_none() {
                    break;
                }
                tensors.push(read_tensor(path, &key, device)?);
            }
            Ok(Box::new(RecordedNoise::new(tensors)))
        }
        None => Ok(Box::new(NoiseRng::seed(args.seed))),
    }
}

pub fn progress(total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {elapsed_precise} ({per_sec})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

/// A step callback advancing `bar`.
pub fn on_step(bar: &ProgressBar) -> impl FnMut(&StepInfo<'_>) -> bool + '_ {
    move |info| {
        bar.set_length(info.total as u64);
        bar.set_position((info.step + 1) as u64);
        true
    }
}

pub fn save(
    args: &CommonArgs,
    loaded: &Loaded,
    sampler: &str,
    latents: &Tensor<4>,
    images: &Tensor<4>,
) -> Result<(), AnyError> {
    if let Some(path) = &args.save_latents {
        let [b, c, h, w] = latents.dims();
        let values = latents
            .to_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![b, c, h, w],
            &bytes,
        )?;
        safetensors::serialize_to_file([("latents", view)], None, path)?;
    }
    let [_, _, h, w] = images.dims();
    let params = GenerationParameters {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone().unwrap_or_default(),
        steps: args.steps,
        sampler: sampler.to_string(),
        cfg_scale: args.guidance,
        seed: args.seed,
        width: w,
        height: h,
        model: loaded.name.clone(),
    };
    stable_diffusion::io::image::save_png(images, 0, &args.out, Some(&params))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

pub fn core_err(e: CoreError) -> AnyError {
    Box::new(e)
}

/// The examples' `main`: the run's error as one line on stderr, and the exit code.
pub fn exit(result: Result<(), AnyError>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
