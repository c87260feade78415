use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d2() -> usize {
    2
}
fn d_widths() -> Vec<usize> {
    vec![64; 4]
}
fn d_encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn d_decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}
fn d_relu() -> String {
    "relu".into()
}
fn d_nearest() -> String {
    "nearest".into()
}
fn d_magnitude() -> f64 {
    3.0
}
fn d_shift() -> f64 {
    0.5
}
fn d_one() -> f64 {
    1.0
}

/// diffusers' `AutoencoderTiny` config (TAESD, TAESDXL: `config.json` of
/// `madebyollin/taesd`); the defaults are diffusers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderTinyConfig {
    /// Image channels in.
    #[serde(default = "d3")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "d3")]
    pub out_channels: usize,
    /// Encoder width per level (all equal: `AutoencoderTiny` requires it).
    #[serde(default = "d_widths")]
    pub encoder_block_out_channels: Vec<usize>,
    /// Decoder width per level (all equal).
    #[serde(default = "d_widths")]
    pub decoder_block_out_channels: Vec<usize>,
    /// Only `relu`.
    #[serde(default = "d_relu")]
    pub act_fn: String,
    /// Only `nearest`.
    #[serde(default = "d_nearest")]
    pub upsample_fn: String,
    /// Latent channels (4 in SD).
    #[serde(default = "d4")]
    pub latent_channels: usize,
    /// The decoder's upsampling factor per level (2).
    #[serde(default = "d2")]
    pub upsampling_scaling_factor: usize,
    /// `AutoencoderTinyBlock`s per encoder level; `n` levels downscale by `2^(n-1)`.
    #[serde(default = "d_encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    /// `AutoencoderTinyBlock`s per decoder level.
    #[serde(default = "d_decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    /// Latent range for [`crate::AutoencoderTiny::scale_latents`] (3).
    #[serde(default = "d_magnitude")]
    pub latent_magnitude: f64,
    /// Latent offset for [`crate::AutoencoderTiny::scale_latents`] (0.5).
    #[serde(default = "d_shift")]
    pub latent_shift: f64,
    /// Whether fp16 pipelines should run it in f32 (informational).
    #[serde(default)]
    pub force_upcast: Option<bool>,
    /// Latent scaling factor: 1.0, TAESD takes the diffusion latents as they are.
    #[serde(default = "d_one")]
    pub scaling_factor: f64,
    /// The latent shift (0; TAESD3 for SD 3: 0.0609).
    #[serde(default)]
    pub shift_factor: f64,
}

impl AutoencoderTinyConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Spatial factor between images and latents (`2^(levels - 1)`: 8 for TAESD).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.num_encoder_blocks.len() - 1)
    }

    /// Rejects values this implementation cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use crate::error::{MAX_LAYERS, MAX_WIDTH, check_block_sizes, check_range};
        fn u(f: &'static str, m: impl Into<String>) -> ConfigError {
            ConfigError::unsupported(f, m)
        }
        check_block_sizes(
            &self.encoder_block_out_channels,
            self.in_channels,
            self.out_channels,
            None,
        )?;
        check_block_sizes(&self.decoder_block_out_channels, 1, 1, None)?;
        check_range("latent_channels", self.latent_channels, MAX_WIDTH)?;
        let n = self.encoder_block_out_channels.len();
        for (field, v) in [
            ("num_encoder_blocks", &self.num_encoder_blocks),
            ("num_decoder_blocks", &self.num_decoder_blocks),
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
            ),
        ] {
            if v.len() != n {
                return Err(u(field, format!("expected {n} entries, one per level")));
            }
        }
        for &b in self
            .num_encoder_blocks
            .iter()
            .chain(&self.num_decoder_blocks)
        {
            if b > MAX_LAYERS {
                return Err(u("num_encoder_blocks", format!("{b} blocks is too many")));
            }
        }
        for (field, v) in [
            (
                "encoder_block_out_channels",
                &self.encoder_block_out_channels,
            ),
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
            ),
        ] {
            if v.iter().any(|&c| c != v[0]) {
                return Err(u(field, "all levels must have the same width"));
            }
        }
        if self.act_fn != "relu" {
            return Err(u(
                "act_fn",
                format!("`{}` is not supported (only relu)", self.act_fn),
            ));
        }
        if self.upsample_fn != "nearest" {
            return Err(u(
                "upsample_fn",
                format!("`{}` is not supported (only nearest)", self.upsample_fn),
            ));
        }
        if self.upsampling_scaling_factor != 2 {
            return Err(u("upsampling_scaling_factor", "only 2 is supported"));
        }
        if !self.shift_factor.is_finite() {
            return Err(u("shift_factor", "must be a finite number"));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(u("scaling_factor", "must be a positive number"));
        }
        if !(self.latent_magnitude.is_finite() && self.latent_magnitude > 0.0) {
            return Err(u("latent_magnitude", "must be a positive number"));
        }
        if !self.latent_shift.is_finite() {
            return Err(u("latent_shift", "must be a finite number"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::AutoencoderTinyConfig;

    #[test]
    fn defaults_are_taesd() {
        let c = AutoencoderTinyConfig::from_json("{}").unwrap();
        assert_eq!(c.downscale_factor(), 8);
        assert_eq!(c.num_decoder_blocks, vec![3, 3, 3, 1]);
    }

    #[test]
    fn unequal_widths_and_other_activations_are_refused() {
        let e = AutoencoderTinyConfig::from_json(r#"{"encoder_block_out_channels":[64,32,64,64]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("same width"), "{e}");
        let e = AutoencoderTinyConfig::from_json(r#"{"act_fn":"silu"}"#).unwrap_err();
        assert!(e.to_string().contains("act_fn"), "{e}");
        let e = AutoencoderTinyConfig::from_json(r#"{"num_decoder_blocks":[1,1]}"#).unwrap_err();
        assert!(e.to_string().contains("num_decoder_blocks"), "{e}");
    }
}
