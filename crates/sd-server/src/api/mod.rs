//! The HTTP layer: routes, the request checks shared by the three APIs, and the
//! OpenAPI document. Handlers turn a wire request into a [`crate::JobSpec`] and
//! nothing more.

pub mod a1111;
pub mod common;
pub mod native;
pub mod openai;
pub mod ops;

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::Shared;
use crate::error::ApiError;
use crate::store::JobHandle;

/// The OpenAPI document of every route.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "sd-server",
        description = "Stable Diffusion on burn: OpenAI images API, AUTOMATIC1111 API, native jobs"
    ),
    paths(
        openai::generations,
        openai::edits,
        openai::models,
        a1111::txt2img,
        a1111::img2img,
        a1111::progress,
        a1111::interrupt,
        a1111::sd_models,
        a1111::samplers,
        a1111::schedulers,
        a1111::loras,
        a1111::get_options,
        a1111::set_options,
        native::create_job,
        native::get_job,
        native::cancel_job,
        native::job_events,
        ops::health,
        ops::ready,
        ops::metrics,
    ),
    components(schemas(
        openai::ImageGenerationRequest,
        openai::ImagesResponse,
        openai::ImageData,
        openai::ModelList,
        openai::ModelObject,
        common::LoraRef,
        a1111::Txt2ImgRequest,
        a1111::Img2ImgRequest,
        a1111::ImageResponse,
        a1111::ProgressResponse,
        a1111::ControlNetUnit,
        native::JobRequest,
        native::JobStatusResponse,
        native::JobCreated,
        crate::job::JobState,
    ))
)]
pub struct ApiDoc;

/// Every route with its layers: authentication and rate limits, the body limit,
/// CORS when configured, request tracing.
pub fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.config.limits.max_body_bytes;
    let mut router = Router::new()
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/v1/models", get(openai::models))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/sdapi/v1/refresh-loras", post(a1111::refresh_loras))
        .route(
            "/sdapi/v1/options",
            get(a1111::get_options).post(a1111::set_options),
        )
        .route("/v1/jobs", post(native::create_job))
        .route(
            "/v1/jobs/{id}",
            get(native::get_job).delete(native::cancel_job),
        )
        .route("/v1/jobs/{id}/events", get(native::job_events))
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .fallback(ops::not_found)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            crate::auth::authenticate,
        ))
        .layer(DefaultBodyLimit::max(limit));
    if let Some(cors) = cors(&shared.config.cors_origins) {
        router = router.layer(cors);
    }
    router.layer(TraceLayer::new_for_http()).with_state(shared)
}

/// A worker's routes (`sd-server worker`): `/health`, `/ready` (a model loaded)
/// and `/metrics`, for probes and scraping; no API.
pub fn ops_router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(ops::health))
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .layer(TraceLayer::new_for_http())
        .with_state(shared)
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers(Any),
    )
}

/// The body as bytes, the limit's rejection as [`ApiError::TooLarge`].
pub(crate) fn body_bytes(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::Invalid {
                param: None,
                message: format!("unreadable body: {}", e.body_text()),
            }
        }
    })
}

/// A JSON body parsed into `T`, every failure a 4xx with serde's words (field,
/// expected type, line and column).
pub(crate) fn parse_json<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    parse_slice(&body_bytes(body, limit)?)
}

/// [`parse_json`] over bytes already read.
pub(crate) fn parse_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde reads a struct from an array too; the APIs take objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::Invalid {
            param: None,
            message: "the body must be a JSON object".into(),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::Invalid {
        param: None,
        message: format!("invalid JSON body: {e}"),
    })
}

/// Cancels a job whose client went away before it finished (a synchronous request
/// dropped mid-way).
pub(crate) struct CancelOnDrop {
    shared: Arc<Shared>,
    job: Arc<JobHandle>,
}

impl CancelOnDrop {
    pub(crate) fn new(shared: &Arc<Shared>, job: &Arc<JobHandle>) -> Self {
        Self {
            shared: shared.clone(),
            job: job.clone(),
        }
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.job.state().is_final() {
            tracing::info!(job = %self.job.id, "client went away; cancelling");
            self.shared.cancel(&self.job);
        }
    }
}

/// Submits a job and waits for its pictures (the synchronous APIs).
pub(crate) async fn run_to_end(
    shared: &Arc<Shared>,
    spec: crate::JobSpec,
) -> Result<(Arc<JobHandle>, Arc<Vec<crate::job::JobImage>>), ApiError> {
    let job = shared.submit(spec, None).await?;
    let _guard = CancelOnDrop::new(shared, &job);
    let images = job.wait().await?;
    Ok((job, images))
}

/// Base64 of bytes (standard alphabet, padded).
pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
