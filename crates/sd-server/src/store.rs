//! The jobs the server knows: [`JobHandle`] (state, events, result, cancel flag)
//! and [`JobStore`] (by id, finished ones kept for a while).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, watch};

use crate::error::ApiError;
use crate::job::{JobEvent, JobImage, JobProgress, JobSpec, JobState};
use crate::lock;

/// What a finished job holds.
pub type JobResult = Result<Arc<Vec<JobImage>>, ApiError>;

#[derive(Debug)]
struct Inner {
    batch: usize,
    step: usize,
    total: usize,
    started: Option<Instant>,
    finished: Option<Instant>,
    preview: Option<Vec<u8>>,
    result: Option<JobResult>,
}

/// One job: its spec, its state and its watchers.
#[derive(Debug)]
pub struct JobHandle {
    /// The id clients use.
    pub id: String,
    /// What to generate.
    pub spec: JobSpec,
    /// When it was submitted.
    pub created: SystemTime,
    /// When it was submitted, for latencies.
    pub submitted: Instant,
    cancel: AtomicBool,
    interrupt: AtomicBool,
    /// Its place in a shared (Redis) queue as last seen; `usize::MAX`: unknown.
    position: AtomicUsize,
    partial: Mutex<Option<Vec<JobImage>>>,
    inner: Mutex<Inner>,
    state: watch::Sender<JobState>,
    events: broadcast::Sender<JobEvent>,
}

impl JobHandle {
    /// A queued job.
    pub fn new(spec: JobSpec) -> Arc<Self> {
        Self::with_id(new_id(), spec, SystemTime::now())
    }

    /// A queued job with a given id and submission time (a job of a shared queue,
    /// as this process sees it).
    pub fn with_id(id: String, spec: JobSpec, created: SystemTime) -> Arc<Self> {
        Arc::new(Self {
            id,
            spec,
            created,
            submitted: Instant::now(),
            cancel: AtomicBool::new(false),
            interrupt: AtomicBool::new(false),
            position: AtomicUsize::new(usize::MAX),
            partial: Mutex::new(None),
            inner: Mutex::new(Inner {
                batch: 0,
                step: 0,
                total: 0,
                started: None,
                finished: None,
                preview: None,
                result: None,
            }),
            state: watch::channel(JobState::Queued).0,
            events: broadcast::channel(256).0,
        })
    }

    /// The current state.
    pub fn state(&self) -> JobState {
        *self.state.borrow()
    }

    /// Watches the state.
    pub fn watch_state(&self) -> watch::Receiver<JobState> {
        self.state.subscribe()
    }

    /// Receives the events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// Tells the watchers (none listening is fine).
    pub fn emit(&self, event: JobEvent) {
        let _ = self.events.send(event);
    }

    /// Asks the job to stop: a queued job is dropped by its worker, a running one
    /// stops after its current step.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// Whether a cancel was asked for.
    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Asks a running job to stop after its current step and answer with the
    /// pictures of its latents so far (AUTOMATIC1111's interrupt).
    pub fn request_interrupt(&self) {
        self.interrupt.store(true, Ordering::SeqCst);
    }

    /// Whether an interrupt was asked for.
    pub fn interrupt_requested(&self) -> bool {
        self.interrupt.load(Ordering::SeqCst)
    }

    /// Notes its place in a shared queue (`None`: unknown).
    pub fn set_position(&self, position: Option<usize>) {
        self.position
            .store(position.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    /// Its place in a shared queue as last noted.
    pub fn noted_position(&self) -> Option<usize> {
        let p = self.position.load(Ordering::Relaxed);
        (p != usize::MAX).then_some(p)
    }

    /// Keeps the pictures an interrupted job answers with.
    pub fn set_partial(&self, images: Vec<JobImage>) {
        *lock(&self.partial) = Some(images);
    }

    /// The pictures of an interrupted job, once.
    pub fn take_partial(&self) -> Option<Vec<JobImage>> {
        lock(&self.partial).take()
    }

    /// Whether the deadline has passed.
    pub fn past_deadline(&self) -> bool {
        self.spec.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Marks the job running with `total` steps.
    pub fn start(&self, total: usize, batch: usize) {
        {
            let mut i = lock(&self.inner);
            i.started = Some(Instant::now());
            i.total = total;
            i.batch = batch;
        }
        self.state.send_replace(JobState::Running);
        self.emit(JobEvent::Started { batch });
    }

    /// Records a step (and its preview).
    pub fn step(&self, step: usize, total: usize, preview: Option<Vec<u8>>) {
        {
            let mut i = lock(&self.inner);
            i.step = step;
            i.total = total;
            if let Some(p) = &preview {
                i.preview = Some(p.clone());
            }
        }
        self.emit(JobEvent::Step { step, total });
        if let Some(png) = preview {
            self.emit(JobEvent::Preview { step, png });
        }
    }

    /// Records a preview made elsewhere (a worker of a shared queue).
    pub fn set_preview(&self, step: usize, png: Vec<u8>) {
        lock(&self.inner).preview = Some(png.clone());
        self.emit(JobEvent::Preview { step, png });
    }

    /// Ends the job with its result; a job already over stays as it was (a result
    /// is written once).
    pub fn finish(&self, result: JobResult) -> bool {
        let state = match &result {
            Ok(_) => JobState::Succeeded,
            Err(ApiError::Cancelled) => JobState::Cancelled,
            Err(_) => JobState::Failed,
        };
        {
            let mut i = lock(&self.inner);
            if i.result.is_some() {
                return false;
            }
            i.result = Some(result);
            i.finished = Some(Instant::now());
        }
        self.state.send_replace(state);
        self.emit(JobEvent::Done(state));
        true
    }

    /// The result, once over.
    pub fn result(&self) -> Option<JobResult> {
        lock(&self.inner).result.clone()
    }

    /// Seconds from submission to the end, once over.
    pub fn latency(&self) -> Option<Duration> {
        lock(&self.inner).finished.map(|f| f - self.submitted)
    }

    /// A snapshot for status queries.
    pub fn progress(&self) -> JobProgress {
        let i = lock(&self.inner);
        JobProgress {
            state: self.state(),
            batch: i.batch,
            step: i.step,
            total: i.total,
            created: self.created,
            running_for: i
                .started
                .map(|s| i.finished.unwrap_or_else(Instant::now) - s),
            preview: i.preview.clone(),
        }
    }

    /// Waits until the job is over and returns its result.
    pub async fn wait(&self) -> JobResult {
        let mut rx = self.watch_state();
        // The sender lives as long as the handle, so this ends when the state is final.
        let _ = rx.wait_for(|s| s.is_final()).await;
        self.result()
            .unwrap_or_else(|| Err(ApiError::Internal("job ended without a result".into())))
    }

    fn expired(&self, ttl: Duration) -> bool {
        lock(&self.inner)
            .finished
            .is_some_and(|f| f.elapsed() > ttl)
    }
}

/// A random 128-bit job id, hex.
pub fn new_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Every job by id; finished jobs are forgotten `ttl` after they end.
#[derive(Debug)]
pub struct JobStore {
    jobs: Mutex<HashMap<String, Arc<JobHandle>>>,
    /// Idempotency keys -> job ids.
    keys: Mutex<HashMap<String, String>>,
    current: Mutex<Option<Arc<JobHandle>>>,
    ttl: Duration,
}

impl JobStore {
    /// An empty store keeping results for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            jobs: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
            current: Mutex::new(None),
            ttl,
        }
    }

    /// Adds a job, under an idempotency key if given (and forgets expired jobs
    /// and their keys).
    pub fn insert(&self, job: Arc<JobHandle>, idempotency: Option<&str>) {
        let mut jobs = lock(&self.jobs);
        let ttl = self.ttl;
        jobs.retain(|_, j| !j.expired(ttl));
        let mut keys = lock(&self.keys);
        keys.retain(|_, id| jobs.contains_key(id));
        if let Some(k) = idempotency {
            keys.insert(k.to_string(), job.id.clone());
        }
        jobs.insert(job.id.clone(), job);
    }

    /// The job an idempotency key named.
    pub fn by_key(&self, key: &str) -> Option<Arc<JobHandle>> {
        let id = lock(&self.keys).get(key).cloned()?;
        self.get(&id)
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<JobHandle>> {
        lock(&self.jobs).get(id).cloned()
    }

    /// Notes the job a worker has just started (A1111's progress shows it).
    pub fn set_current(&self, job: &Arc<JobHandle>) {
        *lock(&self.current) = Some(job.clone());
    }

    /// The job started last.
    pub fn current(&self) -> Option<Arc<JobHandle>> {
        lock(&self.current).clone()
    }

    /// Jobs not yet over.
    pub fn active(&self) -> Vec<Arc<JobHandle>> {
        lock(&self.jobs)
            .values()
            .filter(|j| !j.state().is_final())
            .cloned()
            .collect()
    }
}
