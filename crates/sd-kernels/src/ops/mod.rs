//! The ops the models call. Each runs the hand-written CPU kernel when its inputs
//! are f32 tensors on burn's CPU backend (with the `flex` feature) and burn's ops
//! otherwise.
//!
//! | op | what |
//! |---|---|
//! | [`linear_forward`], [`linear_forward_residual`], [`linear_forward_many`] | `x wᵀ + b` (+ residual), several weights over one input |
//! | [`geglu_forward`] | `a * gelu(gate)` of the GEGLU projection |
//! | [`conv_forward`], [`conv_forward_add`] | 2-D convolution (+ per-image bias + residual) |
//! | [`upsample_conv_forward`] | nearest upsampling then a 3x3 conv, in bands of rows when large |
//! | [`group_norm`] | GroupNorm (+ SiLU), statistics in f32 |
//! | [`multi_head_attention`], [`scaled_dot_product_attention`] | softmax attention, computed in f32 |
//! | [`biased_attention`] | softmax attention with an additive bias (T5) |
//! | [`rms_norm`] | RMS normalisation, statistics in f32 (T5, SD 3 q/k norms) |
//! | [`quick_gelu`], [`gelu`], [`gelu_tanh`] | CLIP / OpenCLIP / T5 and SD 3 activations |

pub mod activation;
pub mod attention;
pub mod conv;
pub mod dtype;
pub mod linear;
pub mod norm;

pub use activation::{gelu, gelu_tanh, quick_gelu};
pub use attention::{
    biased_attention, merge_heads, multi_head_attention, scaled_dot_product_attention, split_heads,
};
pub use conv::{conv_forward, conv_forward_add, upsample_conv_forward};
pub use dtype::{dequantized, to_dtype, to_f32};
pub use linear::{geglu_forward, linear_forward, linear_forward_many, linear_forward_residual};
pub use norm::{group_norm, rms_norm};
