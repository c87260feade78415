//! Training and fine-tuning of Stable Diffusion models on burn's autodiff.
//!
//! - [`objective`]: DDPM noising, epsilon / v targets, min-SNR weighting;
//! - [`optim`]: learning-rate schedules with warm-up, global-norm clipping, EMA,
//!   stable parameter ids for resumable optimizer state;
//!
//! The models come from `sd-models` (LoRA in [`sd_models::lora`]), files from `sd-io`.
#![warn(missing_docs)]

pub mod error;
pub mod objective;
pub mod optim;

pub use error::TrainError;
pub use objective::Objective;
pub use optim::{Ema, LrSchedule, clip_grad_norm, param_by_path, stable_param_ids};
