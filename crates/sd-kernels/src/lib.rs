//! The op layer under the `stable-diffusion` models.
//!
//! Every op is a function on burn tensors ([`ops`]) that decides itself where it
//! runs: on burn's CPU backend (`flex` feature) with f32 tensors, through
//! hand-written, multi-threaded kernels that fuse what the models do back to back
//! (flash attention on the projections' layout, GroupNorm + SiLU in one pass, the
//! GEGLU feed-forward in its GEMM's epilogue, Winograd 3x3 convolutions, residual
//! adds folded into products); on every other device (wgpu, CUDA, autodiff for
//! training) through burn's ops. The two paths agree to f32 rounding.
//!
//! ```
//! use burn::nn::LinearConfig;
//! use burn::prelude::*;
//! use sd_kernels::ops;
//!
//! let device = Device::default();
//! let proj = LinearConfig::new(8, 4).init(&device);
//! let x = Tensor::<3>::ones([1, 3, 8], &device);
//! let residual = Tensor::<3>::zeros([1, 3, 4], &device);
//! // `proj.forward(x) + residual`, the add folded into the product on the CPU.
//! let y = ops::linear_forward_residual(&proj, x.clone(), residual);
//! let reference = proj.forward(x);
//! let d = (y - reference).abs().max().into_scalar::<f32>();
//! assert!(d < 1e-5);
//! ```
//!
//! [`profile`] accounts the time spent in each CPU kernel (opt-in).
#![warn(missing_docs)]

#[cfg(feature = "flex")]
mod host;
pub mod ops;
pub mod profile;

/// The raw-slice CPU kernels, for the criterion benches: not a stable API.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::host::conv::{ConvShape, conv2d_im2col};
    pub use crate::host::linear::{Matrix, linear, linear_geglu};
    pub use crate::host::winograd::conv3x3;
}

/// The data of a weight matrix kept in 8 bits (`Tensor::from_data` makes it a
/// tensor): burn's quantized tensor of logical shape `[rows, cols]` holding `values` (row-major, one `i8` each) and an f32 scale per
/// block of `block` rows of one column (`scales`: `[rows / block, cols]`,
/// row-major), so that value `(r, c)` is `values[r * cols + c] * scales[(r / block)
/// * cols + c]`. The CPU kernels dequantise it as they read it; everywhere else
/// burn's ops take it (dequantising). This is how GGUF's Q8_0, Q5_0 and Q4_0 blocks
/// (32 values of a row with one scale) stay compressed in memory, as a linear
/// layer's `[d_in, d_out]` weight.
///
/// # Panics
/// When `values` or `scales` do not have the lengths the shape says, or `block`
/// does not divide `rows`.
pub fn quantized_weight_data(
    values: Vec<i8>,
    scales: &[f32],
    [rows, cols]: [usize; 2],
    block: u8,
) -> burn::tensor::TensorData {
    use burn::tensor::TensorData;
    use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
    assert!(
        block > 0 && rows % usize::from(block) == 0,
        "block {block} for {rows} rows"
    );
    assert_eq!(scales.len(), rows / usize::from(block) * cols, "scales");
    let scheme = QuantScheme::default()
        .with_value(QuantValue::Q8F)
        .with_store(QuantStore::Native)
        .per_block([block, 1], ScaleDtype::F32);
    TensorData::quantized(values, [rows, cols], scheme, scales, None)
}

/// Whether `device` is burn's CPU backend without autodiff, where the hand-written
/// kernels run (always `false` without the `flex` feature).
pub fn is_host(device: &burn::prelude::Device) -> bool {
    #[cfg(feature = "flex")]
    {
        host::is_host(device)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// Frees the CPU kernels' pooled scratch buffers (up to 256 MB: widened
/// half-precision weights, Winograd transforms) so that the memory serves the next
/// stage. The pipeline calls it between denoising and decoding: the U-Net's buffers
/// are of no use to the VAE, and a picture's memory peaks in its decoder. The next
/// kernel call allocates afresh. Nothing to do without the `flex` feature.
pub fn release_scratch() {
    #[cfg(feature = "flex")]
    host::release_scratch();
}
