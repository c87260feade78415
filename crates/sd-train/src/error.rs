//! Errors of training.

use std::path::PathBuf;

use thiserror::Error;

/// Errors raised while preparing or running training.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TrainError {
    /// Reading or writing models, weights or LoRA files failed.
    #[error(transparent)]
    Io(#[from] sd_io::IoError),
    /// A scheduler or pipeline rejected its input.
    #[error(transparent)]
    Core(#[from] sd_core::CoreError),
    /// LoRA layers do not fit the model.
    #[error(transparent)]
    Lora(#[from] sd_models::lora::LoraError),
    /// A training setting the trainer cannot honour.
    #[error("training config: {0}")]
    Config(String),
    /// The data set folder is unusable.
    #[error("data set {}: {message}", path.display())]
    Data {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file of the run (log, checkpoint, state) could not be read or written.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl TrainError {
    pub(crate) fn file(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            message: e.to_string(),
        }
    }
}
