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
use stable_diffusion::io::image::{load_image, load_mask};

#[derive(Parser)]
#[command(about = "Repaint the masked part of an image with Stable Diffusion")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// The input image (PNG).
    #[arg(long)]
    image: PathBuf,
    /// The mask (PNG, same size; white = repaint).
    #[arg(long)]
    mask: PathBuf,
    /// How much to change the masked area, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let device = common::device(&a.device)?;
    let image = load_image(&args.image, &device)?;
    let mask = load_mask(&args.mask, &device)?;
    let m = common::load(a, &device)?;
    let (scheduler, sampler) = common::scheduler(a, &m)?;
    let options = common::options(a, &m, &device)?;
    let sd = m.pipeline(&scheduler, &device);
    let mut noise = common::noise(a, &device)?;
    let bar = common::progress(a.steps);
    let mut cb = common::on_step(&bar);
    let out = sd.inpaint(
        &options,
        image,
        mask,
        args.strength,
        noise.as_mut(),
        Some(&mut cb),
    )?;
    bar.finish_and_clear();
    common::save(a, &m, &sampler, &out.latents, &out.images)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
