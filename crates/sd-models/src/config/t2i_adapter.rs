use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The architecture of a T2I-Adapter (`adapter_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterType {
    /// `FullAdapter` (SD 1.x / 2.x): conv_in, then one block per width, each but
    /// the first halving the size.
    FullAdapter,
    /// `FullAdapterXL` (SDXL): four blocks, only the third halving the size.
    FullAdapterXl,
    /// `LightAdapter`: narrow blocks (a quarter of each width) without conv_in, one
    /// more block than widths.
    LightAdapter,
}

fn d_in() -> usize {
    3
}
fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_res() -> usize {
    2
}
fn d_factor() -> usize {
    8
}
fn d_type() -> AdapterType {
    AdapterType::FullAdapter
}

/// diffusers' `T2IAdapter` config (`config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T2IAdapterConfig {
    /// Channels of the control image (3, or 1 for grey sketches).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Widths of the blocks (each a feature map the U-Net gets).
    #[serde(default = "d_channels")]
    pub channels: Vec<usize>,
    /// Residual blocks per block.
    #[serde(default = "d_res")]
    pub num_res_blocks: usize,
    /// The pixel-unshuffle factor: the first feature is the image divided by it.
    #[serde(default = "d_factor")]
    pub downscale_factor: usize,
    /// The architecture.
    #[serde(default = "d_type")]
    pub adapter_type: AdapterType,
}

impl T2IAdapterConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values this implementation cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use crate::error::{MAX_LAYERS, MAX_WIDTH, check_range};
        check_range("in_channels", self.in_channels, 64)?;
        check_range("num_res_blocks", self.num_res_blocks, MAX_LAYERS)?;
        check_range("downscale_factor", self.downscale_factor, 64)?;
        if self.channels.is_empty() || self.channels.len() > 8 {
            return Err(ConfigError::unsupported(
                "channels",
                format!("{} entries, expected 1 to 8", self.channels.len()),
            ));
        }
        for &c in &self.channels {
            check_range("channels", c, MAX_WIDTH)?;
            if self.adapter_type == AdapterType::LightAdapter && c < 4 {
                return Err(ConfigError::unsupported(
                    "channels",
                    format!("{c}: a light adapter's blocks are a quarter as wide"),
                ));
            }
        }
        if self.adapter_type == AdapterType::FullAdapterXl && self.channels.len() < 3 {
            return Err(ConfigError::unsupported(
                "channels",
                "full_adapter_xl needs at least 3 widths",
            ));
        }
        Ok(())
    }
}
