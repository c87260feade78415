//! Multi-head attention: diffusers' `Attention` (U-Net transformers and the VAE mid
//! block) and the scaled-dot-product kernel shared with CLIP.

use burn::nn::{Linear, LinearConfig, LinearLayout};
use burn::prelude::*;

pub use sd_kernels::ops::{
    linear_forward, linear_forward_many, linear_forward_residual, merge_heads,
    multi_head_attention, scaled_dot_product_attention, split_heads,
};

/// A `Linear` whose weight is stored as PyTorch stores it (`[out, in]`), so weight
/// files load without a transpose table.
pub(crate) fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_layout(LinearLayout::Col)
        .init(device)
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
