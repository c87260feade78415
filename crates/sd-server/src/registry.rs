//! The models the server may run: [`ModelRegistry`] loads a configured model on
//! first use and keeps the loaded ones under a memory budget, unloading the least
//! recently used one that no job holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use burn::prelude::Device;
use burn::tensor::DType;
use sd_pipelines::{LoadOptions, ModelSource, StableDiffusionPipeline};

use crate::config::ModelConfig;
use crate::error::ApiError;
use crate::lock;

/// A loaded model and what comes with it.
pub struct LoadedModel {
    /// The configured name.
    pub name: String,
    /// The pipeline.
    pub pipeline: StableDiffusionPipeline,
    /// The ControlNets' names, in the pipeline's order.
    pub controlnets: Vec<String>,
    /// The depth estimator of the `depth_anything` preprocessor, when configured.
    pub depth: Option<sd_pipelines::preprocess::DepthEstimator>,
    /// What it is counted as against the budget.
    pub bytes: u64,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("controlnets", &self.controlnets)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

struct Resident {
    model: Arc<LoadedModel>,
    last_used: u64,
}

#[derive(Default)]
struct Residents {
    models: BTreeMap<String, Resident>,
    clock: u64,
}

/// The configured models, some loaded.
pub struct ModelRegistry {
    configs: RwLock<Vec<ModelConfig>>,
    loras: RwLock<BTreeMap<String, BTreeMap<String, PathBuf>>>,
    residents: Mutex<Residents>,
    loading: Mutex<()>,
    budget_bytes: u64,
    device: Device,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("models", &self.names())
            .field("loaded", &self.loaded_names())
            .field("budget_bytes", &self.budget_bytes)
            .finish_non_exhaustive()
    }
}

impl ModelRegistry {
    /// The models of `configs` (none loaded yet), on `device`, under
    /// `budget_bytes` (0: no limit).
    pub fn new(configs: Vec<ModelConfig>, device: Device, budget_bytes: u64) -> Self {
        let registry = Self {
            configs: RwLock::new(configs),
            loras: RwLock::new(BTreeMap::new()),
            residents: Mutex::new(Residents::default()),
            loading: Mutex::new(()),
            budget_bytes,
            device,
        };
        registry.refresh_loras();
        registry
    }

    /// The configured models' names, the default first.
    pub fn names(&self) -> Vec<String> {
        self.configs().iter().map(|c| c.name.clone()).collect()
    }

    fn configs(&self) -> std::sync::RwLockReadGuard<'_, Vec<ModelConfig>> {
        self.configs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The default model's name (empty while a shared queue's workers have
    /// announced none).
    pub fn default_name(&self) -> String {
        self.configs()
            .first()
            .map(|c| c.name.clone())
            .unwrap_or_default()
    }

    /// A model's configuration.
    pub fn config(&self, name: &str) -> Option<ModelConfig> {
        self.configs().iter().find(|c| c.name == name).cloned()
    }

    /// Replaces the models and their LoRAs' names with those the workers of a
    /// shared queue announce (an API replica, which loads nothing itself).
    pub fn set_catalog(&self, configs: Vec<ModelConfig>, loras: BTreeMap<String, Vec<String>>) {
        let loras = loras
            .into_iter()
            .map(|(m, names)| {
                (
                    m,
                    names
                        .into_iter()
                        .map(|n| (n.clone(), PathBuf::from(n)))
                        .collect(),
                )
            })
            .collect();
        *self
            .configs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = configs;
        *self
            .loras
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = loras;
    }

    /// The configuration of `name`, or [`ApiError::NotFound`] listing the models.
    ///
    /// # Errors
    /// A name that is not configured.
    pub fn resolve(&self, name: &str) -> Result<ModelConfig, ApiError> {
        self.config(name).ok_or_else(|| ApiError::NotFound {
            what: "model",
            name: name.to_string(),
            hint: match self.names() {
                names if names.is_empty() => {
                    "; no model is served yet (no worker has announced one)".into()
                }
                names => format!("; available: {}", names.join(", ")),
            },
        })
    }

    /// Re-reads every model's LoRA folder (`*.safetensors`, named by file stem).
    pub fn refresh_loras(&self) {
        let found = self
            .configs()
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.lora_dir.as_deref().map(scan_loras).unwrap_or_default(),
                )
            })
            .collect();
        *self
            .loras
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = found;
    }

    /// A model's LoRAs: name -> file.
    pub fn loras(&self, model: &str) -> BTreeMap<String, PathBuf> {
        self.loras
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(model)
            .cloned()
            .unwrap_or_default()
    }

    /// The loaded models' names.
    pub fn loaded_names(&self) -> Vec<String> {
        lock(&self.residents).models.keys().cloned().collect()
    }

    /// Whether any model is loaded.
    pub fn any_loaded(&self) -> bool {
        !lock(&self.residents).models.is_empty()
    }

    /// The model `name`, loaded now if it is not (blocking: call from a worker
    /// thread); while the returned handle lives the model is not unloaded.
    ///
    /// # Errors
    /// A name not configured, a model that does not fit the budget next to the
    /// models in use, a model that fails to load.
    pub fn get(&self, name: &str) -> Result<Arc<LoadedModel>, ApiError> {
        if let Some(m) = self.touch(name) {
            return Ok(m);
        }
        let config = self.resolve(name)?;
        let _loading = lock(&self.loading);
        if let Some(m) = self.touch(name) {
            return Ok(m);
        }
        let bytes = config.memory_mb.map(|mb| mb << 20).unwrap_or_else(|| {
            let f32_bytes = estimate_bytes(Path::new(&config.path));
            if config.dtype.as_deref().is_some_and(|d| d != "f32") {
                f32_bytes / 2
            } else {
                f32_bytes
            }
        });
        self.make_room(name, bytes)?;
        let started = std::time::Instant::now();
        let model = load(&config, &self.device, bytes)?;
        tracing::info!(
            model = name,
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        let mut r = lock(&self.residents);
        r.clock += 1;
        let last_used = r.clock;
        let model = Arc::new(model);
        r.models.insert(
            name.to_string(),
            Resident {
                model: model.clone(),
                last_used,
            },
        );
        crate::metrics::models_loaded(r.models.len());
        Ok(model)
    }

    fn touch(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let mut r = lock(&self.residents);
        r.clock += 1;
        let clock = r.clock;
        let resident = r.models.get_mut(name)?;
        resident.last_used = clock;
        Some(resident.model.clone())
    }

    /// Unloads least recently used models no job holds until `bytes` more fit.
    fn make_room(&self, name: &str, bytes: u64) -> Result<(), ApiError> {
        if self.budget_bytes == 0 {
            return Ok(());
        }
        let mut r = lock(&self.residents);
        loop {
            let used: u64 = r.models.values().map(|m| m.model.bytes).sum();
            if used + bytes <= self.budget_bytes {
                return Ok(());
            }
            let idle = r
                .models
                .iter()
                .filter(|(_, m)| Arc::strong_count(&m.model) == 1)
                .min_by_key(|(_, m)| m.last_used)
                .map(|(n, _)| n.clone());
            match idle {
                Some(victim) => {
                    r.models.remove(&victim);
                    crate::metrics::models_loaded(r.models.len());
                    tracing::info!(model = victim, "model unloaded for {name}");
                }
                None => {
                    return Err(ApiError::Unavailable(format!(
                        "model `{name}` needs about {} MiB; the memory budget of {} MiB is \
                         taken by models in use ({})",
                        bytes >> 20,
                        self.budget_bytes >> 20,
                        r.models.keys().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }
    }
}

fn load(config: &ModelConfig, device: &Device, bytes: u64) -> Result<LoadedModel, ApiError> {
    let controlnets: Vec<String> = config.controlnets.keys().cloned().collect();
    let dtype = match config.dtype.as_deref() {
        Some("f16") => Some(DType::F16),
        Some("bf16") => Some(DType::BF16),
        _ => None,
    };
    let options = LoadOptions {
        tiny_vae: config.tiny_vae.clone(),
        controlnets: config.controlnets.values().cloned().collect(),
        config: config.config.clone(),
        text_encoder_files: config.text_encoders.clone(),
        unet_dtype: dtype,
        text_encoder_dtype: dtype,
        vae_dtype: dtype,
        watermark: config.watermark,
        safety_checker: config.safety_checker,
        ..LoadOptions::default()
    };
    if config.safety_checker == Some(false) {
        tracing::warn!(
            model = config.name,
            "the safety checker is off for this model, as configured: its pictures are not checked"
        );
    }
    let pipeline = StableDiffusionPipeline::from_pretrained(
        ModelSource::parse(&config.path),
        device,
        &options,
    )
    .map_err(|e| {
        // The server log has the details (paths included); the client does not.
        tracing::error!(model = config.name, error = %e, "model failed to load");
        ApiError::Unavailable(format!("model `{}` failed to load", config.name))
    })?;
    let depth = match &config.depth_model {
        Some(source) => Some(
            sd_pipelines::preprocess::DepthEstimator::from_pretrained(
                ModelSource::parse(source),
                device,
                &sd_pipelines::HubOptions::default(),
            )
            .map_err(|e| {
                tracing::error!(model = config.name, error = %e, "depth model failed to load");
                ApiError::Unavailable(format!(
                    "the depth model of `{}` failed to load",
                    config.name
                ))
            })?,
        ),
        None => None,
    };
    Ok(LoadedModel {
        name: config.name.clone(),
        pipeline,
        controlnets,
        depth,
        bytes,
    })
}

fn scan_loras(dir: &Path) -> BTreeMap<String, PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        tracing::warn!(dir = %dir.display(), "LoRA folder cannot be read");
        return BTreeMap::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|p| {
            let stem = p.file_stem()?.to_str()?.to_string();
            crate::validate::is_plain_name(&stem).then_some((stem, p))
        })
        .collect()
}

/// Bytes a model takes in f32: four per parameter of its safetensors files (a
/// folder's non-variant files, or the single file), read from their headers.
pub fn estimate_bytes(path: &Path) -> u64 {
    let files: Vec<PathBuf> = if path.is_dir() {
        walk(path)
            .into_iter()
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.ends_with(".safetensors") && name.matches('.').count() == 1
            })
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .map(|f| 4 * parameter_count(f).unwrap_or(0))
        .sum()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The number of values in a safetensors file, from its header.
fn parameter_count(file: &Path) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    Some(
        header
            .as_object()?
            .values()
            .filter_map(|t| t.get("shape")?.as_array().cloned())
            .map(|shape| {
                shape
                    .iter()
                    .filter_map(serde_json::Value::as_u64)
                    .product::<u64>()
            })
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/tiny-sd15"
    );

    fn model(name: &str) -> ModelConfig {
        ModelConfig {
            memory_mb: Some(100),
            ..ModelConfig::new(name, TINY)
        }
    }

    #[test]
    fn least_recently_used_idle_model_makes_room_and_models_in_use_stay() {
        let registry = ModelRegistry::new(
            vec![model("a"), model("b"), model("c")],
            Device::flex(),
            250 << 20,
        );
        let a = registry.get("a").unwrap();
        drop(registry.get("b").unwrap());
        assert_eq!(registry.loaded_names(), ["a", "b"]);
        // `a` is held by a job: loading `c` unloads `b`, the idle one.
        drop(registry.get("c").unwrap());
        assert_eq!(registry.loaded_names(), ["a", "c"]);
        // With `a` and `c` both held, `b` does not fit: a clear refusal.
        let c = registry.get("c").unwrap();
        let e = registry.get("b").unwrap_err();
        assert!(
            matches!(&e, ApiError::Unavailable(m) if m.contains("memory budget")),
            "{e:?}"
        );
        drop((a, c));
        // Idle again: `a` was used least recently, so it goes.
        drop(registry.get("b").unwrap());
        assert_eq!(registry.loaded_names(), ["b", "c"]);
        assert!(matches!(
            registry.get("../a"),
            Err(ApiError::NotFound { .. })
        ));
    }

    #[test]
    fn estimates_the_demo_model_from_headers() {
        let bytes = estimate_bytes(Path::new(crate::config::DEMO_MODEL));
        // U-Net, VAE and text encoder of the demo model: a few million parameters.
        assert!(bytes > 1 << 20 && bytes < 1 << 30, "{bytes}");
    }
}
