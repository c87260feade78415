//! Converting checkpoints to GGUF as stable-diffusion.cpp's `-M convert` does: every
//! component in one file under the original (LDM) names, each tensor quantised to
//! the wanted type unless stable-diffusion.cpp's rule keeps it
//! ([`sd_cpp_tensor_type`]). Single files keep their names; a diffusers folder's
//! components are renamed (U-Net and VAE through the LDM key maps, the VAE's
//! attention projections back to 1x1 convolutions; CLIP encoders under
//! `cond_stage_model.transformer.` and stable-diffusion.cpp's
//! `cond_stage_model.1.transformer.`).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::DType;
use safetensors::Dtype;

use crate::error::IoError;
use crate::gguf::{GgmlType, GgufValue};
use crate::gguf_write::{TensorPlan, can_quantize, sd_cpp_tensor_type, write_gguf};
use crate::ldm::{self, LdmKeyMap};
use crate::model::{DiffusersDir, SD_CPP_TEXT_ENCODER_2_PREFIX, component_weights};
use crate::weights::{StoredTensor, WeightSource};

/// One tensor of a conversion: where it is read and what it is written as.
#[derive(Debug, Clone)]
pub struct ConvertEntry {
    /// Which of the conversion's sources holds it.
    pub source: usize,
    /// Its key there.
    pub key: String,
    /// Its name in the GGUF file.
    pub name: String,
    /// Its shape in the GGUF file (same number of elements).
    pub shape: Vec<usize>,
    /// Whether the 2-D tensor is written transposed (`shape` is the transposed one).
    pub transpose: bool,
}

/// What a conversion wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvertReport {
    /// Tensors written, by ggml type name.
    pub tensors_by_type: BTreeMap<String, usize>,
    /// Keys left out (not floats: position ids and the like).
    pub skipped: Vec<String>,
    /// Bytes of tensor data read.
    pub bytes_in: u64,
    /// Bytes of tensor data written.
    pub bytes_out: u64,
}

/// The ggml type a stored tensor is kept in when not quantised.
fn kept_type(t: &StoredTensor) -> GgmlType {
    match (t.ggml, t.dtype) {
        (Some(g), _) if can_quantize(g) => g,
        (Some(_), _) => GgmlType::F16,
        (None, Dtype::F16) => GgmlType::F16,
        (None, Dtype::BF16) => GgmlType::BF16,
        _ => GgmlType::F32,
    }
}

/// What a conversion reads: the sources, the tensors it writes and the keys it
/// leaves out (not floats: position ids and the like).
#[derive(Debug)]
pub struct ConvertInput {
    /// The files read.
    pub sources: Vec<WeightSource>,
    /// The tensors written, in order.
    pub entries: Vec<ConvertEntry>,
    /// Keys left out.
    pub skipped: Vec<String>,
}

impl ConvertInput {
    /// A single file (safetensors or GGUF): every float tensor under its own name.
    pub fn single_file(source: WeightSource) -> Self {
        let (entries, skipped) = single_file_entries(&source);
        Self {
            sources: vec![source],
            entries,
            skipped,
        }
    }

    /// A diffusers folder (SD 1.x / 2.x / XL) under the names stable-diffusion.cpp
    /// reads: U-Net and VAE through the LDM key maps, CLIP ViT-L under
    /// `cond_stage_model.transformer.`, SDXL's second encoder under
    /// `cond_stage_model.1.transformer.` with OpenCLIP's projection.
    ///
    /// # Errors
    /// A folder without a U-Net (SD 3's transformer is not converted yet),
    /// unreadable configs or weights.
    pub fn diffusers(dir: &DiffusersDir, variant: Option<&str>) -> Result<Self, IoError> {
        diffusers_entries(dir, variant)
    }
}

fn single_file_entries(source: &WeightSource) -> (Vec<ConvertEntry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for (key, t) in source.tensors() {
        if t.is_float() {
            entries.push(ConvertEntry {
                source: 0,
                key: key.clone(),
                name: key.clone(),
                shape: t.shape.clone(),
                transpose: false,
            });
        } else {
            skipped.push(key.clone());
        }
    }
    (entries, skipped)
}

/// The sources and entries of a diffusers folder (SD 1.x / 2.x / SDXL) under the
/// names stable-diffusion.cpp reads.
///
/// # Errors
/// A folder without a U-Net (SD 3's transformer is not converted yet), unreadable
/// configs or weights.
fn diffusers_entries(dir: &DiffusersDir, variant: Option<&str>) -> Result<ConvertInput, IoError> {
    if !dir.has("unet") {
        return Err(IoError::Unsupported(format!(
            "{}: only folders with a `unet/` (SD 1.x, 2.x, XL) convert; convert an SD 3 \
             single file instead",
            dir.root().display()
        )));
    }
    let unet_map = LdmKeyMap::unet(&dir.unet_config()?);
    let vae_map = LdmKeyMap::vae(&dir.vae_config()?);
    type Rename = Box<dyn Fn(&str) -> String>;
    let parts: Vec<(&str, &str, Rename)> = vec![
        (
            "unet",
            "diffusion_pytorch_model",
            Box::new(move |k| unet_map.map(k)),
        ),
        (
            "vae",
            "diffusion_pytorch_model",
            Box::new(move |k| vae_map.map(k)),
        ),
        (
            "text_encoder",
            "model",
            Box::new(|k| format!("{}{k}", ldm::TEXT_ENCODER_PREFIX)),
        ),
        (
            "text_encoder_2",
            "model",
            Box::new(|k| format!("{SD_CPP_TEXT_ENCODER_2_PREFIX}{k}")),
        ),
    ];
    let mut sources = Vec::new();
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for (component, base, rename) in parts {
        if !dir.has(component) {
            continue;
        }
        let source = WeightSource::open(component_weights(
            &dir.root().join(component),
            base,
            variant,
        )?)?;
        for (key, t) in source.tensors() {
            if !t.is_float() || key.ends_with("position_ids") {
                skipped.push(format!("{component}/{key}"));
                continue;
            }
            let mut name = rename(key);
            let mut shape = t.shape.clone();
            // The original VAE's attention projections are 1x1 convolutions.
            if component == "vae" && name.contains(".attn_1.") && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            // stable-diffusion.cpp keeps OpenCLIP's projection (`x @ proj`).
            let transpose = component == "text_encoder_2" && key == "text_projection.weight";
            if transpose {
                name = format!("{SD_CPP_TEXT_ENCODER_2_PREFIX}text_model.text_projection");
                shape.reverse();
            }
            entries.push(ConvertEntry {
                source: sources.len(),
                key: key.clone(),
                name,
                shape,
                transpose,
            });
        }
        sources.push(source);
    }
    Ok(ConvertInput {
        sources,
        entries,
        skipped,
    })
}

/// Writes `entries` of `sources` to a GGUF file at `path`, each tensor in `wanted`
/// unless stable-diffusion.cpp's rule keeps its stored type, one tensor in memory at
/// a time.
///
/// # Errors
/// A type the quantiser cannot write ([`can_quantize`]), unreadable tensors, I/O.
pub fn convert_to_gguf(
    input: &ConvertInput,
    path: &Path,
    wanted: GgmlType,
    metadata: &[(String, GgufValue)],
) -> Result<ConvertReport, IoError> {
    if !can_quantize(wanted) {
        return Err(IoError::Unsupported(format!(
            "writing {} (written: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1)",
            wanted.name()
        )));
    }
    let (sources, entries) = (&input.sources, &input.entries);
    let mut report = ConvertReport {
        skipped: input.skipped.clone(),
        ..ConvertReport::default()
    };
    let mut plan = Vec::with_capacity(entries.len());
    for e in entries {
        let stored = sources[e.source]
            .get(&e.key)
            .ok_or_else(|| IoError::NotFound {
                path: sources[e.source].paths()[0].to_path_buf(),
                what: format!("tensor `{}`", e.key),
            })?;
        let dtype = sd_cpp_tensor_type(&e.name, &e.shape, kept_type(stored), wanted);
        *report
            .tensors_by_type
            .entry(dtype.name().to_lowercase())
            .or_default() += 1;
        report.bytes_in += stored.stored_bytes() as u64;
        let t = TensorPlan {
            name: e.name.clone(),
            shape: e.shape.clone(),
            dtype,
        };
        report.bytes_out += t.bytes() as u64;
        plan.push(t);
    }
    let by_name: BTreeMap<&str, &ConvertEntry> =
        entries.iter().map(|e| (e.name.as_str(), e)).collect();
    if by_name.len() != entries.len() {
        return Err(IoError::Unsupported(
            "two tensors would be written under one name".into(),
        ));
    }
    write_gguf(path, metadata, &plan, |t| {
        let e = by_name[t.name.as_str()];
        let source = &sources[e.source];
        let shape = source
            .get(&e.key)
            .map(|s| s.shape.clone())
            .unwrap_or_default();
        let data = source.read_float(&e.key, DType::F32, shape.clone())?;
        let values = data
            .try_into_vec::<f32>()
            .map_err(|e| IoError::Unsupported(format!("`{}` as f32: {e:?}", t.name)))?;
        Ok(match (e.transpose, shape.as_slice()) {
            (true, &[rows, cols]) => (0..rows * cols)
                .map(|i| values[(i % rows) * cols + i / rows])
                .collect(),
            _ => values,
        })
    })?;
    Ok(report)
}
