//! What the generation examples share: the common flags turned into the library's
//! `LoadOptions` and `GenerationRequest`, the progress bar and the output. Everything
//! else is the public API of `stable_diffusion`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use stable_diffusion::burn::tensor::DType;
use stable_diffusion::io::WeightSource;
use stable_diffusion::prelude::*;

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
    /// Diffusers folder, single-file .safetensors checkpoint, or (built with `--features
    /// hub`) a hub repository id such as stable-diffusion-v1-5/stable-diffusion-v1-5
    /// (default: the demo model).
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
    /// ddim, euler, euler-a, dpmpp-2m, dpmpp-2m-karras, lms, pndm, lcm (default: the model's own).
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
    /// (default 1.0); repeatable. Merged into the weights at load.
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
    /// DDIM's eta (0: deterministic).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Input images whose sides are not multiples of 8: error, resize or crop.
    #[arg(long, default_value = "error")]
    pub fit: String,
    /// Images per prompt, batched through the U-Net (seed + i for image i).
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
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

/// The model the flags name (the demo model without `--model`).
pub fn model_path(args: &CommonArgs) -> PathBuf {
    match &args.model {
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
    }
}

/// The pipeline the flags describe: `--model`, `--unet`, `--vae`, `--f16`,
/// `--lora`, `--vae-tiling`.
pub fn load(args: &CommonArgs, device: &Device) -> Result<StableDiffusionPipeline, AnyError> {
    let options = LoadOptions {
        unet_dtype: args.f16.then_some(DType::F16),
        unet: args.unet.clone(),
        vae: args.vae.clone(),
        vae_tiling: vae_tiling(&args.vae_tiling)?,
        loras: args.lora.iter().map(|s| LoraSpec::parse(s)).collect(),
        ..Default::default()
    };
    // A folder, a file, or (with the `hub` feature) a hub repository id.
    let source = ModelSource::parse(&model_path(args).to_string_lossy());
    let pipe = StableDiffusionPipeline::from_pretrained(source, device, &options)?;
    for lora in &options.loras {
        eprintln!(
            "LoRA {} merged at strength {}",
            lora.path.display(),
            lora.strength
        );
    }
    Ok(pipe)
}

/// The request the flags describe (prompt, steps, scheduler, size, seed, noise, ...);
/// the examples add their task's inputs and the progress callback.
pub fn request(
    args: &CommonArgs,
    pipe: &StableDiffusionPipeline,
) -> Result<GenerationRequest<'static>, AnyError> {
    let device = pipe.device();
    let side = pipe.default_size();
    let mut r = GenerationRequest::new(args.prompt.clone())
        .schedule(steps(args)?)
        .guidance(args.guidance)
        .seed(args.seed)
        .num_images(args.num_images)
        .long_prompts(args.long_prompts)
        .prompt_weighting(args.prompt_weighting)
        .size_mode(match args.fit.as_str() {
            "error" => SizeMode::Exact,
            "resize" => SizeMode::Resize,
            "crop" => SizeMode::Crop,
            o => return Err(format!("--fit {o}: expected error, resize or crop").into()),
        });
    if let Some(n) = &args.negative_prompt {
        r = r.negative_prompt(n.clone());
    }
    if args.width.is_some() || args.height.is_some() {
        r = r.size(args.width.unwrap_or(side), args.height.unwrap_or(side));
    }
    if let Some(k) = args.clip_skip {
        r = r.clip_skip(k);
    }
    if let Some(path) = &args.scheduler_config {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        r = r.scheduler_choice(SchedulerChoice::Config(text));
    } else if let Some(name) = &args.scheduler {
        r = r.scheduler(name.clone());
    }
    if let Some(p) = &args.ays {
        let preset =
            AysPreset::from_name(p).ok_or_else(|| format!("--ays {p}: expected sd15 or sdxl"))?;
        r = r.sigma_schedule(SigmaSchedule::AlignYourSteps(preset));
    }
    if let Some(eta) = args.eta {
        r = r.eta(eta);
    }
    if let Some(p) = &args.init_latents {
        r = r.init_latents(read_tensor(p, "latents", device)?);
    }
    if let Some(path) = &args.noise {
        r = r.noise(recorded_noise(path, device)?);
    }
    Ok(r)
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

/// Recorded noise (`noise_000`, `noise_001`, ...) replayed in draw order.
fn recorded_noise(path: &Path, device: &Device) -> Result<RecordedNoise, AnyError> {
    let source = WeightSource::open(path)?;
    let mut tensors = Vec::new();
    for i in 0.. {
        let key = format!("noise_{i:03}");
        if source.get(&key).is_none() {
            break;
        }
        tensors.push(read_tensor(path, &key, device)?);
    }
    Ok(RecordedNoise::new(tensors))
}

pub fn progress() -> ProgressBar {
    let bar = ProgressBar::new(0);
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

/// Writes `--save-latents` and the pictures: `--out` for the first, `-1`, `-2`, ...
/// before the extension for the others.
pub fn save(args: &CommonArgs, out: &Generation) -> Result<(), AnyError> {
    if let Some(path) = &args.save_latents {
        let [b, c, h, w] = out.latents.dims();
        let values = out
            .latents
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
    for (i, picture) in out.images.iter().enumerate() {
        let path = if i == 0 {
            args.out.clone()
        } else {
            let stem = args.out.with_extension("");
            PathBuf::from(format!("{}-{i}.png", stem.display()))
        };
        picture.save(&path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
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
