//! Jobs as they travel between machines (the Redis queue of [`crate::cluster`]):
//! [`WireSpec`] for a [`JobSpec`], [`WireImage`] for a finished picture,
//! [`WireError`] for an [`ApiError`] and [`WireEvent`] for a [`JobEvent`], all JSON
//! with pictures as base64 PNG. A spec read back is the spec written (tested).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use image::{GrayImage, RgbImage};
use sd_io::image::GenerationParameters;
use sd_pipelines::HiresUpscaler;
use sd_schedulers::{AysPreset, SigmaSchedule};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::job::{ControlSpec, HiresSpec, InitSpec, JobEvent, JobImage, JobSpec, JobState};
use crate::overlay::Overlay;

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bytes as base64 in JSON.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// PNG bytes as base64 in JSON, for optional fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Png(#[serde(with = "b64")] Vec<u8>);

fn png_of(image: &RgbImage) -> Vec<u8> {
    sd_io::image::encode_rgb_png(image, None).unwrap_or_default()
}

fn gray_png_of(image: &GrayImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let _ = image.write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}

fn decode(png: &[u8], what: &str) -> Result<image::DynamicImage, String> {
    image::load_from_memory(png).map_err(|e| format!("{what}: {e}"))
}

/// An init image on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireInit {
    #[serde(with = "b64")]
    image: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mask: Option<Png>,
    strength: f64,
}

/// A ControlNet input on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireControl {
    name: String,
    index: usize,
    #[serde(with = "b64")]
    image: Vec<u8>,
    depth: bool,
    scale: f64,
    start: f64,
    end: f64,
}

/// A1111's inpainting overlay on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireOverlay {
    #[serde(with = "b64")]
    original: Vec<u8>,
    #[serde(with = "b64")]
    mask: Vec<u8>,
    region: (u32, u32, u32, u32),
}

/// A [`JobSpec`] on the wire; the deadline is wall-clock milliseconds since the
/// Unix epoch (machines' clocks are assumed in step, as NTP keeps them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSpec {
    model: String,
    client: String,
    prompt: String,
    negative_prompt: String,
    #[serde(default)]
    prompt_2: Option<String>,
    #[serde(default)]
    negative_prompt_2: Option<String>,
    #[serde(default)]
    sd3: crate::job::Sd3Options,
    size: Option<(usize, usize)>,
    steps: usize,
    guidance: f64,
    seed: u64,
    scheduler: Option<String>,
    /// `karras:RHO`, `exponential` or `model`.
    sigma_schedule: Option<String>,
    n: usize,
    clip_skip: Option<usize>,
    loras: Vec<(String, f32)>,
    init: Option<WireInit>,
    /// `(scale, strength, steps, upscaler)`.
    hires: Option<(f64, f64, Option<usize>, String)>,
    control: Vec<WireControl>,
    guess_mode: bool,
    deadline_ms: Option<u64>,
    overlay: Option<WireOverlay>,
}

fn schedule_name(s: &SigmaSchedule) -> String {
    match s {
        SigmaSchedule::Karras { rho } => format!("karras:{rho}"),
        SigmaSchedule::Exponential => "exponential".into(),
        SigmaSchedule::Model => "model".into(),
        SigmaSchedule::AlignYourSteps(AysPreset::Sd15) => "ays:sd15".into(),
        SigmaSchedule::AlignYourSteps(AysPreset::Sdxl) => "ays:sdxl".into(),
        SigmaSchedule::Custom(sigmas) => format!("custom:{sigmas:?}"),
    }
}

fn schedule_of(name: &str) -> Result<SigmaSchedule, String> {
    match name.split_once(':') {
        Some(("karras", rho)) => rho
            .parse()
            .map(|rho| SigmaSchedule::Karras { rho })
            .map_err(|e| format!("sigma schedule `{name}`: {e}")),
        Some(("ays", "sd15")) => Ok(SigmaSchedule::AlignYourSteps(AysPreset::Sd15)),
        Some(("ays", "sdxl")) => Ok(SigmaSchedule::AlignYourSteps(AysPreset::Sdxl)),
        Some(("custom", list)) => serde_json::from_str(list)
            .map(SigmaSchedule::Custom)
            .map_err(|e| format!("sigma schedule `{name}`: {e}")),
        _ if name == "exponential" => Ok(SigmaSchedule::Exponential),
        _ if name == "model" => Ok(SigmaSchedule::Model),
        _ => Err(format!("unknown sigma schedule `{name}`")),
    }
}

const UPSCALERS: [(HiresUpscaler, &str); 4] = [
    (HiresUpscaler::Latent, "latent"),
    (HiresUpscaler::LatentNearest, "latent-nearest"),
    (HiresUpscaler::LatentBicubic, "latent-bicubic"),
    (HiresUpscaler::Lanczos, "lanczos"),
];

fn deadline_ms(deadline: Instant) -> u64 {
    let left = deadline.saturating_duration_since(Instant::now());
    unix_ms() + left.as_millis() as u64
}

fn deadline_of(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms.saturating_sub(unix_ms()))
}

impl From<&JobSpec> for WireSpec {
    fn from(s: &JobSpec) -> Self {
        Self {
            model: s.model.clone(),
            client: s.client.clone(),
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            prompt_2: s.prompt_2.clone(),
            negative_prompt_2: s.negative_prompt_2.clone(),
            sd3: s.sd3.clone(),
            size: s.size,
            steps: s.steps,
            guidance: s.guidance,
            seed: s.seed,
            scheduler: s.scheduler.clone(),
            sigma_schedule: s.sigma_schedule.as_ref().map(schedule_name),
            n: s.n,
            clip_skip: s.clip_skip,
            loras: s.loras.clone(),
            init: s.init.as_ref().map(|i| WireInit {
                image: png_of(&i.image),
                mask: i.mask.as_ref().map(|m| Png(gray_png_of(m))),
                strength: i.strength,
            }),
            hires: s.hires.as_ref().map(|h| {
                let up = UPSCALERS.iter().find(|(u, _)| *u == h.upscaler);
                let name = up.map_or("latent", |(_, n)| n).to_string();
                (h.scale, h.strength, h.steps, name)
            }),
            control: s
                .control
                .iter()
                .map(|c| WireControl {
                    name: c.name.clone(),
                    index: c.index,
                    image: png_of(&c.image),
                    depth: c.depth,
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                })
                .collect(),
            guess_mode: s.guess_mode,
            deadline_ms: s.deadline.map(deadline_ms),
            overlay: s.overlay.as_ref().map(|o| WireOverlay {
                original: png_of(&o.original),
                mask: gray_png_of(&o.mask),
                region: o.region,
            }),
        }
    }
}

impl WireSpec {
    /// The model it is for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The spec again.
    ///
    /// # Errors
    /// A picture that does not decode, an unknown schedule or upscaler (a message
    /// written by a different version).
    pub fn into_spec(self) -> Result<JobSpec, String> {
        let init = match self.init {
            None => None,
            Some(i) => {
                let mask = match i.mask {
                    None => None,
                    Some(m) => Some(decode(&m.0, "mask")?.to_luma8()),
                };
                Some(InitSpec {
                    image: decode(&i.image, "init image")?.to_rgb8(),
                    mask,
                    strength: i.strength,
                })
            }
        };
        let hires = match self.hires {
            None => None,
            Some((scale, strength, steps, name)) => {
                let upscaler = UPSCALERS
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|(u, _)| *u)
                    .ok_or_else(|| format!("unknown upscaler `{name}`"))?;
                Some(HiresSpec {
                    scale,
                    strength,
                    steps,
                    upscaler,
                })
            }
        };
        let control = self
            .control
            .into_iter()
            .map(|c| {
                Ok(ControlSpec {
                    image: decode(&c.image, "control image")?.to_rgb8(),
                    name: c.name,
                    index: c.index,
                    depth: c.depth,
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let overlay = match self.overlay {
            None => None,
            Some(o) => Some(Overlay {
                original: decode(&o.original, "overlay")?.to_rgb8(),
                mask: decode(&o.mask, "overlay mask")?.to_luma8(),
                region: o.region,
            }),
        };
        Ok(JobSpec {
            model: self.model,
            client: self.client,
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            prompt_2: self.prompt_2,
            negative_prompt_2: self.negative_prompt_2,
            sd3: self.sd3,
            size: self.size,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            scheduler: self.scheduler,
            sigma_schedule: self
                .sigma_schedule
                .as_deref()
                .map(schedule_of)
                .transpose()?,
            n: self.n,
            clip_skip: self.clip_skip,
            loras: self.loras,
            init,
            hires,
            control,
            guess_mode: self.guess_mode,
            deadline: self.deadline_ms.map(deadline_of),
            overlay,
        })
    }
}

/// A finished picture on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireImage {
    #[serde(with = "b64")]
    png: Vec<u8>,
    prompt: String,
    negative_prompt: String,
    steps: usize,
    sampler: String,
    cfg_scale: f64,
    seed: u64,
    width: usize,
    height: usize,
    model: String,
    #[serde(default)]
    nsfw_content_detected: Option<bool>,
}

impl From<&JobImage> for WireImage {
    fn from(i: &JobImage) -> Self {
        let p = &i.parameters;
        Self {
            png: i.png.clone(),
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            steps: p.steps,
            sampler: p.sampler.clone(),
            cfg_scale: p.cfg_scale,
            seed: p.seed,
            width: p.width,
            height: p.height,
            model: p.model.clone(),
            nsfw_content_detected: i.nsfw_content_detected,
        }
    }
}

impl From<WireImage> for JobImage {
    fn from(w: WireImage) -> Self {
        Self {
            png: w.png,
            parameters: GenerationParameters {
                prompt: w.prompt,
                negative_prompt: w.negative_prompt,
                steps: w.steps,
                sampler: w.sampler,
                cfg_scale: w.cfg_scale,
                seed: w.seed,
                width: w.width,
                height: w.height,
                model: w.model,
            },
            nsfw_content_detected: w.nsfw_content_detected,
        }
    }
}

/// A job's error on the wire (the errors a job can end with).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireError {
    /// [`ApiError::Cancelled`].
    Cancelled,
    /// [`ApiError::Deadline`].
    Deadline {
        /// The deadline, seconds after submission.
        secs: u64,
    },
    /// [`ApiError::Generation`].
    Generation {
        /// The pipeline's words.
        message: String,
    },
    /// [`ApiError::Unavailable`].
    Unavailable {
        /// Why.
        message: String,
    },
    /// [`ApiError::NotFound`] (a LoRA gone from a worker's folder).
    NotFound {
        /// What was asked for.
        name: String,
        /// The whole message.
        message: String,
    },
    /// Anything else, as [`ApiError::Internal`].
    Internal {
        /// The message.
        message: String,
    },
}

impl From<&ApiError> for WireError {
    fn from(e: &ApiError) -> Self {
        match e {
            ApiError::Cancelled => Self::Cancelled,
            ApiError::Deadline(d) => Self::Deadline { secs: d.as_secs() },
            ApiError::Generation(m) => Self::Generation { message: m.clone() },
            ApiError::Unavailable(m) => Self::Unavailable { message: m.clone() },
            ApiError::Internal(m) => Self::Internal { message: m.clone() },
            ApiError::NotFound { name, .. } => Self::NotFound {
                name: name.clone(),
                message: e.to_string(),
            },
            other => Self::Internal {
                message: other.to_string(),
            },
        }
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Cancelled => Self::Cancelled,
            WireError::Deadline { secs } => Self::Deadline(Duration::from_secs(secs)),
            WireError::Generation { message } => Self::Generation(message),
            WireError::Unavailable { message } => Self::Unavailable(message),
            WireError::NotFound { message, .. } | WireError::Internal { message } => {
                Self::Internal(message)
            }
        }
    }
}

/// What a job ended with on the wire: its pictures or its error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireResult {
    /// Pictures.
    Images(Vec<WireImage>),
    /// An error.
    Error(WireError),
}

impl WireResult {
    /// The final state this result gives a job.
    pub fn state(&self) -> JobState {
        match self {
            Self::Images(_) => JobState::Succeeded,
            Self::Error(WireError::Cancelled) => JobState::Cancelled,
            Self::Error(_) => JobState::Failed,
        }
    }
}

impl From<&crate::store::JobResult> for WireResult {
    fn from(r: &crate::store::JobResult) -> Self {
        match r {
            Ok(images) => Self::Images(images.iter().map(WireImage::from).collect()),
            Err(e) => Self::Error(e.into()),
        }
    }
}

impl From<WireResult> for crate::store::JobResult {
    fn from(r: WireResult) -> Self {
        match r {
            WireResult::Images(images) => Ok(std::sync::Arc::new(
                images.into_iter().map(JobImage::from).collect(),
            )),
            WireResult::Error(e) => Err(e.into()),
        }
    }
}

/// A job's progress on the wire (published as it happens).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WireEvent {
    /// [`JobEvent::Started`].
    Started {
        /// Jobs in the batch.
        batch: usize,
    },
    /// [`JobEvent::Step`].
    Step {
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
    },
    /// [`JobEvent::Preview`].
    Preview {
        /// Steps done.
        step: usize,
        /// The PNG.
        #[serde(with = "b64")]
        png: Vec<u8>,
    },
    /// The job is over (its result is stored before this is sent).
    Done,
}

impl WireEvent {
    /// The wire form of a progress event; `None` for the events the queue itself
    /// tells (queued, done).
    pub fn of(event: &JobEvent) -> Option<Self> {
        match event {
            JobEvent::Started { batch } => Some(Self::Started { batch: *batch }),
            JobEvent::Step { step, total } => Some(Self::Step {
                step: *step,
                total: *total,
            }),
            JobEvent::Preview { step, png } => Some(Self::Preview {
                step: *step,
                png: png.clone(),
            }),
            JobEvent::Queued { .. } | JobEvent::Done(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_read_back_is_the_spec_written() {
        let mut spec = JobSpec::txt2img("m", "a fox");
        spec.size = Some((64, 48));
        spec.sigma_schedule = Some(SigmaSchedule::Karras { rho: 7.0 });
        spec.loras = vec![("style".into(), 0.5)];
        let picture = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 9, y as u8 * 7, 3]));
        let mask = GrayImage::from_fn(8, 8, |x, _| image::Luma([if x > 3 { 255 } else { 0 }]));
        spec.init = Some(InitSpec {
            image: picture.clone(),
            mask: Some(mask.clone()),
            strength: 0.75,
        });
        spec.hires = Some(HiresSpec {
            scale: 2.0,
            strength: 0.6,
            steps: Some(5),
            upscaler: HiresUpscaler::Lanczos,
        });
        spec.overlay = Some(Overlay {
            original: picture.clone(),
            mask: mask.clone(),
            region: (1, 2, 3, 4),
        });
        spec.deadline = Some(Instant::now() + Duration::from_secs(60));
        let json = serde_json::to_string(&WireSpec::from(&spec)).unwrap();
        let back: JobSpec = serde_json::from_str::<WireSpec>(&json)
            .unwrap()
            .into_spec()
            .unwrap();
        assert_eq!(back.sigma_schedule, spec.sigma_schedule);
        assert_eq!(back.loras, spec.loras);
        assert_eq!(back.size, spec.size);
        let init = back.init.unwrap();
        assert_eq!(init.image, picture);
        assert_eq!(init.mask.unwrap(), mask);
        assert_eq!(back.hires, spec.hires);
        assert_eq!(back.overlay.unwrap().region, (1, 2, 3, 4));
        let left = back.deadline.unwrap() - Instant::now();
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60));
    }

    #[test]
    fn errors_and_results_round_trip() {
        for e in [
            ApiError::Cancelled,
            ApiError::Deadline(Duration::from_secs(30)),
            ApiError::Generation("bad".into()),
            ApiError::Unavailable("oom".into()),
        ] {
            let wire = WireResult::from(&Err(e.clone()));
            let json = serde_json::to_string(&wire).unwrap();
            let back: crate::store::JobResult =
                serde_json::from_str::<WireResult>(&json).unwrap().into();
            assert_eq!(back.unwrap_err().to_string(), e.to_string());
        }
        assert_eq!(
            WireResult::Error(WireError::Cancelled).state(),
            JobState::Cancelled
        );
    }
}
