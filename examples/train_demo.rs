//! The recipe of the demo model: a synthetic data set of coloured shapes, a VAE and a
//! U-Net trained from scratch on it (with the tiny CLIP text encoder, frozen, over the
//! real CLIP tokenizer), then the prompt-match rate measured with the deterministic
//! classifier of `stable_diffusion::train::synthetic`.
//!
//! ```text
//! cargo run --release --example train_demo -- --output runs/demo --ship models/demo-shapes
//! ```
//!
//! The defaults are the recipe of the shipped `models/demo-shapes` (about 1 h 30 min
//! on 2 cores; docs/training.md has the figures).
//!
//! Writes `output/data/` (the data set), `output/init/` (the pipeline before U-Net
//! training: trained VAE, random U-Net), `output/unet-run/` (the U-Net run: log,
//! loss curve, samples, checkpoints; resumable) and `output/unet-run/model/`, the
//! finished diffusers pipeline. Stages already done are skipped.
//!
//! The demo ControlNet (the demo model has not learned where to put its shape; a
//! ControlNet given a white blob where the shape goes teaches it):
//!
//! ```text
//! cargo run --release --example train_demo -- --controlnet models/demo-shapes \
//!     --output runs/demo-cn --ship-controlnet models/demo-shapes-controlnet
//! ```
//!
//! writes `output/cn-data/` (pictures, captions and `conditioning/` blobs),
//! `output/controlnet-run/` (resumable) and `output/controlnet-run/controlnet/`, then
//! measures over `--eval` pictures how often the shape lands where the blob is.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use common::AnyError;
use stable_diffusion::burn::prelude::*;
use stable_diffusion::burn::tensor::DType;
use stable_diffusion::io::{ComponentOptions, DiffusersDir};
use stable_diffusion::models::{
    AutoencoderKL, AutoencoderKLConfig, UNet2DConditionConfig, UNet2DConditionModel,
};
use stable_diffusion::pipelines::{LoadOptions, StableDiffusionPipeline};
use stable_diffusion::train::data::{load_training_image, read_folder};
use stable_diffusion::train::synthetic::{prompt_match, reconstruction_match, write_data_set};
use stable_diffusion::train::vae::{VaeTrainConfig, latent_scaling_factor, train_vae};
use stable_diffusion::train::{LrSchedule, Progress, TrainConfig, Trainer};

/// Image side of the demo model.
const SIDE: usize = 64;

const VAE_CONFIG: &str = r#"{
  "in_channels": 3, "out_channels": 3, "latent_channels": 4,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "act_fn": "silu",
  "norm_num_groups": 32, "sample_size": 64, "scaling_factor": 1.0
}"#;

const UNET_CONFIG: &str = r#"{
  "sample_size": 8, "in_channels": 4, "out_channels": 4,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "block_out_channels": [64, 128, 128], "layers_per_block": 1,
  "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 32,
  "act_fn": "silu", "flip_sin_to_cos": true, "freq_shift": 0, "downsample_padding": 1,
  "mid_block_scale_factor": 1, "norm_eps": 1e-05, "use_linear_projection": false
}"#;

#[derive(Parser)]
#[command(about = "Train the demo model (synthetic shapes) from scratch and measure it")]
struct Args {
    /// Where everything goes.
    #[arg(long, default_value = "runs/demo")]
    output: PathBuf,
    /// Renderings of each of the 180 scenes in the data set.
    #[arg(long, default_value_t = 8)]
    copies: usize,
    /// VAE optimizer steps.
    #[arg(long, default_value_t = 1200)]
    vae_steps: usize,
    /// U-Net optimizer steps.
    #[arg(long, default_value_t = 5000)]
    unet_steps: usize,
    /// U-Net batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// U-Net peak learning rate.
    #[arg(long, default_value_t = 5e-4)]
    lr: f64,
    /// Images generated to measure the prompt-match rate (0: skip).
    #[arg(long, default_value_t = 180)]
    eval: usize,
    /// Sampler steps of the evaluation.
    #[arg(long, default_value_t = 20)]
    eval_steps: usize,
    /// Guidance scale of the evaluation (2.5 suits the demo model best; docs/training.md).
    #[arg(long, default_value_t = 2.5)]
    eval_guidance: f64,
    /// Only measure this pipeline folder (no training).
    #[arg(long)]
    eval_model: Option<PathBuf>,
    /// Share of captions replaced by the empty prompt during U-Net training, so that
    /// classifier-free guidance has an unconditional prediction to work from.
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the trained pipeline with f16 weights here (the shipped
    /// `models/demo-shapes`) and measure that copy.
    #[arg(long)]
    ship: Option<PathBuf>,
    /// Train the demo ControlNet for this pipeline (the VAE and U-Net stages are
    /// skipped).
    #[arg(long)]
    controlnet: Option<PathBuf>,
    /// ControlNet optimizer steps.
    #[arg(long, default_value_t = 1500)]
    controlnet_steps: usize,
    /// ControlNet peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    controlnet_lr: f64,
    /// Write the trained ControlNet with f16 weights here (diffusers layout) and
    /// measure that copy.
    #[arg(long)]
    ship_controlnet: Option<PathBuf>,
    /// Only measure this ControlNet with the `--controlnet` pipeline (no training).
    #[arg(long)]
    eval_controlnet: Option<PathBuf>,
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), AnyError> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.path().is_file() && !e.file_name().to_string_lossy().contains(".fp16.") {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// The pipeline folder before U-Net training: trained VAE, random U-Net, the tiny
/// CLIP and the tokenizer.
fn build_init(a: &Args, data: &Path, init: &Path, device: &Device) -> Result<(), AnyError> {
    let tiny = PathBuf::from(common::TINY_MODEL);
    let examples = read_folder(data, None)?;
    let images: Vec<Tensor<4>> = examples
        .iter()
        .map(|e| load_training_image(&e.image, SIDE, true, false, device))
        .collect::<Result<_, _>>()?;
    let mut vae_config = AutoencoderKLConfig::from_json(VAE_CONFIG)?;
    let vae = AutoencoderKL::new(&vae_config, &device.clone().autodiff())?;
    let cfg = VaeTrainConfig {
        steps: a.vae_steps,
        batch_size: 16,
        learning_rate: 1e-3,
        kl_weight: 1e-6,
        seed: a.seed,
    };
    let vae = train_vae(vae, &images, &cfg, |step, rec, kl| {
        if step % 100 == 0 || step + 1 == a.vae_steps {
            eprintln!("vae step {step}: reconstruction {rec:.5}, kl {kl:.3}");
        }
    });
    vae_config.scaling_factor = latent_scaling_factor(&vae, &images[..images.len().min(256)]);
    eprintln!("vae scaling_factor {:.5}", vae_config.scaling_factor);
    eprintln!("VAE reconstructions: {}", reconstruction_match(&vae, SIDE)?);
    stable_diffusion::io::save_vae(&vae, &vae_config, init.join("vae"), DType::F32)?;

    let unet_config = UNet2DConditionConfig::from_json(UNET_CONFIG)?;
    let unet = UNet2DConditionModel::new(&unet_config, device)?;
    stable_diffusion::io::save_unet(&unet, &unet_config, init.join("unet"), DType::F32)?;
    for part in ["text_encoder", "tokenizer", "scheduler"] {
        copy_dir(&tiny.join(part), &init.join(part))?;
    }
    std::fs::copy(tiny.join("model_index.json"), init.join("model_index.json"))?;
    Ok(())
}

fn evaluate(a: &Args, model: &Path, device: &Device) -> Result<(), AnyError> {
    let pipe = StableDiffusionPipeline::from_pretrained(model, device, &LoadOptions::default())?;
    let sd = pipe.composed(pipe.scheduler());
    eprintln!(
        "VAE reconstructions: {}",
        reconstruction_match(pipe.vae(), SIDE)?
    );
    let r = prompt_match(&sd, a.eval, a.eval_steps, a.eval_guidance, SIDE)?;
    println!("prompt match: {r}");
    Ok(())
}

/// Prints a training run's progress every `every` steps and when it writes a file.
fn progress(stage: &'static str, every: usize) -> impl FnMut(&Progress) {
    move |p| {
        if p.row.step % every == 0 || p.wrote.is_some() {
            eprintln!(
                "{stage} step {}/{}: loss {:.4}, lr {:.2e}, {:.2} steps/s",
                p.row.step, p.max_steps, p.row.loss, p.row.lr, p.row.steps_per_s
            );
        }
    }
}

fn run(a: Args) -> Result<(), AnyError> {
    let device = Device::flex();
    if let Some(model) = &a.eval_model {
        return evaluate(&a, model, &device);
    }
    if let Some(model) = &a.controlnet {
        return controlnet_stage(&a, model, &device);
    }
    let data = a.output.join("data");
    if !data.join("00000.txt").exists() {
        let n = write_data_set(&data, SIDE, a.copies, a.seed)?;
        eprintln!("wrote {n} images to {}", data.display());
    }
    let init = a.output.join("init");
    if !init.join("unet/config.json").exists() {
        build_init(&a, &data, &init, &device)?;
    }
    let run_dir = a.output.join("unet-run");
    let config = TrainConfig::from_json(&format!(
        r#"{{"model": {init:?}, "data": {data:?}, "output": {run_dir:?}, "max_steps": 1}}"#
    ))?;
    let config = TrainConfig {
        resolution: SIDE,
        batch_size: a.batch_size,
        max_steps: a.unet_steps,
        learning_rate: a.lr,
        lr_schedule: LrSchedule::Cosine {
            warmup_steps: (a.unet_steps / 50).max(1),
            total_steps: a.unet_steps,
        },
        weight_decay: 0.0,
        ema_decay: Some(0.999),
        snr_gamma: Some(5.0),
        caption_dropout: a.caption_dropout,
        checkpoint_every: (a.unet_steps / 10).max(100),
        sample_prompts: vec![
            "a red circle on a white background, top left".into(),
            "a blue square on a black background, center".into(),
            "a yellow triangle on a gray background, bottom right".into(),
            "a green circle on a black background, top right".into(),
        ],
        sample_every: (a.unet_steps / 20).max(100),
        sample_steps: 20,
        log_every: 20,
        seed: a.seed,
        ..config
    };
    let trainer = Trainer::new(config, device.clone())?;
    eprintln!("training the U-Net on {} examples", trainer.sizes().0);
    trainer.run(progress("unet", 100))?;
    let mut model = run_dir.join("model");
    if let Some(dest) = &a.ship {
        ship(&model, dest, &device)?;
        eprintln!("wrote the f16 pipeline to {}", dest.display());
        model = dest.clone();
    }
    if a.eval > 0 {
        evaluate(&a, &model, &device)?;
    }
    Ok(())
}

/// Writes the pipeline at `model` to `dest` with f16 weights (half the size; the
/// loader casts them back to f32), in the diffusers layout.
fn ship(model: &Path, dest: &Path, device: &Device) -> Result<(), AnyError> {
    use stable_diffusion::io::{save_text_encoder, save_unet, save_vae};
    let dir = DiffusersDir::open(model)?;
    let opts = ComponentOptions::default();
    save_unet(
        &dir.unet(device, &opts)?,
        &dir.unet_config()?,
        dest.join("unet"),
        DType::F16,
    )?;
    save_vae(
        &dir.vae(device, &opts)?,
        &dir.vae_config()?,
        dest.join("vae"),
        DType::F16,
    )?;
    save_text_encoder(
        &dir.text_encoder(device, &opts)?,
        &dir.text_encoder_config()?,
        dest.join("text_encoder"),
        DType::F16,
    )?;
    for part in ["tokenizer", "scheduler"] {
        copy_dir(&model.join(part), &dest.join(part))?;
    }
    std::fs::copy(
        model.join("model_index.json"),
        dest.join("model_index.json"),
    )?;
    Ok(())
}

/// Trains (or, with `--eval-controlnet`, only measures) the demo ControlNet for the
/// pipeline `model`.
fn controlnet_stage(a: &Args, model: &Path, device: &Device) -> Result<(), AnyError> {
    use stable_diffusion::train::ControlNetTrainConfig;
    use stable_diffusion::train::synthetic::write_control_data_set;
    let mut controlnet = match &a.eval_controlnet {
        Some(dir) => dir.clone(),
        None => {
            let data = a.output.join("cn-data");
            if !data.join("conditioning/00000.png").exists() {
                let n = write_control_data_set(&data, SIDE, a.copies, a.seed)?;
                eprintln!("wrote {n} images and control blobs to {}", data.display());
            }
            let run_dir = a.output.join("controlnet-run");
            let config = TrainConfig::from_json(&format!(
                r#"{{"model": {model:?}, "data": {data:?}, "output": {run_dir:?}, "max_steps": 1}}"#
            ))?;
            let steps = a.controlnet_steps;
            let config = TrainConfig {
                resolution: SIDE,
                batch_size: a.batch_size,
                max_steps: steps,
                learning_rate: a.controlnet_lr,
                lr_schedule: LrSchedule::Cosine {
                    warmup_steps: (steps / 50).max(1),
                    total_steps: steps,
                },
                weight_decay: 0.0,
                caption_dropout: a.caption_dropout,
                checkpoint_every: (steps / 5).max(50),
                controlnet: Some(ControlNetTrainConfig {
                    // The demo VAE downsamples 8x, as SD's: four levels.
                    conditioning_embedding_out_channels: vec![16, 32, 64, 128],
                    ..Default::default()
                }),
                sample_prompts: vec![
                    "a red circle on a white background, top left".into(),
                    "a blue square on a black background, center".into(),
                ],
                sample_every: (steps / 10).max(50),
                sample_steps: 20,
                log_every: 20,
                seed: a.seed,
                ..config
            };
            let trainer = Trainer::new(config, device.clone())?;
            eprintln!("training the ControlNet on {} examples", trainer.sizes().0);
            trainer.run(progress("controlnet", 50))?;
            run_dir.join("controlnet")
        }
    };
    if let Some(dest) = &a.ship_controlnet {
        use stable_diffusion::io::controlnet::{controlnet_from_dir, read_controlnet_config};
        let cn = controlnet_from_dir(&controlnet, device, &ComponentOptions::default())?;
        let config = read_controlnet_config(&controlnet.join("config.json"))?;
        stable_diffusion::io::save_controlnet(&cn, &config, dest, DType::F16)?;
        eprintln!("wrote the f16 ControlNet to {}", dest.display());
        controlnet = dest.clone();
    }
    if a.eval > 0 {
        evaluate_controlnet(a, model, &controlnet, device)?;
    }
    Ok(())
}

/// How often the shape lands where the control blob puts it (and colour + shape).
fn evaluate_controlnet(
    a: &Args,
    model: &Path,
    controlnet: &Path,
    device: &Device,
) -> Result<(), AnyError> {
    use stable_diffusion::pipelines::{ControlInput, GenerationRequest};
    use stable_diffusion::train::synthetic::control_match;
    let options = LoadOptions {
        controlnets: vec![controlnet.to_path_buf()],
        ..Default::default()
    };
    let pipe = StableDiffusionPipeline::from_pretrained(model, device, &options)?;
    let report = control_match(a.eval, SIDE, |caption, control, seed| {
        let request = GenerationRequest::new(caption)
            .size(SIDE, SIDE)
            .steps(a.eval_steps)
            .guidance(a.eval_guidance)
            .seed(seed)
            .control(ControlInput::new(0, control));
        let out = pipe
            .generate(request)
            .map_err(|e| stable_diffusion::train::TrainError::Config(e.to_string()))?;
        Ok(out.images[0].image.as_raw().clone())
    })?;
    println!("with the ControlNet: {report} (position = placement where the blob is)");
    Ok(())
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
