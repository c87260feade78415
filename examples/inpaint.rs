//! Inpainting: repaint the white part of a mask. Works with an inpainting U-Net
//! (9 input channels, e.g. `--unet weights/stable-diffusion-inpainting`) or, by
//! blending the known region back every step, with an ordinary one.
//!
//! ```text
//! cargo run --release --example inpaint -- --image photo.png --mask mask.png --prompt "a red sofa" --out out.png
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::{AnyError, CommonArgs};

#[derive(Parser)]
#[command(about = "Repaint the masked part of an image with Stable Diffusion")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The input image (PNG, JPEG or WebP).
    #[arg(long)]
    image: PathBuf,
    /// The mask (PNG, JPEG or WebP, same size; white = repaint).
    #[arg(long)]
    mask: PathBuf,
    /// How much to change the masked area, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let pipe = common::load(a, &common::device(&a.device)?)?;
    let bar = common::progress();
    let frames = common::PreviewFrames::new(a);
    let request = common::request(a, &pipe)?
        .init_image(args.image.clone(), args.strength)
        .mask(args.mask.clone())
        .on_step(common::on_step(&bar, &frames));
    let out = pipe.generate(request)?;
    bar.finish_and_clear();
    frames.save()?;
    common::save(a, &out)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
