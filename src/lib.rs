//! # stable-diffusion
//!
//! Stable Diffusion 1.x / 2.x and XL (with ControlNet, T2I-Adapter, LoRA, LCM and
//! TAESD) on the [burn](https://burn.dev) deep-learning framework.
//! One line brings what a program needs ([`prelude`]); one call loads a model and
//! one more makes pictures:
//!
//! ```
//! use stable_diffusion::prelude::*;
//!
//! # fn main() -> Result<(), PipelineError> {
//! let device = Device::default();
//! // A diffusers folder, a single-file .safetensors checkpoint, ...
//! let pipe = StableDiffusionPipeline::from_pretrained(
//!     "tests/fixtures/tiny-sd15",
//!     &device,
//!     &LoadOptions::default(),
//! )?;
//! let out = pipe.generate(
//!     GenerationRequest::new("a red fox in snow")
//!         .size(32, 32)
//!         .steps(3)
//!         .seed(7)
//!         .num_images(2),
//! )?;
//! for (i, picture) in out.images.iter().enumerate() {
//!     picture.save(std::env::temp_dir().join(format!("fox-{i}.png")))?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The crates it re-exports:
//!
//! - [`core`] (`sd-core`): the traits a text encoder, denoiser, autoencoder,
//!   tokenizer and scheduler implement, noise sources, errors;
//! - [`models`] (`sd-models`): CLIP, `UNet2DConditionModel`, `AutoencoderKL` as burn
//!   modules built from diffusers configs;
//! - [`io`] (`sd-io`): diffusers folders, single-file checkpoints, LoRA files, the
//!   CLIP tokenizer, images with generation metadata;
//! - [`schedulers`] (`sd-schedulers`): the samplers and sigma schedules;
//! - [`pipelines`] (`sd-pipelines`): the owning [`StableDiffusionPipeline`] and the
//!   task pipelines over any components;
//! - [`train`] (`sd-train`): training and LoRA fine-tuning on burn's autodiff.
//!
//! The backend is a run-time [`burn::tensor::Device`]; the cargo features `flex`
//! (CPU, default), `wgpu` and `cuda` make the backends available.

pub use burn;
pub use sd_core as core;
pub use sd_io as io;
pub use sd_kernels as kernels;
pub use sd_models as models;
pub use sd_pipelines as pipelines;
pub use sd_pipelines::StableDiffusionPipeline;
/// The `image` crate version of the pictures in and out.
pub use sd_pipelines::image;
pub use sd_schedulers as schedulers;
/// The HTTP server (OpenAI and AUTOMATIC1111 APIs, native jobs), with the `server`
/// feature.
#[cfg(feature = "server")]
pub use sd_server as server;
pub use sd_train as train;

/// What most programs need, in one line: `use stable_diffusion::prelude::*;`.
///
/// The owning pipeline and its request, load options and results; the component
/// traits (for [`crate::pipelines::StableDiffusion`] over your own parts); the
/// device and tensor types; the schedulers; the error types.
pub mod prelude {
    pub use burn::prelude::{Device, Int, Tensor, TensorData};
    pub use sd_core::{
        Adapter, Autoencoder, ControlNet, CoreError, Denoiser, HiddenLayer, NoiseRng, NoiseSource,
        PromptTokenizer, RecordedNoise, Scheduler, SchedulerRun, Steps, TextEncoder,
    };
    pub use sd_io::image::{GenerationParameters, SizeMode};
    pub use sd_io::{ComponentOptions, DiffusersDir, IoError, SingleFile};
    pub use sd_models::{
        AutoencoderKL, AutoencoderTiny, ClipTextModel, ControlNetModel, SD3Transformer2DModel,
        T2IAdapter, T5EncoderModel, UNet2DConditionModel, VaeTiling,
    };
    pub use sd_pipelines::{
        AdapterInput, AdapterUnit, ControlInput, ControlNetUnit, Extend, GeneratedImage,
        Generation, GenerationOptions, GenerationRequest, HiresFix, HiresUpscaler, ImageInput,
        LoadOptions, LoraSpec, ModelFamily, ModelSource, PipelineError, SchedulerChoice,
        SkipLayerGuidance, StableDiffusion, StableDiffusionPipeline, StepInfo,
    };
    pub use sd_schedulers::{AnyScheduler, AysPreset, SchedulerConfig, SigmaSchedule};
}

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
