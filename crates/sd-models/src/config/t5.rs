use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, check_range};

fn d_eps() -> f64 {
    1e-6
}
fn d_buckets() -> usize {
    32
}
fn d_distance() -> usize {
    128
}
fn d_proj() -> String {
    "relu".into()
}

/// The feed-forward's activation, from `feed_forward_proj` (transformers' rules:
/// `gated-gelu` is the tanh `gelu_new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5Activation {
    /// `relu` (T5 v1.0).
    Relu,
    /// The tanh approximation of GELU (`gelu_new`; T5 v1.1, SD 3's T5-XXL).
    GeluNew,
    /// Exact GELU.
    Gelu,
    /// SiLU.
    Silu,
}

/// transformers' `T5Config` as stored in `text_encoder_3/config.json` (SD 3's
/// `T5EncoderModel`, T5-v1.1-XXL); decoder fields are read and ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct T5Config {
    /// Token vocabulary (32128).
    pub vocab_size: usize,
    /// Model width (4096 for XXL).
    pub d_model: usize,
    /// Width of each head (64).
    pub d_kv: usize,
    /// Feed-forward width (10240 for XXL).
    pub d_ff: usize,
    /// Encoder layers (24).
    pub num_layers: usize,
    /// Heads per layer (64).
    pub num_heads: usize,
    /// Relative position buckets (32).
    #[serde(default = "d_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Distance at which buckets stop growing (128).
    #[serde(default = "d_distance")]
    pub relative_attention_max_distance: usize,
    /// RMS norm epsilon (1e-6).
    #[serde(default = "d_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (v1.1), `relu` (v1.0), `gated-silu`, ...
    #[serde(default = "d_proj")]
    pub feed_forward_proj: String,
    /// `T5EncoderModel`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Padding id (0).
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    /// End-of-sequence id (1).
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    /// `t5`.
    #[serde(default)]
    pub model_type: Option<String>,
}

impl T5Config {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Whether the feed-forward is gated (`wi_0`, `wi_1`) and its activation.
    ///
    /// # Errors
    /// A `feed_forward_proj` transformers would refuse.
    pub fn activation(&self) -> Result<(bool, T5Activation), ConfigError> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, name) = match parts.as_slice() {
            [name] => (false, *name),
            ["gated", name] => (true, *name),
            _ => {
                return Err(ConfigError::unsupported(
                    "feed_forward_proj",
                    format!(
                        "`{}` is not `{{act}}` or `gated-{{act}}`",
                        self.feed_forward_proj
                    ),
                ));
            }
        };
        let act = match name {
            "relu" => T5Activation::Relu,
            "gelu" if gated => T5Activation::GeluNew,
            "gelu" => T5Activation::Gelu,
            "gelu_new" => T5Activation::GeluNew,
            "silu" | "swish" => T5Activation::Silu,
            o => {
                return Err(ConfigError::unsupported(
                    "feed_forward_proj",
                    format!("activation `{o}` is not relu, gelu, gelu_new or silu"),
                ));
            }
        };
        Ok((gated, act))
    }

    /// Rejects values the model cannot honour.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("vocab_size", self.vocab_size, MAX_VOCAB)?;
        check_range("d_model", self.d_model, MAX_WIDTH)?;
        check_range("d_kv", self.d_kv, MAX_WIDTH)?;
        check_range("d_ff", self.d_ff, 4 * MAX_WIDTH)?;
        check_range("num_layers", self.num_layers, MAX_LAYERS)?;
        check_range("num_heads", self.num_heads, MAX_WIDTH)?;
        check_range(
            "relative_attention_num_buckets",
            self.relative_attention_num_buckets,
            MAX_WIDTH,
        )?;
        if self.relative_attention_num_buckets < 4 {
            return Err(ConfigError::unsupported(
                "relative_attention_num_buckets",
                "must be at least 4 (half exact, half logarithmic, each direction)",
            ));
        }
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4 {
            return Err(ConfigError::unsupported(
                "relative_attention_max_distance",
                "must exceed a quarter of the buckets",
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(ConfigError::unsupported(
                "layer_norm_epsilon",
                "must be a positive number",
            ));
        }
        self.activation()?;
        Ok(())
    }
}
