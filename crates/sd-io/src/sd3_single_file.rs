//! SD 3 / SD 3.5 original single files (`sd3_medium*.safetensors`,
//! `sd3.5_large.safetensors`, `sd3.5_medium.safetensors`): the MMDiT under
//! `model.diffusion_model.*` in its original naming, the 16-channel VAE under
//! `first_stage_model.*`, and, in the files that include them, the text encoders
//! under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (transformers naming).
//! Text encoders kept in files of their own (ComfyUI's `clip_l.safetensors`,
//! `clip_g.safetensors`, `t5xxl_fp16.safetensors`) load through
//! [`clip_text_encoder_from_file`] and [`t5_encoder_from_file`].
//!
//! The MMDiT's keys map to diffusers' `SD3Transformer2DModel` as diffusers'
//! `convert_sd3_transformer_checkpoint_to_diffusers` does ([`mmdit_key`]): fused
//! `qkv` split in three, `adaLN_modulation.1` of the last context block and of the
//! final layer with shift and scale swapped.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use sd_models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, SD3Transformer2DConfig,
    SD3Transformer2DModel, T5Config, T5EncoderModel,
};

use crate::error::IoError;
use crate::ldm::VAE_PREFIX;
use crate::loader::{KeyMapping, load_module};
use crate::model::{ComponentOptions, DiffusersDir, config_err, open_checkpoint, with_projection};
use crate::weights::WeightSource;

/// Prefix of the MMDiT in SD 3 single files.
pub const MMDIT_PREFIX: &str = "model.diffusion_model.";
/// Prefix of CLIP-L in SD 3 single files that include it.
pub const CLIP_L_PREFIX: &str = "text_encoders.clip_l.transformer.";
/// Prefix of CLIP-G in SD 3 single files that include it.
pub const CLIP_G_PREFIX: &str = "text_encoders.clip_g.transformer.";
/// Prefix of T5-XXL in SD 3 single files that include it.
pub const T5XXL_PREFIX: &str = "text_encoders.t5xxl.transformer.";

/// The tensor diffusers recognises SD 3 checkpoints by (under [`MMDIT_PREFIX`], or
/// with no prefix in a transformer-only file).
const MARKER: &str = "joint_blocks.0.context_block.adaLN_modulation.1.bias";

/// Configs of SD 3's components, shipped with this crate: the real models', used
/// where a single file gives no config folder.
pub mod builtin_configs {
    /// SD 3 / 3.5 VAE (16 latent channels, `scaling_factor` 1.5305, `shift_factor`
    /// 0.0609).
    pub const SD3_VAE: &str = include_str!("../configs/sd3/vae/config.json");
    /// CLIP-L with its projection (`text_encoder`).
    pub const SD3_TEXT_ENCODER: &str = include_str!("../configs/sd3/text_encoder/config.json");
    /// CLIP-G (OpenCLIP bigG) with its projection (`text_encoder_2`).
    pub const SD3_TEXT_ENCODER_2: &str = include_str!("../configs/sd3/text_encoder_2/config.json");
    /// T5-v1.1-XXL's encoder (`text_encoder_3`).
    pub const SD3_TEXT_ENCODER_3: &str = include_str!("../configs/sd3/text_encoder_3/config.json");
    /// FlowMatchEulerDiscreteScheduler with shift 3.0 (SD 3 Medium and all SD 3.5).
    pub const SD3_SCHEDULER: &str = include_str!("../configs/sd3/scheduler/scheduler_config.json");
}

/// The prefix of the MMDiT in `source` (`model.diffusion_model.` or none), if it
/// holds one.
pub fn mmdit_prefix(source: &WeightSource) -> Option<&'static str> {
    [MMDIT_PREFIX, ""]
        .into_iter()
        .find(|p| source.get(&format!("{p}{MARKER}")).is_some())
}

/// Whether a checkpoint holds an SD 3 MMDiT.
pub fn is_sd3_checkpoint(source: &WeightSource) -> bool {
    mmdit_prefix(source).is_some()
}

/// The original MMDiT key of a diffusers `SD3Transformer2DModel` key, in the part
/// syntax of [`KeyMapping::fused_parts`] where the original fuses (`qkv`: `#0/3`,
/// `#1/3`, `#2/3`) or orders differently (`#swap`). `last` is the index of the last
/// block (its context half has only the modulation). Keys with no original name
/// come back unchanged.
pub fn mmdit_key(key: &str, last: usize) -> String {
    let Some(rest) = key.strip_prefix("transformer_blocks.") else {
        return top_level_key(key);
    };
    let Some((block, rest)) = rest.split_once('.') else {
        return key.to_string();
    };
    let Ok(i) = block.parse::<usize>() else {
        return key.to_string();
    };
    let Some((module, param)) = rest.rsplit_once('.') else {
        return key.to_string();
    };
    let b = format!("joint_blocks.{i}");
    let qkv = |side: &str, attn: &str, n: usize| format!("{b}.{side}.{attn}.qkv.{param}#{n}/3");
    match module {
        "attn.to_q" => qkv("x_block", "attn", 0),
        "attn.to_k" => qkv("x_block", "attn", 1),
        "attn.to_v" => qkv("x_block", "attn", 2),
        "attn.add_q_proj" => qkv("context_block", "attn", 0),
        "attn.add_k_proj" => qkv("context_block", "attn", 1),
        "attn.add_v_proj" => qkv("context_block", "attn", 2),
        "attn2.to_q" => qkv("x_block", "attn2", 0),
        "attn2.to_k" => qkv("x_block", "attn2", 1),
        "attn2.to_v" => qkv("x_block", "attn2", 2),
        "norm1_context.linear" if i == last => {
            format!("{b}.context_block.adaLN_modulation.1.{param}#swap")
        }
        _ => match block_module(module) {
            Some(original) => format!("{b}.{original}.{param}"),
            None => key.to_string(),
        },
    }
}

/// A block's module with a one-to-one original name.
fn block_module(module: &str) -> Option<&'static str> {
    Some(match module {
        "attn.to_out.0" => "x_block.attn.proj",
        "attn.to_add_out" => "context_block.attn.proj",
        "attn.norm_q" => "x_block.attn.ln_q",
        "attn.norm_k" => "x_block.attn.ln_k",
        "attn.norm_added_q" => "context_block.attn.ln_q",
        "attn.norm_added_k" => "context_block.attn.ln_k",
        "attn2.to_out.0" => "x_block.attn2.proj",
        "attn2.norm_q" => "x_block.attn2.ln_q",
        "attn2.norm_k" => "x_block.attn2.ln_k",
        "norm1.linear" => "x_block.adaLN_modulation.1",
        "norm1_context.linear" => "context_block.adaLN_modulation.1",
        "ff.net.0.proj" => "x_block.mlp.fc1",
        "ff.net.2" => "x_block.mlp.fc2",
        "ff_context.net.0.proj" => "context_block.mlp.fc1",
        "ff_context.net.2" => "context_block.mlp.fc2",
        _ => return None,
    })
}

/// The embedders and the output layer.
fn top_level_key(key: &str) -> String {
    let Some((module, param)) = key.rsplit_once('.') else {
        return key.to_string();
    };
    let original = match module {
        "pos_embed.proj" => "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1" => "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2" => "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1" => "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2" => "y_embedder.mlp.2",
        "proj_out" => "final_layer.linear",
        "norm_out.linear" => return format!("final_layer.adaLN_modulation.1.{param}#swap"),
        _ => return key.to_string(),
    };
    format!("{original}.{param}")
}

/// The MMDiT's config read from its tensors under `prefix`, as diffusers'
/// `convert_sd3_to_diffusers.py` made the hub configs: width, depth, patch size,
/// channels and text widths from the shapes, `qk_norm` and the head width from
/// `ln_q`, MMDiT-X's `dual_attention_layers` from the blocks with `attn2`, the
/// position table's side from `pos_embed` and `sample_size` from its values (the
/// sin-cos positions are spaced by `sample_size / patch_size / side`); without
/// `ln_q` 64-wide heads, without the table 192 and 128 (every SD 3 / 3.5 model's).
///
/// # Errors
/// [`IoError::Unsupported`] naming the tensor that is missing or misshapen.
pub fn mmdit_config(
    source: &WeightSource,
    prefix: &str,
) -> Result<SD3Transformer2DConfig, IoError> {
    let shape = |name: &str, rank: usize| -> Result<Vec<usize>, IoError> {
        match source.get(&format!("{prefix}{name}")) {
            Some(t) if t.shape.len() == rank => Ok(t.shape.clone()),
            Some(t) => Err(IoError::Unsupported(format!(
                "SD 3 checkpoint: `{prefix}{name}` has shape {:?}, rank {rank} expected",
                t.shape
            ))),
            None => Err(IoError::Unsupported(format!(
                "SD 3 checkpoint: no `{prefix}{name}`"
            ))),
        }
    };
    let x = shape("x_embedder.proj.weight", 4)?;
    let (hidden, in_channels, patch) = (x[0], x[1], x[2]);
    let context = shape("context_embedder.weight", 2)?;
    let pooled = shape("y_embedder.mlp.0.weight", 2)?;
    let out = shape("final_layer.linear.weight", 2)?;
    let blocks = block_indices(source, prefix, "");
    let num_layers = blocks.last().map_or(0, |l| l + 1);
    let dual = block_indices(source, prefix, ".x_block.attn2.qkv.weight");
    let ln_q = source.get(&format!("{prefix}joint_blocks.0.x_block.attn.ln_q.weight"));
    let head = ln_q.and_then(|t| t.shape.first().copied()).unwrap_or(64);
    if head == 0 || hidden % head != 0 || hidden < head {
        return Err(IoError::Unsupported(format!(
            "SD 3 checkpoint: a {hidden}-wide MMDiT does not split into {head}-wide heads \
             (the head width is read from `ln_q`, else taken as 64): give a config folder"
        )));
    }
    let table = source
        .get(&format!("{prefix}pos_embed"))
        .filter(|t| t.shape.len() == 3 && t.shape[2] == hidden && t.shape[1] > 1);
    // SD 3 Medium's and SD 3.5 Large's 192 x 192 without a table.
    let side = table.map_or(192, |t| (t.shape[1] as f64).sqrt().round() as usize);
    let sample_size = table
        .and_then(|_| sample_size_of_table(source, &format!("{prefix}pos_embed"), hidden, side))
        .map_or(128, |base| base * patch);
    let json = serde_json::json!({
        "sample_size": sample_size,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "attention_head_dim": head,
        "num_attention_heads": hidden / head.max(1),
        "joint_attention_dim": context[1],
        "caption_projection_dim": context[0],
        "pooled_projection_dim": pooled[1],
        "out_channels": out[0] / (patch * patch).max(1),
        "pos_embed_max_size": side,
        "dual_attention_layers": dual,
        "qk_norm": ln_q.map(|_| "rms_norm"),
    });
    SD3Transformer2DConfig::from_json(&json.to_string())
        .map_err(|e| IoError::Unsupported(format!("SD 3 checkpoint: {e}")))
}

/// The base size (`sample_size / patch_size`) the stored sin-cos table was made
/// with: position 1 (row 0, column 1) sits at `base / side` on the grid, and its
/// first frequency's sine and cosine (channels 0 and `hidden / 4`) give that angle.
fn sample_size_of_table(
    source: &WeightSource,
    key: &str,
    hidden: usize,
    side: usize,
) -> Option<usize> {
    let sin = f64::from(source.read_value(key, hidden)?);
    let cos = f64::from(source.read_value(key, hidden + hidden / 4)?);
    let base = (sin.atan2(cos) * side as f64).round();
    (base >= 1.0).then_some(base as usize)
}

/// The block numbers of `joint_blocks.N{suffix}` keys, ascending.
fn block_indices(source: &WeightSource, prefix: &str, suffix: &str) -> Vec<usize> {
    let start = format!("{prefix}joint_blocks.");
    let mut found: Vec<usize> = source
        .tensors()
        .keys()
        .filter_map(|k| k.strip_prefix(&start))
        .filter_map(|rest| {
            let (n, tail) = rest.split_once('.')?;
            (suffix.is_empty() || format!(".{tail}") == suffix).then(|| n.parse().ok())?
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// An SD 3 / SD 3.5 original single file.
#[derive(Debug)]
pub struct Sd3SingleFile {
    path: PathBuf,
    source: WeightSource,
    prefix: &'static str,
    transformer: SD3Transformer2DConfig,
    vae: AutoencoderKLConfig,
}

impl Sd3SingleFile {
    /// Opens a checkpoint, the MMDiT's config read from its tensors
    /// ([`mmdit_config`]) and the SD 3 VAE's built in.
    ///
    /// # Errors
    /// An unreadable file, or one without an SD 3 MMDiT.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IoError> {
        let path = path.as_ref();
        let source = open_checkpoint(path)?;
        let prefix = Self::prefix_of(path, &source)?;
        Ok(Self {
            transformer: mmdit_config(&source, prefix)?,
            vae: AutoencoderKLConfig::from_json(builtin_configs::SD3_VAE).expect("built-in config"),
            path: path.to_path_buf(),
            source,
            prefix,
        })
    }

    /// Opens a checkpoint, the architecture from a diffusers folder's
    /// `transformer/` and `vae/` configs (diffusers' `from_single_file(...,
    /// config=DIR)`).
    ///
    /// # Errors
    /// As [`Self::open`], and unreadable configs.
    pub fn open_with_configs(
        path: impl AsRef<Path>,
        config_dir: impl AsRef<Path>,
    ) -> Result<Self, IoError> {
        let path = path.as_ref();
        let dir = DiffusersDir::open(config_dir)?;
        let source = open_checkpoint(path)?;
        let prefix = Self::prefix_of(path, &source)?;
        Ok(Self {
            transformer: crate::sd3::read_sd3_transformer_config(
                &dir.root().join("transformer/config.json"),
            )?,
            vae: dir.vae_config()?,
            path: path.to_path_buf(),
            source,
            prefix,
        })
    }

    fn prefix_of(path: &Path, source: &WeightSource) -> Result<&'static str, IoError> {
        mmdit_prefix(source).ok_or_else(|| {
            IoError::Unsupported(format!(
                "{}: no SD 3 MMDiT (`{MMDIT_PREFIX}{MARKER}`)",
                path.display()
            ))
        })
    }

    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors.
    pub fn source(&self) -> &WeightSource {
        &self.source
    }

    /// The transformer's config.
    pub fn transformer_config(&self) -> &SD3Transformer2DConfig {
        &self.transformer
    }

    /// The VAE's config.
    pub fn vae_config(&self) -> &AutoencoderKLConfig {
        &self.vae
    }

    /// Whether the file holds the VAE (`first_stage_model.*`).
    pub fn has_vae(&self) -> bool {
        self.has(VAE_PREFIX)
    }

    /// Whether the file holds CLIP-L, CLIP-G, T5 (`text_encoders.*`).
    pub fn has_text_encoders(&self) -> [bool; 3] {
        [CLIP_L_PREFIX, CLIP_G_PREFIX, T5XXL_PREFIX].map(|p| self.has(p))
    }

    fn has(&self, prefix: &str) -> bool {
        self.source
            .tensors()
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// Builds the transformer and loads the MMDiT (`pos_embed` is computed, not
    /// read).
    ///
    /// # Errors
    /// Missing or mismatched keys.
    pub fn transformer(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<SD3Transformer2DModel, IoError> {
        let model = SD3Transformer2DModel::new(&self.transformer, device)
            .map_err(config_err(&self.path))?;
        let prefix = self.prefix;
        let last = self.transformer.num_layers.saturating_sub(1);
        let mapping = KeyMapping {
            key_of: Box::new(move |p: &str| {
                format!("{prefix}{}", mmdit_key(&sd_models::diffusers_key(p), last))
            }),
            // A transformer-only file's keys have no prefix: all of them are the MMDiT's.
            prefix: prefix.into(),
            ignorable: Box::new(move |k| k == format!("{prefix}pos_embed")),
            fused_parts: 3,
            transposed: Box::new(|_| false),
        };
        load_module(model, &self.source, &mapping, options.load(), "transformer")
    }

    /// Builds the VAE and loads `first_stage_model.*`.
    ///
    /// # Errors
    /// Missing or mismatched keys (a file without the VAE: give one separately).
    pub fn vae(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<AutoencoderKL, IoError> {
        crate::model::ldm_vae(&self.source, &self.path, &self.vae, device, options)
    }

    /// CLIP-L (`index` 0) or CLIP-G (1) from `text_encoders.*`, with `config`;
    /// `None` when the file does not hold it.
    ///
    /// # Errors
    /// Missing or mismatched keys.
    pub fn clip_text_encoder(
        &self,
        index: usize,
        config: &ClipTextConfig,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<Option<ClipTextModel>, IoError> {
        let prefix = [CLIP_L_PREFIX, CLIP_G_PREFIX][index.min(1)];
        if !self.has(prefix) {
            return Ok(None);
        }
        let name = ["text_encoder", "text_encoder_2"][index.min(1)];
        load_clip(&self.source, prefix, config, device, options, name).map(Some)
    }

    /// T5 from `text_encoders.t5xxl.*`, with `config`; `None` when the file does not
    /// hold it.
    ///
    /// # Errors
    /// Missing or mismatched keys.
    pub fn text_encoder_3(
        &self,
        config: &T5Config,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<Option<T5EncoderModel>, IoError> {
        if !self.has(T5XXL_PREFIX) {
            return Ok(None);
        }
        load_t5(&self.source, T5XXL_PREFIX, config, device, options).map(Some)
    }
}

/// The built-in config of SD 3's CLIP-L (`index` 0) or CLIP-G (1).
pub fn builtin_clip_config(index: usize) -> ClipTextConfig {
    let json = [
        builtin_configs::SD3_TEXT_ENCODER,
        builtin_configs::SD3_TEXT_ENCODER_2,
    ][index.min(1)];
    with_projection(ClipTextConfig::from_json(json).expect("built-in config"))
}

/// The built-in config of T5-v1.1-XXL's encoder.
pub fn builtin_t5_config() -> T5Config {
    T5Config::from_json(builtin_configs::SD3_TEXT_ENCODER_3).expect("built-in config")
}

fn load_clip(
    source: &WeightSource,
    prefix: &'static str,
    config: &ClipTextConfig,
    device: &Device,
    options: &ComponentOptions,
    name: &str,
) -> Result<ClipTextModel, IoError> {
    let path = source
        .paths()
        .first()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let model =
        ClipTextModel::new(&with_projection(config.clone()), device).map_err(config_err(&path))?;
    let mapping = KeyMapping {
        key_of: Box::new(move |p: &str| format!("{prefix}{}", sd_models::diffusers_key(p))),
        prefix: prefix.into(),
        ..KeyMapping::diffusers()
    };
    load_module(model, source, &mapping, options.load(), name)
}

fn load_t5(
    source: &WeightSource,
    prefix: &'static str,
    config: &T5Config,
    device: &Device,
    options: &ComponentOptions,
) -> Result<T5EncoderModel, IoError> {
    let path = source
        .paths()
        .first()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let model = T5EncoderModel::new(config, device).map_err(config_err(&path))?;
    let llama_cpp = source
        .get(&format!("{prefix}{LLAMA_CPP_T5_MARKER}"))
        .is_some();
    let mapping = KeyMapping {
        key_of: Box::new(move |p: &str| {
            let key = sd_models::t5::t5_key(p);
            if llama_cpp {
                format!("{prefix}{}", llama_cpp_t5_key(&key))
            } else {
                format!("{prefix}{key}")
            }
        }),
        prefix: prefix.into(),
        ignorable: Box::new(move |k| k == format!("{prefix}encoder.embed_tokens.weight")),
        ..KeyMapping::t5()
    };
    load_module(model, source, &mapping, options.load(), "text_encoder_3")
}

/// A tensor every T5 encoder GGUF file in llama.cpp's names has.
const LLAMA_CPP_T5_MARKER: &str = "enc.blk.0.attn_q.weight";

/// The name llama.cpp's `convert_hf_to_gguf.py` gives a transformers T5 encoder key
/// (the T5-XXL GGUF files ComfyUI users keep: `enc.blk.N.attn_q`, `ffn_gate`,
/// `token_embd`...); other keys come back unchanged.
pub fn llama_cpp_t5_key(key: &str) -> String {
    match key {
        "shared.weight" => return "token_embd.weight".into(),
        "encoder.final_layer_norm.weight" => return "enc.output_norm.weight".into(),
        _ => {}
    }
    let Some(rest) = key.strip_prefix("encoder.block.") else {
        return key.to_string();
    };
    let Some((i, tail)) = rest.split_once('.') else {
        return key.to_string();
    };
    let leaf = match tail {
        "layer.0.SelfAttention.relative_attention_bias.weight" => "attn_rel_b.weight",
        "layer.0.SelfAttention.q.weight" => "attn_q.weight",
        "layer.0.SelfAttention.k.weight" => "attn_k.weight",
        "layer.0.SelfAttention.v.weight" => "attn_v.weight",
        "layer.0.SelfAttention.o.weight" => "attn_o.weight",
        "layer.0.layer_norm.weight" => "attn_norm.weight",
        "layer.1.DenseReluDense.wi_0.weight" => "ffn_gate.weight",
        "layer.1.DenseReluDense.wi_1.weight" | "layer.1.DenseReluDense.wi.weight" => {
            "ffn_up.weight"
        }
        "layer.1.DenseReluDense.wo.weight" => "ffn_down.weight",
        "layer.1.layer_norm.weight" => "ffn_norm.weight",
        _ => return key.to_string(),
    };
    format!("enc.blk.{i}.{leaf}")
}

/// Which text encoder a file of its own holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderFile {
    /// A CLIP text model (`text_model.*`) of this width.
    Clip {
        /// `hidden_size`.
        width: usize,
    },
    /// A T5 encoder (`encoder.block.*`, `shared.weight`).
    T5,
}

/// What a text encoder file holds (ComfyUI's `clip_l.safetensors`: CLIP 768 wide;
/// `clip_g.safetensors`: 1280; `t5xxl_*.safetensors`: T5), or `None`.
pub fn recognise_text_encoder_file(source: &WeightSource) -> Option<TextEncoderFile> {
    if let Some(t) = source.get("text_model.embeddings.token_embedding.weight") {
        return t.shape.get(1).map(|&width| TextEncoderFile::Clip { width });
    }
    let t5 = source
        .get("encoder.block.0.layer.0.SelfAttention.q.weight")
        .is_some()
        || source.get(LLAMA_CPP_T5_MARKER).is_some();
    t5.then_some(TextEncoderFile::T5)
}

/// A CLIP text encoder (with its projection where `config` has one) from a file of
/// its own in transformers naming (`text_model.*`, `text_projection.weight`).
///
/// # Errors
/// An unreadable file, missing or mismatched keys.
pub fn clip_text_encoder_from_file(
    path: impl AsRef<Path>,
    config: &ClipTextConfig,
    device: &Device,
    options: &ComponentOptions,
) -> Result<ClipTextModel, IoError> {
    let source = open_checkpoint(path.as_ref())?;
    load_clip(&source, "", config, device, options, "text_encoder")
}

/// A T5 encoder from a file of its own in transformers naming, or GGUF in
/// llama.cpp's ([`llama_cpp_t5_key`]).
///
/// # Errors
/// An unreadable file, missing or mismatched keys.
pub fn t5_encoder_from_file(
    path: impl AsRef<Path>,
    config: &T5Config,
    device: &Device,
    options: &ComponentOptions,
) -> Result<T5EncoderModel, IoError> {
    let source = open_checkpoint(path.as_ref())?;
    load_t5(&source, "", config, device, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmdit_keys_as_diffusers_converts_them() {
        let k = |key: &str| mmdit_key(key, 23);
        assert_eq!(k("pos_embed.proj.weight"), "x_embedder.proj.weight");
        assert_eq!(
            k("time_text_embed.timestep_embedder.linear_2.bias"),
            "t_embedder.mlp.2.bias"
        );
        assert_eq!(
            k("time_text_embed.text_embedder.linear_1.weight"),
            "y_embedder.mlp.0.weight"
        );
        assert_eq!(k("context_embedder.weight"), "context_embedder.weight");
        assert_eq!(k("proj_out.bias"), "final_layer.linear.bias");
        assert_eq!(
            k("norm_out.linear.weight"),
            "final_layer.adaLN_modulation.1.weight#swap"
        );
        assert_eq!(
            k("transformer_blocks.3.attn.to_k.weight"),
            "joint_blocks.3.x_block.attn.qkv.weight#1/3"
        );
        assert_eq!(
            k("transformer_blocks.3.attn.add_v_proj.bias"),
            "joint_blocks.3.context_block.attn.qkv.bias#2/3"
        );
        assert_eq!(
            k("transformer_blocks.0.attn2.to_q.weight"),
            "joint_blocks.0.x_block.attn2.qkv.weight#0/3"
        );
        assert_eq!(
            k("transformer_blocks.0.attn2.norm_k.weight"),
            "joint_blocks.0.x_block.attn2.ln_k.weight"
        );
        assert_eq!(
            k("transformer_blocks.5.attn.norm_added_q.weight"),
            "joint_blocks.5.context_block.attn.ln_q.weight"
        );
        assert_eq!(
            k("transformer_blocks.5.attn.to_out.0.weight"),
            "joint_blocks.5.x_block.attn.proj.weight"
        );
        assert_eq!(
            k("transformer_blocks.5.attn.to_add_out.bias"),
            "joint_blocks.5.context_block.attn.proj.bias"
        );
        assert_eq!(
            k("transformer_blocks.5.ff_context.net.2.weight"),
            "joint_blocks.5.context_block.mlp.fc2.weight"
        );
        assert_eq!(
            k("transformer_blocks.5.norm1_context.linear.weight"),
            "joint_blocks.5.context_block.adaLN_modulation.1.weight"
        );
        // The last block's context modulation is AdaLayerNormContinuous: swapped.
        assert_eq!(
            k("transformer_blocks.23.norm1_context.linear.bias"),
            "joint_blocks.23.context_block.adaLN_modulation.1.bias#swap"
        );
        assert_eq!(k("something.else"), "something.else");
    }
}
