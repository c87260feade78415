//! Errors raised while reading or validating a model config.

use thiserror::Error;

/// A config value this crate cannot honour, or a config file that does not parse.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The JSON does not parse into the config struct.
    #[error("config does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    /// A field holds a value the model cannot honour.
    #[error("config field `{field}`: {message}")]
    Unsupported {
        /// The field's name as it appears in `config.json`.
        field: &'static str,
        /// Why the value cannot be honoured.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn unsupported(field: &'static str, message: impl Into<String>) -> Self {
        Self::Unsupported {
            field,
            message: message.into(),
        }
    }
}

/// The largest width (channels, hidden size), layer count and vocabulary a config may
/// ask for: far above any Stable Diffusion model, low enough that no weight's element
/// count overflows.
pub(crate) const MAX_WIDTH: usize = 1 << 16;
pub(crate) const MAX_LAYERS: usize = 1 << 10;
pub(crate) const MAX_VOCAB: usize = 1 << 22;

/// Checks `value` of `field` is in `1..=max`.
pub(crate) fn check_range(
    field: &'static str,
    value: usize,
    max: usize,
) -> Result<(), ConfigError> {
    if (1..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::unsupported(
            field,
            format!("{value} is outside 1..={max}"),
        ))
    }
}

/// The sizes the U-Net and the VAE configs share: 1 to 8 levels of
/// `block_out_channels`, each width, `in_channels`, `out_channels` and `sample_size`
/// within [`MAX_WIDTH`].
pub(crate) fn check_block_sizes(
    block_out_channels: &[usize],
    in_channels: usize,
    out_channels: usize,
    sample_size: Option<usize>,
) -> Result<(), ConfigError> {
    if block_out_channels.is_empty() || block_out_channels.len() > 8 {
        return Err(ConfigError::unsupported(
            "block_out_channels",
            "must have 1 to 8 entries",
        ));
    }
    for &c in block_out_channels {
        check_range("block_out_channels", c, MAX_WIDTH)?;
    }
    check_range("in_channels", in_channels, MAX_WIDTH)?;
    check_range("out_channels", out_channels, MAX_WIDTH)?;
    if let Some(s) = sample_size {
        check_range("sample_size", s, MAX_WIDTH)?;
    }
    Ok(())
}
