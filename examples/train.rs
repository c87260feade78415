//! Fine-tune a model's U-Net (fully or with LoRA) on a folder of images with captions
//! (`cat.png` + `cat.txt`). Runs resume from the last checkpoint in `--output`.
//!
//! ```text
//! # LoRA on your own pictures, DreamBooth style: 5 photos, a rare token, no captions
//! cargo run --release --example train -- --model weights/stable-diffusion-v1-5 \
//!     --data my-dog/ --instance-prompt "a photo of sks dog" --lora-rank 8 \
//!     --resolution 512 --max-steps 400 --lr 1e-4 --output runs/sks-dog \
//!     --sample-prompt "a photo of sks dog on the beach"
//! # then
//! cargo run --release --example txt2img -- --model weights/stable-diffusion-v1-5 \
//!     --lora runs/sks-dog/pytorch_lora_weights.safetensors --prompt "a photo of sks dog"
//!
//! # everything from a JSON config (the fields of `TrainConfig`)
//! cargo run --release --example train -- --config train.json
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::AnyError;
use indicatif::{ProgressBar, ProgressStyle};
use stable_diffusion::train::{LoraTrainConfig, LrSchedule, TrainConfig, Trainer};

#[derive(Parser)]
#[command(about = "Fine-tune Stable Diffusion (full or LoRA) on images with captions")]
struct Args {
    /// A JSON training config (`TrainConfig`); the other flags then override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Diffusers pipeline folder to start from (default: the tiny test model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder of images (.png/.jpg) with captions (.txt of the same name).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where logs, samples, checkpoints and the result go.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Caption of images without a .txt (DreamBooth: "a photo of sks dog").
    #[arg(long)]
    instance_prompt: Option<String>,
    /// Training resolution (square).
    #[arg(long)]
    resolution: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Linear warm-up steps (then constant).
    #[arg(long)]
    warmup: Option<usize>,
    /// Images per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    gradient_accumulation: Option<usize>,
    /// Train a LoRA of this rank instead of the whole U-Net.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA alpha (default: the rank).
    #[arg(long)]
    lora_alpha: Option<f32>,
    /// Keep an EMA of the weights with this decay.
    #[arg(long)]
    ema: Option<f64>,
    /// min-SNR weighting gamma (5 is usual).
    #[arg(long)]
    snr_gamma: Option<f32>,
    /// Also train on mirrored images.
    #[arg(long)]
    flip: bool,
    /// Hold out this many images for the validation loss.
    #[arg(long)]
    validation_images: Option<usize>,
    /// A prompt of the sample grid (repeatable).
    #[arg(long)]
    sample_prompt: Vec<String>,
    /// Samples, validation and checkpoints every this many steps.
    #[arg(long)]
    every: Option<usize>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// cpu, wgpu or cuda (as compiled in).
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn config(a: &Args) -> Result<TrainConfig, AnyError> {
    let mut c = match &a.config {
        Some(path) => TrainConfig::from_json(&std::fs::read_to_string(path)?)?,
        None => TrainConfig::from_json(&format!(
            r#"{{"model": {:?}, "data": {:?}, "output": {:?}, "max_steps": 1000}}"#,
            a.model
                .clone()
                .unwrap_or_else(|| PathBuf::from(common::DEFAULT_MODEL)),
            a.data.clone().ok_or("--data (or --config) is required")?,
            a.output
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs/train")),
        ))?,
    };
    if let Some(v) = &a.model {
        c.model = v.clone();
    }
    if let Some(v) = &a.data {
        c.data = v.clone();
    }
    if let Some(v) = &a.output {
        c.output = v.clone();
    }
    if a.instance_prompt.is_some() {
        c.default_caption = a.instance_prompt.clone();
    }
    macro_rules! set {
        ($($flag:ident => $field:ident),*) => {$(if let Some(v) = a.$flag { c.$field = v; })*};
    }
    set!(resolution => resolution, max_steps => max_steps, lr => learning_rate,
         batch_size => batch_size, gradient_accumulation => gradient_accumulation,
         validation_images => validation_images, seed => seed);
    if let Some(w) = a.warmup {
        c.lr_schedule = LrSchedule::ConstantWithWarmup { warmup_steps: w };
    }
    if let Some(rank) = a.lora_rank {
        c.lora = Some(LoraTrainConfig {
            rank,
            alpha: a.lora_alpha.unwrap_or(rank as f32),
        });
    }
    if a.ema.is_some() {
        c.ema_decay = a.ema;
    }
    if a.snr_gamma.is_some() {
        c.snr_gamma = a.snr_gamma;
    }
    if a.flip {
        c.random_flip = true;
    }
    if !a.sample_prompt.is_empty() {
        c.sample_prompts = a.sample_prompt.clone();
    }
    if let Some(e) = a.every {
        c.sample_every = e;
        c.validation_every = e;
        c.checkpoint_every = e;
    }
    Ok(c)
}

fn run(a: Args) -> Result<(), AnyError> {
    let device = common::device(&a.device)?;
    let c = config(&a)?;
    let output = c.output.clone();
    eprintln!(
        "preparing {} (encoding images and captions)...",
        c.data.display()
    );
    let trainer = Trainer::new(c.clone(), device)?;
    let (n_train, n_val) = trainer.sizes();
    eprintln!("{n_train} training examples, {n_val} validation examples");
    let bar = ProgressBar::new(c.max_steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {msg} [{elapsed} < {eta}]")
            .expect("template"),
    );
    trainer.run(|p| {
        bar.set_position(p.row.step as u64);
        let val = p
            .row
            .val_loss
            .map(|v| format!(", val {v:.4}"))
            .unwrap_or_default();
        bar.set_message(format!(
            "loss {:.4}{val}, lr {:.2e}, {:.2} steps/s",
            p.row.loss, p.row.lr, p.row.steps_per_s
        ));
        if let Some(path) = &p.wrote {
            bar.println(format!("step {}: wrote {}", p.row.step, path.display()));
        }
    })?;
    bar.finish();
    match c.lora {
        Some(_) => eprintln!(
            "LoRA: {} (diffusers layout), {} (kohya layout)",
            output.join("pytorch_lora_weights.safetensors").display(),
            output.join("lora_kohya.safetensors").display()
        ),
        None => eprintln!("model: {}", output.join("model").display()),
    }
    eprintln!(
        "log: {}, curve: {}",
        output.join("log.csv").display(),
        output.join("loss.png").display()
    );
    Ok(())
}

fn main() -> ExitCode {
    common::exit(run(Args::parse()))
}
