//! A bounded load generator against the server on loopback: throughput and latency
//! percentiles at several concurrencies with batching on and off, then a long run
//! that counts failed and lost requests and watches resident memory.
//!
//! ```text
//! cargo run --release --example serve_load                      # the demo model, all figures
//! cargo run --release --example serve_load -- --requests 24 --long 200
//! cargo run --release --example serve_load -- --model weights/sd15 --size 512 --steps 20
//! ```
//!
//! The server runs in this process (its HTTP on a free 127.0.0.1 port, generation on
//! its own threads); clients are threads with blocking HTTP, each request an OpenAI
//! `POST /v1/images/generations` with its own prompt and seed. Every run is bounded
//! by a request count. Figures go to standard output as a table and, with `--json`,
//! as one JSON line per row (docs/serving.md).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use sd_server::{ModelConfig, RunningServer, Server, ServerConfig};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Load the server on loopback and print throughput and latency")]
struct Args {
    /// A diffusers folder or single file (default: the demo model).
    #[arg(long)]
    model: Option<String>,
    /// Picture side in pixels.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Requests per (concurrency, batching) cell.
    #[arg(long, default_value_t = 48)]
    requests: usize,
    /// Concurrencies to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Largest batch with batching on.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests of the long run (0: skip it).
    #[arg(long, default_value_t = 1000)]
    long: usize,
    /// Concurrency of the long run.
    #[arg(long, default_value_t = 32)]
    long_concurrency: usize,
    /// Seconds finished jobs keep their pictures on the server during the long run
    /// (the server's default is 600: memory then grows by the pictures kept).
    #[arg(long, default_value_t = 30)]
    result_ttl: u64,
    /// One JSON line per row as well.
    #[arg(long)]
    json: bool,
}

/// What one run measured.
struct Run {
    ok: usize,
    failed: usize,
    lost: usize,
    seconds: f64,
    latencies: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The server on a free loopback port, stopped when the handle is dropped.
fn start(args: &Args, max_batch: usize, result_ttl: u64) -> RunningServer {
    let model = match &args.model {
        Some(p) => ModelConfig::new("model", p.clone()),
        None => ModelConfig::demo(),
    };
    let mut config = ServerConfig {
        models: vec![model],
        max_batch,
        preview_every: 0,
        result_ttl_secs: result_ttl,
        ..ServerConfig::default()
    };
    config.limits.queue_capacity = 256;
    Server::start(config)
        .expect("the server starts")
        .spawn("127.0.0.1:0".parse().expect("an address"))
        .expect("a loopback port")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// `requests` generations from `concurrency` client threads.
fn run(base: &str, args: &Args, requests: usize, concurrency: usize, salt: usize) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, base) = (next.clone(), base.to_string());
            let (size, steps) = (args.size, args.steps);
            std::thread::spawn(move || {
                let agent = agent();
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= requests {
                        return out;
                    }
                    let body = json!({
                        "prompt": format!("a red circle on a white background, request {}", salt + i),
                        "size": format!("{size}x{size}"), "steps": steps, "seed": salt + i,
                    });
                    let t = Instant::now();
                    let reply = agent
                        .post(format!("{base}/v1/images/generations"))
                        .header("content-type", "application/json")
                        .send(body.to_string().as_bytes());
                    let outcome = match reply {
                        Ok(mut r) => {
                            let text = r.body_mut().with_config().limit(64 << 20).read_to_string();
                            let ok = r.status().as_u16() == 200
                                && text.is_ok_and(|t| t.contains("\"b64_json\""));
                            Some(ok)
                        }
                        Err(_) => None,
                    };
                    out.push((outcome, t.elapsed().as_secs_f64()));
                }
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("a client thread"))
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = results
        .iter()
        .filter(|(o, _)| *o == Some(true))
        .map(|(_, s)| *s)
        .collect();
    latencies.sort_by(f64::total_cmp);
    Run {
        ok: latencies.len(),
        failed: results.iter().filter(|(o, _)| *o == Some(false)).count(),
        lost: requests - results.iter().filter(|(o, _)| o.is_some()).count(),
        seconds,
        latencies,
    }
}

fn rss_mib() -> f64 {
    sd_server::metrics::resident_bytes().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64)
}

fn report(args: &Args, label: &str, batching: bool, concurrency: usize, r: &Run) {
    let per_minute = r.ok as f64 / r.seconds * 60.0;
    let (p50, p95, p99) = (
        percentile(&r.latencies, 50.0),
        percentile(&r.latencies, 95.0),
        percentile(&r.latencies, 99.0),
    );
    println!(
        "{label:<6} {:<8} {concurrency:>4} {:>6} {:>6} {:>4} {:>9.1} {:>8.2} {:>8.2} {:>8.2} {:>9.0}",
        if batching { "on" } else { "off" },
        r.ok,
        r.failed,
        r.lost,
        per_minute,
        p50,
        p95,
        p99,
        rss_mib()
    );
    if args.json {
        println!(
            "{}",
            json!({"run": label, "batching": batching, "concurrency": concurrency, "ok": r.ok,
                   "failed": r.failed, "lost": r.lost, "images_per_minute": per_minute,
                   "p50_s": p50, "p95_s": p95, "p99_s": p99, "rss_mib": rss_mib(),
                   "size": args.size, "steps": args.steps})
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    println!(
        "{}x{} pictures, {} steps, {} requests per cell (OpenAI API on 127.0.0.1)",
        args.size, args.size, args.steps, args.requests
    );
    println!(
        "{:<6} {:<8} {:>4} {:>6} {:>6} {:>4} {:>9} {:>8} {:>8} {:>8} {:>9}",
        "run",
        "batching",
        "conc",
        "ok",
        "failed",
        "lost",
        "img/min",
        "p50 s",
        "p95 s",
        "p99 s",
        "rss MiB"
    );
    let mut all_ok = true;
    for batching in [false, true] {
        let server = start(&args, if batching { args.max_batch } else { 1 }, 600);
        let base = server.url();
        let _ = run(&base, &args, 4, 2, 1_000_000); // warm-up: the model loads, kernels tune
        for &c in &args.concurrency {
            let r = run(&base, &args, args.requests, c, c * 10_000);
            all_ok &= r.failed == 0 && r.lost == 0;
            report(&args, "cell", batching, c, &r);
        }
        drop(server);
    }
    if args.long > 0 {
        let server = start(&args, args.max_batch, args.result_ttl);
        let base = server.url();
        let _ = run(
            &base,
            &args,
            2 * args.long_concurrency,
            args.long_concurrency,
            2_000_000,
        );
        let warm = rss_mib();
        // Four quarters back to back, resident memory after each.
        let quarter = args.long.div_ceil(4);
        let mut total = Run {
            ok: 0,
            failed: 0,
            lost: 0,
            seconds: 0.0,
            latencies: Vec::new(),
        };
        let mut rss = Vec::new();
        for q in 0..4 {
            let n = quarter.min(args.long - q * quarter);
            let r = run(
                &base,
                &args,
                n,
                args.long_concurrency,
                3_000_000 + q * quarter,
            );
            total.ok += r.ok;
            total.failed += r.failed;
            total.lost += r.lost;
            total.seconds += r.seconds;
            total.latencies.extend(r.latencies);
            rss.push(format!("{:.0}", rss_mib()));
        }
        total.latencies.sort_by(f64::total_cmp);
        report(&args, "long", true, args.long_concurrency, &total);
        println!(
            "long run: {} requests, {} ok, {} failed, {} lost; resident memory {warm:.0} MiB after warm-up, \
             {} MiB after each quarter (results kept {} s)",
            args.long,
            total.ok,
            total.failed,
            total.lost,
            rss.join(" / "),
            args.result_ttl
        );
        all_ok &= total.failed == 0 && total.lost == 0;
        drop(server);
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
