//! Normalisation layers with PyTorch parameter names (`weight`, `bias`).
//!
//! Statistics are always computed in f32, so f16 models never overflow to NaN.

use burn::module::Param;
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::DType;

pub use sd_kernels::ops::{to_dtype, to_f32};

/// `torch.nn.GroupNorm` with affine parameters.
#[derive(Module, Debug)]
pub struct GroupNorm {
    /// Scale `[channels]`.
    pub weight: Param<Tensor<1>>,
    /// Shift `[channels]`.
    pub bias: Param<Tensor<1>>,
    num_groups: usize,
    epsilon: f64,
}

impl GroupNorm {
    /// A GroupNorm over `channels` split into `num_groups` groups.
    pub fn new(num_groups: usize, channels: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            weight: Initializer::Ones.init([channels], device),
            bias: Initializer::Zeros.init([channels], device),
            num_groups,
            epsilon,
        }
    }

    /// Normalises each group of channels over channels and space.
    ///
    /// # Shapes
    /// - input and output: `[batch, channels, ...]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_act(x, false)
    }

    /// `silu(group_norm(x))`, the pair every ResNet block and output head runs; one
    /// fused pass on the CPU backend.
    ///
    /// # Shapes
    /// - input and output: `[batch, channels, ...]`
    pub fn forward_silu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_act(x, true)
    }

    fn forward_act<const D: usize>(&self, x: Tensor<D>, silu: bool) -> Tensor<D> {
        sd_kernels::ops::group_norm(
            x,
            self.weight.val(),
            self.bias.val(),
            self.num_groups,
            self.epsilon,
            silu,
        )
    }
}

/// `torch.nn.LayerNorm` over the last axis.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale `[d]`.
    pub weight: Param<Tensor<1>>,
    /// Shift `[d]`.
    pub bias: Param<Tensor<1>>,
    epsilon: f64,
}

impl LayerNorm {
    /// A LayerNorm over a last axis of width `d`.
    pub fn new(d: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            weight: Initializer::Ones.init([d], device),
            bias: Initializer::Zeros.init([d], device),
            epsilon,
        }
    }

    /// # Shapes
    /// - input and output: `[..., d]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        if dtype == DType::F32 {
            return burn::tensor::module::layer_norm(
                x,
                self.weight.val(),
                Some(self.bias.val()),
                self.epsilon,
            );
        }
        let y = burn::tensor::module::layer_norm(
            to_f32(x),
            to_f32(self.weight.val()),
            Some(to_f32(self.bias.val())),
            self.epsilon,
        );
        to_dtype(y, dtype)
    }
}

/// diffusers' `RMSNorm` / T5's `T5LayerNorm`: `x / sqrt(mean(x²) + eps) * weight`
/// over the last axis, statistics in f32; no mean, no shift.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale `[d]`.
    pub weight: Param<Tensor<1>>,
    epsilon: f64,
}

impl RmsNorm {
    /// An RMS norm over a last axis of width `d`.
    pub fn new(d: usize, epsilon: f64, device: &Device) -> Self {
        Self {
            weight: Initializer::Ones.init([d], device),
            epsilon,
        }
    }

    /// # Shapes
    /// - input and output: `[..., d]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        sd_kernels::ops::rms_norm(x, Some(self.weight.val()), self.epsilon)
    }
}

/// `torch.nn.LayerNorm(d, elementwise_affine=False)` over the last axis (the SD 3
/// transformer's norms, modulated afterwards), statistics in f32.
///
/// # Shapes
/// - input and output: `[..., d]`
pub fn layer_norm_plain<const D: usize>(x: Tensor<D>, epsilon: f64) -> Tensor<D> {
    let dtype = x.dtype();
    let x = to_f32(x);
    let centered = x.clone() - x.mean_dim(D - 1);
    let variance = centered.clone().powi_scalar(2).mean_dim(D - 1);
    to_dtype(centered * (variance + epsilon).sqrt().recip(), dtype)
}

/// The dtype a model whose first layer is `conv` computes in: its bias's (weight
/// matrices may be stored narrower than the model computes, as half-precision
/// weights on the CPU are), else its weight's.
pub(crate) fn compute_dtype_conv(conv: &burn::nn::conv::Conv2d) -> burn::tensor::DType {
    conv.bias
        .as_ref()
        .map(|b| b.val().dtype())
        .unwrap_or_else(|| conv.weight.val().dtype())
}

/// [`compute_dtype_conv`] for a linear layer.
pub(crate) fn compute_dtype_linear(linear: &burn::nn::Linear) -> burn::tensor::DType {
    linear
        .bias
        .as_ref()
        .map(|b| b.val().dtype())
        .unwrap_or_else(|| linear.weight.val().dtype())
}
