//! The text encoders' MLP activations.

use burn::prelude::*;
use burn::tensor::activation::sigmoid;

/// CLIP's `quick_gelu`: `x * sigmoid(1.702 x)`; one in-place pass on the CPU backend.
///
/// # Shapes
/// - any; output the same
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if crate::host::applies(&x) {
        return crate::host::map_in_place(x, crate::host::activation::quick_gelu);
    }
    x.clone() * sigmoid(x * 1.702)
}

/// The exact (erf) `gelu` of OpenCLIP; one in-place pass on the CPU backend.
///
/// # Shapes
/// - any; output the same
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    if crate::host::applies(&x) {
        return crate::host::map_in_place(x, crate::host::activation::gelu);
    }
    burn::tensor::activation::gelu(x)
}

/// The tanh approximation of `gelu` (`gelu_new` of T5, `gelu-approximate` /
/// `GELU(approximate="tanh")` of the SD 3 transformer's feed-forwards).
///
/// # Shapes
/// - any; output the same
pub fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    burn::tensor::activation::gelu_approximate(x)
}
