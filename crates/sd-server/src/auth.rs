//! Who is asking: bearer API keys compared in constant time, per-key request
//! rates (token buckets), and the client identity the queue is fair between.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::Shared;
use crate::config::ApiKey;
use crate::error::{A1111Error, ApiError};

/// The client of a request: an API key's name, or the peer's address without keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client(pub String);

/// Token buckets per API key name.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes one request from `key`'s bucket (`per_minute` tokens, refilled
    /// continuously); how long to wait when it is empty.
    pub fn take(&self, key: &str, per_minute: u32) -> Result<(), Duration> {
        if per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(per_minute);
        let rate = capacity / 60.0;
        let mut buckets = crate::lock(&self.buckets);
        let now = Instant::now();
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(((1.0 - *tokens) / rate).ceil()))
        }
    }
}

/// The key whose secret `presented` is, comparing with every configured key in
/// constant time.
pub fn find_key<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a ApiKey> {
    let mut found = None;
    for k in keys {
        if bool::from(k.key.as_bytes().ct_eq(presented.as_bytes())) {
            found = Some(k);
        }
    }
    found
}

/// Paths open without a key: the probes.
fn is_open(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics")
}

/// The middleware: checks the key (when keys are configured) and its rate, and
/// records the [`Client`] for the handlers.
pub async fn authenticate(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    let a1111 = path.starts_with("/sdapi/");
    let fail = |e: ApiError| {
        if a1111 {
            A1111Error(e).into_response()
        } else {
            e.into_response()
        }
    };
    let keys = &shared.config.api_keys;
    let client = if keys.is_empty() {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        Client(peer.unwrap_or_else(|| "anonymous".into()))
    } else if is_open(&path) {
        Client("probe".into())
    } else {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(key) = presented.and_then(|p| find_key(keys, p)) else {
            return fail(ApiError::Unauthorized);
        };
        if let Err(retry_after) = shared.limiter.take(&key.name, key.requests_per_minute) {
            return fail(ApiError::RateLimited {
                per_minute: key.requests_per_minute,
                retry_after,
            });
        }
        Client(key.name.clone())
    };
    request.extensions_mut().insert(client);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_rates() {
        let keys = vec![
            ApiKey {
                name: "a".into(),
                key: "secret-one".into(),
                requests_per_minute: 2,
            },
            ApiKey {
                name: "b".into(),
                key: "secret-two".into(),
                requests_per_minute: 0,
            },
        ];
        assert_eq!(find_key(&keys, "secret-two").unwrap().name, "b");
        assert!(find_key(&keys, "secret-tw").is_none());
        assert!(find_key(&keys, "").is_none());
        let limiter = RateLimiter::default();
        assert!(limiter.take("a", 2).is_ok());
        assert!(limiter.take("a", 2).is_ok());
        let wait = limiter.take("a", 2).unwrap_err();
        assert!(
            wait >= Duration::from_secs(1) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        for _ in 0..100 {
            assert!(limiter.take("b", 0).is_ok());
        }
    }
}
