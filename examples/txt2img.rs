//! Text to image.
//!
//! ```text
//! cargo run --release --example txt2img -- --prompt "a red fox in snow" --out fox.png
//! cargo run --release --example txt2img -- --model weights/stable-diffusion-v1-5 --steps 25 --scheduler dpmpp-2m-karras
//! cargo run --release --example txt2img -- --model weights/sdxl-base --refiner weights/sdxl-refiner --refiner-start 0.8
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::{AnyError, CommonArgs};

#[derive(Parser)]
#[command(about = "Generate an image from a prompt with Stable Diffusion")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// An SDXL model that finishes the picture: the base stops at `--refiner-start`
    /// and hands its latents over (diffusers' denoising_end / denoising_start).
    #[arg(long)]
    refiner: Option<PathBuf>,
    /// The fraction of the schedule the base runs before the refiner takes over.
    #[arg(long, default_value_t = 0.8)]
    refiner_start: f64,
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let device = common::device(&a.device)?;
    let pipe = common::load(a, &device)?;
    let bar = common::progress();
    let frames = common::PreviewFrames::new(a);
    let mut request = common::request(a, &pipe)?.on_step(common::on_step(&bar, &frames));
    if args.refiner.is_some() {
        request = request.denoising_end(args.refiner_start);
    }
    let mut out = pipe.generate(request)?;
    if let Some(dir) = &args.refiner {
        let refiner_args = CommonArgs {
            model: Some(dir.clone()),
            unet: None,
            vae: None,
            lora: Vec::new(),
            ..a.clone()
        };
        let refiner = common::load(&refiner_args, &device)?;
        let latents = out.latents.clone();
        let request = common::request(&refiner_args, &refiner)?
            .init_latents(latents)
            .denoising_start(args.refiner_start)
            .on_step(common::on_step(&bar, &frames));
        out = refiner.generate(request)?;
    }
    bar.finish_and_clear();
    frames.save()?;
    common::save(a, &out)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
