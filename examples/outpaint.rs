//! Outpainting: extend an image on any side (multiples of 8 pixels) and let the model
//! fill the new area; the original pixels are kept outside a small seam.
//!
//! ```text
//! cargo run --release --example outpaint -- --image in.png --right 128 --prompt "a beach at sunset" --out wide.png
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::{AnyError, CommonArgs};
use stable_diffusion::prelude::Extend;

#[derive(Parser)]
#[command(about = "Extend an image beyond its borders with Stable Diffusion")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The input image (PNG, JPEG or WebP).
    #[arg(long)]
    image: PathBuf,
    /// Pixels to add on the left (multiple of 8).
    #[arg(long, default_value_t = 0)]
    left: usize,
    /// Pixels to add on the right (multiple of 8).
    #[arg(long, default_value_t = 0)]
    right: usize,
    /// Pixels to add on top (multiple of 8).
    #[arg(long, default_value_t = 0)]
    top: usize,
    /// Pixels to add at the bottom (multiple of 8).
    #[arg(long, default_value_t = 0)]
    bottom: usize,
    /// Width of the blended seam inside the original, in pixels.
    #[arg(long, default_value_t = 8)]
    seam: usize,
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let pipe = common::load(a, &common::device(&a.device)?)?;
    let extend = Extend {
        left: args.left,
        right: args.right,
        top: args.top,
        bottom: args.bottom,
    };
    let bar = common::progress();
    let frames = common::PreviewFrames::new(a);
    let request = common::request(a, &pipe)?
        .outpaint(args.image.clone(), extend, args.seam)
        .on_step(common::on_step(&bar, &frames));
    let out = pipe.generate(request)?;
    bar.finish_and_clear();
    frames.save()?;
    common::save(a, &out)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
