use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ConfigError;

fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d1() -> usize {
    1
}
fn d32() -> usize {
    32
}
fn d_true() -> bool {
    true
}
fn d_blocks() -> Vec<usize> {
    vec![64]
}
fn d_scale() -> f64 {
    0.18215
}

/// diffusers' `AutoencoderKL` config (`vae/config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    #[serde(default = "d3")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "d3")]
    pub out_channels: usize,
    /// Only `DownEncoderBlock2D`, one per level.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Only `UpDecoderBlock2D`, one per level.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels per level; `n` levels downscale by `2^(n-1)`.
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder level (decoder levels have one more).
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    /// Only `silu`.
    #[serde(default)]
    pub act_fn: Option<String>,
    /// Latent channels (4 in SD).
    #[serde(default = "d4")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    /// Nominal image size (informational).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latent scaling factor (0.18215 SD 1.x/2.x).
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    /// The latent shift (SD 3: 0.0609; `null` or absent: none).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Only `null`.
    #[serde(default)]
    pub latents_mean: Option<Value>,
    /// Only `null`.
    #[serde(default)]
    pub latents_std: Option<Value>,
    /// Whether fp16 pipelines should run the VAE in f32 (informational).
    #[serde(default)]
    pub force_upcast: Option<bool>,
    /// Encoder output projection present.
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    /// Decoder input projection present.
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    /// Self-attention in the mid blocks.
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl AutoencoderKLConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Spatial factor between images and latents.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Rejects values this implementation cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn u(f: &'static str, m: impl Into<String>) -> ConfigError {
            ConfigError::unsupported(f, m)
        }
        use crate::error::{MAX_LAYERS, MAX_WIDTH, check_block_sizes, check_range};
        check_block_sizes(
            &self.block_out_channels,
            self.in_channels,
            self.out_channels,
            self.sample_size,
        )?;
        check_range("latent_channels", self.latent_channels, MAX_WIDTH)?;
        check_range("layers_per_block", self.layers_per_block, MAX_LAYERS)?;
        let n = self.block_out_channels.len();
        if !self.down_block_types.is_empty() && self.down_block_types.len() != n {
            return Err(u("down_block_types", format!("expected {n} entries")));
        }
        if !self.up_block_types.is_empty() && self.up_block_types.len() != n {
            return Err(u("up_block_types", format!("expected {n} entries")));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(u("down_block_types", format!("`{t}` is not supported")));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(u("up_block_types", format!("`{t}` is not supported")));
        }
        if let Some(a) = &self.act_fn
            && a != "silu"
            && a != "swish"
        {
            return Err(u("act_fn", format!("`{a}` is not supported (only silu)")));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(u(
                    "norm_num_groups",
                    format!(
                        "{} does not divide block_out_channels[{i}] = {c}",
                        self.norm_num_groups
                    ),
                ));
            }
        }
        if self.layers_per_block == 0 {
            return Err(u("layers_per_block", "must be at least 1"));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return Err(u("shift_factor", "must be a finite number or null"));
        }
        for (field, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if !matches!(v, None | Some(Value::Null)) {
                return Err(u(field, "only `null` is supported"));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(u("scaling_factor", "must be a positive number"));
        }
        Ok(())
    }
}
