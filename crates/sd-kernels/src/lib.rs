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
