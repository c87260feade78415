//! The shared queue's figures on loopback (docs/serving.md): the time from a job's
//! enqueue to its start with an idle worker, and throughput with 1, 2 and 3
//! workers against the single-process server on the same jobs.
//!
//! ```text
//! cargo run --release --example cluster_load                  # demo model, redis-server started here
//! cargo run --release --example cluster_load -- --redis redis://127.0.0.1:6379 --jobs 96
//! ```
//!
//! An API replica (`queue = "redis://..."`) and the workers run in this process,
//! each worker with its own copy of the model as on separate machines; clients are
//! threads speaking HTTP to the replica's native jobs API. Without `--redis`, a
//! `redis-server` (Debian's package) is started on a free port with append-only
//! persistence and `fsync` on every write, the configuration docs/serving.md
//! recommends. Enqueue and start times are the ones the replica and the worker
//! write in the job's hash (one machine, one clock).

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use sd_server::cluster::worker::RunningWorker;
use sd_server::{ModelConfig, RunningServer, Server, ServerConfig};
use serde_json::{Value, json};

#[derive(Parser, Clone)]
#[command(about = "Enqueue-to-start latency and throughput of the Redis queue")]
struct Args {
    /// A Redis to use (default: a redis-server started here).
    #[arg(long)]
    redis: Option<String>,
    /// A diffusers folder or single file (default: the demo model).
    #[arg(long)]
    model: Option<String>,
    /// Picture side in pixels.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Denoising steps of the throughput jobs.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Jobs of the latency run (one at a time, 2 steps each).
    #[arg(long, default_value_t = 100)]
    latency_jobs: usize,
    /// Jobs of each throughput run (all submitted at once).
    #[arg(long, default_value_t = 48)]
    jobs: usize,
    /// Largest batch of a worker.
    #[arg(long, default_value_t = 4)]
    max_batch: usize,
}

fn model(args: &Args) -> ModelConfig {
    args.model
        .as_ref()
        .map_or_else(ModelConfig::demo, |p| ModelConfig::new("model", p.clone()))
}

/// A redis-server of its own on a free port, persisted to a temporary folder.
fn start_redis(dir: &std::path::Path) -> Result<(Child, String), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--dir", &dir.to_string_lossy()])
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-server: {e} (Debian: apt-get install redis-server)"))?;
    let url = format!("redis://127.0.0.1:{port}");
    for _ in 0..200 {
        if redis_conn(&url).is_ok() {
            return Ok((child, url));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err("redis-server did not start".into())
}

fn redis_conn(url: &str) -> redis::RedisResult<redis::Connection> {
    let mut c = redis::Client::open(url)?.get_connection()?;
    redis::cmd("PING").query::<String>(&mut c)?;
    Ok(c)
}

fn worker(args: &Args, url: &str, name: &str) -> Result<RunningWorker, String> {
    let config = ServerConfig {
        models: vec![model(args)],
        queue: url.into(),
        max_batch: args.max_batch,
        preview_every: 0,
        cluster: sd_server::ClusterConfig {
            worker_name: Some(name.into()),
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let (server, worker) = Server::start_worker(config).map_err(|e| e.to_string())?;
    while server.shared().registry.loaded_names().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    worker.spawn().map_err(|e| e.to_string())
}

fn api(url: &str) -> Result<RunningServer, String> {
    let mut config = ServerConfig {
        queue: url.into(),
        ..ServerConfig::default()
    };
    config.limits.queue_capacity = 100_000;
    serve(config)
}

fn serve(config: ServerConfig) -> Result<RunningServer, String> {
    Server::start(config)
        .map_err(|e| e.to_string())?
        .spawn("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?)
        .map_err(|e| e.to_string())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

fn get_json(agent: &ureq::Agent, url: &str) -> Value {
    agent
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().with_config().limit(64 << 20).read_json().ok())
        .unwrap_or(Value::Null)
}

fn submit(agent: &ureq::Agent, base: &str, body: &Value) -> Result<String, String> {
    let mut r = agent
        .post(format!("{base}/v1/jobs"))
        .send_json(body)
        .map_err(|e| e.to_string())?;
    let v: Value = r.body_mut().read_json().map_err(|e| e.to_string())?;
    v["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| format!("not queued: {v}"))
}

fn wait_all(agent: &ureq::Agent, base: &str, ids: &[String]) -> Result<(), String> {
    for id in ids {
        loop {
            let v = get_json(agent, &format!("{base}/v1/jobs/{id}"));
            match v["status"].as_str() {
                Some("succeeded") => break,
                Some("failed" | "cancelled") | None => return Err(format!("job {id}: {v}")),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// Enqueue-to-start (from the job's hash) and submit-to-result (as the client
/// sees it) of jobs run one at a time on an idle worker, in milliseconds.
fn latency(args: &Args, base: &str, url: &str) -> Result<(Vec<f64>, Vec<f64>), String> {
    let agent = agent();
    let mut c = redis_conn(url).map_err(|e| e.to_string())?;
    let (mut start, mut total) = (Vec::new(), Vec::new());
    for i in 0..args.latency_jobs {
        let body = json!({"prompt": format!("latency {i}"), "steps": 2, "seed": i,
            "width": args.size, "height": args.size});
        let t0 = Instant::now();
        let id = submit(&agent, base, &body)?;
        wait_all(&agent, base, std::slice::from_ref(&id))?;
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        let (created, started): (u64, u64) = redis::cmd("HMGET")
            .arg(format!("sd:job:{id}"))
            .arg("created")
            .arg("started")
            .query(&mut c)
            .map_err(|e| e.to_string())?;
        start.push(started.saturating_sub(created) as f64);
        // An idle worker: the next job comes after the worker has gone back to
        // waiting on the stream.
        std::thread::sleep(Duration::from_millis(20));
    }
    start.sort_by(f64::total_cmp);
    total.sort_by(f64::total_cmp);
    Ok((start, total))
}

/// Pictures per minute of `args.jobs` jobs submitted at once.
fn throughput(args: &Args, base: &str) -> Result<f64, String> {
    let agent = agent();
    let t0 = Instant::now();
    let ids = (0..args.jobs)
        .map(|i| {
            let body = json!({"prompt": format!("load {i}"), "steps": args.steps, "seed": i,
                "width": args.size, "height": args.size});
            submit(&agent, base, &body)
        })
        .collect::<Result<Vec<_>, _>>()?;
    wait_all(&agent, base, &ids)?;
    Ok(args.jobs as f64 / t0.elapsed().as_secs_f64() * 60.0)
}

fn run(args: &Args) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (_redis, url) = match &args.redis {
        Some(u) => (None, u.clone()),
        None => {
            let (child, url) = start_redis(dir.path())?;
            (Some(KillOnDrop(child)), url)
        }
    };
    let replica = api(&url)?;
    let base = replica.url();
    let mut workers = vec![worker(args, &url, "w1")?];
    // Warm-up: the replica learns the model, kernels tune.
    while get_json(&agent(), &format!("{base}/v1/models"))["data"][0]["id"].is_null() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = throughput(
        &Args {
            jobs: 4,
            ..args.clone()
        },
        &base,
    )?;

    let (start, total) = latency(args, &base, &url)?;
    println!(
        "enqueue -> start, idle worker ({} jobs): p50 {:.1} ms, p99 {:.1} ms; \
         submit -> result seen by the client (2 steps): p50 {:.1} ms, p99 {:.1} ms",
        start.len(),
        percentile(&start, 0.5),
        percentile(&start, 0.99),
        percentile(&total, 0.5),
        percentile(&total, 0.99)
    );

    println!(
        "throughput, {} jobs of {}x{} at {} steps:",
        args.jobs, args.size, args.size, args.steps
    );
    for n in 1..=3 {
        while workers.len() < n {
            workers.push(worker(args, &url, &format!("w{}", workers.len() + 1))?);
        }
        let rate = throughput(args, &base)?;
        println!("  redis queue, {n} worker(s): {rate:.0} img/min");
    }
    for w in workers {
        w.stop();
    }
    drop(replica);
    let mut config = ServerConfig {
        models: vec![model(args)],
        max_batch: args.max_batch,
        preview_every: 0,
        ..ServerConfig::default()
    };
    config.limits.queue_capacity = 100_000;
    let single = serve(config)?;
    let sbase = single.url();
    while get_json(&agent(), &format!("{sbase}/ready"))["ready"] != true {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = throughput(
        &Args {
            jobs: 4,
            ..args.clone()
        },
        &sbase,
    )?;
    let rate = throughput(args, &sbase)?;
    println!("  single process (memory queue): {rate:.0} img/min");
    Ok(())
}

/// The redis-server started here, stopped however the run ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster_load: {e}");
            ExitCode::FAILURE
        }
    }
}
