use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Activation of the CLIP MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP-L (SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU, OpenCLIP-H (SD 2.x).
    Gelu,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}

/// transformers' `CLIPTextConfig` as stored in `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size (49408).
    pub vocab_size: usize,
    /// Embedding width (768 CLIP-L, 1024 OpenCLIP-H).
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Longest sequence (77).
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id; `2` means the legacy argmax pooling of the SD configs.
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    /// Beginning-of-text id (informational).
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    /// Padding id (informational; the tokenizer decides padding).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`; SDXL's second
    /// encoder: 1280); unused by a plain `CLIPTextModel`.
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// transformers' model classes; `CLIPTextModelWithProjection` adds the
    /// `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Dropout (inference ignores it).
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Attention dropout (inference ignores it).
    #[serde(default)]
    pub attention_dropout: Option<f64>,
    /// Init settings (unused at inference).
    #[serde(default)]
    pub initializer_range: Option<f64>,
    /// Init settings (unused at inference).
    #[serde(default)]
    pub initializer_factor: Option<f64>,
    /// `clip_text_model`.
    #[serde(default)]
    pub model_type: Option<String>,
}

impl ClipTextConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// The SD 1.x text encoder, OpenAI CLIP ViT-L/14.
    pub fn clip_vit_l_14() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
            bos_token_id: Some(0),
            pad_token_id: Some(1),
            projection_dim: Some(768),
            architectures: vec!["CLIPTextModel".into()],
            dropout: None,
            attention_dropout: None,
            initializer_range: None,
            initializer_factor: None,
            model_type: Some("clip_text_model".into()),
        }
    }

    /// The SD 2.x text encoder, OpenCLIP ViT-H/14 (23 of its 24 layers, as diffusers ships it).
    pub fn open_clip_vit_h_14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            hidden_act: ClipActivation::Gelu,
            projection_dim: Some(512),
            ..Self::clip_vit_l_14()
        }
    }

    /// SDXL's second text encoder, OpenCLIP ViT-bigG/14 with its projection
    /// (`CLIPTextModelWithProjection`, 32 layers, 1280 wide, projection 1280).
    pub fn open_clip_vit_bigg_14() -> Self {
        Self {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: ClipActivation::Gelu,
            projection_dim: Some(1280),
            architectures: vec!["CLIPTextModelWithProjection".into()],
            ..Self::clip_vit_l_14()
        }
    }

    /// The `text_projection` width, for a `CLIPTextModelWithProjection` config.
    pub fn text_projection_dim(&self) -> Option<usize> {
        self.architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
            .then_some(self.projection_dim)
            .flatten()
    }

    /// Rejects values the model cannot honour.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self
            .architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
            && self.projection_dim.is_none()
        {
            return Err(ConfigError::unsupported(
                "projection_dim",
                "CLIPTextModelWithProjection needs a projection_dim",
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ConfigError::unsupported(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        use crate::error::{MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, check_range};
        for (field, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_WIDTH,
            ),
        ] {
            check_range(field, v, max)?;
        }
        if let Some(p) = self.projection_dim {
            check_range("projection_dim", p, MAX_WIDTH)?;
        }
        Ok(())
    }
}
