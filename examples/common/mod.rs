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
    /// For a single-file --model: a diffusers folder whose configs, tokenizers and
    /// scheduler describe it (diffusers' `from_single_file(config=...)`); SD 3's T5
    /// tokenizer comes from here, and components the file lacks too.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// For a single-file SD 3 / 3.5 --model without its text encoders: their files
    /// (ComfyUI's clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors),
    /// recognised from their tensors. Repeatable.
    #[arg(long = "text-encoder")]
    pub text_encoders: Vec<PathBuf>,
    /// What to draw.
    #[arg(long, default_value = "a red circle on a white background, top left")]
    pub prompt: String,
    /// What to avoid.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// SDXL: what the second text encoder reads (default: --prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// SDXL: the second encoder's negative prompt (default: --negative-prompt).
    #[arg(long)]
    pub negative_prompt_2: Option<String>,
    /// SD 3: what the T5 encoder reads (default: --prompt).
    #[arg(long)]
    pub prompt_3: Option<String>,
    /// SD 3: the T5 encoder's negative prompt (default: --negative-prompt).
    #[arg(long)]
    pub negative_prompt_3: Option<String>,
    /// SD 3: T5 tokens (diffusers' max_sequence_length, default 256, at most 512).
    #[arg(long)]
    pub max_sequence_length: Option<usize>,
    /// SD 3: the flow-matching shift of the model's scheduler (SD 3.5: 3.0).
    #[arg(long)]
    pub shift: Option<f64>,
    /// SD 3.5: skip-layer guidance over these transformer blocks, comma separated
    /// (SD 3.5 Medium: 7,8,9).
    #[arg(long, value_delimiter = ',')]
    pub skip_layer_guidance: Option<Vec<usize>>,
    /// Skip-layer guidance scale (default: diffusers' 2.8).
    #[arg(long)]
    pub slg_scale: Option<f64>,
    /// Skip-layer guidance from this fraction of the steps (default 0.01).
    #[arg(long)]
    pub slg_start: Option<f64>,
    /// Skip-layer guidance until this fraction of the steps (default 0.2).
    #[arg(long)]
    pub slg_stop: Option<f64>,
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
    /// A scheduler name of `sd_schedulers::SCHEDULER_NAMES` (ddim, euler, euler-a, dpmpp-2m-karras, ...; A1111 spellings too); default: the model's own.
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
    /// Output picture: PNG (with the parameters in a text chunk), or JPEG for a
    /// `.jpg` / `.jpeg` name.
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    /// Sign the pictures with C2PA content credentials (a manifest saying a trained
    /// algorithm made them, with the model and parameters): the PEM certificate
    /// chain, signing certificate first. Needs --c2pa-key and the `c2pa` feature.
    #[arg(long, requires = "c2pa_key")]
    pub c2pa_cert: Option<PathBuf>,
    /// The PEM (PKCS#8) private key of --c2pa-cert.
    #[arg(long, requires = "c2pa_cert")]
    pub c2pa_key: Option<PathBuf>,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A LoRA file (kohya or diffusers layout), optionally `PATH:STRENGTH`
    /// (default 1.0); repeatable. Merged into the weights at load.
    #[arg(long)]
    pub lora: Vec<String>,
    /// Half-precision weights. On the CPU every component's linear and convolution
    /// weights are stored f16 and computed in f32: half the memory at f32 speed. On
    /// GPUs the U-Net and text encoders run in f16 (T5 stays f32), the VAE too when
    /// its config says `force_upcast: false` (SDXL's fp16-fix VAE, e.g. `--vae
    /// sdxl-vae-fp16-fix`), else it stays f32.
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
    /// DDIM's eta (0: deterministic) or TCD's gamma (0.3 by default).
    #[arg(long)]
    pub eta: Option<f64>,
    /// Input images whose sides are not multiples of 8: error, resize or crop.
    #[arg(long, default_value = "error")]
    pub fit: String,
    /// Images per prompt, batched through the U-Net (seed + i for image i).
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// A tiny autoencoder (TAESD's diffusers folder, e.g. madebyollin/taesd): decodes
    /// the previews, and with `--vae-decoder tiny` the picture.
    #[arg(long)]
    pub tiny_vae: Option<PathBuf>,
    /// What decodes the picture: full (the VAE) or tiny (`--tiny-vae`, faster).
    #[arg(long, default_value = "full")]
    pub vae_decoder: String,
    /// No invisible watermark (SDXL's pictures carry one by default, as diffusers').
    #[arg(long, conflicts_with = "watermark")]
    pub no_watermark: bool,
    /// The invisible watermark in the pictures of any model (256x256 or more).
    #[arg(long)]
    pub watermark: bool,
    /// Do not run the model folder's safety checker (diffusers runs it on every SD
    /// 1.x/2.x picture and blacks out the flagged ones).
    #[arg(long)]
    pub no_safety_checker: bool,
    /// Write every Nth step's preview as a frame of `--preview-out`.
    #[arg(long, default_value_t = 1)]
    pub preview_every: usize,
    /// An animation of the denoising: .gif or .png (APNG), one frame per
    /// `--preview-every` steps (decoded by `--tiny-vae` when given).
    #[arg(long)]
    pub preview_out: Option<PathBuf>,
    /// Hires fix: generate at the size, then upscale by this factor and denoise again.
    #[arg(long)]
    pub hires_scale: Option<f64>,
    /// Hires fix: the share of the second pass that runs (A1111's denoising strength).
    #[arg(long, default_value_t = 0.7)]
    pub hires_strength: f64,
    /// Hires fix: steps of the second pass (default: --steps).
    #[arg(long)]
    pub hires_steps: Option<usize>,
    /// Hires fix upscaler: latent, latent-nearest, latent-bicubic or lanczos.
    #[arg(long, default_value = "latent")]
    pub hires_upscaler: String,
    /// SDXL micro-conditioning: the original size, HEIGHT,WIDTH (default: the size).
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    pub original_size: Option<Vec<usize>>,
    /// SDXL micro-conditioning: the target size, HEIGHT,WIDTH (default: the size).
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    pub target_size: Option<Vec<usize>>,
    /// SDXL micro-conditioning: the crop's top-left corner, TOP,LEFT (default 0,0).
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    pub crops_coords: Option<Vec<usize>>,
    /// SDXL micro-conditioning of the negative half: the original size, HEIGHT,WIDTH
    /// (text to image: used together with --negative-target-size).
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    pub negative_original_size: Option<Vec<usize>>,
    /// SDXL micro-conditioning of the negative half: the target size, HEIGHT,WIDTH.
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    pub negative_target_size: Option<Vec<usize>>,
    /// SDXL micro-conditioning of the negative half: the crop corner, TOP,LEFT.
    #[arg(long, value_delimiter = ',', num_args = 1..=2)]
    pub negative_crops_coords: Option<Vec<usize>>,
    /// SDXL refiner: the aesthetic score (6.0) and, with guidance, the negative one.
    #[arg(long, default_value_t = 6.0)]
    pub aesthetic_score: f64,
    /// SDXL refiner: the negative aesthetic score.
    #[arg(long, default_value_t = 2.5)]
    pub negative_aesthetic_score: f64,
}

/// A flag of two numbers, given as `A,B` or `A B`.
fn pair(v: &Option<Vec<usize>>, flag: &str) -> Result<Option<(usize, usize)>, AnyError> {
    match v.as_deref() {
        None => Ok(None),
        Some(&[a, b]) => Ok(Some((a, b))),
        Some(other) => Err(format!("--{flag}: expected two numbers, A,B; got {other:?}").into()),
    }
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
    let device = named_device(name)?;
    stable_diffusion::core::check_device(&device)?;
    Ok(device)
}

fn named_device(name: &str) -> Result<Device, AnyError> {
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

/// The signer of `--c2pa-cert` / `--c2pa-key` (checked by signing a probe).
#[cfg(feature = "c2pa")]
pub type Credentials = stable_diffusion::io::content_credentials::ContentCredentials;
/// No signer without the `c2pa` feature.
#[cfg(not(feature = "c2pa"))]
pub type Credentials = std::convert::Infallible;

/// The content credentials the flags ask for, if any.
pub fn content_credentials(args: &CommonArgs) -> Result<Option<Credentials>, AnyError> {
    let (Some(cert), Some(key)) = (&args.c2pa_cert, &args.c2pa_key) else {
        return Ok(None);
    };
    #[cfg(feature = "c2pa")]
    return Ok(Some(Credentials::from_files(cert, key)?.with_generator(
        concat!("stable-diffusion ", env!("CARGO_CRATE_NAME"), " example"),
        env!("CARGO_PKG_VERSION"),
    )));
    #[cfg(not(feature = "c2pa"))]
    Err(format!(
        "--c2pa-cert {} --c2pa-key {}: the examples were built without the `c2pa` feature \
         (cargo run --release --features c2pa --example ...)",
        cert.display(),
        key.display()
    )
    .into())
}

/// The pipeline the flags describe: `--model`, `--unet`, `--vae`, `--f16`,
/// `--lora`, `--vae-tiling`.
pub fn load(args: &CommonArgs, device: &Device) -> Result<StableDiffusionPipeline, AnyError> {
    // Content credentials are checked before any weight is read.
    content_credentials(args)?;
    let options = LoadOptions {
        unet_dtype: args.f16.then_some(DType::F16),
        text_encoder_dtype: args.f16.then_some(DType::F16),
        vae_dtype: args.f16.then_some(DType::F16),
        unet: args.unet.clone(),
        vae: args.vae.clone(),
        vae_tiling: vae_tiling(&args.vae_tiling)?,
        loras: args.lora.iter().map(|s| LoraSpec::parse(s)).collect(),
        tiny_vae: args.tiny_vae.clone(),
        watermark: match (args.watermark, args.no_watermark) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        safety_checker: args.no_safety_checker.then_some(false),
        config: args.config.clone(),
        text_encoder_files: args.text_encoders.clone(),
        ..Default::default()
    };
    // A folder, a file, or (with the `hub` feature) a hub repository id.
    let source = ModelSource::parse(&model_path(args).to_string_lossy());
    let pipe = StableDiffusionPipeline::from_pretrained(source, device, &options)?;
    if args.no_watermark && pipe.family() == stable_diffusion::pipelines::ModelFamily::Sdxl {
        eprintln!("the invisible watermark is off: these SDXL pictures carry no provenance mark");
    }
    if args.no_safety_checker {
        eprintln!(
            "the safety checker is off, as asked: pictures are not checked (see docs/responsible-use.md)"
        );
    }
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
    if let Some(p) = &args.prompt_2 {
        r = r.prompt_2(p.clone());
    }
    if let Some(n) = &args.negative_prompt_2 {
        r = r.negative_prompt_2(n.clone());
    }
    if let Some(p) = &args.prompt_3 {
        r = r.prompt_3(p.clone());
    }
    if let Some(n) = &args.negative_prompt_3 {
        r = r.negative_prompt_3(n.clone());
    }
    if let Some(n) = args.max_sequence_length {
        r = r.max_sequence_length(n);
    }
    if let Some(s) = args.shift {
        r = r.shift(s);
    }
    if let Some(layers) = &args.skip_layer_guidance {
        r = r.skip_layer_guidance(SkipLayerGuidance::with_settings(
            layers.clone(),
            args.slg_scale,
            args.slg_start,
            args.slg_stop,
        ));
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
        r = r.noise(stable_diffusion::io::read_recorded_noise(path, device)?);
    }
    r = r.tiny_decoder(match args.vae_decoder.as_str() {
        "full" => false,
        "tiny" => true,
        o => return Err(format!("--vae-decoder {o}: expected full or tiny").into()),
    });
    r = r.micro_conditioning(stable_diffusion::pipelines::MicroConditioning {
        original_size: pair(&args.original_size, "original-size")?,
        target_size: pair(&args.target_size, "target-size")?,
        crops_coords_top_left: pair(&args.crops_coords, "crops-coords")?.unwrap_or((0, 0)),
        negative_original_size: pair(&args.negative_original_size, "negative-original-size")?,
        negative_target_size: pair(&args.negative_target_size, "negative-target-size")?,
        negative_crops_coords_top_left: pair(&args.negative_crops_coords, "negative-crops-coords")?
            .unwrap_or((0, 0)),
        aesthetic_score: args.aesthetic_score,
        negative_aesthetic_score: args.negative_aesthetic_score,
    });
    if let Some(scale) = args.hires_scale {
        r = r.hires_fix(HiresFix {
            scale,
            strength: args.hires_strength,
            steps: args.hires_steps,
            upscaler: match args.hires_upscaler.as_str() {
                "latent" => HiresUpscaler::Latent,
                "latent-nearest" => HiresUpscaler::LatentNearest,
                "latent-bicubic" => HiresUpscaler::LatentBicubic,
                "lanczos" => HiresUpscaler::Lanczos,
                o => {
                    return Err(format!(
                        "--hires-upscaler {o}: expected latent, latent-nearest, latent-bicubic or lanczos"
                    )
                    .into());
                }
            },
        });
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

/// A step callback advancing `bar` and recording preview frames.
pub fn on_step<'a>(
    bar: &'a ProgressBar,
    frames: &'a PreviewFrames,
) -> impl FnMut(&StepInfo<'_>) -> bool + 'a {
    move |info| {
        bar.set_length(info.total as u64);
        bar.set_position((info.step + 1) as u64);
        frames.record(info);
        true
    }
}

/// The frames of `--preview-out`: every `--preview-every`th step's preview (and the
/// last step's), the first image of the batch.
pub struct PreviewFrames {
    every: usize,
    out: Option<PathBuf>,
    frames: std::cell::RefCell<Vec<stable_diffusion::image::RgbImage>>,
}

impl PreviewFrames {
    pub fn new(args: &CommonArgs) -> Self {
        Self {
            every: args.preview_every.max(1),
            out: args.preview_out.clone(),
            frames: Default::default(),
        }
    }

    fn record(&self, info: &StepInfo<'_>) {
        let n = info.step + 1;
        if self.out.is_none() || !(n.is_multiple_of(self.every) || n == info.total) {
            return;
        }
        let preview = info.preview();
        let [b, c, h, w] = preview.dims();
        let first = preview.slice([0..b.min(1), 0..c, 0..h, 0..w]);
        if let Some(frame) = stable_diffusion::io::image::tensor_to_images(&first).pop() {
            self.frames.borrow_mut().push(frame);
        }
    }

    /// Writes the animation (frames scaled to the last one's size), if asked for.
    pub fn save(&self) -> Result<(), AnyError> {
        use stable_diffusion::image::imageops::{FilterType, resize};
        let Some(path) = &self.out else {
            return Ok(());
        };
        let frames = self.frames.borrow();
        let Some(last) = frames.last() else {
            return Err("--preview-out: no step was run".into());
        };
        let (w, h) = last.dimensions();
        let frames: Vec<_> = frames
            .iter()
            .map(|f| {
                if f.dimensions() == (w, h) {
                    f.clone()
                } else {
                    resize(f, w, h, FilterType::Nearest)
                }
            })
            .collect();
        let delay = 150;
        match path.extension().and_then(|e| e.to_str()) {
            Some("gif") => stable_diffusion::io::image::save_gif(path, &frames, delay)?,
            _ => {
                let raw: Vec<_> = frames
                    .iter()
                    .map(|f| (w as usize, h as usize, f.as_raw().clone()))
                    .collect();
                stable_diffusion::io::image::save_apng(path, &raw, delay, None)?;
            }
        }
        eprintln!("wrote {} ({} frames)", path.display(), frames.len());
        Ok(())
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
    let credentials = content_credentials(args)?;
    for (i, picture) in out.images.iter().enumerate() {
        let path = if i == 0 {
            args.out.clone()
        } else {
            let stem = args.out.with_extension("");
            let ext = args
                .out
                .extension()
                .and_then(|e| e.to_str())
                .unwrap_or("png");
            PathBuf::from(format!("{}-{i}.{ext}", stem.display()))
        };
        match &credentials {
            #[cfg(feature = "c2pa")]
            Some(c) => picture.save_signed(&path, c)?,
            #[cfg(not(feature = "c2pa"))]
            Some(never) => match *never {},
            None => picture.save(&path)?,
        }
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
