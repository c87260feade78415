//! Prometheus metrics: the recorder installed once per process, and the server's
//! metric names in one place.

use std::sync::OnceLock;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process; later calls reuse it) and
/// returns its handle, `None` when another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("sd_batch_size".into()),
                    &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("sd_queue_depth", "Jobs waiting, per model");
    describe_histogram!(
        "sd_job_latency_seconds",
        "Submission to result, per model and task"
    );
    describe_histogram!(
        "sd_job_run_seconds",
        "Generation time of a batch, per model"
    );
    describe_gauge!(
        "sd_steps_per_second",
        "Denoising steps per second of the last batch, per model"
    );
    describe_counter!("sd_steps_total", "Denoising steps run");
    describe_counter!("sd_images_total", "Images generated, per model");
    describe_counter!("sd_errors_total", "Requests and jobs that failed, by kind");
    describe_histogram!("sd_batch_size", "Jobs per U-Net batch");
    describe_gauge!(
        "sd_resident_memory_bytes",
        "Resident memory of the server process"
    );
    describe_gauge!("sd_models_loaded", "Models loaded");
    describe_counter!(
        "sd_duplicate_results_total",
        "Results of jobs run twice (a worker taken for dead) that were dropped because the first was stored"
    );
    describe_histogram!(
        "sd_job_wait_seconds",
        "Submission to the start of generation, per model"
    );
}

/// A result dropped because the job's first result was already stored.
pub fn duplicate_result() {
    counter!("sd_duplicate_results_total").increment(1);
}

/// A job started `seconds` after it was submitted.
pub fn job_wait(model: &str, seconds: f64) {
    histogram!("sd_job_wait_seconds", "model" => model.to_string()).record(seconds);
}

/// The text exposition, with the resident memory read now.
pub fn render() -> String {
    if let Some(bytes) = resident_bytes() {
        gauge!("sd_resident_memory_bytes").set(bytes as f64);
    }
    install().map(|h| h.render()).unwrap_or_default()
}

/// The process's resident memory (Linux: `/proc/self/status`).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub(crate) fn queue_depth(model: &str, depth: usize) {
    gauge!("sd_queue_depth", "model" => model.to_string()).set(depth as f64);
}

pub(crate) fn error(kind: &'static str) {
    counter!("sd_errors_total", "kind" => kind).increment(1);
}

pub(crate) fn models_loaded(n: usize) {
    gauge!("sd_models_loaded").set(n as f64);
}

pub(crate) fn batch(model: &str, jobs: usize, steps: usize, seconds: f64) {
    histogram!("sd_batch_size").record(jobs as f64);
    histogram!("sd_job_run_seconds", "model" => model.to_string()).record(seconds);
    counter!("sd_steps_total").increment(steps as u64);
    if seconds > 0.0 {
        gauge!("sd_steps_per_second", "model" => model.to_string()).set(steps as f64 / seconds);
    }
}

pub(crate) fn job_done(model: &str, task: &'static str, images: usize, seconds: f64) {
    counter!("sd_images_total", "model" => model.to_string()).increment(images as u64);
    histogram!("sd_job_latency_seconds", "model" => model.to_string(), "task" => task)
        .record(seconds);
}
