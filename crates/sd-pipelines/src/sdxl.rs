//! SDXL's added conditioning (diffusers' `StableDiffusionXLPipeline`): the pooled
//! prompt embedding (from [`crate::conditioner::SdxlConditioner`]) and the
//! micro-conditioning time ids, fed to the U-Net's `text_time` addition.

use burn::prelude::*;
use sd_core::{AddedConditioning, CoreError};

use crate::composed::{GenerationOptions, StableDiffusion, invalid};

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

impl StableDiffusion<'_> {
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
