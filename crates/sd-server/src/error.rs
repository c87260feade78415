//! The server's errors: [`ConfigError`] at start-up, [`ApiError`] for a request,
//! rendered in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) or,
//! on the `/sdapi/v1` routes, in AUTOMATIC1111's (`{"error", "detail", "body",
//! "errors"}`).

use std::path::PathBuf;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use thiserror::Error;

/// A configuration the server cannot start with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse.
    #[error("configuration: {0}")]
    Parse(String),
    /// A value the server cannot honour.
    #[error("configuration `{key}`: {message}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// What went wrong with a request; each kind has its status code.
#[derive(Debug, Clone, Error, PartialEq)]
#[non_exhaustive]
pub enum ApiError {
    /// A malformed or invalid request (400).
    #[error("{}{message}", param.as_ref().map(|p| format!("`{p}`: ")).unwrap_or_default())]
    Invalid {
        /// The field at fault, when one is.
        param: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A model, LoRA, ControlNet or job that does not exist (404).
    #[error("{what} `{name}` not found{hint}")]
    NotFound {
        /// `model`, `lora`, `controlnet`, `job`.
        what: &'static str,
        /// The name asked for.
        name: String,
        /// What exists, for the message.
        hint: String,
    },
    /// No or a wrong API key (401).
    #[error("invalid or missing API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The body is larger than the limit (413).
    #[error("request body over the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The model's queue is full (429, `Retry-After`).
    #[error("the queue of model `{model}` is full; retry after {} s", retry_after.as_secs())]
    QueueFull {
        /// The model.
        model: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The API key's request rate is spent (429, `Retry-After`).
    #[error("rate limit of {per_minute} requests per minute reached; retry after {} s", retry_after.as_secs())]
    RateLimited {
        /// The limit.
        per_minute: u32,
        /// When to retry.
        retry_after: Duration,
    },
    /// The job was cancelled (409 on the synchronous APIs).
    #[error("the job was cancelled")]
    Cancelled,
    /// The job did not finish before its deadline (504).
    #[error("the job passed its deadline of {} s", .0.as_secs())]
    Deadline(Duration),
    /// The generation failed for a reason of the request (422): the pipeline's
    /// words.
    #[error("{0}")]
    Generation(String),
    /// A model could not be loaded, or the server is shutting down (503).
    #[error("{0}")]
    Unavailable(String),
    /// A failure of the server itself (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// An [`ApiError::Invalid`] about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::QueueFull { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Cancelled => StatusCode::CONFLICT,
            Self::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Generation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short kind for metrics and the native API (`invalid_request`,
    /// `not_found`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "invalid_request",
            Self::NotFound { .. } => "not_found",
            Self::Unauthorized => "unauthorized",
            Self::TooLarge { .. } => "too_large",
            Self::QueueFull { .. } => "queue_full",
            Self::RateLimited { .. } => "rate_limited",
            Self::Cancelled => "cancelled",
            Self::Deadline(_) => "deadline",
            Self::Generation(_) => "generation",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn openai_type_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            Self::NotFound { what: "model", .. } => {
                ("invalid_request_error", Some("model_not_found"))
            }
            Self::QueueFull { .. } | Self::RateLimited { .. } => {
                ("requests", Some("rate_limit_exceeded"))
            }
            Self::Internal(_) | Self::Unavailable(_) => ("server_error", None),
            _ => ("invalid_request_error", None),
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Self::Invalid { param, .. } => param.clone(),
            Self::NotFound { what, .. } => Some((*what).to_string()),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::QueueFull { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::Unavailable(_) => Some(Duration::from_secs(5)),
            _ => None,
        }
    }

    /// The OpenAI-shaped body.
    pub fn openai_body(&self) -> serde_json::Value {
        let (kind, code) = self.openai_type_code();
        json!({"error": {
            "message": self.to_string(),
            "type": kind,
            "param": self.param(),
            "code": code,
        }})
    }

    /// The AUTOMATIC1111-shaped body (its API's exception handler).
    pub fn a1111_body(&self) -> serde_json::Value {
        let name = match self {
            Self::Invalid { .. } | Self::Generation(_) => "ValueError",
            Self::Internal(_) => "RuntimeError",
            _ => "HTTPException",
        };
        json!({
            "error": name,
            "detail": self.to_string(),
            "body": "",
            "errors": self.to_string(),
        })
    }

    fn respond(&self, body: serde_json::Value) -> Response {
        crate::metrics::error(self.kind());
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond(self.openai_body())
    }
}

/// An [`ApiError`] answered in AUTOMATIC1111's shape.
#[derive(Debug)]
pub struct A1111Error(pub ApiError);

impl From<ApiError> for A1111Error {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        self.0.respond(self.0.a1111_body())
    }
}

/// The error of a failed generation, from the pipeline's: what the request can
/// change (422) apart from the server's own faults (500); paths are not shown.
pub fn from_pipeline(e: &sd_pipelines::PipelineError) -> ApiError {
    use sd_pipelines::PipelineError as P;
    match e {
        P::Core(sd_core::CoreError::Cancelled(_)) => ApiError::Cancelled,
        P::Io(_) | P::Source { .. } => {
            ApiError::Internal("the model's files could not be read".into())
        }
        P::OutOfMemory { .. } => ApiError::Unavailable(e.to_string()),
        _ => ApiError::Generation(e.to_string()),
    }
}
