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
