use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, MAX_LAYERS, MAX_WIDTH, check_range};

fn d_image_size() -> usize {
    224
}
fn d_patch() -> usize {
    14
}
fn d3() -> usize {
    3
}
fn d_hidden() -> usize {
    768
}
fn d_reassemble_hidden() -> usize {
    384
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_eps() -> f64 {
    1e-6
}
fn d_one() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_gelu() -> String {
    "gelu".into()
}
/// Depth Anything's backbone when its config has none (transformers'
/// `sub_configs_defaults`): DINOv2 ViT-S/14 at 518, features of layers 9 to 12.
fn d_backbone() -> Dinov2Config {
    Dinov2Config {
        image_size: 518,
        hidden_size: 384,
        num_attention_heads: 6,
        out_indices: Some(vec![9, 10, 11, 12]),
        reshape_hidden_states: false,
        ..Default::default()
    }
}
fn d_factors() -> Vec<f64> {
    vec![4.0, 2.0, 1.0, 0.5]
}
fn d_neck() -> Vec<usize> {
    vec![48, 96, 192, 384]
}
fn d_fusion() -> usize {
    64
}
fn d_head_in() -> i64 {
    -1
}
fn d_head_hidden() -> usize {
    32
}

/// transformers' `Dinov2Config` as a backbone (`backbone_config` of a Depth Anything
/// `config.json`); the defaults are `Dinov2Config`'s (ViT-B/14 at 224, last layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dinov2Config {
    /// Width of the tokens.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// Transformer layers.
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads (dividing `hidden_size`).
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    /// The MLP is `hidden_size * mlp_ratio` wide.
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    /// The size the position embeddings were trained at (`(image_size / patch_size)^2`
    /// of them); other sizes get them resized bicubically.
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    /// Patch side in pixels.
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Image channels.
    #[serde(default = "d3")]
    pub num_channels: usize,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Initial layer scale (informational: the weights hold the learnt scales).
    #[serde(default = "d_one")]
    pub layerscale_value: f64,
    /// Whether q, k and v have biases.
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    /// The SwiGLU MLP of ViT-g (not supported: no Depth Anything V2 uses it).
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    /// Only `gelu` (exact).
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    /// The layers (1-based; 0 is the embeddings) whose outputs are the feature maps.
    #[serde(default)]
    pub out_indices: Option<Vec<usize>>,
    /// The same as `stageN` names, used when `out_indices` is absent.
    #[serde(default)]
    pub out_features: Option<Vec<String>>,
    /// Whether the feature maps go through the final LayerNorm.
    #[serde(default = "d_true")]
    pub apply_layernorm: bool,
    /// Whether the backbone reshapes its feature maps to images (`true` by default;
    /// Depth Anything's say `false`, the only value supported: the neck does it).
    #[serde(default = "d_true")]
    pub reshape_hidden_states: bool,
}

impl Default for Dinov2Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl Dinov2Config {
    /// The feature layers (1-based), from `out_indices`, else `out_features`, else
    /// the last layer.
    pub fn feature_layers(&self) -> Result<Vec<usize>, ConfigError> {
        if let Some(i) = &self.out_indices {
            return Ok(i.clone());
        }
        let Some(names) = self.out_features.as_deref() else {
            return Ok(vec![self.num_hidden_layers]);
        };
        names
            .iter()
            .map(|n| {
                n.strip_prefix("stage")
                    .and_then(|i| i.parse().ok())
                    .ok_or_else(|| {
                        ConfigError::unsupported("out_features", format!("{n}: expected stageN"))
                    })
            })
            .collect()
    }

    /// The MLP's hidden width, `int(hidden_size * mlp_ratio)`.
    pub fn mlp_hidden_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Rejects values this implementation cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_range("hidden_size", self.hidden_size, MAX_WIDTH)?;
        check_range("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        check_range("num_attention_heads", self.num_attention_heads, MAX_WIDTH)?;
        check_range("patch_size", self.patch_size, 1024)?;
        check_range("image_size", self.image_size, MAX_WIDTH)?;
        check_range("num_channels", self.num_channels, 64)?;
        check_range("mlp hidden size", self.mlp_hidden_size(), 4 * MAX_WIDTH)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ConfigError::unsupported(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.image_size < self.patch_size {
            return Err(ConfigError::unsupported(
                "image_size",
                "smaller than one patch",
            ));
        }
        if self.use_swiglu_ffn {
            return Err(ConfigError::unsupported(
                "use_swiglu_ffn",
                "the SwiGLU MLP (ViT-g) is not implemented",
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(ConfigError::unsupported(
                "hidden_act",
                format!("{}: only gelu", self.hidden_act),
            ));
        }
        if self.reshape_hidden_states {
            return Err(ConfigError::unsupported(
                "reshape_hidden_states",
                "Depth Anything's backbone hands token sequences to its neck (false)",
            ));
        }
        let layers = self.feature_layers()?;
        if layers.is_empty() || layers.iter().any(|&i| i > self.num_hidden_layers) {
            return Err(ConfigError::unsupported(
                "out_indices",
                format!(
                    "{layers:?}: expected layers within 0..={}",
                    self.num_hidden_layers
                ),
            ));
        }
        Ok(())
    }
}

/// Depth Anything's head: relative (inverse) depth through a ReLU, or metric depth
/// through a sigmoid times `max_depth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DepthEstimationType {
    /// Relative inverse depth (near is large), the V1/V2 base models.
    #[default]
    Relative,
    /// Metric depth in metres up to `max_depth` (the V2 metric fine-tunes).
    Metric,
}

/// transformers' `DepthAnythingConfig` (`config.json` of
/// `depth-anything/Depth-Anything-V2-Small-hf` and the other sizes); the defaults are
/// transformers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthAnythingConfig {
    /// The DINOv2 backbone (a timm `backbone` name is not supported).
    #[serde(default = "d_backbone")]
    pub backbone_config: Dinov2Config,
    /// Patch side in pixels (the backbone's).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// Channels of the backbone's feature maps (its `hidden_size`).
    #[serde(default = "d_reassemble_hidden")]
    pub reassemble_hidden_size: usize,
    /// Per feature map: upsample by a transposed convolution (> 1), keep (1) or
    /// downsample by a strided convolution (< 1, the reciprocal an integer).
    #[serde(default = "d_factors")]
    pub reassemble_factors: Vec<f64>,
    /// Per feature map: the width it is projected to.
    #[serde(default = "d_neck")]
    pub neck_hidden_sizes: Vec<usize>,
    /// Width of the fusion stage.
    #[serde(default = "d_fusion")]
    pub fusion_hidden_size: usize,
    /// Which fused map the head reads (Python indexing: -1 is the finest).
    #[serde(default = "d_head_in")]
    pub head_in_index: i64,
    /// Width of the head's second convolution.
    #[serde(default = "d_head_hidden")]
    pub head_hidden_size: usize,
    /// Relative or metric.
    #[serde(default)]
    pub depth_estimation_type: DepthEstimationType,
    /// The metric head's range (ignored for relative depth, whose scale is 1).
    #[serde(default)]
    pub max_depth: Option<f64>,
    /// A timm backbone name; only `null` is supported.
    #[serde(default)]
    pub backbone: Option<String>,
}

impl DepthAnythingConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// The head's output scale: `max_depth` (default 1).
    pub fn max_depth(&self) -> f64 {
        self.max_depth.unwrap_or(1.0)
    }

    /// The index into the fused maps the head reads.
    pub fn head_index(&self) -> Result<usize, ConfigError> {
        let n = self.neck_hidden_sizes.len() as i64;
        let i = if self.head_in_index < 0 {
            n + self.head_in_index
        } else {
            self.head_in_index
        };
        if (0..n).contains(&i) {
            Ok(i as usize)
        } else {
            Err(ConfigError::unsupported(
                "head_in_index",
                format!("{} with {n} fused maps", self.head_in_index),
            ))
        }
    }

    /// Rejects values this implementation cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let b = &self.backbone_config;
        b.validate()?;
        if let Some(name) = &self.backbone {
            return Err(ConfigError::unsupported(
                "backbone",
                format!("{name}: only the DINOv2 of backbone_config"),
            ));
        }
        if self.patch_size != b.patch_size {
            return Err(ConfigError::unsupported(
                "patch_size",
                format!("{} but the backbone's is {}", self.patch_size, b.patch_size),
            ));
        }
        if self.reassemble_hidden_size != b.hidden_size {
            return Err(ConfigError::unsupported(
                "reassemble_hidden_size",
                format!(
                    "{} but the backbone is {} wide",
                    self.reassemble_hidden_size, b.hidden_size
                ),
            ));
        }
        let n = b.feature_layers()?.len();
        if self.neck_hidden_sizes.len() != n || self.reassemble_factors.len() != n {
            return Err(ConfigError::unsupported(
                "neck_hidden_sizes",
                format!(
                    "{} sizes and {} reassemble factors for {n} feature maps",
                    self.neck_hidden_sizes.len(),
                    self.reassemble_factors.len()
                ),
            ));
        }
        for &c in &self.neck_hidden_sizes {
            check_range("neck_hidden_sizes", c, MAX_WIDTH)?;
        }
        for &f in &self.reassemble_factors {
            reassemble_resize(f)?;
        }
        check_range("fusion_hidden_size", self.fusion_hidden_size, MAX_WIDTH)?;
        if self.fusion_hidden_size < 2 {
            return Err(ConfigError::unsupported(
                "fusion_hidden_size",
                "the head halves it",
            ));
        }
        check_range("head_hidden_size", self.head_hidden_size, MAX_WIDTH)?;
        self.head_index()?;
        if !self.max_depth().is_finite() || self.max_depth() <= 0.0 {
            return Err(ConfigError::unsupported("max_depth", "must be positive"));
        }
        Ok(())
    }
}

/// How a reassemble layer resizes its map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReassembleResize {
    /// A transposed convolution of kernel and stride `n`.
    Up(usize),
    /// None.
    Keep,
    /// A 3x3 convolution of stride `n`, padding 1.
    Down(usize),
}

/// Reads one of `reassemble_factors` as transformers does (`int(1 / factor)` strides).
pub fn reassemble_resize(factor: f64) -> Result<ReassembleResize, ConfigError> {
    let bad = || {
        ConfigError::unsupported(
            "reassemble_factors",
            format!("{factor}: expected an integer >= 1 or the reciprocal of one"),
        )
    };
    if !factor.is_finite() || factor <= 0.0 {
        return Err(bad());
    }
    if factor == 1.0 {
        Ok(ReassembleResize::Keep)
    } else if factor > 1.0 {
        if factor.fract() != 0.0 || factor > 64.0 {
            return Err(bad());
        }
        Ok(ReassembleResize::Up(factor as usize))
    } else {
        let stride = (1.0 / factor) as usize;
        if !(2..=64).contains(&stride) {
            return Err(bad());
        }
        Ok(ReassembleResize::Down(stride))
    }
}
