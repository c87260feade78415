//! # stable-diffusion
//!
//! Stable Diffusion 1.x / 2.x on the [burn](https://burn.dev) deep-learning framework.
//! This facade re-exports the workspace crates:
//!
//! - [`core`] (`sd-core`): the traits a text encoder, denoiser and autoencoder implement;
//! - [`models`] (`sd-models`): CLIP, `UNet2DConditionModel`, `AutoencoderKL` as burn modules;
//! - [`io`] (`sd-io`): diffusers folders, single-file checkpoints, the CLIP tokenizer;
//! - [`schedulers`] (`sd-schedulers`): the samplers;
//! - [`train`] (`sd-train`): training and LoRA fine-tuning on burn's autodiff.
//!
//! The backend is a run-time [`burn::tensor::Device`]; the cargo features `flex`
//! (CPU, default), `wgpu` and `cuda` make the backends available.
//!
//! ```no_run
//! use stable_diffusion::burn::prelude::*;
//! use stable_diffusion::io::{ComponentOptions, DiffusersDir};
//!
//! # fn main() -> Result<(), stable_diffusion::io::IoError> {
//! let device = Device::default();
//! let model = DiffusersDir::open("weights/stable-diffusion-v1-5")?;
//! let unet = model.unet(&device, &ComponentOptions::default())?;
//! # Ok(())
//! # }
//! ```

pub use burn;
pub use sd_core as core;
pub use sd_io as io;
pub use sd_models as models;
pub use sd_schedulers as schedulers;
pub use sd_train as train;
