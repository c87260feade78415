//! The owning pipeline's safety checker: diffusers' `StableDiffusionSafetyChecker`
//! with its image processor, run on every picture as diffusers' SD 1.x/2.x
//! pipelines run it, flagged pictures blacked out.

use std::path::Path;

use burn::prelude::*;
use sd_io::ComponentOptions;
use sd_io::safety_checker::{ClipImageProcessor, safety_checker_from_dir};
use sd_models::StableDiffusionSafetyChecker;

use crate::error::PipelineError;

/// A safety checker and the image processor that feeds it.
#[derive(Debug, Clone)]
pub struct SafetyChecker {
    /// The checker.
    pub model: StableDiffusionSafetyChecker,
    /// `feature_extractor/`'s `CLIPImageProcessor`.
    pub processor: ClipImageProcessor,
}

impl SafetyChecker {
    /// The checker of a pipeline folder with `safety_checker/` and
    /// `feature_extractor/` (as diffusers' pipelines ship it); `None` when the folder
    /// has neither.
    ///
    /// # Errors
    /// One of the two without the other; unreadable or mismatched files.
    pub fn from_pipeline_dir(root: &Path, device: &Device) -> Result<Option<Self>, PipelineError> {
        let (model_dir, processor) = (
            root.join("safety_checker"),
            root.join("feature_extractor")
                .join("preprocessor_config.json"),
        );
        match (model_dir.join("config.json").exists(), processor.exists()) {
            (false, false) => Ok(None),
            (true, true) => Ok(Some(Self {
                model: safety_checker_from_dir(&model_dir, device, &ComponentOptions::default())?,
                processor: ClipImageProcessor::from_file(&processor)?,
            })),
            _ => Err(PipelineError::Source {
                source_name: root.display().to_string(),
                message: "a safety checker needs both safety_checker/ and feature_extractor/"
                    .into(),
            }),
        }
    }

    /// Checks 8-bit pictures and blacks out the flagged ones, returning the flags
    /// (diffusers' `nsfw_content_detected`).
    ///
    /// # Errors
    /// A checker that cannot take the processor's pictures.
    pub fn run(
        &self,
        images: &mut [image::RgbImage],
        device: &Device,
    ) -> Result<Vec<bool>, PipelineError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = self.processor.preprocess(images, device)?;
        let flags = self.model.check(pixels)?.nsfw;
        for (image, &flagged) in images.iter_mut().zip(&flags) {
            if flagged {
                image.fill(0);
            }
        }
        Ok(flags)
    }
}
