//! Shared helpers of the parity tests: fixture paths, reference tensors, devices and
//! tolerance checks.
#![allow(dead_code)]

mod case;

pub use case::{Case, assert_rel_close, values};

use std::path::PathBuf;

use stable_diffusion::burn::prelude::*;
use stable_diffusion::burn::tensor::DType;
use stable_diffusion::io::WeightSource;

/// `tests/fixtures/...`, or `$SD_FIXTURES/...` where set (the test binary run away from
/// its build tree, as `scripts/gpu-check.sh` does).
pub fn fixture(rel: &str) -> PathBuf {
    match std::env::var_os("SD_FIXTURES") {
        Some(dir) => PathBuf::from(dir).join(rel),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(rel),
    }
}

/// A reference index, `reference/{file}` (JSON with diffusers' `NaN`/`Infinity`).
pub fn read_index(file: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(&format!("reference/{file}"))).unwrap();
    serde_json::from_str(&stable_diffusion::schedulers::config::sanitize_json(&text)).unwrap()
}

/// The devices the component parity tests run on: flex always, wgpu when the `wgpu`
/// feature is on, and CUDA device 0 when the `cuda` feature is on and
/// `SD_TEST_CUDA=1` says a GPU is there (`scripts/gpu-check.sh` on a GPU machine; CI
/// has none). `SD_TEST_DEVICES=flex,cuda` keeps only the devices it names.
pub fn devices() -> Vec<(&'static str, Device)> {
    #[allow(unused_mut)]
    let mut v = vec![("flex", Device::flex())];
    #[cfg(feature = "wgpu")]
    v.push(("wgpu", Device::wgpu(Default::default())));
    #[cfg(feature = "cuda")]
    if std::env::var("SD_TEST_CUDA").is_ok_and(|v| v == "1") {
        v.push(("cuda", Device::cuda(0)));
    }
    if let Ok(keep) = std::env::var("SD_TEST_DEVICES") {
        let keep: Vec<&str> = keep.split(',').map(str::trim).collect();
        v.retain(|(name, _)| keep.contains(name));
    }
    v
}

/// Tolerance for a device: the CPU figure, or the README's GPU figure.
pub fn tol(device_name: &str, cpu: f32, gpu: f32) -> f32 {
    if device_name == "flex" { cpu } else { gpu }
}

/// A reference safetensors file.
pub struct Reference {
    source: WeightSource,
}

impl Reference {
    pub fn open(rel: &str) -> Self {
        Self {
            source: WeightSource::open(fixture(rel)).expect("reference file"),
        }
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.source
            .get(key)
            .unwrap_or_else(|| panic!("no `{key}`"))
            .shape
            .clone()
    }

    /// A float tensor as host f32 values.
    pub fn floats(&self, key: &str) -> Vec<f32> {
        let shape = self.shape(key);
        self.source
            .read_float(key, DType::F32, shape)
            .unwrap()
            .try_to_vec::<f32>()
            .unwrap()
    }

    /// An int64 tensor's values.
    pub fn ints(&self, key: &str) -> Vec<i64> {
        self.source
            .bytes(key)
            .unwrap()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    pub fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let shape = self.shape(key);
        Tensor::from_data(TensorData::new(self.floats(key), shape), device)
    }

    pub fn int_tensor<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D, Int> {
        let shape = self.shape(key);
        Tensor::from_data(TensorData::new(self.ints(key), shape), device)
    }

    pub fn source_dtype_is_int(&self, key: &str) -> bool {
        !self
            .source
            .get(key)
            .unwrap_or_else(|| panic!("no `{key}`"))
            .is_float()
    }

    /// A tensor's raw bytes (uint8 pictures).
    pub fn bytes(&self, key: &str) -> &[u8] {
        self.source
            .bytes(key)
            .unwrap_or_else(|| panic!("no `{key}`"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.source.get(key).is_some()
    }
}

/// Max |a - b| between a tensor and reference values (shapes must agree).
pub fn max_abs_diff<const D: usize>(actual: &Tensor<D>, expected: &[f32]) -> f32 {
    max_abs_diff_values(&values(actual), expected)
}

/// Max |a - b| between two lists of values of one length; a NaN difference counts
/// as infinite.
pub fn max_abs_diff_values(got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len(), "element count");
    got.iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

/// Asserts `max |a - b| <= tol`, printing the figure for the test log.
pub fn assert_close<const D: usize>(
    what: &str,
    actual: &Tensor<D>,
    expected: &[f32],
    tol: f32,
) -> f32 {
    assert_eq!(
        actual.dims().iter().product::<usize>(),
        expected.len(),
        "{what}: shape {:?}",
        actual.dims()
    );
    let d = max_abs_diff(actual, expected);
    eprintln!("{what}: max abs diff {d:.3e} (tolerance {tol:.1e})");
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
    d
}

/// Every component of a diffusers folder, loaded in f32 on `device`, and the
/// pipeline over them ([`LoadedPipeline::sd`]).
pub struct LoadedPipeline {
    pub tokenizer: stable_diffusion::io::ClipTokenizer,
    pub text_encoder: stable_diffusion::models::ClipTextModel,
    pub unet: stable_diffusion::models::UNet2DConditionModel,
    pub vae: stable_diffusion::models::AutoencoderKL,
    pub scheduler: stable_diffusion::schedulers::AnyScheduler,
    pub device: Device,
}

impl LoadedPipeline {
    /// Loads the folder at `path` (panics on any error: tests only).
    pub fn open(path: impl AsRef<std::path::Path>, device: &Device) -> Self {
        use stable_diffusion::io::{ComponentOptions, DiffusersDir};
        use stable_diffusion::schedulers::{AnyScheduler, SchedulerConfig};
        let dir = DiffusersDir::open(path.as_ref()).unwrap();
        let opts = ComponentOptions::default();
        let config = SchedulerConfig::from_json(&dir.scheduler_config_text().unwrap()).unwrap();
        Self {
            tokenizer: dir.tokenizer().unwrap(),
            text_encoder: dir.text_encoder(device, &opts).unwrap(),
            unet: dir.unet(device, &opts).unwrap(),
            vae: dir.vae(device, &opts).unwrap(),
            scheduler: AnyScheduler::from_config(&config).unwrap(),
            device: device.clone(),
        }
    }

    /// The pipeline over the loaded components.
    pub fn sd(&self) -> stable_diffusion::pipelines::StableDiffusion<'_> {
        stable_diffusion::pipelines::StableDiffusion {
            conditioner: stable_diffusion::pipelines::TextConditioner::clip(
                &self.tokenizer,
                &self.text_encoder,
            ),
            unet: &self.unet,
            vae: &self.vae,
            decoder: None,
            preview_decoder: None,
            watermark: None,
            scheduler: &self.scheduler,
            controlnets: Vec::new(),
            adapters: Vec::new(),
            device: self.device.clone(),
        }
    }
}

/// Every float parameter of a module, keyed by its diffusers name, in key order.
pub fn module_parameters<M: stable_diffusion::burn::module::Module>(
    m: &M,
) -> Vec<(String, Vec<f32>)> {
    let mut v: Vec<_> = stable_diffusion::io::save::module_tensors(
        m,
        &|p| stable_diffusion::models::diffusers_key(p),
        &|_, s| s,
    )
    .into_iter()
    .map(|t| (t.key, t.values))
    .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
