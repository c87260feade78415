//! Training and fine-tuning of Stable Diffusion models on burn's autodiff.
//!
//! - [`trainer`]: the training loop (full fine-tuning or LoRA) over an image-caption
//!   folder, with checkpoints in the diffusers layout, EMA, gradient accumulation,
//!   validation loss, sample grids, and resumable runs;
//! - [`config`]: what a run is asked to do ([`TrainConfig`], JSON);
//! - [`conditioning`]: caption embeddings (SD 1.x/2.x and SDXL, with SDXL's pooled
//!   embeddings and time ids);
//! - [`controlnet`]: the ControlNet training loss (the U-Net frozen);
//! - [`objective`]: DDPM noising, epsilon / v targets, min-SNR weighting;
//! - [`optim`]: learning-rate schedules with warm-up, global-norm clipping, EMA,
//!   stable parameter ids for resumable optimizer state;
//! - [`trained`]: what a run trains and writes (the U-Net, whole or LoRA, and the
//!   text encoders' LoRA);
//! - [`data`]: image-caption folders, resizing and cropping;
//! - [`monitor`]: the CSV log, the loss-curve PNG and sample grids.
//!
//! The models come from `sd-models` (LoRA in [`sd_models::lora`]), files from `sd-io`.
//!
//! ```
//! use sd_train::LrSchedule;
//!
//! // diffusers' `get_scheduler("cosine", num_warmup_steps=10, num_training_steps=110)`.
//! let lr = LrSchedule::Cosine { warmup_steps: 10, total_steps: 110 };
//! assert_eq!(lr.factor(5), 0.5);
//! assert!((lr.factor(60) - 0.5).abs() < 1e-9);
//! assert!(lr.factor(110).abs() < 1e-12);
//! ```
//!
//! A whole fine-tuning run is [`Trainer`] over a [`TrainConfig`] (see the `train`
//! example of the `stable-diffusion` package and `docs/training.md`).
#![warn(missing_docs)]

pub mod conditioning;
pub mod config;
pub mod controlnet;
pub mod data;
pub mod error;
pub mod monitor;
pub mod objective;
pub mod optim;
pub mod synthetic;
pub mod trained;
pub mod trainer;
pub mod vae;

pub use conditioning::{CaptionEncoder, Conditioning};
pub use controlnet::{ControlNetTrainConfig, controlled_prediction, controlnet_loss};
pub use error::TrainError;
pub use objective::Objective;
pub use optim::{Ema, LrSchedule, clip_grad_norm, param_by_path, stable_param_ids};
pub use trained::TrainedModels;
pub use trainer::{LoraTrainConfig, Progress, TrainConfig, Trainer};
