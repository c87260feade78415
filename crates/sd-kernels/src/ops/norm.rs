//! GroupNorm (statistics in f32) with an optional SiLU.

use burn::prelude::*;
#[cfg(feature = "flex")]
use burn::tensor::DType;
use burn::tensor::activation::silu as silu_op;

use crate::ops::dtype::{to_dtype, to_f32};

/// `torch.nn.GroupNorm(groups, channels, eps)` with affine `weight` and `bias`
/// (`[channels]`), then SiLU when `silu`: one fused pass on the CPU backend (in place
/// when `x` is the only reference to its values), statistics in f32 everywhere.
///
/// # Shapes
/// - `x` and output: `[batch, channels, ...]`
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    groups: usize,
    epsilon: f64,
    silu: bool,
) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if crate::host::applies(&x) && weight.dtype() == DType::F32 {
        let dims = x.dims();
        let device = x.device();
        let weight = crate::host::into_vec(weight);
        let bias = crate::host::into_vec(bias);
        let params = crate::host::group_norm::GroupNormParams {
            batch: dims[0],
            channels: dims[1],
            groups,
            weight: &weight,
            bias: &bias,
            epsilon,
            silu,
        };
        // In place when `x` is the only reference to its values; else read in
        // place and written to a new buffer (the input is still needed, as a
        // residual: copying it first cost a pass).
        let (unique, x) = crate::host::is_unique(x);
        if !unique {
            let len: usize = dims.iter().product();
            let out = crate::host::with_view(&x, |v| {
                v.is_contiguous(&dims).then(|| {
                    let mut out = Vec::with_capacity(len);
                    let dst = &mut out.spare_capacity_mut()[..len];
                    crate::host::group_norm::group_norm_into(&v.data[..len], dst, &params);
                    // SAFETY: group_norm_into wrote all `len` values.
                    unsafe { out.set_len(len) };
                    out
                })
            });
            if let Some(Some(out)) = out {
                return crate::host::from_vec(out, dims, &device);
            }
        }
        return crate::host::map_in_place(x, |values| {
            crate::host::group_norm::group_norm(values, &params)
        });
    }
    let y = group_norm_generic(x, weight, bias, groups, epsilon);
    if silu { silu_op(y) } else { y }
}

/// GroupNorm with burn's ops, statistics in f32.
fn group_norm_generic<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    groups: usize,
    epsilon: f64,
) -> Tensor<D> {
    let dtype = x.dtype();
    let dims = x.dims();
    let (b, c) = (dims[0], dims[1]);
    let n: usize = dims.iter().product::<usize>() / (b * groups);
    let xr = to_f32(x).reshape([b, groups, n]);
    let (var, mean) = xr.clone().var_mean_bias(2);
    let y = (xr - mean) * (var + epsilon).sqrt().recip();
    let y = to_dtype(y.reshape(dims), dtype);
    let mut shape = [1usize; D];
    shape[1] = c;
    y * weight.reshape(shape) + bias.reshape(shape)
}

/// RMS normalisation over the last axis, `x / sqrt(mean(x²) + eps) * weight`, the
/// statistics in f32 (T5's `T5LayerNorm`, diffusers' `RMSNorm`); no weight scales
/// nothing.
///
/// # Shapes
/// - `x` and output: `[..., d]`; `weight`: `[d]`
pub fn rms_norm<const D: usize>(
    x: Tensor<D>,
    weight: Option<Tensor<1>>,
    epsilon: f64,
) -> Tensor<D> {
    let dtype = x.dtype();
    let x = to_f32(x);
    let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
    let y = x * (variance + epsilon).sqrt().recip();
    let y = match weight {
        Some(w) => {
            let d = w.dims()[0];
            let mut shape = [1usize; D];
            shape[D - 1] = d;
            y * to_f32(w).reshape(shape)
        }
        None => y,
    };
    to_dtype(y, dtype)
}
