use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, MAX_LAYERS, MAX_WIDTH, check_range};

fn d_sample() -> usize {
    128
}
fn d_patch() -> usize {
    2
}
fn d_channels() -> usize {
    16
}

/// diffusers' `SD3Transformer2DModel` config (`transformer/config.json`): SD 3
/// Medium, SD 3.5 Large / Large Turbo (no dual attention, no q/k norm in SD 3) and
/// SD 3.5 Medium (MMDiT-X: `dual_attention_layers`, `qk_norm: "rms_norm"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SD3Transformer2DConfig {
    /// Latent side the position table was trained for (128); its patch count is the
    /// table's base size.
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    /// Latent patch side (2).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Latent channels in (16).
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    /// Joint transformer blocks (24 Medium, 38 Large).
    pub num_layers: usize,
    /// Width of each head (64).
    pub attention_head_dim: usize,
    /// Heads (24 Medium, 38 Large); the model width is heads x head width.
    pub num_attention_heads: usize,
    /// Width of the text states in (4096: the T5 width).
    pub joint_attention_dim: usize,
    /// Width the text states are projected to (the model width).
    pub caption_projection_dim: usize,
    /// Width of the pooled CLIP embedding (2048 = 768 + 1280).
    pub pooled_projection_dim: usize,
    /// Latent channels out (16).
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    /// Side of the 2-D sin-cos position table the image's patches are cropped from
    /// (192 Large, 384 Medium 3.5).
    pub pos_embed_max_size: usize,
    /// Blocks with the second (image-only) attention of MMDiT-X.
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// `null` or `rms_norm` (per-head RMS norm of queries and keys).
    #[serde(default)]
    pub qk_norm: Option<String>,
}

impl SD3Transformer2DConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// The model width, `num_attention_heads * attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Whether queries and keys get an RMS norm.
    pub fn qk_rms_norm(&self) -> bool {
        self.qk_norm.as_deref() == Some("rms_norm")
    }

    /// Rejects values the model cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("sample_size", self.sample_size, MAX_WIDTH)?;
        check_range("patch_size", self.patch_size, 64)?;
        check_range("in_channels", self.in_channels, MAX_WIDTH)?;
        check_range("out_channels", self.out_channels, MAX_WIDTH)?;
        check_range("num_layers", self.num_layers, MAX_LAYERS)?;
        check_range("attention_head_dim", self.attention_head_dim, MAX_WIDTH)?;
        check_range("num_attention_heads", self.num_attention_heads, MAX_WIDTH)?;
        check_range("inner_dim", self.inner_dim(), MAX_WIDTH)?;
        check_range("joint_attention_dim", self.joint_attention_dim, MAX_WIDTH)?;
        check_range(
            "pooled_projection_dim",
            self.pooled_projection_dim,
            MAX_WIDTH,
        )?;
        check_range("pos_embed_max_size", self.pos_embed_max_size, MAX_WIDTH)?;
        if self.caption_projection_dim != self.inner_dim() {
            return Err(ConfigError::unsupported(
                "caption_projection_dim",
                format!(
                    "{} must equal the model width {} (heads x head width): the text and \
                     image tokens attend jointly",
                    self.caption_projection_dim,
                    self.inner_dim()
                ),
            ));
        }
        if !self.inner_dim().is_multiple_of(4) {
            return Err(ConfigError::unsupported(
                "attention_head_dim",
                "the model width must be a multiple of 4 (2-D sin-cos positions)",
            ));
        }
        if self.sample_size < self.patch_size {
            return Err(ConfigError::unsupported(
                "sample_size",
                "must be at least one patch",
            ));
        }
        if let Some(&l) = self
            .dual_attention_layers
            .iter()
            .find(|&&l| l >= self.num_layers)
        {
            return Err(ConfigError::unsupported(
                "dual_attention_layers",
                format!("{l} is not a block (num_layers {})", self.num_layers),
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => Ok(()),
            Some(o) => Err(ConfigError::unsupported(
                "qk_norm",
                format!("`{o}` is not supported (null or rms_norm)"),
            )),
        }
    }
}
