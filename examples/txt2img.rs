//! Text to image.
//!
//! ```text
//! cargo run --release --example txt2img -- --prompt "a red fox in snow" --out fox.png
//! cargo run --release --example txt2img -- --model weights/stable-diffusion-v1-5 --steps 25 --scheduler dpmpp-2m-karras
//! ```

mod common;

use std::process::ExitCode;

use clap::Parser;
use common::{AnyError, CommonArgs};

#[derive(Parser)]
#[command(about = "Generate an image from a prompt with Stable Diffusion")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let device = common::device(&a.device)?;
    let m = common::load(a, &device)?;
    let (scheduler, sampler) = common::scheduler(a, &m)?;
    let options = common::options(a, &m, &device)?;
    let sd = m.pipeline(&scheduler, &device);
    let mut noise = common::noise(a, &device)?;
    let bar = common::progress(a.steps);
    let mut cb = common::on_step(&bar);
    let out = sd.txt2img(&options, noise.as_mut(), Some(&mut cb))?;
    bar.finish_and_clear();
    common::save(a, &m, &sampler, &out.latents, &out.images)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
