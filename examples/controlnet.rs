//! Text (or image) to image guided by ControlNets: edges, poses or any control
//! image, from one or several ControlNets at once.
//!
//! ```text
//! cargo run --release --example controlnet -- --model weights/stable-diffusion-v1-5 \
//!     --controlnet weights/control_v11p_sd15_canny --control-image photo.png --preprocess canny \
//!     --prompt "a bird, oil painting" --out bird.png
//! cargo run --release --example controlnet -- --model weights/stable-diffusion-v1-5 \
//!     --controlnet weights/control_v11p_sd15_openpose.safetensors --control-image pose.json \
//!     --preprocess pose --prompt "a dancer on a stage"
//! cargo run --release --example controlnet -- --model weights/stable-diffusion-v1-5 \
//!     --controlnet weights/control_v11f1p_sd15_depth --control-image room.jpg \
//!     --preprocess depth --depth-model weights/Depth-Anything-V2-Small-hf \
//!     --prompt "a cosy library, warm light"
//! ```
//!
//! `--controlnet`, `--control-image`, `--preprocess`, `--control-scale`,
//! `--control-start` and `--control-end` repeat, one per ControlNet; a single value
//! applies to all. T2I-Adapters take `--adapter DIR --adapter-image FILE`
//! (`--adapter-preprocess`, `--adapter-scale`), alone or with ControlNets.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use common::{AnyError, CommonArgs};
use stable_diffusion::burn::prelude::Device;
use stable_diffusion::pipelines::preprocess::{DepthEstimator, OpenPose, canny, draw_openpose};
use stable_diffusion::pipelines::{AdapterInput, ControlInput};

#[derive(Parser)]
#[command(about = "Generate an image guided by ControlNets (edges, poses, any control image)")]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// A ControlNet: a diffusers folder, a .safetensors file (diffusers or original
    /// control_model.* layout) or a hub repository id. Repeat for several.
    #[arg(long)]
    controlnet: Vec<String>,
    /// The control image of each ControlNet (a picture, or an OpenPose .json with
    /// `--preprocess pose`).
    #[arg(long)]
    control_image: Vec<PathBuf>,
    /// What to make of each control image: `none` (use it as it is), `canny`
    /// (edges), `depth` (a depth map, with --depth-model), `pose` (draw an OpenPose
    /// JSON's skeletons).
    #[arg(long, default_value = "none")]
    preprocess: Vec<String>,
    /// The depth model for `--preprocess depth`: a Depth Anything folder as on the
    /// hub (config.json, model.safetensors, preprocessor_config.json), its weight
    /// file, or a hub id (`depth-anything/Depth-Anything-V2-Small-hf`, with the `hub`
    /// feature).
    #[arg(long)]
    depth_model: Option<String>,
    /// Canny thresholds, low and high.
    #[arg(long, num_args = 2, default_values_t = [100.0, 200.0])]
    canny: Vec<f32>,
    /// controlnet_conditioning_scale of each ControlNet (default: the task's, 1.0
    /// text to image, 0.8 with --image).
    #[arg(long)]
    control_scale: Vec<f64>,
    /// Fraction of the steps where each ControlNet starts guiding.
    #[arg(long)]
    control_start: Vec<f64>,
    /// Fraction of the steps where each ControlNet stops guiding.
    #[arg(long)]
    control_end: Vec<f64>,
    /// Guess mode: the ControlNets see the conditional half only (for short prompts).
    #[arg(long)]
    guess_mode: bool,
    /// Start from this image (image to image) instead of noise, as the img2img
    /// example's --image (`--init-image` is accepted too).
    #[arg(long = "image", alias = "init-image")]
    init_image: Option<PathBuf>,
    /// With --image: how much to change it, in (0, 1].
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
    /// A T2I-Adapter: a diffusers folder, a .safetensors file or a hub repository id.
    /// Repeat for several.
    #[arg(long)]
    adapter: Vec<String>,
    /// The control image of each adapter.
    #[arg(long)]
    adapter_image: Vec<PathBuf>,
    /// What to make of each adapter image: none, canny, depth or pose.
    #[arg(long, default_value = "none")]
    adapter_preprocess: Vec<String>,
    /// adapter_conditioning_scale of each adapter.
    #[arg(long)]
    adapter_scale: Vec<f64>,
    /// Also write each preprocessed control image here (`-0`, `-1`, ... per net).
    #[arg(long)]
    save_control: Option<PathBuf>,
}

/// The i-th value of a repeated flag, or its only value for all.
fn nth<T: Copy>(values: &[T], i: usize) -> Option<T> {
    values
        .get(i)
        .or(if values.len() == 1 {
            values.first()
        } else {
            None
        })
        .copied()
}

/// Makes control images, loading the depth model on first use.
struct Preprocessor<'a> {
    args: &'a Args,
    device: Device,
    depth: Option<DepthEstimator>,
}

impl Preprocessor<'_> {
    fn control_image(
        &mut self,
        path: &Path,
        how: &str,
    ) -> Result<stable_diffusion::pipelines::image::DynamicImage, AnyError> {
        let read = stable_diffusion::io::image::read_image;
        Ok(match how {
            "none" => read(path)?,
            "canny" => canny(&read(path)?, self.args.canny[0], self.args.canny[1])?.into(),
            "depth" => self.depth()?.depth_map(&read(path)?)?.into(),
            "pose" => draw_openpose(&OpenPose::from_json(&std::fs::read_to_string(path)?)?).into(),
            o => {
                return Err(
                    format!("--preprocess {o}: expected none, canny, depth or pose").into(),
                );
            }
        })
    }

    fn depth(&mut self) -> Result<&DepthEstimator, AnyError> {
        if self.depth.is_none() {
            let Some(model) = &self.args.depth_model else {
                return Err(
                    "--preprocess depth needs --depth-model (a Depth Anything folder, \
                     weight file or hub id, e.g. depth-anything/Depth-Anything-V2-Small-hf)"
                        .into(),
                );
            };
            self.depth = Some(DepthEstimator::from_pretrained(
                model.as_str(),
                &self.device,
                &Default::default(),
            )?);
        }
        Ok(self.depth.as_ref().expect("loaded above"))
    }
}

fn run(args: Args) -> Result<(), AnyError> {
    let a = &args.common;
    let device = common::device(&a.device)?;
    let mut pipe = common::load(a, &device)?;
    let mut pre = Preprocessor {
        args: &args,
        device,
        depth: None,
    };
    let n = args.controlnet.len();
    if args.control_image.len() != n {
        return Err(format!(
            "{n} --controlnet but {} --control-image",
            args.control_image.len()
        )
        .into());
    }
    let bar = common::progress();
    let frames = common::PreviewFrames::new(a);
    let mut request = common::request(a, &pipe)?.guess_mode(args.guess_mode);
    for (i, (net, image)) in args.controlnet.iter().zip(&args.control_image).enumerate() {
        let index = pipe.load_controlnet(net.as_str())?;
        let how = nth(
            &args
                .preprocess
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            i,
        )
        .unwrap_or("none");
        let control = pre.control_image(image, how)?;
        if let Some(out) = &args.save_control {
            let path = out.with_extension("").display().to_string();
            let path = PathBuf::from(format!("{path}-{i}.png"));
            control.to_rgb8().save(&path)?;
            eprintln!("wrote {}", path.display());
        }
        let mut input = ControlInput::new(index, control).guidance_range(
            nth(&args.control_start, i).unwrap_or(0.0),
            nth(&args.control_end, i).unwrap_or(1.0),
        );
        if let Some(s) = nth(&args.control_scale, i) {
            input = input.scale(s);
        }
        request = request.control(input);
    }
    let how: Vec<&str> = args.adapter_preprocess.iter().map(String::as_str).collect();
    for (i, (dir, image)) in args.adapter.iter().zip(&args.adapter_image).enumerate() {
        let index = pipe.load_adapter(dir.as_str())?;
        let control = pre.control_image(image, nth(&how, i).unwrap_or("none"))?;
        let scale = nth(&args.adapter_scale, i).unwrap_or(1.0);
        request = request.adapter(AdapterInput::new(index, control).scale(scale));
    }
    if let Some(init) = &args.init_image {
        request = request.init_image(init.clone(), args.strength);
    }
    let out = pipe.generate(request.on_step(common::on_step(&bar, &frames)))?;
    bar.finish_and_clear();
    frames.save()?;
    common::save(a, &out)
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
