//! Depth Anything (transformers' `DepthAnythingForDepthEstimation`) from a hub folder
//! (`config.json` + `model.safetensors`, as `depth-anything/Depth-Anything-V2-Small-hf`)
//! or a `.safetensors` file with its `config.json` beside it.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use sd_models::{DepthAnythingConfig, DepthAnythingForDepthEstimation};

use crate::error::IoError;
use crate::loader::{KeyMapping, load_module};
use crate::model::{ComponentOptions, component_weights, config_err, read_json_file};
use crate::weights::WeightSource;

/// Reads and validates a Depth Anything `config.json`.
pub fn read_depth_anything_config(path: &Path) -> Result<DepthAnythingConfig, IoError> {
    DepthAnythingConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Builds a Depth Anything model from a folder (`config.json` and `model.safetensors`,
/// or its sharded index) or from a weight file with `config.json` beside it. Keys are
/// the hub checkpoints' (`backbone.encoder.layer.{i}.attention.attention.query.weight`);
/// the unused `backbone.embeddings.mask_token` may be present.
///
/// # Errors
/// A missing config or weight file, a config this crate cannot honour, missing or
/// mismatched weights.
pub fn depth_anything_from_path(
    path: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<DepthAnythingForDepthEstimation, IoError> {
    let weights = if path.is_dir() {
        component_weights(path, "model", options.variant.as_deref())?
    } else if path.is_file() {
        path.to_path_buf()
    } else {
        return Err(IoError::NotFound {
            path: path.to_path_buf(),
            what: "Depth Anything folder or weight file".into(),
        });
    };
    let config = read_depth_anything_config(&beside(path, "config.json"))?;
    let model =
        DepthAnythingForDepthEstimation::new(&config, device).map_err(config_err(&weights))?;
    let source = WeightSource::open(&weights)?;
    let mapping = KeyMapping {
        ignorable: Box::new(|k| k == "backbone.embeddings.mask_token"),
        ..KeyMapping::diffusers()
    };
    load_module(model, &source, &mapping, options.load(), "depth model")
}

/// The text of the `preprocessor_config.json` that goes with a Depth Anything folder or
/// weight file (transformers' `DPTImageProcessor` settings), `None` where there is none.
///
/// # Errors
/// A file that is there but cannot be read.
pub fn read_depth_processor_config_text(path: &Path) -> Result<Option<String>, IoError> {
    let file = beside(path, "preprocessor_config.json");
    if file.is_file() {
        read_json_file(&file).map(Some)
    } else {
        Ok(None)
    }
}

/// A side file of a Depth Anything source: in the folder, or next to the weight file.
fn beside(path: &Path, name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(name)
    } else {
        path.with_file_name(name)
    }
}
