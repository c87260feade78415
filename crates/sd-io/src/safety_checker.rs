//! The safety checker of SD 1.x/2.x pipeline folders: `safety_checker/` (diffusers'
//! `StableDiffusionSafetyChecker`, a `CLIPConfig` and its weights) and
//! `feature_extractor/` (transformers' `CLIPImageProcessor`, which turns the 8-bit
//! pictures into the checker's input).

use std::path::Path;

use burn::prelude::*;
use image::RgbImage;
use sd_models::{SafetyCheckerConfig, StableDiffusionSafetyChecker};
use serde::Deserialize;

use crate::error::IoError;
use crate::loader::{KeyMapping, load_module};
use crate::model::{ComponentOptions, component_weights, config_err, read_json_file};
use crate::pil_resize::{PilFilter, pil_resize};

/// The checker of a `safety_checker/` folder (`config.json`, `model.safetensors`),
/// in f32. Weights saved by transformers 4 (`vision_model.vision_model.*`) and 5
/// (`vision_model.*`) both load.
///
/// # Errors
/// A missing or unreadable folder, a config it cannot honour, weights that do not fit.
pub fn safety_checker_from_dir(
    dir: &Path,
    device: &Device,
    options: &ComponentOptions,
) -> Result<StableDiffusionSafetyChecker, IoError> {
    let config_path = dir.join("config.json");
    let config = SafetyCheckerConfig::from_json(&read_json_file(&config_path)?)
        .map_err(config_err(&config_path))?;
    let path = component_weights(dir, "model", options.variant.as_deref())?;
    let source = crate::WeightSource::open(&path)?;
    let model =
        StableDiffusionSafetyChecker::new(&config, device).map_err(config_err(&config_path))?;
    let nested = source
        .tensors()
        .keys()
        .any(|k| k.starts_with("vision_model.vision_model."));
    let mapping = KeyMapping {
        key_of: Box::new(move |p: &str| {
            let key = sd_models::diffusers_key(p);
            match (nested, key.strip_prefix("vision_model.")) {
                (true, Some(rest)) => format!("vision_model.vision_model.{rest}"),
                _ => key,
            }
        }),
        ..KeyMapping::diffusers()
    };
    let load = ComponentOptions {
        dtype: None,
        ..options.clone()
    };
    load_module(model, &source, &mapping, load.load(), "safety_checker")
}

/// `{"shortest_edge": n}` or `{"height": h, "width": w}`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
struct SizeDict {
    shortest_edge: Option<u32>,
    height: Option<u32>,
    width: Option<u32>,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn clip_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn clip_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}
fn one_255() -> f64 {
    1.0 / 255.0
}

/// transformers' `CLIPImageProcessor` as `preprocessor_config.json` sets it: resize
/// the shortest edge (Pillow's filter), center crop, rescale to `[0, 1]`, normalise
/// with CLIP's mean and std.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClipImageProcessor {
    #[serde(default = "yes")]
    do_resize: bool,
    size: SizeDict,
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_center_crop: bool,
    crop_size: SizeDict,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "one_255")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default = "clip_mean")]
    image_mean: [f32; 3],
    #[serde(default = "clip_std")]
    image_std: [f32; 3],
}

impl ClipImageProcessor {
    /// Reads a `preprocessor_config.json`.
    ///
    /// # Errors
    /// An unreadable file, or settings this reader does not honour (a size other
    /// than a shortest edge, a crop without both sides, a filter other than
    /// Pillow's bicubic, bilinear or Lanczos).
    pub fn from_file(path: &Path) -> Result<Self, IoError> {
        let text = read_json_file(path)?;
        let p: Self = serde_json::from_str(&text).map_err(|source| IoError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let unsupported = |what: &str| IoError::Unsupported(format!("{}: {what}", path.display()));
        if p.do_resize && p.size.shortest_edge.is_none_or(|s| s == 0) {
            return Err(unsupported("size must be {\"shortest_edge\": n}"));
        }
        if p.do_center_crop
            && (p.crop_size.height.is_none_or(|h| h == 0)
                || p.crop_size.width.is_none_or(|w| w == 0))
        {
            return Err(unsupported("crop_size must have a height and a width"));
        }
        p.filter().ok_or_else(|| {
            unsupported("resample must be 1, 2 or 3 (Lanczos, bilinear, bicubic)")
        })?;
        Ok(p)
    }

    fn filter(&self) -> Option<PilFilter> {
        match self.resample {
            1 => Some(PilFilter::Lanczos),
            2 => Some(PilFilter::Bilinear),
            3 => Some(PilFilter::Bicubic),
            _ => None,
        }
    }

    /// One picture as transformers' Pillow backend makes it: `[3, H, W]` values.
    fn pixel_values(&self, image: &RgbImage) -> (Vec<f32>, usize, usize) {
        let mut image = image.clone();
        if self.do_resize
            && let (Some(short), Some(filter)) = (self.size.shortest_edge, self.filter())
        {
            let (w, h) = image.dimensions();
            let (nw, nh) = if w <= h {
                (
                    short,
                    (u64::from(short) * u64::from(h) / u64::from(w)) as u32,
                )
            } else {
                (
                    (u64::from(short) * u64::from(w) / u64::from(h)) as u32,
                    short,
                )
            };
            if (nw, nh) != (w, h) {
                image = pil_resize(&image, nw, nh, filter);
            }
        }
        if self.do_center_crop
            && let (Some(ch), Some(cw)) = (self.crop_size.height, self.crop_size.width)
        {
            let (w, h) = image.dimensions();
            let (top, left) = (h.saturating_sub(ch) / 2, w.saturating_sub(cw) / 2);
            image = image::imageops::crop_imm(&image, left, top, cw.min(w), ch.min(h)).to_image();
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut out = vec![0f32; 3 * w * h];
        for (i, p) in image.pixels().enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale {
                    (f64::from(p.0[c]) * self.rescale_factor) as f32
                } else {
                    f32::from(p.0[c])
                };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                out[c * w * h + i] = v;
            }
        }
        (out, w, h)
    }

    /// The checker's input for 8-bit pictures: `[b, 3, H, W]` (all the crop's size).
    ///
    /// # Errors
    /// Pictures that come out at different sizes (no center crop configured).
    pub fn preprocess(&self, images: &[RgbImage], device: &Device) -> Result<Tensor<4>, IoError> {
        let mut values = Vec::new();
        let mut size = None;
        for image in images {
            let (v, w, h) = self.pixel_values(image);
            if size.is_some_and(|s| s != (w, h)) {
                return Err(IoError::Unsupported(
                    "the image processor made pictures of different sizes (no center crop)".into(),
                ));
            }
            size = Some((w, h));
            values.extend(v);
        }
        let (w, h) = size.unwrap_or((0, 0));
        Ok(Tensor::from_data(
            TensorData::new(values, [images.len(), 3, h, w]),
            device,
        ))
    }
}
