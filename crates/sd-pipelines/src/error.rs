//! The error type of the pipelines.

use thiserror::Error;

/// Errors of [`crate::StableDiffusionPipeline`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A model, scheduler or argument error (sizes, steps, shapes, cancellation).
    #[error(transparent)]
    Core(#[from] sd_core::CoreError),
    /// Reading weights, configs, tokenizers or images failed.
    #[error(transparent)]
    Io(#[from] sd_io::IoError),
    /// A LoRA file does not fit the model.
    #[error(transparent)]
    Lora(#[from] sd_models::lora::LoraError),
    /// A request that cannot be run as asked (what is missing or contradictory).
    #[error("invalid request `{field}`: {message}")]
    Request {
        /// The request's field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The request would need more memory than the machine has available.
    #[error(
        "{what} would need about {:.1} GiB, {:.1} GiB is available; use a smaller size or \
         batch, or VAE tiling",
        *.needed_bytes as f64 / GIB,
        *.available_bytes as f64 / GIB
    )]
    OutOfMemory {
        /// What was estimated.
        what: String,
        /// The estimate in bytes.
        needed_bytes: u64,
        /// The memory available in bytes.
        available_bytes: u64,
    },
    /// The model source names nothing that can be loaded.
    #[error("model source `{source_name}`: {message}")]
    Source {
        /// The source as given.
        source_name: String,
        /// Why it cannot be loaded.
        message: String,
    },
}

const GIB: f64 = (1u64 << 30) as f64;

impl PipelineError {
    /// A [`PipelineError::Request`].
    pub fn request(field: &'static str, message: impl Into<String>) -> Self {
        Self::Request {
            field,
            message: message.into(),
        }
    }
}
