//! Image to image: noise an input picture part-way and denoise it towards the prompt.
//!
//! ```text
//! cargo run --release --example img2img -- --image in.png --strength 0.6 --prompt "an oil painting" --out out.png
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::{AnyError, CommonArgs};

#[derive(Parser)]
#[command(about = "Transform an image with Stable Diffusion (img2img)")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The input image (PNG); its size sets the output size.
    #[arg(long)]
    image: PathBuf,
    /// How much to change the image, in (0, 1].
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let pipe = common::load(a, &common::device(&a.device)?)?;
    let bar = common::progress();
    let frames = common::PreviewFrames::new(a);
    let request = common::request(a, &pipe)?
        .init_image(args.image.clone(), args.strength)
        .on_step(common::on_step(&bar, &frames));
    let out = pipe.generate(request)?;
    bar.finish_and_clear();
    frames.save()?;
    common::save(a, &out)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
