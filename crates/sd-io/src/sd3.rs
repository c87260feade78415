//! SD 3 / SD 3.5 components of a diffusers folder: the MMDiT transformer
//! (`transformer/`) and the T5 encoder (`text_encoder_3/`); the VAE and the two CLIP
//! encoders load as the other families' do.

use std::path::Path;

use burn::prelude::*;
use sd_models::{SD3Transformer2DConfig, SD3Transformer2DModel, T5Config, T5EncoderModel};

use crate::error::IoError;
use crate::loader::{KeyMapping, load_module};
use crate::model::{
    ComponentOptions, DiffusersDir, component_weights, config_err, diffusers_component,
    read_json_file,
};
use crate::weights::WeightSource;

/// Reads and validates an `SD3Transformer2DModel` `config.json`.
pub fn read_sd3_transformer_config(path: &Path) -> Result<SD3Transformer2DConfig, IoError> {
    SD3Transformer2DConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Reads and validates a `T5EncoderModel` `config.json`.
pub fn read_t5_config(path: &Path) -> Result<T5Config, IoError> {
    T5Config::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Builds the SD 3 transformer from a component folder, e.g. `transformer/`.
pub fn sd3_transformer_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<SD3Transformer2DModel, IoError> {
    diffusers_component(
        dir,
        options,
        "transformer",
        read_sd3_transformer_config,
        SD3Transformer2DModel::new,
        device,
    )
}

/// Builds a T5 encoder from a component folder, e.g. `text_encoder_3/`
/// (`model[.variant].safetensors` or its shards, as T5-XXL ships).
pub fn t5_encoder_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<T5EncoderModel, IoError> {
    let config = read_t5_config(&dir.join("config.json"))?;
    let path = component_weights(dir, "model", options.variant.as_deref())?;
    let model = T5EncoderModel::new(&config, device).map_err(config_err(&path))?;
    let source = WeightSource::open(&path)?;
    load_module(
        model,
        &source,
        &KeyMapping::t5(),
        options.load(),
        "text_encoder_3",
    )
}

impl DiffusersDir {
    /// SD 3's transformer (`transformer/`), weights loaded.
    pub fn sd3_transformer(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<SD3Transformer2DModel, IoError> {
        sd3_transformer_from_dir(&self.root().join("transformer"), device, options)
    }

    /// SD 3's T5 encoder (`text_encoder_3/`), weights loaded.
    pub fn text_encoder_3(
        &self,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<T5EncoderModel, IoError> {
        t5_encoder_from_dir(&self.root().join("text_encoder_3"), device, options)
    }

    /// SD 3's T5 tokenizer (`tokenizer_3/`), padding to 256 tokens.
    pub fn tokenizer_3(&self) -> Result<crate::T5Tokenizer, IoError> {
        crate::T5Tokenizer::from_dir(self.root().join("tokenizer_3"))
    }
}
