//! Depth maps for depth ControlNets and T2I-Adapters, from Depth Anything (V1 or V2,
//! any size) run in burn: the picture prepared as transformers' `DPTImageProcessor`
//! prepares it, the predicted depth resized back to the picture's size as
//! `post_process_depth_estimation` does (bicubic), then scaled to 0-255 over its own
//! range (near is white) and truncated to 8 bits, as the Depth Anything repository,
//! `controlnet_aux` and the A1111 / ComfyUI annotators do.

use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};
use sd_io::ComponentOptions;
use sd_io::depth::{depth_anything_from_path, read_depth_processor_config_text};
use sd_io::pil_resize::{PilFilter, pil_resize};
use sd_models::DepthAnythingForDepthEstimation;
use serde::Deserialize;

use crate::error::PipelineError;
use crate::hub::HubOptions;
use crate::load::ModelSource;

/// `{"height": h, "width": w}` of a processor config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ProcessorSize {
    /// Target height in pixels.
    pub height: usize,
    /// Target width in pixels.
    pub width: usize,
}

fn d_true() -> bool {
    true
}
fn d_size() -> ProcessorSize {
    ProcessorSize {
        height: 518,
        width: 518,
    }
}
fn d_multiple() -> usize {
    14
}
fn d_bicubic() -> u32 {
    3
}
fn d_rescale() -> f32 {
    1.0 / 255.0
}
fn d_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn d_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}

/// transformers' `DPTImageProcessor` settings (`preprocessor_config.json`); the
/// defaults are those of the Depth Anything V2 repositories (518 px, keep the aspect
/// ratio, multiples of 14, bicubic, ImageNet normalisation).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DepthImageProcessorConfig {
    /// Whether to resize.
    #[serde(default = "d_true")]
    pub do_resize: bool,
    /// The target size (with `keep_aspect_ratio`, the side that changes least is fit).
    #[serde(default = "d_size")]
    pub size: ProcessorSize,
    /// Scale both sides by the factor closest to 1 instead of stretching.
    #[serde(default = "d_true")]
    pub keep_aspect_ratio: bool,
    /// Sides are rounded to a multiple of this.
    #[serde(default = "d_multiple")]
    pub ensure_multiple_of: usize,
    /// PIL's filter number: 0 nearest, 1 Lanczos, 2 bilinear, 3 bicubic (1-3 as
    /// Pillow computes them, to the bit; nearest by the `image` crate).
    #[serde(default = "d_bicubic")]
    pub resample: u32,
    /// Whether to rescale the 8-bit values.
    #[serde(default = "d_true")]
    pub do_rescale: bool,
    /// The rescale factor (1/255).
    #[serde(default = "d_rescale")]
    pub rescale_factor: f32,
    /// Whether to normalise.
    #[serde(default = "d_true")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default = "d_mean")]
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation.
    #[serde(default = "d_std")]
    pub image_std: [f32; 3],
    /// Padding to a multiple (not supported: Depth Anything's say `false`).
    #[serde(default)]
    pub do_pad: bool,
}

impl Default for DepthImageProcessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl DepthImageProcessorConfig {
    /// Parses and checks a `preprocessor_config.json`.
    ///
    /// # Errors
    /// JSON that does not parse, padding, an unknown filter, a zero size or multiple,
    /// a zero standard deviation.
    pub fn from_json(json: &str) -> Result<Self, PipelineError> {
        let c: Self = serde_json::from_str(json).map_err(|e| {
            PipelineError::request("preprocessor_config.json", format!("does not parse: {e}"))
        })?;
        let bad = |m: &str| {
            Err(PipelineError::request(
                "preprocessor_config.json",
                m.to_string(),
            ))
        };
        if c.do_pad {
            return bad("do_pad: padding is not supported");
        }
        if c.resample > 3 {
            return bad("resample: only 0 (nearest) to 3 (bicubic)");
        }
        if c.size.height == 0 || c.size.width == 0 || c.ensure_multiple_of == 0 {
            return bad("size and ensure_multiple_of must be positive");
        }
        if c.image_std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return bad("image_std must be non-zero");
        }
        Ok(c)
    }

    /// The size a `height x width` picture is resized to: transformers'
    /// `get_resize_output_image_size` (Python's half-to-even rounding to the multiple).
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        if !self.do_resize {
            return (height, width);
        }
        let mut sh = self.size.height as f64 / height as f64;
        let mut sw = self.size.width as f64 / width as f64;
        if self.keep_aspect_ratio {
            if (1.0 - sw).abs() < (1.0 - sh).abs() {
                sh = sw;
            } else {
                sw = sh;
            }
        }
        let m = self.ensure_multiple_of as f64;
        let fit = |v: f64| ((v / m).round_ties_even() * m) as usize;
        (fit(sh * height as f64), fit(sw * width as f64))
    }

    fn resize(&self, image: &RgbImage, w: usize, h: usize) -> RgbImage {
        let filter = match self.resample {
            0 => return image::imageops::resize(image, w as u32, h as u32, FilterType::Nearest),
            1 => PilFilter::Lanczos,
            2 => PilFilter::Bilinear,
            _ => PilFilter::Bicubic,
        };
        pil_resize(image, w as u32, h as u32, filter)
    }

    /// The model's input for one picture: resized (8-bit, as Pillow resizes), rescaled
    /// and normalised.
    ///
    /// # Shapes
    /// - output: `[1, 3, h, w]` with `(h, w) = output_size(height, width)`
    pub fn pixel_values(&self, image: &RgbImage, device: &Device) -> Tensor<4> {
        let (h, w) = self.output_size(image.height() as usize, image.width() as usize);
        let resized;
        let image = if (h, w) == (image.height() as usize, image.width() as usize) {
            image
        } else {
            resized = self.resize(image, w, h);
            &resized
        };
        let mut data = vec![0f32; 3 * h * w];
        for (i, p) in image.pixels().enumerate() {
            for c in 0..3 {
                let mut v = p.0[c] as f32;
                if self.do_rescale {
                    v *= self.rescale_factor;
                }
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                data[c * h * w + i] = v;
            }
        }
        Tensor::from_data(TensorData::new(data, [1, 3, h, w]), device)
    }
}

/// Depth Anything with its image processor: pictures in, depth maps out.
#[derive(Debug)]
pub struct DepthEstimator {
    model: DepthAnythingForDepthEstimation,
    processor: DepthImageProcessorConfig,
    device: Device,
}

impl DepthEstimator {
    /// A model and the processor settings it was trained with.
    pub fn new(
        model: DepthAnythingForDepthEstimation,
        processor: DepthImageProcessorConfig,
        device: &Device,
    ) -> Self {
        Self {
            model,
            processor,
            device: device.clone(),
        }
    }

    /// Loads a Depth Anything folder as on the hub (`config.json`,
    /// `model.safetensors`, `preprocessor_config.json`), a weight file with those
    /// beside it, or (with the `hub` feature) a hub repository id such as
    /// `depth-anything/Depth-Anything-V2-Small-hf`, fetched into the cache as
    /// [`crate::hub::model_files`] says. Without a `preprocessor_config.json` the V2
    /// settings are used.
    ///
    /// # Errors
    /// Missing or unreadable files, configs this crate cannot honour, missing or
    /// mismatched weights, a repository that cannot be fetched.
    pub fn from_pretrained(
        source: impl Into<ModelSource>,
        device: &Device,
        hub: &HubOptions,
    ) -> Result<Self, PipelineError> {
        Self::from_pretrained_with(source, device, hub, &ComponentOptions::default())
    }

    /// [`Self::from_pretrained`] with the weights' dtype (`F16` / `BF16` halve the
    /// memory; the depth comes out in f32 either way).
    ///
    /// # Errors
    /// As [`Self::from_pretrained`].
    pub fn from_pretrained_with(
        source: impl Into<ModelSource>,
        device: &Device,
        hub: &HubOptions,
        options: &ComponentOptions,
    ) -> Result<Self, PipelineError> {
        let path = match source.into() {
            ModelSource::Path(p) => p,
            ModelSource::Hub { repo, revision } => {
                crate::hub::download_model(&repo, revision.as_deref(), hub)?
            }
        };
        let model = depth_anything_from_path(&path, device, options)?;
        let processor = match read_depth_processor_config_text(&path)? {
            Some(json) => DepthImageProcessorConfig::from_json(&json)?,
            None => DepthImageProcessorConfig::default(),
        };
        Ok(Self::new(model, processor, device))
    }

    /// The model.
    pub fn model(&self) -> &DepthAnythingForDepthEstimation {
        &self.model
    }

    /// The processor settings.
    pub fn processor(&self) -> &DepthImageProcessorConfig {
        &self.processor
    }

    /// The model's depth at the picture's size (relative models: inverse depth,
    /// larger is nearer; metric ones: metres).
    ///
    /// # Shapes
    /// - output: `[height, width]` of `image`
    ///
    /// # Errors
    /// A picture smaller than one patch after resizing.
    pub fn predict_depth(&self, image: &RgbImage) -> Result<Tensor<2>, PipelineError> {
        let (h, w) = (image.height() as usize, image.width() as usize);
        let pixel_values = self.processor.pixel_values(image, &self.device);
        let depth = self.model.predict_depth(pixel_values)?;
        let [_, dh, dw] = depth.dims();
        let depth = interpolate(
            depth.reshape([1, 1, dh, dw]),
            InterpolateOptions::new(InterpolateMode::Bicubic)
                .with_align_corners(false)
                .with_output_size([h, w]),
        );
        Ok(depth.reshape([h, w]))
    }

    /// The ControlNet depth input for `image`: [`Self::predict_depth`] scaled to
    /// 0-255 over its range (truncated to 8 bits; a flat map is black), near white
    /// (a metric model's depth is reversed), grey in all three channels, the
    /// picture's size.
    ///
    /// # Errors
    /// As [`Self::predict_depth`].
    pub fn depth_map(&self, image: &DynamicImage) -> Result<RgbImage, PipelineError> {
        let rgb = image.to_rgb8();
        let depth = self.predict_depth(&rgb)?;
        let values: Vec<f32> = depth
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| PipelineError::request("depth", format!("{e:?}")))?;
        let near_is_large = !self.model.is_metric();
        let grey = to_grey(&values, rgb.width(), rgb.height(), near_is_large);
        Ok(DynamicImage::ImageLuma8(grey).to_rgb8())
    }
}

/// `(d - min) / (max - min) * 255`, truncated to 8 bits (0 where the map is flat);
/// `(max - d) / (max - min) * 255` for metric depth, so that near is white either way.
fn to_grey(values: &[f32], width: u32, height: u32, near_is_large: bool) -> GrayImage {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = hi - lo;
    let pixels = values
        .iter()
        .map(|&v| {
            if range > 0.0 {
                let d = if near_is_large { v - lo } else { hi - v };
                (d / range * 255.0).clamp(0.0, 255.0) as u8
            } else {
                0
            }
        })
        .collect();
    GrayImage::from_raw(width, height, pixels).expect("one value per pixel")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_follows_transformers() {
        let c = DepthImageProcessorConfig::default();
        // fit the side that changes least, round half to even on multiples of 14
        assert_eq!(c.output_size(512, 768), (518, 784));
        assert_eq!(c.output_size(768, 512), (784, 518));
        assert_eq!(c.output_size(1024, 1024), (518, 518));
        assert_eq!(c.output_size(45, 61), (378, 518));
    }

    #[test]
    fn grey_spans_the_range() {
        let g = to_grey(&[1.0, 2.0, 3.0, 3.0], 2, 2, true);
        assert_eq!(g.as_raw(), &[0, 127, 255, 255]);
        assert_eq!(to_grey(&[5.0; 4], 2, 2, true).as_raw(), &[0; 4]);
        // metric depth: far is black
        let g = to_grey(&[1.0, 2.0, 3.0, 3.0], 2, 2, false);
        assert_eq!(g.as_raw(), &[255, 127, 0, 0]);
    }

    #[test]
    fn padding_is_refused() {
        assert!(DepthImageProcessorConfig::from_json(r#"{"do_pad": true}"#).is_err());
    }
}
