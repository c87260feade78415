//! The API replica's side of the shared queue: [`RedisQueue`] puts checked jobs
//! in their model's stream and keeps a local mirror ([`JobHandle`]) of every job
//! a client of this replica follows, fed by the jobs' event channels and, as a
//! safety net for events missed while Redis was away, by polling the jobs'
//! hashes. The handlers see the same handles as with the in-process queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;

use super::{GROUP, Link, MODELS, events_channel, idempotency_key, job_key, queue_key, scripts};
use crate::Shared;
use crate::error::{ApiError, ConfigError};
use crate::job::{JobSpec, JobState};
use crate::store::{JobHandle, JobResult, new_id};
use crate::wire::{WireError, WireEvent, WireResult, WireSpec, unix_ms};

/// How long an idempotency key names its job.
const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;

/// The result JSON of a job cancelled before it ran.
pub fn cancelled_json() -> String {
    serde_json::to_string(&WireResult::Error(WireError::Cancelled)).unwrap_or_default()
}

/// Jobs through Redis, as an API replica sees them.
#[derive(Debug)]
pub struct RedisQueue {
    link: Link,
    capacity: usize,
    result_ttl: u64,
    queued: AtomicUsize,
    reachable: AtomicBool,
}

fn state_of(name: &str) -> Option<JobState> {
    Some(match name {
        // Held by a worker, its batch not started yet.
        "queued" | "taken" => JobState::Queued,
        "running" => JobState::Running,
        "succeeded" => JobState::Succeeded,
        "failed" => JobState::Failed,
        "cancelled" => JobState::Cancelled,
        _ => return None,
    })
}

fn parse<T: std::str::FromStr>(v: Option<&String>) -> Option<T> {
    v.and_then(|s| s.parse().ok())
}

impl RedisQueue {
    /// The queue at `url` (connected on first use).
    ///
    /// # Errors
    /// A URL redis cannot parse.
    pub fn new(url: &str, capacity: usize, result_ttl: u64) -> Result<Self, ConfigError> {
        let link = Link::new(url, Duration::from_secs(3)).map_err(|e| ConfigError::Invalid {
            key: "queue".into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            link,
            capacity,
            result_ttl,
            queued: AtomicUsize::new(0),
            reachable: AtomicBool::new(false),
        })
    }

    async fn conn(&self) -> Result<ConnectionManager, ApiError> {
        self.link.get().await
    }

    /// Queues a job (or, for an idempotency key already used, finds its job);
    /// the mirror of the job and whether it is new.
    ///
    /// # Errors
    /// 503 while Redis is unreachable (nothing was queued), 429 when the model's
    /// stream is full.
    pub async fn submit(
        &self,
        spec: JobSpec,
        idempotency: Option<&str>,
    ) -> Result<(Arc<JobHandle>, bool), ApiError> {
        let mut c = self.conn().await?;
        let id = new_id();
        let wire = serde_json::to_string(&WireSpec::from(&spec))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let reply: Vec<String> = scripts::SUBMIT
            .key(job_key(&id))
            .key(queue_key(&spec.model))
            .key(idempotency_key(idempotency.unwrap_or("")))
            .arg(&id)
            .arg(wire)
            .arg(&spec.model)
            .arg(&spec.client)
            .arg(unix_ms())
            .arg(self.capacity)
            .arg(IDEMPOTENCY_TTL_SECS)
            .arg(if idempotency.is_some() { "1" } else { "0" })
            .invoke_async(&mut c)
            .await
            .map_err(|e| super::unavailable(&e))?;
        match reply.first().map(String::as_str) {
            Some("new") => {
                let ahead: usize = parse(reply.get(2)).unwrap_or(0);
                let job = JobHandle::with_id(id, spec, SystemTime::now());
                job.set_position(Some(ahead));
                Ok((job, true))
            }
            Some("existing") => {
                let id = reply.get(1).cloned().unwrap_or_default();
                let job = self.lookup(&id).await?.ok_or_else(|| {
                    ApiError::Internal(format!("idempotency key names job {id}, now gone"))
                })?;
                Ok((job, false))
            }
            Some("full") => {
                let len: u64 = parse(reply.get(1)).unwrap_or(0);
                Err(ApiError::QueueFull {
                    model: spec.model,
                    retry_after: Duration::from_secs(2 + len / 4),
                })
            }
            _ => Err(ApiError::Internal(format!("unexpected reply {reply:?}"))),
        }
    }

    /// A mirror of the job `id` as Redis has it; `None` when there is no such job.
    ///
    /// # Errors
    /// 503 while Redis is unreachable; a spec that does not read back.
    pub async fn lookup(&self, id: &str) -> Result<Option<Arc<JobHandle>>, ApiError> {
        if !crate::validate::is_plain_name(id) {
            return Ok(None);
        }
        let mut c = self.conn().await?;
        let fields: HashMap<String, String> = c
            .hgetall(job_key(id))
            .await
            .map_err(|e| super::unavailable(&e))?;
        let Some(spec) = fields.get("spec") else {
            return Ok(None);
        };
        let spec: WireSpec =
            serde_json::from_str(spec).map_err(|e| ApiError::Internal(e.to_string()))?;
        let spec = spec.into_spec().map_err(ApiError::Internal)?;
        let created = UNIX_EPOCH + Duration::from_millis(parse(fields.get("created")).unwrap_or(0));
        let job = JobHandle::with_id(id.to_string(), spec, created);
        apply(&job, &fields);
        if let Some(p) = fields.get("preview")
            && let Ok(png) = base64_decode(p)
        {
            job.set_preview(parse(fields.get("step")).unwrap_or(0), png);
        }
        Ok(Some(job))
    }

    /// Asks the job to stop (`interrupt`: with its pictures so far).
    pub async fn cancel(&self, job: &JobHandle, interrupt: bool) -> Result<(), ApiError> {
        let mut c = self.conn().await?;
        let outcome: String = scripts::CANCEL
            .key(job_key(&job.id))
            .key(queue_key(&job.spec.model))
            .arg(if interrupt { "interrupt" } else { "cancel" })
            .arg(unix_ms())
            .arg(self.result_ttl)
            .arg(events_channel(&job.id))
            .arg(cancelled_json())
            .invoke_async(&mut c)
            .await
            .map_err(|e| super::unavailable(&e))?;
        if outcome == "cancelled" {
            job.finish(Err(ApiError::Cancelled));
        }
        Ok(())
    }

    /// Jobs waiting or running, all models (as last polled).
    pub fn total(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether Redis answered the last poll.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Keeps this replica's mirrors and model list up to date, forever: the event
    /// channels as they come, the hashes, queue positions and models every
    /// `period`.
    pub async fn follow(shared: Arc<Shared>, period: Duration) {
        let listener = tokio::spawn(listen(shared.clone()));
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let Some(q) = shared.cluster.as_ref() else {
                break;
            };
            let ok = q.poll(&shared).await;
            if ok.is_ok() != q.reachable() {
                match &ok {
                    Ok(()) => tracing::info!("the job queue (Redis) answers"),
                    Err(e) => tracing::warn!(error = %e, "the job queue (Redis) is unreachable"),
                }
            }
            q.reachable.store(ok.is_ok(), Ordering::Relaxed);
        }
        listener.abort();
    }

    async fn poll(&self, shared: &Shared) -> Result<(), ApiError> {
        let mut c = self.conn().await?;
        let redis_err = |e: redis::RedisError| super::unavailable(&e);
        let catalog: BTreeMap<String, String> = c.hgetall(MODELS).await.map_err(redis_err)?;
        let (configs, loras) = super::parse_catalog(catalog);
        let names: Vec<String> = configs.iter().map(|m| m.name.clone()).collect();
        let registry = &shared.registry;
        if registry.names() != names {
            tracing::info!(models = ?names, "models announced by the workers");
        }
        registry.set_catalog(configs, loras);
        let mut queued = 0;
        for name in &names {
            let len: usize = c.xlen(queue_key(name)).await.map_err(redis_err)?;
            crate::metrics::queue_depth(name, len);
            queued += len;
        }
        self.queued.store(queued, Ordering::Relaxed);
        let active = shared.store.active();
        if active.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for job in &active {
            pipe.cmd("HMGET").arg(job_key(&job.id)).arg(&FOLLOWED);
        }
        let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut c).await.map_err(redis_err)?;
        let mut entries: BTreeMap<String, Vec<(Arc<JobHandle>, String)>> = BTreeMap::new();
        for (job, row) in active.iter().zip(rows) {
            let fields = followed_fields(row);
            if fields.is_empty() {
                job.finish(Err(ApiError::Internal(
                    "the job is gone from the queue".into(),
                )));
                continue;
            }
            apply(job, &fields);
            if job.state() == JobState::Queued
                && let Some(entry) = fields.get("entry")
            {
                entries
                    .entry(job.spec.model.clone())
                    .or_default()
                    .push((job.clone(), entry.clone()));
            }
        }
        for (model, jobs) in entries {
            positions(&mut c, &model, &jobs).await.map_err(redis_err)?;
        }
        Ok(())
    }
}

/// Notes the positions of `jobs` (mirrors with their entries) in `model`'s stream:
/// the entries not yet delivered to a worker ahead of theirs.
async fn positions(
    c: &mut ConnectionManager,
    model: &str,
    jobs: &[(Arc<JobHandle>, String)],
) -> Result<(), redis::RedisError> {
    let key = queue_key(model);
    let groups: redis::streams::StreamInfoGroupsReply =
        c.xinfo_groups(&key).await.unwrap_or_default();
    let delivered = groups
        .groups
        .iter()
        .find(|g| g.name == GROUP)
        .map_or_else(|| "0-0".to_string(), |g| g.last_delivered_id.clone());
    let waiting: redis::streams::StreamRangeReply = c
        .xrange_count(&key, format!("({delivered}"), "+", 10_000)
        .await?;
    let index: HashMap<&str, usize> = waiting
        .ids
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i))
        .collect();
    for (job, entry) in jobs {
        job.set_position(index.get(entry.as_str()).copied());
    }
    Ok(())
}

fn base64_decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text)
}

/// The fields of a job's hash a mirror follows (not the spec, not the preview).
const FOLLOWED: [&str; 6] = ["state", "step", "total", "batch", "entry", "result"];

/// An `HMGET` of [`FOLLOWED`] as a map of the fields present.
fn followed_fields(row: Vec<Option<String>>) -> HashMap<String, String> {
    FOLLOWED
        .iter()
        .zip(row)
        .filter_map(|(k, v)| Some(((*k).to_string(), v?)))
        .collect()
}

/// Brings a mirror up to a job's hash fields (state, step, total, batch, result).
fn apply(job: &JobHandle, fields: &HashMap<String, String>) {
    let Some(state) = fields.get("state").and_then(|s| state_of(s)) else {
        return;
    };
    let step: usize = parse(fields.get("step")).unwrap_or(0);
    let total: usize = parse(fields.get("total")).unwrap_or(job.spec.steps);
    let batch: usize = parse(fields.get("batch")).unwrap_or(1);
    if state != JobState::Queued && job.state() == JobState::Queued {
        job.start(total, batch);
    }
    if state == JobState::Running && step > job.progress().step {
        job.step(step, total, None);
    }
    if state.is_final() && !job.state().is_final() {
        let result: JobResult = match fields
            .get("result")
            .map(|r| serde_json::from_str::<WireResult>(r))
        {
            Some(Ok(r)) => r.into(),
            Some(Err(e)) => Err(ApiError::Internal(format!("unreadable result: {e}"))),
            None => Err(ApiError::Internal("a job ended without a result".into())),
        };
        job.finish(result);
    }
}

/// The event channels of every job, handed to this replica's mirrors; on a lost
/// connection, subscribes again (with backoff) and polls once to catch up.
async fn listen(shared: Arc<Shared>) {
    let Some(q) = shared.cluster.clone() else {
        return;
    };
    let mut wait = Duration::from_millis(100);
    loop {
        match q.link.pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.psubscribe(super::EVENTS_PATTERN).await.is_ok() {
                    wait = Duration::from_millis(100);
                    let _ = q.poll(&shared).await;
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let id = msg.get_channel_name().trim_start_matches("sd:ev:");
                        let Some(job) = shared.store.get(id) else {
                            continue;
                        };
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        dispatch(&q, &job, &payload).await;
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "event channels unreachable"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

async fn dispatch(q: &RedisQueue, job: &Arc<JobHandle>, payload: &str) {
    let Ok(event) = serde_json::from_str::<WireEvent>(payload) else {
        return;
    };
    match event {
        WireEvent::Started { batch } => {
            if job.state() == JobState::Queued {
                job.start(job.spec.steps, batch);
            }
        }
        WireEvent::Step { step, total } => {
            if job.state() == JobState::Queued {
                job.start(total, 1);
            }
            if !job.state().is_final() {
                job.step(step, total, None);
            }
        }
        WireEvent::Preview { step, png } => job.set_preview(step, png),
        WireEvent::Done => {
            let Ok(mut c) = q.conn().await else {
                return;
            };
            let row: Result<Vec<Option<String>>, _> = redis::cmd("HMGET")
                .arg(job_key(&job.id))
                .arg(&FOLLOWED)
                .query_async(&mut c)
                .await;
            if let Ok(row) = row {
                apply(job, &followed_fields(row));
            }
        }
    }
}
