//! Softmax attention: burn's fused op, and multi-head attention on packed
//! projections (flash attention on the CPU backend).

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::ops::dtype::{to_dtype, to_f32};

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
/// On the CPU backend this runs the flash-attention kernel of this crate straight
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
pub fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = x.dims();
    x.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// Merges `[b, heads, n, d]` into `[b, n, heads * d]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}

/// Softmax attention with an additive bias and an explicit scale,
/// `softmax(scale · q kᵀ + bias) v`, computed in f32 (T5: scale 1 and the relative
/// position bias).
///
/// # Shapes
/// - `q`: `[batch, heads, n_q, d]`, `k`/`v`: `[batch, heads, n_k, d]`
/// - `bias`: `[batch, heads, n_q, n_k]`
/// - output: `[batch, heads, n_q, d]`
pub fn biased_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Tensor<4>,
    scale: f64,
) -> Tensor<4> {
    let dtype = q.dtype();
    let options = AttentionModuleOptions {
        scale: Some(scale),
        softcap: None,
        is_causal: false,
    };
    let out = attention(
        to_f32(q),
        to_f32(k),
        to_f32(v),
        None,
        Some(to_f32(bias)),
        options,
    );
    to_dtype(out, dtype)
}
