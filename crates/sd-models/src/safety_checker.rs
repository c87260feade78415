//! diffusers' `StableDiffusionSafetyChecker`: CLIP's image tower and projection, the
//! cosine similarities of a picture's embedding with 17 concept and 3 special-care
//! embeddings, each against its threshold, and diffusers' rule for flagging.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;

use crate::attention::{linear, linear_forward};
use crate::clip_vision::ClipVisionTransformer;
use crate::config::SafetyCheckerConfig;
use crate::error::ConfigError;

/// The concepts the checker compares a picture with.
const CONCEPTS: usize = 17;
/// The special-care concepts, which make the others stricter when they match.
const SPECIAL: usize = 3;
/// How much stricter (diffusers' `adjustment`).
const ADJUSTMENT: f32 = 0.01;

/// `StableDiffusionSafetyChecker` (the `safety_checker/` of SD 1.x/2.x pipelines).
#[derive(Module, Debug)]
pub struct StableDiffusionSafetyChecker {
    /// CLIP's image tower.
    pub vision_model: ClipVisionTransformer,
    /// The pooled output to the embedding space (no bias).
    pub visual_projection: Linear,
    /// `[17, projection_dim]`.
    pub concept_embeds: Param<Tensor<2>>,
    /// `[3, projection_dim]`.
    pub special_care_embeds: Param<Tensor<2>>,
    /// The concepts' thresholds `[17]`.
    pub concept_embeds_weights: Param<Tensor<1>>,
    /// The special-care concepts' thresholds `[3]`.
    pub special_care_embeds_weights: Param<Tensor<1>>,
}

/// What the checker found in a batch of pictures.
#[derive(Debug, Clone)]
pub struct SafetyCheck {
    /// The pictures' projected embeddings `[b, projection_dim]`.
    pub image_embeds: Tensor<2>,
    /// Per picture, each special-care concept's score (similarity minus threshold,
    /// plus the adjustment once an earlier one matched), rounded to 3 decimals.
    pub special_scores: Vec<[f32; SPECIAL]>,
    /// Per picture, each concept's score, rounded to 3 decimals.
    pub concept_scores: Vec<[f32; CONCEPTS]>,
    /// Per picture: a concept scored above 0 (diffusers' `has_nsfw_concepts`).
    pub nsfw: Vec<bool>,
}

/// numpy's `round(x, 3)` in f32: `rint(x * 1000) / 1000`.
fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

impl StableDiffusionSafetyChecker {
    /// Builds the checker from its `config.json`.
    ///
    /// # Errors
    /// Sizes the config cannot honour.
    pub fn new(config: &SafetyCheckerConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let (d, p) = (config.vision_config.hidden_size, config.projection_dim);
        Ok(Self {
            vision_model: ClipVisionTransformer::new(&config.vision_config, device)?,
            visual_projection: linear(d, p, false, device),
            concept_embeds: Param::from_tensor(Tensor::ones([CONCEPTS, p], device)),
            special_care_embeds: Param::from_tensor(Tensor::ones([SPECIAL, p], device)),
            concept_embeds_weights: Param::from_tensor(Tensor::ones([CONCEPTS], device)),
            special_care_embeds_weights: Param::from_tensor(Tensor::ones([SPECIAL], device)),
        })
    }

    /// The side of the square pictures it takes (after the image processor).
    pub fn image_size(&self) -> usize {
        self.vision_model.image_size()
    }

    /// The pictures' pooled CLIP output and projected embeddings.
    ///
    /// # Shapes
    /// - `pixel_values`: `[b, 3, s, s]` as the image processor makes them
    /// - output: `[b, d]`, `[b, projection_dim]`
    ///
    /// # Errors
    /// Pictures of another size.
    pub fn embed(
        &self,
        pixel_values: Tensor<4>,
    ) -> Result<(Tensor<2>, Tensor<2>), sd_core::CoreError> {
        let (_, pooled) = self.vision_model.forward(pixel_values)?;
        let embeds = linear_forward(&self.visual_projection, pooled.clone());
        Ok((pooled, embeds))
    }

    /// Cosine similarities `[b, n]` of the embeddings with `concepts` `[n, p]`.
    pub fn cosine_distance(image_embeds: Tensor<2>, concepts: Tensor<2>) -> Tensor<2> {
        let unit = |x: Tensor<2>| {
            let norm = x
                .clone()
                .powf_scalar(2.0)
                .sum_dim(1)
                .sqrt()
                .clamp_min(1e-12);
            x / norm
        };
        unit(image_embeds).matmul(unit(concepts).transpose())
    }

    /// Checks pictures: diffusers' `StableDiffusionSafetyChecker.forward` without the
    /// blacking out (the caller does it for the flagged ones).
    ///
    /// # Shapes
    /// - `pixel_values`: `[b, 3, s, s]` as the image processor makes them
    ///
    /// # Errors
    /// Pictures of another size.
    pub fn check(&self, pixel_values: Tensor<4>) -> Result<SafetyCheck, sd_core::CoreError> {
        let (_, embeds) = self.embed(pixel_values)?;
        let host = |t: Tensor<2>| -> Vec<f32> {
            t.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default()
        };
        let special = host(Self::cosine_distance(
            embeds.clone(),
            self.special_care_embeds.val(),
        ));
        let concepts = host(Self::cosine_distance(
            embeds.clone(),
            self.concept_embeds.val(),
        ));
        let special_thresholds = host(self.special_care_embeds_weights.val().reshape([1, SPECIAL]));
        let thresholds = host(self.concept_embeds_weights.val().reshape([1, CONCEPTS]));
        let b = embeds.dims()[0];
        let mut out = SafetyCheck {
            image_embeds: embeds,
            special_scores: Vec::with_capacity(b),
            concept_scores: Vec::with_capacity(b),
            nsfw: Vec::with_capacity(b),
        };
        for i in 0..b {
            let mut adjustment = 0.0f32;
            let mut special_scores = [0f32; SPECIAL];
            for (c, score) in special_scores.iter_mut().enumerate() {
                *score = round3(special[i * SPECIAL + c] - special_thresholds[c] + adjustment);
                if *score > 0.0 {
                    adjustment = ADJUSTMENT;
                }
            }
            let mut concept_scores = [0f32; CONCEPTS];
            for (c, score) in concept_scores.iter_mut().enumerate() {
                *score = round3(concepts[i * CONCEPTS + c] - thresholds[c] + adjustment);
            }
            out.nsfw.push(concept_scores.iter().any(|&s| s > 0.0));
            out.special_scores.push(special_scores);
            out.concept_scores.push(concept_scores);
        }
        Ok(out)
    }
}
