//! [`TextEncoders`]: the tokenizers and text encoders a pipeline owns, one variant
//! per conditioning family, recognised once when the model is loaded.

use burn::prelude::Device;
use sd_io::{ClipTokenizer, ComponentOptions, DiffusersDir, IoError, T5Tokenizer};
use sd_models::{ClipTextModel, T5EncoderModel};

use super::{ClipConditioner, Sd3Conditioner, SdxlConditioner, TextConditioner};

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
    /// SD 3 / 3.5: CLIP-L and CLIP-G with projection, and T5 (optional).
    Sd3 {
        /// `tokenizer` and `text_encoder` (CLIP-L).
        clip_l: (ClipTokenizer, ClipTextModel),
        /// `tokenizer_2` and `text_encoder_2` (CLIP-G).
        clip_g: (ClipTokenizer, ClipTextModel),
        /// `tokenizer_3` and `text_encoder_3` (T5-XXL); `None` where the folder has
        /// none (its states are zeros, as diffusers without `text_encoder_3`).
        t5: Option<(T5Tokenizer, T5EncoderModel)>,
        /// The transformer's text width (`joint_attention_dim`).
        joint_attention_dim: usize,
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
        if dir.has("transformer") {
            return Self::sd3_from_dir(dir, device, options);
        }
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

    /// SD 3's encoders (a folder with `transformer/`): both CLIP encoders with their
    /// projections, T5 where `text_encoder_3/` is there.
    fn sd3_from_dir(
        dir: &DiffusersDir,
        device: &Device,
        options: &ComponentOptions,
    ) -> Result<Self, IoError> {
        let transformer =
            sd_io::sd3::read_sd3_transformer_config(&dir.root().join("transformer/config.json"))?;
        let t5 = if dir.has("text_encoder_3") {
            let t5 = crate::load::t5_options(options, device);
            Some((dir.tokenizer_3()?, dir.text_encoder_3(device, &t5)?))
        } else {
            None
        };
        Ok(Self::Sd3 {
            clip_l: (dir.tokenizer()?, dir.text_encoder(device, options)?),
            clip_g: (dir.tokenizer_2()?, dir.text_encoder_2(device, options)?),
            t5,
            joint_attention_dim: transformer.joint_attention_dim,
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
            Self::Sd3 {
                clip_l,
                clip_g,
                t5,
                joint_attention_dim,
            } => TextConditioner::Sd3(Sd3Conditioner {
                clip_l: (&clip_l.0, text_encoder.unwrap_or(&clip_l.1)),
                clip_g: (&clip_g.0, text_encoder_2.unwrap_or(&clip_g.1)),
                t5: t5.as_ref().map(|(tok, te)| {
                    (
                        tok as &dyn sd_core::PromptTokenizer,
                        te as &dyn sd_core::SequenceEncoder,
                    )
                }),
                joint_attention_dim: *joint_attention_dim,
            }),
        }
    }

    /// The first tokenizer (`None` for the SDXL refiner).
    pub fn tokenizer(&self) -> Option<&ClipTokenizer> {
        match self {
            Self::Clip { tokenizer, .. } => Some(tokenizer),
            Self::Sdxl { first, .. } => first.as_ref().map(|(t, _)| t),
            Self::Sd3 { clip_l, .. } => Some(&clip_l.0),
        }
    }

    /// The first text encoder (`None` for the SDXL refiner).
    pub fn text_encoder(&self) -> Option<&ClipTextModel> {
        match self {
            Self::Clip { text_encoder, .. } => Some(text_encoder),
            Self::Sdxl { first, .. } => first.as_ref().map(|(_, t)| t),
            Self::Sd3 { clip_l, .. } => Some(&clip_l.1),
        }
    }

    /// The second tokenizer (SDXL, SD 3).
    pub fn tokenizer_2(&self) -> Option<&ClipTokenizer> {
        match self {
            Self::Clip { .. } => None,
            Self::Sdxl { tokenizer_2, .. } => Some(tokenizer_2),
            Self::Sd3 { clip_g, .. } => Some(&clip_g.0),
        }
    }

    /// The second text encoder (SDXL's OpenCLIP bigG, SD 3's CLIP-G).
    pub fn text_encoder_2(&self) -> Option<&ClipTextModel> {
        match self {
            Self::Clip { .. } => None,
            Self::Sdxl { text_encoder_2, .. } => Some(text_encoder_2),
            Self::Sd3 { clip_g, .. } => Some(&clip_g.1),
        }
    }

    /// SD 3's T5 encoder, where the model has one.
    pub fn text_encoder_3(&self) -> Option<&T5EncoderModel> {
        match self {
            Self::Sd3 { t5, .. } => t5.as_ref().map(|(_, te)| te),
            _ => None,
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
            Self::Sd3 { clip_l, clip_g, .. } => {
                if let Some(t) = text_encoder {
                    clip_l.1 = t;
                }
                if let Some(t) = text_encoder_2 {
                    clip_g.1 = t;
                }
            }
        }
    }
}
