//! Adaptive layer norms of the SD 3 transformer: diffusers' `AdaLayerNormZero`,
//! `SD35AdaLayerNormZeroX` and `AdaLayerNormContinuous`. Each maps the conditioning
//! embedding through `linear(silu(emb))` to per-channel shifts, scales and gates, and
//! normalises without affine weights (eps 1e-6).

use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::attention::{linear, linear_forward};
use crate::norm::layer_norm_plain;

const EPS: f64 = 1e-6;

/// `norm(x) * (1 + scale) + shift` with `[b, d]` scale and shift over `[b, n, d]`.
pub(crate) fn modulate(x: Tensor<3>, shift: Tensor<2>, scale: Tensor<2>) -> Tensor<3> {
    let [b, d] = shift.dims();
    layer_norm_plain(x, EPS) * (scale.reshape([b, 1, d]) + 1.0) + shift.reshape([b, 1, d])
}

/// `[b, d]` gate over `[b, n, d]`.
pub(crate) fn gate(x: Tensor<3>, gate: &Tensor<2>) -> Tensor<3> {
    let [b, d] = gate.dims();
    x * gate.clone().reshape([b, 1, d])
}

/// `AdaLayerNormZero` (6 chunks) or `SD35AdaLayerNormZeroX` (9: a second
/// modulation for MMDiT-X's image-only attention), keys `norm1.linear`.
#[derive(Module, Debug)]
pub struct AdaLayerNormZero {
    /// `[d] -> [chunks * d]`.
    pub linear: Linear,
    chunks: usize,
}

/// What an [`AdaLayerNormZero`] returns: the modulated input and the block's gates,
/// shifts and scales (each `[b, d]`), in diffusers' order.
pub struct AdaNormZeroOutput {
    /// `norm(x) * (1 + scale_msa) + shift_msa`.
    pub x: Tensor<3>,
    /// Gate of the attention output.
    pub gate_msa: Tensor<2>,
    /// Feed-forward shift.
    pub shift_mlp: Tensor<2>,
    /// Feed-forward scale.
    pub scale_mlp: Tensor<2>,
    /// Gate of the feed-forward output.
    pub gate_mlp: Tensor<2>,
    /// MMDiT-X: the second attention's input and gate.
    pub x2: Option<(Tensor<3>, Tensor<2>)>,
}

impl AdaLayerNormZero {
    /// Width `d`; `dual`: the 9-chunk `SD35AdaLayerNormZeroX`.
    pub fn new(d: usize, dual: bool, device: &Device) -> Self {
        let chunks = if dual { 9 } else { 6 };
        Self {
            linear: linear(d, chunks * d, true, device),
            chunks,
        }
    }

    /// # Shapes
    /// - `x`: `[b, n, d]`, `emb`: `[b, d]`
    pub fn forward(&self, x: Tensor<3>, emb: Tensor<2>) -> AdaNormZeroOutput {
        let mut c = linear_forward(&self.linear, silu(emb))
            .chunk(self.chunks, 1)
            .into_iter();
        let mut next = || c.next().expect("chunk count");
        let (shift_msa, scale_msa, gate_msa) = (next(), next(), next());
        let (shift_mlp, scale_mlp, gate_mlp) = (next(), next(), next());
        let normed = layer_norm_plain(x, EPS);
        let [b, d] = shift_msa.dims();
        let apply = |shift: Tensor<2>, scale: Tensor<2>| {
            normed.clone() * (scale.reshape([b, 1, d]) + 1.0) + shift.reshape([b, 1, d])
        };
        let x2 = (self.chunks == 9).then(|| {
            let (shift2, scale2, gate2) = (next(), next(), next());
            (apply(shift2, scale2), gate2)
        });
        AdaNormZeroOutput {
            x: apply(shift_msa, scale_msa),
            gate_msa,
            shift_mlp,
            scale_mlp,
            gate_mlp,
            x2,
        }
    }
}

/// `AdaLayerNormContinuous` without affine weights: `linear(silu(emb))` split into
/// **scale then shift** (the reverse of the zero norms), `norm(x) * (1 + scale) +
/// shift`. The transformer's `norm_out` and the last block's `norm1_context`.
#[derive(Module, Debug)]
pub struct AdaLayerNormContinuous {
    /// `[d_cond] -> [2 * d]`.
    pub linear: Linear,
}

impl AdaLayerNormContinuous {
    /// Output width `d`, conditioning width `d_cond`.
    pub fn new(d: usize, d_cond: usize, device: &Device) -> Self {
        Self {
            linear: linear(d_cond, 2 * d, true, device),
        }
    }

    /// # Shapes
    /// - `x`: `[b, n, d]`, `emb`: `[b, d_cond]`; output `[b, n, d]`
    pub fn forward(&self, x: Tensor<3>, emb: Tensor<2>) -> Tensor<3> {
        let [scale, shift]: [Tensor<2>; 2] = linear_forward(&self.linear, silu(emb))
            .chunk(2, 1)
            .try_into()
            .expect("two chunks");
        modulate(x, shift, scale)
    }
}
