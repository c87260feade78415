//! `sd-server`: serves Stable Diffusion over HTTP (OpenAI images API, AUTOMATIC1111
//! API, native jobs). With no arguments it serves the demo model on
//! 127.0.0.1:7860.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sd_server::{ApiKey, ModelConfig, Server, ServerConfig};

/// Serve Stable Diffusion over HTTP: OpenAI's images API (/v1/images/*), AUTOMATIC1111's
/// (/sdapi/v1/*) and native jobs with live progress (/v1/jobs).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// A TOML configuration file (flags below override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7860; 0.0.0.0:PORT exposes it).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A model: NAME=PATH (diffusers folder, .safetensors file, or hub id with the
    /// `hub` feature). Repeatable; the first is the default.
    #[arg(long = "model", value_name = "NAME=PATH")]
    models: Vec<String>,
    /// A model's LoRA folder: NAME=DIR.
    #[arg(long = "lora-dir", value_name = "NAME=DIR")]
    lora_dirs: Vec<String>,
    /// A model's ControlNet: MODEL:CONTROLNET=PATH.
    #[arg(long = "controlnet", value_name = "MODEL:NAME=PATH")]
    controlnets: Vec<String>,
    /// A model's tiny autoencoder for previews: NAME=DIR.
    #[arg(long = "tiny-vae", value_name = "NAME=DIR")]
    tiny_vaes: Vec<String>,
    /// An API key: NAME=KEY[@REQUESTS_PER_MINUTE] (prefer the config file: flags
    /// show in the process list).
    #[arg(long = "api-key", value_name = "NAME=KEY")]
    api_keys: Vec<String>,
    /// A CORS origin (`*` for any); none: CORS off.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Most jobs in one U-Net batch (1: no batching).
    #[arg(long)]
    max_batch: Option<usize>,
    /// Generation threads.
    #[arg(long)]
    workers: Option<usize>,
    /// Jobs waiting per model before 429.
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Memory for loaded models in MiB (least recently used unloaded).
    #[arg(long)]
    memory_budget_mb: Option<u64>,
    /// A preview every N steps (0: none).
    #[arg(long)]
    preview_every: Option<usize>,
    /// cpu, wgpu or cuda.
    #[arg(long)]
    device: Option<String>,
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
    c.check().map_err(|e| e.to_string())?;
    Ok(c)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: finishing queued jobs");
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match config(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sd-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sd-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let server = Server::start(config).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind(server.config().listen)
            .await
            .map_err(|e| format!("{}: {e}", server.config().listen))?;
        eprintln!(
            "sd-server: listening on http://{}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        server
            .serve(listener, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sd-server: {e}");
            ExitCode::FAILURE
        }
    }
}
