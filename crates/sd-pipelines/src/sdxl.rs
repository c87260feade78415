//! SDXL's conditioning (diffusers' `StableDiffusionXLPipeline`): two text encoders
//! whose penultimate layers are concatenated, the second one's pooled projection,
//! and the micro-conditioning time ids, fed to the U-Net's `text_time` addition.

use burn::prelude::*;
use sd_core::{AddedConditioning, CoreError, HiddenLayer, PromptTokenizer, TextEncoder};

use crate::composed::{GenerationOptions, StableDiffusion, invalid};
use crate::prompt_encoding::Windows;

/// SDXL's second tokenizer and text encoder (OpenCLIP bigG as diffusers ships it, a
/// `CLIPTextModelWithProjection`), and how empty negative prompts are encoded.
#[derive(Clone, Copy)]
pub struct SdxlParts<'a> {
    /// `tokenizer_2` (pads with `!`).
    pub tokenizer_2: &'a dyn PromptTokenizer,
    /// `text_encoder_2`; its `text_embeds` are the pooled prompt embedding.
    pub text_encoder_2: &'a dyn TextEncoder,
    /// `force_zeros_for_empty_prompt` (`model_index.json`, true for SDXL base): with
    /// guidance and no negative prompt, the negative embeddings are zeros.
    pub force_zeros_for_empty_prompt: bool,
    /// The refiner's layout (diffusers' `text_encoder=None`): the prompt embeddings
    /// are `text_encoder_2`'s alone and the first encoder is not run.
    pub text_encoder_2_only: bool,
}

impl std::fmt::Debug for SdxlParts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdxlParts")
            .field(
                "force_zeros_for_empty_prompt",
                &self.force_zeros_for_empty_prompt,
            )
            .field("text_encoder_2_only", &self.text_encoder_2_only)
            .finish_non_exhaustive()
    }
}

/// SDXL's micro-conditioning: sizes are `(height, width)`, crops `(top, left)`, in
/// pixels. Unset sizes are the generated picture's; the crop is `(0, 0)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    /// `original_size`.
    pub original_size: Option<(usize, usize)>,
    /// `crops_coords_top_left`.
    pub crops_coords_top_left: (usize, usize),
    /// `target_size`.
    pub target_size: Option<(usize, usize)>,
    /// `negative_original_size` (text to image: used only with
    /// `negative_target_size`).
    pub negative_original_size: Option<(usize, usize)>,
    /// `negative_crops_coords_top_left`.
    pub negative_crops_coords_top_left: (usize, usize),
    /// `negative_target_size`.
    pub negative_target_size: Option<(usize, usize)>,
    /// The refiner's `aesthetic_score` (6.0).
    pub aesthetic_score: f64,
    /// The refiner's `negative_aesthetic_score` (2.5).
    pub negative_aesthetic_score: f64,
}

impl Default for MicroConditioning {
    fn default() -> Self {
        Self {
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

fn pair(p: (usize, usize)) -> [f32; 2] {
    [p.0 as f32, p.1 as f32]
}

impl MicroConditioning {
    /// The positive and negative time-id rows for a picture of `size` (height,
    /// width): `[original, crop, target]` (6 ids), or with `aesthetic` (the refiner,
    /// 5 ids) `[original, crop, score]`. `img2img` follows diffusers' image-to-image
    /// pipeline, whose negative row takes the *positive* crop and defaults the
    /// negative sizes to the positive ones; text to image uses the positive row
    /// unless both negative sizes are set.
    pub fn time_ids(&self, size: (usize, usize), aesthetic: bool, img2img: bool) -> [Vec<f32>; 2] {
        let orig = self.original_size.unwrap_or(size);
        let target = self.target_size.unwrap_or(size);
        let crop = self.crops_coords_top_left;
        let row = |o: (usize, usize), c: (usize, usize), t: (usize, usize), score: f64| {
            let mut v = [pair(o), pair(c)].concat();
            if aesthetic {
                v.push(score as f32);
            } else {
                v.extend(pair(t));
            }
            v
        };
        let pos = row(orig, crop, target, self.aesthetic_score);
        let neg = if img2img || aesthetic {
            row(
                self.negative_original_size.unwrap_or(orig),
                crop,
                self.negative_target_size.unwrap_or(target),
                self.negative_aesthetic_score,
            )
        } else {
            match (self.negative_original_size, self.negative_target_size) {
                (Some(o), Some(t)) => row(o, self.negative_crops_coords_top_left, t, 0.0),
                _ => pos.clone(),
            }
        };
        [pos, neg]
    }
}

/// The second encoder's pooled projection, which SDXL needs.
fn required_pooled(pooled: Option<Tensor<2>>) -> Result<Tensor<2>, CoreError> {
    pooled.ok_or_else(|| {
        invalid(
            "text_encoder_2",
            "SDXL's second text encoder must have a text_projection (CLIPTextModelWithProjection)",
        )
    })
}

impl StableDiffusion<'_> {
    /// Token ids `[batch, 77]` of `prompt` by `tokenizer`.
    pub(crate) fn ids_with(
        &self,
        tokenizer: &dyn PromptTokenizer,
        prompt: &str,
        batch: usize,
    ) -> Result<Tensor<2, Int>, CoreError> {
        let ids = tokenizer.encode_padded(prompt)?;
        let n = ids.len();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device);
        Ok(if batch > 1 { t.repeat_dim(0, batch) } else { t })
    }

    /// One prompt through both encoders: the concatenated layer `[b, 77, d1 + d2]`
    /// (`[b, 77, d2]` for the refiner) and the pooled projection `[b, p]`.
    fn encode_both(
        &self,
        x: &SdxlParts<'_>,
        prompt: &str,
        layer: HiddenLayer,
        batch: usize,
    ) -> Result<(Tensor<3>, Tensor<2>), CoreError> {
        let b = x
            .text_encoder_2
            .encode(self.ids_with(x.tokenizer_2, prompt, batch)?, layer)?;
        let pooled = required_pooled(b.text_embeds)?;
        if x.text_encoder_2_only {
            return Ok((b.hidden_states, pooled));
        }
        let a = self
            .text_encoder
            .encode(self.ids_with(self.tokenizer, prompt, batch)?, layer)?;
        Ok((
            Tensor::cat(vec![a.hidden_states, b.hidden_states], 2),
            pooled,
        ))
    }

    /// SDXL's `encode_prompt`: `[negative; positive]` with classifier-free guidance
    /// (zeros for an unset negative prompt when `force_zeros_for_empty_prompt`),
    /// else the positive only; prompt embeddings and pooled embeddings.
    pub(crate) fn encode_prompt_sdxl(
        &self,
        x: &SdxlParts<'_>,
        o: &GenerationOptions,
    ) -> Result<(Tensor<3>, Tensor<2>), CoreError> {
        let b = o.batch_size;
        // diffusers: hidden_states[-(clip_skip + 2)], no final norm.
        let layer = HiddenLayer::SkipRaw(o.clip_skip.unwrap_or(0) + 1);
        if o.long_prompts || o.prompt_weighting {
            return self.encode_prompt_sdxl_windows(x, o, layer);
        }
        let positive = self.encode_both(x, &o.prompt, layer, b)?;
        self.with_negative(x, o, positive, || {
            let negative = o.negative_prompt.as_deref().unwrap_or("");
            self.encode_both(x, negative, HiddenLayer::SkipRaw(1), b)
        })
    }

    /// `positive` alone without classifier-free guidance, else `[negative; positive]`:
    /// zeros for an unset negative prompt with `force_zeros_for_empty_prompt`, else
    /// what `negative` encodes.
    fn with_negative(
        &self,
        x: &SdxlParts<'_>,
        o: &GenerationOptions,
        positive: (Tensor<3>, Tensor<2>),
        negative: impl FnOnce() -> Result<(Tensor<3>, Tensor<2>), CoreError>,
    ) -> Result<(Tensor<3>, Tensor<2>), CoreError> {
        if !self.uses_cfg(o.guidance_scale) {
            return Ok(positive);
        }
        let (pe, pp) = positive;
        let (ne, np) = match (&o.negative_prompt, x.force_zeros_for_empty_prompt) {
            (None, true) => (pe.zeros_like(), pp.zeros_like()),
            _ => negative()?,
        };
        Ok((Tensor::cat(vec![ne, pe], 0), Tensor::cat(vec![np, pp], 0)))
    }

    /// Long prompts and A1111 weighting for SDXL, as A1111 does them: the same
    /// 75-token windows through both encoders, each encoder's windows weighted (its
    /// own mean restored) and concatenated along the sequence, the two encoders along
    /// the features: `[b, 77 * windows, d1 + d2]`; the pooled projection is the second
    /// encoder's of the first window. Negatives as [`Self::encode_prompt_sdxl`].
    fn encode_prompt_sdxl_windows(
        &self,
        x: &SdxlParts<'_>,
        o: &GenerationOptions,
        layer: HiddenLayer,
    ) -> Result<(Tensor<3>, Tensor<2>), CoreError> {
        let (b, w) = (o.batch_size, o.prompt_weighting);
        let [pos2, neg2] = self.prompt_windows(x.tokenizer_2, o)?;
        let [pos1, neg1] = if x.text_encoder_2_only {
            [Vec::new(), Vec::new()]
        } else {
            self.prompt_windows(self.tokenizer, o)?
        };
        let encode = |w2: &Windows, w1: &Windows, layer| -> Result<_, CoreError> {
            let (h2, pooled) =
                self.encode_windows(x.tokenizer_2, x.text_encoder_2, w2, layer, w, b)?;
            let pooled = required_pooled(pooled)?;
            if x.text_encoder_2_only {
                return Ok((h2, pooled));
            }
            let h1 = self
                .encode_windows(self.tokenizer, self.text_encoder, w1, layer, w, b)?
                .0;
            if h1.dims()[1] != h2.dims()[1] {
                return Err(invalid(
                    "tokenizer_2",
                    "the two tokenizers cut the prompt into different numbers of windows",
                ));
            }
            Ok((Tensor::cat(vec![h1, h2], 2), pooled))
        };
        let positive = encode(&pos2, &pos1, layer)?;
        self.with_negative(x, o, positive, || {
            encode(&neg2, &neg1, HiddenLayer::SkipRaw(1))
        })
    }

    /// The U-Net's added conditioning for SDXL: the pooled embeddings and the time
    /// ids, batched as the prompt embeddings (`[negative; positive]` with guidance).
    pub(crate) fn sdxl_added(
        &self,
        o: &GenerationOptions,
        pooled: Tensor<2>,
        img2img: bool,
    ) -> Result<AddedConditioning, CoreError> {
        let Some(dims) = self.unet.text_time_dims() else {
            return Err(invalid(
                "unet",
                "an SDXL text encoder pair needs a U-Net with addition_embed_type text_time",
            ));
        };
        let [rows, p] = pooled.dims();
        let n_ids = dims.input_dim.saturating_sub(p) / dims.time_embed_dim.max(1);
        let aesthetic = match n_ids {
            6 => false,
            5 => true,
            _ => {
                return Err(invalid(
                    "unet",
                    format!(
                        "add_embedding takes {} inputs: not {p} pooled + 5 or 6 time ids x {}",
                        dims.input_dim, dims.time_embed_dim
                    ),
                ));
            }
        };
        let [pos, neg] = o.micro.time_ids((o.height, o.width), aesthetic, img2img);
        let b = o.batch_size;
        let mut values = Vec::with_capacity(rows * n_ids);
        if rows == 2 * b {
            for _ in 0..b {
                values.extend_from_slice(&neg);
            }
        }
        for _ in 0..b {
            values.extend_from_slice(&pos);
        }
        let time_ids = Tensor::<2>::from_data(TensorData::new(values, [rows, n_ids]), &self.device);
        Ok(AddedConditioning {
            text_embeds: Some(pooled),
            time_ids: Some(time_ids),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::MicroConditioning;

    #[test]
    fn time_ids_are_height_first_and_negatives_follow_diffusers() {
        let m = MicroConditioning {
            original_size: Some((1024, 768)),
            crops_coords_top_left: (16, 48),
            negative_original_size: Some((256, 384)),
            ..Default::default()
        };
        let [pos, neg] = m.time_ids((32, 64), false, false);
        assert_eq!(pos, [1024.0, 768.0, 16.0, 48.0, 32.0, 64.0]);
        // Text to image: one negative size alone is ignored.
        assert_eq!(neg, pos);
        // Image to image: the negative original size with the positive crop.
        let [_, neg] = m.time_ids((32, 64), false, true);
        assert_eq!(neg, [256.0, 384.0, 16.0, 48.0, 32.0, 64.0]);
        // The refiner: the aesthetic scores instead of the target size.
        let [pos, neg] = MicroConditioning::default().time_ids((32, 32), true, false);
        assert_eq!(pos, [32.0, 32.0, 0.0, 0.0, 6.0]);
        assert_eq!(neg, [32.0, 32.0, 0.0, 0.0, 2.5]);
    }
}
