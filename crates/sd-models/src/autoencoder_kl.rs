//! diffusers' `AutoencoderKL`: `Encoder`, `Decoder`, their blocks and the mid-block
//! self-attention.

use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::activation::silu;
use sd_core::DiagonalGaussian;

use crate::attention::{linear, linear_forward, multi_head_attention};
use crate::config::AutoencoderKLConfig;
use crate::error::ConfigError;
use crate::norm::{GroupNorm, to_dtype};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D, conv, conv_forward};
use crate::vae_tiling::{TilePlan, VaeTiling};

/// The VAE mid-block `Attention`: single-head self-attention over pixels with a
/// GroupNorm in front and a residual connection.
#[derive(Module, Debug)]
pub struct VaeAttention {
    /// Input norm.
    pub group_norm: GroupNorm,
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection (`to_out.0`).
    pub to_out: Linear,
}

impl VaeAttention {
    fn new(channels: usize, groups: usize, device: &Device) -> Self {
        Self {
            group_norm: GroupNorm::new(groups, channels, 1e-6, device),
            to_q: linear(channels, channels, true, device),
            to_k: linear(channels, channels, true, device),
            to_v: linear(channels, channels, true, device),
            to_out: linear(channels, channels, true, device),
        }
    }

    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let hs = self.group_norm.forward(x.clone().reshape([b, c, h * w]));
        let hs = hs.swap_dims(1, 2);
        let q = linear_forward(&self.to_q, hs.clone());
        let k = linear_forward(&self.to_k, hs.clone());
        let v = linear_forward(&self.to_v, hs);
        let out = linear_forward(&self.to_out, multi_head_attention(q, k, v, 1, false));
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` without time embedding: ResNet, then (attention, ResNet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D {
    /// Self-attentions (empty when `mid_block_add_attention` is false).
    pub attentions: Vec<VaeAttention>,
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2D {
    fn new(channels: usize, groups: usize, add_attention: bool, device: &Device) -> Self {
        let s = resnet_settings(groups);
        Self {
            attentions: if add_attention {
                vec![VaeAttention::new(channels, groups, device)]
            } else {
                Vec::new()
            },
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(channels, channels, s, device))
                .collect(),
        }
    }

    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.resnets[0].forward(x, None);
        for (i, resnet) in self.resnets.iter().enumerate().skip(1) {
            if let Some(attn) = self.attentions.get(i - 1) {
                h = attn.forward(h);
            }
            h = resnet.forward(h, None);
        }
        h
    }
}

fn resnet_settings(groups: usize) -> ResnetSettings {
    ResnetSettings {
        temb_channels: None,
        groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

/// `DownEncoderBlock2D`: ResNets, then an optional VAE-style downsampler.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Downsampler (empty in the last level).
    pub downsamplers: Vec<Downsample2D>,
}

/// `UpDecoderBlock2D`: ResNets, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Upsampler (empty in the last level).
    pub upsamplers: Vec<Upsample2D>,
}

/// The VAE encoder, images to moments.
#[derive(Module, Debug)]
pub struct Encoder {
    /// Input conv.
    pub conv_in: Conv2d,
    /// Levels, highest resolution first.
    pub down_blocks: Vec<DownEncoderBlock2D>,
    /// Mid block.
    pub mid_block: UNetMidBlock2D,
    /// Output norm.
    pub conv_norm_out: GroupNorm,
    /// Output conv to `2 * latent_channels`.
    pub conv_out: Conv2d,
}

impl Encoder {
    /// # Shapes
    /// - `[b, 3, H, W]` to `[b, 2 * latent, H / f, W / f]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = conv_forward(&self.conv_in, x);
        for block in &self.down_blocks {
            for r in &block.resnets {
                h = r.forward(h, None);
            }
            for d in &block.downsamplers {
                h = d.forward(h);
            }
        }
        let h = self.mid_block.forward(h);
        conv_forward(&self.conv_out, self.conv_norm_out.forward_silu(h))
    }
}

/// The VAE decoder, latents to images.
#[derive(Module, Debug)]
pub struct Decoder {
    /// Input conv.
    pub conv_in: Conv2d,
    /// Mid block.
    pub mid_block: UNetMidBlock2D,
    /// Levels, lowest resolution first.
    pub up_blocks: Vec<UpDecoderBlock2D>,
    /// Output norm.
    pub conv_norm_out: GroupNorm,
    /// Output conv to image channels.
    pub conv_out: Conv2d,
}

impl Decoder {
    /// # Shapes
    /// - `[b, latent, h, w]` to `[b, 3, h * f, w * f]`
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        self.forward_with_intermediates(z, |_, _| {})
    }

    /// [`Self::forward`], handing `conv_in`, `mid_block`, `up_blocks.i` and
    /// `conv_norm_out` outputs to `observe`.
    pub fn forward_with_intermediates(
        &self,
        z: Tensor<4>,
        mut observe: impl FnMut(&str, &Tensor<4>),
    ) -> Tensor<4> {
        let mut h = conv_forward(&self.conv_in, z);
        observe("conv_in", &h);
        h = self.mid_block.forward(h);
        observe("mid_block", &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            for r in &block.resnets {
                h = r.forward(h, None);
            }
            for u in &block.upsamplers {
                h = u.forward(h, None);
            }
            observe(&format!("up_blocks.{i}"), &h);
        }
        // Unfused: the fixtures record `conv_norm_out` before the activation (one
        // small norm at the end of the network).
        let h = self.conv_norm_out.forward(h);
        observe("conv_norm_out", &h);
        conv_forward(&self.conv_out, silu(h))
    }
}

/// `AutoencoderKL`: encoder, `quant_conv`, `post_quant_conv`, decoder.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    /// Encoder.
    pub encoder: Encoder,
    /// Decoder.
    pub decoder: Decoder,
    /// 1x1 conv on the moments (when `use_quant_conv`).
    pub quant_conv: Option<Conv2d>,
    /// 1x1 conv on the latents (when `use_post_quant_conv`).
    pub post_quant_conv: Option<Conv2d>,
    scaling_factor: f64,
    shift_factor: f64,
    latent_channels: usize,
    downscale_factor: usize,
    /// Tile size in pixels (`sample_size` of the config).
    tile_pixels: usize,
    #[module(skip)]
    tiling: VaeTiling,
}

impl AutoencoderKL {
    /// Builds the model from a config.
    pub fn new(config: &AutoencoderKLConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let g = config.norm_num_groups;
        let s = resnet_settings(g);
        let lat = config.latent_channels;

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let c_in = c_out;
            c_out = c;
            down_blocks.push(DownEncoderBlock2D {
                resnets: (0..config.layers_per_block)
                    .map(|j| {
                        ResnetBlock2D::new(if j == 0 { c_in } else { c_out }, c_out, s, device)
                    })
                    .collect(),
                downsamplers: if i + 1 < n {
                    vec![Downsample2D::new(c_out, None, device)]
                } else {
                    Vec::new()
                },
            });
        }
        let encoder = Encoder {
            conv_in: conv(config.in_channels, boc[0], 3, device),
            down_blocks,
            mid_block: UNetMidBlock2D::new(boc[n - 1], g, config.mid_block_add_attention, device),
            conv_norm_out: GroupNorm::new(g, boc[n - 1], 1e-6, device),
            conv_out: conv(boc[n - 1], 2 * lat, 3, device),
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = boc[n - 1];
        for i in 0..n {
            let prev = c_out;
            c_out = boc[n - 1 - i];
            up_blocks.push(UpDecoderBlock2D {
                resnets: (0..config.layers_per_block + 1)
                    .map(|j| {
                        ResnetBlock2D::new(if j == 0 { prev } else { c_out }, c_out, s, device)
                    })
                    .collect(),
                upsamplers: if i + 1 < n {
                    vec![Upsample2D::new(c_out, device)]
                } else {
                    Vec::new()
                },
            });
        }
        let decoder = Decoder {
            conv_in: conv(lat, boc[n - 1], 3, device),
            mid_block: UNetMidBlock2D::new(boc[n - 1], g, config.mid_block_add_attention, device),
            up_blocks,
            conv_norm_out: GroupNorm::new(g, boc[0], 1e-6, device),
            conv_out: conv(boc[0], config.out_channels, 3, device),
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv: config
                .use_quant_conv
                .then(|| conv(2 * lat, 2 * lat, 1, device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv(lat, lat, 1, device)),
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor.unwrap_or(0.0),
            latent_channels: lat,
            downscale_factor: config.downscale_factor(),
            tile_pixels: config.sample_size.unwrap_or(512),
            tiling: VaeTiling::default(),
        })
    }

    /// When decoding and encoding run in tiles (default: [`VaeTiling::default`],
    /// images above 1024x1024 pixels).
    pub fn with_tiling(mut self, tiling: VaeTiling) -> Self {
        self.tiling = tiling;
        self
    }

    /// The tiling in effect.
    pub fn tiling(&self) -> VaeTiling {
        self.tiling
    }

    /// Tile size in pixels: the config's `sample_size` (512 for SD 1.5, 768 for 2.1).
    pub fn tile_pixels(&self) -> usize {
        self.tile_pixels
    }

    fn tile_latents(&self) -> usize {
        (self.tile_pixels / self.downscale_factor).max(1)
    }

    /// The dtype its weights are stored and computed in.
    pub fn dtype(&self) -> burn::tensor::DType {
        crate::norm::compute_dtype_conv(&self.encoder.conv_in)
    }

    /// Encoder moments `quant_conv(encoder(x))`, tiled as [`Self::tiling`] says for
    /// the image size.
    ///
    /// # Shapes
    /// - `[b, 3, H, W]` to `[b, 2 * latent, H / f, W / f]`
    pub fn encode_moments(&self, image: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = image.dims();
        let image = to_dtype(image, self.dtype());
        if self.tiling.applies(h, w, self.tile_pixels) {
            let plan = TilePlan::new(self.tile_pixels, self.tile_latents());
            return plan.run(image, |tile| self.encode_moments_whole(tile));
        }
        self.encode_moments_whole(image)
    }

    fn encode_moments_whole(&self, image: Tensor<4>) -> Tensor<4> {
        let h = self.encoder.forward(image);
        match &self.quant_conv {
            Some(q) => conv_forward(q, h),
            None => h,
        }
    }

    /// Decodes unscaled latents, keeping `z`'s dtype; see [`Decoder::forward_with_intermediates`].
    pub fn decode_with_intermediates(
        &self,
        z: Tensor<4>,
        observe: impl FnMut(&str, &Tensor<4>),
    ) -> Tensor<4> {
        let in_dtype = z.dtype();
        let z = to_dtype(z, self.dtype());
        let z = match &self.post_quant_conv {
            Some(p) => conv_forward(p, z),
            None => z,
        };
        to_dtype(
            self.decoder.forward_with_intermediates(z, observe),
            in_dtype,
        )
    }
}

impl sd_core::Autoencoder for AutoencoderKL {
    fn encode(&self, image: Tensor<4>) -> Result<DiagonalGaussian, sd_core::CoreError> {
        sd_core::check_vae_image(self, image.dims())?;
        let in_dtype = image.dtype();
        let moments = to_dtype(self.encode_moments(image), in_dtype);
        Ok(DiagonalGaussian::from_moments(moments))
    }

    fn decode(&self, z: Tensor<4>) -> Result<Tensor<4>, sd_core::CoreError> {
        sd_core::check_vae_latents(self, z.dims())?;
        let [_, _, h, w] = z.dims();
        let f = self.downscale_factor;
        if self.tiling.applies(h * f, w * f, self.tile_pixels) {
            let in_dtype = z.dtype();
            let plan = TilePlan::new(self.tile_latents(), self.tile_pixels);
            let z = to_dtype(z, self.dtype());
            let out = plan.run(z, |tile| self.decode_with_intermediates(tile, |_, _| {}));
            return Ok(to_dtype(out, in_dtype));
        }
        Ok(self.decode_with_intermediates(z, |_, _| {}))
    }

    fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    fn shift_factor(&self) -> f64 {
        self.shift_factor
    }

    fn downscale_factor(&self) -> usize {
        self.downscale_factor
    }

    fn latent_channels(&self) -> usize {
        self.latent_channels
    }
}
