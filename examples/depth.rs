//! A depth map from a picture with Depth Anything (V1 or V2, any size) in burn: the
//! control image depth ControlNets and T2I-Adapters take.
//!
//! ```text
//! cargo run --release --example depth -- --depth-model weights/Depth-Anything-V2-Small-hf \
//!     --image room.jpg --out room-depth.png
//! ```
//!
//! `--config CONFIG.json` builds the model with random weights instead (to time a size
//! without downloading it); `--runs N` repeats the estimate and prints the time of each.

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use common::AnyError;
use stable_diffusion::burn::module::Module;
use stable_diffusion::io::ComponentOptions;
use stable_diffusion::io::depth::read_depth_anything_config;
use stable_diffusion::models::DepthAnythingForDepthEstimation;
use stable_diffusion::pipelines::preprocess::{DepthEstimator, DepthImageProcessorConfig};

#[derive(Parser)]
#[command(about = "Make a depth map (ControlNet depth input) from a picture with Depth Anything")]
struct Args {
    /// A Depth Anything folder as on the hub (config.json, model.safetensors,
    /// preprocessor_config.json), its weight file, or a hub id
    /// (`depth-anything/Depth-Anything-V2-Small-hf`, with the `hub` feature).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    depth_model: Option<String>,
    /// Build the model from this config.json with random weights (timing only).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The picture.
    #[arg(long)]
    image: PathBuf,
    /// Where to write the depth map (PNG).
    #[arg(long, default_value = "depth.png")]
    out: PathBuf,
    /// cpu, wgpu or cuda (as the other examples).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run the model in f16 (half the memory; the depth map is computed in f32).
    #[arg(long)]
    f16: bool,
    /// How many times to estimate (the first includes warm-up).
    #[arg(long, default_value_t = 1)]
    runs: usize,
}

fn run(args: Args) -> Result<(), AnyError> {
    let device = common::device(&args.device)?;
    let options = ComponentOptions {
        dtype: args
            .f16
            .then_some(stable_diffusion::burn::tensor::DType::F16),
        ..Default::default()
    };
    let start = Instant::now();
    let estimator = match (&args.depth_model, &args.config) {
        (Some(source), _) => DepthEstimator::from_pretrained_with(
            source.as_str(),
            &device,
            &Default::default(),
            &options,
        )?,
        (None, Some(config)) => {
            let config = read_depth_anything_config(config)?;
            let model = DepthAnythingForDepthEstimation::new(&config, &device)?;
            let model = match options.dtype {
                Some(dtype) => model.map(&mut stable_diffusion::io::CastParameters::new(dtype)),
                None => model,
            };
            DepthEstimator::new(model, DepthImageProcessorConfig::default(), &device)
        }
        (None, None) => return Err("--depth-model or --config".into()),
    };
    eprintln!("loaded in {:.2} s", start.elapsed().as_secs_f64());
    let picture = stable_diffusion::io::image::read_image(&args.image)?;
    let (h, w) = estimator
        .processor()
        .output_size(picture.height() as usize, picture.width() as usize);
    let mut map = None;
    for i in 0..args.runs.max(1) {
        let t = Instant::now();
        let m = estimator.depth_map(&picture)?;
        eprintln!(
            "run {i}: {}x{} picture, model at {w}x{h}: {:.3} s",
            picture.width(),
            picture.height(),
            t.elapsed().as_secs_f64()
        );
        map = Some(m);
    }
    map.expect("one run at least").save(&args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
