//! diffusers' `T2IAdapter` (TencentARC's T2I-Adapter): `FullAdapter`,
//! `FullAdapterXL` and `LightAdapter`, whose feature maps the U-Net adds inside its
//! down blocks.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use sd_core::CoreError;

use crate::config::{AdapterType, T2IAdapterConfig};
use crate::error::ConfigError;
use crate::resnet::{conv, conv_forward};

/// `AdapterResnetBlock` (3x3 then 1x1 conv) or `LightAdapterResnetBlock` (3x3 then
/// 3x3): `x + block2(relu(block1(x)))`.
#[derive(Module, Debug)]
pub struct AdapterResnetBlock {
    /// First conv (3x3).
    pub block1: Conv2d,
    /// Second conv (1x1 in the full adapters, 3x3 in the light one).
    pub block2: Conv2d,
}

impl AdapterResnetBlock {
    fn new(channels: usize, second_kernel: usize, device: &Device) -> Self {
        Self {
            block1: conv(channels, channels, 3, device),
            block2: conv(channels, channels, second_kernel, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = relu(conv_forward(&self.block1, x.clone()));
        conv_forward(&self.block2, h) + x
    }
}

/// `AdapterBlock` / `LightAdapterBlock`: an optional 2x2 average pool (ceil mode),
/// an optional 1x1 `in_conv`, the resnets, and (light) a 1x1 `out_conv`.
#[derive(Module, Debug)]
pub struct AdapterBlock {
    /// 1x1 conv to the block's width (full: only when the width changes).
    pub in_conv: Option<Conv2d>,
    /// The residual blocks.
    pub resnets: Vec<AdapterResnetBlock>,
    /// 1x1 conv from a quarter of the width back to it (light adapter only).
    pub out_conv: Option<Conv2d>,
    down: bool,
}

impl AdapterBlock {
    fn full(c_in: usize, c_out: usize, n: usize, down: bool, device: &Device) -> Self {
        Self {
            in_conv: (c_in != c_out).then(|| conv(c_in, c_out, 1, device)),
            resnets: (0..n)
                .map(|_| AdapterResnetBlock::new(c_out, 1, device))
                .collect(),
            out_conv: None,
            down,
        }
    }

    fn light(c_in: usize, c_out: usize, n: usize, down: bool, device: &Device) -> Self {
        let mid = c_out / 4;
        Self {
            in_conv: Some(conv(c_in, mid, 1, device)),
            resnets: (0..n)
                .map(|_| AdapterResnetBlock::new(mid, 3, device))
                .collect(),
            out_conv: Some(conv(mid, c_out, 1, device)),
            down,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = if self.down {
            avg_pool2d(x, AvgPoolOptions::new([2, 2]).with_ceil_mode(true))
        } else {
            x
        };
        if let Some(c) = &self.in_conv {
            h = conv_forward(c, h);
        }
        for r in &self.resnets {
            h = r.forward(h);
        }
        match &self.out_conv {
            Some(c) => conv_forward(c, h),
            None => h,
        }
    }
}

/// The adapter proper (diffusers' `T2IAdapter.adapter`).
#[derive(Module, Debug)]
pub struct AdapterBody {
    /// 3x3 conv after the pixel unshuffle (full adapters only).
    pub conv_in: Option<Conv2d>,
    /// The blocks, one feature map each.
    pub body: Vec<AdapterBlock>,
}

/// The T2I-Adapter. Field names are diffusers' module names (keys `adapter.*`).
#[derive(Module, Debug)]
pub struct T2IAdapter {
    /// The adapter.
    pub adapter: AdapterBody,
    in_channels: usize,
    downscale_factor: usize,
}

impl T2IAdapter {
    /// The dtype its weights are stored and computed in.
    pub fn dtype(&self) -> burn::tensor::DType {
        crate::norm::compute_dtype_conv(&self.adapter.body[0].resnets[0].block1)
    }

    /// Builds the adapter from a config (weights to be loaded).
    pub fn new(config: &T2IAdapterConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let ch = &config.channels;
        let n = config.num_res_blocks;
        let unshuffled = config.in_channels * config.downscale_factor.pow(2);
        let (conv_in, body) = match config.adapter_type {
            AdapterType::FullAdapter => {
                let mut body = vec![AdapterBlock::full(ch[0], ch[0], n, false, device)];
                body.extend(
                    (1..ch.len()).map(|i| AdapterBlock::full(ch[i - 1], ch[i], n, true, device)),
                );
                (Some(conv(unshuffled, ch[0], 3, device)), body)
            }
            AdapterType::FullAdapterXl => {
                let body = (0..ch.len())
                    .map(|i| match i {
                        1 => AdapterBlock::full(ch[0], ch[1], n, false, device),
                        2 => AdapterBlock::full(ch[1], ch[2], n, true, device),
                        _ => AdapterBlock::full(ch[i], ch[i], n, false, device),
                    })
                    .collect();
                (Some(conv(unshuffled, ch[0], 3, device)), body)
            }
            AdapterType::LightAdapter => {
                let mut body = vec![AdapterBlock::light(unshuffled, ch[0], n, false, device)];
                body.extend(
                    (0..ch.len() - 1)
                        .map(|i| AdapterBlock::light(ch[i], ch[i + 1], n, true, device)),
                );
                let last = ch[ch.len() - 1];
                body.push(AdapterBlock::light(last, last, n, true, device));
                (None, body)
            }
        };
        Ok(Self {
            adapter: AdapterBody { conv_in, body },
            in_channels: config.in_channels,
            downscale_factor: config.downscale_factor,
        })
    }

    /// The feature maps, without checks.
    ///
    /// # Shapes
    /// - `[b, in_channels, H, W]` to one `[b, c_i, h_i, w_i]` per block
    pub fn forward(&self, image: Tensor<4>) -> Vec<Tensor<4>> {
        let dtype = self.dtype();
        let mut h = pixel_unshuffle(
            crate::norm::to_dtype(image.clone(), dtype),
            self.downscale_factor,
        );
        if let Some(c) = &self.adapter.conv_in {
            h = conv_forward(c, h);
        }
        let mut features = Vec::with_capacity(self.adapter.body.len());
        for block in &self.adapter.body {
            h = block.forward(h);
            features.push(crate::norm::to_dtype(h.clone(), image.dtype()));
        }
        features
    }
}

/// PyTorch's `PixelUnshuffle(r)`: `[b, c, h*r, w*r]` to `[b, c*r*r, h, w]`, channel
/// `c*r*r + i*r + j` holding pixel `(y*r + i, x*r + j)`.
pub fn pixel_unshuffle(x: Tensor<4>, r: usize) -> Tensor<4> {
    if r == 1 {
        return x;
    }
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h / r, r, w / r, r])
        .permute([0, 1, 3, 5, 2, 4])
        .reshape([b, c * r * r, h / r, w / r])
}

impl sd_core::Adapter for T2IAdapter {
    fn features(&self, image: Tensor<4>) -> Result<Vec<Tensor<4>>, CoreError> {
        let [_, c, h, w] = image.dims();
        let f = self.downscale_factor;
        if c != self.in_channels || h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(CoreError::shape(
                "image",
                format!(
                    "{:?}: the adapter takes {} channels, sides multiples of {f}",
                    image.dims(),
                    self.in_channels
                ),
            ));
        }
        Ok(self.forward(image))
    }

    fn in_channels(&self) -> usize {
        self.in_channels
    }

    fn downscale_factor(&self) -> usize {
        self.downscale_factor
    }
}
