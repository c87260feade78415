//! What the server serves and how: [`ServerConfig`], read from a TOML file or built
//! from command-line flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The demo model shipped in the repository (served when no model is configured).
pub const DEMO_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo-shapes");

/// One model the server may load: its name in requests, where its weights are, and
/// what comes with it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use (`model`, `sd_model_checkpoint`).
    pub name: String,
    /// A diffusers folder, a single `.safetensors` file, or (with the `hub` feature)
    /// a hub repository id.
    pub path: String,
    /// A folder of LoRA `.safetensors` files; requests name them by file stem.
    #[serde(default)]
    pub lora_dir: Option<PathBuf>,
    /// ControlNets by the name requests use.
    #[serde(default)]
    pub controlnets: BTreeMap<String, PathBuf>,
    /// A tiny autoencoder (TAESD folder) for previews.
    #[serde(default)]
    pub tiny_vae: Option<PathBuf>,
    /// A Depth Anything model (folder, file or hub id) for the `depth_anything`
    /// ControlNet preprocessor.
    #[serde(default)]
    pub depth_model: Option<String>,
    /// For a single file: the diffusers folder whose configs describe it
    /// (diffusers' `from_single_file(config=...)`).
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// For a single-file SD 3 / 3.5 checkpoint without its text encoders: their
    /// files (ComfyUI's `clip_l.safetensors`, `clip_g.safetensors`,
    /// `t5xxl_fp16.safetensors`), recognised from their tensors.
    #[serde(default)]
    pub text_encoders: Vec<PathBuf>,
    /// Weights' precision: `f32` (default), `f16` or `bf16`, for every component
    /// as `LoadOptions`' `unet_dtype`, `text_encoder_dtype` and `vae_dtype` say.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Memory the model takes once loaded, in MiB; estimated from its weight files
    /// when not given.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Load at start-up instead of on first use (the first model always is).
    #[serde(default)]
    pub preload: bool,
    /// Steps of requests that give none (native and OpenAI APIs; 20 when not set).
    #[serde(default)]
    pub default_steps: Option<usize>,
    /// Guidance of requests that give none (native and OpenAI APIs; 7.5 when not
    /// set).
    #[serde(default)]
    pub default_guidance: Option<f64>,
    /// The invisible watermark in every picture of 256x256 or more: unset does as
    /// diffusers (on for SDXL models, off for SD 1.x/2.x); `false` turns it off,
    /// `true` on for any model.
    #[serde(default)]
    pub watermark: Option<bool>,
    /// The model folder's safety checker: unset runs it where the folder has one
    /// (as diffusers), `false` does not (logged at load), `true` requires one.
    #[serde(default)]
    pub safety_checker: Option<bool>,
}

impl ModelConfig {
    /// A model by name and path, nothing else.
    pub fn new(name: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            lora_dir: None,
            controlnets: BTreeMap::new(),
            tiny_vae: None,
            depth_model: None,
            config: None,
            text_encoders: Vec::new(),
            dtype: None,
            memory_mb: None,
            preload: false,
            default_steps: None,
            default_guidance: None,
            watermark: None,
            safety_checker: None,
        }
    }

    /// The demo model: 20 steps at guidance 2.5 unless a request says otherwise.
    pub fn demo() -> Self {
        Self {
            default_steps: Some(20),
            default_guidance: Some(2.5),
            ..Self::new("demo-shapes", DEMO_MODEL)
        }
    }
}

/// Limits checked on every request before any work.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// Largest picture, in pixels, asked for or sent as an input.
    pub max_pixels: usize,
    /// Largest side in pixels.
    pub max_side: usize,
    /// Most images in one request (`n`, `batch_size * n_iter`).
    pub max_images: usize,
    /// Most denoising steps.
    pub max_steps: usize,
    /// Longest prompt in characters.
    pub max_prompt_chars: usize,
    /// Jobs waiting per model before new ones get 429.
    pub queue_capacity: usize,
    /// Seconds a job may take from submission (queue wait included) unless it asks
    /// for less; 0: no deadline.
    pub job_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            max_pixels: 2048 * 2048,
            max_side: 4096,
            max_images: 8,
            max_steps: 150,
            max_prompt_chars: 4000,
            queue_capacity: 64,
            job_timeout_secs: 600,
        }
    }
}

/// One API key: the secret clients send as `Authorization: Bearer ...` and its
/// request rate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// A name for logs, metrics and fairness (never the secret).
    pub name: String,
    /// The secret.
    pub key: String,
    /// Requests per minute (0: unlimited).
    #[serde(default)]
    pub requests_per_minute: u32,
}

/// Everything the server needs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (127.0.0.1:7860).
    pub listen: SocketAddr,
    /// The models, the first one the default.
    #[serde(rename = "model")]
    pub models: Vec<ModelConfig>,
    /// Request limits.
    pub limits: Limits,
    /// Bearer API keys; none: no authentication.
    #[serde(rename = "api_key")]
    pub api_keys: Vec<ApiKey>,
    /// Origins allowed by CORS (`*` for any); empty: CORS off.
    pub cors_origins: Vec<String>,
    /// Most jobs in one U-Net batch (1: no batching).
    pub max_batch: usize,
    /// Generation threads (each runs one batch at a time).
    pub workers: usize,
    /// Memory for loaded models in MiB; least recently used models are unloaded to
    /// stay under it (0: no limit).
    pub memory_budget_mb: u64,
    /// A preview image every this many steps (0: none).
    pub preview_every: usize,
    /// Seconds a finished job's result stays available.
    pub result_ttl_secs: u64,
    /// The device: `cpu`, `wgpu` or `cuda` (with those features built in).
    pub device: String,
    /// Where jobs wait: `memory` (this process's queue) or `redis://HOST:PORT[/DB]`
    /// (a Redis shared by API replicas and workers on other machines).
    pub queue: String,
    /// The shared queue's delivery settings.
    pub cluster: ClusterConfig,
    /// A PEM certificate chain (signing certificate first) for C2PA content
    /// credentials on every picture (the `c2pa` feature); with `c2pa_key`.
    pub c2pa_cert: Option<PathBuf>,
    /// The PEM (PKCS#8) private key of `c2pa_cert`.
    pub c2pa_key: Option<PathBuf>,
}

/// How jobs are delivered through a shared (Redis) queue.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Seconds a job may go without its worker's heartbeat before another worker
    /// claims it (the worker is taken for dead).
    pub visibility_timeout_secs: u64,
    /// Milliseconds between a worker's heartbeats (at most a third of the
    /// visibility timeout).
    pub heartbeat_ms: u64,
    /// Runs of a job that fail (an error, or a worker dying under it) before it
    /// goes to the dead-letter stream.
    pub max_attempts: u32,
    /// This worker's name in the consumer group (default: host name and process id).
    pub worker_name: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            visibility_timeout_secs: 30,
            heartbeat_ms: 2000,
            max_attempts: 3,
            worker_name: None,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7860)),
            models: Vec::new(),
            limits: Limits::default(),
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            max_batch: 4,
            workers: 1,
            memory_budget_mb: 0,
            preview_every: 5,
            result_ttl_secs: 600,
            device: "cpu".into(),
            queue: "memory".into(),
            cluster: ClusterConfig::default(),
            c2pa_cert: None,
            c2pa_key: None,
        }
    }
}

impl ServerConfig {
    /// Reads a TOML configuration file.
    ///
    /// # Errors
    /// An unreadable file, TOML that does not parse or has unknown keys, or values
    /// [`Self::check`] refuses.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let config = Self::from_toml(&text)?;
        // Relative paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        Ok(config.relative_to(base))
    }

    /// Parses a TOML configuration.
    ///
    /// # Errors
    /// TOML that does not parse or has unknown keys, or values [`Self::check`] refuses.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn relative_to(mut self, base: &Path) -> Self {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for m in &mut self.models {
            if Path::new(&m.path).is_relative() && base.join(&m.path).exists() {
                m.path = base.join(&m.path).to_string_lossy().into_owned();
            }
            m.lora_dir.as_mut().map(fix);
            m.tiny_vae.as_mut().map(fix);
            m.config.as_mut().map(fix);
            m.text_encoders.iter_mut().for_each(fix);
            m.controlnets.values_mut().for_each(fix);
        }
        self.c2pa_cert.as_mut().map(fix);
        self.c2pa_key.as_mut().map(fix);
        self
    }

    /// The models served, the demo model when none is configured.
    pub fn models_or_demo(&self) -> Vec<ModelConfig> {
        if self.models.is_empty() {
            vec![ModelConfig::demo()]
        } else {
            self.models.clone()
        }
    }

    /// Refuses what the server cannot honour: duplicate or path-like model names,
    /// zero workers, batch or queue sizes, duplicate API keys.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                message,
            })
        };
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            if !crate::validate::is_plain_name(&m.name) {
                return invalid(
                    "model.name",
                    format!("`{}`: letters, digits, `-`, `_`, `.` only", m.name),
                );
            }
            if !names.insert(m.name.as_str()) {
                return invalid("model.name", format!("`{}` appears twice", m.name));
            }
            if let Some(d) = &m.dtype
                && !["f32", "f16", "bf16"].contains(&d.as_str())
            {
                return invalid("model.dtype", format!("`{d}`: f32, f16 or bf16"));
            }
            for cn in m.controlnets.keys() {
                if !crate::validate::is_plain_name(cn) {
                    return invalid("model.controlnets", format!("`{cn}` is not a plain name"));
                }
            }
        }
        if self.workers == 0 {
            return invalid("workers", "must be at least 1".into());
        }
        if self.queue != "memory"
            && !["redis://", "redis+unix://", "unix://"]
                .iter()
                .any(|p| self.queue.starts_with(p))
        {
            return invalid(
                "queue",
                format!("`{}`: `memory` or `redis://HOST:PORT`", self.queue),
            );
        }
        let c = &self.cluster;
        if c.max_attempts == 0
            || c.heartbeat_ms == 0
            || c.heartbeat_ms * 3 > c.visibility_timeout_secs * 1000
        {
            return invalid(
                "cluster",
                "max_attempts and heartbeat_ms at least 1, heartbeat_ms at most a third of \
                 visibility_timeout_secs"
                    .into(),
            );
        }
        if self.max_batch == 0 {
            return invalid("max_batch", "must be at least 1".into());
        }
        if self.limits.queue_capacity == 0 {
            return invalid("limits.queue_capacity", "must be at least 1".into());
        }
        let mut keys = std::collections::HashSet::new();
        for k in &self.api_keys {
            if k.key.len() < 8 {
                return invalid(
                    "api_key.key",
                    format!("`{}`: at least 8 characters", k.name),
                );
            }
            if !keys.insert(k.key.as_str()) {
                return invalid("api_key.key", format!("`{}` repeats another key", k.name));
            }
        }
        if !["cpu", "wgpu", "cuda"].contains(&self.device.as_str()) {
            return invalid("device", format!("`{}`: cpu, wgpu or cuda", self.device));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_full_file() {
        let c = ServerConfig::from_toml(
            r#"
            listen = "0.0.0.0:8080"
            max_batch = 2
            cors_origins = ["*"]
            [limits]
            max_images = 4
            [[model]]
            name = "sd15"
            path = "weights/sd15"
            lora_dir = "loras"
            controlnets = { canny = "cn/canny" }
            [[api_key]]
            name = "alice"
            key = "0123456789abcdef"
            requests_per_minute = 60
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.limits.max_images, 4);
        assert_eq!(c.limits.max_steps, Limits::default().max_steps);
        assert_eq!(c.models[0].controlnets["canny"], PathBuf::from("cn/canny"));
        assert_eq!(c.api_keys[0].requests_per_minute, 60);
    }

    #[test]
    fn the_guides_example_file_parses() {
        let guide = include_str!("../../../docs/serving.md");
        let start = guide.find("```toml\n").expect("a TOML example") + 8;
        let end = start + guide[start..].find("```").expect("its end");
        let c = ServerConfig::from_toml(&guide[start..end]).unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(c.models[0].dtype.as_deref(), Some("f16"));
        assert_eq!(c.api_keys[0].requests_per_minute, 120);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_names() {
        assert!(ServerConfig::from_toml("listn = \"x\"").is_err());
        let e = ServerConfig::from_toml("[[model]]\nname = \"../x\"\npath = \"p\"").unwrap_err();
        assert!(e.to_string().contains("model.name"), "{e}");
        assert!(ServerConfig::from_toml("workers = 0").is_err());
        assert!(ServerConfig::from_toml("[[api_key]]\nname = \"a\"\nkey = \"short\"").is_err());
    }
}
