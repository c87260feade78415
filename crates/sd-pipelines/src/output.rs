//! What a request returns.

use std::path::Path;

use burn::prelude::*;
use sd_io::image::{GenerationParameters, save_rgb_png};

use crate::error::PipelineError;

/// One generated picture and how it was made.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// The picture, 8-bit RGB.
    pub image: image::RgbImage,
    /// Prompt, sampler, steps, guidance, seed, size and model (A1111's
    /// `parameters`).
    pub parameters: GenerationParameters,
    /// The safety checker's verdict (diffusers' `nsfw_content_detected`): `true`
    /// when it flagged the picture, which is then black; `None` when the pipeline
    /// has no checker.
    pub nsfw_content_detected: Option<bool>,
}

impl GeneratedImage {
    /// Writes the picture as a PNG with the parameters in its `parameters` chunk.
    ///
    /// # Errors
    /// [`PipelineError::Io`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), PipelineError> {
        Ok(save_rgb_png(&self.image, path, Some(&self.parameters))?)
    }
}

/// The result of [`crate::StableDiffusionPipeline::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The pictures, one per requested image.
    pub images: Vec<GeneratedImage>,
    /// The final latents before decoding, `[n, 4, h, w]`.
    pub latents: Tensor<4>,
}
