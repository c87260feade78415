//! The worker role (`sd-server worker --queue redis://...`): reads the streams of
//! the models it holds with `XREADGROUP`, claims the entries of workers gone
//! silent past the visibility timeout with `XAUTOCLAIM`, runs what it took in
//! batches of compatible jobs through the same code as the single server
//! (`worker::run_batch`), publishes progress, stores results once and
//! acknowledges. A heartbeat keeps its entries from being claimed while it lives
//! and carries cancels to its jobs; SIGTERM drains it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimOptions, StreamReadOptions, StreamReadReply};

use super::{
    DEAD_LETTERS, GROUP, Link, MODELS, ModelAdvert, RUNNING, events_channel, job_key, queue_key,
    scripts, worker_key,
};
use crate::Shared;
use crate::error::ApiError;
use crate::job::JobEvent;
use crate::queue::JobQueue;
use crate::store::JobHandle;
use crate::wire::{WireError, WireEvent, WireResult, WireSpec, unix_ms};

/// A job this worker holds: its stream entry and, once taken, its local handle.
#[derive(Debug, Clone)]
struct Held {
    model: String,
    entry: String,
    attempts: u32,
    job: Arc<JobHandle>,
}

/// One worker process's link to the shared queue.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    link: Link,
    blocking: Link,
    name: String,
    models: Vec<String>,
    held: Mutex<HashMap<String, Held>>,
    draining: AtomicBool,
    /// Whether its consumer groups were made (or found) in this Redis.
    grouped: AtomicBool,
}

/// The consumer name of this process: the configured one, else host and pid.
fn consumer_name(configured: Option<&String>) -> String {
    configured.cloned().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".into());
        format!("{host}-{}", std::process::id())
    })
}

impl Worker {
    /// A worker for `shared`'s models on `shared.config.queue`.
    ///
    /// # Errors
    /// A queue URL redis cannot parse.
    pub fn new(shared: Arc<Shared>) -> Result<Arc<Self>, String> {
        let url = shared.config.queue.clone();
        let link = Link::new(&url, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let blocking = Link::new(&url, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            name: consumer_name(shared.config.cluster.worker_name.as_ref()),
            models: shared.registry.names(),
            shared,
            link,
            blocking,
            held: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            grouped: AtomicBool::new(false),
        }))
    }

    /// The consumer name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs from a thread of its own with its own async runtime (programs that
    /// are not async, tests, benchmarks); [`RunningWorker::stop`] (or dropping
    /// it) drains it.
    ///
    /// # Errors
    /// The runtime or the thread cannot be made.
    pub fn spawn(self: Arc<Self>) -> std::io::Result<RunningWorker> {
        let runtime = tokio::runtime::Runtime::new()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("sd-cluster-{}", self.name))
            .spawn(move || {
                runtime.block_on(self.run(async {
                    let _ = stopped.await;
                }));
            })?;
        Ok(RunningWorker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs until `shutdown` resolves, then drains: the batches running finish,
    /// jobs taken but not started go back to their queues, nothing new is taken.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tracing::info!(worker = %self.name, models = ?self.models, "worker starting");
        let beat = tokio::spawn(self.clone().heartbeat());
        let slots: Vec<_> = (0..self.shared.config.workers)
            .map(|_| tokio::spawn(self.clone().slot()))
            .collect();
        shutdown.await;
        tracing::info!(worker = %self.name, "draining");
        self.draining.store(true, Ordering::SeqCst);
        for s in slots {
            let _ = s.await;
        }
        beat.abort();
        if let Ok(mut c) = self.link.get().await {
            let _: Result<(), _> = c.del(worker_key(&self.name)).await;
            for m in &self.models {
                let _: Result<(), _> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(queue_key(m))
                    .arg(GROUP)
                    .arg(&self.name)
                    .query_async(&mut c)
                    .await;
            }
        }
        tracing::info!(worker = %self.name, "drained");
    }

    /// Makes its models' streams and consumer groups where Redis has none (at the
    /// first heartbeat, and after a Redis that lost them answered `NOGROUP`).
    async fn make_groups(&self, c: &mut ConnectionManager) -> redis::RedisResult<()> {
        for name in &self.models {
            let made: redis::RedisResult<()> =
                c.xgroup_create_mkstream(queue_key(name), GROUP, "0").await;
            if let Err(e) = made
                && e.code() != Some("BUSYGROUP")
            {
                return Err(e);
            }
        }
        self.grouped.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Tells the API replicas what it serves and that it lives.
    async fn announce(&self, c: &mut ConnectionManager) -> redis::RedisResult<()> {
        let registry = &self.shared.registry;
        for name in &self.models {
            let Some(config) = registry.config(name) else {
                continue;
            };
            let advert = ModelAdvert {
                config,
                loras: registry.loras(name).into_keys().collect(),
            };
            let json = serde_json::to_string(&advert).unwrap_or_default();
            let _: () = c.hset(MODELS, name, json).await?;
        }
        let ttl = (self.shared.config.cluster.heartbeat_ms * 3)
            .div_ceil(1000)
            .max(2);
        let status = serde_json::json!({
            "models": self.models,
            "jobs": crate::lock(&self.held).keys().collect::<Vec<_>>(),
        });
        c.set_ex(worker_key(&self.name), status.to_string(), ttl)
            .await
    }

    /// Every heartbeat: the announcement (and the consumer groups, the first
    /// time), the held entries' idle times reset
    /// (`XCLAIM ... JUSTID` to itself), cancels and interrupts handed to the jobs.
    async fn heartbeat(self: Arc<Self>) {
        let period = Duration::from_millis(self.shared.config.cluster.heartbeat_ms);
        let mut tick = tokio::time::interval(period);
        let mut lora_scan = Instant::now();
        loop {
            tick.tick().await;
            if lora_scan.elapsed() >= Duration::from_secs(10) {
                lora_scan = Instant::now();
                self.shared.registry.refresh_loras();
            }
            if let Err(e) = self.beat().await {
                tracing::warn!(worker = %self.name, error = %e, "heartbeat failed");
            }
        }
    }

    async fn beat(&self) -> Result<(), String> {
        let mut c = self.link.get().await.map_err(|e| e.to_string())?;
        if !self.grouped.load(Ordering::SeqCst) {
            self.make_groups(&mut c).await.map_err(|e| e.to_string())?;
        }
        self.announce(&mut c).await.map_err(|e| e.to_string())?;
        let held: Vec<Held> = crate::lock(&self.held).values().cloned().collect();
        if held.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for h in &held {
            pipe.cmd("XCLAIM")
                .arg(queue_key(&h.model))
                .arg(GROUP)
                .arg(&self.name)
                .arg(0)
                .arg(&h.entry)
                .arg("JUSTID")
                .ignore();
            pipe.hget(job_key(&h.job.id), "cancel");
        }
        let flags: Vec<Option<String>> =
            pipe.query_async(&mut c).await.map_err(|e| e.to_string())?;
        for (h, flag) in held.iter().zip(flags) {
            match flag.as_deref() {
                Some("cancel") => h.job.request_cancel(),
                Some("interrupt") => h.job.request_interrupt(),
                _ => {}
            }
        }
        Ok(())
    }

    /// One generation slot: take, run, commit, until draining.
    async fn slot(self: Arc<Self>) {
        let mut wait = Duration::from_millis(100);
        let mut last_claim = Instant::now() - Duration::from_secs(3600);
        while !self.draining.load(Ordering::SeqCst) {
            let visibility = self.shared.config.cluster.visibility_timeout_secs;
            let claim = last_claim.elapsed() >= Duration::from_millis(visibility * 500);
            if claim {
                last_claim = Instant::now();
            }
            let entries = match self.fetch(claim).await {
                Ok(e) => {
                    wait = Duration::from_millis(100);
                    e
                }
                Err(e) => {
                    tracing::warn!(worker = %self.name, error = %e, "reading the queue failed");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let mut taken = Vec::new();
            for (model, entry, id) in entries {
                match self.take(&model, &entry, &id).await {
                    Ok(Some(h)) => taken.push(h),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(job = %id, error = %e, "taking a job failed"),
                }
            }
            if !taken.is_empty() {
                self.run_taken(taken).await;
            }
        }
    }

    /// New entries of its models' streams, or (`claim`) entries other workers
    /// left past the visibility timeout: `(model, entry, job id)`.
    async fn fetch(&self, claim: bool) -> Result<Vec<(String, String, String)>, String> {
        let max = self.shared.config.max_batch;
        if claim {
            let mut c = self.link.get().await.map_err(|e| e.to_string())?;
            let idle = self.shared.config.cluster.visibility_timeout_secs * 1000;
            let mut out = Vec::new();
            for model in &self.models {
                let reply: redis::RedisResult<redis::streams::StreamAutoClaimReply> = c
                    .xautoclaim_options(
                        queue_key(model),
                        GROUP,
                        &self.name,
                        idle,
                        "0-0",
                        StreamAutoClaimOptions::default().count(max),
                    )
                    .await;
                match reply {
                    Ok(r) => {
                        for e in r.claimed {
                            if let Some(id) = e.get::<String>("job") {
                                tracing::warn!(job = %id, entry = %e.id, "claimed from a silent worker");
                                out.push((model.clone(), e.id.clone(), id));
                            }
                        }
                    }
                    Err(e) if e.code() == Some("NOGROUP") => self.regroup().await?,
                    Err(e) => return Err(e.to_string()),
                }
                forget_gone_consumers(&mut c, model, &self.name).await;
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
        let mut c = self.blocking.get().await.map_err(|e| e.to_string())?;
        let keys: Vec<String> = self.models.iter().map(|m| queue_key(m)).collect();
        let ids: Vec<&str> = keys.iter().map(|_| ">").collect();
        let options = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(max)
            .block(1000);
        let reply: redis::RedisResult<Option<StreamReadReply>> =
            c.xread_options(&keys, &ids, &options).await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                self.regroup().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut out = Vec::new();
        for stream in reply.map(|r| r.keys).unwrap_or_default() {
            let model = stream.key.trim_start_matches("sd:q:").to_string();
            for e in stream.ids {
                if let Some(id) = e.get::<String>("job") {
                    out.push((model.clone(), e.id.clone(), id));
                }
            }
        }
        Ok(out)
    }

    /// Makes the consumer groups again (a Redis that lost them).
    async fn regroup(&self) -> Result<(), String> {
        let mut c = self.link.get().await.map_err(|e| e.to_string())?;
        self.make_groups(&mut c).await.map_err(|e| e.to_string())?;
        self.announce(&mut c).await.map_err(|e| e.to_string())
    }

    /// Takes a delivered entry ([`scripts::TAKE`]): the job to run, or `None` when
    /// it is not to run (over, cancelled, spent: then dead-lettered here).
    async fn take(&self, model: &str, entry: &str, id: &str) -> Result<Option<Held>, String> {
        let mut c = self.link.get().await.map_err(|e| e.to_string())?;
        let config = &self.shared.config;
        let reply: Vec<String> = scripts::TAKE
            .key(job_key(id))
            .key(queue_key(model))
            .key(RUNNING)
            .arg(entry)
            .arg(GROUP)
            .arg(&self.name)
            .arg(unix_ms())
            .arg(config.cluster.max_attempts)
            .arg(id)
            .arg(config.result_ttl_secs)
            .arg(events_channel(id))
            .arg(super::api::cancelled_json())
            .invoke_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        let field = |i: usize| reply.get(i).cloned().unwrap_or_default();
        match reply.first().map(String::as_str) {
            Some("run") => {
                let attempts = field(2).parse().unwrap_or(1);
                let created: u64 = field(3).parse().unwrap_or(0);
                let waited = unix_ms().saturating_sub(created) as f64 / 1000.0;
                crate::metrics::job_wait(model, waited);
                let spec = serde_json::from_str::<WireSpec>(&field(1))
                    .map_err(|e| e.to_string())
                    .and_then(WireSpec::into_spec);
                let spec = match spec {
                    Ok(s) => s,
                    Err(e) => {
                        let error = ApiError::Internal(format!("unreadable job: {e}"));
                        self.finish(model, entry, id, &Err(error), Some(attempts))
                            .await?;
                        return Ok(None);
                    }
                };
                let job = JobHandle::with_id(id.to_string(), spec, SystemTime::now());
                let held = Held {
                    model: model.to_string(),
                    entry: entry.to_string(),
                    attempts,
                    job,
                };
                crate::lock(&self.held).insert(id.to_string(), held.clone());
                Ok(Some(held))
            }
            Some("dead") => {
                let attempts: u32 = field(1).parse().unwrap_or(0);
                let last = field(2);
                let error = ApiError::Internal(format!(
                    "gave up after {attempts} attempts; the last: {}",
                    if last.is_empty() {
                        "its worker stopped answering"
                    } else {
                        &last
                    }
                ));
                tracing::error!(job = %id, %error, "dead-lettered");
                self.finish(model, entry, id, &Err(error), Some(attempts))
                    .await?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Runs the jobs taken in one read, in batches of compatible ones.
    async fn run_taken(&self, taken: Vec<Held>) {
        let by_id: HashMap<String, Held> = taken
            .iter()
            .map(|h| (h.job.id.clone(), h.clone()))
            .collect();
        let local = JobQueue::new(usize::MAX);
        for h in &taken {
            let _ = local.push(h.job.clone());
        }
        local.close();
        while let Some(batch) = local.pop_batch(self.shared.config.max_batch) {
            if self.draining.load(Ordering::SeqCst) {
                for job in batch.iter().chain(local.drain().iter()) {
                    self.release(&by_id[&job.id]).await;
                }
                break;
            }
            let forwarders: Vec<_> = batch
                .iter()
                .map(|job| tokio::spawn(forward(self.link.clone(), job.clone(), job.subscribe())))
                .collect();
            let shared = self.shared.clone();
            let jobs = batch.clone();
            let ran =
                tokio::task::spawn_blocking(move || crate::worker::run_batch(&shared, jobs)).await;
            if let Err(e) = ran {
                tracing::error!(error = %e, "a batch panicked");
            }
            for f in forwarders {
                f.abort();
            }
            for job in &batch {
                self.commit(&by_id[&job.id]).await;
            }
        }
    }

    /// Stores a finished job's result (or queues it again after a failure that
    /// may pass), retrying while Redis is away; gives up (the entry is then
    /// claimed by another worker) only when draining.
    async fn commit(&self, h: &Held) {
        let result = h
            .job
            .result()
            .unwrap_or_else(|| Err(ApiError::Internal("the generation thread panicked".into())));
        let retry = match &result {
            Err(ApiError::Cancelled | ApiError::Deadline(_)) | Ok(_) => false,
            Err(_) => h.attempts < self.shared.config.cluster.max_attempts,
        };
        let mut wait = Duration::from_millis(100);
        loop {
            let done = if retry {
                self.requeue(h, &result).await
            } else {
                self.finish(&h.model, &h.entry, &h.job.id, &result, Some(h.attempts))
                    .await
                    .map(|_| ())
            };
            match done {
                Ok(()) => break,
                Err(e) if self.draining.load(Ordering::SeqCst) && wait > Duration::from_secs(4) => {
                    tracing::error!(job = %h.job.id, error = %e, "result not stored; another worker will run the job");
                    break;
                }
                Err(e) => {
                    tracing::warn!(job = %h.job.id, error = %e, "storing the result failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        crate::lock(&self.held).remove(&h.job.id);
    }

    /// [`scripts::FINISH`]: whether this result was the one written. A failure with
    /// its attempts spent also goes to the dead-letter stream.
    async fn finish(
        &self,
        model: &str,
        entry: &str,
        id: &str,
        result: &crate::store::JobResult,
        attempts: Option<u32>,
    ) -> Result<bool, String> {
        let mut c = self.link.get().await.map_err(|e| e.to_string())?;
        let wire = WireResult::from(result);
        let dead = match (&wire, result) {
            (WireResult::Error(WireError::Cancelled | WireError::Deadline { .. }), _) => {
                String::new()
            }
            (WireResult::Error(_), Err(e)) => e.to_string(),
            _ => String::new(),
        };
        let state = match wire.state() {
            crate::JobState::Succeeded => "succeeded",
            crate::JobState::Cancelled => "cancelled",
            _ => "failed",
        };
        let json = serde_json::to_string(&wire).map_err(|e| e.to_string())?;
        let written: i64 = scripts::FINISH
            .key(job_key(id))
            .key(queue_key(model))
            .key(RUNNING)
            .key(DEAD_LETTERS)
            .arg(entry)
            .arg(GROUP)
            .arg(json)
            .arg(state)
            .arg(self.shared.config.result_ttl_secs)
            .arg(unix_ms())
            .arg(id)
            .arg(events_channel(id))
            .arg(&dead)
            .arg(model)
            .arg(attempts.unwrap_or(0))
            .invoke_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        if written == 0 {
            crate::metrics::duplicate_result();
            tracing::warn!(job = %id, "result already stored (the job ran twice); this one dropped");
        }
        Ok(written == 1)
    }

    /// [`scripts::REQUEUE`] after a failed attempt.
    async fn requeue(&self, h: &Held, result: &crate::store::JobResult) -> Result<(), String> {
        let error = match result {
            Err(e) => e.to_string(),
            Ok(_) => String::new(),
        };
        tracing::warn!(job = %h.job.id, attempt = h.attempts, %error, "attempt failed; queued again");
        self.requeue_with(h, &error).await
    }

    /// Puts a job taken but not started back (draining), its attempt not counted.
    async fn release(&self, h: &Held) {
        if let Err(e) = self.requeue_with(h, "").await {
            tracing::warn!(job = %h.job.id, error = %e, "release failed; the job will be claimed");
        }
        crate::lock(&self.held).remove(&h.job.id);
    }

    async fn requeue_with(&self, h: &Held, error: &str) -> Result<(), String> {
        let mut c = self.link.get().await.map_err(|e| e.to_string())?;
        let _: i64 = scripts::REQUEUE
            .key(job_key(&h.job.id))
            .key(queue_key(&h.model))
            .key(RUNNING)
            .arg(&h.entry)
            .arg(GROUP)
            .arg(error)
            .arg(&h.job.id)
            .invoke_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Consumers of `model`'s group that hold nothing and were last seen an hour ago
/// (workers that died, their jobs since claimed) leave the group.
async fn forget_gone_consumers(c: &mut ConnectionManager, model: &str, me: &str) {
    const GONE_MS: usize = 3_600_000;
    let consumers: redis::RedisResult<redis::streams::StreamInfoConsumersReply> =
        c.xinfo_consumers(queue_key(model), GROUP).await;
    for gone in consumers
        .map(|r| r.consumers)
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.name != me && k.pending == 0 && k.idle > GONE_MS)
    {
        let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(queue_key(model))
            .arg(GROUP)
            .arg(&gone.name)
            .query_async(c)
            .await;
    }
}

/// A worker running on its own thread ([`Worker::spawn`]).
#[derive(Debug)]
pub struct RunningWorker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningWorker {
    /// Drains the worker (running batches finish, taken jobs go back) and waits
    /// for it.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Publishes a running job's progress ([`scripts::PROGRESS`]) until it ends.
async fn forward(
    link: Link,
    job: Arc<JobHandle>,
    mut rx: tokio::sync::broadcast::Receiver<JobEvent>,
) {
    let (mut step, mut total, mut batch) = (0, job.spec.steps, 1);
    while let Ok(event) = rx.recv().await {
        let mut preview = String::new();
        match &event {
            JobEvent::Started { batch: b } => batch = *b,
            JobEvent::Step { step: s, total: t } => (step, total) = (*s, *t),
            JobEvent::Preview { png, .. } => preview = crate::api::b64(png),
            JobEvent::Done(_) => break,
            JobEvent::Queued { .. } => continue,
        }
        let Some(wire) = WireEvent::of(&event) else {
            continue;
        };
        let Ok(mut c) = link.get().await else {
            continue;
        };
        let json = serde_json::to_string(&wire).unwrap_or_default();
        let sent: redis::RedisResult<i64> = scripts::PROGRESS
            .key(job_key(&job.id))
            .arg(step)
            .arg(total)
            .arg(batch)
            .arg(preview)
            .arg(events_channel(&job.id))
            .arg(json)
            .arg(unix_ms())
            .invoke_async(&mut c)
            .await;
        if let Err(e) = sent {
            tracing::debug!(job = %job.id, error = %e, "progress not published");
        }
    }
}
