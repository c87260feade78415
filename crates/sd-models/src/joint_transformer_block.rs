//! diffusers' `JointTransformerBlock` (MMDiT) with `JointAttnProcessor2_0`: image and
//! text tokens, each with their own projections, norms and feed-forwards, attend
//! jointly; MMDiT-X blocks (SD 3.5 Medium) add an image-only attention.

use burn::nn::Linear;
use burn::prelude::*;
use sd_kernels::ops::{gelu_tanh, linear_forward, linear_forward_many, multi_head_attention};

use crate::ada_norm::{AdaLayerNormContinuous, AdaLayerNormZero, gate, modulate};
use crate::attention::linear;
use crate::norm::RmsNorm;

/// diffusers' `Attention` as the SD 3 blocks build it: biased projections, optional
/// per-head RMS norms of queries and keys, and (joint attention) the text tokens'
/// `add_*_proj` projections, norms and output.
#[derive(Module, Debug)]
pub struct JointAttention {
    /// Image queries.
    pub to_q: Linear,
    /// Image keys.
    pub to_k: Linear,
    /// Image values.
    pub to_v: Linear,
    /// Image output (`to_out.0`).
    pub to_out: Linear,
    /// Per-head RMS norm of the image queries (`qk_norm: rms_norm`).
    pub norm_q: Option<RmsNorm>,
    /// Per-head RMS norm of the image keys.
    pub norm_k: Option<RmsNorm>,
    /// Text queries.
    pub add_q_proj: Option<Linear>,
    /// Text keys.
    pub add_k_proj: Option<Linear>,
    /// Text values.
    pub add_v_proj: Option<Linear>,
    /// Text output (absent in the last block, whose text tokens end there).
    pub to_add_out: Option<Linear>,
    /// Per-head RMS norm of the text queries.
    pub norm_added_q: Option<RmsNorm>,
    /// Per-head RMS norm of the text keys.
    pub norm_added_k: Option<RmsNorm>,
    heads: usize,
}

impl JointAttention {
    /// `joint`: with the text projections; `text_out`: with `to_add_out`.
    fn new(
        d: usize,
        heads: usize,
        qk_norm: bool,
        joint: bool,
        text_out: bool,
        device: &Device,
    ) -> Self {
        let head_dim = d / heads;
        let norm = |on: bool| on.then(|| RmsNorm::new(head_dim, 1e-6, device));
        let proj = |on: bool| on.then(|| linear(d, d, true, device));
        Self {
            to_q: linear(d, d, true, device),
            to_k: linear(d, d, true, device),
            to_v: linear(d, d, true, device),
            to_out: linear(d, d, true, device),
            norm_q: norm(qk_norm),
            norm_k: norm(qk_norm),
            add_q_proj: proj(joint),
            add_k_proj: proj(joint),
            add_v_proj: proj(joint),
            to_add_out: proj(joint && text_out),
            norm_added_q: norm(joint && qk_norm),
            norm_added_k: norm(joint && qk_norm),
            heads,
        }
    }

    /// `[b, n, heads * d]` through a per-head norm.
    fn head_norm(&self, x: Tensor<3>, norm: &Option<RmsNorm>) -> Tensor<3> {
        match norm {
            Some(n) => {
                let [b, len, c] = x.dims();
                n.forward(x.reshape([b, len, self.heads, c / self.heads]))
                    .reshape([b, len, c])
            }
            None => x,
        }
    }

    /// Image tokens `x` `[b, n, d]` alone, or jointly with text tokens `context`
    /// `[b, m, d]`: the image output and (joint) the text output, which is `None`
    /// where the block has no `to_add_out`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<Tensor<3>>,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let [q, k, v] = linear_forward_many([&self.to_q, &self.to_k, &self.to_v], x);
        let (q, k) = (
            self.head_norm(q, &self.norm_q),
            self.head_norm(k, &self.norm_k),
        );
        let n = q.dims()[1];
        let (q, k, v) = match (
            context,
            &self.add_q_proj,
            &self.add_k_proj,
            &self.add_v_proj,
        ) {
            (Some(c), Some(aq), Some(ak), Some(av)) => {
                let [cq, ck, cv] = linear_forward_many([aq, ak, av], c);
                let cq = self.head_norm(cq, &self.norm_added_q);
                let ck = self.head_norm(ck, &self.norm_added_k);
                (
                    Tensor::cat(vec![q, cq], 1),
                    Tensor::cat(vec![k, ck], 1),
                    Tensor::cat(vec![v, cv], 1),
                )
            }
            _ => (q, k, v),
        };
        let out = multi_head_attention(q, k, v, self.heads, false);
        let [b, total, d] = out.dims();
        let image = linear_forward(&self.to_out, out.clone().slice([0..b, 0..n, 0..d]));
        let text = (total > n)
            .then_some(self.to_add_out.as_ref())
            .flatten()
            .map(|o| linear_forward(o, out.slice([0..b, n..total, 0..d])));
        (image, text)
    }
}

/// The projection with its activation (`net.0`: `GELU(approximate="tanh")`).
#[derive(Module, Debug)]
pub struct GeluProjection {
    /// `[d] -> [4 d]`.
    pub proj: Linear,
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: keys `net.0.proj`,
/// `net.2`.
#[derive(Module, Debug)]
pub struct GeluFeedForward {
    /// Up projection and activation.
    pub net_0: GeluProjection,
    /// Down projection.
    pub net_2: Linear,
}

impl GeluFeedForward {
    fn new(d: usize, device: &Device) -> Self {
        Self {
            net_0: GeluProjection {
                proj: linear(d, 4 * d, true, device),
            },
            net_2: linear(4 * d, d, true, device),
        }
    }

    /// # Shapes
    /// - `[b, n, d]` to `[b, n, d]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear_forward(&self.net_2, gelu_tanh(linear_forward(&self.net_0.proj, x)))
    }
}

/// The text tokens' norm: AdaLayerNormZero, or in the last block (whose text
/// tokens are not used further: `context_pre_only`) AdaLayerNormContinuous.
#[derive(Module, Debug)]
pub enum ContextNorm {
    /// Every block but the last.
    Zero(AdaLayerNormZero),
    /// The last block.
    Continuous(AdaLayerNormContinuous),
}

/// `JointTransformerBlock`.
#[derive(Module, Debug)]
pub struct JointTransformerBlock {
    /// Image tokens' norm (9 chunks with dual attention).
    pub norm1: AdaLayerNormZero,
    /// Text tokens' norm.
    pub norm1_context: ContextNorm,
    /// Joint attention.
    pub attn: JointAttention,
    /// MMDiT-X's image-only attention.
    pub attn2: Option<JointAttention>,
    /// Image feed-forward.
    pub ff: GeluFeedForward,
    /// Text feed-forward (absent in the last block).
    pub ff_context: Option<GeluFeedForward>,
}

impl JointTransformerBlock {
    /// A block of width `d`; `context_pre_only` for the last block, `dual` for
    /// MMDiT-X, `qk_norm` for RMS-normed queries and keys.
    pub fn new(
        d: usize,
        heads: usize,
        context_pre_only: bool,
        qk_norm: bool,
        dual: bool,
        device: &Device,
    ) -> Self {
        Self {
            norm1: AdaLayerNormZero::new(d, dual, device),
            norm1_context: if context_pre_only {
                ContextNorm::Continuous(AdaLayerNormContinuous::new(d, d, device))
            } else {
                ContextNorm::Zero(AdaLayerNormZero::new(d, false, device))
            },
            attn: JointAttention::new(d, heads, qk_norm, true, !context_pre_only, device),
            attn2: dual.then(|| JointAttention::new(d, heads, qk_norm, false, false, device)),
            ff: GeluFeedForward::new(d, device),
            ff_context: (!context_pre_only).then(|| GeluFeedForward::new(d, device)),
        }
    }

    /// Whether the text tokens end in this block (the last one).
    pub fn context_pre_only(&self) -> bool {
        self.ff_context.is_none()
    }

    /// Image tokens `x` `[b, n, d]`, text tokens `context` `[b, m, d]` and the
    /// conditioning `temb` `[b, d]` to the new image tokens and (but in the last
    /// block) text tokens.
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Tensor<3>,
        temb: Tensor<2>,
    ) -> (Tensor<3>, Option<Tensor<3>>) {
        let n = self.norm1.forward(x.clone(), temb.clone());
        let (c_normed, c_mod) = match &self.norm1_context {
            ContextNorm::Zero(norm) => {
                let o = norm.forward(context.clone(), temb);
                (o.x.clone(), Some(o))
            }
            ContextNorm::Continuous(norm) => (norm.forward(context.clone(), temb), None),
        };
        let (attn, c_attn) = self.attn.forward(n.x, Some(c_normed));
        let mut x = x + gate(attn, &n.gate_msa);
        if let (Some(attn2), Some((x2, gate2))) = (&self.attn2, n.x2) {
            x = x + gate(attn2.forward(x2, None).0, &gate2);
        }
        let ff = self
            .ff
            .forward(modulate(x.clone(), n.shift_mlp, n.scale_mlp));
        let x = x + gate(ff, &n.gate_mlp);
        let context = match (c_mod, c_attn, &self.ff_context) {
            (Some(m), Some(c_attn), Some(ff_context)) => {
                let c = context + gate(c_attn, &m.gate_msa);
                let h = ff_context.forward(modulate(c.clone(), m.shift_mlp, m.scale_mlp));
                Some(c + gate(h, &m.gate_mlp))
            }
            _ => None,
        };
        (x, context)
    }
}
