//! An HTTP server for Stable Diffusion on burn (the workspace's `docs/serving.md` is
//! the guide).
//!
//! Three APIs over one job queue:
//! - OpenAI's images API: `POST /v1/images/generations`, `POST /v1/images/edits`,
//!   `GET /v1/models`;
//! - AUTOMATIC1111's `/sdapi/v1` (txt2img, img2img, progress, interrupt, models,
//!   samplers, schedulers, LoRAs, options, ControlNet units);
//! - native jobs: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events`
//!   (Server-Sent Events), `DELETE /v1/jobs/{id}`;
//!
//! with `/health`, `/ready`, Prometheus `/metrics` and the OpenAPI document at
//! `/openapi.json`. Requests are checked completely ([`validate`]) and become a
//! [`JobSpec`]; the [`queue`] (bounded per model, fair between clients) hands
//! batches of compatible jobs to generation threads ([`worker`]) that run them on
//! models the [`registry`] loads on first use under a memory budget.
//!
//! In a program of one's own: [`Server::start`] with a [`ServerConfig`] (the
//! default: the demo model on 127.0.0.1:7860), a tokio `TcpListener` bound to
//! [`Server::config`]'s `listen` address, then [`Server::serve`] with a shutdown
//! future; [`Server::router`] gives the axum `Router` to mount elsewhere, and
//! [`Server::spawn`] serves from a thread of its own (programs that are not async,
//! tests, benchmarks). The `sd-server` binary (`src/main.rs`) is the first way.
//!
//! Several machines share one queue through Redis ([`cluster`]): a [`ServerConfig`]
//! with `queue = "redis://..."` makes [`Server::start`] an API replica (no models, no
//! generation threads), and [`Server::start_worker`] with
//! [`cluster::worker::Worker::run`] (or [`cluster::worker::Worker::spawn`]) a worker.
#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod error;
pub mod job;
pub mod metrics;
pub mod overlay;
pub mod provenance;
pub mod queue;
pub mod registry;
pub mod store;
pub mod validate;
pub mod wire;
pub mod worker;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use burn::prelude::Device;

pub use config::{ApiKey, ClusterConfig, Limits, ModelConfig, ServerConfig};
pub use error::{ApiError, ConfigError};
pub use job::{JobEvent, JobSpec, JobState};
pub use store::JobHandle;

use crate::auth::RateLimiter;
use crate::queue::JobQueue;
use crate::registry::ModelRegistry;
use crate::store::JobStore;

/// Locks a mutex; one poisoned by a panic elsewhere is used as it was left (every
/// lock here guards data a panic cannot leave half-written).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the handlers and the workers share.
#[derive(Debug)]
pub struct Shared {
    /// The configuration (with the models resolved: the demo model when none).
    pub config: ServerConfig,
    /// The models.
    pub registry: ModelRegistry,
    /// The waiting jobs.
    pub queue: JobQueue,
    /// Every job by id.
    pub store: JobStore,
    /// Per-key request rates.
    pub limiter: RateLimiter,
    /// A1111's current checkpoint (`sd_model_checkpoint`) and other options.
    pub options: Mutex<serde_json::Map<String, serde_json::Value>>,
    /// When the server started.
    pub started: Instant,
    /// The shared queue of an API replica (`queue = "redis://..."`); `None`: this
    /// process's own queue and generation threads.
    pub cluster: Option<Arc<cluster::api::RedisQueue>>,
    /// Signs finished pictures with C2PA content credentials when configured.
    pub signer: Arc<provenance::PictureSigner>,
}

impl Shared {
    /// Queues a checked job and returns its handle; with an idempotency key used
    /// before, the job it named instead.
    ///
    /// # Errors
    /// [`ApiError::QueueFull`] when the model's queue is full;
    /// [`ApiError::Unavailable`] when the shared queue is unreachable (nothing
    /// was queued).
    pub async fn submit(
        &self,
        spec: JobSpec,
        idempotency: Option<&str>,
    ) -> Result<Arc<JobHandle>, ApiError> {
        if let Some(job) = idempotency.and_then(|k| self.store.by_key(k)) {
            return Ok(job);
        }
        let (job, new) = match &self.cluster {
            Some(q) => q.submit(spec, idempotency).await?,
            None => {
                let job = JobHandle::new(spec);
                let position = self.queue.push(job.clone())?;
                job.set_position(Some(position));
                (job, true)
            }
        };
        if let Some(known) = self.store.get(&job.id) {
            return Ok(known);
        }
        self.store.insert(job.clone(), idempotency);
        if new {
            let position = job.noted_position().unwrap_or(0);
            job.emit(JobEvent::Queued { position });
            tracing::info!(job = %job.id, model = %job.spec.model, client = %job.spec.client,
                task = job.spec.task(), position, "job queued");
        }
        Ok(job)
    }

    /// A job by id: this process's, or (an API replica) one in the shared queue,
    /// followed from now on.
    ///
    /// # Errors
    /// The shared queue is unreachable.
    pub async fn find_job(&self, id: &str) -> Result<Option<Arc<JobHandle>>, ApiError> {
        if let Some(job) = self.store.get(id) {
            return Ok(Some(job));
        }
        let Some(q) = &self.cluster else {
            return Ok(None);
        };
        let Some(job) = q.lookup(id).await? else {
            return Ok(None);
        };
        if let Some(known) = self.store.get(id) {
            return Ok(Some(known));
        }
        self.store.insert(job.clone(), None);
        Ok(Some(job))
    }

    /// Jobs ahead of `job` in its model's queue; `None` when it is not waiting.
    pub fn position(&self, job: &JobHandle) -> Option<usize> {
        match &self.cluster {
            Some(_) => (job.state() == JobState::Queued)
                .then(|| job.noted_position())
                .flatten(),
            None => self.queue.position(&job.spec.model, &job.id),
        }
    }

    /// Jobs waiting (with a shared queue: waiting or running), all models.
    pub fn queued_total(&self) -> usize {
        match &self.cluster {
            Some(q) => q.total(),
            None => self.queue.total(),
        }
    }

    /// Cancels a job: taken out of the queue at once if waiting, stopped after its
    /// current step if running; whether it was not over yet.
    pub fn cancel(&self, job: &Arc<JobHandle>) -> bool {
        if job.state().is_final() {
            return false;
        }
        job.request_cancel();
        if let Some(q) = &self.cluster {
            remote_cancel(q, job, false);
        } else if self.queue.remove(&job.spec.model, &job.id) {
            job.finish(Err(ApiError::Cancelled));
        }
        true
    }

    /// Interrupts a running job (AUTOMATIC1111's interrupt): it stops after its
    /// current step and answers with the pictures of its latents so far; a waiting
    /// job is cancelled.
    pub fn interrupt(&self, job: &Arc<JobHandle>) {
        if job.state() == JobState::Running {
            job.request_interrupt();
            if let Some(q) = &self.cluster {
                remote_cancel(q, job, true);
            }
        } else {
            self.cancel(job);
        }
    }

    /// The deadline of a job submitted now (`timeout` asked by the client, capped
    /// by the configured one).
    pub fn deadline(&self, timeout: Option<Duration>) -> Option<Instant> {
        let limit = self.config.limits.job_timeout_secs;
        let configured = (limit > 0).then(|| Duration::from_secs(limit));
        let t = match (timeout, configured) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        t.map(|t| Instant::now() + t)
    }
}

/// Asks the shared queue to stop a job (in the background: cancels come from
/// synchronous code, such as a request dropped mid-way).
fn remote_cancel(q: &Arc<cluster::api::RedisQueue>, job: &Arc<JobHandle>, interrupt: bool) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (q, job) = (q.clone(), job.clone());
    runtime.spawn(async move {
        if let Err(e) = q.cancel(&job, interrupt).await {
            tracing::warn!(job = %job.id, error = %e, "cancel not delivered");
        }
    });
}

/// A running server: its shared state and its generation threads.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// A worker of a shared queue: health, readiness and metrics only.
    ops_only: bool,
}

impl Server {
    /// Checks the configuration, starts the generation threads and loads the
    /// default model (and those marked `preload`) in the background.
    ///
    /// # Errors
    /// A configuration [`ServerConfig::check`] refuses, a device that is not built in.
    pub fn start(config: ServerConfig) -> Result<Self, ConfigError> {
        let api_replica = config.queue != "memory";
        if api_replica && !config.models.is_empty() {
            return Err(ConfigError::Invalid {
                key: "model".into(),
                message: "with a shared queue the models are the workers' (`sd-server worker \
                          --queue ... --model ...`); API replicas learn them from the queue"
                    .into(),
            });
        }
        let shared = Self::shared_state(config, api_replica)?;
        let workers = if shared.cluster.is_some() {
            Vec::new()
        } else {
            (0..shared.config.workers)
                .map(|i| {
                    let s = shared.clone();
                    std::thread::Builder::new()
                        .name(format!("sd-worker-{i}"))
                        .spawn(move || worker::run(s))
                        .expect("spawning a worker thread")
                })
                .collect()
        };
        if shared.cluster.is_none() {
            Self::preload(&shared);
        }
        Ok(Self {
            shared,
            workers,
            ops_only: false,
        })
    }

    /// Starts a worker of a shared queue (`sd-server worker`): the models loaded
    /// (the default one and those marked `preload` at once, in the background),
    /// no generation threads yet: [`cluster::worker::Worker::run`] runs the jobs.
    /// [`Self::router`] of the returned server serves health, readiness and
    /// metrics only.
    ///
    /// # Errors
    /// A configuration [`ServerConfig::check`] refuses, a `memory` queue, a
    /// device that is not built in.
    pub fn start_worker(
        config: ServerConfig,
    ) -> Result<(Self, Arc<cluster::worker::Worker>), ConfigError> {
        if config.queue == "memory" {
            return Err(ConfigError::Invalid {
                key: "queue".into(),
                message: "a worker needs a shared queue: --queue redis://HOST:PORT".into(),
            });
        }
        let shared = Self::shared_state(config, false)?;
        let worker = cluster::worker::Worker::new(shared.clone()).map_err(|message| {
            ConfigError::Invalid {
                key: "queue".into(),
                message,
            }
        })?;
        Self::preload(&shared);
        Ok((
            Self {
                shared,
                workers: Vec::new(),
                ops_only: true,
            },
            worker,
        ))
    }

    /// The state of a single server or a worker (`replica` false: the models
    /// configured, the demo model when none) or of an API replica.
    fn shared_state(mut config: ServerConfig, replica: bool) -> Result<Arc<Shared>, ConfigError> {
        config.check()?;
        let cluster = if !replica {
            config.models = config.models_or_demo();
            None
        } else {
            let q = cluster::api::RedisQueue::new(
                &config.queue,
                config.limits.queue_capacity,
                config.result_ttl_secs,
            )?;
            Some(Arc::new(q))
        };
        let device = device(&config.device)?;
        let budget = config.memory_budget_mb << 20;
        let default_model = config.models.first().map_or("", |m| m.name.as_str());
        let signer = Arc::new(provenance::PictureSigner::from_config(&config)?);
        metrics::install();
        Ok(Arc::new(Shared {
            registry: ModelRegistry::new(config.models.clone(), device, budget),
            queue: JobQueue::new(config.limits.queue_capacity),
            store: JobStore::new(Duration::from_secs(config.result_ttl_secs)),
            limiter: RateLimiter::default(),
            options: Mutex::new(api::a1111::default_options(default_model)),
            started: Instant::now(),
            cluster,
            signer,
            config,
        }))
    }

    /// Loads the default model and those marked `preload`, in the background.
    fn preload(shared: &Arc<Shared>) {
        let s = shared.clone();
        std::thread::spawn(move || {
            for m in s
                .config
                .models
                .iter()
                .enumerate()
                .filter(|(i, m)| *i == 0 || m.preload)
            {
                if let Err(e) = s.registry.get(&m.1.name) {
                    tracing::error!(model = %m.1.name, error = %e, "preload failed");
                }
            }
        });
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// The shared state (queue, jobs, models).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The HTTP routes with their layers (auth, limits, CORS, tracing).
    pub fn router(&self) -> Router {
        if self.ops_only {
            api::ops_router(self.shared.clone())
        } else {
            api::router(self.shared.clone())
        }
    }

    /// Serves on `listener` until `shutdown` resolves; requests in flight are
    /// answered (synchronous ones after their jobs), then [`Self::stop`].
    ///
    /// # Errors
    /// The listener fails.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self
            .router()
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        tracing::info!(address = %listener.local_addr()?, "serving");
        let follower = self.shared.cluster.as_ref().map(|_| {
            tokio::spawn(cluster::api::RedisQueue::follow(
                self.shared.clone(),
                Duration::from_millis(500),
            ))
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await?;
        if let Some(f) = follower {
            f.abort();
        }
        self.stop();
        Ok(())
    }

    /// Serves on `listen` from a thread of its own with its own async runtime (for
    /// programs that are not async, tests and benchmarks; port 0 picks a free one);
    /// the returned handle stops it when dropped.
    ///
    /// # Errors
    /// The runtime or the listener cannot be made.
    pub fn spawn(self, listen: std::net::SocketAddr) -> std::io::Result<RunningServer> {
        let runtime = tokio::runtime::Runtime::new()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(listen))?;
        let addr = listener.local_addr()?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("sd-server-http".into())
            .spawn(move || {
                let stopped = async {
                    let _ = stopped.await;
                };
                if let Err(e) = runtime.block_on(self.serve(listener, stopped)) {
                    tracing::error!(error = %e, "server stopped");
                }
            })?;
        Ok(RunningServer {
            addr,
            shutdown: Some(shutdown),
        })
    }

    /// Stops: new jobs are refused, waiting ones end with "shutting down", the
    /// running batches finish, and the generation threads are joined.
    pub fn stop(self) {
        self.shared.queue.close();
        for job in self.shared.queue.drain() {
            job.finish(Err(ApiError::Unavailable(
                "the server is shutting down".into(),
            )));
        }
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// A device this build does not have.
#[allow(dead_code, reason = "unused when every backend feature is on")]
fn missing(name: &str, feature: &str) -> ConfigError {
    ConfigError::Invalid {
        key: "device".into(),
        message: format!("`{name}`: rebuild with `--features {feature}`"),
    }
}

/// A server serving from its own thread ([`Server::spawn`]); dropping it shuts the
/// server down as [`Server::serve`] does.
#[derive(Debug)]
pub struct RunningServer {
    addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://ADDRESS`, the base of every route.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn device(name: &str) -> Result<Device, ConfigError> {
    let device = match name {
        #[cfg(feature = "flex")]
        "cpu" => Device::flex(),
        #[cfg(not(feature = "flex"))]
        "cpu" => return Err(missing(name, "flex")),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(Default::default()),
        #[cfg(not(feature = "wgpu"))]
        "wgpu" => return Err(missing(name, "wgpu")),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0),
        #[cfg(not(feature = "cuda"))]
        "cuda" => return Err(missing(name, "cuda")),
        other => {
            return Err(ConfigError::Invalid {
                key: "device".into(),
                message: format!("`{other}`: cpu, wgpu or cuda"),
            });
        }
    };
    sd_core::check_device(&device).map_err(|e| ConfigError::Invalid {
        key: "device".into(),
        message: e.to_string(),
    })?;
    Ok(device)
}
