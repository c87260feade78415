//! Multi-head attention: diffusers' `Attention` (U-Net transformers and the VAE mid
//! block) and the scaled-dot-product kernel shared with CLIP.

use burn::nn::{Linear, LinearConfig, LinearLayout};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::norm::{to_dtype, to_f32};

/// A `Linear` whose weight is stored as PyTorch stores it (`[out, in]`), so weight
/// files load without a transpose table.
pub(crate) fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_layout(LinearLayout::Col)
        .init(device)
}

/// `linear.forward(x)`: on the CPU backend parallel GEMMs reading the input and the
/// weight in place whatever their strides (`host::linear`, with the `flex` feature); elsewhere burn's
/// op.
///
/// # Shapes
/// - `x`: `[..., d_in]` to `[..., d_out]`
pub fn linear_forward<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if let Some(mut ys) = host_linears(&[linear], &x, &[], false) {
        return ys.pop().expect("one output");
    }
    linear.forward(x)
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
    linear.forward(x) + residual
}

/// `[linear.forward(x) for linear in linears]`: on the CPU backend one pass over all
/// the weights when the rows are few (`q`, `k`, `v` of the text encoder, `k`, `v` of
/// cross-attention; see `host::linear::linear_many`); elsewhere one product each.
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
    use crate::host::with_views;
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
    let f32_only = weights.iter().all(|w| w.dtype() == DType::F32)
        && biases.iter().flatten().all(|b| b.dtype() == DType::F32);
    if !f32_only || weights.iter().any(|w| w.dims()[0] != d_in) {
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
    let outs = with_views(&weights, |ws| {
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

/// Softmax attention `softmax(q kᵀ / sqrt(d)) v` through burn's fused attention op,
/// computed in f32 whatever the inputs' dtype.
///
/// # Shapes
/// - `q`: `[batch, heads, n_q, head_dim]`, `k`/`v`: `[batch, heads, n_k, head_dim]`
/// - output: `[batch, heads, n_q, head_dim]`
pub fn scaled_dot_product_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    is_causal: bool,
) -> Tensor<4> {
    let dtype = q.dtype();
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    if dtype == DType::F32 {
        attention(q, k, v, None, None, options)
    } else {
        let out = attention(to_f32(q), to_f32(k), to_f32(v), None, None, options);
        to_dtype(out, dtype)
    }
}

/// Multi-head attention on packed projections: `q` `[batch, n, heads * d]`, `k` and `v`
/// `[batch, m, heads * d]`, output `[batch, n, heads * d]` (heads merged), scale
/// `1 / sqrt(d)`, computed in f32.
///
/// On the CPU backend this runs the flash-attention kernel of `host::attention` (with the `flex` feature) straight
/// on the projections' layout (memory linear in `n` and `m`, no head permutes); on
/// other devices it splits heads and calls burn's fused attention.
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    is_causal: bool,
) -> Tensor<3> {
    #[cfg(feature = "flex")]
    if crate::host::applies(&q) && k.dtype() == DType::F32 && v.dtype() == DType::F32 {
        let [batch, n_q, width] = q.dims();
        let n_kv = k.dims()[1];
        let device = q.device();
        let shape = crate::host::attention::AttentionShape {
            batch,
            heads,
            n_q,
            n_kv,
            head_dim: width / heads,
            causal: is_causal,
        };
        let out = crate::host::attention::attention(
            &crate::host::into_vec(q),
            &crate::host::into_vec(k),
            &crate::host::into_vec(v),
            shape,
        );
        return crate::host::from_vec(out, [batch, n_q, width], &device);
    }
    let out = scaled_dot_product_attention(
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
        is_causal,
    );
    merge_heads(out)
}

/// Splits `[b, n, heads * d]` into `[b, heads, n, d]`.
pub(crate) fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = x.dims();
    x.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// Merges `[b, heads, n, d]` into `[b, n, heads * d]`.
pub(crate) fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}

/// diffusers' `Attention` with `AttnProcessor2_0`: self-attention, or cross-attention
/// when given a context. Keys: `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection (`to_out.0` in diffusers).
    pub to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `query_dim` wide queries over `context_dim` wide keys/values, `heads` heads of
    /// `head_dim` each. `qkv_bias`: U-Net attentions have none, the VAE's have them.
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        device: &Device,
    ) -> Self {
        let inner = heads * head_dim;
        Self {
            to_q: linear(query_dim, inner, qkv_bias, device),
            to_k: linear(context_dim, inner, qkv_bias, device),
            to_v: linear(context_dim, inner, qkv_bias, device),
            to_out: linear(inner, query_dim, true, device),
            heads,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, n, query_dim]`
    /// - `context`: `[batch, m, context_dim]` (self-attention when `None`)
    /// - output: `[batch, n, query_dim]`
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        linear_forward(&self.to_out, self.attend(x, context))
    }

    /// `forward(x, context) + residual`, the add folded into the output projection
    /// on the CPU backend.
    ///
    /// # Shapes
    /// As [`Self::forward`]; `residual`: `[batch, n, query_dim]`.
    pub fn forward_residual(
        &self,
        x: Tensor<3>,
        context: Option<Tensor<3>>,
        residual: Tensor<3>,
    ) -> Tensor<3> {
        linear_forward_residual(&self.to_out, self.attend(x, context), residual)
    }

    /// The heads' outputs before the output projection: `[batch, n, heads * head_dim]`.
    fn attend(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let [q, k, v] = match context {
            None => linear_forward_many([&self.to_q, &self.to_k, &self.to_v], x),
            Some(context) => {
                let [k, v] = linear_forward_many([&self.to_k, &self.to_v], context);
                [linear_forward(&self.to_q, x), k, v]
            }
        };
        multi_head_attention(q, k, v, self.heads, false)
    }
}
