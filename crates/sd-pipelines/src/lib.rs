//! The pipelines of the `stable-diffusion` workspace.
//!
//! [`StableDiffusionPipeline`] owns a model's parts and turns a
//! [`GenerationRequest`] into pictures:
//!
//! ```
//! use sd_pipelines::{GenerationRequest, LoadOptions, StableDiffusionPipeline};
//! use sd_pipelines::burn::prelude::*;
//!
//! # fn main() -> Result<(), sd_pipelines::PipelineError> {
//! let device = Device::default();
//! let model = "../../tests/fixtures/tiny-sd15"; // a diffusers folder or a .safetensors file
//! let pipe = StableDiffusionPipeline::from_pretrained(model, &device, &LoadOptions::default())?;
//! let request = GenerationRequest::new("an astronaut riding a horse")
//!     .size(32, 32)
//!     .steps(3)
//!     .seed(7)
//!     .on_step(|step| {
//!         let _preview = step.preview(); // [1, 3, h, w] in [0, 1], no VAE
//!         true // false cancels
//!     });
//! let out = pipe.generate(request)?;
//! assert_eq!(out.images[0].image.dimensions(), (32, 32));
//! assert_eq!(out.images[0].parameters.seed, 7);
//! # Ok(())
//! # }
//! ```
//!
//! [`StableDiffusion`] runs the same tasks over borrowed parts, any implementations
//! of the `sd-core` traits, for programs with their own components. Its tasks live in
//! one file each (`txt2img`, `img2img`, `inpaint`, `outpaint`, `interpolate`) around
//! one denoising loop ([`StableDiffusion::denoise`]) whose extra conditioning is a
//! type ([`ExtraConditioning`]).
#![warn(missing_docs)]

pub mod batch;
pub mod composed;
pub mod conditioner;
pub mod control;
mod controlnets;
pub mod denoise;
mod denoiser_model;
pub mod error;
pub mod hires;
pub mod hub;
pub mod img2img;
pub mod inpaint;
pub mod interpolate;
pub mod load;
mod load_sd3;
pub mod memory;
pub mod outpaint;
pub mod output;
pub mod pipeline;
pub mod plan;
pub mod preprocess;
pub mod preview;
pub mod prompt;
mod prompt_encoding;
pub mod request;
pub mod safety;
pub mod sdxl;
pub mod txt2img;
mod validate;

pub use batch::batchable;
pub use composed::{
    GenerationOptions, GenerationOutput, SkipLayerGuidance, StableDiffusion, StepCallback,
    StepInfo, check_size,
};
pub use conditioner::{
    ClipConditioner, DEFAULT_MAX_SEQUENCE_LENGTH, PromptEmbeddings, Sd3Conditioner,
    SdxlConditioner, TextConditioner, TextEncoders,
};
pub use control::{AdapterUnit, ControlNetUnit, check_units};
pub use denoise::{Conditioning, ExtraConditioning, KnownRegion};
pub use denoiser_model::DenoiserModel;
pub use error::PipelineError;
pub use hires::{HiresFix, HiresUpscaler};
pub use hub::HubOptions;
pub use interpolate::{Endpoints, slerp};
pub use load::{LoadOptions, LoraSpec, ModelFamily, ModelSource};
pub use outpaint::{Extend, outpaint_alpha};
pub use output::{GeneratedImage, Generation};
pub use pipeline::StableDiffusionPipeline;
pub use plan::{RunPlan, TaskPlan};
pub use preview::latent_preview;
pub use request::{
    AdapterInput, ControlInput, GenerationRequest, ImageInput, RequestCallback, SchedulerChoice,
};
pub use safety::SafetyChecker;
pub use sdxl::MicroConditioning;

/// The burn version the pipelines are written against.
pub use burn;
/// The `image` crate version of the pictures in and out.
pub use image;
