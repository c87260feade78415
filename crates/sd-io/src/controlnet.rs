//! ControlNets (and T2I-Adapters) from disk: diffusers folders (`config.json` + weights, the fp16
//! variant too), a diffusers weight file alone, and the original single files of
//! lllyasviel's ControlNet (`control_model.*`, or the same keys without the prefix
//! in files saved alone).

use std::path::Path;

use burn::prelude::*;
use sd_models::{ControlNetConfig, ControlNetModel, UNet2DConditionConfig};

use crate::error::IoError;
use crate::ldm::LdmKeyMap;
use crate::loader::{KeyMapping, load_module};
use crate::model::{
    ComponentOptions, builtin_configs, config_err, diffusers_component, open_checkpoint,
    read_json_file,
};
use crate::weights::WeightSource;

/// Prefix of a ControlNet's keys in the original checkpoints.
pub const CONTROLNET_PREFIX: &str = "control_model.";

/// Reads and validates a ControlNet `config.json`.
pub fn read_controlnet_config(path: &Path) -> Result<ControlNetConfig, IoError> {
    ControlNetConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Builds a ControlNet from a diffusers folder (`config.json` and
/// `diffusion_pytorch_model[.fp16].safetensors`).
pub fn controlnet_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<ControlNetModel, IoError> {
    diffusers_component(
        dir,
        options,
        "controlnet",
        read_controlnet_config,
        ControlNetModel::new,
        device,
    )
}

/// Builds a ControlNet from a folder or a `.safetensors` file. A file in the
/// original layout takes `config` when given, else a config recognised from its
/// tensors (SD 1.x, SD 2.x or SDXL widths, the control image's encoder read off
/// its convs); a diffusers weight file takes `config`, else the `config.json`
/// beside it.
///
/// # Errors
/// A missing or unreadable file, weights that do not fit the config, and files
/// this crate cannot run (control-LoRAs, T2I-Adapters, pickle files), named.
pub fn controlnet_from_path(
    path: &Path,
    config: Option<&ControlNetConfig>,
    device: &Device,
    options: &ComponentOptions,
) -> Result<ControlNetModel, IoError> {
    if path.is_dir() {
        return controlnet_from_dir(path, device, options);
    }
    let source = open_checkpoint(path)?;
    refuse_other_control_files(path, &source)?;
    let (config, mapping) = if source.get("time_embedding.linear_1.weight").is_some() {
        let config = match config {
            Some(c) => c.clone(),
            None => read_controlnet_config(&path.with_file_name("config.json"))?,
        };
        (config, KeyMapping::diffusers())
    } else {
        let root = original_root(path, &source)?;
        let config = match config {
            Some(c) => c.clone(),
            None => infer_config(path, &source, root)?,
        };
        let map = LdmKeyMap::controlnet(&config, root);
        (config, KeyMapping::ldm(map, root))
    };
    let model = ControlNetModel::new(&config, device).map_err(config_err(path))?;
    load_module(model, &source, &mapping, options.load(), "controlnet")
}

/// The config of an original-layout ControlNet file, recognised from its tensors
/// as [`controlnet_from_path`] does without a config.
///
/// # Errors
/// A file that is not an original-layout ControlNet, or one of an unknown family.
pub fn controlnet_config_from_file(path: &Path) -> Result<ControlNetConfig, IoError> {
    let source = open_checkpoint(path)?;
    refuse_other_control_files(path, &source)?;
    let root = original_root(path, &source)?;
    infer_config(path, &source, root)
}

/// `control_model.` when the file holds it, `""` for a ControlNet saved alone.
fn original_root(path: &Path, source: &WeightSource) -> Result<&'static str, IoError> {
    let has = |k: &str| source.has_prefix(k);
    if has(&format!("{CONTROLNET_PREFIX}input_hint_block.")) {
        Ok(CONTROLNET_PREFIX)
    } else if has("input_hint_block.") {
        Ok("")
    } else {
        Err(IoError::Unsupported(format!(
            "{}: not a ControlNet (no input_hint_block, no diffusers \
             controlnet_cond_embedding)",
            path.display()
        )))
    }
}

/// Control files other than full ControlNets, refused by name.
fn refuse_other_control_files(path: &Path, source: &WeightSource) -> Result<(), IoError> {
    let keys = source.tensors();
    let any = |f: &dyn Fn(&str) -> bool| keys.keys().any(|k| f(k));
    let kind = if any(&|k| k == "lora_controlnet" || k.contains(".up.") && k.contains("input_hint"))
        || any(&|k| k.ends_with(".up") || k.ends_with(".down"))
    {
        Some("a control-LoRA (low-rank ControlNet deltas)")
    } else if any(&|k| k.starts_with("adapter.") || k.starts_with("body.0.")) {
        Some("a T2I-Adapter")
    } else {
        None
    };
    match kind {
        Some("a T2I-Adapter") => Err(IoError::Unsupported(format!(
            "{}: a T2I-Adapter, not a ControlNet; load it as an adapter (--adapter, \
             LoadOptions::adapters)",
            path.display()
        ))),
        Some(k) => Err(IoError::Unsupported(format!(
            "{}: {k} is not supported; use a full ControlNet (diffusers folder or \
             control_model.* file)",
            path.display()
        ))),
        None => Ok(()),
    }
}

/// The config of an original-layout ControlNet, from its tensors: the U-Net family
/// from the cross-attention width (768 SD 1.x, 1024 SD 2.x, 2048 SDXL), the input
/// and control-image channels and the control image's encoder widths.
fn infer_config(
    path: &Path,
    source: &WeightSource,
    root: &str,
) -> Result<ControlNetConfig, IoError> {
    let shape = |k: &str| source.get(&format!("{root}{k}")).map(|t| t.shape.clone());
    let cross = source
        .tensors()
        .iter()
        .find(|(k, _)| {
            k.starts_with(&format!("{root}input_blocks.")) && k.ends_with("attn2.to_k.weight")
        })
        .and_then(|(_, t)| t.shape.get(1).copied());
    let sdxl = shape("label_emb.0.0.weight").is_some();
    use builtin_configs::*;
    let unet = match (cross, sdxl) {
        (_, true) => SDXL_UNET,
        (Some(1024), _) => SD21_UNET,
        (Some(768), _) => SD15_UNET,
        (w, _) => {
            return Err(IoError::Unsupported(format!(
                "{}: a ControlNet with cross-attention width {w:?} is not recognised; \
                 pass its config",
                path.display()
            )));
        }
    };
    let mut unet = UNet2DConditionConfig::from_json(unet).expect("built-in config");
    let missing = |what: &str| IoError::Unsupported(format!("{}: no {root}{what}", path.display()));
    let conv_in =
        shape("input_blocks.0.0.weight").ok_or_else(|| missing("input_blocks.0.0.weight"))?;
    unet.in_channels = conv_in[1];
    // conv_in at 0, the pairs of convs at 2, 4, .., conv_out last (at 14 in cldm).
    let hint: Vec<Vec<usize>> = (0..64)
        .filter_map(|i| shape(&format!("input_hint_block.{}.weight", 2 * i)))
        .collect();
    if hint.len() < 2 || !hint.len().is_multiple_of(2) {
        return Err(IoError::Unsupported(format!(
            "{}: {} input_hint_block convs, expected conv_in, pairs of convs and conv_out",
            path.display(),
            hint.len()
        )));
    }
    let mut widths = vec![hint[0][0]];
    widths.extend((0..(hint.len() - 2) / 2).map(|j| hint[2 + 2 * j][0]));
    let mut config = ControlNetConfig {
        unet,
        conditioning_channels: hint[0][1],
        controlnet_conditioning_channel_order: "rgb".into(),
        conditioning_embedding_out_channels: widths,
        global_pool_conditions: false,
    };
    config.mirror_up_blocks();
    config.validate().map_err(config_err(path))?;
    Ok(config)
}

/// Reads and validates a T2I-Adapter `config.json`.
pub fn read_t2i_adapter_config(path: &Path) -> Result<sd_models::T2IAdapterConfig, IoError> {
    sd_models::T2IAdapterConfig::from_json(&read_json_file(path)?).map_err(config_err(path))
}

/// Builds a T2I-Adapter from a diffusers folder (`config.json` and
/// `diffusion_pytorch_model[.fp16].safetensors`, keys `adapter.*`), e.g.
/// `TencentARC/t2iadapter_canny_sd15v2`.
pub fn t2i_adapter_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<sd_models::T2IAdapter, IoError> {
    diffusers_component(
        dir,
        options,
        "t2i adapter",
        read_t2i_adapter_config,
        sd_models::T2IAdapter::new,
        device,
    )
}
