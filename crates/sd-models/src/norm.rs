//! Normalisation layers with PyTorch parameter names (`weight`, `bias`).
//!
//! Statistics are always computed in f32, so f16 models never overflow to NaN.

use burn::module::Param;
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

pub(crate) fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

pub(crate) fn to_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(FloatDType::from(dtype))
    }
}

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
        #[cfg(feature = "flex")]
        if crate::host::applies(&x) && self.weight.val().dtype() == DType::F32 {
            let dims = x.dims();
            let device = x.device();
            let weight = crate::host::into_vec(self.weight.val());
            let bias = crate::host::into_vec(self.bias.val());
            let params = crate::host::group_norm::GroupNormParams {
                batch: dims[0],
                channels: dims[1],
                groups: self.num_groups,
                weight: &weight,
                bias: &bias,
                epsilon: self.epsilon,
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
            let mut values = crate::host::into_vec(x);
            crate::host::group_norm::group_norm(&mut values, &params);
            return crate::host::from_vec(values, dims, &device);
        }
        let y = self.forward_generic(x);
        if silu {
            burn::tensor::activation::silu(y)
        } else {
            y
        }
    }

    fn forward_generic<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let dims = x.dims();
        let (b, c) = (dims[0], dims[1]);
        let n: usize = dims.iter().product::<usize>() / (b * self.num_groups);
        let xr = to_f32(x).reshape([b, self.num_groups, n]);
        let (var, mean) = xr.clone().var_mean_bias(2);
        let y = (xr - mean) * (var + self.epsilon).sqrt().recip();
        let y = to_dtype(y.reshape(dims), dtype);
        let mut shape = [1usize; D];
        shape[1] = c;
        y * self.weight.val().reshape(shape) + self.bias.val().reshape(shape)
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
