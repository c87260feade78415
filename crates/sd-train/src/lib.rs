//! Training and fine-tuning of Stable Diffusion models on burn's autodiff.
//!
//! - [`trainer`]: the training loop (full fine-tuning or LoRA) over an image-caption
//!   folder, with checkpoints in the diffusers layout, EMA, gradient accumulation,
//!   validation loss, sample grids, and resumable runs;
//! - [`objective`]: DDPM noising, epsilon / v targets, min-SNR weighting;
//! - [`optim`]: learning-rate schedules with warm-up, global-norm clipping, EMA,
//!   stable parameter ids for resumable optimizer state;
//! - [`data`]: image-caption folders, resizing and cropping;
//! - [`monitor`]: the CSV log, the loss-curve PNG and sample grids.
//!
//! The models come from `sd-models` (LoRA in [`sd_models::lora`]), files from `sd-io`.
#![warn(missing_docs)]

pub mod data;
pub mod error;
pub mod monitor;
pub mod objective;
pub mod optim;
pub mod synthetic;
pub mod trainer;
pub mod vae;

pub use error::TrainError;
pub use objective::Objective;
pub use optim::{Ema, LrSchedule, clip_grad_norm, param_by_path, stable_param_ids};
pub use trainer::{LoraTrainConfig, Progress, TrainConfig, Trainer};
