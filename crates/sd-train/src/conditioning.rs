//! What the U-Net is trained on besides the latents: the caption's embedding and, for
//! SDXL, the pooled embedding and the micro-conditioning time ids, as diffusers'
//! training scripts compute them (`train_text_to_image.py`: the text encoder's last
//! hidden state; `train_text_to_image_lora_sdxl.py`: both encoders' penultimate hidden
//! states concatenated, `text_encoder_2`'s pooled projection, time ids from the file's
//! size, the crop corner and the resolution).

use burn::prelude::*;
use sd_core::{AddedConditioning, HiddenLayer};
use sd_io::{ClipTokenizer, ComponentOptions, DiffusersDir};
use sd_models::ClipTextModel;
use sd_pipelines::conditioner::token_ids;
use sd_pipelines::{TextConditioner, TextEncoders};

use crate::error::TrainError;

/// The frozen tokenizers and text encoders of the model being trained.
pub struct CaptionEncoder {
    /// SD 1.x / 2.x's encoder or SDXL base's two (with its
    /// `force_zeros_for_empty_prompt`, for the sample pictures).
    encoders: TextEncoders,
}

/// One caption's conditioning (batch 1).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[1, 77, d]`; SDXL: `[1, 77, d1 + d2]`.
    pub embedding: Tensor<3>,
    /// SDXL: the pooled embedding `[1, p]`.
    pub pooled: Option<Tensor<2>>,
    /// SDXL: the time ids `[1, 6]` (original size, crop corner, target size, each
    /// height first), once set by [`Conditioning::with_time_ids`].
    pub time_ids: Option<Tensor<2>>,
}

impl CaptionEncoder {
    /// Loads the tokenizer(s) and text encoder(s) of a diffusers folder in f32.
    ///
    /// # Errors
    /// Missing or broken components; a folder with `text_encoder_2` alone (the SDXL
    /// refiner), which these recipes do not train.
    pub fn from_dir(dir: &DiffusersDir, device: &Device) -> Result<Self, TrainError> {
        let options = ComponentOptions::default();
        if dir.has("text_encoder_2") && !dir.has("text_encoder") {
            return Err(TrainError::Config(
                "a model with text_encoder_2 alone (the SDXL refiner) cannot be trained here; \
                 train the base model"
                    .into(),
            ));
        }
        Ok(Self {
            encoders: TextEncoders::from_dir(dir, device, &options)?,
        })
    }

    /// Whether the model is SDXL (two text encoders, `text_time` conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.encoders.text_encoder_2().is_some()
    }

    /// The frozen tokenizers and text encoders.
    pub fn text_encoders(&self) -> &TextEncoders {
        &self.encoders
    }

    /// The text conditioner for the pipelines (sample pictures); `trained` replaces
    /// the frozen encoders (`[text_encoder]` or `[text_encoder, text_encoder_2]`) when
    /// not empty.
    pub fn conditioner<'a>(&'a self, trained: &'a [ClipTextModel]) -> TextConditioner<'a> {
        self.encoders
            .conditioner_with(trained.first(), trained.get(1))
    }

    /// The conditioning of `caption` by the frozen encoders, without time ids.
    ///
    /// # Errors
    /// Tokenizer failures; an SDXL second encoder without a projection.
    pub fn encode(&self, caption: &str, device: &Device) -> Result<Conditioning, TrainError> {
        self.encode_with(caption, &[], device)
    }

    /// The conditioning of `caption`, without time ids, by `trained` (the text
    /// encoders being trained, `[text_encoder]` or `[text_encoder, text_encoder_2]`,
    /// tracked by autodiff) or, when it is empty, the frozen encoders.
    ///
    /// # Errors
    /// As [`Self::encode`]; `trained` not matching the model's encoders.
    pub fn encode_with(
        &self,
        caption: &str,
        trained: &[ClipTextModel],
        device: &Device,
    ) -> Result<Conditioning, TrainError> {
        let expected = 1 + usize::from(self.is_sdxl());
        if !trained.is_empty() && trained.len() != expected {
            return Err(TrainError::Config(format!(
                "{} trained text encoders for a model with {expected}",
                trained.len()
            )));
        }
        let ids = |tokenizer: &ClipTokenizer| token_ids(tokenizer, caption, 1, device);
        let (Some(tokenizer), Some(frozen)) =
            (self.encoders.tokenizer(), self.encoders.text_encoder())
        else {
            return Err(TrainError::Config(
                "the model has no first text encoder (the SDXL refiner)".into(),
            ));
        };
        let text_encoder = trained.first().unwrap_or(frozen);
        let (Some(tokenizer_2), Some(frozen_2)) =
            (self.encoders.tokenizer_2(), self.encoders.text_encoder_2())
        else {
            let embedding = text_encoder
                .forward(ids(tokenizer)?, HiddenLayer::Last)?
                .hidden_states;
            return Ok(Conditioning {
                embedding,
                pooled: None,
                time_ids: None,
            });
        };
        // SDXL: `hidden_states[-2]` of each, concatenated; pooled from the second.
        let a = text_encoder.forward(ids(tokenizer)?, HiddenLayer::SkipRaw(1))?;
        let text_encoder_2 = trained.get(1).unwrap_or(frozen_2);
        let b = text_encoder_2.forward(ids(tokenizer_2)?, HiddenLayer::SkipRaw(1))?;
        let pooled = b.text_embeds.ok_or_else(|| {
            TrainError::Config(
                "SDXL's text_encoder_2 has no text_projection (CLIPTextModelWithProjection)".into(),
            )
        })?;
        Ok(Conditioning {
            embedding: Tensor::cat(vec![a.hidden_states, b.hidden_states], 2),
            pooled: Some(pooled),
            time_ids: None,
        })
    }
}

impl Conditioning {
    /// SDXL: sets the time ids `[original, crop, target]` (each `(height, width)` or
    /// `(top, left)`); without a pooled embedding (SD 1.x/2.x) it is unchanged.
    pub fn with_time_ids(
        mut self,
        original_size: (usize, usize),
        crop_top_left: (usize, usize),
        target_size: (usize, usize),
    ) -> Self {
        if self.pooled.is_some() {
            let ids = [original_size, crop_top_left, target_size]
                .iter()
                .flat_map(|&(a, b)| [a as f32, b as f32])
                .collect::<Vec<_>>();
            let device = self.embedding.device();
            self.time_ids = Some(Tensor::from_data(TensorData::new(ids, [1, 6]), &device));
        }
        self
    }

    /// Rows stacked: the embeddings `[n, 77, d]` and what the U-Net takes besides
    /// (SDXL: `text_embeds` `[n, p]` and `time_ids` `[n, 6]`).
    ///
    /// # Panics
    /// On an empty list, or SDXL rows without time ids mixed with others.
    pub fn batch(rows: &[Conditioning]) -> (Tensor<3>, AddedConditioning) {
        let embedding = Tensor::cat(rows.iter().map(|r| r.embedding.clone()).collect(), 0);
        let stack = |f: &dyn Fn(&Conditioning) -> Option<Tensor<2>>| {
            let parts: Option<Vec<Tensor<2>>> = rows.iter().map(f).collect();
            parts.map(|p| Tensor::cat(p, 0))
        };
        let added = AddedConditioning {
            text_embeds: stack(&|r| r.pooled.clone()),
            time_ids: stack(&|r| r.time_ids.clone()),
            ..Default::default()
        };
        (embedding, added)
    }
}
