use serde::{Deserialize, Serialize};

use super::{DownBlockType, UNet2DConditionConfig, UpBlockType};
use crate::error::ConfigError;

fn d_three() -> usize {
    3
}
fn d_rgb() -> String {
    "rgb".into()
}
fn d_embedding_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}

/// diffusers' `ControlNetModel` config (`controlnet/config.json`): the U-Net fields
/// of its encoder half (the down blocks, the mid block, the time and SDXL text-time
/// embeddings, read as in [`UNet2DConditionConfig`]) plus the control image's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlNetConfig {
    /// The fields the ControlNet shares with the U-Net it copies. `up_block_types`
    /// and `out_channels` do not apply: [`Self::from_json`] mirrors the down blocks.
    #[serde(flatten)]
    pub unet: UNet2DConditionConfig,
    /// Channels of the control image (3).
    #[serde(default = "d_three")]
    pub conditioning_channels: usize,
    /// `rgb`, or `bgr` (the control image's channels are flipped first).
    #[serde(default = "d_rgb")]
    pub controlnet_conditioning_channel_order: String,
    /// Widths of `controlnet_cond_embedding`'s convs: one stride-2 step between
    /// consecutive entries, so 4 entries bring the image down by 8 (the VAE's factor).
    #[serde(default = "d_embedding_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Pool the residuals over space (shuffle-style ControlNets); such a model runs
    /// in guess mode.
    #[serde(default)]
    pub global_pool_conditions: bool,
}

impl ControlNetConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let mut config: Self = serde_json::from_str(json)?;
        config.mirror_up_blocks();
        config.validate()?;
        Ok(config)
    }

    /// Fills the U-Net fields a ControlNet lacks (`up_block_types`, `out_channels`)
    /// from its down blocks, so the shared validation applies.
    pub fn mirror_up_blocks(&mut self) {
        self.unet.up_block_types = self
            .unet
            .down_block_types
            .iter()
            .rev()
            .map(|d| match d {
                DownBlockType::CrossAttnDownBlock2D => UpBlockType::CrossAttnUpBlock2D,
                DownBlockType::DownBlock2D => UpBlockType::UpBlock2D,
            })
            .collect();
        self.unet.out_channels = self.unet.in_channels;
    }

    /// How much larger the control image is than the latents: `2^(entries - 1)`.
    pub fn downscale_factor(&self) -> usize {
        1 << self
            .conditioning_embedding_out_channels
            .len()
            .saturating_sub(1)
    }

    /// Rejects values this implementation cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.unet.validate()?;
        crate::error::check_range(
            "conditioning_channels",
            self.conditioning_channels,
            crate::error::MAX_WIDTH,
        )?;
        let c = &self.conditioning_embedding_out_channels;
        if c.is_empty() || c.len() > 8 {
            return Err(ConfigError::unsupported(
                "conditioning_embedding_out_channels",
                format!("{} entries, expected 1 to 8", c.len()),
            ));
        }
        for &w in c {
            crate::error::check_range(
                "conditioning_embedding_out_channels",
                w,
                crate::error::MAX_WIDTH,
            )?;
        }
        match self.controlnet_conditioning_channel_order.as_str() {
            "rgb" | "bgr" => {}
            o => {
                return Err(ConfigError::unsupported(
                    "controlnet_conditioning_channel_order",
                    format!("`{o}` is not supported (rgb or bgr)"),
                ));
            }
        }
        if self.unet.time_cond_proj_dim.is_some() {
            return Err(ConfigError::unsupported(
                "time_cond_proj_dim",
                "a ControlNet takes no embedded guidance scale",
            ));
        }
        Ok(())
    }
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        let mut c: Self = serde_json::from_str("{}").expect("defaults parse");
        c.mirror_up_blocks();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sd15_controlnet() {
        let c = ControlNetConfig::default();
        assert_eq!(c.unet.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.downscale_factor(), 8);
        assert_eq!(c.unet.up_block_types.len(), 4);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = ControlNetConfig::from_json(r#"{"controlnet_conditioning_channel_order": "xyz"}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("controlnet_conditioning_channel_order")
        );
        let e = ControlNetConfig::from_json(r#"{"conditioning_embedding_out_channels": []}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("conditioning_embedding_out_channels")
        );
    }
}
