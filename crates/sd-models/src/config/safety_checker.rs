//! The safety checker's `config.json`: transformers' `CLIPConfig`, of which
//! diffusers' `StableDiffusionSafetyChecker` uses the vision tower and the
//! projection width.

use serde::{Deserialize, Serialize};

use crate::config::ClipActivation;
use crate::error::{ConfigError, MAX_WIDTH, check_range};

fn default_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}
fn default_act() -> ClipActivation {
    ClipActivation::QuickGelu
}

/// transformers' `CLIPVisionConfig` (`vision_config` of a `CLIPConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Width (1024 for CLIP ViT-L/14).
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Side of the square pictures it takes (224).
    pub image_size: usize,
    /// Side of a patch (14).
    pub patch_size: usize,
    /// Picture channels (3).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// MLP activation (`quick_gelu` for OpenAI's CLIP).
    #[serde(default = "default_act")]
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Checks the sizes fit together.
    ///
    /// # Errors
    /// [`ConfigError::Unsupported`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ] {
            check_range(field, v, MAX_WIDTH)?;
        }
        if self.num_hidden_layers > 256 {
            return Err(ConfigError::unsupported(
                "num_hidden_layers",
                format!("{} is out of range", self.num_hidden_layers),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::unsupported(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if !self.image_size.is_multiple_of(self.patch_size) {
            return Err(ConfigError::unsupported(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        Ok(())
    }

    /// Patches per picture (without the class token).
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// `safety_checker/config.json` (a `CLIPConfig`; its `text_config` is not used).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SafetyCheckerConfig {
    /// The vision tower.
    pub vision_config: ClipVisionConfig,
    /// Width of `visual_projection` and the concept embeddings (768).
    pub projection_dim: usize,
}

impl SafetyCheckerConfig {
    /// Parses and validates a `config.json`.
    ///
    /// # Errors
    /// JSON that does not parse, sizes that do not fit.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the vision tower and the projection width.
    ///
    /// # Errors
    /// [`ConfigError::Unsupported`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.vision_config.validate()?;
        check_range("projection_dim", self.projection_dim, MAX_WIDTH)
    }

    /// `CompVis/stable-diffusion-safety-checker`'s: CLIP ViT-L/14 (1024 wide, 24
    /// layers, 16 heads, 224-pixel pictures in 14-pixel patches), projection 768.
    pub fn clip_vit_l_14() -> Self {
        Self {
            vision_config: ClipVisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                image_size: 224,
                patch_size: 14,
                num_channels: 3,
                hidden_act: ClipActivation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: 768,
        }
    }
}
