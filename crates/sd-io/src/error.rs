//! The error type of `sd-io`.

use std::path::PathBuf;

use thiserror::Error;

/// At most this many keys are listed per category in a [`WeightsReport`].
pub const MAX_LISTED_KEYS: usize = 5;

/// Which tensors did not line up between a weight file and a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightsReport {
    /// Keys the model needs that the file lacks.
    pub missing: Vec<String>,
    /// Keys in the file the model does not use.
    pub unused: Vec<String>,
    /// Keys whose shape or dtype differs (`key: file ..., model ...`).
    pub mismatched: Vec<String>,
}

impl WeightsReport {
    /// No problem recorded.
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unused.is_empty() && self.mismatched.is_empty()
    }
}

fn list(keys: &[String]) -> String {
    let shown: Vec<&str> = keys
        .iter()
        .take(MAX_LISTED_KEYS)
        .map(|s| s.as_str())
        .collect();
    let more = keys.len().saturating_sub(MAX_LISTED_KEYS);
    if more > 0 {
        format!("{} (and {more} more)", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl std::fmt::Display for WeightsReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "{} missing: {}",
                self.missing.len(),
                list(&self.missing)
            ));
        }
        if !self.unused.is_empty() {
            parts.push(format!(
                "{} unused: {}",
                self.unused.len(),
                list(&self.unused)
            ));
        }
        if !self.mismatched.is_empty() {
            parts.push(format!(
                "{} mismatched: {}",
                self.mismatched.len(),
                list(&self.mismatched)
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Errors raised while reading models, weights and tokenizers.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IoError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file does not parse.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A config holds a value the models cannot honour.
    #[error("{}: {source}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        source: sd_models::ConfigError,
    },
    /// A safetensors file is truncated or corrupt.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Weights and model do not line up.
    #[error("weights for {component} from {}: {report}", path.display())]
    Weights {
        /// Which model (`unet`, `vae`, `text_encoder`).
        component: String,
        /// The weight file (or folder).
        path: PathBuf,
        /// The offending keys.
        report: WeightsReport,
    },
    /// A file or component the loader needs is absent.
    #[error("{}: not found ({what})", path.display())]
    NotFound {
        /// Where it was looked for.
        path: PathBuf,
        /// What was looked for.
        what: String,
    },
    /// The tokenizer could not be built or run.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A LoRA file does not fit the model it is applied to.
    #[error("LoRA {}: {source}", path.display())]
    Lora {
        /// The LoRA file.
        path: PathBuf,
        /// What does not fit.
        source: sd_models::lora::LoraError,
    },
    /// A model or file layout this crate does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// C2PA content credentials could not be made, signed or read (the `c2pa`
    /// feature): a certificate the C2PA profile refuses, a key that does not match
    /// it, a picture the SDK cannot embed into.
    #[error("content credentials: {0}")]
    ContentCredentials(String),
}

impl IoError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
