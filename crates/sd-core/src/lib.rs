#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod autoencoder;
pub mod denoiser;
pub mod error;
pub mod noise;
pub mod pipeline;
pub mod prompt;
pub mod scheduler;
pub mod text_encoder;

pub use autoencoder::{Autoencoder, DiagonalGaussian};
pub use denoiser::Denoiser;
pub use error::CoreError;
pub use noise::{NoiseRng, NoiseSource, RecordedNoise};
pub use pipeline::{
    Extend, GenerationOptions, GenerationOutput, PromptTokenizer, StableDiffusion, StepCallback,
    StepInfo, latent_preview, slerp,
};
pub use scheduler::{Scheduler, SchedulerRun, StepOutput, Steps, img2img_start};
pub use text_encoder::{HiddenLayer, TextEncoder, TextEncoderOutput};

/// Re-export of the burn version these traits are written against.
pub use burn;
