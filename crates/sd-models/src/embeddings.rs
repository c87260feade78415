//! Timestep embeddings: diffusers' `Timesteps` (sinusoidal) and `TimestepEmbedding`.

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::attention::{linear, linear_forward};

/// Sinusoidal timestep features, diffusers' `get_timestep_embedding`.
///
/// The frequencies are computed in f32 exactly as PyTorch does; `t` may be fractional.
///
/// # Shapes
/// - `timesteps`: `[batch]`
/// - output: `[batch, dim]`, cos first when `flip_sin_to_cos`
pub fn timestep_embedding(
    timesteps: Tensor<1>,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Tensor<2> {
    let half = dim / 2;
    let device = timesteps.device();
    let ln = -(10000f32.ln());
    let denom = half as f32 - downscale_freq_shift as f32;
    let freqs: Vec<f32> = (0..half).map(|i| ((ln * i as f32) / denom).exp()).collect();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
    let [b] = timesteps.dims();
    let args = timesteps.reshape([b, 1]) * freqs.reshape([1, half]);
    let (sin, cos) = (args.clone().sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    };
    if dim % 2 == 1 {
        Tensor::cat(vec![emb, Tensor::zeros([b, 1], &device)], 1)
    } else {
        emb
    }
}

/// diffusers' `Timesteps` projection settings: the sinusoidal width and layout of
/// `time_proj` (and SDXL's `add_time_proj`).
#[derive(Debug, Clone, Copy)]
pub struct TimeProjection {
    /// Width of the sinusoidal features.
    pub dim: usize,
    /// Cos first.
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift`.
    pub freq_shift: f64,
}

impl TimeProjection {
    /// The sinusoidal features of `timesteps` (f32) and their embedding through
    /// `embedding` in `dtype`, with an optional `timestep_cond`.
    ///
    /// # Shapes
    /// - `timesteps`: `[b]`; outputs `[b, dim]` and `[b, time_embed_dim]`
    pub fn embed(
        &self,
        embedding: &TimestepEmbedding,
        timesteps: Tensor<1>,
        timestep_cond: Option<Tensor<2>>,
        dtype: burn::tensor::DType,
    ) -> (Tensor<2>, Tensor<2>) {
        let t = crate::norm::to_f32(timesteps);
        let proj = timestep_embedding(t, self.dim, self.flip_sin_to_cos, self.freq_shift);
        let cond = timestep_cond.map(|c| crate::norm::to_dtype(c, dtype));
        let emb = embedding.forward(crate::norm::to_dtype(proj.clone(), dtype), cond);
        (proj, emb)
    }

    /// SDXL's `aug_emb`: `add_embedding([text_embeds, time_proj(time_ids)])` when
    /// both inputs are given (this projection being `add_time_proj`).
    ///
    /// # Shapes
    /// - `text_embeds` `[b, d]`, `time_ids` `[b, n]`; output `[b, time_embed_dim]`
    pub fn embed_text_time(
        &self,
        add_embedding: &TimestepEmbedding,
        added: &sd_core::AddedConditioning,
        dtype: burn::tensor::DType,
    ) -> Option<Tensor<2>> {
        let (text, ids) = (added.text_embeds.clone()?, added.time_ids.clone()?);
        let [b, n] = ids.dims();
        let ids = crate::norm::to_f32(ids).reshape([b * n]);
        let time = timestep_embedding(ids, self.dim, self.flip_sin_to_cos, self.freq_shift)
            .reshape([b, n * self.dim]);
        let input = Tensor::cat(vec![crate::norm::to_f32(text), time], 1);
        Some(add_embedding.forward(crate::norm::to_dtype(input, dtype), None))
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x + cond_proj(condition))))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    /// Projection of the condition added to the features (`cond_proj`, no bias;
    /// LCM-distilled U-Nets' embedded guidance scale).
    pub cond_proj: Option<Linear>,
    /// First projection.
    pub linear_1: Linear,
    /// Second projection.
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// From `in_channels` sinusoidal features to `time_embed_dim`, with a
    /// `cond_proj_dim`-wide condition when given.
    pub fn new(
        in_channels: usize,
        time_embed_dim: usize,
        cond_proj_dim: Option<usize>,
        device: &Device,
    ) -> Self {
        Self {
            cond_proj: cond_proj_dim.map(|d| linear(d, in_channels, false, device)),
            linear_1: linear(in_channels, time_embed_dim, true, device),
            linear_2: linear(time_embed_dim, time_embed_dim, true, device),
        }
    }

    /// # Shapes
    /// - `x`: `[b, in_channels]`; `condition`: `[b, cond_proj_dim]` (ignored without
    ///   a `cond_proj`); output `[b, time_embed_dim]`
    pub fn forward(&self, x: Tensor<2>, condition: Option<Tensor<2>>) -> Tensor<2> {
        let x = match (&self.cond_proj, condition) {
            (Some(p), Some(c)) => x + linear_forward(p, c),
            _ => x,
        };
        linear_forward(&self.linear_2, silu(linear_forward(&self.linear_1, x)))
    }
}

/// diffusers' `get_guidance_scale_embedding`: sinusoidal features of `w * 1000`
/// (`[sin, cos]`, frequencies `10000^(-i / (dim/2 - 1))`, a zero column for odd
/// `dim`), what an LCM-distilled U-Net takes as `timestep_cond` (`w` is the
/// guidance scale minus 1).
///
/// # Shapes
/// - `w`: `[b]` to `[b, dim]` (f32)
pub fn guidance_scale_embedding(w: Tensor<1>, dim: usize) -> Tensor<2> {
    let [b] = w.dims();
    let device = w.device();
    let half = dim / 2;
    let step = (10000f32).ln() / (half.max(2) - 1) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (-(i as f32) * step).exp()).collect();
    let freqs = Tensor::<1>::from_data(TensorData::new(freqs, [half]), &device);
    let args = crate::norm::to_f32(w).mul_scalar(1000.0).reshape([b, 1]) * freqs.reshape([1, half]);
    let mut parts = vec![args.clone().sin(), args.cos()];
    if dim % 2 == 1 {
        parts.push(Tensor::zeros([b, 1], &device));
    }
    Tensor::cat(parts, 1)
}
