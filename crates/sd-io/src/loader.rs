//! Binding stored tensors to a burn module's parameters, accounting for every key.

use std::collections::BTreeSet;

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::DType;

use crate::error::{IoError, WeightsReport};
use crate::weights::WeightSource;

/// How module parameter paths map to keys of a [`WeightSource`].
pub struct KeyMapping<'a> {
    /// Maps a burn module path in diffusers naming (`down_blocks.0.resnets.1.conv1.weight`)
    /// to the stored key.
    pub key_of: Box<dyn Fn(&str) -> String + 'a>,
    /// Only stored keys with this prefix belong to the component (single files hold
    /// several components); the others are not reported as unused.
    pub prefix: String,
    /// Stored keys that may stay unused without an error (known buffers such as
    /// `text_model.embeddings.position_ids`).
    pub ignorable: Box<dyn Fn(&str) -> bool + 'a>,
    /// For fused stored tensors (OpenCLIP's `in_proj_weight` holds q, k and v): the
    /// parameter is rows `[part * n / parts, (part + 1) * n / parts)` of the stored
    /// tensor's first axis when `key_of` returns `"{stored key}#{part}"` (this many
    /// parts) or `"{stored key}#{part}/{parts}"`. `"{stored key}#swap"`: the stored
    /// tensor's two halves along its first axis in the other order (the original
    /// SD 3 MMDiT's shift / scale where diffusers has scale / shift).
    pub fused_parts: usize,
    /// Stored keys holding the transpose of the parameter (OpenCLIP's
    /// `text_projection`, used as `x @ P`, is `[in, out]` where PyTorch linears
    /// are `[out, in]`).
    pub transposed: Box<dyn Fn(&str) -> bool + 'a>,
}

/// Which part of a stored tensor a parameter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// All of it.
    Whole,
    /// Rows `part` of `parts` equal slices of the first axis.
    Rows { part: usize, parts: usize },
    /// The two halves of the first axis swapped.
    SwappedHalves,
}

/// Splits `"{key}#{part}"`, `"{key}#{part}/{parts}"` or `"{key}#swap"` into the
/// stored key and the part.
fn split_part(key: &str, default_parts: usize) -> (&str, Part) {
    let Some((k, p)) = key.rsplit_once('#') else {
        return (key, Part::Whole);
    };
    if p == "swap" {
        return (k, Part::SwappedHalves);
    }
    let (part, parts) = match p.split_once('/') {
        Some((a, b)) => (a.parse().ok(), b.parse().ok()),
        None => (p.parse().ok(), Some(default_parts.max(1))),
    };
    match (part, parts) {
        (Some(part), Some(parts)) if part < parts => (k, Part::Rows { part, parts }),
        _ => (key, Part::Whole),
    }
}

impl<'a> KeyMapping<'a> {
    /// diffusers folders: keys are the module paths in diffusers naming.
    pub fn diffusers() -> Self {
        Self {
            key_of: Box::new(sd_models::diffusers_key),
            prefix: String::new(),
            // Buffers stored beside the weights: CLIP's position ids, the SD 3
            // transformer's sin-cos table (computed, not read).
            ignorable: Box::new(|k| {
                k.ends_with("embeddings.position_ids") || k == "pos_embed.pos_embed"
            }),
            fused_parts: 1,
            transposed: Box::new(|_| false),
        }
    }

    /// transformers' T5 files: `layer.0` / `layer.1`, `SelfAttention`,
    /// `DenseReluDense` ([`sd_models::t5::t5_key`]); the tied
    /// `encoder.embed_tokens.weight`, where stored beside `shared.weight`, is unused.
    pub fn t5() -> Self {
        Self {
            key_of: Box::new(sd_models::t5::t5_key),
            ignorable: Box::new(|k| k == "encoder.embed_tokens.weight"),
            ..Self::diffusers()
        }
    }

    /// Single-file (LDM) checkpoints: diffusers names through `map`, only keys under
    /// `prefix` belong to the component.
    pub fn ldm(map: crate::ldm::LdmKeyMap, prefix: &str) -> Self {
        Self {
            key_of: Box::new(move |p: &str| map.map(&sd_models::diffusers_key(p))),
            prefix: prefix.into(),
            ignorable: Box::new(|_| false),
            fused_parts: 1,
            transposed: Box::new(|_| false),
        }
    }
}

/// Options of [`load_module`].
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Float dtype the parameters get (`F32`, `F16` or `BF16`), whatever the file holds.
    /// On burn's CPU backend `F16` / `BF16` go to the weight matrices of linear and
    /// convolution layers only, the rest staying f32: the model then computes in f32,
    /// its kernels widening the half-precision weights as they read them (half the
    /// memory of the weights at f32 speed; burn's f16 ops on the CPU are several
    /// times slower). Elsewhere every parameter gets it and the model computes in it.
    pub dtype: DType,
    /// Expand every GGUF weight to `dtype`. Otherwise, on burn's CPU backend, the
    /// weights of linear layers stored as Q8_0, Q5_0 or Q4_0 stay compressed: 8-bit
    /// values and an f32 scale per 32 (9 bits a value against f16's 16), which the
    /// kernels dequantise as they read them, exactly.
    pub dequantize: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            dequantize: false,
        }
    }
}

struct Binder<'s, 'm> {
    source: &'s WeightSource,
    mapping: &'s KeyMapping<'m>,
    dtype: DType,
    dequantize: bool,
    path: Vec<String>,
    /// The container type of each module entered (`Struct:Linear`).
    containers: Vec<String>,
    used: BTreeSet<String>,
    report: WeightsReport,
    error: Option<IoError>,
}

/// The stored shape fits the parameter's if equal, or equal after dropping trailing
/// unit axes (1x1-conv weights `[o, i, 1, 1]` for linear layers `[o, i]`).
fn shape_fits(stored: &[usize], expected: &[usize]) -> bool {
    if stored == expected {
        return true;
    }
    let trim = |s: &[usize]| {
        let mut v = s.to_vec();
        while v.len() > 1 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    stored.len() != expected.len()
        && trim(stored) == trim(expected)
        && stored.iter().product::<usize>() == expected.iter().product::<usize>()
}

impl Binder<'_, '_> {
    fn param_dtype(&self, rank: usize, device: &Device) -> DType {
        param_dtype(self.dtype, rank, self.containers.last(), device)
    }

    /// `param` bound to its 8-bit weight where [`Self::read_quantized`] gives one
    /// (`Ok`, also with a read error recorded), else back unchanged (`Err`).
    fn bind_quantized<const D: usize>(
        &mut self,
        param: Param<Tensor<D>>,
        key: &str,
        rows: Option<(usize, usize)>,
        expected: &[usize],
    ) -> Result<Param<Tensor<D>>, Param<Tensor<D>>> {
        let device = param.lazy_device();
        match self.read_quantized(key, D, rows, expected, &device) {
            Ok(Some(data)) => {
                self.used.insert(key.to_string());
                // The load mapper (a transpose to `[d_in, d_out]`) runs on a free
                // broadcast; the 8-bit data is laid out as its result already.
                let id = param.id;
                let dims: [usize; D] = std::array::from_fn(|i| expected[i]);
                let placeholder = Tensor::<D>::zeros([1; D], &device).expand(dims);
                let quantized = Tensor::<D>::from_data(data, &device);
                Ok(param.transform_for_load(placeholder, id).map(|_| quantized))
            }
            Ok(None) => Err(param),
            Err(e) => {
                self.error = Some(e);
                Ok(param)
            }
        }
    }

    /// A linear layer's `[d_out, d_in]` weight (rows `rows` of the stored tensor, or
    /// all) kept in 8 bits where [`LoadOptions::dequantize`] allows it: as the layer's
    /// `[d_in, d_out]` (burn's layout after its load mapper) with blocks of 32 rows.
    fn read_quantized(
        &self,
        key: &str,
        rank: usize,
        rows: Option<(usize, usize)>,
        expected: &[usize],
        device: &Device,
    ) -> Result<Option<TensorData>, IoError> {
        let linear = rank == 2 && self.containers.last().is_some_and(|c| c == "Struct:Linear");
        let &[d_out, d_in] = expected else {
            return Ok(None);
        };
        if self.dequantize || !linear || !half_weights_only(device) || d_in % 32 != 0 {
            return Ok(None);
        }
        let (start, count) = rows.unwrap_or((0, d_out));
        if count != d_out {
            return Ok(None);
        }
        let Some(crate::weights::Int8Rows { values, scales }) =
            self.source.read_blocks(key, start, count)?
        else {
            return Ok(None);
        };
        if values.len() != d_out * d_in {
            return Ok(None);
        }
        let blocks = d_in / 32;
        let mut t_values = vec![0i8; values.len()];
        let mut t_scales = vec![0f32; scales.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                t_values[i * d_out + o] = values[o * d_in + i];
            }
            for j in 0..blocks {
                t_scales[j * d_out + o] = scales[o * blocks + j];
            }
        }
        Ok(Some(sd_kernels::quantized_weight_data(
            t_values,
            &t_scales,
            [d_in, d_out],
            32,
        )))
    }
}

/// Whether half-precision weights loaded on `device` are weights only: the CPU
/// backend keeps the linear and convolution weights in f16 / bf16 and computes in f32
/// (its kernels widen the weights as they read them), so no activation can overflow
/// f16 there; on GPUs a model loaded in half precision computes in it.
pub fn half_weights_only(device: &Device) -> bool {
    sd_kernels::is_host(device)
}

/// The dtype a parameter of rank `rank` in a module of `container` type gets when a
/// model is asked for `dtype` ([`LoadOptions::dtype`]): half precision on the CPU
/// backend for the weights of linear and convolution layers and embedding tables only
/// (the models cast the rows they look up), f32 for the rest.
fn param_dtype(dtype: DType, rank: usize, container: Option<&String>, device: &Device) -> DType {
    let half = matches!(dtype, DType::F16 | DType::BF16);
    if !half || !half_weights_only(device) {
        return dtype;
    }
    let matrix = rank >= 2
        && container.is_some_and(|c| {
            c == "Struct:Linear" || c == "Struct:Conv2d" || c == "Struct:Embedding"
        });
    if matrix { dtype } else { DType::F32 }
}

/// Casts a module's float parameters as loading in `dtype` would
/// ([`LoadOptions::dtype`]: on the CPU backend, half precision for linear and
/// convolution weights only): `model.map(&mut CastParameters::new(DType::F16))`.
#[derive(Debug, Clone)]
pub struct CastParameters {
    dtype: DType,
    containers: Vec<String>,
}

impl CastParameters {
    /// A cast to `dtype` (`F32`, `F16` or `BF16`).
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
            containers: Vec::new(),
        }
    }
}

impl ModuleMapper for CastParameters {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.containers.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let dtype = param_dtype(self.dtype, D, self.containers.last(), &param.lazy_device());
        param.map(move |t| t.cast(dtype))
    }
}

impl ModuleMapper for Binder<'_, '_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.to_string());
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
        self.containers.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let full_key = (self.mapping.key_of)(&self.path.join("."));
        let (key, part) = split_part(&full_key, self.mapping.fused_parts);
        let key = key.to_string();
        let expected: Vec<usize> = param.lazy_shape().iter().copied().collect();
        let Some(stored) = self.source.get(&key) else {
            self.report.missing.push(key);
            return param;
        };
        let mut stored_shape = stored.shape.clone();
        let transposed = (self.mapping.transposed)(&key) && stored_shape.len() == 2;
        if transposed {
            stored_shape.reverse();
        }
        let rows = match part {
            Part::Rows { part, parts }
                if !stored_shape.is_empty() && stored_shape[0] % parts == 0 =>
            {
                let n = stored_shape[0] / parts;
                stored_shape[0] = n;
                Some((part * n, n))
            }
            _ => None,
        };
        let swapped = part == Part::SwappedHalves;
        if swapped && stored_shape.first().is_none_or(|n| n % 2 != 0) {
            self.report.mismatched.push(format!(
                "{full_key}: shape {stored_shape:?} in the file has no two equal halves"
            ));
            self.used.insert(key);
            return param;
        }
        if !stored.is_float() {
            self.report.mismatched.push(format!(
                "{key}: dtype {:?} in the file, a float expected",
                stored.dtype
            ));
            self.used.insert(key);
            return param;
        }
        if !shape_fits(&stored_shape, &expected) {
            self.report.mismatched.push(format!(
                "{full_key}: shape {:?} in the file, {:?} expected",
                stored_shape, expected
            ));
            self.used.insert(key);
            return param;
        }
        let half = expected.first().copied().unwrap_or(0) / 2;
        let device = param.lazy_device();
        let param = if swapped || transposed {
            param
        } else {
            match self.bind_quantized(param, &key, rows, &expected) {
                Ok(bound) => return bound,
                Err(param) => param,
            }
        };
        let dtype = self.param_dtype(D, &device);
        let read = match rows {
            Some((start, n)) => self.source.read_float_rows(&key, dtype, expected, start, n),
            None if transposed => self.source.read_float(&key, dtype, stored.shape.clone()),
            None => self.source.read_float(&key, dtype, expected),
        };
        let data = match read {
            Ok(d) => d,
            Err(e) => {
                self.error = Some(e);
                return param;
            }
        };
        self.used.insert(key);
        let tensor = Tensor::<D>::from_data(data, (&device, dtype));
        let tensor = if transposed {
            tensor.transpose()
        } else if swapped {
            Tensor::cat(
                vec![
                    tensor.clone().narrow(0, half, half),
                    tensor.narrow(0, 0, half),
                ],
                0,
            )
        } else {
            tensor
        };
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Loads every float parameter of `module` from `source`.
///
/// Each parameter's path (diffusers naming) goes through `mapping.key_of`; stored
/// floats of any width are converted to `options.dtype`. Missing keys, stored keys
/// under `mapping.prefix` the module does not use, and shape or dtype mismatches are
/// collected and returned together as [`IoError::Weights`].
pub fn load_module<M: Module>(
    module: M,
    source: &WeightSource,
    mapping: &KeyMapping<'_>,
    options: LoadOptions,
    component: &str,
) -> Result<M, IoError> {
    let mut binder = Binder {
        source,
        mapping,
        dtype: options.dtype,
        dequantize: options.dequantize,
        path: Vec::new(),
        containers: Vec::new(),
        used: BTreeSet::new(),
        report: WeightsReport::default(),
        error: None,
    };
    let module = module.map(&mut binder);
    if let Some(e) = binder.error {
        return Err(e);
    }
    let mut report = binder.report;
    // Parts of one fused tensor are reported once.
    report.missing.sort();
    report.missing.dedup();
    report.unused = source
        .tensors()
        .keys()
        .filter(|k| k.starts_with(&mapping.prefix))
        .filter(|k| !binder.used.contains(*k) && !(mapping.ignorable)(k))
        .cloned()
        .collect();
    if report.is_empty() {
        Ok(module)
    } else {
        Err(IoError::Weights {
            component: component.to_string(),
            path: source
                .paths()
                .first()
                .map(|p| p.to_path_buf())
                .unwrap_or_default(),
            report,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Part, shape_fits, split_part};

    #[test]
    fn part_suffixes() {
        assert_eq!(
            split_part("a.qkv.weight#1", 3),
            ("a.qkv.weight", Part::Rows { part: 1, parts: 3 })
        );
        assert_eq!(
            split_part("a.qkv.weight#2/4", 3),
            ("a.qkv.weight", Part::Rows { part: 2, parts: 4 })
        );
        assert_eq!(
            split_part("a.mod.bias#swap", 1),
            ("a.mod.bias", Part::SwappedHalves)
        );
        assert_eq!(split_part("a.weight", 3), ("a.weight", Part::Whole));
        // Not a part: the key as it is.
        assert_eq!(split_part("a#b", 3), ("a#b", Part::Whole));
        assert_eq!(split_part("a#3/3", 3), ("a#3/3", Part::Whole));
    }

    #[test]
    fn conv_1x1_weights_fit_linear_layers() {
        assert!(shape_fits(&[4, 4, 1, 1], &[4, 4]));
        assert!(shape_fits(&[3, 2], &[3, 2]));
        assert!(!shape_fits(&[4, 4, 3, 3], &[4, 4]));
        assert!(!shape_fits(&[2, 4], &[4, 2]));
    }
}
