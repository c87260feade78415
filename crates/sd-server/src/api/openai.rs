//! OpenAI's images API: `POST /v1/images/generations`, `POST /v1/images/edits`
//! (multipart), `GET /v1/models`, in OpenAI's shapes so its client libraries work
//! unchanged. Our extras (negative prompt, steps, guidance, seed, scheduler, LoRAs)
//! are additional fields.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::common::{Draft, LoraRef, has_transparency, init_spec, openai_mask};
use super::{b64, body_bytes, parse_slice, run_to_end, unix_now};
use crate::Shared;
use crate::auth::Client;
use crate::error::ApiError;
use crate::job::JobSpec;
use crate::validate;

/// `POST /v1/images/generations`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ImageGenerationRequest {
    /// What to draw.
    pub prompt: String,
    /// A configured model's name (default: the first).
    #[serde(default)]
    pub model: Option<String>,
    /// Images (1 to the limit).
    #[serde(default)]
    pub n: Option<i64>,
    /// `WIDTHxHEIGHT` or `auto` (the model's size).
    #[serde(default)]
    pub size: Option<String>,
    /// `b64_json` (the only format: the pictures are not stored at URLs).
    #[serde(default)]
    pub response_format: Option<String>,
    /// OpenAI's end-user id (logged only).
    #[serde(default)]
    pub user: Option<String>,
    /// OpenAI's `quality` (accepted, no effect: steps say it here).
    #[serde(default)]
    pub quality: Option<String>,
    /// OpenAI's `style` (accepted, no effect).
    #[serde(default)]
    pub style: Option<String>,
    /// Extra: what to avoid.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Extra: denoising steps.
    #[serde(default)]
    pub steps: Option<i64>,
    /// Extra: guidance scale.
    #[serde(default)]
    pub guidance: Option<f64>,
    /// Extra: seed (-1: random).
    #[serde(default)]
    pub seed: Option<i64>,
    /// Extra: scheduler (`euler-a`, `dpmpp-2m-karras`, "DPM++ 2M Karras", ...).
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Extra: LoRAs.
    #[serde(default)]
    pub loras: Option<Vec<LoraRef>>,
    /// Extra: diffusers' clip skip.
    #[serde(default)]
    pub clip_skip: Option<i64>,
}

/// One picture.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageData {
    /// The PNG, base64.
    pub b64_json: String,
    /// The prompt as run (LoRA tags removed).
    pub revised_prompt: Option<String>,
}

/// The images response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    /// The pictures.
    pub data: Vec<ImageData>,
}

/// One model of `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    /// Its name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds (the server's start).
    pub created: u64,
    /// `sd-server`.
    pub owned_by: &'static str,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The models.
    pub data: Vec<ModelObject>,
}

fn check_format(format: Option<&str>) -> Result<(), ApiError> {
    match format {
        None | Some("b64_json") => Ok(()),
        Some(other) => Err(ApiError::invalid(
            "response_format",
            format!("`{other}`: only b64_json is served (pictures are not stored at URLs)"),
        )),
    }
}

fn respond(images: &[crate::job::JobImage]) -> Json<ImagesResponse> {
    Json(ImagesResponse {
        created: unix_now(),
        data: images
            .iter()
            .map(|i| ImageData {
                b64_json: b64(&i.png),
                revised_prompt: Some(i.parameters.prompt.clone()),
            })
            .collect(),
    })
}

/// Text to image.
#[utoipa::path(post, path = "/v1/images/generations", request_body = ImageGenerationRequest,
    responses((status = 200, body = ImagesResponse), (status = 400), (status = 404), (status = 429)))]
pub async fn generations(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let bytes = body_bytes(body, shared.config.limits.max_body_bytes)?;
    let spec = generation_spec(&shared, &client, &bytes)?;
    let (_, images) = run_to_end(&shared, spec).await?;
    Ok(respond(&images))
}

/// The checked job of a `POST /v1/images/generations` body (nothing is queued).
///
/// # Errors
/// What is wrong with the body, as a 4xx.
pub fn generation_spec(shared: &Shared, client: &Client, body: &[u8]) -> Result<JobSpec, ApiError> {
    let limits = &shared.config.limits;
    let r: ImageGenerationRequest = parse_slice(body)?;
    check_format(r.response_format.as_deref())?;
    let size = match &r.size {
        Some(s) => validate::parse_size(s, limits)?,
        None => None,
    };
    Draft {
        model: r.model,
        prompt: r.prompt,
        prompt_required: true,
        negative_prompt: r.negative_prompt,
        size,
        n: r.n.unwrap_or(1),
        steps: r.steps,
        guidance: r.guidance,
        seed: r.seed,
        sampler: r.scheduler,
        loras: r
            .loras
            .unwrap_or_default()
            .into_iter()
            .map(|l| (l.name, l.weight))
            .collect(),
        clip_skip: r.clip_skip,
        ..Draft::default()
    }
    .into_spec(shared, client)
}

/// Image to image and inpainting (multipart: `image`, optional `mask`, `prompt`,
/// `n`, `size`, `model`, `response_format`; extras `negative_prompt`, `steps`,
/// `guidance`, `seed`, `scheduler`, `strength`).
#[utoipa::path(post, path = "/v1/images/edits", request_body(content_type = "multipart/form-data"),
    responses((status = 200, body = ImagesResponse), (status = 400), (status = 429)))]
pub async fn edits(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let limits = shared.config.limits.clone();
    let multipart = multipart.map_err(|e| ApiError::invalid("body", e.body_text()))?;
    let (fields, files) = read_multipart(multipart, limits.max_body_bytes).await?;
    let text = |k: &str| fields.get(k).map(String::as_str);
    let int = |k: &str| -> Result<Option<i64>, ApiError> {
        text(k)
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| ApiError::invalid(k, format!("`{v}` is not an integer")))
            })
            .transpose()
    };
    let float = |k: &str| -> Result<Option<f64>, ApiError> {
        text(k)
            .map(|v| {
                v.trim()
                    .parse()
                    .map_err(|_| ApiError::invalid(k, format!("`{v}` is not a number")))
            })
            .transpose()
    };
    check_format(text("response_format"))?;
    let image = files
        .get("image")
        .or_else(|| files.get("image[]"))
        .ok_or_else(|| ApiError::invalid("image", "a picture is required"))?;
    let image = validate::decode_image(image, &limits, "image")?;
    let mask = files
        .get("mask")
        .map(|m| validate::decode_image(m, &limits, "mask"))
        .transpose()?;
    let mask = match (&mask, has_transparency(&image)) {
        (Some(m), _) => Some(openai_mask(m)),
        (None, true) => Some(openai_mask(&image)),
        (None, false) => None,
    };
    let size = match text("size") {
        Some(s) => validate::parse_size(s, &limits)?,
        None => None,
    };
    let init = init_spec(
        &image,
        mask.as_ref(),
        size,
        float("strength")?,
        &limits,
        "image",
    )?;
    let spec = Draft {
        model: text("model").map(String::from),
        prompt: text("prompt").unwrap_or_default().to_string(),
        prompt_required: true,
        negative_prompt: text("negative_prompt").map(String::from),
        size: Some((init.image.width() as usize, init.image.height() as usize)),
        n: int("n")?.unwrap_or(1),
        steps: int("steps")?,
        guidance: float("guidance")?,
        seed: int("seed")?,
        sampler: text("scheduler").map(String::from),
        init: Some(init),
        ..Draft::default()
    }
    .into_spec(&shared, &client)?;
    let (_, images) = run_to_end(&shared, spec).await?;
    Ok(respond(&images))
}

type Parts = (HashMap<String, String>, HashMap<String, Vec<u8>>);

async fn read_multipart(mut multipart: Multipart, limit: usize) -> Result<Parts, ApiError> {
    let (mut fields, mut files) = (HashMap::new(), HashMap::new());
    loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|e| multipart_error(e.status(), &e.body_text(), limit))?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or_default().to_string();
        let is_file = field.file_name().is_some() || name.starts_with("image") || name == "mask";
        let bytes = field
            .bytes()
            .await
            .map_err(|e| multipart_error(e.status(), &e.body_text(), limit))?;
        if is_file {
            files.insert(name, bytes.to_vec());
        } else {
            let text = String::from_utf8(bytes.to_vec())
                .map_err(|_| ApiError::invalid(name.clone(), "not UTF-8 text"))?;
            fields.insert(name, text);
        }
    }
    Ok((fields, files))
}

fn multipart_error(status: StatusCode, text: &str, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge { limit }
    } else {
        ApiError::invalid("body", format!("malformed multipart body: {text}"))
    }
}

/// The configured models.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)))]
pub async fn models(State(shared): State<Arc<Shared>>) -> Json<ModelList> {
    let created = unix_now() - shared.started.elapsed().as_secs();
    Json(ModelList {
        object: "list",
        data: shared
            .registry
            .names()
            .into_iter()
            .map(|id| ModelObject {
                id,
                object: "model",
                created,
                owned_by: "sd-server",
            })
            .collect(),
    })
}
