//! Latent interpolation between two prompts and/or two seeds: N frames written as
//! numbered PNGs (`OUT_000.png`, ...) and an animated PNG (`--out`).
//!
//! ```text
//! cargo run --release --example interpolate -- --prompt "a cat" --prompt-b "a dog" --seed 1 --seed-b 2 --frames 8 --out morph.png
//! ```

mod common;

use std::process::ExitCode;

use clap::Parser;
use common::{AnyError, CommonArgs};
use stable_diffusion::core::{NoiseRng, NoiseSource};
use stable_diffusion::io::image::{GenerationParameters, save_apng, save_png, to_rgb8};

#[derive(Parser)]
#[command(about = "Interpolate between two prompts and/or seeds with Stable Diffusion")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The second prompt (default: the first).
    #[arg(long)]
    prompt_b: Option<String>,
    /// The second seed (default: the first + 1).
    #[arg(long)]
    seed_b: Option<u64>,
    /// Number of frames, end frames included.
    #[arg(long, default_value_t = 8)]
    frames: usize,
    /// Milliseconds per animation frame.
    #[arg(long, default_value_t = 250)]
    delay_ms: u16,
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let device = common::device(&a.device)?;
    let m = common::load(a, &device)?;
    let (scheduler, sampler) = common::scheduler(a, &m)?;
    let options_a = common::options(a, &m, &device)?;
    let options_b = stable_diffusion::core::GenerationOptions {
        prompt: args.prompt_b.clone().unwrap_or_else(|| a.prompt.clone()),
        ..options_a.clone()
    };
    let sd = m.pipeline(&scheduler, &device);
    let f = m.vae_factor();
    let shape = [1, 4, options_a.height / f, options_a.width / f];
    let noise_a = NoiseRng::seed(a.seed).normal(shape, &device)?;
    let noise_b = NoiseRng::seed(args.seed_b.unwrap_or(a.seed + 1)).normal(shape, &device)?;
    let mut noise = common::noise(a, &device)?;
    let bar = common::progress(a.steps * args.frames);
    let mut frame = 0usize;
    let mut cb = |info: &stable_diffusion::core::StepInfo<'_>| {
        if info.step + 1 == info.total {
            frame += 1;
        }
        bar.set_position((frame * info.total + (info.step + 1) % info.total) as u64);
        true
    };
    let outs = sd.interpolate(
        &options_a,
        &options_b,
        noise_a,
        noise_b,
        args.frames,
        noise.as_mut(),
        Some(&mut cb),
    )?;
    bar.finish_and_clear();
    let stem = a.out.with_extension("");
    let params = GenerationParameters {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone().unwrap_or_default(),
        steps: a.steps,
        sampler,
        cfg_scale: a.guidance,
        seed: a.seed,
        width: options_a.width,
        height: options_a.height,
        model: m.name.clone(),
    };
    let mut frames = Vec::with_capacity(outs.len());
    for (k, out) in outs.iter().enumerate() {
        let path = format!("{}_{k:03}.png", stem.display());
        save_png(&out.images, 0, &path, Some(&params))?;
        frames.push(to_rgb8(&out.images, 0));
    }
    save_apng(&a.out, &frames, args.delay_ms, Some(&params))?;
    eprintln!(
        "wrote {} frames {}_NNN.png and the animation {}",
        frames.len(),
        stem.display(),
        a.out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
