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
use stable_diffusion::io::image::load_image;

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
    let device = common::device(&a.device)?;
    let image = load_image(&args.image, &device)?;
    let m = common::load(a, &device)?;
    let (scheduler, sampler) = common::scheduler(a, &m)?;
    let options = common::options(a, &m, &device)?;
    let sd = m.pipeline(&scheduler, &device);
    let mut noise = common::noise(a, &device)?;
    let bar = common::progress(a.steps);
    let mut cb = common::on_step(&bar);
    let out = sd.img2img(
        &options,
        image,
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
