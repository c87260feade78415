//! Operations: `/health` (the process answers), `/ready` (a model is loaded),
//! Prometheus `/metrics`, the OpenAPI document, and the 404 of unknown routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::Shared;
use crate::error::ApiError;

/// Always 200 while the process serves.
#[utoipa::path(get, path = "/health", responses((status = 200)))]
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 once a model is loaded (an API replica of a shared queue: once Redis
/// answers), 503 before.
#[utoipa::path(get, path = "/ready", responses((status = 200), (status = 503)))]
pub async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<Value>) {
    let queued = shared.queued_total();
    let (ready, body) = match &shared.cluster {
        Some(q) => {
            let reachable = q.reachable();
            let models = shared.registry.names();
            (
                reachable,
                json!({"ready": reachable, "queue": "redis", "models": models, "queued": queued}),
            )
        }
        None => {
            let loaded = shared.registry.loaded_names();
            (
                !loaded.is_empty(),
                json!({"ready": !loaded.is_empty(), "models_loaded": loaded, "queued": queued}),
            )
        }
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

/// The OpenAPI document.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::ApiDoc::openapi())
}

/// Unknown routes: a 404 in the OpenAI shape.
pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound {
        what: "route",
        name: uri.path().to_string(),
        hint: String::new(),
    }
}
