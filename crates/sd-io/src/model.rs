//! Opening models from disk: diffusers folders and single-file checkpoints.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use sd_models::{
    AutoencoderKL, AutoencoderKLConfig, AutoencoderTiny, AutoencoderTinyConfig, ClipTextConfig,
    ClipTextModel, UNet2DConditionConfig, UNet2DConditionModel,
};

use crate::error::IoError;
use crate::ldm::{self, LdmKeyMap};
use crate::loader::{KeyMapping, LoadOptions, load_module};
use crate::tokenizer::ClipTokenizer;
use crate::weights::WeightSource;

/// Options for building a component.
#[derive(Debug, Clone, Default)]
pub struct ComponentOptions {
    /// Float dtype of the parameters (`F32` by default; `F16`/`BF16` halve memory).
    pub dtype: Option<DType>,
    /// Weight variant to prefer (`"fp16"` picks `*.fp16.safetensors`).
    pub variant: Option<String>,
    /// Expand GGUF's Q8_0 / Q5_0 / Q4_0 weights to `dtype` rather than keep them
    /// compressed on the CPU ([`LoadOptions::dequantize`]).
    pub dequantize: bool,
}

impl ComponentOptions {
    pub(crate) fn load(&self) -> LoadOptions {
        LoadOptions {
            dtype: self.dtype.unwrap_or(DType::F32),
            dequantize: self.dequantize,
        }
    }
}

pub(crate) fn read_json_file(path: &Path) -> Result<String, IoError> {
    if !path.exists() {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
            what: "config file".into(),
        });
    }
    std::fs::read_to_string(path).map_err(|e| IoError::io(path, e))
}

pub(crate) fn config_err(path: &Path) -> impl Fn(sd_models::ConfigError) -> IoError + '_ {
    move |source| IoError::Config {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and validates a U-Net `config.json`.
pub fn read_unet_config(path: &Path) -> Result<UNet2DConditionConfig, IoError> {
    UNet2DConditionConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Reads and validates a VAE `config.json`.
pub fn read_vae_config(path: &Path) -> Result<AutoencoderKLConfig, IoError> {
    AutoencoderKLConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Reads and validates a text-encoder `config.json`.
pub fn read_text_encoder_config(path: &Path) -> Result<ClipTextConfig, IoError> {
    ClipTextConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// The weight files of a diffusers component folder: `{base}[.{variant}].safetensors`
/// or its sharded index.
pub fn component_weights(
    dir: &Path,
    base: &str,
    variant: Option<&str>,
) -> Result<PathBuf, IoError> {
    let mut candidates = Vec::new();
    if let Some(v) = variant {
        candidates.push(dir.join(format!("{base}.{v}.safetensors")));
        candidates.push(dir.join(format!("{base}.safetensors.index.{v}.json")));
    }
    candidates.push(dir.join(format!("{base}.safetensors")));
    candidates.push(dir.join(format!("{base}.safetensors.index.json")));
    if variant.is_none() {
        candidates.push(dir.join(format!("{base}.fp16.safetensors")));
        candidates.push(dir.join(format!("{base}.safetensors.index.fp16.json")));
    }
    if let Some(found) = candidates.into_iter().find(|p| p.exists()) {
        return Ok(found);
    }
    let bin = dir.join(format!("{base}.bin"));
    if bin.exists() {
        return Err(IoError::Unsupported(format!(
            "{}: only .safetensors weights are read (pickle .bin files can run code); convert it first",
            bin.display()
        )));
    }
    Err(IoError::NotFound {
        path: dir.to_path_buf(),
        what: format!("{base}.safetensors (or a sharded index)"),
    })
}

/// Builds a model from a diffusers component folder: `config.json` through
/// `read_config`, the model through `build`, then the weights
/// (`diffusion_pytorch_model[.variant].safetensors` or its shards) under diffusers'
/// names. `component` names it in errors.
pub(crate) fn diffusers_component<C, M: Module>(
    dir: &Path,
    options: &ComponentOptions,
    component: &str,
    read_config: impl FnOnce(&Path) -> Result<C, IoError>,
    build: impl FnOnce(&C, &Device) -> Result<M, sd_models::ConfigError>,
    device: &Device,
) -> Result<M, IoError> {
    let config = read_config(&dir.join("config.json"))?;
    let path = component_weights(dir, "diffusion_pytorch_model", options.variant.as_deref())?;
    let model = build(&config, device).map_err(config_err(&path))?;
    let source = WeightSource::open(&path)?;
    load_module(
        model,
        &source,
        &KeyMapping::diffusers(),
        options.load(),
        component,
    )
}

/// Builds a U-Net from a component folder (`config.json` + weights), e.g. `unet/`.
pub fn unet_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<UNet2DConditionModel, IoError> {
    diffusers_component(
        dir,
        options,
        "unet",
        read_unet_config,
        UNet2DConditionModel::new,
        device,
    )
}

/// Builds a VAE from a component folder, e.g. `vae/` (or a standalone VAE repo).
pub fn vae_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<AutoencoderKL, IoError> {
    diffusers_component(
        dir,
        options,
        "vae",
        read_vae_config,
        AutoencoderKL::new,
        device,
    )
}

/// Reads and validates an `AutoencoderTiny` (TAESD) `config.json`.
pub fn read_tiny_vae_config(path: &Path) -> Result<AutoencoderTinyConfig, IoError> {
    AutoencoderTinyConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Builds a tiny autoencoder (TAESD, TAESDXL) from its diffusers folder
/// (`madebyollin/taesd`: `config.json` + `diffusion_pytorch_model.safetensors`).
pub fn tiny_vae_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<AutoencoderTiny, IoError> {
    diffusers_component(
        dir,
        options,
        "tiny vae",
        read_tiny_vae_config,
        AutoencoderTiny::new,
        device,
    )
}

/// Builds a CLIP text encoder from a component folder, e.g. `text_encoder/`.
pub fn text_encoder_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<ClipTextModel, IoError> {
    let mut config = read_text_encoder_config(&dir.join("config.json"))?;
    let path = component_weights(dir, "model", options.variant.as_deref())?;
    let source = WeightSource::open(&path)?;
    // A config without `architectures` (written by `from_config`) whose weights
    // carry the projection is a CLIPTextModelWithProjection, as diffusers'
    // model_index.json says for SDXL's text_encoder_2.
    if config.text_projection_dim().is_none()
        && config.projection_dim.is_some()
        && source.get("text_projection.weight").is_some()
    {
        config.architectures = vec!["CLIPTextModelWithProjection".into()];
    }
    let model = ClipTextModel::new(&config, device).map_err(config_err(&path))?;
    let prefixed = source.has_prefix("text_model.");
    let mapping = if prefixed {
        KeyMapping::diffusers()
    } else {
        KeyMapping {
            key_of: Box::new(|p: &str| p.strip_prefix("text_model.").unwrap_or(p).to_string()),
            ..KeyMapping::diffusers()
        }
    };
    load_module(model, &source, &mapping, options.load(), "text_encoder")
}

/// A diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
/// `tokenizer/`, `scheduler/`), or a folder holding only some components / configs.
#[derive(Debug, Clone)]
pub struct DiffusersDir {
    root: PathBuf,
}

impl DiffusersDir {
    /// Opens a folder (it must exist; components are checked when built).
    pub fn open(root: impl AsRef<Path>) -> Result<Self, IoError> {
        let root = root.as_ref();
        if !root.is_dir() {
            return Err(IoError::NotFound {
                path: root.to_path_buf(),
                what: "diffusers model folder".into(),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether a component folder exists.
    pub fn has(&self, component: &str) -> bool {
        self.root.join(component).is_dir()
    }

    /// `model_index.json`, if present.
    pub fn model_index(&self) -> Result<Option<serde_json::Value>, IoError> {
        let p = self.root.join("model_index.json");
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| IoError::io(&p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| IoError::Json { path: p, source: e })
    }

    /// `force_zeros_for_empty_prompt` from `model_index.json` (diffusers'
    /// `StableDiffusionXLPipeline` registers it), `None` where the index does not say.
    pub fn force_zeros_for_empty_prompt(&self) -> Result<Option<bool>, IoError> {
        Ok(self.model_index()?.and_then(|i| {
            i.get("force_zeros_for_empty_prompt")
                .and_then(|v| v.as_bool())
        }))
    }

    /// The U-Net config.
    pub fn unet_config(&self) -> Result<UNet2DConditionConfig, IoError> {
        read_unet_config(&self.root.join("unet/config.json"))
    }

    /// The VAE config.
    pub fn vae_config(&self) -> Result<AutoencoderKLConfig, IoError> {
        read_vae_config(&self.root.join("vae/config.json"))
    }

    /// The text-encoder config.
    pub fn text_encoder_config(&self) -> Result<ClipTextConfig, IoError> {
        read_text_encoder_config(&self.root.join("text_encoder/config.json"))
    }

    /// The raw text of `scheduler/scheduler_config.json`.
    pub fn scheduler_config_text(&self) -> Result<String, IoError> {
        read_json_file(&self.root.join("scheduler/scheduler_config.json"))
    }

    /// Path of the U-Net weights.
    pub fn unet_weights(&self, variant: Option<&str>) -> Result<PathBuf, IoError> {
        component_weights(&self.root.join("unet"), "diffusion_pytorch_model", variant)
    }

    /// Path of the VAE weights.
    pub fn vae_weights(&self, variant: Option<&str>) -> Result<PathBuf, IoError> {
        component_weights(&self.root.join("vae"), "diffusion_pytorch_model", variant)
    }

    /// Path of the text-encoder weights.
    pub fn text_encoder_weights(&self, variant: Option<&str>) -> Result<PathBuf, IoError> {
        component_weights(&self.root.join("text_encoder"), "model", variant)
    }

    /// Builds the U-Net and loads its weights.
    pub fn unet(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<UNet2DConditionModel, IoError> {
        unet_from_dir(&self.root.join("unet"), device, options)
    }

    /// Builds the VAE and loads its weights.
    pub fn vae(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<AutoencoderKL, IoError> {
        vae_from_dir(&self.root.join("vae"), device, options)
    }

    /// Builds the text encoder and loads its weights (keys with or without the
    /// `text_model.` prefix).
    pub fn text_encoder(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<ClipTextModel, IoError> {
        text_encoder_from_dir(&self.root.join("text_encoder"), device, options)
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> Result<ClipTokenizer, IoError> {
        ClipTokenizer::from_dir(self.root.join("tokenizer"))
    }

    /// SDXL's second text encoder (`text_encoder_2/`, a
    /// `CLIPTextModelWithProjection`), weights loaded.
    pub fn text_encoder_2(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<ClipTextModel, IoError> {
        text_encoder_from_dir(&self.root.join("text_encoder_2"), device, options)
    }

    /// SDXL's second text encoder's config (always a `CLIPTextModelWithProjection`,
    /// as SDXL's `model_index.json` has it, whether or not the config lists
    /// `architectures`).
    pub fn text_encoder_2_config(&self) -> Result<ClipTextConfig, IoError> {
        let mut c = read_text_encoder_config(&self.root.join("text_encoder_2/config.json"))?;
        if c.text_projection_dim().is_none() && c.projection_dim.is_some() {
            c.architectures = vec!["CLIPTextModelWithProjection".into()];
        }
        Ok(c)
    }

    /// SDXL's second tokenizer (`tokenizer_2/`: the same BPE, padded with `!`).
    pub fn tokenizer_2(&self) -> Result<ClipTokenizer, IoError> {
        ClipTokenizer::from_dir(self.root.join("tokenizer_2"))
    }
}

/// Configs of the SD 1.5 and SD 2.1-v models, shipped with this crate.
pub mod builtin_configs {
    /// SD 1.5 U-Net.
    pub const SD15_UNET: &str = include_str!("../configs/sd15/unet/config.json");
    /// SD 1.5 VAE.
    pub const SD15_VAE: &str = include_str!("../configs/sd15/vae/config.json");
    /// SD 1.5 text encoder (CLIP ViT-L/14).
    pub const SD15_TEXT_ENCODER: &str = include_str!("../configs/sd15/text_encoder/config.json");
    /// SD 1.5 scheduler.
    pub const SD15_SCHEDULER: &str =
        include_str!("../configs/sd15/scheduler/scheduler_config.json");
    /// SD 2.1-v U-Net.
    pub const SD21_UNET: &str = include_str!("../configs/sd21/unet/config.json");
    /// SD 2.1 VAE.
    pub const SD21_VAE: &str = include_str!("../configs/sd21/vae/config.json");
    /// SD 2.1 text encoder (OpenCLIP ViT-H/14).
    pub const SD21_TEXT_ENCODER: &str = include_str!("../configs/sd21/text_encoder/config.json");
    /// SD 2.1-v scheduler.
    pub const SD21_SCHEDULER: &str =
        include_str!("../configs/sd21/scheduler/scheduler_config.json");
    /// SDXL base 1.0 U-Net.
    pub const SDXL_UNET: &str = include_str!("../configs/sdxl/unet/config.json");
    /// SDXL VAE (`scaling_factor` 0.13025).
    pub const SDXL_VAE: &str = include_str!("../configs/sdxl/vae/config.json");
    /// SDXL's first text encoder (CLIP ViT-L/14).
    pub const SDXL_TEXT_ENCODER: &str = include_str!("../configs/sdxl/text_encoder/config.json");
    /// SDXL's second text encoder (OpenCLIP ViT-bigG/14 with its projection).
    pub const SDXL_TEXT_ENCODER_2: &str =
        include_str!("../configs/sdxl/text_encoder_2/config.json");
    /// SDXL base 1.0 scheduler (Euler, leading spacing).
    pub const SDXL_SCHEDULER: &str =
        include_str!("../configs/sdxl/scheduler/scheduler_config.json");
    /// SDXL refiner 1.0 U-Net (384-wide, four levels, 4 transformer layers, cross
    /// attention over the second text encoder's 1280 features, 5 time ids).
    pub const SDXL_REFINER_UNET: &str = include_str!("../configs/sdxl-refiner/unet/config.json");
}

/// Prefix of SDXL's first text encoder in single files (transformers layout).
pub const SDXL_TEXT_ENCODER_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of SDXL's second text encoder in single files (OpenCLIP layout).
pub const SDXL_TEXT_ENCODER_2_PREFIX: &str = "conditioner.embedders.1.model.";
/// Prefix of the SDXL refiner's only text encoder (OpenCLIP bigG) in its single file.
pub const SDXL_REFINER_TEXT_ENCODER_PREFIX: &str = "conditioner.embedders.0.model.";
/// Prefix of SDXL's second text encoder as stable-diffusion.cpp renames it in the
/// files it converts (transformers names, `in_proj` fused or split into q, k, v).
pub const SD_CPP_TEXT_ENCODER_2_PREFIX: &str = "cond_stage_model.1.transformer.";

/// Where a single file keeps its components: the original (LDM / SGM) prefixes,
/// stable-diffusion.cpp's renamed text encoders, or a U-Net stored alone (no prefix,
/// as ComfyUI-GGUF files keep it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    unet: &'static str,
    text_encoder: &'static str,
    text_encoder_2: &'static str,
}

impl Layout {
    fn of(source: &WeightSource) -> Self {
        let has = |k: &str| source.has_prefix(k);
        let unet = if source.get("input_blocks.0.0.weight").is_some() && !has(ldm::UNET_PREFIX) {
            ""
        } else {
            ldm::UNET_PREFIX
        };
        let text_encoder = if has(SDXL_TEXT_ENCODER_PREFIX) {
            SDXL_TEXT_ENCODER_PREFIX
        } else {
            ldm::TEXT_ENCODER_PREFIX
        };
        let text_encoder_2 = if has(SD_CPP_TEXT_ENCODER_2_PREFIX) {
            SD_CPP_TEXT_ENCODER_2_PREFIX
        } else if has(SDXL_REFINER_TEXT_ENCODER_PREFIX) && !has(SDXL_TEXT_ENCODER_PREFIX) {
            SDXL_REFINER_TEXT_ENCODER_PREFIX
        } else {
            SDXL_TEXT_ENCODER_2_PREFIX
        };
        Self {
            unet,
            text_encoder,
            text_encoder_2,
        }
    }
}

/// A `CLIPTextModelWithProjection` config where it has a `projection_dim`, whatever
/// its `architectures` say.
pub fn with_projection(mut c: ClipTextConfig) -> ClipTextConfig {
    if c.text_projection_dim().is_none() && c.projection_dim.is_some() {
        c.architectures = vec!["CLIPTextModelWithProjection".into()];
    }
    c
}

/// A single-file original (CompVis / LDM) checkpoint, `.safetensors` or GGUF, with
/// `model.diffusion_model.*`, `first_stage_model.*` and
/// `cond_stage_model.transformer.*` keys; also stable-diffusion.cpp's GGUF files
/// (its renamed SDXL / SD 2.x text encoders) and a U-Net stored alone (ComfyUI-GGUF:
/// no prefix), whose text encoders and VAE come from elsewhere.
#[derive(Debug)]
pub struct SingleFile {
    path: PathBuf,
    source: WeightSource,
    unet: UNet2DConditionConfig,
    vae: AutoencoderKLConfig,
    text_encoder: ClipTextConfig,
    /// SDXL's second text encoder.
    text_encoder_2: Option<ClipTextConfig>,
    /// Where each component's tensors are.
    layout: Layout,
}

impl SingleFile {
    /// Opens a checkpoint, taking the architecture from a diffusers folder's configs
    /// (as diffusers' `from_single_file(..., config=DIR)`).
    pub fn open_with_configs(
        path: impl AsRef<Path>,
        config_dir: impl AsRef<Path>,
    ) -> Result<Self, IoError> {
        let dir = DiffusersDir::open(config_dir)?;
        let path = path.as_ref();
        let source = open_checkpoint(path)?;
        let mut layout = Layout::of(&source);
        if !dir.has("text_encoder") && dir.has("text_encoder_2") {
            // The refiner's folder: its single file has the one encoder under
            // `conditioner.embedders.0.model.`.
            let te2 = dir.text_encoder_2_config()?;
            layout.text_encoder_2 = SDXL_REFINER_TEXT_ENCODER_PREFIX;
            return Ok(Self {
                path: path.to_path_buf(),
                source,
                unet: dir.unet_config()?,
                vae: dir.vae_config()?,
                text_encoder: te2.clone(),
                text_encoder_2: Some(te2),
                layout,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            source,
            unet: dir.unet_config()?,
            vae: dir.vae_config()?,
            text_encoder: dir.text_encoder_config()?,
            text_encoder_2: if dir.has("text_encoder_2") {
                Some(dir.text_encoder_2_config()?)
            } else {
                None
            },
            layout,
        })
    }

    /// Opens a checkpoint, recognising SD 1.x, SD 2.x, SDXL base or the SDXL refiner
    /// from its tensors and using the built-in configs of SD 1.5, SD 2.1, SDXL base 1.0
    /// or the SDXL refiner 1.0; an inpainting checkpoint (a 9-channel
    /// `input_blocks.0.0` convolution) gets a 9-channel U-Net. A U-Net stored alone is
    /// recognised from its own tensors (SDXL's `label_emb`, its width).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IoError> {
        let path = path.as_ref();
        let source = open_checkpoint(path)?;
        let layout = Layout::of(&source);
        let u = layout.unet;
        let has = |k: &str| source.has_prefix(k);
        let label_emb = source.get(&format!("{u}label_emb.0.0.weight"));
        if has("conditioner.embedders.") || has(SD_CPP_TEXT_ENCODER_2_PREFIX) || label_emb.is_some()
        {
            let refiner = if has("conditioner.embedders.") || has(SD_CPP_TEXT_ENCODER_2_PREFIX) {
                if !has(SDXL_TEXT_ENCODER_PREFIX)
                    && !has(SDXL_REFINER_TEXT_ENCODER_PREFIX)
                    && !has(SD_CPP_TEXT_ENCODER_2_PREFIX)
                {
                    return Err(IoError::Unsupported(format!(
                        "{}: an SGM checkpoint (`conditioner.embedders.*`) with neither SDXL's \
                         CLIP ViT-L (`{SDXL_TEXT_ENCODER_PREFIX}`) nor the refiner's OpenCLIP \
                         (`{SDXL_REFINER_TEXT_ENCODER_PREFIX}`)",
                        path.display()
                    )));
                }
                layout.text_encoder_2 == SDXL_REFINER_TEXT_ENCODER_PREFIX
            } else {
                // A U-Net alone: the refiner's time embedding takes 5 time ids (2560).
                label_emb.and_then(|t| t.shape.get(1)) == Some(&2560)
            };
            return Ok(Self::sdxl(path, source, layout, refiner));
        }
        let is_sd2 = source
            .get(&format!(
                "{u}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
            ))
            .is_some_and(|t| t.shape.get(1) == Some(&1024));
        use builtin_configs::*;
        let (un, v, t) = if is_sd2 {
            (SD21_UNET, SD21_VAE, SD21_TEXT_ENCODER)
        } else {
            (SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER)
        };
        let mut unet = UNet2DConditionConfig::from_json(un).expect("built-in config");
        if let Some(conv_in) = source.get(&format!("{u}input_blocks.0.0.weight"))
            && let Some(&c) = conv_in.shape.get(1)
        {
            unet.in_channels = c;
        }
        Ok(Self {
            path: path.to_path_buf(),
            source,
            unet,
            vae: AutoencoderKLConfig::from_json(v).expect("built-in config"),
            text_encoder: ClipTextConfig::from_json(t).expect("built-in config"),
            text_encoder_2: None,
            layout,
        })
    }

    /// SDXL base or refiner with the built-in configs.
    fn sdxl(path: &Path, source: WeightSource, mut layout: Layout, refiner: bool) -> Self {
        use builtin_configs::*;
        let parse = |t: &str| ClipTextConfig::from_json(t).expect("built-in config");
        let te2 = with_projection(parse(SDXL_TEXT_ENCODER_2));
        let (unet, text_encoder) = if refiner {
            layout.text_encoder_2 = SDXL_REFINER_TEXT_ENCODER_PREFIX;
            (SDXL_REFINER_UNET, te2.clone())
        } else {
            (SDXL_UNET, parse(SDXL_TEXT_ENCODER))
        };
        Self {
            path: path.to_path_buf(),
            unet: UNet2DConditionConfig::from_json(unet).expect("built-in config"),
            vae: AutoencoderKLConfig::from_json(SDXL_VAE).expect("built-in config"),
            text_encoder,
            text_encoder_2: Some(te2),
            layout,
            source,
        }
    }

    /// Whether the file holds text encoders (a U-Net stored alone does not: its
    /// encoders come from the model's folder).
    pub fn has_text_encoders(&self) -> bool {
        self.source.has_prefix("cond_stage_model.")
            || self.source.has_prefix("conditioner.embedders.")
    }

    /// Whether the file holds the VAE (`first_stage_model.*`).
    pub fn has_vae(&self) -> bool {
        self.source.has_prefix(ldm::VAE_PREFIX)
    }

    /// Whether the checkpoint is SDXL (text encoders under `conditioner.*`), base or
    /// refiner.
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// Whether the checkpoint is the SDXL refiner's layout: the OpenCLIP encoder alone
    /// (under `conditioner.embedders.0.model.`), no CLIP ViT-L. Its prompts are encoded
    /// by [`text_encoder_2`](Self::text_encoder_2) only; [`text_encoder`](Self::text_encoder)
    /// is an error.
    pub fn text_encoder_2_only(&self) -> bool {
        self.layout.text_encoder_2 == SDXL_REFINER_TEXT_ENCODER_PREFIX
    }

    /// SDXL's second text encoder config, when the checkpoint is SDXL.
    pub fn text_encoder_2_config(&self) -> Option<&ClipTextConfig> {
        self.text_encoder_2.as_ref()
    }

    /// SDXL: builds the second text encoder and loads `conditioner.embedders.1.model.*`
    /// (`conditioner.embedders.0.model.*` in the refiner; OpenCLIP layout: fused
    /// `in_proj` split into q, k, v, `text_projection` stored transposed).
    ///
    /// # Errors
    /// A checkpoint that is not SDXL, missing or mismatched keys.
    pub fn text_encoder_2(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<ClipTextModel, IoError> {
        let Some(config) = &self.text_encoder_2 else {
            return Err(IoError::Unsupported(format!(
                "{}: not an SDXL checkpoint (no second text encoder)",
                self.path.display()
            )));
        };
        let model = ClipTextModel::new(config, device).map_err(config_err(&self.path))?;
        let p = self.layout.text_encoder_2;
        let layers = config.num_hidden_layers;
        if self.source.has_prefix(&format!("{p}text_model.")) {
            let mapping = hf_clip_mapping(&self.source, p, config);
            return load_module(
                model,
                &self.source,
                &mapping,
                options.load(),
                "text_encoder_2",
            );
        }
        let mapping = KeyMapping {
            key_of: Box::new(move |path: &str| match path {
                "text_projection.weight" => format!("{p}text_projection"),
                _ => ldm::open_clip_key_with(p, path).unwrap_or_else(|| format!("{p}{path}")),
            }),
            prefix: p.into(),
            ignorable: Box::new(move |k| {
                let rest = &k[p.len().min(k.len())..];
                rest == "logit_scale"
                    || rest == "attn_mask"
                    || rest
                        .strip_prefix("transformer.resblocks.")
                        .and_then(|r| r.split('.').next())
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i >= layers)
            }),
            fused_parts: 3,
            transposed: Box::new(move |k| k == format!("{p}text_projection")),
        };
        load_module(
            model,
            &self.source,
            &mapping,
            options.load(),
            "text_encoder_2",
        )
    }

    /// Whether the text encoder is SD 2.x's OpenCLIP ViT-H (1024 wide).
    pub fn is_sd2(&self) -> bool {
        self.text_encoder.hidden_size == 1024
    }

    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors.
    pub fn source(&self) -> &WeightSource {
        &self.source
    }

    /// The U-Net config in use.
    pub fn unet_config(&self) -> &UNet2DConditionConfig {
        &self.unet
    }

    /// The VAE config in use.
    pub fn vae_config(&self) -> &AutoencoderKLConfig {
        &self.vae
    }

    /// The text-encoder config in use.
    pub fn text_encoder_config(&self) -> &ClipTextConfig {
        &self.text_encoder
    }

    /// Builds the U-Net and loads `model.diffusion_model.*`.
    pub fn unet(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<UNet2DConditionModel, IoError> {
        let model =
            UNet2DConditionModel::new(&self.unet, device).map_err(config_err(&self.path))?;
        let map = LdmKeyMap::unet(&self.unet).with_root(self.layout.unet);
        let mut mapping = KeyMapping::ldm(map, self.layout.unet);
        if self.layout.unet.is_empty() {
            // Alone in its file: every key is the U-Net's.
            mapping.ignorable = Box::new(|_| false);
        }
        load_module(model, &self.source, &mapping, options.load(), "unet")
    }

    /// Builds the VAE and loads `first_stage_model.*` (mid-block attention 1x1 convs
    /// become linear layers).
    pub fn vae(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<AutoencoderKL, IoError> {
        ldm_vae(&self.source, &self.path, &self.vae, device, options)
    }

    /// Builds the CLIP text encoder and loads `cond_stage_model.transformer.*`
    /// (`cond_stage_model.model.*` for SD 2.x, `conditioner.embedders.0.transformer.*`
    /// for SDXL).
    ///
    /// # Errors
    /// The SDXL refiner (no first text encoder: see
    /// [`text_encoder_2_only`](Self::text_encoder_2_only)), missing or mismatched keys.
    pub fn text_encoder(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<ClipTextModel, IoError> {
        if self.text_encoder_2_only() {
            return Err(IoError::Unsupported(format!(
                "{}: the SDXL refiner has no first text encoder; its prompts are encoded \
                 by text_encoder_2 alone",
                self.path.display()
            )));
        }
        if self.source.has_prefix(ldm::OPEN_CLIP_PREFIX) {
            return self.open_clip_text_encoder(device, options);
        }
        let model =
            ClipTextModel::new(&self.text_encoder, device).map_err(config_err(&self.path))?;
        let mapping = hf_clip_mapping(&self.source, self.layout.text_encoder, &self.text_encoder);
        load_module(
            model,
            &self.source,
            &mapping,
            options.load(),
            "text_encoder",
        )
    }
}

/// The keys of a CLIP text encoder stored in transformers' names under `root`
/// (`text_model.` after it or not), as the original files keep CLIP ViT-L and
/// stable-diffusion.cpp keeps every encoder: q, k, v apart or fused into
/// `self_attn.in_proj` (parts `#0`..`#2`); a projection stored as OpenCLIP's
/// `text_model.text_projection` (`x @ proj`) is read transposed. Layers past the
/// config's (SD 2.x uses 23 of 24), `logit_scale`, position ids and a projection the
/// model has no use for may stay unused.
fn hf_clip_mapping(
    source: &WeightSource,
    root: &'static str,
    config: &ClipTextConfig,
) -> KeyMapping<'static> {
    let inner = if source.has_prefix(&format!("{root}text_model.")) {
        "text_model."
    } else {
        ""
    };
    let fused = source
        .get(&format!(
            "{root}{inner}encoder.layers.0.self_attn.in_proj.weight"
        ))
        .is_some();
    let open_clip_projection = format!("{root}text_model.text_projection");
    let projection_key = open_clip_projection.clone();
    let transposed_key = open_clip_projection.clone();
    let has_open_clip_projection = source.get(&open_clip_projection).is_some();
    let wants_projection = config.text_projection_dim().is_some();
    let layers = config.num_hidden_layers;
    let layer_prefix = format!("{root}{inner}encoder.layers.");
    KeyMapping {
        key_of: Box::new(move |path: &str| {
            if path == "text_projection.weight" && has_open_clip_projection {
                return projection_key.clone();
            }
            let key = match path.strip_prefix("text_model.") {
                Some(rest) => format!("{root}{inner}{rest}"),
                None => format!("{root}{path}"),
            };
            if !fused {
                return key;
            }
            for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let from = format!(".self_attn.{proj}.");
                if key.contains(&from) {
                    return format!("{}#{i}", key.replace(&from, ".self_attn.in_proj."));
                }
            }
            key
        }),
        prefix: root.into(),
        ignorable: Box::new(move |k| {
            k.ends_with("position_ids")
                || k.ends_with("logit_scale")
                || (!wants_projection && k == open_clip_projection)
                || k.strip_prefix(&layer_prefix)
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i >= layers)
        }),
        fused_parts: if fused { 3 } else { 1 },
        transposed: Box::new(move |k| k == transposed_key),
    }
}

/// Builds a VAE from `config` and loads it from `first_stage_model.*` (LDM naming)
/// of a single file's `source`.
pub(crate) fn ldm_vae(
    source: &WeightSource,
    path: &Path,
    config: &AutoencoderKLConfig,
    device: &Device,
    options: &ComponentOptions,
) -> Result<AutoencoderKL, IoError> {
    let model = AutoencoderKL::new(config, device).map_err(config_err(path))?;
    let mapping = KeyMapping::ldm(LdmKeyMap::vae(config), ldm::VAE_PREFIX);
    load_module(model, source, &mapping, options.load(), "vae")
}

/// Opens a single-file checkpoint (`.safetensors` or GGUF, told by its bytes).
pub(crate) fn open_checkpoint(path: &Path) -> Result<WeightSource, IoError> {
    let name = path.to_string_lossy();
    if name.ends_with(".ckpt") || name.ends_with(".pt") || name.ends_with(".bin") {
        return Err(IoError::Unsupported(format!(
            "{name}: only .safetensors and GGUF checkpoints are read (pickle files can run code); convert it first"
        )));
    }
    if !path.is_file() {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
            what: "single-file checkpoint".into(),
        });
    }
    WeightSource::open(path)
}

impl SingleFile {
    /// SD 2.x: the OpenCLIP ViT-H text encoder under `cond_stage_model.model.*`, with
    /// fused `in_proj_weight` / `in_proj_bias` split into q, k, v. Layers past the
    /// config's `num_hidden_layers` (SD 2.x uses 23 of OpenCLIP's 24), the projection
    /// and `logit_scale` are not used by the text model and may stay unused.
    fn open_clip_text_encoder(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<ClipTextModel, IoError> {
        let model =
            ClipTextModel::new(&self.text_encoder, device).map_err(config_err(&self.path))?;
        let layers = self.text_encoder.num_hidden_layers;
        let p = ldm::OPEN_CLIP_PREFIX;
        let mapping = KeyMapping {
            key_of: Box::new(move |path: &str| {
                ldm::open_clip_key(path).unwrap_or_else(|| format!("{p}{path}"))
            }),
            prefix: p.into(),
            ignorable: Box::new(move |k| {
                let rest = &k[p.len().min(k.len())..];
                rest == "text_projection"
                    || rest == "logit_scale"
                    || rest == "attn_mask"
                    || rest
                        .strip_prefix("transformer.resblocks.")
                        .and_then(|r| r.split('.').next())
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i >= layers)
            }),
            fused_parts: 3,
            transposed: Box::new(|_| false),
        };
        load_module(
            model,
            &self.source,
            &mapping,
            options.load(),
            "text_encoder",
        )
    }
}
