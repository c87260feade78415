//! AUTOMATIC1111's `/sdapi/v1`: txt2img and img2img (with hires fix, inpainting as
//! A1111 does it, `<lora:name:weight>` tags and ControlNet units in the
//! sd-webui-controlnet extension's shape), progress, interrupt, the model, sampler,
//! scheduler and LoRA lists, and options. Field names and defaults are A1111's (its
//! `StableDiffusionProcessing*` classes), so its clients work unchanged.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::{Extension, Json};
use image::DynamicImage;
use image::imageops::FilterType;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use super::common::{ControlDraft, Draft};
use super::{b64, body_bytes, parse_json, parse_slice, run_to_end};
use crate::Shared;
use crate::auth::Client;
use crate::error::{A1111Error, ApiError};
use crate::job::{HiresSpec, InitSpec, JobImage, JobSpec, JobState};
use crate::overlay::{Overlay, crop_region, fill, prepare_mask};
use crate::validate::{self, SCHEDULERS};

type A1111Result<T> = Result<T, A1111Error>;

/// The fields txt2img and img2img share (A1111's `StableDiffusionProcessing`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct Processing {
    /// Prompt, with `<lora:name:weight>` tags.
    pub prompt: Option<String>,
    /// Negative prompt.
    pub negative_prompt: Option<String>,
    /// Styles (none are defined here: must be empty).
    pub styles: Option<Vec<String>>,
    /// Seed (-1: random).
    pub seed: Option<i64>,
    /// Variation seed (not supported beyond the default).
    pub subseed: Option<i64>,
    /// Variation strength (must be 0).
    pub subseed_strength: Option<f64>,
    /// Sampler ("Euler a", "DPM++ 2M Karras", ...).
    pub sampler_name: Option<String>,
    /// The older field for the sampler (default "Euler").
    pub sampler_index: Option<String>,
    /// Schedule type ("Automatic", "Karras", "Exponential").
    pub scheduler: Option<String>,
    /// Images per batch.
    pub batch_size: Option<i64>,
    /// Batches.
    pub n_iter: Option<i64>,
    /// Steps (50).
    pub steps: Option<i64>,
    /// Guidance (7.0).
    pub cfg_scale: Option<f64>,
    /// Width (512).
    pub width: Option<i64>,
    /// Height (512).
    pub height: Option<i64>,
    /// Face restoration (not available: must be false).
    pub restore_faces: Option<bool>,
    /// Tiling (not available: must be false).
    pub tiling: Option<bool>,
    /// Accepted, nothing is saved.
    pub do_not_save_samples: Option<bool>,
    /// Accepted, nothing is saved.
    pub do_not_save_grid: Option<bool>,
    /// Hires fix (txt2img) or image-to-image strength.
    pub denoising_strength: Option<f64>,
    /// Settings for this request: `sd_model_checkpoint`, `CLIP_stop_at_last_layers`.
    pub override_settings: Option<Map<String, Value>>,
    /// Accepted (settings are never changed by a request).
    pub override_settings_restore_afterwards: Option<bool>,
    /// A refiner checkpoint (not available: must be empty).
    pub refiner_checkpoint: Option<String>,
    /// Leave `<...>` tags in the prompt.
    pub disable_extra_networks: Option<bool>,
    /// Scripts (none: must be empty).
    pub script_name: Option<String>,
    /// Always-on scripts: `controlnet` with `args`.
    pub alwayson_scripts: Option<Map<String, Value>>,
    /// Accepted, images are always sent.
    pub send_images: Option<bool>,
    /// Accepted, nothing is saved.
    pub save_images: Option<bool>,
}

/// `POST /sdapi/v1/txt2img`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct Txt2ImgRequest {
    /// The shared fields.
    #[serde(flatten)]
    pub base: Processing,
    /// Hires fix.
    pub enable_hr: Option<bool>,
    /// Hires scale (2.0).
    pub hr_scale: Option<f64>,
    /// "Latent", "Latent (nearest)", "Latent (bicubic)", "Lanczos".
    pub hr_upscaler: Option<String>,
    /// Second-pass steps (0: the first pass's).
    pub hr_second_pass_steps: Option<i64>,
    /// Hires target width (0: by scale).
    pub hr_resize_x: Option<i64>,
    /// Hires target height (0: by scale).
    pub hr_resize_y: Option<i64>,
}

/// `POST /sdapi/v1/img2img`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct Img2ImgRequest {
    /// The shared fields.
    #[serde(flatten)]
    pub base: Processing,
    /// The init image (base64), one.
    pub init_images: Option<Vec<String>>,
    /// 0 just resize, 1 crop and resize.
    pub resize_mode: Option<i64>,
    /// Inpainting mask (base64; white repaints).
    pub mask: Option<String>,
    /// Mask blur in pixels (4).
    pub mask_blur: Option<f64>,
    /// 0 fill, 1 original.
    pub inpainting_fill: Option<i64>,
    /// Inpaint only the masked area at full resolution (true).
    pub inpaint_full_res: Option<bool>,
    /// Padding around the masked area (0).
    pub inpaint_full_res_padding: Option<i64>,
    /// 1: repaint where the mask is black.
    pub inpainting_mask_invert: Option<i64>,
    /// Return the init images too (accepted; never returned).
    pub include_init_images: Option<bool>,
}

/// A ControlNet unit of `alwayson_scripts.controlnet.args`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ControlNetUnit {
    /// Whether the unit runs (true).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The preprocessor: `none` or `canny`.
    #[serde(default)]
    pub module: Option<String>,
    /// The ControlNet, by configured name (an A1111 ` [hash]` suffix is ignored).
    #[serde(default)]
    pub model: Option<String>,
    /// Scale (1.0).
    #[serde(default)]
    pub weight: Option<f64>,
    /// The control image, base64 (`input_image` too).
    #[serde(default, alias = "input_image")]
    pub image: Option<Value>,
    /// Canny's low threshold (100).
    #[serde(default)]
    pub threshold_a: Option<f64>,
    /// Canny's high threshold (200).
    #[serde(default)]
    pub threshold_b: Option<f64>,
    /// Start fraction (0).
    #[serde(default)]
    pub guidance_start: Option<f64>,
    /// End fraction (1).
    #[serde(default)]
    pub guidance_end: Option<f64>,
    /// 0 / "Balanced", 2 / "ControlNet is more important".
    #[serde(default)]
    pub control_mode: Option<Value>,
}

/// The response of txt2img and img2img.
#[derive(Debug, Serialize, ToSchema)]
pub struct ImageResponse {
    /// PNGs, base64.
    pub images: Vec<String>,
    /// The request as received.
    pub parameters: Value,
    /// A JSON string: prompts, seeds, size, sampler, infotexts...
    pub info: String,
}

/// `GET /sdapi/v1/progress`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressResponse {
    /// 0 to 1.
    pub progress: f64,
    /// Seconds left (estimated).
    pub eta_relative: f64,
    /// The state snapshot.
    pub state: Value,
    /// The latest preview, base64 PNG.
    pub current_image: Option<String>,
    /// Info text.
    pub textinfo: Option<String>,
}

/// A1111's options as this server keeps them.
pub fn default_options(model: &str) -> Map<String, Value> {
    let v = json!({
        "sd_model_checkpoint": model,
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "sd_vae": "Automatic",
        "live_previews_enable": true,
        "eta_noise_seed_delta": 0,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn refuse_unsupported(p: &Processing) -> Result<(), ApiError> {
    let checks: [(&str, bool, &str); 6] = [
        (
            "styles",
            p.styles.as_ref().is_some_and(|s| !s.is_empty()),
            "no styles are defined",
        ),
        (
            "subseed_strength",
            p.subseed_strength.is_some_and(|s| s != 0.0),
            "variation seeds are not supported",
        ),
        (
            "restore_faces",
            p.restore_faces == Some(true),
            "face restoration is not available",
        ),
        ("tiling", p.tiling == Some(true), "tiling is not available"),
        (
            "refiner_checkpoint",
            p.refiner_checkpoint.as_ref().is_some_and(|s| !s.is_empty()),
            "refiners are not available through this API",
        ),
        (
            "script_name",
            p.script_name.as_ref().is_some_and(|s| !s.is_empty()),
            "no scripts are installed",
        ),
    ];
    match checks.iter().find(|(_, bad, _)| *bad) {
        Some((field, _, why)) => Err(ApiError::invalid(*field, *why)),
        None => Ok(()),
    }
}

/// A draft from the shared fields: model from the override or the current option,
/// LoRA tags out of the prompt, A1111's defaults.
fn draft(shared: &Shared, p: &Processing) -> Result<Draft, ApiError> {
    refuse_unsupported(p)?;
    let options = crate::lock(&shared.options).clone();
    let setting = |key: &str| {
        p.override_settings
            .as_ref()
            .and_then(|o| o.get(key))
            .or_else(|| options.get(key))
            .cloned()
    };
    let model = match setting("sd_model_checkpoint") {
        // Empty: an API replica whose workers had announced no model at start.
        Some(Value::String(s)) if !s.is_empty() => Some(checkpoint_name(shared, &s)?),
        _ => None,
    };
    let clip_skip = match setting("CLIP_stop_at_last_layers") {
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::invalid("CLIP_stop_at_last_layers", "an integer"))?
                - 1,
        ),
        None => None,
    };
    let raw = p.prompt.clone().unwrap_or_default();
    let (prompt, loras) = if p.disable_extra_networks == Some(true) {
        (raw, Vec::new())
    } else {
        validate::extract_loras(&raw)?
    };
    let limits = &shared.config.limits;
    let size = validate::check_size(
        p.width.unwrap_or(512),
        p.height.unwrap_or(512),
        limits,
        "width",
    )?;
    let n = p
        .batch_size
        .unwrap_or(1)
        .checked_mul(p.n_iter.unwrap_or(1))
        .unwrap_or(i64::MAX);
    let sampler = p
        .sampler_name
        .clone()
        .or_else(|| p.sampler_index.clone())
        .unwrap_or_else(|| "Euler".into());
    Ok(Draft {
        model,
        prompt,
        negative_prompt: p.negative_prompt.clone(),
        size: Some(size),
        n,
        steps: Some(p.steps.unwrap_or(50)),
        guidance: Some(p.cfg_scale.unwrap_or(7.0)),
        seed: p.seed,
        sampler: Some(sampler),
        scheduler: p.scheduler.clone(),
        loras: loras.into_iter().map(|(n, w)| (n, f64::from(w))).collect(),
        clip_skip: clip_skip.map(|c| c.max(0)),
        ..Draft::default()
    })
}

/// A configured model's name from an A1111 checkpoint title (`name`,
/// `name.safetensors`, `name [hash]`).
fn checkpoint_name(shared: &Shared, title: &str) -> Result<String, ApiError> {
    let base = title.split(" [").next().unwrap_or(title).trim();
    let base = base
        .strip_suffix(".safetensors")
        .or_else(|| base.strip_suffix(".ckpt"))
        .unwrap_or(base);
    shared.registry.resolve(base).map(|c| c.name.clone())
}

/// The ControlNet units of `alwayson_scripts.controlnet.args`.
fn control_units(
    shared: &Shared,
    p: &Processing,
    init: Option<&DynamicImage>,
    draft: &mut Draft,
) -> Result<(), ApiError> {
    let Some(cn) = p
        .alwayson_scripts
        .as_ref()
        .and_then(|s| s.get("controlnet").or_else(|| s.get("ControlNet")))
    else {
        return Ok(());
    };
    let args = cn.get("args").cloned().unwrap_or(Value::Array(Vec::new()));
    let units: Vec<ControlNetUnit> = serde_json::from_value(args)
        .map_err(|e| ApiError::invalid("alwayson_scripts.controlnet.args", e.to_string()))?;
    let (w, h) = draft.size.unwrap_or((512, 512));
    let mut modes = Vec::new();
    for u in units.into_iter().filter(|u| u.enabled != Some(false)) {
        let model = u.model.clone().unwrap_or_default();
        let name = model.split(" [").next().unwrap_or("").trim().to_string();
        if name.is_empty() || name == "None" {
            continue;
        }
        let image = match &u.image {
            Some(Value::String(s)) => {
                validate::decode_base64_image(s, &shared.config.limits, "controlnet image")?
            }
            Some(Value::Object(o)) => match o.get("image") {
                Some(Value::String(s)) => {
                    validate::decode_base64_image(s, &shared.config.limits, "controlnet image")?
                }
                _ => {
                    return Err(ApiError::invalid(
                        "controlnet image",
                        "`image` must be a base64 string",
                    ));
                }
            },
            None | Some(Value::Null) => init
                .cloned()
                .ok_or_else(|| ApiError::invalid("controlnet image", "each unit needs an image"))?,
            Some(_) => return Err(ApiError::invalid("controlnet image", "a base64 string")),
        };
        // Depth Anything is a network: it runs on the generation thread, not here.
        let depth = matches!(
            u.module.as_deref(),
            Some("depth_anything" | "depth_anything_v2")
        );
        let image = if depth {
            image
        } else {
            preprocess(&u, &image)?
        };
        let image = image
            .resize_exact(w as u32, h as u32, FilterType::Lanczos3)
            .to_rgb8();
        modes.push(control_mode(u.control_mode.as_ref())?);
        draft.control.push(ControlDraft {
            name,
            image,
            depth,
            scale: u.weight.unwrap_or(1.0),
            start: u.guidance_start.unwrap_or(0.0),
            end: u.guidance_end.unwrap_or(1.0),
        });
    }
    if modes.windows(2).any(|m| m[0] != m[1]) {
        return Err(ApiError::invalid(
            "control_mode",
            "every unit must use the same control mode",
        ));
    }
    draft.guess_mode = modes.first().copied().unwrap_or(false);
    Ok(())
}

/// Whether a control mode is "ControlNet is more important" (diffusers' guess mode).
fn control_mode(mode: Option<&Value>) -> Result<bool, ApiError> {
    match mode {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Number(n)) if n.as_i64() == Some(0) => Ok(false),
        Some(Value::Number(n)) if n.as_i64() == Some(2) => Ok(true),
        Some(Value::String(s)) if s == "Balanced" => Ok(false),
        Some(Value::String(s)) if s == "ControlNet is more important" => Ok(true),
        Some(other) => Err(ApiError::invalid(
            "control_mode",
            format!("{other}: 0 (Balanced) or 2 (ControlNet is more important)"),
        )),
    }
}

fn preprocess(u: &ControlNetUnit, image: &DynamicImage) -> Result<DynamicImage, ApiError> {
    match u.module.as_deref().unwrap_or("none") {
        "none" | "None" => Ok(image.clone()),
        "canny" => {
            let low =
                validate::check_range(u.threshold_a.unwrap_or(100.0), 1.0, 255.0, "threshold_a")?;
            let high =
                validate::check_range(u.threshold_b.unwrap_or(200.0), 1.0, 255.0, "threshold_b")?;
            sd_pipelines::preprocess::canny(image, low as f32, high as f32)
                .map(DynamicImage::ImageRgb8)
                .map_err(|e| ApiError::invalid("module", e.to_string()))
        }
        other => Err(ApiError::invalid(
            "module",
            format!(
                "preprocessor `{other}` is not available here: use `canny`, `depth_anything` (with \
                 the model's `depth_model`), or `none` with a preprocessed image"
            ),
        )),
    }
}

fn hires(r: &Txt2ImgRequest, size: (usize, usize)) -> Result<Option<HiresSpec>, ApiError> {
    if r.enable_hr != Some(true) {
        return Ok(None);
    }
    let upscaler = match r.hr_upscaler.as_deref().unwrap_or("Latent") {
        "Latent" | "None" | "" => sd_pipelines::HiresUpscaler::Latent,
        "Latent (nearest)" | "Latent (nearest-exact)" => sd_pipelines::HiresUpscaler::LatentNearest,
        "Latent (bicubic)" | "Latent (bicubic antialiased)" => {
            sd_pipelines::HiresUpscaler::LatentBicubic
        }
        "Lanczos" => sd_pipelines::HiresUpscaler::Lanczos,
        other => {
            return Err(ApiError::invalid(
                "hr_upscaler",
                format!("`{other}`: Latent, Latent (nearest), Latent (bicubic) or Lanczos"),
            ));
        }
    };
    let (rx, ry) = (r.hr_resize_x.unwrap_or(0), r.hr_resize_y.unwrap_or(0));
    let scale = match (rx, ry) {
        (0, 0) => r.hr_scale.unwrap_or(2.0),
        (x, 0) => x as f64 / size.0 as f64,
        (0, y) => y as f64 / size.1 as f64,
        (x, y) => {
            let s = x as f64 / size.0 as f64;
            if (y as f64 / size.1 as f64 - s).abs() > 0.01 {
                return Err(ApiError::invalid(
                    "hr_resize_x",
                    "hr_resize_x and hr_resize_y must keep the aspect",
                ));
            }
            s
        }
    };
    let scale = validate::check_range(scale, 1.0, 4.0, "hr_scale")?;
    let steps = match r.hr_second_pass_steps.unwrap_or(0) {
        0 => None,
        s => Some(validate::check_range(s as f64, 1.0, 150.0, "hr_second_pass_steps")? as usize),
    };
    let strength = validate::check_range(
        r.base.denoising_strength.unwrap_or(0.7),
        0.01,
        1.0,
        "denoising_strength",
    )?;
    Ok(Some(HiresSpec {
        scale,
        strength,
        steps,
        upscaler,
    }))
}

/// The checked job of a `POST /sdapi/v1/txt2img` body (nothing is queued), the
/// request echoed as A1111 does, and the hires strength.
///
/// # Errors
/// What is wrong with the body, as a 4xx.
pub fn txt2img_spec(
    shared: &Shared,
    client: &Client,
    body: &[u8],
) -> Result<(JobSpec, Value), ApiError> {
    let r: Txt2ImgRequest = parse_slice(body)?;
    let mut d = draft(shared, &r.base)?;
    let size = d.size.unwrap_or((512, 512));
    d.hires = hires(&r, size)?;
    control_units(shared, &r.base, None, &mut d)?;
    if let Some(h) = &d.hires {
        let target = |side: usize| ((side as f64 * h.scale) as usize / 8 * 8) as i64;
        validate::check_size(
            target(size.0),
            target(size.1),
            &shared.config.limits,
            "hr_scale",
        )?;
    }
    let spec = d.into_spec(shared, client)?;
    Ok((spec, serde_json::to_value(&r).unwrap_or(Value::Null)))
}

/// Text to image.
#[utoipa::path(post, path = "/sdapi/v1/txt2img", request_body = Txt2ImgRequest,
    responses((status = 200, body = ImageResponse), (status = 400), (status = 404), (status = 429)))]
pub async fn txt2img(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    body: Result<Bytes, BytesRejection>,
) -> A1111Result<Json<ImageResponse>> {
    generate(&shared, &client, body, txt2img_spec).await
}

/// What builds a job from a body: [`txt2img_spec`] or [`img2img_spec`].
type SpecFn = fn(&Shared, &Client, &[u8]) -> Result<(JobSpec, Value), ApiError>;

/// A synchronous A1111 generation: the job checked, run, answered with `info`.
async fn generate(
    shared: &Arc<Shared>,
    client: &Client,
    body: Result<Bytes, BytesRejection>,
    spec_of: SpecFn,
) -> A1111Result<Json<ImageResponse>> {
    let bytes = body_bytes(body, shared.config.limits.max_body_bytes)?;
    let (spec, parameters) = spec_of(shared, client, &bytes)?;
    let strength = match (&spec.init, &spec.hires) {
        (Some(init), _) => Some(init.strength),
        (None, Some(hires)) => Some(hires.strength),
        (None, None) => None,
    };
    let (spec, images) = run(shared, spec).await?;
    Ok(Json(response(&spec, &images, parameters, strength)))
}

/// The checked job of a `POST /sdapi/v1/img2img` body (nothing is queued) and the
/// request echoed as A1111 does (without the pictures).
///
/// # Errors
/// What is wrong with the body, as a 4xx.
pub fn img2img_spec(
    shared: &Shared,
    client: &Client,
    body: &[u8],
) -> Result<(JobSpec, Value), ApiError> {
    let limits = &shared.config.limits;
    let r: Img2ImgRequest = parse_slice(body)?;
    let mut d = draft(shared, &r.base)?;
    let first = r
        .init_images
        .as_ref()
        .and_then(|i| i.first())
        .ok_or_else(|| ApiError::invalid("init_images", "one init image is required"))?;
    let init = validate::decode_base64_image(first, limits, "init_images")?;
    let (w, h) = d.size.unwrap_or((512, 512));
    let resize_mode = r.resize_mode.unwrap_or(0);
    let init = resize_init(&init, w as u32, h as u32, resize_mode)?;
    let strength = r.base.denoising_strength.unwrap_or(0.75);
    control_units(shared, &r.base, Some(&init), &mut d)?;
    let init_rgb = init.to_rgb8();
    match &r.mask {
        Some(m) if !m.is_empty() => {
            let mask = validate::decode_base64_image(m, limits, "mask")?;
            let mask = resize_init(&mask, w as u32, h as u32, resize_mode)?.to_luma8();
            inpaint(&r, &mut d, init_rgb, &mask, strength)?;
        }
        _ => {
            d.init = Some(InitSpec {
                image: init_rgb,
                mask: None,
                strength,
            })
        }
    }
    let spec = d.into_spec(shared, client)?;
    let mut parameters = serde_json::to_value(&r).unwrap_or(Value::Null);
    if let Some(o) = parameters.as_object_mut() {
        o.insert("init_images".into(), Value::Null);
        o.insert("mask".into(), Value::Null);
    }
    Ok((spec, parameters))
}

/// Image to image and inpainting.
#[utoipa::path(post, path = "/sdapi/v1/img2img", request_body = Img2ImgRequest,
    responses((status = 200, body = ImageResponse), (status = 400), (status = 404), (status = 429)))]
pub async fn img2img(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
    body: Result<Bytes, BytesRejection>,
) -> A1111Result<Json<ImageResponse>> {
    generate(&shared, &client, body, img2img_spec).await
}

/// A1111's inpainting: mask blurred / inverted, the hole pre-filled, "only masked"
/// cropping, the overlay that pastes the result back.
fn inpaint(
    r: &Img2ImgRequest,
    d: &mut Draft,
    image: image::RgbImage,
    mask: &image::GrayImage,
    strength: f64,
) -> Result<(), ApiError> {
    let blur = validate::check_range(r.mask_blur.unwrap_or(4.0), 0.0, 64.0, "mask_blur")? as f32;
    let invert = match r.inpainting_mask_invert.unwrap_or(0) {
        0 => false,
        1 => true,
        v => {
            return Err(ApiError::invalid(
                "inpainting_mask_invert",
                format!("{v}: 0 or 1"),
            ));
        }
    };
    let sharp = prepare_mask(mask, invert, 0.0);
    let blurred = prepare_mask(mask, invert, blur);
    let base = match r.inpainting_fill.unwrap_or(0) {
        0 => fill(&image, &sharp),
        1 => image.clone(),
        v => {
            return Err(ApiError::invalid(
                "inpainting_fill",
                format!("{v}: 0 (fill) or 1 (original); latent noise / nothing are not available"),
            ));
        }
    };
    let (w, h) = d
        .size
        .unwrap_or((image.width() as usize, image.height() as usize));
    let padding = r.inpaint_full_res_padding.unwrap_or(0).clamp(0, 4096) as u32;
    let region = if r.inpaint_full_res.unwrap_or(true) {
        crop_region(&sharp, padding, w as u32, h as u32)
    } else {
        None
    }
    .unwrap_or((0, 0, image.width(), image.height()));
    let (x, y, rw, rh) = region;
    let crop = |i: &DynamicImage| {
        i.crop_imm(x, y, rw, rh)
            .resize_exact(w as u32, h as u32, FilterType::Lanczos3)
    };
    let picture = crop(&DynamicImage::ImageRgb8(base)).to_rgb8();
    let model_mask = crop(&DynamicImage::ImageLuma8(blurred.clone())).to_luma8();
    d.init = Some(InitSpec {
        image: picture,
        mask: Some(model_mask),
        strength,
    });
    d.overlay = Some(Overlay {
        original: image,
        mask: blurred,
        region,
    });
    Ok(())
}

fn resize_init(image: &DynamicImage, w: u32, h: u32, mode: i64) -> Result<DynamicImage, ApiError> {
    match mode {
        0 => Ok(image.resize_exact(w, h, FilterType::Lanczos3)),
        1 => Ok(image.resize_to_fill(w, h, FilterType::Lanczos3)),
        m => Err(ApiError::invalid(
            "resize_mode",
            format!("{m}: 0 (just resize) or 1 (crop and resize)"),
        )),
    }
}

async fn run(
    shared: &Arc<Shared>,
    spec: JobSpec,
) -> Result<(JobSpec, Arc<Vec<JobImage>>), ApiError> {
    let (job, images) = run_to_end(shared, spec).await?;
    Ok((job.spec.clone(), images))
}

/// The response with A1111's `info` JSON string.
fn response(
    spec: &JobSpec,
    images: &[JobImage],
    parameters: Value,
    strength: Option<f64>,
) -> ImageResponse {
    let first = &images[0].parameters;
    let seeds: Vec<u64> = images.iter().map(|i| i.parameters.seed).collect();
    let info = json!({
        "prompt": first.prompt,
        "all_prompts": images.iter().map(|i| i.parameters.prompt.clone()).collect::<Vec<_>>(),
        "negative_prompt": first.negative_prompt,
        "all_negative_prompts": images.iter().map(|i| i.parameters.negative_prompt.clone()).collect::<Vec<_>>(),
        "seed": first.seed,
        "all_seeds": seeds,
        "subseed": first.seed,
        "all_subseeds": seeds,
        "subseed_strength": 0,
        "width": first.width,
        "height": first.height,
        "sampler_name": first.sampler,
        "cfg_scale": first.cfg_scale,
        "steps": first.steps,
        "batch_size": images.len(),
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": first.model,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": images.iter().map(|i| i.parameters.to_a1111()).collect::<Vec<_>>(),
        "styles": [],
        "job_timestamp": job_timestamp(),
        "clip_skip": spec.clip_skip.map_or(1, |c| c + 1),
        "is_using_inpainting_conditioning": spec.init.as_ref().is_some_and(|i| i.mask.is_some()),
        "version": concat!("sd-server ", env!("CARGO_PKG_VERSION")),
    });
    ImageResponse {
        images: images.iter().map(|i| b64(&i.png)).collect(),
        parameters,
        info: info.to_string(),
    }
}

/// `YYYYMMDDhhmmss` (UTC), as A1111's `job_timestamp`.
fn job_timestamp() -> String {
    let secs = super::unix_now() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `?skip_current_image=true` leaves the preview out.
#[derive(Debug, Deserialize)]
pub struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

/// The progress of the job running (or last run).
#[utoipa::path(get, path = "/sdapi/v1/progress", responses((status = 200, body = ProgressResponse)))]
pub async fn progress(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<ProgressQuery>, QueryRejection>,
) -> Json<ProgressResponse> {
    let skip = query.is_ok_and(|q| q.skip_current_image);
    // A shared queue's count already holds the running jobs.
    let running_here = if shared.cluster.is_some() {
        0
    } else {
        let active = shared.store.active();
        active
            .iter()
            .filter(|j| j.state() == JobState::Running)
            .count()
    };
    let job_count = shared.queued_total() + running_here;
    // The job a generation thread here started last; on an API replica of a
    // shared queue, a running job this replica follows.
    let current = shared
        .store
        .current()
        .filter(|j| j.state() == JobState::Running)
        .or_else(|| {
            let active = shared.store.active();
            active.into_iter().find(|j| j.state() == JobState::Running)
        });
    let Some(job) = current else {
        return Json(ProgressResponse {
            progress: 0.0,
            eta_relative: 0.0,
            state: state_json("", job_count, 0, 0),
            current_image: None,
            textinfo: None,
        });
    };
    let p = job.progress();
    let progress = if p.total > 0 {
        p.step as f64 / p.total as f64
    } else {
        0.0
    };
    let elapsed = p.running_for.unwrap_or(Duration::ZERO).as_secs_f64();
    let eta = if progress > 0.0 {
        elapsed / progress - elapsed
    } else {
        0.0
    };
    Json(ProgressResponse {
        progress,
        eta_relative: eta,
        state: state_json(&job.id, job_count, p.step, p.total),
        current_image: if skip {
            None
        } else {
            p.preview.as_deref().map(b64)
        },
        textinfo: None,
    })
}

fn state_json(job: &str, job_count: usize, step: usize, steps: usize) -> Value {
    json!({
        "skipped": false,
        "interrupted": false,
        "stopping_generation": false,
        "job": job,
        "job_count": job_count,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": step,
        "sampling_steps": steps,
    })
}

/// Stops the running jobs (the caller's own when API keys are configured); their
/// requests answer with the pictures of the latents so far, as A1111's do.
#[utoipa::path(post, path = "/sdapi/v1/interrupt", responses((status = 200)))]
pub async fn interrupt(
    State(shared): State<Arc<Shared>>,
    Extension(client): Extension<Client>,
) -> Json<Value> {
    let own = !shared.config.api_keys.is_empty();
    for job in shared.store.active() {
        if job.state() == JobState::Running && (!own || job.spec.client == client.0) {
            shared.interrupt(&job);
        }
    }
    Json(json!({}))
}

/// The configured models.
#[utoipa::path(get, path = "/sdapi/v1/sd-models", responses((status = 200)))]
pub async fn sd_models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(Value::Array(
        shared
            .registry
            .names()
            .into_iter()
            .map(|n| json!({"title": n, "model_name": n, "hash": null, "sha256": null, "filename": n, "config": null}))
            .collect(),
    ))
}

/// The samplers.
#[utoipa::path(get, path = "/sdapi/v1/samplers", responses((status = 200)))]
pub async fn samplers() -> Json<Value> {
    Json(Value::Array(
        sd_schedulers::SCHEDULER_NAMES
            .iter()
            .map(|e| json!({"name": e.a1111, "aliases": e.aliases, "options": {}}))
            .collect(),
    ))
}

/// The schedule types.
#[utoipa::path(get, path = "/sdapi/v1/schedulers", responses((status = 200)))]
pub async fn schedulers() -> Json<Value> {
    Json(Value::Array(
        SCHEDULERS
            .iter()
            .map(|(name, label)| {
                let rho = if *name == "karras" { 7.0 } else { -1.0 };
                json!({"name": name, "label": label, "aliases": null, "default_rho": rho, "need_inner_model": false})
            })
            .collect(),
    ))
}

/// The current model's LoRAs.
#[utoipa::path(get, path = "/sdapi/v1/loras", responses((status = 200)))]
pub async fn loras(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let model = current_model(&shared);
    Json(Value::Array(
        shared
            .registry
            .loras(&model)
            .into_keys()
            .map(|n| json!({"name": n, "alias": n, "path": format!("{n}.safetensors"), "metadata": {}}))
            .collect(),
    ))
}

/// Re-reads the LoRA folders.
#[utoipa::path(post, path = "/sdapi/v1/refresh-loras", responses((status = 200)))]
pub async fn refresh_loras(State(shared): State<Arc<Shared>>) -> Json<Value> {
    // An API replica's LoRA names are the workers' (they look again every 10 s).
    if shared.cluster.is_none() {
        shared.registry.refresh_loras();
    }
    Json(Value::Null)
}

fn current_model(shared: &Shared) -> String {
    crate::lock(&shared.options)
        .get("sd_model_checkpoint")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map_or_else(|| shared.registry.default_name(), String::from)
}

/// The options.
#[utoipa::path(get, path = "/sdapi/v1/options", responses((status = 200)))]
pub async fn get_options(State(shared): State<Arc<Shared>>) -> Json<Map<String, Value>> {
    Json(crate::lock(&shared.options).clone())
}

/// Sets options: `sd_model_checkpoint` (a configured model only),
/// `CLIP_stop_at_last_layers`; other keys are ignored as A1111 ignores unknown ones.
#[utoipa::path(post, path = "/sdapi/v1/options", responses((status = 200), (status = 400), (status = 404)))]
pub async fn set_options(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> A1111Result<Json<Value>> {
    let req: Map<String, Value> = parse_json(body, shared.config.limits.max_body_bytes)?;
    let mut updates = Vec::new();
    for (key, value) in req {
        match key.as_str() {
            "sd_model_checkpoint" => {
                let title = value
                    .as_str()
                    .ok_or_else(|| ApiError::invalid(key.clone(), "a model name"))?;
                updates.push((key, Value::String(checkpoint_name(&shared, title)?)));
            }
            "CLIP_stop_at_last_layers" => {
                let v = value.as_i64().filter(|v| (1..=12).contains(v));
                let v =
                    v.ok_or_else(|| ApiError::invalid(key.clone(), "an integer from 1 to 12"))?;
                updates.push((key, Value::from(v)));
            }
            other => tracing::debug!(option = other, "option not used by this server; ignored"),
        }
    }
    crate::lock(&shared.options).extend(updates);
    Ok(Json(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_is_a_civil_date() {
        let t = job_timestamp();
        assert_eq!(t.len(), 14);
        assert!(t.starts_with("20"), "{t}");
    }

    #[test]
    fn control_modes() {
        assert!(!control_mode(Some(&json!(0))).unwrap());
        assert!(control_mode(Some(&json!("ControlNet is more important"))).unwrap());
        assert!(control_mode(Some(&json!(1))).is_err());
    }
}
