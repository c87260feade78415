//! Loading an SD 3 / SD 3.5 original single file ([`sd_io::Sd3SingleFile`]): the
//! MMDiT and the VAE from the file, each text encoder from the file, from a file of
//! its own ([`crate::LoadOptions::text_encoder_files`]) or from the config folder,
//! the tokenizers and scheduler from the config folder or built in.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use sd_io::sd3_single_file::{
    self, TextEncoderFile, builtin_clip_config, builtin_t5_config, recognise_text_encoder_file,
};
use sd_io::{
    ClipTokenizer, ComponentOptions, DiffusersDir, Sd3SingleFile, T5Tokenizer, WeightSource,
};
use sd_models::{ClipTextConfig, ClipTextModel, T5Config, T5EncoderModel};
use sd_schedulers::SchedulerConfig;

use crate::conditioner::TextEncoders;
use crate::denoiser_model::DenoiserModel;
use crate::error::PipelineError;
use crate::load::{
    LoadOptions, Loaded, ModelFamily, model_name, t5_options, text_encoder_options, unet_options,
    vae_options,
};

/// Whether `path` is a single file holding an SD 3 MMDiT.
pub(crate) fn is_sd3_single_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e == "safetensors" || e == "gguf")
        && WeightSource::open(path).is_ok_and(|s| sd3_single_file::is_sd3_checkpoint(&s))
}

/// The encoder files given beside the checkpoint, by what they hold.
struct EncoderFiles(Vec<(TextEncoderFile, PathBuf)>);

impl EncoderFiles {
    fn recognise(paths: &[PathBuf]) -> Result<Self, PipelineError> {
        let mut files = Vec::new();
        for path in paths {
            let source = WeightSource::open(path)?;
            let kind = recognise_text_encoder_file(&source).ok_or_else(|| {
                source_error(
                    path,
                    "not a CLIP (`text_model.*`) or T5 (`encoder.block.*`) text encoder file",
                )
            })?;
            files.push((kind, path.clone()));
        }
        Ok(Self(files))
    }

    fn clip(&self, width: usize) -> Option<&Path> {
        self.0
            .iter()
            .find_map(|(k, p)| (*k == TextEncoderFile::Clip { width }).then_some(p.as_path()))
    }

    fn t5(&self) -> Option<&Path> {
        self.0
            .iter()
            .find_map(|(k, p)| (*k == TextEncoderFile::T5).then_some(p.as_path()))
    }
}

pub(crate) fn load_sd3_single_file(
    path: &Path,
    device: &Device,
    options: &LoadOptions,
) -> Result<Loaded, PipelineError> {
    let configs = options
        .config
        .as_ref()
        .map(DiffusersDir::open)
        .transpose()?;
    let file = match &configs {
        Some(dir) => Sd3SingleFile::open_with_configs(path, dir.root())?,
        None => Sd3SingleFile::open(path)?,
    };
    let encoders = EncoderFiles::recognise(&options.text_encoder_files)?;
    let te_opts = text_encoder_options(options);
    let clip = |i: usize| -> Result<(ClipTokenizer, ClipTextModel), PipelineError> {
        let (tokenizer, config) = clip_tokenizer_and_config(configs.as_ref(), i)?;
        let model = match file.clip_text_encoder(i, &config, device, &te_opts)? {
            Some(m) => m,
            None => match (encoders.clip(config.hidden_size), &configs) {
                (Some(p), _) => {
                    sd3_single_file::clip_text_encoder_from_file(p, &config, device, &te_opts)?
                }
                (None, Some(dir)) if i == 0 && dir.has("text_encoder") => {
                    dir.text_encoder(device, &te_opts)?
                }
                (None, Some(dir)) if i == 1 && dir.has("text_encoder_2") => {
                    dir.text_encoder_2(device, &te_opts)?
                }
                _ => {
                    return Err(missing_encoder(
                        path,
                        ["CLIP-L", "CLIP-G"][i],
                        config.hidden_size,
                    ));
                }
            },
        };
        Ok((tokenizer, model))
    };
    let (clip_l, clip_g) = (clip(0)?, clip(1)?);
    let t5_opts = t5_options(&te_opts, device);
    let t5 = t5_encoder(&file, &encoders, configs.as_ref(), device, &t5_opts)?;
    let vae = match (file.has_vae(), &configs) {
        (false, Some(dir)) if dir.has("vae") => {
            let config = dir.vae_config()?;
            (
                dir.vae(device, &vae_options(options, &config, device))?,
                config,
            )
        }
        _ => (
            file.vae(device, &vae_options(options, file.vae_config(), device))?,
            file.vae_config().clone(),
        ),
    };
    let scheduler = match &configs {
        Some(dir) if dir.has("scheduler") => dir.scheduler_config_text()?,
        _ => sd3_single_file::builtin_configs::SD3_SCHEDULER.to_string(),
    };
    Ok(Loaded {
        text_encoders: TextEncoders::Sd3 {
            clip_l,
            clip_g,
            t5,
            joint_attention_dim: file.transformer_config().joint_attention_dim,
        },
        denoiser: DenoiserModel::Sd3 {
            model: file.transformer(device, &unet_options(options))?,
            config: file.transformer_config().clone(),
        },
        vae: vae.0,
        vae_config: vae.1,
        scheduler_config: SchedulerConfig::from_json(&scheduler)?,
        family: ModelFamily::Sd3,
        name: model_name(path),
    })
}

/// CLIP-L's (`i` 0) or CLIP-G's (1) tokenizer and config: the config folder's, or
/// the built-in ones (CLIP-G pads with `!`, as SDXL's second tokenizer).
fn clip_tokenizer_and_config(
    configs: Option<&DiffusersDir>,
    i: usize,
) -> Result<(ClipTokenizer, ClipTextConfig), PipelineError> {
    let (encoder, tokenizer) = [
        ("text_encoder", "tokenizer"),
        ("text_encoder_2", "tokenizer_2"),
    ][i];
    let config = match configs {
        Some(dir) if dir.has(encoder) => {
            let c = sd_io::model::read_text_encoder_config(
                &dir.root().join(encoder).join("config.json"),
            )?;
            sd_io::model::with_projection(c)
        }
        _ => builtin_clip_config(i),
    };
    let tokenizer = match configs {
        Some(dir) if dir.has(tokenizer) && i == 0 => dir.tokenizer()?,
        Some(dir) if dir.has(tokenizer) => dir.tokenizer_2()?,
        _ => ClipTokenizer::clip(["<|endoftext|>", "!"][i])?,
    };
    Ok((tokenizer, config))
}

/// T5 with its tokenizer: from the file, a file of its own or the config folder;
/// `None` when none has it (its states are zeros, as diffusers without
/// `text_encoder_3`).
fn t5_encoder(
    file: &Sd3SingleFile,
    encoders: &EncoderFiles,
    configs: Option<&DiffusersDir>,
    device: &Device,
    options: &ComponentOptions,
) -> Result<Option<(T5Tokenizer, T5EncoderModel)>, PipelineError> {
    let config: T5Config = match configs {
        Some(dir) if dir.has("text_encoder_3") => {
            sd_io::sd3::read_t5_config(&dir.root().join("text_encoder_3/config.json"))?
        }
        _ => builtin_t5_config(),
    };
    let model = match file.text_encoder_3(&config, device, options)? {
        Some(m) => Some(m),
        None => match (encoders.t5(), configs) {
            (Some(p), _) => Some(sd3_single_file::t5_encoder_from_file(
                p, &config, device, options,
            )?),
            (None, Some(dir)) if dir.has("text_encoder_3") => {
                Some(dir.text_encoder_3(device, options)?)
            }
            _ => None,
        },
    };
    let Some(model) = model else {
        return Ok(None);
    };
    let tokenizer = match configs {
        Some(dir) if dir.has("tokenizer_3") => dir.tokenizer_3()?,
        _ => {
            return Err(source_error(
                file.path(),
                "T5 needs its tokenizer, which single files do not carry: give a config \
                 folder with `tokenizer_3/` (LoadOptions::config, --config; e.g. the model's \
                 diffusers repository without its weights)",
            ));
        }
    };
    Ok(Some((tokenizer, model)))
}

fn missing_encoder(path: &Path, name: &str, width: usize) -> PipelineError {
    source_error(
        path,
        &format!(
            "no {name} text encoder ({width} wide) in the file: give its file \
             (LoadOptions::text_encoder_files, --text-encoder; ComfyUI's clip_l.safetensors / \
             clip_g.safetensors) or a config folder holding it"
        ),
    )
}

fn source_error(path: &Path, message: &str) -> PipelineError {
    PipelineError::Source {
        source_name: path.display().to_string(),
        message: message.to_string(),
    }
}
