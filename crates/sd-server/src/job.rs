//! A job: what to generate ([`JobSpec`], checked and independent of the API it came
//! through), its state ([`JobState`]) and what it tells its watchers ([`JobEvent`]).

use std::time::{Duration, Instant, SystemTime};

use image::{GrayImage, RgbImage};
use serde::Serialize;
use utoipa::ToSchema;

/// How a hires fix runs (A1111's `enable_hr`).
#[derive(Debug, Clone, PartialEq)]
pub struct HiresSpec {
    /// Target size over the first pass's.
    pub scale: f64,
    /// Second-pass strength.
    pub strength: f64,
    /// Second-pass steps (`None`: the first pass's).
    pub steps: Option<usize>,
    /// The upscaler.
    pub upscaler: sd_pipelines::HiresUpscaler,
}

/// An init image and what to do with it.
#[derive(Debug, Clone)]
pub struct InitSpec {
    /// The picture.
    pub image: RgbImage,
    /// Where to repaint (white), for inpainting.
    pub mask: Option<GrayImage>,
    /// How much of the picture is redrawn, in (0, 1].
    pub strength: f64,
}

/// One ControlNet of a job, resolved to the model's ControlNet index.
#[derive(Debug, Clone)]
pub struct ControlSpec {
    /// The ControlNet's name.
    pub name: String,
    /// Its index among the model's ControlNets.
    pub index: usize,
    /// The control image (preprocessed, or the picture to estimate depth from).
    pub image: RgbImage,
    /// Estimate a depth map from `image` first (the model's Depth Anything), on the
    /// generation thread.
    pub depth: bool,
    /// Scale of the residuals.
    pub scale: f64,
    /// From this fraction of the steps...
    pub start: f64,
    /// ...to this one.
    pub end: f64,
}

/// SD 3's settings of a job (ignored where unset; refused by other models when
/// set).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize, ToSchema)]
pub struct Sd3Options {
    /// What the T5 encoder reads (default: the prompt).
    #[serde(default)]
    pub prompt_3: Option<String>,
    /// The T5 encoder's negative prompt (default: the negative prompt).
    #[serde(default)]
    pub negative_prompt_3: Option<String>,
    /// T5 tokens (256 by default, at most 512).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// The flow-matching shift (SD 3.5: 3.0).
    #[serde(default)]
    pub shift: Option<f64>,
    /// Skip-layer guidance's blocks (SD 3.5 Medium: 7, 8, 9); empty: off.
    #[serde(default)]
    pub skip_layer_guidance: Vec<usize>,
    /// Its scale (2.8), start and stop (0.01, 0.2: fractions of the steps).
    #[serde(default)]
    pub slg_scale: Option<f64>,
    /// Skip-layer guidance's first fraction of the steps.
    #[serde(default)]
    pub slg_start: Option<f64>,
    /// Skip-layer guidance's last fraction of the steps.
    #[serde(default)]
    pub slg_stop: Option<f64>,
}

impl Sd3Options {
    /// These settings on a request.
    pub fn apply<'a>(
        &self,
        mut r: sd_pipelines::GenerationRequest<'a>,
    ) -> sd_pipelines::GenerationRequest<'a> {
        if let Some(p) = &self.prompt_3 {
            r = r.prompt_3(p.clone());
        }
        if let Some(n) = &self.negative_prompt_3 {
            r = r.negative_prompt_3(n.clone());
        }
        if let Some(n) = self.max_sequence_length {
            r = r.max_sequence_length(n);
        }
        if let Some(s) = self.shift {
            r = r.shift(s);
        }
        if !self.skip_layer_guidance.is_empty() {
            r = r.skip_layer_guidance(sd_pipelines::SkipLayerGuidance::with_settings(
                self.skip_layer_guidance.clone(),
                self.slg_scale,
                self.slg_start,
                self.slg_stop,
            ));
        }
        r
    }
}

/// A checked job: every name resolved to the configured set, every number in range.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The model's name.
    pub model: String,
    /// Who asked (API key name, or the client's address): the unit of fairness.
    pub client: String,
    /// What to draw (LoRA tags removed).
    pub prompt: String,
    /// What to avoid (empty: none, which SDXL base encodes as zeros).
    pub negative_prompt: String,
    /// SDXL's second prompt, for the second text encoder.
    pub prompt_2: Option<String>,
    /// SDXL's second negative prompt.
    pub negative_prompt_2: Option<String>,
    /// SD 3's settings.
    pub sd3: Sd3Options,
    /// Picture size; `None`: the model's.
    pub size: Option<(usize, usize)>,
    /// Denoising steps.
    pub steps: usize,
    /// Guidance scale.
    pub guidance: f64,
    /// Seed of the first image (image `i` uses `seed + i`).
    pub seed: u64,
    /// Scheduler name (`None`: the model's own).
    pub scheduler: Option<String>,
    /// A sigma schedule over the scheduler (`karras`, `exponential`).
    pub sigma_schedule: Option<sd_schedulers::SigmaSchedule>,
    /// Images.
    pub n: usize,
    /// CLIP skip.
    pub clip_skip: Option<usize>,
    /// LoRAs: (name, strength); names are the model's LoRA files' stems.
    pub loras: Vec<(String, f32)>,
    /// img2img / inpainting input.
    pub init: Option<InitSpec>,
    /// A hires fix.
    pub hires: Option<HiresSpec>,
    /// ControlNets.
    pub control: Vec<ControlSpec>,
    /// diffusers' guess mode for the ControlNets.
    pub guess_mode: bool,
    /// When the job is given up.
    pub deadline: Option<Instant>,
    /// A1111's inpainting: where the pictures go back into the original.
    pub overlay: Option<crate::overlay::Overlay>,
}

impl JobSpec {
    /// A text-to-image job with the server's defaults (tests and benchmarks).
    pub fn txt2img(model: &str, prompt: &str) -> Self {
        Self {
            model: model.into(),
            client: "anonymous".into(),
            prompt: prompt.into(),
            negative_prompt: String::new(),
            prompt_2: None,
            negative_prompt_2: None,
            sd3: Sd3Options::default(),
            size: None,
            steps: 20,
            guidance: 7.5,
            seed: 0,
            scheduler: None,
            sigma_schedule: None,
            n: 1,
            clip_skip: None,
            loras: Vec::new(),
            init: None,
            hires: None,
            control: Vec::new(),
            guess_mode: false,
            deadline: None,
            overlay: None,
        }
    }

    /// The task's name: `txt2img`, `img2img` or `inpaint`.
    pub fn task(&self) -> &'static str {
        match &self.init {
            None => "txt2img",
            Some(InitSpec { mask: None, .. }) => "img2img",
            Some(_) => "inpaint",
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting in its model's queue.
    Queued,
    /// Being generated.
    Running,
    /// Done, with pictures.
    Succeeded,
    /// Done, with an error.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// One picture of a finished job.
#[derive(Debug, Clone)]
pub struct JobImage {
    /// The PNG, with A1111's `parameters` chunk.
    pub png: Vec<u8>,
    /// How it was made.
    pub parameters: sd_io::image::GenerationParameters,
    /// The model's safety checker's verdict (`true`: flagged, the picture is black);
    /// `None` without a checker.
    pub nsfw_content_detected: Option<bool>,
}

/// What a job's watchers are told.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// Queued, at this position (0: next).
    Queued {
        /// Jobs of the model ahead of it.
        position: usize,
    },
    /// Started (its batch has this many jobs).
    Started {
        /// Jobs in the batch.
        batch: usize,
    },
    /// A step was taken.
    Step {
        /// Steps done.
        step: usize,
        /// Steps in all.
        total: usize,
    },
    /// A preview PNG.
    Preview {
        /// Steps done.
        step: usize,
        /// The PNG.
        png: Vec<u8>,
    },
    /// The job is over: its final state.
    Done(JobState),
}

/// A snapshot of a job for status queries.
#[derive(Debug, Clone)]
pub struct JobProgress {
    /// Where it is.
    pub state: JobState,
    /// Jobs in the U-Net batch it ran in (0 before it started).
    pub batch: usize,
    /// Steps done.
    pub step: usize,
    /// Steps in all (0 while queued).
    pub total: usize,
    /// When it was submitted.
    pub created: SystemTime,
    /// How long it has been running.
    pub running_for: Option<Duration>,
    /// The latest preview PNG.
    pub preview: Option<Vec<u8>>,
}
