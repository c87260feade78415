//! Fully connected layers: `x wᵀ + b`, with a residual folded in, several weights
//! over one input, and the GEGLU feed-forward's projection.

use burn::nn::Linear;
use burn::prelude::*;
#[cfg(feature = "flex")]
use burn::tensor::DType;
use burn::tensor::activation::gelu;

/// `linear.forward(x)`: on the CPU backend parallel GEMMs reading the input and the
/// weight in place whatever their strides (with the `flex` feature); elsewhere burn's
/// op.
///
/// # Shapes
/// - `x`: `[..., d_in]` to `[..., d_out]`
pub fn linear_forward<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if let Some(mut ys) = host_linears(&[linear], &x, &[], false) {
        return ys.pop().expect("one output");
    }
    burn_linear(linear, x)
}

/// burn's `linear.forward(x)`, its parameters cast to `x`'s dtype where stored
/// narrower (half-precision weights under f32 activations).
fn burn_linear<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let weight = linear.weight.val();
    if weight.dtype() == dtype
        && linear
            .bias
            .as_ref()
            .is_none_or(|b| b.val().dtype() == dtype)
    {
        return linear.forward(x);
    }
    burn::tensor::module::linear(
        x,
        super::dtype::to_dtype(weight, dtype),
        linear.bias.as_ref().map(|b| b.val().cast(dtype)),
    )
}

/// `linear.forward(x) + residual`, the residual add folded into the product on the
/// CPU backend (the output starts as `residual + bias`).
///
/// # Shapes
/// - `x`: `[..., d_in]`, `residual` and output: `[..., d_out]`
pub fn linear_forward_residual<const D: usize>(
    linear: &Linear,
    x: Tensor<D>,
    residual: Tensor<D>,
) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if let Some(mut ys) = host_linears(&[linear], &x, std::slice::from_ref(&residual), false) {
        return ys.pop().expect("one output");
    }
    burn_linear(linear, x) + residual
}

/// `[linear.forward(x) for linear in linears]`: on the CPU backend one pass over all
/// the weights when the rows are few (`q`, `k`, `v` of the text encoder, `k`, `v` of
/// cross-attention; one streamed pass); elsewhere one product each.
///
/// # Shapes
/// - `x`: `[b, n, d_in]`; output `i`: `[b, n, d_out_i]`
pub fn linear_forward_many<const N: usize>(linears: [&Linear; N], x: Tensor<3>) -> [Tensor<3>; N] {
    #[cfg(feature = "flex")]
    if let Some(ys) = host_linears(&linears, &x, &[], false).and_then(|ys| ys.try_into().ok()) {
        return ys;
    }
    linears.map(|l| linear_forward(l, x.clone()))
}

/// `a * gelu(gate)` for `[a, gate] = proj.forward(x)`: the GEGLU feed-forward's
/// first half, fused with its projection on the CPU backend.
///
/// # Shapes
/// - `x`: `[b, n, dim]` to `[b, n, d_out / 2]`
pub fn geglu_forward(proj: &Linear, x: Tensor<3>) -> Tensor<3> {
    #[cfg(feature = "flex")]
    if let Some(mut h) = host_linears(&[proj], &x, &[], true) {
        return h.pop().expect("one output");
    }
    let h = linear_forward(proj, x);
    let [_, _, c2] = h.dims();
    let mut parts = h.split(c2 / 2, 2);
    let gate = parts.pop().expect("two halves");
    let h = parts.pop().expect("two halves");
    h * gelu(gate)
}

/// The CPU-backend path of every linear entry point: `linears` applied to `x`, each
/// output starting from its residual (`residuals` is empty or has one per linear),
/// or with `geglu` the fused `a * gelu(b)` for `[a, b] = linears[0](x)` (one linear,
/// no residual). The weights and the input are read in place whatever their
/// strides; a batch whose items follow each other is one matrix. `None` where the
/// kernels do not apply (other devices or dtypes, ranks other than 2 and 3,
/// negative strides, a residual that is not contiguous).
///
/// # Shapes
/// - `x`: `[..., d_in]`; output `i` and residual `i`: `[..., d_out_i]` (`d_out / 2`
///   with `geglu`)
#[cfg(feature = "flex")]
pub(crate) fn host_linears<const D: usize>(
    linears: &[&Linear],
    x: &Tensor<D>,
    residuals: &[Tensor<D>],
    geglu: bool,
) -> Option<Vec<Tensor<D>>> {
    use crate::host::linear::{Matrix, linear_geglu, linear_many};
    use crate::host::panel_gemm::StreamPart;
    use crate::host::{with_views, with_weight_views};
    if !(D == 2 || D == 3)
        || !crate::host::applies(x)
        || residuals.iter().any(|r| !crate::host::applies(r))
        || !(residuals.is_empty() || residuals.len() == linears.len())
        || (geglu && (linears.len() != 1 || !residuals.is_empty()))
    {
        return None;
    }
    let weights: Vec<Tensor<2>> = linears.iter().map(|l| l.weight.val()).collect();
    let biases: Vec<Option<Tensor<1>>> = linears
        .iter()
        .map(|l| l.bias.as_ref().map(|b| b.val()))
        .collect();
    let dims = x.dims();
    let d_in = dims[D - 1];
    // Half-precision and 8-bit weights are widened as they are read; biases are f32.
    let f32_compute = weights.iter().all(|w| {
        matches!(
            w.dtype(),
            DType::F32 | DType::F16 | DType::BF16 | DType::QFloat(_)
        )
    }) && biases.iter().flatten().all(|b| b.dtype() == DType::F32);
    if !f32_compute || weights.iter().any(|w| w.dims()[0] != d_in) {
        return None;
    }
    // Biases are a few KB: copied rather than viewed.
    let biases: Vec<Option<Vec<f32>>> = biases
        .into_iter()
        .map(|b| b.map(crate::host::into_vec))
        .collect();
    // Weights are `[d_in, d_out]` views of the `[d_out, d_in]` matrices PyTorch stores.
    let d_outs: Vec<usize> = weights.iter().map(|w| w.dims()[1]).collect();
    let widths: Vec<usize> = d_outs
        .iter()
        .map(|&d| if geglu { d / 2 } else { d })
        .collect();
    let (batch, rows) = if D == 3 {
        (dims[0], dims[1])
    } else {
        (1, dims[0])
    };
    // The input and the residuals, viewed together.
    let operands: Vec<Tensor<D>> = std::iter::once(x.clone())
        .chain(residuals.iter().cloned())
        .collect();
    let outs = with_weight_views(&weights, |ws| {
        with_views(&operands, |views| {
            let (xv, rvs) = views.split_first().expect("the input is first");
            let contiguous = rvs.iter().zip(&d_outs).all(|(rv, &d_out)| {
                let mut shape = dims;
                shape[D - 1] = d_out;
                rv.is_contiguous(&shape)
            });
            if !contiguous {
                return None;
            }
            let st = &xv.strides;
            let (sb, sr, sc) = if D == 3 {
                (st[0], st[1], st[2])
            } else {
                (0, st[0], st[1])
            };
            // A batch whose items follow each other is one matrix of `batch * rows`
            // rows: one call, no per-item outputs to join.
            let (items, item_rows) = if batch == 1 || sb == rows as isize * sr {
                (1, batch * rows)
            } else {
                (batch, rows)
            };
            let mut outs: Vec<Vec<f32>> = widths
                .iter()
                .map(|w| Vec::with_capacity(batch * rows * w))
                .collect();
            for bi in 0..items {
                let xm = Matrix {
                    data: &xv.data[bi * sb as usize..],
                    row_stride: sr,
                    col_stride: sc,
                };
                let parts: Vec<StreamPart<'_>> = ws
                    .iter()
                    .zip(&d_outs)
                    .zip(&biases)
                    .enumerate()
                    .map(|(i, ((w, &d_out), b))| StreamPart {
                        weight: Matrix {
                            data: w.data,
                            row_stride: w.strides[1],
                            col_stride: w.strides[0],
                        },
                        d_out,
                        bias: b.as_deref(),
                        residual: rvs.get(i).map(|r| &r.data[bi * item_rows * d_out..]),
                    })
                    .collect();
                let ys = if geglu {
                    let p = parts[0];
                    vec![linear_geglu(
                        xm,
                        item_rows,
                        d_in,
                        p.weight,
                        p.d_out / 2,
                        p.bias,
                    )]
                } else {
                    linear_many(xm, item_rows, d_in, &parts)
                };
                if items == 1 {
                    return Some(ys);
                }
                for (out, y) in outs.iter_mut().zip(ys) {
                    out.extend_from_slice(&y);
                }
            }
            Some(outs)
        })
        .flatten()
    })
    .flatten()?;
    let device = x.device();
    Some(
        outs.into_iter()
            .zip(&widths)
            .map(|(values, &width)| {
                let mut shape = dims;
                shape[D - 1] = width;
                crate::host::from_vec(values, shape, &device)
            })
            .collect(),
    )
}
