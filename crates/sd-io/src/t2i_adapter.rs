//! T2I-Adapters from single files: a diffusers weight file (`adapter.*` keys, its
//! `config.json` beside it or given), and the original TencentARC layout (as the
//! `t2iadapter_*` checkpoints and the safetensors copies that A1111 and ComfyUI load):
//! `conv_in.*` and a flat `body.{n}` list of residual blocks (the full adapter), or
//! `body.{level}.{in_conv, body.{j}, out_conv}` (the light adapter), mapped as diffusers'
//! `scripts/convert_original_t2i_adapter.py` does.

use std::path::Path;

use burn::prelude::*;
use sd_models::config::AdapterType;
use sd_models::{T2IAdapter, T2IAdapterConfig};

use crate::controlnet::{read_t2i_adapter_config, t2i_adapter_from_dir};
use crate::error::IoError;
use crate::loader::{KeyMapping, load_module};
use crate::model::{ComponentOptions, config_err, open_checkpoint};
use crate::weights::WeightSource;

/// Builds a T2I-Adapter from a diffusers folder or a `.safetensors` file: a diffusers
/// weight file takes `config`, else the `config.json` beside it; a file in the
/// original layout takes `config`, else one recognised from its tensors (full or
/// light, widths, residual blocks per level, input channels and unshuffle factor;
/// the full adapter's flat block list is read as 2 blocks per level, as every
/// released one has).
///
/// # Errors
/// A missing or unreadable file, a file that is no T2I-Adapter, weights that do not
/// fit the config.
pub fn t2i_adapter_from_path(
    path: &Path,
    config: Option<&T2IAdapterConfig>,
    device: &Device,
    options: &ComponentOptions,
) -> Result<T2IAdapter, IoError> {
    if path.is_dir() {
        return t2i_adapter_from_dir(path, device, options);
    }
    let source = open_checkpoint(path)?;
    let has = |k: &str| source.has_prefix(k);
    let (config, mapping) = if has("adapter.") {
        let config = match config {
            Some(c) => c.clone(),
            None => read_t2i_adapter_config(&path.with_file_name("config.json"))?,
        };
        (config, KeyMapping::diffusers())
    } else if has("body.0.") {
        let config = match config {
            Some(c) => c.clone(),
            None => infer_config(path, &source)?,
        };
        let mapping = original_mapping(&config).ok_or_else(|| {
            IoError::Unsupported(format!(
                "{}: an original-layout SDXL adapter (full_adapter_xl) is not read; use \
                 its diffusers folder",
                path.display()
            ))
        })?;
        (config, mapping)
    } else {
        return Err(IoError::Unsupported(format!(
            "{}: not a T2I-Adapter (no adapter.* or body.* keys)",
            path.display()
        )));
    };
    let model = T2IAdapter::new(&config, device).map_err(config_err(path))?;
    load_module(model, &source, &mapping, options.load(), "t2i adapter")
}

/// diffusers key (`adapter.body.1.resnets.0.block1.weight`) -> original key, for the
/// full adapter (`body.{level * blocks + j}`) or the light one (`body.{level}.body.{j}`).
fn original_key(key: &str, adapter_type: AdapterType, blocks: usize) -> String {
    let Some(rest) = key.strip_prefix("adapter.") else {
        return key.to_string();
    };
    let Some(body) = rest.strip_prefix("body.") else {
        return rest.to_string();
    };
    let mut parts = body.splitn(2, '.');
    let (Some(level), Some(tail)) = (parts.next(), parts.next()) else {
        return rest.to_string();
    };
    let Ok(level) = level.parse::<usize>() else {
        return rest.to_string();
    };
    let resnet = tail.strip_prefix("resnets.").and_then(|r| {
        let (j, t) = r.split_once('.')?;
        Some((j.parse::<usize>().ok()?, t))
    });
    match (adapter_type, resnet) {
        (AdapterType::LightAdapter, Some((j, t))) => format!("body.{level}.body.{j}.{t}"),
        (AdapterType::LightAdapter, None) => format!("body.{level}.{tail}"),
        (_, Some((j, t))) => format!("body.{}.{t}", level * blocks + j),
        // The full adapter's level input conv sits on the level's first block.
        (_, None) => format!("body.{}.{tail}", level * blocks),
    }
}

fn original_mapping(config: &T2IAdapterConfig) -> Option<KeyMapping<'static>> {
    let (kind, blocks) = (config.adapter_type, config.num_res_blocks);
    if kind == AdapterType::FullAdapterXl {
        return None;
    }
    Some(KeyMapping {
        key_of: Box::new(move |p| original_key(&sd_models::diffusers_key(p), kind, blocks)),
        ..KeyMapping::diffusers()
    })
}

/// The config of an original-layout adapter, from its tensors.
fn infer_config(path: &Path, source: &WeightSource) -> Result<T2IAdapterConfig, IoError> {
    let shape = |k: &str| source.get(k).map(|t| t.shape.clone());
    let count = |prefix: &dyn Fn(usize) -> String| {
        (0..).take_while(|&i| source.has_prefix(&prefix(i))).count()
    };
    let light = shape("body.0.body.0.block1.weight").is_some();
    let (adapter_type, channels, num_res_blocks, input) = if light {
        // diffusers' LightAdapter has one level per width and a last one repeating
        // the last width.
        let levels = count(&|i| format!("body.{i}."));
        let channels: Option<Vec<usize>> = (0..levels.saturating_sub(1))
            .map(|l| shape(&format!("body.{l}.out_conv.weight")).map(|s| s[0]))
            .collect();
        let blocks = count(&|j| format!("body.0.body.{j}."));
        let input = shape("body.0.in_conv.weight").map(|s| s[1]);
        (AdapterType::LightAdapter, channels, blocks, input)
    } else {
        let blocks = 2;
        let n = count(&|i| format!("body.{i}."));
        let channels: Option<Vec<usize>> = (0..n / blocks)
            .map(|l| shape(&format!("body.{}.block1.weight", l * blocks)).map(|s| s[0]))
            .collect();
        let input = shape("conv_in.weight").map(|s| s[1]);
        (AdapterType::FullAdapter, channels, blocks, input)
    };
    let bad = |what: &str| {
        IoError::Unsupported(format!(
            "{}: an original-layout T2I-Adapter whose {what} cannot be read; pass its config",
            path.display()
        ))
    };
    let channels = channels
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("widths"))?;
    // The input conv sees in_channels x factor^2 channels (pixel unshuffle): SD 1.x
    // adapters use 8, SDXL ones 16; colour (3) or grey (1) control images.
    let input = input.ok_or_else(|| bad("input conv"))?;
    let (in_channels, downscale_factor) = [8, 16, 4, 2]
        .iter()
        .flat_map(|&f| [(3, f), (1, f)])
        .find(|&(c, f)| c * f * f == input)
        .ok_or_else(|| bad("input channels"))?;
    let config = T2IAdapterConfig {
        in_channels,
        channels,
        num_res_blocks,
        downscale_factor,
        adapter_type,
    };
    config.validate().map_err(config_err(path))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_keys_follow_diffusers_conversion_script() {
        let full = |k| original_key(k, AdapterType::FullAdapter, 2);
        assert_eq!(full("adapter.conv_in.weight"), "conv_in.weight");
        assert_eq!(
            full("adapter.body.0.resnets.1.block2.bias"),
            "body.1.block2.bias"
        );
        assert_eq!(
            full("adapter.body.2.in_conv.weight"),
            "body.4.in_conv.weight"
        );
        assert_eq!(
            full("adapter.body.3.resnets.1.block1.weight"),
            "body.7.block1.weight"
        );
        let light = |k| original_key(k, AdapterType::LightAdapter, 4);
        assert_eq!(
            light("adapter.body.1.resnets.3.block2.weight"),
            "body.1.body.3.block2.weight"
        );
        assert_eq!(
            light("adapter.body.2.out_conv.bias"),
            "body.2.out_conv.bias"
        );
        assert_eq!(
            light("adapter.body.0.in_conv.weight"),
            "body.0.in_conv.weight"
        );
    }
}
