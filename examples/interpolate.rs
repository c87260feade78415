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
use stable_diffusion::io::image::save_apng;
use stable_diffusion::prelude::GenerationRequest;

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
    let pipe = common::load(a, &common::device(&a.device)?)?;
    let request_a = common::request(a, &pipe)?;
    let request_b =
        GenerationRequest::new(args.prompt_b.clone().unwrap_or_else(|| a.prompt.clone()))
            .seed(args.seed_b.unwrap_or(a.seed + 1));
    let request_b = match &a.negative_prompt {
        Some(n) => request_b.negative_prompt(n.clone()),
        None => request_b,
    };
    let bar = common::progress();
    let frames_total = args.frames;
    let mut frame = 0usize;
    let request_a = request_a.on_step(move |info| {
        bar.set_length((info.total * frames_total) as u64);
        if info.step + 1 == info.total {
            frame += 1;
        }
        bar.set_position((frame * info.total + (info.step + 1) % info.total) as u64);
        true
    });
    let pictures = pipe.interpolate(request_a, request_b, args.frames)?;
    let stem = a.out.with_extension("");
    let mut frames = Vec::with_capacity(pictures.len());
    for (k, picture) in pictures.iter().enumerate() {
        picture.save(format!("{}_{k:03}.png", stem.display()))?;
        let (w, h) = picture.image.dimensions();
        frames.push((w as usize, h as usize, picture.image.as_raw().clone()));
    }
    let params = pictures.first().map(|p| &p.parameters);
    save_apng(&a.out, &frames, args.delay_ms, params)?;
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
