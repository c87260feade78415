//! Speed and memory of the Stable Diffusion components at real sizes.
//!
//! ```text
//! cargo run --release --example bench -- --config tests/fixtures/configs/sd15 --component all --json
//! cargo run --release --example bench -- --model weights/sd15 --component unet --runs 5
//! ```
//!
//! With `--config` the models are built from `config.json` files with random weights
//! (no weight files needed); with `--model` real weights are loaded. Each component
//! is warmed up once, then timed `--runs` times (after `device.sync()`); the figures
//! are min / median / max seconds, the process's peak resident memory and `load_s`,
//! the time loading the weights took (with `--config`, parameters are initialised
//! lazily on first use, so that figure is near zero and the warm-up pays for it).
//! `--profile` adds the time per run spent in each CPU kernel.
//! U-Net: batch `--batch` (2 = classifier-free guidance), latents 4 x H/8 x W/8,
//! context batch x 77 x cross_attention_dim, t = 500. VAE: decode 1 x 4 x H/8 x W/8.
//! Text encoder: 1 x 77. `picture`: one picture through `StableDiffusionPipeline` with
//! `--scheduler`, `--steps`, `--guidance`, `--lora`, `--tiny-vae` / `--tiny-decoder`
//! (docs/performance.md's seconds-per-picture table). `taesd`: the tiny autoencoder's
//! decode of 1 x 4 x H/8 x W/8 (a live preview's cost per step).

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use stable_diffusion::burn::module::Module;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::burn::tensor::DType;
use stable_diffusion::core::{Autoencoder, HiddenLayer, NoiseRng, Steps};
use stable_diffusion::io::model::{read_text_encoder_config, read_unet_config, read_vae_config};
use stable_diffusion::io::{ClipTokenizer, ComponentOptions, DiffusersDir};
use stable_diffusion::models::{AutoencoderKL, ClipTextModel, UNet2DConditionModel};
use stable_diffusion::pipelines::{GenerationOptions, StableDiffusion};
use stable_diffusion::schedulers::{AnyScheduler, SchedulerConfig};

#[derive(Parser)]
#[command(about = "Benchmark the Stable Diffusion components")]
struct Args {
    /// A folder of config.json files (random weights).
    #[arg(long, conflicts_with = "model")]
    config: Option<PathBuf>,
    /// A diffusers folder with weights.
    #[arg(long)]
    model: Option<PathBuf>,
    /// unet, vae, text_encoder, pipeline, all; picture (seconds per picture through
    /// the owning pipeline, `--model`); taesd (the tiny autoencoder's decode); write
    /// (a random-weight diffusers folder from `--config` at `--out`); transformer
    /// (an SD 3 folder's `transformer/`: one step of `--batch` latents 16 x H/8 x
    /// W/8 with 333 text tokens, as `benches/pytorch_sd3_transformer.py` times it).
    #[arg(long, default_value = "all")]
    component: String,
    /// U-Net batch (2 = CFG).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 512)]
    width: usize,
    /// Pipeline steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Timed runs after one warm-up.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Half-precision weights: the U-Net and text encoder components, and every
    /// component of `picture` (on the CPU the weights alone, computing in f32).
    #[arg(long)]
    f16: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// VAE tiling: auto (above 1024x1024 pixels), on or off.
    #[arg(long, default_value = "auto")]
    vae_tiling: String,
    /// Also print the time per run spent in each CPU kernel (attention, Winograd
    /// and im2col convolutions, linear layers, GroupNorm) and outside them.
    #[arg(long)]
    profile: bool,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// `picture`: the scheduler by name (default: the model's).
    #[arg(long)]
    scheduler: Option<String>,
    /// `picture`: a scheduler_config.json instead of a name.
    #[arg(long)]
    scheduler_config: Option<PathBuf>,
    /// `picture`: classifier-free guidance scale (<= 1: one U-Net pass per step).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// `picture` / `taesd`: a tiny autoencoder folder (TAESD; `taesd` without it
    /// builds one with random weights from `--taesd-config`).
    #[arg(long)]
    tiny_vae: Option<PathBuf>,
    /// `taesd`: a TAESD config.json (random weights).
    #[arg(long)]
    taesd_config: Option<PathBuf>,
    /// `picture`: decode with the tiny autoencoder.
    #[arg(long)]
    tiny_decoder: bool,
    /// `picture`: a LoRA merged at load (`PATH[:STRENGTH]`), repeatable.
    #[arg(long)]
    lora: Vec<String>,
    /// `picture`: several sizes in one process (`512,1024` or `768x512,...`), each
    /// warmed up and timed in turn; default `--width` x `--height`. Each also times a
    /// one-step picture, so the step rate is (steps - 1) / (time - one-step time).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<String>,
    /// `write`: the diffusers folder to write (random weights from `--config`, f16
    /// with `--f16`), for `picture` to load where no real weights can travel.
    #[arg(long)]
    out: Option<PathBuf>,
    /// `write`: a folder with the tokenizer's `vocab.json` and `merges.txt` (the
    /// CLIP BPE files, e.g. tests/fixtures/tokenizer), copied next to each
    /// `tokenizer_config.json` of `--config`.
    #[arg(long)]
    tokenizer_files: Option<PathBuf>,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn time(device: &Device, runs: usize, f: impl FnMut()) -> Vec<f64> {
    time_after(device, 1, runs, f)
}

fn time_after(device: &Device, warmup: usize, runs: usize, mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..warmup {
        f();
    }
    let _ = device.sync();
    #[cfg(feature = "flex")]
    stable_diffusion::kernels::profile::reset();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            let _ = device.sync();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// Runs `f` and returns its value with the seconds it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed().as_secs_f64())
}

/// Prints one component's figures; `load_s` is the time its loading (`--model`) or
/// construction (`--config`: lazy, so near zero) took.
fn report(args: &Args, component: &str, times: Vec<f64>, dtype: &str, load_s: f64) {
    let extra = serde_json::json!({"height": args.height, "width": args.width});
    report_with(args, component, times, dtype, load_s, extra);
}

/// [`report`] with the row's own fields (`extra`, a JSON object: its size, and e.g.
/// a picture's one-step time), added to the JSON row or printed after the text line.
fn report_with(
    args: &Args,
    component: &str,
    mut times: Vec<f64>,
    dtype: &str,
    load_s: f64,
    extra: serde_json::Value,
) {
    times.sort_by(|a, b| a.total_cmp(b));
    let (min, max) = (times[0], times[times.len() - 1]);
    let median = times[times.len() / 2];
    let rss = peak_rss_mb();
    let kernels = kernel_times(args, &times);
    if args.json {
        let mut row = serde_json::json!({
            "component": component, "median_s": median, "min_s": min, "max_s": max,
            "peak_rss_mb": rss, "device": args.device, "dtype": dtype, "load_s": load_s,
            "batch": args.batch, "runs": times.len(),
        });
        if let (Some(row), Some(extra)) = (row.as_object_mut(), extra.as_object()) {
            row.extend(extra.clone());
        }
        println!("{row}");
    } else {
        println!(
            "{component:<13} median {median:8.3} s  min {min:8.3} s  max {max:8.3} s  peak RSS {rss:8.0} MB  load {load_s:6.2} s  ({}, {dtype})",
            args.device
        );
        for (k, v) in extra.as_object().into_iter().flatten() {
            if !matches!(k.as_str(), "height" | "width") {
                println!("  {k} {v}");
            }
        }
    }
    for (name, calls, seconds) in kernels {
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "component": component, "kernel": name, "calls_per_run": calls, "s_per_run": seconds,
                })
            );
        } else {
            println!("  {name:<20} {seconds:8.3} s per run  ({calls:.0} calls)");
        }
    }
}

/// With `--profile`: (kernel, calls per run, seconds per run) for the timed runs,
/// plus the time outside the kernels; empty otherwise.
fn kernel_times(args: &Args, times: &[f64]) -> Vec<(String, f64, f64)> {
    if !args.profile {
        return Vec::new();
    }
    #[cfg(feature = "flex")]
    {
        let runs = times.len() as f64;
        let mut rows: Vec<(String, f64, f64)> = stable_diffusion::kernels::profile::report()
            .into_iter()
            .map(|k| {
                (
                    k.name.to_string(),
                    k.calls as f64 / runs,
                    k.total.as_secs_f64() / runs,
                )
            })
            .collect();
        let inside: f64 = rows.iter().map(|r| r.2).sum();
        let per_run = times.iter().sum::<f64>() / runs;
        rows.push(("outside_kernels".into(), 0.0, per_run - inside));
        rows
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = times;
        Vec::new()
    }
}

fn run(args: Args) -> Result<(), common::AnyError> {
    let device = common::device(&args.device)?;
    #[cfg(feature = "flex")]
    stable_diffusion::kernels::profile::enable(args.profile);
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    if !args.height.is_multiple_of(8) || !args.width.is_multiple_of(8) {
        return Err("--height and --width must be multiples of 8".into());
    }
    if args.component == "taesd" {
        return taesd(&args, &device);
    }
    let dir = match (&args.config, &args.model) {
        (Some(c), None) => c.clone(),
        (None, Some(m)) => m.clone(),
        _ => return Err("give --config DIR or --model DIR".into()),
    };
    if args.component == "picture" {
        return picture(&args, &device, &dir);
    }
    if args.component == "transformer" {
        return sd3_transformer(&args, &device, &dir);
    }
    if args.component == "write" {
        return write_random(&args, &dir);
    }
    let real = args.model.is_some();
    let half = if args.f16 { Some(DType::F16) } else { None };
    let dtype_name = if args.f16 { "f16" } else { "f32" };
    let want = |c: &str| args.component == "all" || args.component == c;
    let d = DiffusersDir::open(&dir)?;
    let cast = |dt: Option<DType>| dt.map(stable_diffusion::io::CastParameters::new);

    let load_unet = || -> Result<UNet2DConditionModel, common::AnyError> {
        Ok(if real {
            d.unet(
                &device,
                &ComponentOptions {
                    dtype: half,
                    ..Default::default()
                },
            )?
        } else {
            let m = UNet2DConditionModel::new(
                &read_unet_config(&dir.join("unet/config.json"))?,
                &device,
            )?;
            match cast(half) {
                Some(mut c) => m.map(&mut c),
                None => m,
            }
        })
    };
    let tiling = common::vae_tiling(&args.vae_tiling)?;
    let load_vae = || -> Result<AutoencoderKL, common::AnyError> {
        Ok(if real {
            d.vae(&device, &ComponentOptions::default())?
        } else {
            AutoencoderKL::new(&read_vae_config(&dir.join("vae/config.json"))?, &device)?
        }
        .with_tiling(tiling))
    };
    let load_te = || -> Result<ClipTextModel, common::AnyError> {
        Ok(if real {
            d.text_encoder(&device, &ComponentOptions::default())?
        } else {
            ClipTextModel::new(
                &read_text_encoder_config(&dir.join("text_encoder/config.json"))?,
                &device,
            )?
        })
    };
    let (lh, lw) = (args.height / 8, args.width / 8);

    if want("text_encoder") {
        let (te, load_s) = timed(load_te);
        let te = te?;
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![49406i64; 77], [1, 77]), &device);
        let t = time(&device, args.runs, || {
            let _ = te
                .forward_unchecked(ids.clone(), HiddenLayer::Last)
                .hidden_states
                .into_data();
        });
        report(&args, "text_encoder", t, "f32", load_s);
    }
    if want("text_encoder_2") || (want("text_encoder") && dir.join("text_encoder_2").exists()) {
        // SDXL's second encoder (OpenCLIP bigG with its projection).
        let (te, load_s) = timed(|| -> Result<ClipTextModel, common::AnyError> {
            Ok(if real {
                d.text_encoder_2(&device, &ComponentOptions::default())?
            } else {
                ClipTextModel::new(&d.text_encoder_2_config()?, &device)?
            })
        });
        let te = te?;
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(vec![49406i64; 77], [1, 77]), &device);
        let t = time(&device, args.runs, || {
            let _ = te
                .forward_unchecked(ids.clone(), HiddenLayer::SkipRaw(1))
                .hidden_states
                .into_data();
        });
        report(&args, "text_encoder_2", t, "f32", load_s);
    }
    if want("unet") {
        let (unet, load_s) = timed(load_unet);
        let unet = unet?;
        let cross = stable_diffusion::core::Denoiser::cross_attention_dim(&unet);
        let b = args.batch;
        let x = NoiseRng::seed(0).normal_tensor([b, 4, lh, lw], &device);
        let ctx = Tensor::<3>::zeros([b, 77, cross], &device);
        let ts = Tensor::<1>::full([b], 500.0, &device);
        // SDXL: the pooled embedding and the time ids too.
        let added = match stable_diffusion::core::Denoiser::text_time_dims(&unet) {
            Some(dims) => {
                let pooled = dims.input_dim - 6 * dims.time_embed_dim;
                let (h, w) = (args.height as f32, args.width as f32);
                stable_diffusion::core::AddedConditioning {
                    text_embeds: Some(Tensor::zeros([b, pooled], &device)),
                    time_ids: Some(
                        Tensor::<1>::from_floats([h, w, 0.0, 0.0, h, w], &device)
                            .reshape([1, 6])
                            .repeat_dim(0, b),
                    ),
                    ..Default::default()
                }
            }
            None => Default::default(),
        };
        let t = time(&device, args.runs, || {
            let _ = unet
                .forward_added_with_intermediates(
                    x.clone(),
                    ts.clone(),
                    ctx.clone(),
                    &added,
                    |_, _| {},
                )
                .into_data();
        });
        report(&args, "unet", t, dtype_name, load_s);
    }
    if want("vae") {
        let (vae, load_s) = timed(load_vae);
        let vae = vae?;
        let z = NoiseRng::seed(1).normal_tensor([1, 4, lh, lw], &device);
        let t = time(&device, args.runs, || {
            let _ = vae.decode(z.clone()).map(|x| x.into_data());
        });
        report(&args, "vae", t, "f32", load_s);
    }
    if want("pipeline") {
        let ((unet, vae, te), load_s) = timed(|| (load_unet(), load_vae(), load_te()));
        let (unet, vae, te) = (unet?, vae?, te?);
        let tokenizer = if dir.join("tokenizer").exists() && real {
            d.tokenizer()?
        } else {
            let pad = if stable_diffusion::core::TextEncoder::hidden_size(&te) == 1024 {
                "!"
            } else {
                "<|endoftext|>"
            };
            ClipTokenizer::clip(pad)?
        };
        let sched_text = std::fs::read_to_string(dir.join("scheduler/scheduler_config.json"))
            .unwrap_or_else(|_| {
                stable_diffusion::io::model::builtin_configs::SD15_SCHEDULER.to_string()
            });
        let scheduler = AnyScheduler::from_config(&SchedulerConfig::from_json(&sched_text)?)?;
        let sd = StableDiffusion {
            conditioner: stable_diffusion::pipelines::TextConditioner::clip(&tokenizer, &te),
            unet: &unet,
            vae: &vae,
            decoder: None,
            preview_decoder: None,
            watermark: None,
            scheduler: &scheduler,
            controlnets: Vec::new(),
            adapters: Vec::new(),
            device: device.clone(),
        };
        let options = GenerationOptions {
            prompt: "a photograph of an astronaut riding a horse".into(),
            steps: Steps::Count(args.steps),
            width: args.width,
            height: args.height,
            ..Default::default()
        };
        let mut failure = None;
        let t = time(&device, args.runs, || {
            if let Err(e) = sd
                .txt2img(&options, &mut NoiseRng::seed(0), None)
                .map(|o| o.images.into_data())
            {
                failure = Some(e);
            }
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        report(&args, "pipeline", t, dtype_name, load_s);
    }
    Ok(())
}

/// Seconds per picture through the owning pipeline (`--component picture`): prompt
/// encoding, every step and the decode, loading excluded.
fn picture(args: &Args, device: &Device, dir: &std::path::Path) -> Result<(), common::AnyError> {
    use stable_diffusion::prelude::{
        GenerationRequest, LoadOptions, LoraSpec, SchedulerChoice, StableDiffusionPipeline,
    };
    let options = LoadOptions {
        unet_dtype: args.f16.then_some(DType::F16),
        text_encoder_dtype: args.f16.then_some(DType::F16),
        vae_dtype: args.f16.then_some(DType::F16),
        tiny_vae: args.tiny_vae.clone(),
        loras: args.lora.iter().map(|s| LoraSpec::parse(s)).collect(),
        vae_tiling: common::vae_tiling(&args.vae_tiling)?,
        ..Default::default()
    };
    let (pipe, load_s) = timed(|| StableDiffusionPipeline::from_pretrained(dir, device, &options));
    let pipe = pipe?;
    let choice = match (&args.scheduler_config, &args.scheduler) {
        (Some(p), _) => Some(SchedulerChoice::Config(std::fs::read_to_string(p)?)),
        (None, Some(n)) => Some(SchedulerChoice::Name(n.clone())),
        (None, None) => None,
    };
    let request = |steps: usize| {
        let r = GenerationRequest::new("a photograph of an astronaut riding a horse")
            .size(args.width, args.height)
            .steps(steps)
            .guidance(args.guidance)
            .seed(0)
            .tiny_decoder(args.tiny_decoder);
        match &choice {
            Some(c) => r.scheduler_choice(c.clone()),
            None => r,
        }
    };
    let sizes = if args.sizes.is_empty() {
        vec![(args.width, args.height)]
    } else {
        args.sizes
            .iter()
            .map(|s| parse_size(s))
            .collect::<Result<Vec<_>, _>>()?
    };
    for (width, height) in sizes {
        let request = |steps: usize| request(steps).size(width, height);
        pipe.validate(&request(args.steps))?;
        // Warm-up runs take one step (as the PyTorch side's), then the timed runs.
        for _ in 0..args.warmup {
            pipe.generate(request(1))?;
        }
        let mut failure = None;
        let mut run = |steps: usize, runs: usize| {
            time_after(device, 0, runs, || {
                if let Err(e) = pipe.generate(request(steps)) {
                    failure = Some(e);
                }
            })
        };
        let one_step = run(1, 1)[0];
        let t = run(args.steps, args.runs);
        if let Some(e) = failure {
            return Err(e.into());
        }
        let dtype = if args.f16 { "f16" } else { "f32" };
        if !args.json {
            println!("{width}x{height}, {} steps:", args.steps);
        }
        let extra = serde_json::json!({
            "height": height, "width": width, "steps": args.steps, "one_step_s": one_step,
        });
        report_with(args, "picture", t, dtype, load_s, extra);
    }
    Ok(())
}

/// `512` (square) or `768x512` (width x height), multiples of 8.
fn parse_size(s: &str) -> Result<(usize, usize), common::AnyError> {
    let parse = |v: &str| -> Result<usize, common::AnyError> {
        let n: usize = v
            .trim()
            .parse()
            .map_err(|_| format!("--sizes: `{s}` is not a size"))?;
        if n == 0 || !n.is_multiple_of(8) {
            return Err(format!("--sizes: `{s}`: sizes are positive multiples of 8").into());
        }
        Ok(n)
    };
    match s.split_once('x') {
        Some((w, h)) => Ok((parse(w)?, parse(h)?)),
        None => parse(s).map(|n| (n, n)),
    }
}

/// `--component write`: every component of `--config` with random weights, written
/// as a diffusers folder at `--out` (built on the CPU; f16 files with `--f16`), the
/// configs, scheduler and tokenizer files copied, so that `picture` can time loading
/// and whole pictures at real sizes without real weights.
fn write_random(args: &Args, config: &std::path::Path) -> Result<(), common::AnyError> {
    use stable_diffusion::io::save::{save_text_encoder, save_unet, save_vae};
    let out = args.out.as_ref().ok_or("write: give --out DIR")?;
    let vocab = args
        .tokenizer_files
        .as_ref()
        .ok_or("write: give --tokenizer-files DIR (vocab.json, merges.txt)")?;
    let cpu = Device::flex();
    let d = DiffusersDir::open(config)?;
    let dtype = if args.f16 { DType::F16 } else { DType::F32 };
    let (_, seconds) = timed(|| -> Result<(), common::AnyError> {
        let unet_config = d.unet_config()?;
        let unet = UNet2DConditionModel::new(&unet_config, &cpu)?;
        save_unet(&unet, &unet_config, out.join("unet"), dtype)?;
        drop(unet);
        let vae_config = d.vae_config()?;
        let vae = AutoencoderKL::new(&vae_config, &cpu)?;
        save_vae(&vae, &vae_config, out.join("vae"), dtype)?;
        for name in ["text_encoder", "text_encoder_2"] {
            if !config.join(name).join("config.json").exists() {
                continue;
            }
            let te_config = read_text_encoder_config(&config.join(name).join("config.json"))?;
            let te = ClipTextModel::new(&te_config, &cpu)?;
            save_text_encoder(&te, &te_config, out.join(name), dtype)?;
        }
        for name in ["scheduler", "tokenizer", "tokenizer_2"] {
            let from = config.join(name);
            if !from.is_dir() {
                continue;
            }
            std::fs::create_dir_all(out.join(name))?;
            for entry in std::fs::read_dir(&from)? {
                let entry = entry?;
                std::fs::copy(entry.path(), out.join(name).join(entry.file_name()))?;
            }
            if name.starts_with("tokenizer") {
                for file in ["vocab.json", "merges.txt"] {
                    std::fs::copy(vocab.join(file), out.join(name).join(file))?;
                }
            }
        }
        if config.join("model_index.json").exists() {
            std::fs::copy(
                config.join("model_index.json"),
                out.join("model_index.json"),
            )?;
        }
        Ok(())
    });
    eprintln!("wrote {} in {seconds:.1} s", out.display());
    Ok(())
}

/// One SD 3 transformer step (`--component transformer`): `--batch` latents of 16
/// channels at H/8 x W/8, 77 + 256 text tokens, the pooled embedding, timestep 500;
/// random weights from `--config` (materialised by the warm-up) or `--model`'s.
fn sd3_transformer(
    args: &Args,
    device: &Device,
    dir: &std::path::Path,
) -> Result<(), common::AnyError> {
    use stable_diffusion::io::sd3::{read_sd3_transformer_config, sd3_transformer_from_dir};
    use stable_diffusion::models::SD3Transformer2DModel;
    let half = args.f16.then_some(DType::F16);
    let (model, load_s) = timed(|| -> Result<SD3Transformer2DModel, common::AnyError> {
        let tdir = dir.join("transformer");
        Ok(if args.model.is_some() {
            let o = ComponentOptions {
                dtype: half,
                ..Default::default()
            };
            sd3_transformer_from_dir(&tdir, device, &o)?
        } else {
            let config = read_sd3_transformer_config(&tdir.join("config.json"))?;
            let m = SD3Transformer2DModel::new(&config, device)?;
            match half {
                Some(d) => m.map(&mut stable_diffusion::io::CastParameters::new(d)),
                None => m,
            }
        })
    });
    let model = model?;
    let b = args.batch;
    let (lh, lw) = (args.height / 8, args.width / 8);
    let mut rng = NoiseRng::seed(0);
    use stable_diffusion::core::NoiseSource;
    let sample = rng.normal([b, model.in_channels(), lh, lw], device)?;
    let context: Tensor<3> = rng
        .normal([b, 1, 333, model.joint_attention_dim()], device)?
        .reshape([b, 333, model.joint_attention_dim()]);
    let pooled: Tensor<2> = rng
        .normal([b, 1, 1, model.pooled_projection_dim()], device)?
        .reshape([b, model.pooled_projection_dim()]);
    let t = Tensor::<1>::full([b], 500.0, device);
    let mut failed = None;
    let times = time_after(device, args.warmup, args.runs, || {
        if let Err(e) = model.forward(
            sample.clone(),
            t.clone(),
            context.clone(),
            pooled.clone(),
            &[],
        ) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    let dtype = if args.f16 { "f16" } else { "f32" };
    report(args, "transformer", times, dtype, load_s);
    Ok(())
}

/// The tiny autoencoder's decode of one picture's latents (`--component taesd`),
/// what a preview costs per step.
fn taesd(args: &Args, device: &Device) -> Result<(), common::AnyError> {
    use stable_diffusion::io::model::{read_tiny_vae_config, tiny_vae_from_dir};
    use stable_diffusion::models::AutoencoderTiny;
    let (vae, load_s) = timed(|| -> Result<AutoencoderTiny, common::AnyError> {
        Ok(match (&args.tiny_vae, &args.taesd_config) {
            (Some(dir), _) => tiny_vae_from_dir(dir, device, &ComponentOptions::default())?,
            (None, Some(c)) => AutoencoderTiny::new(&read_tiny_vae_config(c)?, device)?,
            (None, None) => return Err("taesd: give --tiny-vae DIR or --taesd-config FILE".into()),
        })
    });
    let vae = vae?;
    let z = NoiseRng::seed(1).normal_tensor([1, 4, args.height / 8, args.width / 8], device);
    let t = time(device, args.runs, || {
        let _ = vae.decode(z.clone()).map(|x| x.into_data());
    });
    report(args, "taesd", t, "f32", load_s);
    Ok(())
}

trait NormalTensor {
    fn normal_tensor(self, shape: [usize; 4], device: &Device) -> Tensor<4>;
}

impl NormalTensor for NoiseRng {
    fn normal_tensor(mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        use stable_diffusion::core::NoiseSource;
        self.normal(shape, device)
            .expect("a seeded RNG never runs out")
    }
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
