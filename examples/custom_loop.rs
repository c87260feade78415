//! The denoising loop written by hand from the public traits: what the pipelines do,
//! in a screenful. Runs on the demo model shipped in the repo (`models/demo-shapes`), or
//! `--model DIR`.
//!
//! ```text
//! cargo run --release --example custom_loop -- --prompt "a green square on a black background, center"
//! ```

use std::path::PathBuf;

use clap::Parser;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::core::{
    Autoencoder, Denoiser, HiddenLayer, NoiseRng, NoiseSource, Scheduler, Steps, TextEncoder,
};
use stable_diffusion::io::{ComponentOptions, DiffusersDir};
use stable_diffusion::schedulers::{AnyScheduler, AysPreset, SchedulerConfig, SigmaSchedule};

#[derive(Parser)]
struct Args {
    /// A diffusers folder (default: the demo model shipped in the repo).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo-shapes"))]
    model: PathBuf,
    #[arg(long, default_value = "a green square on a black background, center")]
    prompt: String,
    #[arg(long, default_value = "custom_loop.png")]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    steps: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Device::flex();
    let model = DiffusersDir::open(&args.model)?;
    let o = ComponentOptions::default();
    let (tok, text, unet, vae) = (
        model.tokenizer()?,
        model.text_encoder(&device, &o)?,
        model.unet(&device, &o)?,
        model.vae(&device, &o)?,
    );
    let config = SchedulerConfig::from_json(&model.scheduler_config_text()?)?;
    let schedule = AnyScheduler::from_name("euler", &config)?
        .with_sigmas(SigmaSchedule::AlignYourSteps(AysPreset::Sd15))?;
    let ids = |p: &str| -> Result<Tensor<2, Int>, Box<dyn std::error::Error>> {
        let v: Vec<i64> = tok.encode(p)?.into_iter().map(i64::from).collect();
        Ok(Tensor::from_data(
            TensorData::new(v, [1, tok.max_length()]),
            &device,
        ))
    };
    // [uncond; cond], one batched U-Net call per step.
    let cond = Tensor::cat(
        vec![
            text.encode(ids("")?, HiddenLayer::Last)?.hidden_states,
            text.encode(ids(&args.prompt)?, HiddenLayer::Last)?
                .hidden_states,
        ],
        0,
    );
    let mut rng = NoiseRng::seed(42);
    let mut run = schedule.start(&Steps::Count(args.steps))?;
    let size = model.unet_config()?.sample_size.unwrap_or(64);
    let mut x = rng.normal([1, 4, size, size], &device)? * run.init_noise_sigma();
    for i in 0..run.len() {
        let input = run.scale_model_input(x.clone(), i)?;
        let out = Denoiser::forward(
            &unet,
            Tensor::cat(vec![input.clone(), input], 0),
            Tensor::full([2], run.timestep(i)?, &device),
            cond.clone(),
        )?;
        let mut halves = out.chunk(2, 0);
        let (c, u) = (halves.pop().unwrap(), halves.pop().unwrap());
        let eps = u.clone() + (c - u) * 7.5;
        x = run.step(eps, i, x, &mut rng)?.prev_sample;
    }
    let image = (vae.decode(vae.unscale_latents(x))? / 2.0 + 0.5).clamp(0.0, 1.0);
    stable_diffusion::io::image::save_png(&image, 0, &args.out, None)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
