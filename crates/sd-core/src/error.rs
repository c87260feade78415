//! The error type of the pipelines and other code in this crate.

use thiserror::Error;

/// Errors raised by the pipelines and helpers of `sd-core`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CoreError {
    /// An argument a caller passed cannot be honoured (e.g. a size not divisible by 8).
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument {
        /// The argument's name.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A config value that cannot be honoured (scheduler configs, ...).
    #[error("config field `{field}`: {message}")]
    Config {
        /// The field's name as in the JSON file.
        field: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// A tensor whose shape a model or scheduler cannot take.
    #[error("shape of `{name}`: {message}")]
    Shape {
        /// The argument's name.
        name: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A step index past the end of a scheduler run.
    #[error("step {index} is past the end of a {len}-step run")]
    StepOutOfRange {
        /// The index asked for.
        index: usize,
        /// The run's length.
        len: usize,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The run was cancelled by the step callback.
    #[error("cancelled at step {0}")]
    Cancelled(usize),
    /// A combination of models or options this crate does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The device cannot run anything (no driver, no adapter, ...).
    #[error("device {device} is not usable: {message}")]
    Device {
        /// The device as burn names it.
        device: String,
        /// What failed, as the backend said it.
        message: String,
    },
}

impl CoreError {
    /// A [`CoreError::Shape`].
    pub fn shape(name: &'static str, message: impl Into<String>) -> Self {
        Self::Shape {
            name,
            message: message.into(),
        }
    }

    /// A [`CoreError::InvalidArgument`].
    pub fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name,
            message: message.into(),
        }
    }

    /// Checks a step index against a run's length.
    pub fn check_step(index: usize, len: usize) -> Result<(), Self> {
        if index < len {
            Ok(())
        } else {
            Err(Self::StepOutOfRange { index, len })
        }
    }
}
