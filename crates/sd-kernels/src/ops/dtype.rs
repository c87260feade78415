//! Float dtype casts that cost nothing when the dtype already matches.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// `x` in f32 (no cast when it already is).
pub fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

/// `x` in `dtype` (no cast when it already is).
pub fn to_dtype<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(FloatDType::from(dtype))
    }
}
