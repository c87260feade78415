#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod autoencoder;
pub mod control;
pub mod denoiser;
pub mod device;
pub mod error;
pub mod noise;
pub mod scheduler;
pub mod text_encoder;
pub mod tokenizer;

pub use autoencoder::{Autoencoder, DiagonalGaussian, check_vae_image, check_vae_latents};
pub use control::{Adapter, ControlNet, ControlResiduals, ControlSignals};
pub use denoiser::{
    AddedConditioning, Denoiser, TextTimeDims, check_added_conditioning, check_control_signals,
    check_denoiser_inputs,
};
pub use device::check_device;
pub use error::CoreError;
pub use noise::{NoiseRng, NoiseSource, RecordedNoise};
pub use scheduler::{
    Scheduler, SchedulerRun, StepOutput, Steps, check_step_inputs, handover_index, img2img_start,
    img2img_start_sd3,
};
pub use text_encoder::{
    HiddenLayer, SequenceEncoder, TextEncoder, TextEncoderOutput, check_text_encoder_inputs,
};
pub use tokenizer::PromptTokenizer;

/// Re-export of the burn version these traits are written against.
pub use burn;
