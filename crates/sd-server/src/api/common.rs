//! What the three APIs share: a [`Draft`] of a job in API-neutral terms, checked
//! into a [`JobSpec`] in one place.

use std::time::Duration;

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::Shared;
use crate::auth::Client;
use crate::config::ModelConfig;
use crate::error::ApiError;
use crate::job::{ControlSpec, HiresSpec, InitSpec, JobSpec};
use crate::validate::{self, check_images, check_prompt, check_range, check_steps};

/// A LoRA by name (a file stem in the model's LoRA folder) and weight.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRef {
    /// The LoRA's name.
    pub name: String,
    /// Its strength (1: as trained).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// One ControlNet of a draft.
#[derive(Debug)]
pub struct ControlDraft {
    /// The ControlNet's configured name.
    pub name: String,
    /// Its control image.
    pub image: RgbImage,
    /// Estimate depth from the image first.
    pub depth: bool,
    /// Scale.
    pub scale: f64,
    /// Start fraction.
    pub start: f64,
    /// End fraction.
    pub end: f64,
}

/// A job as an API describes it, before the checks.
#[derive(Debug, Default)]
pub struct Draft {
    /// Model name (`None`: the default, or A1111's current checkpoint).
    pub model: Option<String>,
    /// Prompt.
    pub prompt: String,
    /// Whether an empty prompt is refused (OpenAI and native; A1111 allows it).
    pub prompt_required: bool,
    /// Negative prompt.
    pub negative_prompt: Option<String>,
    /// SDXL's second prompt.
    pub prompt_2: Option<String>,
    /// SDXL's second negative prompt.
    pub negative_prompt_2: Option<String>,
    /// SD 3's settings.
    pub sd3: crate::job::Sd3Options,
    /// Size, checked.
    pub size: Option<(usize, usize)>,
    /// Images.
    pub n: i64,
    /// Steps.
    pub steps: Option<i64>,
    /// Guidance.
    pub guidance: Option<f64>,
    /// Seed (-1: random).
    pub seed: Option<i64>,
    /// Sampler (ours or A1111's name).
    pub sampler: Option<String>,
    /// A1111's scheduler (sigma schedule).
    pub scheduler: Option<String>,
    /// LoRAs by name.
    pub loras: Vec<(String, f64)>,
    /// diffusers' clip skip (layers skipped).
    pub clip_skip: Option<i64>,
    /// Init image, mask, strength.
    pub init: Option<InitSpec>,
    /// Hires fix.
    pub hires: Option<HiresSpec>,
    /// ControlNets.
    pub control: Vec<ControlDraft>,
    /// Guess mode.
    pub guess_mode: bool,
    /// A deadline asked by the client.
    pub timeout: Option<Duration>,
    /// A1111's inpainting overlay.
    pub overlay: Option<crate::overlay::Overlay>,
}

impl Draft {
    /// Checks everything and resolves every name against the configured set.
    ///
    /// # Errors
    /// The first thing that is wrong, as a 4xx [`ApiError`].
    pub fn into_spec(self, shared: &Shared, client: &Client) -> Result<JobSpec, ApiError> {
        let limits = &shared.config.limits;
        let model_name = self
            .model
            .clone()
            .unwrap_or_else(|| shared.registry.default_name());
        let model = shared.registry.resolve(&model_name)?;
        check_prompt(&self.prompt, limits, "prompt", self.prompt_required)?;
        for (name, text) in [
            ("negative_prompt", &self.negative_prompt),
            ("prompt_2", &self.prompt_2),
            ("negative_prompt_2", &self.negative_prompt_2),
            ("prompt_3", &self.sd3.prompt_3),
            ("negative_prompt_3", &self.sd3.negative_prompt_3),
        ] {
            if let Some(t) = text {
                check_prompt(t, limits, name, false)?;
            }
        }
        let n = check_images(self.n, limits, "n")?;
        let steps = match self.steps {
            Some(s) => check_steps(s, limits, "steps")?,
            None => model.default_steps.unwrap_or(20),
        };
        let guidance = match self.guidance {
            Some(g) => check_range(g, 0.0, 100.0, "guidance")?,
            None => model.default_guidance.unwrap_or(7.5),
        };
        let (scheduler, sigma_schedule) = match &self.sampler {
            Some(s) => {
                let (name, schedule) = validate::resolve_sampler(s, self.scheduler.as_deref())?;
                (Some(name), schedule)
            }
            None => (None, None),
        };
        let clip_skip = match self.clip_skip {
            None | Some(0) => None,
            Some(c) if (1..=24).contains(&c) => Some(c as usize),
            Some(c) => {
                return Err(ApiError::invalid(
                    "clip_skip",
                    format!("{c}: between 0 and 24"),
                ));
            }
        };
        let loras = resolve_loras(shared, &model_name, &self.loras)?;
        let control = resolve_control(&model, self.control)?;
        if let Some(init) = &self.init {
            check_range(init.strength, 0.0, 1.0, "strength")?;
            if init.strength == 0.0 {
                return Err(ApiError::invalid("strength", "must be above 0"));
            }
        }
        let timeout = self.timeout.filter(|t| !t.is_zero());
        Ok(JobSpec {
            model: model_name,
            client: client.0.clone(),
            prompt: self.prompt,
            negative_prompt: self.negative_prompt.unwrap_or_default(),
            prompt_2: self.prompt_2,
            negative_prompt_2: self.negative_prompt_2,
            sd3: self.sd3,
            size: self.size,
            steps,
            guidance,
            seed: validate::seed(self.seed),
            scheduler,
            sigma_schedule,
            n,
            clip_skip,
            loras,
            init: self.init,
            hires: self.hires,
            control,
            guess_mode: self.guess_mode,
            deadline: shared.deadline(timeout),
            overlay: self.overlay,
        })
    }
}

/// `, model `NAME` has: a, b` (or `none`), for not-found messages.
fn has(model: &str, names: impl Iterator<Item = impl AsRef<str>>) -> String {
    let names: Vec<String> = names.map(|n| n.as_ref().to_string()).collect();
    let list = if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    };
    format!("; model `{model}` has: {list}")
}

/// LoRA names resolved against the model's folder, weights checked.
fn resolve_loras(
    shared: &Shared,
    model: &str,
    asked: &[(String, f64)],
) -> Result<Vec<(String, f32)>, ApiError> {
    let available = shared.registry.loras(model);
    asked
        .iter()
        .map(|(name, weight)| {
            if !available.contains_key(name) {
                return Err(ApiError::NotFound {
                    what: "lora",
                    name: name.clone(),
                    hint: has(model, available.keys()),
                });
            }
            Ok((
                name.clone(),
                check_range(*weight, -10.0, 10.0, "lora weight")? as f32,
            ))
        })
        .collect()
}

/// ControlNet names resolved to the model's ControlNets, settings checked.
fn resolve_control(
    model: &ModelConfig,
    asked: Vec<ControlDraft>,
) -> Result<Vec<ControlSpec>, ApiError> {
    let mut control = Vec::with_capacity(asked.len());
    for ControlDraft {
        name,
        image,
        depth,
        scale,
        start,
        end,
    } in asked
    {
        let Some(index) = model.controlnets.keys().position(|k| *k == name) else {
            return Err(ApiError::NotFound {
                what: "controlnet",
                name,
                hint: has(&model.name, model.controlnets.keys()),
            });
        };
        check_range(scale, 0.0, 10.0, "controlnet weight")?;
        check_range(start, 0.0, 1.0, "guidance_start")?;
        check_range(end, start, 1.0, "guidance_end")?;
        if depth && model.depth_model.is_none() {
            return Err(ApiError::invalid(
                "module",
                format!(
                    "model `{}` has no depth model (`depth_model` in its configuration)",
                    model.name
                ),
            ));
        }
        control.push(ControlSpec {
            name,
            index,
            image,
            depth,
            scale,
            start,
            end,
        });
    }
    Ok(control)
}

/// An init image (and mask) as a job takes it: at `size`, or at its own size
/// rounded down to multiples of 8 when no size is given, within the limits; the
/// strength defaults to 1 with a mask (inpainting) and 0.75 without (img2img).
///
/// # Errors
/// A picture smaller than 8 pixels a side or over the limits.
pub fn init_spec(
    image: &DynamicImage,
    mask: Option<&DynamicImage>,
    size: Option<(usize, usize)>,
    strength: Option<f64>,
    limits: &crate::Limits,
    param: &str,
) -> Result<InitSpec, ApiError> {
    let (w, h) = size.unwrap_or((
        (image.width() as usize / 8) * 8,
        (image.height() as usize / 8) * 8,
    ));
    if w == 0 || h == 0 {
        return Err(ApiError::invalid(param, "at least 8 pixels a side"));
    }
    validate::check_size(w as i64, h as i64, limits, param)?;
    let resize = |i: &DynamicImage| {
        if (i.width() as usize, i.height() as usize) == (w, h) {
            i.clone()
        } else {
            i.resize_exact(w as u32, h as u32, FilterType::Lanczos3)
        }
    };
    let mask = mask.map(|m| resize(m).to_luma8());
    Ok(InitSpec {
        image: resize(image).to_rgb8(),
        strength: strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.75 }),
        mask,
    })
}

/// A mask from OpenAI's convention: where the mask picture is transparent is
/// repainted; a picture without alpha is read as ours (white repaints).
pub fn openai_mask(mask: &DynamicImage) -> DynamicImage {
    if mask.color().has_alpha() {
        let rgba = mask.to_rgba8();
        let grey = GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([if rgba.get_pixel(x, y)[3] < 128 {
                255
            } else {
                0
            }])
        });
        DynamicImage::ImageLuma8(grey)
    } else {
        mask.clone()
    }
}

/// Whether a picture has transparent pixels (OpenAI: the edit region when no mask
/// is sent).
pub fn has_transparency(image: &DynamicImage) -> bool {
    image.color().has_alpha() && image.to_rgba8().pixels().any(|p| p[3] < 128)
}
