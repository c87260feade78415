//! diffusers' `Transformer2DModel` (continuous input) and `BasicTransformerBlock`.

use burn::nn::Linear;
use burn::prelude::*;
use sd_kernels::ops::geglu_forward;

use crate::attention::{Attention, linear, linear_forward, linear_forward_residual};
use crate::norm::{GroupNorm, LayerNorm};

/// `GEGLU`: `a * gelu(b)` where `[a, b] = proj(x)`.
#[derive(Module, Debug)]
pub struct GeGlu {
    /// Projection to twice the inner width.
    pub proj: Linear,
}

/// `FeedForward` with GEGLU: keys `ff.net.0.proj` and `ff.net.2` (field names
/// `net_0`/`net_2`, mapped by [`crate::diffusers_key`]).
#[derive(Module, Debug)]
pub struct FeedForward {
    /// GEGLU input projection (`net.0`).
    pub net_0: GeGlu,
    /// Output projection (`net.2`; `net.1` is dropout).
    pub net_2: Linear,
}

impl FeedForward {
    fn new(dim: usize, device: &Device) -> Self {
        let inner = dim * 4;
        Self {
            net_0: GeGlu {
                proj: linear(dim, inner * 2, true, device),
            },
            net_2: linear(inner, dim, true, device),
        }
    }

    /// # Shapes
    /// - `[b, n, dim]` to `[b, n, dim]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear_forward(&self.net_2, self.hidden(x))
    }

    /// `forward(x) + residual`, the add folded into the output projection on the CPU
    /// backend.
    ///
    /// # Shapes
    /// - `x`, `residual` and output: `[b, n, dim]`
    pub fn forward_residual(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        linear_forward_residual(&self.net_2, self.hidden(x), residual)
    }

    /// `a * gelu(gate)` for `[a, gate] = net_0.proj(x)`: `[b, n, dim]` to
    /// `[b, n, inner]`.
    fn hidden(&self, x: Tensor<3>) -> Tensor<3> {
        geglu_forward(&self.net_0.proj, x)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, each
/// pre-normed with LayerNorm and residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    /// Norm before self-attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attn1: Attention,
    /// Norm before cross-attention.
    pub norm2: LayerNorm,
    /// Cross-attention on the text conditioning.
    pub attn2: Attention,
    /// Norm before the feed-forward.
    pub norm3: LayerNorm,
    /// Feed-forward.
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    /// A block `dim` wide with `heads` heads, attending to `context_dim` wide conditioning.
    pub fn new(dim: usize, context_dim: usize, heads: usize, device: &Device) -> Self {
        let head_dim = dim / heads;
        Self {
            norm1: LayerNorm::new(dim, 1e-5, device),
            attn1: Attention::new(dim, dim, heads, head_dim, false, device),
            norm2: LayerNorm::new(dim, 1e-5, device),
            attn2: Attention::new(dim, context_dim, heads, head_dim, false, device),
            norm3: LayerNorm::new(dim, 1e-5, device),
            ff: FeedForward::new(dim, device),
        }
    }

    /// # Shapes
    /// - `x`: `[b, n, dim]`, `context`: `[b, m, context_dim]`; output `[b, n, dim]`
    pub fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let x = self
            .attn1
            .forward_residual(self.norm1.forward(x.clone()), None, x);
        let x = self
            .attn2
            .forward_residual(self.norm2.forward(x.clone()), Some(context), x);
        self.ff.forward_residual(self.norm3.forward(x.clone()), x)
    }
}

/// `Transformer2DModel` over a feature map: GroupNorm (eps 1e-6), projection in,
/// transformer blocks, projection out, residual.
///
/// The projections are stored as linear layers; SD 1.x's 1x1-conv projections
/// (`use_linear_projection = false`, weights `[c, c, 1, 1]`) are the same map and load
/// into them (the loader drops the trailing unit axes).
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    /// Input GroupNorm.
    pub norm: GroupNorm,
    /// Projection in.
    pub proj_in: Linear,
    /// The transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// Projection out.
    pub proj_out: Linear,
}

impl Transformer2DModel {
    /// `channels` wide, `heads` heads, `layers` blocks, attending to `context_dim` wide
    /// conditioning; `groups` GroupNorm groups.
    pub fn new(
        channels: usize,
        heads: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        device: &Device,
    ) -> Self {
        Self {
            norm: GroupNorm::new(groups, channels, 1e-6, device),
            proj_in: linear(channels, channels, true, device),
            transformer_blocks: (0..layers)
                .map(|_| BasicTransformerBlock::new(channels, context_dim, heads, device))
                .collect(),
            proj_out: linear(channels, channels, true, device),
        }
    }

    /// # Shapes
    /// - `x`: `[b, c, h, w]`, `context`: `[b, m, context_dim]`; output `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>, context: Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let hs = self.norm.forward(x).reshape([b, c, h * w]).swap_dims(1, 2);
        let mut hs = linear_forward(&self.proj_in, hs);
        for block in &self.transformer_blocks {
            hs = block.forward(hs, context.clone());
        }
        let hs = linear_forward(&self.proj_out, hs);
        hs.swap_dims(1, 2).reshape([b, c, h, w]) + residual
    }
}
