//! The command line of `sd-server`: flags over an optional TOML file, into a
//! [`ServerConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::config::{ApiKey, ModelConfig, ServerConfig};

/// Serve Stable Diffusion over HTTP: OpenAI's images API (/v1/images/*), AUTOMATIC1111's
/// (/sdapi/v1/*) and native jobs with live progress (/v1/jobs).
///
/// One machine: `sd-server --model NAME=PATH`. Several: API replicas
/// `sd-server --queue redis://HOST:PORT` and workers
/// `sd-server worker --queue redis://HOST:PORT --model NAME=PATH`.
#[derive(Parser, Debug)]
#[command(name = "sd-server", version)]
pub struct Args {
    /// `serve` (the default: the HTTP APIs; with `--queue redis://...` an API
    /// replica) or `worker` (runs the jobs of a shared queue; serves /health,
    /// /ready and /metrics only).
    #[arg(value_name = "ROLE", value_parser = ["serve", "worker"])]
    pub role: Option<String>,
    /// Where jobs wait: `memory` (default) or `redis://HOST:PORT[/DB]`.
    #[arg(long)]
    pub queue: Option<String>,
    /// Seconds a job may go without its worker's heartbeat before another worker
    /// claims it (shared queue).
    #[arg(long)]
    pub visibility_timeout_secs: Option<u64>,
    /// Milliseconds between a worker's heartbeats (shared queue).
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Failed runs of a job before it goes to the dead-letter stream (shared queue).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// This worker's consumer name (default: host name and process id).
    #[arg(long)]
    pub worker_name: Option<String>,
    /// Seconds a finished job's result stays available.
    #[arg(long)]
    pub result_ttl_secs: Option<u64>,
    /// A TOML configuration file (flags below override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7860; 0.0.0.0:PORT exposes it).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// A model: NAME=PATH (diffusers folder, .safetensors file, or hub id with the
    /// `hub` feature). Repeatable; the first is the default.
    #[arg(long = "model", value_name = "NAME=PATH")]
    pub models: Vec<String>,
    /// A model's LoRA folder: NAME=DIR.
    #[arg(long = "lora-dir", value_name = "NAME=DIR")]
    pub lora_dirs: Vec<String>,
    /// A model's ControlNet: MODEL:CONTROLNET=PATH.
    #[arg(long = "controlnet", value_name = "MODEL:NAME=PATH")]
    pub controlnets: Vec<String>,
    /// A model's tiny autoencoder for previews: NAME=DIR.
    #[arg(long = "tiny-vae", value_name = "NAME=DIR")]
    pub tiny_vaes: Vec<String>,
    /// An API key: NAME=KEY, or NAME=KEY@REQUESTS_PER_MINUTE (prefer the config file: flags
    /// show in the process list).
    #[arg(long = "api-key", value_name = "NAME=KEY")]
    pub api_keys: Vec<String>,
    /// A CORS origin (`*` for any); none: CORS off.
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// Most jobs in one U-Net batch (1: no batching).
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Generation threads.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Jobs waiting per model before 429.
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Memory for loaded models in MiB (least recently used unloaded).
    #[arg(long)]
    pub memory_budget_mb: Option<u64>,
    /// A preview every N steps (0: none).
    #[arg(long)]
    pub preview_every: Option<usize>,
    /// cpu, wgpu or cuda.
    #[arg(long)]
    pub device: Option<String>,
    /// C2PA content credentials on every picture: the PEM certificate chain
    /// (signing certificate first; the `c2pa` feature). With --c2pa-key.
    #[arg(long)]
    pub c2pa_cert: Option<PathBuf>,
    /// The PEM (PKCS#8) private key of --c2pa-cert.
    #[arg(long)]
    pub c2pa_key: Option<PathBuf>,
}

fn split<'a>(text: &'a str, flag: &str) -> Result<(&'a str, &'a str), String> {
    text.split_once('=')
        .ok_or_else(|| format!("--{flag} {text}: expected NAME=VALUE"))
}

fn model_mut<'a>(
    c: &'a mut ServerConfig,
    name: &str,
    flag: &str,
) -> Result<&'a mut ModelConfig, String> {
    c.models
        .iter_mut()
        .find(|m| m.name == name)
        .ok_or_else(|| format!("--{flag}: no model `{name}` (give --model {name}=PATH first)"))
}

impl Args {
    /// The configuration the flags describe (over `--config`'s file).
    ///
    /// # Errors
    /// A file that cannot be read, flags that do not parse, values the server cannot
    /// honour; one line for the user.
    pub fn into_config(self) -> Result<ServerConfig, String> {
        config(self)
    }

    /// Whether the worker role was asked for.
    pub fn is_worker(&self) -> bool {
        self.role.as_deref() == Some("worker")
    }
}

fn config(args: Args) -> Result<ServerConfig, String> {
    let mut c = match &args.config {
        Some(path) => ServerConfig::from_toml_file(path).map_err(|e| e.to_string())?,
        None => ServerConfig::default(),
    };
    if let Some(l) = args.listen {
        c.listen = l;
    }
    for m in &args.models {
        let (name, path) = split(m, "model")?;
        c.models.push(ModelConfig::new(name, path));
    }
    for l in &args.lora_dirs {
        let (name, dir) = split(l, "lora-dir")?;
        model_mut(&mut c, name, "lora-dir")?.lora_dir = Some(dir.into());
    }
    for t in &args.tiny_vaes {
        let (name, dir) = split(t, "tiny-vae")?;
        model_mut(&mut c, name, "tiny-vae")?.tiny_vae = Some(dir.into());
    }
    for cn in &args.controlnets {
        let (target, path) = split(cn, "controlnet")?;
        let (model, name) = target
            .split_once(':')
            .ok_or_else(|| format!("--controlnet {cn}: expected MODEL:NAME=PATH"))?;
        model_mut(&mut c, model, "controlnet")?
            .controlnets
            .insert(name.into(), path.into());
    }
    for k in &args.api_keys {
        let (name, rest) = split(k, "api-key")?;
        let (key, rpm) = match rest.rsplit_once('@') {
            Some((key, rpm)) => (
                key,
                rpm.parse()
                    .map_err(|_| format!("--api-key {name}: `{rpm}` is not a rate"))?,
            ),
            None => (rest, 0),
        };
        c.api_keys.push(ApiKey {
            name: name.into(),
            key: key.into(),
            requests_per_minute: rpm,
        });
    }
    c.cors_origins.extend(args.cors_origins);
    c.max_batch = args.max_batch.unwrap_or(c.max_batch);
    c.workers = args.workers.unwrap_or(c.workers);
    c.limits.queue_capacity = args.queue_capacity.unwrap_or(c.limits.queue_capacity);
    c.memory_budget_mb = args.memory_budget_mb.unwrap_or(c.memory_budget_mb);
    c.preview_every = args.preview_every.unwrap_or(c.preview_every);
    if let Some(d) = args.device {
        c.device = d;
    }
    if let Some(q) = args.queue {
        c.queue = q;
    }
    let cl = &mut c.cluster;
    cl.visibility_timeout_secs = args
        .visibility_timeout_secs
        .unwrap_or(cl.visibility_timeout_secs);
    cl.heartbeat_ms = args.heartbeat_ms.unwrap_or(cl.heartbeat_ms);
    cl.max_attempts = args.max_attempts.unwrap_or(cl.max_attempts);
    if args.worker_name.is_some() {
        cl.worker_name = args.worker_name;
    }
    c.result_ttl_secs = args.result_ttl_secs.unwrap_or(c.result_ttl_secs);
    if args.c2pa_cert.is_some() {
        c.c2pa_cert = args.c2pa_cert;
    }
    if args.c2pa_key.is_some() {
        c.c2pa_key = args.c2pa_key;
    }
    c.check().map_err(|e| e.to_string())?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<ServerConfig, String> {
        Args::try_parse_from(std::iter::once("sd-server").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?
            .into_config()
    }

    #[test]
    fn no_arguments_serve_the_demo_model_on_loopback() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7860");
        assert!(c.models.is_empty());
        assert_eq!(c.models_or_demo()[0].name, "demo-shapes");
        assert!(c.api_keys.is_empty() && c.cors_origins.is_empty());
    }

    #[test]
    fn flags_build_models_keys_and_limits() {
        let c = parse(&[
            "--model",
            "sd15=weights/sd15",
            "--model",
            "xl=weights/xl.safetensors",
            "--lora-dir",
            "sd15=loras",
            "--controlnet",
            "sd15:canny=cn/canny",
            "--tiny-vae",
            "sd15=taesd",
            "--api-key",
            "alice=0123456789@30",
            "--max-batch",
            "8",
            "--queue-capacity",
            "5",
            "--listen",
            "0.0.0.0:9000",
        ])
        .unwrap();
        assert_eq!(c.models.len(), 2);
        assert_eq!(
            c.models[0].lora_dir.as_deref(),
            Some(std::path::Path::new("loras"))
        );
        assert_eq!(
            c.models[0].controlnets["canny"],
            std::path::PathBuf::from("cn/canny")
        );
        assert_eq!(c.api_keys[0].requests_per_minute, 30);
        assert_eq!(
            (c.max_batch, c.limits.queue_capacity, c.listen.port()),
            (8, 5, 9000)
        );
        for bad in [
            &["--model", "nopath"][..],
            &["--lora-dir", "missing=loras"],
            &["--controlnet", "sd15=x"],
            &["--model", "a=b", "--model", "a=c"],
            &["--model", "../up=b"],
            &["--api-key", "a=short"],
            &["--max-batch", "0"],
            &["--device", "tpu"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn content_credential_flags_and_keys() {
        let c = parse(&["--c2pa-cert", "chain.pem", "--c2pa-key", "key.pem"]).unwrap();
        assert_eq!(c.c2pa_cert.as_deref(), Some(Path::new("chain.pem")));
        assert_eq!(c.c2pa_key.as_deref(), Some(Path::new("key.pem")));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(
            &file,
            "c2pa_cert = \"certs/chain.pem\"\nc2pa_key = \"certs/key.pem\"\n",
        )
        .unwrap();
        let c = ServerConfig::from_toml_file(&file).unwrap();
        // Relative to the file, as model paths are.
        assert_eq!(c.c2pa_cert, Some(dir.path().join("certs/chain.pem")));
        assert_eq!(c.c2pa_key, Some(dir.path().join("certs/key.pem")));
    }

    #[test]
    fn roles_and_the_shared_queue() {
        let args = Args::try_parse_from([
            "sd-server",
            "worker",
            "--queue",
            "redis://127.0.0.1:6379",
            "--visibility-timeout-secs",
            "9",
            "--heartbeat-ms",
            "1000",
        ])
        .unwrap();
        assert!(args.is_worker());
        let c = args.into_config().unwrap();
        assert_eq!(c.queue, "redis://127.0.0.1:6379");
        assert_eq!(c.cluster.visibility_timeout_secs, 9);
        assert!(!Args::try_parse_from(["sd-server"]).unwrap().is_worker());
        assert!(Args::try_parse_from(["sd-server", "wroker"]).is_err());
        for bad in [
            &["--queue", "kafka://x"][..],
            &["--queue", "redis://x", "--heartbeat-ms", "20000"],
            &["--max-attempts", "0"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_config_file_with_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("loras")).unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(
            &file,
            "max_batch = 2\n[[model]]\nname = \"m\"\npath = \"weights\"\nlora_dir = \"loras\"\n",
        )
        .unwrap();
        let c = parse(&["--config", file.to_str().unwrap(), "--workers", "2"]).unwrap();
        assert_eq!((c.max_batch, c.workers), (2, 2));
        assert_eq!(
            c.models[0].lora_dir.as_deref(),
            Some(dir.path().join("loras").as_path())
        );
    }
}
