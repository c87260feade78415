use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::OneOrMany;
use crate::error::ConfigError;

/// A down block of `UNet2DConditionModel` (`down_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// ResNets interleaved with cross-attention transformers.
    CrossAttnDownBlock2D,
    /// ResNets only.
    DownBlock2D,
}

/// An up block of `UNet2DConditionModel` (`up_block_types`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// ResNets interleaved with cross-attention transformers.
    CrossAttnUpBlock2D,
    /// ResNets only.
    UpBlock2D,
}

fn d_in() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_lpb() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one() -> OneOrMany<usize> {
    OneOrMany::One(1)
}
fn d_heads() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_cross() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_kernel() -> usize {
    3
}
fn d_blocks() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<DownBlockType> {
    use DownBlockType::*;
    vec![
        CrossAttnDownBlock2D,
        CrossAttnDownBlock2D,
        CrossAttnDownBlock2D,
        DownBlock2D,
    ]
}
fn d_up() -> Vec<UpBlockType> {
    use UpBlockType::*;
    vec![
        UpBlock2D,
        CrossAttnUpBlock2D,
        CrossAttnUpBlock2D,
        CrossAttnUpBlock2D,
    ]
}
fn d_false() -> OneOrMany<bool> {
    OneOrMany::One(false)
}
fn d_one_usize() -> usize {
    1
}
fn d_f1() -> f64 {
    1.0
}

/// diffusers' `UNet2DConditionModel` config (`unet/config.json`).
///
/// Defaults are diffusers' constructor defaults. Fields SD 1.x/2.x leave at `null` /
/// defaults and that select other architectures (SDXL additions, class embeddings, ...)
/// are accepted only at their neutral value; [`Self::validate`] names any other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Input latent channels: 4, or 9 for inpainting (latents, mask, masked-image latents).
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Output channels.
    #[serde(default = "d_in")]
    pub out_channels: usize,
    /// Nominal latent size (informational).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Map the input from `[0, 1]` to `[-1, 1]` first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Sinusoidal embedding with cos first.
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the sinusoidal embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block kinds, highest resolution first.
    #[serde(default = "d_down")]
    pub down_block_types: Vec<DownBlockType>,
    /// Mid block kind; only `UNetMidBlock2DCrossAttn`.
    #[serde(default)]
    pub mid_block_type: Option<String>,
    /// Up block kinds, lowest resolution first.
    #[serde(default = "d_up")]
    pub up_block_types: Vec<UpBlockType>,
    /// Only `false` (every attention also self-attends).
    #[serde(default = "d_false")]
    pub only_cross_attention: OneOrMany<bool>,
    /// Channels per block.
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    /// ResNets per down block (up blocks have one more).
    #[serde(default = "d_lpb")]
    pub layers_per_block: OneOrMany<usize>,
    /// Padding of the down-sampling convs.
    #[serde(default = "d_one_usize")]
    pub downsample_padding: usize,
    /// Output scale of the mid block resnets (1 in SD).
    #[serde(default = "d_f1")]
    pub mid_block_scale_factor: f64,
    /// Dropout (inference ignores it).
    #[serde(default)]
    pub dropout: f64,
    /// Activation; only `silu`.
    #[serde(default)]
    pub act_fn: Option<String>,
    /// GroupNorm groups.
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of resnets and the output norm.
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    /// Width of the text conditioning (768 SD 1.x, 1024 SD 2.x).
    #[serde(default = "d_cross")]
    pub cross_attention_dim: OneOrMany<usize>,
    /// Transformer blocks per attention.
    #[serde(default = "d_one")]
    pub transformer_layers_per_block: OneOrMany<usize>,
    /// Only `null`.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Value>,
    /// Only `null`.
    #[serde(default)]
    pub encoder_hid_dim: Option<Value>,
    /// Only `null`.
    #[serde(default)]
    pub encoder_hid_dim_type: Option<Value>,
    /// Number of attention heads per block in SD 1.x/2.x configs (a diffusers naming bug:
    /// the head width is channels / this value) unless `num_attention_heads` is set.
    #[serde(default = "d_heads")]
    pub attention_head_dim: OneOrMany<usize>,
    /// Heads per block, when set (takes precedence over `attention_head_dim`).
    #[serde(default)]
    pub num_attention_heads: Option<OneOrMany<usize>>,
    /// Only `false`.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Linear (SD 2.x) or 1x1-conv (SD 1.x) projections in and out of the transformers.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Only `null`.
    #[serde(default)]
    pub class_embed_type: Option<Value>,
    /// `null`, or `text_time` (SDXL: the pooled text embedding and the
    /// micro-conditioning time ids, embedded and added to the time embedding).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Sinusoidal width of each time id (`text_time`; SDXL 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Unused without `addition_embed_type`.
    #[serde(default)]
    pub addition_embed_type_num_heads: Option<Value>,
    /// Only `null`.
    #[serde(default)]
    pub num_class_embeds: Option<Value>,
    /// Compute attention scores in f32 (SD 2.x; `null` in SDXL's config); this crate
    /// always does.
    #[serde(default, deserialize_with = "null_as_false")]
    pub upcast_attention: bool,
    /// Only `default`.
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// Only `false`.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Output scale of the resnets (1 in SD).
    #[serde(default = "d_f1")]
    pub resnet_out_scale_factor: f64,
    /// Only `positional`.
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    /// Only `null` (4 x block_out_channels\[0\]).
    #[serde(default)]
    pub time_embedding_dim: Option<Value>,
    /// Only `null`.
    #[serde(default)]
    pub time_embedding_act_fn: Option<Value>,
    /// Only `null`.
    #[serde(default)]
    pub timestep_post_act: Option<Value>,
    /// Width of the embedded guidance scale (LCM-distilled U-Nets: 256); `null`
    /// for none.
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel of `conv_in` (odd).
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out` (odd).
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    /// Input width of `add_embedding` (`text_time`: the pooled text width plus
    /// time ids x `addition_time_embed_dim`; SDXL 2816 = 1280 + 6 x 256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Only `default`.
    #[serde(default)]
    pub attention_type: Option<String>,
    /// Only `false`.
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// Only `null` or `false`.
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<Value>,
    /// Only `null`.
    #[serde(default)]
    pub cross_attention_norm: Option<Value>,
    /// Only `positional` style (informational).
    #[serde(default)]
    pub addition_embed_type_input: Option<Value>,
}

/// Per-block numbers resolved from a config.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedUNetBlocks {
    /// ResNets per down block.
    pub layers_per_block: Vec<usize>,
    /// Heads per block.
    pub num_heads: Vec<usize>,
    /// Cross-attention width per block.
    pub cross_attention_dim: Vec<usize>,
    /// Transformer layers per block.
    pub transformer_layers: Vec<usize>,
}

/// A boolean that diffusers may write as `null` (false).
fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn is_null_or(v: &Option<Value>, ok: impl Fn(&Value) -> bool) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(v) => ok(v),
    }
}

impl UNet2DConditionConfig {
    /// Parses and validates a `config.json`.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(json)?;
        config.validate()?;
        Ok(config)
    }

    /// Resolves the per-block lists (validated).
    pub fn blocks(&self) -> Result<ResolvedUNetBlocks, ConfigError> {
        let n = self.block_out_channels.len();
        let per = |v: &OneOrMany<usize>, field: &'static str| {
            v.per_block(n).ok_or_else(|| {
                ConfigError::unsupported(field, format!("expected one value or {n} values"))
            })
        };
        let num_heads = match &self.num_attention_heads {
            Some(h) => per(h, "num_attention_heads")?,
            None => per(&self.attention_head_dim, "attention_head_dim")?,
        };
        Ok(ResolvedUNetBlocks {
            layers_per_block: per(&self.layers_per_block, "layers_per_block")?,
            num_heads,
            cross_attention_dim: per(&self.cross_attention_dim, "cross_attention_dim")?,
            transformer_layers: per(
                &self.transformer_layers_per_block,
                "transformer_layers_per_block",
            )?,
        })
    }

    /// Rejects values this implementation cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn u(f: &'static str, m: impl Into<String>) -> ConfigError {
            ConfigError::unsupported(f, m)
        }
        crate::error::check_block_sizes(
            &self.block_out_channels,
            self.in_channels,
            self.out_channels,
            self.sample_size,
        )?;
        let n = self.block_out_channels.len();
        if self.down_block_types.len() != n {
            return Err(u(
                "down_block_types",
                format!(
                    "{} entries for {n} block_out_channels",
                    self.down_block_types.len()
                ),
            ));
        }
        if self.up_block_types.len() != n {
            return Err(u(
                "up_block_types",
                format!(
                    "{} entries for {n} block_out_channels",
                    self.up_block_types.len()
                ),
            ));
        }
        let blocks = self.blocks()?;
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
            if blocks.num_heads[i] == 0 || !c.is_multiple_of(blocks.num_heads[i]) {
                return Err(u(
                    "attention_head_dim",
                    format!(
                        "{} heads do not divide block_out_channels[{i}] = {c}",
                        blocks.num_heads[i]
                    ),
                ));
            }
        }
        if blocks.layers_per_block.contains(&0) {
            return Err(u("layers_per_block", "must be at least 1"));
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return Err(u("in_channels", "must be positive"));
        }
        match &self.only_cross_attention {
            OneOrMany::One(false) => {}
            OneOrMany::Many(v) if v.iter().all(|b| !b) => {}
            _ => return Err(u("only_cross_attention", "only `false` is supported")),
        }
        if let Some(t) = &self.mid_block_type
            && t != "UNetMidBlock2DCrossAttn"
        {
            return Err(u("mid_block_type", format!("`{t}` is not supported")));
        }
        if let Some(a) = &self.act_fn
            && a != "silu"
            && a != "swish"
        {
            return Err(u("act_fn", format!("`{a}` is not supported (only silu)")));
        }
        if let Some(t) = &self.resnet_time_scale_shift
            && t != "default"
        {
            return Err(u(
                "resnet_time_scale_shift",
                format!("`{t}` is not supported"),
            ));
        }
        if let Some(t) = &self.time_embedding_type
            && t != "positional"
        {
            return Err(u("time_embedding_type", format!("`{t}` is not supported")));
        }
        if let Some(t) = &self.attention_type
            && t != "default"
        {
            return Err(u("attention_type", format!("`{t}` is not supported")));
        }
        if self.dual_cross_attention {
            return Err(u("dual_cross_attention", "only `false` is supported"));
        }
        if self.resnet_skip_time_act {
            return Err(u("resnet_skip_time_act", "only `false` is supported"));
        }
        if self.class_embeddings_concat {
            return Err(u("class_embeddings_concat", "only `false` is supported"));
        }
        if let Some(d) = self.time_cond_proj_dim {
            crate::error::check_range("time_cond_proj_dim", d, crate::error::MAX_WIDTH)?;
        }
        match (
            self.addition_embed_type.as_deref(),
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (None, _, _) => {}
            (Some("text_time"), Some(t), Some(p)) => {
                crate::error::check_range("addition_time_embed_dim", t, crate::error::MAX_WIDTH)?;
                crate::error::check_range(
                    "projection_class_embeddings_input_dim",
                    p,
                    crate::error::MAX_WIDTH,
                )?;
            }
            (Some("text_time"), _, _) => {
                return Err(u(
                    "addition_embed_type",
                    "`text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim",
                ));
            }
            (Some(t), _, _) => {
                return Err(u(
                    "addition_embed_type",
                    format!("`{t}` is not supported (only text_time)"),
                ));
            }
        }
        let nulls: [(&'static str, &Option<Value>); 7] = [
            ("class_embed_type", &self.class_embed_type),
            ("num_class_embeds", &self.num_class_embeds),
            ("encoder_hid_dim", &self.encoder_hid_dim),
            ("encoder_hid_dim_type", &self.encoder_hid_dim_type),
            ("time_embedding_dim", &self.time_embedding_dim),
            ("time_embedding_act_fn", &self.time_embedding_act_fn),
            ("timestep_post_act", &self.timestep_post_act),
        ];
        for (field, v) in nulls {
            if !is_null_or(v, |_| false) {
                return Err(u(field, "only `null` is supported"));
            }
        }
        if !is_null_or(&self.reverse_transformer_layers_per_block, |_| false) {
            return Err(u(
                "reverse_transformer_layers_per_block",
                "only `null` is supported",
            ));
        }
        if !is_null_or(&self.cross_attention_norm, |_| false) {
            return Err(u("cross_attention_norm", "only `null` is supported"));
        }
        if !is_null_or(&self.mid_block_only_cross_attention, |v| {
            v == &Value::Bool(false)
        }) {
            return Err(u(
                "mid_block_only_cross_attention",
                "only `null` or `false` is supported",
            ));
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(u(field, format!("{k} is not an odd kernel size")));
            }
        }
        if !(self.freq_shift.is_finite()) {
            return Err(u("freq_shift", "must be finite"));
        }
        Ok(())
    }
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}
