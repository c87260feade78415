//! What a training run is asked to do: [`TrainConfig`] (read from JSON, every field
//! with diffusers' defaults where it has one) and [`LoraTrainConfig`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::controlnet::ControlNetTrainConfig;
use crate::error::TrainError;
use crate::optim::LrSchedule;

fn d_true() -> bool {
    true
}
fn d_resolution() -> usize {
    512
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    1e-4
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_wd() -> f64 {
    1e-2
}
fn d_eps() -> f64 {
    1e-8
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}
fn d_schedule() -> LrSchedule {
    LrSchedule::Constant
}
fn d_checkpoint() -> usize {
    500
}
fn d_every() -> usize {
    100
}
fn d_log() -> usize {
    10
}
fn d_sample_steps() -> usize {
    20
}
fn d_guidance() -> f64 {
    7.5
}

/// LoRA training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraTrainConfig {
    /// Rank of the factors.
    pub rank: usize,
    /// The delta is scaled by `alpha / rank`.
    pub alpha: f32,
    /// Also train LoRA factors of the text encoder(s) (`q_proj`, `k_proj`, `v_proj`,
    /// `out_proj`; SDXL: both encoders), as diffusers' `--train_text_encoder`; the
    /// captions are then encoded at every step.
    #[serde(default)]
    pub train_text_encoder: bool,
}

/// Everything a run needs; read from JSON (`TrainConfig::from_json`) or built in code.
/// Steps count optimizer steps (each `gradient_accumulation` micro-batches).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The diffusers pipeline folder to start from.
    pub model: PathBuf,
    /// The image-caption folder.
    pub data: PathBuf,
    /// Where logs, samples, checkpoints and the result go.
    pub output: PathBuf,
    /// Caption of images without a `.txt` (a DreamBooth instance prompt such as
    /// "a photo of sks dog").
    #[serde(default)]
    pub default_caption: Option<String>,
    /// Training image size (square, a multiple of 8).
    #[serde(default = "d_resolution")]
    pub resolution: usize,
    /// Crop the centre (else the top-left) after resizing the shorter side.
    #[serde(default = "d_true")]
    pub center_crop: bool,
    /// Also train on mirrored images (each image is used both ways).
    #[serde(default)]
    pub random_flip: bool,
    /// Images per micro-batch.
    #[serde(default = "d_one")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_one")]
    pub gradient_accumulation: usize,
    /// Optimizer steps of the run.
    pub max_steps: usize,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// Learning-rate schedule.
    #[serde(default = "d_schedule")]
    pub lr_schedule: LrSchedule,
    /// AdamW beta 1.
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    /// AdamW beta 2.
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    /// AdamW decoupled weight decay.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// AdamW epsilon.
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    /// Clip the global gradient norm to this (`null`: no clipping).
    #[serde(default = "d_clip")]
    pub max_grad_norm: Option<f64>,
    /// Keep an EMA of the weights with this decay (e.g. 0.9999).
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// min-SNR loss weighting gamma (5.0 is the paper's).
    #[serde(default)]
    pub snr_gamma: Option<f32>,
    /// Override the scheduler config's `prediction_type` (`epsilon`, `v_prediction`).
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// Seed of data order, timesteps and noise.
    #[serde(default)]
    pub seed: u64,
    /// Train a LoRA instead of the whole U-Net.
    #[serde(default)]
    pub lora: Option<LoraTrainConfig>,
    /// Train a ControlNet (the U-Net frozen) on the pictures' control images.
    #[serde(default)]
    pub controlnet: Option<ControlNetTrainConfig>,
    /// Encode the images with the VAE once, before training (else every step).
    #[serde(default = "d_true")]
    pub cache_latents: bool,
    /// Save a checkpoint every this many steps (and at the end).
    #[serde(default = "d_checkpoint")]
    pub checkpoint_every: usize,
    /// Hold out this many images (the last ones by file name) for the validation loss.
    #[serde(default)]
    pub validation_images: usize,
    /// Measure the validation loss every this many steps.
    #[serde(default = "d_every")]
    pub validation_every: usize,
    /// Prompts of the sample grid (none: no samples).
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    /// Draw the sample grid every this many steps.
    #[serde(default = "d_every")]
    pub sample_every: usize,
    /// Sampler steps of the samples.
    #[serde(default = "d_sample_steps")]
    pub sample_steps: usize,
    /// Guidance scale of the samples.
    #[serde(default = "d_guidance")]
    pub sample_guidance: f64,
    /// Write a log row every this many steps.
    #[serde(default = "d_log")]
    pub log_every: usize,
    /// DreamBooth prior preservation: a folder of class images ("a photo of a dog").
    /// Missing images up to `num_class_images` are generated there with the base
    /// model first, as diffusers' DreamBooth script does.
    #[serde(default)]
    pub class_data: Option<PathBuf>,
    /// Caption of the class images (required with `class_data`).
    #[serde(default)]
    pub class_prompt: Option<String>,
    /// How many class images to have (generating the missing ones).
    #[serde(default)]
    pub num_class_images: usize,
    /// Weight of the class images' loss.
    #[serde(default = "d_prior")]
    pub prior_loss_weight: f64,
    /// Share of training examples whose caption is replaced by the empty prompt
    /// (diffusers' `--proportion_empty_prompts`), so the model also learns the
    /// unconditional prediction that classifier-free guidance needs; 0.1 is usual
    /// when training from scratch.
    #[serde(default)]
    pub caption_dropout: f64,
}

fn d_prior() -> f64 {
    1.0
}

impl TrainConfig {
    /// Parses a JSON config.
    pub fn from_json(text: &str) -> Result<Self, TrainError> {
        serde_json::from_str(text).map_err(|e| TrainError::Config(e.to_string()))
    }

    pub(crate) fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.max_steps == 0 {
            return bad("max_steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.gradient_accumulation == 0 {
            return bad("batch_size and gradient_accumulation must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!(
                "learning_rate {} must be positive",
                self.learning_rate
            ));
        }
        if self.checkpoint_every == 0 || self.log_every == 0 {
            return bad("checkpoint_every and log_every must be at least 1".into());
        }
        if let Some(l) = &self.lora
            && (l.rank == 0 || !(l.alpha.is_finite() && l.alpha > 0.0))
        {
            return bad("lora.rank and lora.alpha must be positive".into());
        }
        if self.controlnet.is_some() && (self.lora.is_some() || self.class_data.is_some()) {
            return bad(
                "controlnet training takes neither lora nor class_data (prior preservation)".into(),
            );
        }
        if self.class_data.is_some() && self.class_prompt.is_none() {
            return bad("class_data needs a class_prompt".into());
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return bad(format!(
                "caption_dropout {} must be in [0, 1]",
                self.caption_dropout
            ));
        }
        if let Some(d) = self.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return bad(format!("ema_decay {d} must be in [0, 1)"));
        }
        Ok(())
    }
}
