//! Writing models and tensors as safetensors, in the diffusers layout.
//!
//! [`save_unet`], [`save_vae`] and [`save_text_encoder`] write a component folder
//! (`config.json` plus `diffusion_pytorch_model.safetensors` or `model.safetensors`)
//! that diffusers' `from_pretrained` and this crate's [`crate::DiffusersDir`] both read.
//! Keys are the diffusers names ([`sd_models::diffusers_key`]) and shapes PyTorch's
//! (linear weights `[out, in]`; 1x1-convolution projections 4-D where diffusers has
//! convolutions).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::DType;
use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sd_models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, ControlNetConfig,
    ControlNetModel, UNet2DConditionConfig, UNet2DConditionModel,
};

use crate::error::IoError;

/// The diffusers version written into saved configs (`_diffusers_version`).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// A tensor ready to be written: key, PyTorch shape and f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The key in the file.
    pub key: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

fn encode(values: &[f32], dtype: DType) -> Result<(Dtype, Vec<u8>), IoError> {
    Ok(match dtype {
        DType::F32 => (
            Dtype::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        other => {
            return Err(IoError::Unsupported(format!(
                "saving tensors as {other:?} (f32, f16 and bf16 are supported)"
            )));
        }
    })
}

/// Writes `tensors` to a safetensors file in `dtype` (`F32`, `F16` or `BF16`) with the
/// given header metadata. Keys must be unique.
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[NamedTensor],
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<(), IoError> {
    let path = path.as_ref();
    let mut encoded = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.shape.iter().product::<usize>() != t.values.len() {
            return Err(IoError::Unsupported(format!(
                "tensor `{}`: shape {:?} does not hold {} values",
                t.key,
                t.shape,
                t.values.len()
            )));
        }
        encoded.push((t.key.as_str(), t.shape.clone(), encode(&t.values, dtype)?));
    }
    let mut views = Vec::with_capacity(encoded.len());
    for (key, shape, (st_dtype, bytes)) in &encoded {
        let view =
            TensorView::new(*st_dtype, shape.clone(), bytes).map_err(|e| IoError::Safetensors {
                path: path.to_path_buf(),
                message: format!("`{key}`: {e}"),
            })?;
        views.push((*key, view));
    }
    let metadata: Option<HashMap<String, String>> = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone().into_iter().collect())
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| IoError::io(dir, e))?;
    }
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| IoError::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Every float parameter of `module` as [`NamedTensor`]s in PyTorch layout, keyed
/// by `key_of(burn path)`; `shape_of(key, shape)` may give a stored shape with the same
/// number of elements (4-D for 1x1 convolutions). On-the-fly LoRA factors are left
/// out (their base weights are written as they are).
pub fn module_tensors<M: Module>(
    module: &M,
    key_of: &dyn Fn(&str) -> String,
    shape_of: &dyn Fn(&str, Vec<usize>) -> Vec<usize>,
) -> Vec<NamedTensor> {
    struct Collect<'a> {
        path: Vec<String>,
        out: Vec<NamedTensor>,
        key_of: &'a dyn Fn(&str) -> String,
        shape_of: &'a dyn Fn(&str, Vec<usize>) -> Vec<usize>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.path.join(".");
            if path.contains(".lora.factors.") {
                return;
            }
            // An 8-bit weight is dequantised before the save mapper's transpose
            // (burn re-quantises a transposed block-quantized tensor).
            let param = if matches!(param.val().dtype(), DType::QFloat(_)) {
                param.clone().map(|t| t.dequantize())
            } else {
                param.clone()
            };
            let tensor = param.transform_for_save().val();
            let data = tensor.cast(DType::F32).into_data().convert::<f32>();
            let shape = data.shape().to_vec();
            let values = data.try_into_vec::<f32>().expect("f32 tensor data");
            let key = (self.key_of)(&path);
            let shape = (self.shape_of)(&key, shape);
            self.out.push(NamedTensor { key, shape, values });
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        out: Vec::new(),
        key_of,
        shape_of,
    };
    module.visit(&mut c);
    c.out
}

fn write_config<T: serde::Serialize>(
    dir: &Path,
    file: &str,
    class_name: &str,
    config: &T,
) -> Result<(), IoError> {
    let path = dir.join(file);
    let mut value = serde_json::to_value(config).map_err(|e| IoError::Json {
        path: path.clone(),
        source: e,
    })?;
    if let Some(obj) = value.as_object_mut() {
        if class_name == "CLIPTextModel" {
            // A transformers config.
            obj.insert("architectures".into(), serde_json::json!([class_name]));
        } else {
            obj.insert("_class_name".into(), class_name.into());
            obj.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| IoError::io(dir, e))?;
    let text = serde_json::to_string_pretty(&value).map_err(|e| IoError::Json {
        path: path.clone(),
        source: e,
    })?;
    std::fs::write(&path, text + "\n").map_err(|e| IoError::io(&path, e))
}

/// The stored shape of a U-Net key: the transformers' `proj_in` / `proj_out` are 1x1
/// convolutions unless `use_linear_projection`.
fn unet_shape(config: &UNet2DConditionConfig) -> impl Fn(&str, Vec<usize>) -> Vec<usize> + '_ {
    move |key, mut shape| {
        if !config.use_linear_projection
            && shape.len() == 2
            && (key.ends_with("proj_in.weight") || key.ends_with("proj_out.weight"))
            && key.contains("attentions")
        {
            shape.extend([1, 1]);
        }
        shape
    }
}

/// Writes `unet` as a diffusers `unet/` folder: `config.json` and
/// `diffusion_pytorch_model.safetensors` in `dtype` (`F32`, `F16` or `BF16`).
pub fn save_unet(
    unet: &UNet2DConditionModel,
    config: &UNet2DConditionConfig,
    dir: impl AsRef<Path>,
    dtype: DType,
) -> Result<(), IoError> {
    let dir = dir.as_ref();
    let shape = unet_shape(config);
    let tensors = module_tensors(unet, &sd_models::diffusers_key, &shape);
    write_config(dir, "config.json", "UNet2DConditionModel", config)?;
    write_safetensors(
        dir.join("diffusion_pytorch_model.safetensors"),
        &tensors,
        dtype,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
}

/// The keys of diffusers' `ControlNetModel.__init__`: a saved config holds these
/// only (the U-Net fields a ControlNet lacks are left out).
const CONTROLNET_CONFIG_KEYS: [&str; 32] = [
    "in_channels",
    "conditioning_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels",
    "global_pool_conditions",
    "addition_embed_type_num_heads",
];

/// Writes `controlnet` as a diffusers ControlNet folder (`config.json` with
/// `ControlNetModel`'s keys, `diffusion_pytorch_model.safetensors` in `dtype`), as
/// `ControlNetModel.save_pretrained` does.
pub fn save_controlnet(
    controlnet: &ControlNetModel,
    config: &ControlNetConfig,
    dir: impl AsRef<Path>,
    dtype: DType,
) -> Result<(), IoError> {
    let dir = dir.as_ref();
    let shape = unet_shape(&config.unet);
    let tensors = module_tensors(controlnet, &sd_models::diffusers_key, &shape);
    let path = dir.join("config.json");
    let json = |e| IoError::Json {
        path: path.clone(),
        source: e,
    };
    let mut value = serde_json::to_value(config).map_err(json)?;
    if let Some(obj) = value.as_object_mut() {
        obj.retain(|k, _| CONTROLNET_CONFIG_KEYS.contains(&k.as_str()));
    }
    write_config(dir, "config.json", "ControlNetModel", &value)?;
    write_safetensors(
        dir.join("diffusion_pytorch_model.safetensors"),
        &tensors,
        dtype,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
}

/// Writes `vae` as a diffusers `vae/` folder.
pub fn save_vae(
    vae: &AutoencoderKL,
    config: &AutoencoderKLConfig,
    dir: impl AsRef<Path>,
    dtype: DType,
) -> Result<(), IoError> {
    let dir = dir.as_ref();
    let tensors = module_tensors(vae, &sd_models::diffusers_key, &|_, s| s);
    write_config(dir, "config.json", "AutoencoderKL", config)?;
    write_safetensors(
        dir.join("diffusion_pytorch_model.safetensors"),
        &tensors,
        dtype,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
}

/// Writes `text_encoder` as a transformers `text_encoder/` folder (`config.json`,
/// `model.safetensors`).
pub fn save_text_encoder(
    text_encoder: &ClipTextModel,
    config: &ClipTextConfig,
    dir: impl AsRef<Path>,
    dtype: DType,
) -> Result<(), IoError> {
    let dir = dir.as_ref();
    let tensors = module_tensors(text_encoder, &sd_models::diffusers_key, &|_, s| s);
    write_config(dir, "config.json", "CLIPTextModel", config)?;
    write_safetensors(
        dir.join("model.safetensors"),
        &tensors,
        dtype,
        &BTreeMap::from([("format".to_string(), "pt".to_string())]),
    )
}
