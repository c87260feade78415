//! [`TextEncoders`]: the tokenizers and text encoders a pipeline owns, one variant
//! per conditioning family, recognised once when the model is loaded.

use burn::prelude::Device;
use sd_io::{ClipTokenizer, ComponentOptions, DiffusersDir, IoError};
use sd_models::ClipTextModel;

use super::{ClipConditioner, SdxlConditioner, TextConditioner};

/// The tokenizers and text encoders of a loaded model.
#[derive(Debug, Clone)]
#[non_exhaustive]
#[allow(clippy::large_enum_variant, reason = "one value per pipeline")]
pub enum TextEncoders {
    /// SD 1.x / 2.x: one CLIP tokenizer and text encoder.
    Clip {
        /// `tokenizer`.
        tokenizer: ClipTokenizer,
        /// `text_encoder`.
        text_encoder: ClipTextModel,
    },
    /// SDXL: CLIP ViT-L (absent in the refiner) and OpenCLIP bigG with projection.
    Sdxl {
        /// `tokenizer` and `text_encoder`; `None` for the refiner.
        first: Option<(ClipTokenizer, ClipTextModel)>,
        /// `tokenizer_2`.
        tokenizer_2: ClipTokenizer,
        /// `text_encoder_2`.
        text_encoder_2: ClipTextModel,
        /// `force_zeros_for_empty_prompt` (`model_index.json`).
        force_zeros_for_empty_prompt: bool,
    },
}

impl TextEncoders {
    /// The tokenizers and text encoders of a diffusers folder, in f32 (or `options`'
    /// dtype): SDXL where it has `text_encoder_2` (the refiner: that one alone),
    /// else one CLIP encoder.
    ///
    /// # Errors
    /// Missing or broken components.
    pub fn from_dir(
        dir: &DiffusersDir,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<Self, IoError> {
        if !dir.has("text_encoder_2") {
            return Ok(Self::Clip {
                tokenizer: dir.tokenizer()?,
                text_encoder: dir.text_encoder(device, options)?,
            });
        }
        // The SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0) has only the
        // second tokenizer and text encoder (`[null, null]` for the first in its index).
        let first = if dir.has("text_encoder") {
            Some((dir.tokenizer()?, dir.text_encoder(device, options)?))
        } else {
            None
        };
        Ok(Self::Sdxl {
            first,
            tokenizer_2: dir.tokenizer_2()?,
            text_encoder_2: dir.text_encoder_2(device, options)?,
            // True unless the index says, as diffusers' StableDiffusionXLPipeline.
            force_zeros_for_empty_prompt: dir.force_zeros_for_empty_prompt()?.unwrap_or(true),
        })
    }

    /// The conditioner over these encoders.
    pub fn conditioner(&self) -> TextConditioner<'_> {
        self.conditioner_with(None, None)
    }

    /// The conditioner over these tokenizers with `text_encoder` / `text_encoder_2`
    /// in place of the owned encoders where given (a run's LoRA-merged copies).
    pub fn conditioner_with<'a>(
        &'a self,
        text_encoder: Option<&'a ClipTextModel>,
        text_encoder_2: Option<&'a ClipTextModel>,
    ) -> TextConditioner<'a> {
        match self {
            Self::Clip {
                tokenizer,
                text_encoder: own,
            } => TextConditioner::Clip(ClipConditioner {
                tokenizer,
                text_encoder: text_encoder.unwrap_or(own),
            }),
            Self::Sdxl {
                first,
                tokenizer_2,
                text_encoder_2: own_2,
                force_zeros_for_empty_prompt,
            } => TextConditioner::Sdxl(SdxlConditioner {
                text_encoder: first.as_ref().map(|(tok, own)| {
                    (
                        tok as &dyn sd_core::PromptTokenizer,
                        text_encoder.unwrap_or(own) as &dyn sd_core::TextEncoder,
                    )
                }),
                tokenizer_2,
                text_encoder_2: text_encoder_2.unwrap_or(own_2),
                force_zeros_for_empty_prompt: *force_zeros_for_empty_prompt,
            }),
        }
    }

    /// The first tokenizer (`None` for the SDXL refiner).
    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        match self {
            Self::Clip { tokenizer, .. } => Some(tokenizer),
            Self::Sdxl { first, .. } => first.as_ref().map(|(t, _)| t),
        }
    }

    /// The first text encoder (`None` for the SDXL refiner).
    pub fn text_encoder(&self) -> Option<&ClipTextModel> {
        match self {
            Self::Clip { text_encoder, .. } => Some(text_encoder),
            Self::Sdxl { first, .. } => first.as_ref().map(|(_, t)| t),
        }
    }

    /// SDXL's second tokenizer.
    pub fn tokenizer_2(&self) -> Option<&ClipTokenizer> {
        match self {
            Self::Clip { .. } => None,
            Self::Sdxl { tokenizer_2, .. } => Some(tokenizer_2),
        }
    }

    /// SDXL's second text encoder.
    pub fn text_encoder_2(&self) -> Option<&ClipTextModel> {
        match self {
            Self::Clip { .. } => None,
            Self::Sdxl { text_encoder_2, .. } => Some(text_encoder_2),
        }
    }

    /// Replaces the encoders given (after a LoRA was merged into copies).
    pub(crate) fn replace(
        &mut self,
        text_encoder: Option<ClipTextModel>,
        text_encoder_2: Option<ClipTextModel>,
    ) {
        match self {
            Self::Clip {
                text_encoder: own, ..
            } => {
                if let Some(t) = text_encoder {
                    *own = t;
                }
            }
            Self::Sdxl {
                first,
                text_encoder_2: own_2,
                ..
            } => {
                if let (Some(t), Some((_, own))) = (text_encoder, first.as_mut()) {
                    *own = t;
                }
                if let Some(t) = text_encoder_2 {
                    *own_2 = t;
                }
            }
        }
    }
}
