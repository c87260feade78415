//! Float dtype casts that cost nothing when the dtype already matches.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// `x` in f32 (no cast when it already is; a quantized tensor dequantised).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    to_dtype(x, DType::F32)
}

/// `x` dequantised when it is a quantized tensor (such as a weight kept in 8 bits),
/// else `x` as it is.
pub fn dequantized<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if matches!(x.dtype(), DType::QFloat(_)) {
        x.dequantize()
    } else {
        x
    }
}

/// `x` in `dtype` (no cast when it already is; a quantized tensor, such as a weight
/// kept in 8 bits, dequantised first).
pub fn to_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    let x = dequantized(x);
    if x.dtype() == dtype {
        x
    } else {
        x.cast(FloatDType::from(dtype))
    }
}
