//! What a request returns.

use std::path::Path;

use burn::prelude::*;
use sd_io::image::{GenerationParameters, PictureFormat, encode_rgb};

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
    /// Writes the picture: a PNG with the parameters in its `parameters` chunk, or
    /// a JPEG (quality 95) when the name ends in `.jpg` / `.jpeg`.
    ///
    /// # Errors
    /// [`PipelineError::Io`] when the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), PipelineError> {
        let path = path.as_ref();
        write(path, &self.encode(PictureFormat::from_path(path))?)
    }

    /// The picture encoded: PNG with the `parameters` chunk, or JPEG.
    ///
    /// # Errors
    /// [`PipelineError::Io`] when the encoder refuses the picture.
    pub fn encode(&self, format: PictureFormat) -> Result<Vec<u8>, PipelineError> {
        Ok(encode_rgb(&self.image, format, Some(&self.parameters))?)
    }

    /// The picture encoded and signed with C2PA content credentials: a manifest
    /// saying a trained algorithm created it, naming the generator, the model and
    /// the parameters (the `c2pa` feature).
    ///
    /// # Errors
    /// [`PipelineError::Io`] when encoding or signing fails.
    #[cfg(feature = "c2pa")]
    pub fn encode_signed(
        &self,
        format: PictureFormat,
        credentials: &sd_io::content_credentials::ContentCredentials,
    ) -> Result<Vec<u8>, PipelineError> {
        Ok(credentials.sign(&self.encode(format)?, format, &self.parameters)?)
    }

    /// [`Self::save`] with C2PA content credentials ([`Self::encode_signed`]).
    ///
    /// # Errors
    /// [`PipelineError::Io`] when encoding, signing or writing fails.
    #[cfg(feature = "c2pa")]
    pub fn save_signed(
        &self,
        path: impl AsRef<Path>,
        credentials: &sd_io::content_credentials::ContentCredentials,
    ) -> Result<(), PipelineError> {
        let path = path.as_ref();
        write(
            path,
            &self.encode_signed(PictureFormat::from_path(path), credentials)?,
        )
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PipelineError> {
    std::fs::write(path, bytes).map_err(|e| {
        PipelineError::Io(sd_io::IoError::Io {
            path: path.to_path_buf(),
            source: e,
        })
    })
}

/// The result of [`crate::StableDiffusionPipeline::generate`].
#[derive(Debug, Clone)]
pub struct Generation {
    /// The pictures, one per requested image.
    pub images: Vec<GeneratedImage>,
    /// The final latents before decoding, `[n, 4, h, w]`.
    pub latents: Tensor<4>,
}
