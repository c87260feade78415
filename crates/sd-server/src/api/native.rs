//! Native jobs: `POST /v1/jobs` returns an id at once; `GET /v1/jobs/{id}` its
//! state and, when done, its pictures; `GET /v1/jobs/{id}/events` streams its queue
//! position, steps, previews and result as Server-Sent Events; `DELETE
//! /v1/jobs/{id}` cancels it (within one step when running).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::{Extension, Json};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

use super::common::{ControlDraft, Draft, LoraRef, init_spec};
use super::{b64, body_bytes, parse_slice};
use crate::Shared;
use crate::auth::Client;
use crate::error::ApiError;
use crate::job::{HiresSpec, JobEvent, JobImage, JobState};
use crate::store::JobHandle;
use crate::validate;

/// Hires fix settings.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HiresRequest {
    /// Target size over the base size (2).
    #[serde(default)]
    pub scale: Option<f64>,
    /// Second-pass strength (0.7).
    #[serde(default)]
    pub strength: Option<f64>,
    /// Second-pass steps.
    #[serde(default)]
    pub steps: Option<i64>,
    /// `latent`, `latent-nearest`, `latent-bicubic`, `lanczos`.
    #[serde(default)]
    pub upscaler: Option<String>,
}

/// One ControlNet of a job.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// A configured ControlNet of the model.
    pub name: String,
    /// The control image (base64 PNG/JPEG/WebP), preprocessed.
    pub image: String,
    /// Scale (1).
    #[serde(default)]
    pub scale: Option<f64>,
    /// Start fraction (0).
    #[serde(default)]
    pub start: Option<f64>,
    /// End fraction (1).
    #[serde(default)]
    pub end: Option<f64>,
}

/// `POST /v1/jobs`: everything the pipeline takes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// What to draw.
    pub prompt: String,
    /// A configured model (default: the first).
    #[serde(default)]
    pub model: Option<String>,
    /// What to avoid (SDXL base without one: zeros, as diffusers).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// SDXL: what the second text encoder reads (default: the prompt).
    #[serde(default)]
    pub prompt_2: Option<String>,
    /// SDXL: the second text encoder's negative prompt (default: the negative prompt).
    #[serde(default)]
    pub negative_prompt_2: Option<String>,
    /// SD 3: what the T5 encoder reads (default: the prompt).
    #[serde(default)]
    pub prompt_3: Option<String>,
    /// SD 3: the T5 encoder's negative prompt (default: the negative prompt).
    #[serde(default)]
    pub negative_prompt_3: Option<String>,
    /// SD 3: T5 tokens (256; at most 512).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// SD 3: the flow-matching shift of the scheduler (SD 3.5's config: 3.0).
    #[serde(default)]
    pub shift: Option<f64>,
    /// SD 3.5: skip-layer guidance's transformer blocks (Medium: [7, 8, 9]).
    #[serde(default)]
    pub skip_layer_guidance: Vec<usize>,
    /// Skip-layer guidance's scale (2.8).
    #[serde(default)]
    pub slg_scale: Option<f64>,
    /// Skip-layer guidance from this fraction of the steps (0.01).
    #[serde(default)]
    pub slg_start: Option<f64>,
    /// Skip-layer guidance until this fraction of the steps (0.2).
    #[serde(default)]
    pub slg_stop: Option<f64>,
    /// Width (default: the model's, or the init image's).
    #[serde(default)]
    pub width: Option<i64>,
    /// Height.
    #[serde(default)]
    pub height: Option<i64>,
    /// Images (1).
    #[serde(default)]
    pub n: Option<i64>,
    /// Steps.
    #[serde(default)]
    pub steps: Option<i64>,
    /// Guidance.
    #[serde(default)]
    pub guidance: Option<f64>,
    /// Seed (-1: random).
    #[serde(default)]
    pub seed: Option<i64>,
    /// Scheduler (ours or A1111's name).
    #[serde(default)]
    pub scheduler: Option<String>,
    /// LoRAs.
    #[serde(default)]
    pub loras: Vec<LoraRef>,
    /// diffusers' clip skip.
    #[serde(default)]
    pub clip_skip: Option<i64>,
    /// img2img / inpainting: the picture (base64).
    #[serde(default)]
    pub init_image: Option<String>,
    /// Inpainting: the mask (base64, white repaints).
    #[serde(default)]
    pub mask: Option<String>,
    /// img2img strength (0.75; inpainting 1).
    #[serde(default)]
    pub strength: Option<f64>,
    /// Hires fix.
    #[serde(default)]
    pub hires: Option<HiresRequest>,
    /// ControlNets.
    #[serde(default)]
    pub controlnets: Vec<ControlRequest>,
    /// diffusers' guess mode for the ControlNets.
    #[serde(default)]
    pub guess_mode: bool,
    /// Give up after this many seconds (capped by the server's limit).
    #[serde(default)]
    pub timeout_secs: Option<f64>,
}

/// The answer to `POST /v1/jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobCreated {
    /// The job's id.
    pub id: String,
    /// `queued`.
    pub status: JobState,
    /// Jobs ahead of it.
    pub position: usize,
}

/// `GET /v1/jobs/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobStatusResponse {
    /// The id.
    pub id: String,
    /// Where it is.
    pub status: JobState,
    /// The model.
    pub model: String,
    /// `txt2img`, `img2img`, `inpaint`.
    pub task: String,
    /// Unix seconds of submission.
    pub created: u64,
    /// Jobs ahead (while queued).
    pub position: Option<usize>,
    /// Steps done.
    pub step: usize,
    /// Steps in all.
    pub total: usize,
    /// Jobs in the U-Net batch it ran in (0 before it started).
    pub batch: usize,
    /// The pictures (base64 PNG), once succeeded.
    pub images: Option<Vec<String>>,
    /// Their generation parameters.
    pub parameters: Option<Vec<Value>>,
    /// The error, once failed or cancelled.
    pub error: Option<Value>,
}

fn hires(h: &HiresRequest, limits: &crate::Limits) -> Result<HiresSpec, ApiError> {
    let upscaler = match h.upscaler.as_deref().unwrap_or("latent") {
        "latent" => sd_pipelines::HiresUpscaler::Latent,
        "latent-nearest" => sd_pipelines::HiresUpscaler::LatentNearest,
        "latent-bicubic" => sd_pipelines::HiresUpscaler::LatentBicubic,
        "lanczos" => sd_pipelines::HiresUpscaler::Lanczos,
        other => {
            return Err(ApiError::invalid(
                "hires.upscaler",
                format!("`{other}`: latent, latent-nearest, latent-bicubic or lanczos"),
            ));
        }
    };
    Ok(HiresSpec {
        scale: validate::check_range(h.scale.unwrap_or(2.0), 1.0, 4.0, "hires.scale")?,
        strength: validate::check_range(h.strength.unwrap_or(0.7), 0.01, 1.0, "hires.strength")?,
        steps: h
            .steps
            .map(|s| validate::check_steps(s, limits, "hires.steps"))
            .transpose()?,
        upscaler,
    })
}

fn draft(r: JobRequest, shared: &Shared) -> Result<Draft, ApiError> {
    let limits = &shared.config.limits;
    let size = match (r.width, r.height) {
        (Some(w), Some(h)) => Some(validate::check_size(w, h, limits, "width")?),
        (None, None) => None,
        _ => {
            return Err(ApiError::invalid(
                "width",
                "give both width and height, or neither",
            ));
        }
    };
    let mut d = Draft {
        model: r.model,
        prompt: r.prompt,
        prompt_required: true,
        negative_prompt: r.negative_prompt,
        prompt_2: r.prompt_2,
        negative_prompt_2: r.negative_prompt_2,
        sd3: crate::job::Sd3Options {
            prompt_3: r.prompt_3,
            negative_prompt_3: r.negative_prompt_3,
            max_sequence_length: r.max_sequence_length,
            shift: r.shift,
            skip_layer_guidance: r.skip_layer_guidance,
            slg_scale: r.slg_scale,
            slg_start: r.slg_start,
            slg_stop: r.slg_stop,
        },
        size,
        n: r.n.unwrap_or(1),
        steps: r.steps,
        guidance: r.guidance,
        seed: r.seed,
        sampler: r.scheduler,
        loras: r.loras.into_iter().map(|l| (l.name, l.weight)).collect(),
        clip_skip: r.clip_skip,
        guess_mode: r.guess_mode,
        timeout: r
            .timeout_secs
            .map(|t| {
                validate::check_range(t, 0.0, 1e6, "timeout_secs").map(Duration::from_secs_f64)
            })
            .transpose()?,
        ..Draft::default()
    };
    if let Some(init) = &r.init_image {
        let image = validate::decode_base64_image(init, limits, "init_image")?;
        let mask = r
            .mask
            .as_deref()
            .map(|m| validate::decode_base64_image(m, limits, "mask"))
            .transpose()?;
        let init = init_spec(
            &image,
            mask.as_ref(),
            d.size,
            r.strength,
            limits,
            "init_image",
        )?;
        d.size = Some((init.image.width() as usize, init.image.height() as usize));
        d.init = Some(init);
    } else if r.mask.is_some() || r.strength.is_some() {
        return Err(ApiError::invalid(
            "init_image",
            "a mask or strength needs an init image",
        ));
    }
    if let Some(h) = &r.hires {
        if d.init.is_some() {
            return Err(ApiError::invalid(
                "hires",
                "the hires fix is for text to image",
            ));
        }
        d.hires = Some(hires(h, limits)?);
    }
    for c in r.controlnets {
        let image = validate::decode_base64_image(&c.image, limits, "controlnets.image")?;
        d.control.push(ControlDraft {
            name: c.name,
            image: image.to_rgb8(),
            depth: false,
            scale: c.scale.unwrap_or(1.0),
            start: c.start.unwrap_or(0.0),
            end: c.end.unwrap_or(1.0),
        });
    }
    Ok(d)
}

/// The checked job of a `POST /v1/jobs` body (nothing is queued).
///
/// # Errors
/// What is wrong with the body, as a 4xx.
pub fn job_spec(shared: &Shared, client: &Client, body: &[u8]) -> Result<crate::JobSpec, ApiError> {
    let r: JobRequest = parse_slice(body)?;
    draft(r, shared)?.into_spec(shared, client)
}

/// Queues a job.
#[utoipa::path(post, path = "/v1/jobs", request_body = JobRequest,
    responses((status = 202, body = JobCreated), (status = 400), (status = 404), (status = 429)))]
pub async fn create_job(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<JobCreated>), ApiError> {
    let bytes = body_bytes(body, shared.config.limits.max_body_bytes)?;
    let spec = job_spec(&shared, &client, &bytes)?;
    let idempotency = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 128)
                .ok_or_else(|| {
                    ApiError::invalid("Idempotency-Key", "1 to 128 visible ASCII characters")
                })
        })
        .transpose()?;
    // Keys are per client: one client's key never finds another's job.
    let idempotency = idempotency.map(|k| format!("{}:{k}", client.0));
    let job = shared.submit(spec, idempotency.as_deref()).await?;
    let position = shared.position(&job).unwrap_or(0);
    Ok((
        StatusCode::ACCEPTED,
        Json(JobCreated {
            id: job.id.clone(),
            status: job.state(),
            position,
        }),
    ))
}

async fn find(shared: &Shared, id: &str, client: &Client) -> Result<Arc<JobHandle>, ApiError> {
    let not_found = || ApiError::NotFound {
        what: "job",
        name: id.to_string(),
        hint: String::new(),
    };
    let job = shared.find_job(id).await?.ok_or_else(not_found)?;
    // With API keys, a job is seen only by the key that made it.
    if !shared.config.api_keys.is_empty() && job.spec.client != client.0 {
        return Err(not_found());
    }
    Ok(job)
}

fn error_json(e: &ApiError) -> Value {
    json!({"kind": e.kind(), "message": e.to_string()})
}

/// A picture's parameters, and the safety checker's verdict (`null` without one).
fn parameters_json(i: &JobImage) -> Value {
    let p = &i.parameters;
    json!({
        "prompt": p.prompt, "negative_prompt": p.negative_prompt, "steps": p.steps,
        "sampler": p.sampler, "cfg_scale": p.cfg_scale, "seed": p.seed,
        "width": p.width, "height": p.height, "model": p.model,
        "nsfw_content_detected": i.nsfw_content_detected,
    })
}

/// A job's state, and its pictures once done.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobStatusResponse), (status = 404)))]
pub async fn get_job(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Json<JobStatusResponse>, ApiError> {
    let job = find(&shared, &id, &client).await?;
    let p = job.progress();
    let result = job.result();
    let (images, parameters, error) = match &result {
        Some(Ok(images)) => (
            Some(images.iter().map(|i| b64(&i.png)).collect()),
            Some(images.iter().map(parameters_json).collect()),
            None,
        ),
        Some(Err(e)) => (None, None, Some(error_json(e))),
        None => (None, None, None),
    };
    Ok(Json(JobStatusResponse {
        id: job.id.clone(),
        status: p.state,
        model: job.spec.model.clone(),
        task: job.spec.task().into(),
        created: p
            .created
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        position: shared.position(&job),
        step: p.step,
        total: p.total,
        batch: p.batch,
        images,
        parameters,
        error,
    }))
}

/// Cancels a job.
#[utoipa::path(delete, path = "/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200), (status = 404)))]
pub async fn cancel_job(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&shared, &id, &client).await?;
    let cancelled = shared.cancel(&job);
    Ok(Json(
        json!({"id": job.id, "status": job.state(), "cancelled": cancelled}),
    ))
}

struct EventState {
    shared: Arc<Shared>,
    job: Arc<JobHandle>,
    rx: tokio::sync::broadcast::Receiver<JobEvent>,
    pending: VecDeque<Event>,
    last_position: Option<usize>,
    done: bool,
}

fn event(name: &str, data: &Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

impl EventState {
    /// The events that end the stream: the result, or the error.
    fn final_events(&mut self) {
        self.done = true;
        match self.job.result() {
            Some(Ok(images)) => self.pending.push_back(event(
                "result",
                &json!({
                    "id": self.job.id,
                    "images": images.iter().map(|i| b64(&i.png)).collect::<Vec<_>>(),
                    "parameters": images.iter().map(parameters_json).collect::<Vec<_>>(),
                }),
            )),
            Some(Err(e)) => {
                let name = if matches!(e, ApiError::Cancelled) {
                    "cancelled"
                } else {
                    "error"
                };
                self.pending.push_back(event(
                    name,
                    &json!({"id": self.job.id, "error": error_json(&e)}),
                ));
            }
            None => {}
        }
    }

    fn translate(&mut self, e: JobEvent) {
        match e {
            JobEvent::Queued { position } => self
                .pending
                .push_back(event("queued", &json!({"position": position}))),
            JobEvent::Started { batch } => self
                .pending
                .push_back(event("started", &json!({"batch": batch}))),
            JobEvent::Step { step, total } => self
                .pending
                .push_back(event("step", &json!({"step": step, "total": total}))),
            JobEvent::Preview { step, png } => {
                self.pending
                    .push_back(event("preview", &json!({"step": step, "image": b64(&png)})));
            }
            JobEvent::Done(_) => self.final_events(),
        }
    }

    async fn next(mut self) -> Option<(Event, Self)> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some((e, self));
            }
            if self.done {
                return None;
            }
            let tick = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                received = self.rx.recv() => match received {
                    Ok(e) => self.translate(e),
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => self.final_events(),
                },
                () = tick => {
                    if self.job.state().is_final() {
                        self.final_events();
                    } else if let Some(p) = self.shared.position(&self.job)
                        && self.last_position != Some(p)
                    {
                        self.last_position = Some(p);
                        self.pending.push_back(event("queued", &json!({"position": p})));
                    }
                }
            }
        }
    }
}

/// The job's events as Server-Sent Events: `queued` (position), `started`, `step`,
/// `preview` (base64 PNG), then `result` (pictures and parameters), `error` or
/// `cancelled`, and the stream ends.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream"), (status = 404)))]
pub async fn job_events(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&shared, &id, &client).await?;
    let rx = job.subscribe();
    let mut state = EventState {
        shared: shared.clone(),
        job: job.clone(),
        rx,
        pending: VecDeque::new(),
        last_position: None,
        done: false,
    };
    let p = job.progress();
    match p.state {
        JobState::Queued => {
            let position = shared.position(&job).unwrap_or(0);
            state.last_position = Some(position);
            state
                .pending
                .push_back(event("queued", &json!({"position": position})));
        }
        JobState::Running => state
            .pending
            .push_back(event("step", &json!({"step": p.step, "total": p.total}))),
        _ => state.final_events(),
    }
    let stream = futures_util::stream::unfold(state, EventState::next);
    let stream = futures_util::StreamExt::map(stream, Ok::<_, Infallible>);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
