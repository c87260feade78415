//! Latent interpolation between two generations.

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource};

use crate::composed::{
    GenerationOptions, GenerationOutput, StableDiffusion, StepCallback, StepInfo, invalid,
};

/// Spherical interpolation of two noise tensors (linear when nearly parallel).
pub fn slerp(a: Tensor<4>, b: Tensor<4>, t: f64) -> Tensor<4> {
    let dot = (a.clone() * b.clone()).sum().into_scalar::<f32>() as f64;
    let na = (a.clone() * a.clone()).sum().into_scalar::<f32>() as f64;
    let nb = (b.clone() * b.clone()).sum().into_scalar::<f32>() as f64;
    let cos = dot / (na.sqrt() * nb.sqrt()).max(1e-12);
    if cos.abs() > 0.9995 {
        return a.clone() + (b - a) * t;
    }
    let theta = cos.acos();
    let s = theta.sin();
    a * (((1.0 - t) * theta).sin() / s) + b * ((t * theta).sin() / s)
}

/// The two ends of an interpolation: options (prompts) and initial noise of each.
#[derive(Debug, Clone)]
pub struct Endpoints<'o> {
    /// Options of the first frame (size, steps, guidance are taken from these).
    pub a: &'o GenerationOptions,
    /// Options of the last frame (its prompt and negative prompt are used).
    pub b: &'o GenerationOptions,
    /// Initial noise of the first frame, `[batch, 4, h, w]`.
    pub noise_a: Tensor<4>,
    /// Initial noise of the last frame, the same shape.
    pub noise_b: Tensor<4>,
}

impl StableDiffusion<'_> {
    /// Latent interpolation between two generations: frame `k` of `frames` uses the
    /// prompt embeddings interpolated linearly and the initial noise spherically
    /// (`slerp`) at `t = k / (frames - 1)`. The end frames equal the plain
    /// generations of `a` with `noise_a` and of `b` with `noise_b`.
    ///
    /// # Errors
    /// No frames, noises of different shapes, prompts encoding to different shapes,
    /// and as [`Self::txt2img`].
    pub fn interpolate(
        &self,
        ends: Endpoints<'_>,
        frames: usize,
        noise: &mut dyn NoiseSource,
        mut callback: Option<StepCallback<'_>>,
    ) -> Result<Vec<GenerationOutput>, CoreError> {
        if frames == 0 {
            return Err(invalid("frames", "must be at least 1"));
        }
        if ends.noise_a.dims() != ends.noise_b.dims() {
            return Err(invalid("noise_b", "must have the shape of noise_a"));
        }
        let (ea, added_a) = self.encode_conditioning(ends.a, false)?;
        let (eb, added_b) = self.encode_conditioning(ends.b, false)?;
        if ea.dims() != eb.dims() {
            return Err(invalid(
                "prompt",
                format!(
                    "the two prompts encode to shapes {:?} and {:?}",
                    ea.dims(),
                    eb.dims()
                ),
            ));
        }
        let mut out = Vec::with_capacity(frames);
        for k in 0..frames {
            let t = if frames == 1 {
                0.0
            } else {
                k as f64 / (frames - 1) as f64
            };
            let lerp = |a: Tensor<2>, b: Tensor<2>| a.clone() + (b - a) * t;
            let (e, added, x) = if t == 0.0 {
                (ea.clone(), added_a.clone(), ends.noise_a.clone())
            } else if t == 1.0 {
                (eb.clone(), added_b.clone(), ends.noise_b.clone())
            } else {
                let added = sd_core::AddedConditioning {
                    text_embeds: match (&added_a.text_embeds, &added_b.text_embeds) {
                        (Some(a), Some(b)) => Some(lerp(a.clone(), b.clone())),
                        _ => None,
                    },
                    ..added_a.clone()
                };
                (
                    ea.clone() + (eb.clone() - ea.clone()) * t,
                    added,
                    slerp(ends.noise_a.clone(), ends.noise_b.clone(), t),
                )
            };
            let cb = callback
                .as_mut()
                .map(|c| &mut **c as &mut dyn FnMut(&StepInfo<'_>) -> bool);
            let latents = self.txt2img_latents(ends.a, (e, added), Some(x), noise, cb)?;
            out.push(GenerationOutput {
                images: self.decode(latents.clone())?,
                latents,
            });
        }
        Ok(out)
    }
}
