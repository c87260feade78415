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
    let pipe = common::load(a, &common::device(&a.device)?)?;
    let bar = common::progress();
    let frames = common::PreviewFrames::new(a);
    let request = common::request(a, &pipe)?.on_step(common::on_step(&bar, &frames));
    let out = pipe.generate(request)?;
    bar.finish_and_clear();
    frames.save()?;
    common::save(a, &out)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
