//! The shared queue: API replicas and workers on several machines over Redis
//! Streams with a consumer group (`--queue redis://HOST:PORT`).
//!
//! Layout in Redis (prefix `sd:`):
//! - `sd:q:{model}`: a stream per model; each entry names a job (`job` = id); the
//!   consumer group `workers` hands entries out, `XACK` + `XDEL` when the job is
//!   over (so the stream's length is what waits or runs);
//! - `sd:job:{id}`: a hash per job (spec as [`crate::wire::WireSpec`] JSON, state,
//!   the stream entry that carries it, attempts, worker, step, total, preview,
//!   cancel flag, result as [`crate::wire::WireResult`] JSON); it expires
//!   `result_ttl_secs` after the job ends;
//! - `sd:ev:{id}`: a pub/sub channel per job carrying [`crate::wire::WireEvent`]s
//!   (progress is best effort; the state in the hash is the truth);
//! - `sd:dead`: the dead-letter stream (job, model, error, attempts);
//! - `sd:models`: the models the workers serve (name -> [`ModelAdvert`] JSON);
//!   `sd:worker:{name}`: each live worker, expiring unless refreshed;
//! - `sd:idem:{key}`: idempotency keys -> job id.
//!
//! Every state change is one Lua script ([`scripts`]), so a result is written
//! once whatever runs twice: a job delivered again (its worker thought dead, or
//! really dead) can run twice, but clients see one result.

pub mod api;
pub mod scripts;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::config::ModelConfig;
use crate::error::ApiError;

/// The consumer group of the workers.
pub const GROUP: &str = "workers";
/// The dead-letter stream.
pub const DEAD_LETTERS: &str = "sd:dead";
/// The models the workers serve.
pub const MODELS: &str = "sd:models";
/// The set of running jobs' ids.
pub const RUNNING: &str = "sd:running";
/// The pattern of every job's event channel.
pub const EVENTS_PATTERN: &str = "sd:ev:*";

/// The stream of a model's jobs.
pub fn queue_key(model: &str) -> String {
    format!("sd:q:{model}")
}

/// A job's hash.
pub fn job_key(id: &str) -> String {
    format!("sd:job:{id}")
}

/// A job's event channel.
pub fn events_channel(id: &str) -> String {
    format!("sd:ev:{id}")
}

/// A live worker's key.
pub fn worker_key(name: &str) -> String {
    format!("sd:worker:{name}")
}

/// An idempotency key's key.
pub fn idempotency_key(key: &str) -> String {
    format!("sd:idem:{key}")
}

/// What a worker tells the API replicas about a model it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelAdvert {
    /// The model's configuration (paths are the worker's).
    pub config: ModelConfig,
    /// Its LoRAs' names.
    pub loras: Vec<String>,
}

/// The models announced in `sd:models`, by name, with their LoRAs.
pub fn parse_catalog(
    raw: BTreeMap<String, String>,
) -> (Vec<ModelConfig>, BTreeMap<String, Vec<String>>) {
    let mut configs = Vec::new();
    let mut loras = BTreeMap::new();
    for (name, json) in raw {
        match serde_json::from_str::<ModelAdvert>(&json) {
            Ok(a) => {
                loras.insert(a.config.name.clone(), a.loras);
                configs.push(a.config);
            }
            Err(e) => tracing::warn!(model = %name, error = %e, "unreadable model announcement"),
        }
    }
    (configs, loras)
}

/// The 503 of an unreachable Redis (with `Retry-After`).
pub fn unavailable(e: &redis::RedisError) -> ApiError {
    ApiError::Unavailable(format!("the job queue (Redis) is unreachable: {e}"))
}

/// A connection to Redis that comes back by itself: made on first use (and
/// tried again on later uses, at most every half second, while Redis does not
/// answer), then kept by redis' `ConnectionManager`, which reconnects with backoff
/// after a failure.
#[derive(Clone)]
pub struct Link {
    client: redis::Client,
    manager: Arc<Mutex<(Option<ConnectionManager>, Option<Instant>)>>,
    response_timeout: Duration,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("redis", &self.client.get_connection_info().addr())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link to `url` whose commands give up after `response_timeout` (blocking
    /// reads need more than their block time).
    ///
    /// # Errors
    /// A URL redis cannot parse.
    pub fn new(url: &str, response_timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            manager: Arc::new(Mutex::new((None, None))),
            response_timeout,
        })
    }

    /// The connection, or the 503 of a Redis not reached yet.
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] while no connection could be made.
    pub async fn get(&self) -> Result<ConnectionManager, ApiError> {
        let mut slot = self.manager.lock().await;
        if let Some(m) = &slot.0 {
            return Ok(m.clone());
        }
        if slot
            .1
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return Err(ApiError::Unavailable(
                "the job queue (Redis) is not reachable".into(),
            ));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        match self.client.get_connection_manager_with_config(config).await {
            Ok(m) => {
                tracing::info!("connected to Redis");
                slot.0 = Some(m.clone());
                Ok(m)
            }
            Err(e) => {
                slot.1 = Some(Instant::now());
                Err(unavailable(&e))
            }
        }
    }

    /// A pub/sub connection of its own.
    ///
    /// # Errors
    /// Redis unreachable.
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, redis::RedisError> {
        self.client.get_async_pubsub().await
    }

    /// Whether Redis answers a PING now.
    pub async fn ping(&self) -> bool {
        let Ok(mut c) = self.get().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .is_ok()
    }
}
