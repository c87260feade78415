//! Where a pipeline comes from: diffusers folders, single-file checkpoints (and hub
//! repositories with the `hub` feature), recognised from their files.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::DType;
use sd_io::model::{builtin_configs, unet_from_dir, vae_from_dir};
use sd_io::sd3::read_sd3_transformer_config;
use sd_io::{ClipTokenizer, ComponentOptions, DiffusersDir, LoraComponent, LoraFile, SingleFile};
use sd_models::lora::{LoraMode, apply_lora};
use sd_models::{AutoencoderKL, AutoencoderKLConfig, ClipTextModel, VaeTiling};
use sd_schedulers::SchedulerConfig;

use crate::conditioner::TextEncoders;
use crate::denoiser_model::DenoiserModel;
use crate::error::PipelineError;

/// Where [`crate::StableDiffusionPipeline::from_pretrained`] loads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`, `scheduler/`) or a single-file checkpoint (`.safetensors`, or
    /// GGUF as stable-diffusion.cpp and ComfyUI-GGUF write it).
    Path(PathBuf),
    /// A Hugging Face hub repository id (`owner/name`), downloaded with the `hub`
    /// feature.
    Hub {
        /// `owner/name`.
        repo: String,
        /// A branch, tag or commit (`main` when `None`).
        revision: Option<String>,
    },
}

impl ModelSource {
    /// A local path when `text` exists on disk, else a hub repository id when it reads
    /// as one (`owner/name`), else the path (whose absence loading reports).
    pub fn parse(text: &str) -> Self {
        let path = Path::new(text);
        if path.exists() {
            return Self::Path(path.to_path_buf());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let is_repo = parts.len() == 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && !p.starts_with('.')
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            })
            && !text.ends_with(".safetensors")
            && !text.ends_with(".gguf");
        if is_repo {
            Self::Hub {
                repo: text.to_string(),
                revision: None,
            }
        } else {
            Self::Path(path.to_path_buf())
        }
    }
}

impl From<&str> for ModelSource {
    fn from(text: &str) -> Self {
        Self::parse(text)
    }
}

impl From<String> for ModelSource {
    fn from(text: String) -> Self {
        Self::parse(&text)
    }
}

impl From<&Path> for ModelSource {
    fn from(path: &Path) -> Self {
        Self::Path(path.to_path_buf())
    }
}

impl From<PathBuf> for ModelSource {
    fn from(path: PathBuf) -> Self {
        Self::Path(path)
    }
}

impl From<&PathBuf> for ModelSource {
    fn from(path: &PathBuf) -> Self {
        Self::Path(path.clone())
    }
}

/// A LoRA file and the strength it is applied at (1.0: as trained).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// A kohya / A1111, diffusers or PEFT LoRA `.safetensors` file.
    pub path: PathBuf,
    /// Multiplier of the LoRA's deltas.
    pub strength: f32,
}

impl LoraSpec {
    /// Parses `PATH` or `PATH:STRENGTH` (the command-line form).
    pub fn parse(spec: &str) -> Self {
        match spec.rsplit_once(':') {
            Some((p, s)) if s.parse::<f32>().is_ok() => Self {
                path: p.into(),
                strength: s.parse().unwrap_or(1.0),
            },
            _ => Self {
                path: spec.into(),
                strength: 1.0,
            },
        }
    }
}

/// How [`crate::StableDiffusionPipeline::from_pretrained`] builds the components.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Float dtype of the U-Net (`F32` when `None`; `F16`/`BF16` halve its memory).
    /// On the CPU backend only the weights of linear and convolution layers take it
    /// and the U-Net computes in f32 at f32 speed (see [`sd_io::LoadOptions::dtype`]);
    /// on GPUs it computes in that dtype.
    pub unet_dtype: Option<DType>,
    /// Float dtype of the text encoders (`F32` when `None`), as `unet_dtype`: on the
    /// CPU backend the weights alone, computing in f32. On GPUs T5 (SD 3) takes `F16`
    /// as f32, since its activations overflow f16 (`BF16` works).
    pub text_encoder_dtype: Option<DType>,
    /// Float dtype of the VAE (`F32` when `None`). On GPUs, a VAE whose config does
    /// not say `force_upcast: false` stays f32, as diffusers upcasts it in f16
    /// pipelines (the SD 1.5 and SDXL VAEs overflow in f16); one that does (SDXL's
    /// fp16-fix VAE, `madebyollin/sdxl-vae-fp16-fix`) runs in this dtype. On the CPU
    /// backend only the weights take it (the VAE computes in f32, nothing overflows),
    /// so every VAE halves its memory there.
    pub vae_dtype: Option<DType>,
    /// Expand GGUF weights stored as Q8_0, Q5_0 or Q4_0 to the components' dtypes.
    /// Otherwise, on the CPU backend, linear layers keep them compressed (8-bit
    /// values and a scale per 32: 9 bits a weight) and compute with them exactly
    /// ([`sd_io::LoadOptions::dequantize`]); other GGUF types are expanded anyway.
    pub dequantize_weights: bool,
    /// Weight variant to read from a diffusers folder (`"fp16"`: `*.fp16.safetensors`).
    pub variant: Option<String>,
    /// Take the U-Net from this folder (a pipeline folder or a `unet/` folder), e.g.
    /// an inpainting U-Net.
    pub unet: Option<PathBuf>,
    /// Take the VAE from this folder (a pipeline folder or a `vae/` folder).
    pub vae: Option<PathBuf>,
    /// The scheduler's `prediction_type` (`epsilon`, `v_prediction`, `sample`) when the
    /// source does not say it right: single-file SD 2.x checkpoints are taken as
    /// `v_prediction` (SD 2.x 768-v); SD 2.x base (512) wants `epsilon`.
    pub prediction_type: Option<String>,
    /// For a single-file checkpoint: take the architecture, tokenizer and scheduler
    /// from this diffusers folder's configs instead of recognising SD 1.5 / 2.1 from
    /// the tensors (diffusers' `from_single_file(..., config=DIR)`).
    pub config: Option<PathBuf>,
    /// Text encoder weights in files of their own, for a single-file SD 3 / 3.5
    /// checkpoint that does not hold them (ComfyUI's `clip_l.safetensors`,
    /// `clip_g.safetensors`, `t5xxl_fp16.safetensors`), each recognised from its
    /// tensors (CLIP by its width, T5).
    pub text_encoder_files: Vec<PathBuf>,
    /// When the VAE works in tiles (default: above 1024x1024 pixels).
    pub vae_tiling: VaeTiling,
    /// A tiny autoencoder (TAESD's diffusers folder, `madebyollin/taesd`) for
    /// previews and, on request, fast decoding; see
    /// [`crate::StableDiffusionPipeline::load_tiny_vae`].
    pub tiny_vae: Option<PathBuf>,
    /// The invisible watermark ([`sd_io::watermark::DwtDctWatermark`], SDXL's message)
    /// in every picture of 256x256 or more: `None` does as diffusers (on for SDXL, off
    /// for SD 1.x/2.x), `Some(false)` turns it off, `Some(true)` on for any model.
    pub watermark: Option<bool>,
    /// The safety checker (diffusers' `StableDiffusionSafetyChecker`) run on every
    /// picture, flagged ones blacked out: `None` loads it when the model folder has
    /// `safety_checker/` and `feature_extractor/` (as diffusers), `Some(false)`
    /// does not (an explicit choice; see docs/responsible-use.md), `Some(true)`
    /// requires it.
    pub safety_checker: Option<bool>,
    /// ControlNets to load with the model (folders, files, or hub repository ids
    /// fetched as `hub` says); requests name them by position
    /// ([`crate::ControlInput::new`]).
    pub controlnets: Vec<PathBuf>,
    /// T2I-Adapters to load with the model (folders, files or hub repository ids);
    /// requests name them by position ([`crate::AdapterInput::new`]).
    pub adapters: Vec<PathBuf>,
    /// LoRAs merged into the weights once, at load.
    pub loras: Vec<LoraSpec>,
    /// Where hub repositories are fetched from and cached (the `hub` feature);
    /// unset fields come from `HF_ENDPOINT`, `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`.
    pub hub: crate::hub::HubOptions,
}

/// The model family a source was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Stable Diffusion 1.x (CLIP ViT-L text encoder).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H text encoder).
    Sd2,
    /// Stable Diffusion XL (CLIP ViT-L and OpenCLIP bigG, the `text_time` U-Net).
    Sdxl,
    /// Stable Diffusion 3 / 3.5 (CLIP-L, CLIP-G and T5, the MMDiT transformer, flow
    /// matching).
    Sd3,
}

/// The loaded components and what was recognised about them.
pub(crate) struct Loaded {
    /// The tokenizers and text encoders, by conditioning family.
    pub text_encoders: TextEncoders,
    pub denoiser: DenoiserModel,
    pub vae: AutoencoderKL,
    pub vae_config: AutoencoderKLConfig,
    pub scheduler_config: SchedulerConfig,
    pub family: ModelFamily,
    pub name: String,
}

fn component_dir(dir: &Path, component: &str) -> PathBuf {
    if dir.join(component).join("config.json").exists() {
        dir.join(component)
    } else {
        dir.to_path_buf()
    }
}

pub(crate) fn model_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// Loads a local folder or single file with the options' overrides and LoRAs.
pub(crate) fn load_path(
    path: &Path,
    device: &Device,
    options: &LoadOptions,
) -> Result<Loaded, PipelineError> {
    if !path.exists() {
        return Err(PipelineError::Source {
            source_name: path.display().to_string(),
            message: "no such file or folder".into(),
        });
    }
    let mut loaded = if path.is_dir() {
        load_dir(path, device, options)?
    } else if crate::load_sd3::is_sd3_single_file(path) {
        crate::load_sd3::load_sd3_single_file(path, device, options)?
    } else {
        load_single_file(path, device, options)?
    };
    let unet_opts = unet_options(options);
    if let Some(dir) = &options.unet {
        loaded
            .denoiser
            .require_unet("LoadOptions::unet (a replacement U-Net)")?;
        let dir = component_dir(dir, "unet");
        loaded.denoiser = DenoiserModel::UNet {
            config: sd_io::model::read_unet_config(&dir.join("config.json"))?,
            model: unet_from_dir(&dir, device, &unet_opts)?,
        };
    }
    if let Some(dir) = &options.vae {
        let dir = component_dir(dir, "vae");
        loaded.vae_config = sd_io::model::read_vae_config(&dir.join("config.json"))?;
        let opts = ComponentOptions {
            variant: None,
            ..vae_options(options, &loaded.vae_config, device)
        };
        loaded.vae = vae_from_dir(&dir, device, &opts)?;
    }
    if let Some(p) = &options.prediction_type {
        loaded.scheduler_config.prediction_type = Some(p.clone());
    }
    loaded.vae = loaded.vae.with_tiling(options.vae_tiling);
    for lora in &options.loras {
        let targets = LoraTargets::borrowed(&loaded.denoiser, &loaded.text_encoders);
        let t = apply_lora_file(targets, lora)?;
        let (denoiser, te, te2) = t.into_owned();
        loaded.denoiser = denoiser;
        loaded.text_encoders.replace(te, te2);
    }
    Ok(loaded)
}

/// The VAE's load options: `vae_dtype`, unless the VAE computes in it (GPUs) and its
/// config asks for the f32 upcast (`force_upcast`, true unless it says false, as
/// diffusers' default).
pub(crate) fn vae_options(
    options: &LoadOptions,
    config: &AutoencoderKLConfig,
    device: &Device,
) -> ComponentOptions {
    let dtype = match options.vae_dtype {
        Some(d)
            if d != DType::F32
                && config.force_upcast != Some(false)
                && !sd_io::half_weights_only(device) =>
        {
            None
        }
        d => d,
    };
    component_options(options, dtype)
}

pub(crate) fn unet_options(options: &LoadOptions) -> ComponentOptions {
    component_options(options, options.unet_dtype)
}

/// The text encoders' load options (`text_encoder_dtype`); T5 takes them through
/// [`t5_options`].
pub(crate) fn text_encoder_options(options: &LoadOptions) -> ComponentOptions {
    component_options(options, options.text_encoder_dtype)
}

/// A component's load options: `dtype`, and what every component shares (the
/// weight variant, whether GGUF weights are expanded).
fn component_options(options: &LoadOptions, dtype: Option<DType>) -> ComponentOptions {
    ComponentOptions {
        dtype,
        variant: options.variant.clone(),
        dequantize: options.dequantize_weights,
    }
}

/// T5's load options from the text encoders' (`options`): `F16` becomes f32 where
/// the model would compute in it (GPUs), as T5's feed-forward activations overflow
/// f16; on the CPU backend only the weights take it.
pub(crate) fn t5_options(options: &ComponentOptions, device: &Device) -> ComponentOptions {
    let dtype = match options.dtype {
        Some(DType::F16) if !sd_io::half_weights_only(device) => None,
        d => d,
    };
    ComponentOptions {
        dtype,
        ..options.clone()
    }
}

fn load_dir(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Loaded, PipelineError> {
    let model = DiffusersDir::open(dir)?;
    let text_encoders = TextEncoders::from_dir(&model, device, &text_encoder_options(options))?;
    let family = match &text_encoders {
        TextEncoders::Sd3 { .. } => ModelFamily::Sd3,
        TextEncoders::Sdxl { .. } => ModelFamily::Sdxl,
        TextEncoders::Clip { text_encoder, .. } if text_encoder_width(text_encoder) == 1024 => {
            ModelFamily::Sd2
        }
        TextEncoders::Clip { .. } => ModelFamily::Sd1,
    };
    let denoiser = if family == ModelFamily::Sd3 {
        DenoiserModel::Sd3 {
            config: read_sd3_transformer_config(&dir.join("transformer/config.json"))?,
            model: model.sd3_transformer(device, &unet_options(options))?,
        }
    } else {
        DenoiserModel::UNet {
            model: model.unet(device, &unet_options(options))?,
            config: model.unet_config()?,
        }
    };
    Ok(Loaded {
        text_encoders,
        denoiser,
        vae: model.vae(device, &vae_options(options, &model.vae_config()?, device))?,
        vae_config: model.vae_config()?,
        scheduler_config: SchedulerConfig::from_json(&model.scheduler_config_text()?)?,
        family,
        name: model_name(dir),
    })
}

fn text_encoder_width(te: &ClipTextModel) -> usize {
    sd_core::TextEncoder::hidden_size(te)
}

fn load_single_file(
    path: &Path,
    device: &Device,
    options: &LoadOptions,
) -> Result<Loaded, PipelineError> {
    let te_opts = text_encoder_options(options);
    let configs = options
        .config
        .as_deref()
        .map(DiffusersDir::open)
        .transpose()?;
    // The first tokenizer is read only where there is a first encoder (the refiner's
    // file has the second alone, and its config folder no `tokenizer/`).
    type FirstTokenizer<'a> = Box<dyn FnOnce() -> Result<ClipTokenizer, PipelineError> + 'a>;
    let (ckpt, first, tokenizer_2, scheduler, force_zeros): (_, FirstTokenizer<'_>, _, _, _) =
        match &configs {
            Some(configs) => {
                let ckpt = SingleFile::open_with_configs(path, configs.root())?;
                let tokenizer_2 = if ckpt.is_sdxl() {
                    Some(configs.tokenizer_2()?)
                } else {
                    None
                };
                let force_zeros = configs
                    .force_zeros_for_empty_prompt()?
                    .unwrap_or(!ckpt.text_encoder_2_only());
                let scheduler = configs.scheduler_config_text()?;
                let first = Box::new(move || Ok(configs.tokenizer()?));
                (ckpt, first, tokenizer_2, scheduler, force_zeros)
            }
            None => {
                let ckpt = SingleFile::open(path)?;
                let (pad, scheduler) = if ckpt.is_sdxl() {
                    ("<|endoftext|>", builtin_configs::SDXL_SCHEDULER)
                } else if ckpt.is_sd2() {
                    ("!", builtin_configs::SD21_SCHEDULER)
                } else {
                    ("<|endoftext|>", builtin_configs::SD15_SCHEDULER)
                };
                // SDXL's tokenizer_2 pads with "!"; the refiner has that one alone.
                let tokenizer_2 = if ckpt.is_sdxl() {
                    Some(ClipTokenizer::clip("!")?)
                } else {
                    None
                };
                // SDXL base 1.0's index says true, the refiner's false.
                let force_zeros = ckpt.is_sdxl() && !ckpt.text_encoder_2_only();
                let first = Box::new(move || Ok(ClipTokenizer::clip(pad)?));
                (ckpt, first, tokenizer_2, scheduler.to_string(), force_zeros)
            }
        };
    let family = if ckpt.is_sdxl() {
        ModelFamily::Sdxl
    } else if ckpt.is_sd2() {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    };
    let alone = |what: &str| PipelineError::Source {
        source_name: path.display().to_string(),
        message: format!(
            "the file holds the U-Net alone (as ComfyUI-GGUF files do): give the model's \
             diffusers folder as LoadOptions::config (`--config DIR`) for its {what}"
        ),
    };
    let text_encoders = if !ckpt.has_text_encoders() {
        let dir = configs.as_ref().ok_or_else(|| alone("text encoders"))?;
        TextEncoders::from_dir(dir, device, &te_opts)?
    } else {
        match tokenizer_2 {
            Some(tokenizer_2) => TextEncoders::Sdxl {
                first: if ckpt.text_encoder_2_only() {
                    None
                } else {
                    Some((first()?, ckpt.text_encoder(device, &te_opts)?))
                },
                tokenizer_2,
                text_encoder_2: ckpt.text_encoder_2(device, &te_opts)?,
                force_zeros_for_empty_prompt: force_zeros,
            },
            None => TextEncoders::Clip {
                tokenizer: first()?,
                text_encoder: ckpt.text_encoder(device, &te_opts)?,
            },
        }
    };
    let vae_opts = vae_options(options, ckpt.vae_config(), device);
    let vae = if ckpt.has_vae() {
        ckpt.vae(device, &vae_opts)?
    } else if let Some(dir) = &options.vae {
        // Read here and again by `load_path`'s override: a VAE is small.
        vae_from_dir(&component_dir(dir, "vae"), device, &vae_opts)?
    } else {
        let dir = configs.as_ref().ok_or_else(|| alone("VAE"))?;
        dir.vae(device, &vae_opts)?
    };
    Ok(Loaded {
        text_encoders,
        denoiser: DenoiserModel::UNet {
            model: ckpt.unet(device, &unet_options(options))?,
            config: ckpt.unet_config().clone(),
        },
        vae,
        vae_config: ckpt.vae_config().clone(),
        scheduler_config: SchedulerConfig::from_json(&scheduler)?,
        family,
        name: model_name(path),
    })
}

/// The models a LoRA file may adapt, borrowed until one is changed.
pub(crate) struct LoraTargets<'a> {
    pub denoiser: Cow<'a, DenoiserModel>,
    /// The first text encoder (`None`: the SDXL refiner has none).
    pub text_encoder: Option<Cow<'a, ClipTextModel>>,
    pub text_encoder_2: Option<Cow<'a, ClipTextModel>>,
}

impl<'a> LoraTargets<'a> {
    pub fn borrowed(denoiser: &'a DenoiserModel, text_encoders: &'a TextEncoders) -> Self {
        Self {
            denoiser: Cow::Borrowed(denoiser),
            text_encoder: text_encoders.text_encoder().map(Cow::Borrowed),
            text_encoder_2: text_encoders.text_encoder_2().map(Cow::Borrowed),
        }
    }

    /// The denoiser and the encoders a LoRA changed (`None`: unchanged).
    pub fn into_owned(self) -> (DenoiserModel, Option<ClipTextModel>, Option<ClipTextModel>) {
        let changed = |t: Option<Cow<'a, ClipTextModel>>| match t {
            Some(Cow::Owned(t)) => Some(t),
            _ => None,
        };
        (
            self.denoiser.into_owned(),
            changed(self.text_encoder),
            changed(self.text_encoder_2),
        )
    }
}

/// Merges one LoRA file into copies of the models it has layers for (the others are
/// returned as they were). U-Net layers may use diffusers' names or the original
/// ones (kohya's SDXL LoRAs: `lora_unet_input_blocks_4_1_...`).
pub(crate) fn apply_lora_file<'a>(
    t: LoraTargets<'a>,
    lora: &LoraSpec,
) -> Result<LoraTargets<'a>, PipelineError> {
    let file = LoraFile::open(&lora.path)?;
    let LoraTargets {
        mut denoiser,
        mut text_encoder,
        mut text_encoder_2,
    } = t;
    let strength = lora.strength;
    if file.has(LoraComponent::Unet)
        && let DenoiserModel::Sd3 { model, config } = denoiser.as_ref()
    {
        // SD 3's transformer: diffusers' names, or the original MMDiT's (kohya's
        // `lora_unet_joint_blocks_0_x_block_attn_qkv`, q/k/v rows of the fused qkv).
        let last = config.num_layers.saturating_sub(1);
        let alias = |k: &str| Some(sd_io::sd3_single_file::mmdit_key(k, last));
        let w = file.weights_for_aliased(LoraComponent::Unet, model, alias)?;
        let merged = DenoiserModel::Sd3 {
            model: apply_lora(model.clone(), &[(&w, strength)], LoraMode::Merge)?,
            config: config.clone(),
        };
        denoiser = Cow::Owned(merged);
    } else if file.has(LoraComponent::Unet) {
        let (unet, unet_config) = denoiser.require_unet("a LoRA")?;
        let ldm = sd_io::ldm::LdmKeyMap::unet(unet_config);
        let alias = |k: &str| {
            ldm.map(k)
                .strip_prefix(sd_io::ldm::UNET_PREFIX)
                .map(String::from)
        };
        let w = file.weights_for_aliased(LoraComponent::Unet, unet, alias)?;
        let merged = DenoiserModel::UNet {
            model: apply_lora(unet.clone(), &[(&w, strength)], LoraMode::Merge)?,
            config: unet_config.clone(),
        };
        denoiser = Cow::Owned(merged);
    }
    if file.has(LoraComponent::TextEncoder) {
        let Some(te) = text_encoder else {
            return Err(PipelineError::request(
                "lora",
                format!(
                    "{} has layers for a first text encoder, which this model (the SDXL refiner) lacks",
                    lora.path.display()
                ),
            ));
        };
        let w = file.weights_for(LoraComponent::TextEncoder, te.as_ref())?;
        let te = apply_lora(te.into_owned(), &[(&w, strength)], LoraMode::Merge)?;
        text_encoder = Some(Cow::Owned(te));
    }
    if file.has(LoraComponent::TextEncoder2) {
        let Some(te2) = text_encoder_2 else {
            return Err(PipelineError::request(
                "lora",
                format!(
                    "{} has layers for a second text encoder (SDXL), which this model lacks",
                    lora.path.display()
                ),
            ));
        };
        let w = file.weights_for(LoraComponent::TextEncoder2, te2.as_ref())?;
        let te2 = apply_lora(te2.into_owned(), &[(&w, strength)], LoraMode::Merge)?;
        text_encoder_2 = Some(Cow::Owned(te2));
    }
    Ok(LoraTargets {
        denoiser,
        text_encoder,
        text_encoder_2,
    })
}
