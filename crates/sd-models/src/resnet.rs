//! diffusers' `ResnetBlock2D`, `Downsample2D` and `Upsample2D`.

use burn::nn::Linear;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;

use crate::attention::linear;
use crate::norm::GroupNorm;

pub use sd_kernels::ops::{conv_forward, conv_forward_add, upsample_conv_forward};

/// A `k x k` convolution with symmetric "same" padding.
pub(crate) fn conv(c_in: usize, c_out: usize, k: usize, device: &Device) -> Conv2d {
    conv_strided(c_in, c_out, k, 1, true, device)
}

/// A `k x k` convolution with padding `k / 2` on every side, stride `stride`, with or
/// without a bias.
pub(crate) fn conv_strided(
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    bias: bool,
    device: &Device,
) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([c_in, c_out], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_bias(bias)
        .init(device)
}

/// `ResnetBlock2D` with `time_embedding_norm = "default"`: GroupNorm, SiLU, conv,
/// plus the projected time embedding, GroupNorm, SiLU, conv, and a 1x1 shortcut when
/// the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    /// First norm.
    pub norm1: GroupNorm,
    /// First 3x3 conv.
    pub conv1: Conv2d,
    /// Time-embedding projection (absent in the VAE).
    pub time_emb_proj: Option<Linear>,
    /// Second norm.
    pub norm2: GroupNorm,
    /// Second 3x3 conv.
    pub conv2: Conv2d,
    /// 1x1 shortcut when `in != out`.
    pub conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// Width of the time embedding, `None` for the VAE.
    pub temb_channels: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// Divisor of the output.
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// A block from `c_in` to `c_out` channels.
    pub fn new(c_in: usize, c_out: usize, s: ResnetSettings, device: &Device) -> Self {
        Self {
            norm1: GroupNorm::new(s.groups, c_in, s.eps, device),
            conv1: conv(c_in, c_out, 3, device),
            time_emb_proj: s.temb_channels.map(|t| linear(t, c_out, true, device)),
            norm2: GroupNorm::new(s.groups, c_out, s.eps, device),
            conv2: conv(c_out, c_out, 3, device),
            conv_shortcut: (c_in != c_out).then(|| conv(c_in, c_out, 1, device)),
            output_scale_factor: s.output_scale_factor,
        }
    }

    /// # Shapes
    /// - `x`: `[b, c_in, h, w]`, `temb`: `[b, temb_channels]` (ignored by the VAE)
    /// - output: `[b, c_out, h, w]`
    pub fn forward(&self, x: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        // The time embedding is a bias per image and channel of conv1's output.
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(sd_kernels::ops::linear_forward(proj, silu(temb))),
            _ => None,
        };
        // With a shortcut conv, it runs first so that `x` is then used once, and the
        // norm can write over it (one activation fewer alive at the VAE's 512x512
        // blocks: 134 MB at 128 channels).
        let (h, shortcut) = match &self.conv_shortcut {
            Some(c) => {
                let shortcut = conv_forward(c, x.clone());
                (self.norm1.forward_silu(x), shortcut)
            }
            None => (self.norm1.forward_silu(x.clone()), x),
        };
        let h = conv_forward_add(&self.conv1, h, t, None);
        let h = self.norm2.forward_silu(h);
        if self.output_scale_factor == 1.0 {
            // The shortcut added as conv2's output is written.
            conv_forward_add(&self.conv2, h, None, Some(shortcut))
        } else {
            (shortcut + conv_forward(&self.conv2, h)) / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a conv: stride-2 3x3 conv. `padding = 1` in the U-Net; the VAE
/// uses `padding = 0` after padding right and bottom by one.
#[derive(Module, Debug)]
pub struct Downsample2D {
    /// The strided conv.
    pub conv: Conv2d,
}

impl Downsample2D {
    /// U-Net style (symmetric `padding`) or VAE style (`None`: pad right/bottom by 1).
    pub fn new(channels: usize, padding: Option<usize>, device: &Device) -> Self {
        let pad = match padding {
            Some(p) => PaddingConfig2d::Explicit(p, p, p, p),
            None => PaddingConfig2d::Explicit(0, 0, 1, 1),
        };
        Self {
            conv: Conv2dConfig::new([channels, channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(pad)
                .init(device),
        }
    }

    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, ceil(h / 2), ceil(w / 2)]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv_forward(&self.conv, x)
    }
}

/// `Upsample2D`: nearest-neighbour upsampling, then a 3x3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D {
    /// The conv after upsampling.
    pub conv: Conv2d,
}

impl Upsample2D {
    /// An upsampler keeping `channels`.
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            conv: conv(channels, channels, 3, device),
        }
    }

    /// Upsamples to `size` (the skip connection's size) or by 2.
    ///
    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, size.0, size.1]` (default `2h, 2w`)
    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        upsample_conv_forward(&self.conv, x, size)
    }
}
