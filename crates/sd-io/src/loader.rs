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
    /// For fused stored tensors (OpenCLIP's `in_proj_weight` holds q, k and v): maps a
    /// stored key to `(part, parts)` when the parameter is rows
    /// `[part * n / parts, (part + 1) * n / parts)` of its first axis. `key_of` then
    /// returns `"{stored key}#{part}"`.
    pub fused_parts: usize,
    /// Stored keys holding the transpose of the parameter (OpenCLIP's
    /// `text_projection`, used as `x @ P`, is `[in, out]` where PyTorch linears
    /// are `[out, in]`).
    pub transposed: Box<dyn Fn(&str) -> bool + 'a>,
}

/// Splits `"{key}#{part}"` (a part of a fused tensor) into the stored key and part.
fn split_part(key: &str) -> (&str, Option<usize>) {
    match key.rsplit_once('#') {
        Some((k, p)) => match p.parse() {
            Ok(part) => (k, Some(part)),
            Err(_) => (key, None),
        },
        None => (key, None),
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
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::F32 }
    }
}

struct Binder<'s, 'm> {
    source: &'s WeightSource,
    mapping: &'s KeyMapping<'m>,
    dtype: DType,
    path: Vec<String>,
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

impl ModuleMapper for Binder<'_, '_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let full_key = (self.mapping.key_of)(&self.path.join("."));
        let (key, part) = split_part(&full_key);
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
            Some(p)
                if !stored_shape.is_empty()
                    && stored_shape[0] % self.mapping.fused_parts.max(1) == 0 =>
            {
                let n = stored_shape[0] / self.mapping.fused_parts.max(1);
                stored_shape[0] = n;
                Some((p * n, n))
            }
            _ => None,
        };
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
        let read = match rows {
            Some((start, n)) => self
                .source
                .read_float_rows(&key, self.dtype, expected, start, n),
            None if transposed => self
                .source
                .read_float(&key, self.dtype, stored.shape.clone()),
            None => self.source.read_float(&key, self.dtype, expected),
        };
        let data = match read {
            Ok(d) => d,
            Err(e) => {
                self.error = Some(e);
                return param;
            }
        };
        self.used.insert(key);
        let device = param.lazy_device();
        let tensor = Tensor::<D>::from_data(data, (&device, self.dtype));
        let tensor = if transposed {
            tensor.transpose()
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
        path: Vec::new(),
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
    use super::shape_fits;

    #[test]
    fn conv_1x1_weights_fit_linear_layers() {
        assert!(shape_fits(&[4, 4, 1, 1], &[4, 4]));
        assert!(shape_fits(&[3, 2], &[3, 2]));
        assert!(!shape_fits(&[4, 4, 3, 3], &[4, 4]));
        assert!(!shape_fits(&[2, 4], &[4, 2]));
    }
}
