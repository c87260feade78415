//! diffusers' `AutoencoderTiny` (TAESD, TAESDXL): `EncoderTiny`, `DecoderTiny` and
//! `AutoencoderTinyBlock`, a distilled autoencoder for SD latents that decodes a
//! 512x512 picture in a fraction of the KL VAE's time (previews, fast decoding).

use burn::nn::Relu;
use burn::nn::conv::Conv2d;
use burn::nn::interpolate::{Interpolate2d, Interpolate2dConfig, InterpolateMode};
use burn::prelude::*;
use burn::tensor::activation::relu;
use sd_core::DiagonalGaussian;

use crate::config::AutoencoderTinyConfig;
use crate::error::ConfigError;
use crate::norm::to_dtype;
use crate::resnet::{conv_forward, conv_forward_add, conv_strided};

/// A 3x3 convolution with padding 1, stride `stride`, with or without a bias.
fn conv3(c_in: usize, c_out: usize, stride: usize, bias: bool, device: &Device) -> Conv2d {
    conv_strided(c_in, c_out, 3, stride, bias, device)
}

/// One entry of diffusers' `nn.Sequential`s in `AutoencoderTiny`. burn names the
/// variant in module paths (`layers.2.Block.conv.0.weight`);
/// [`crate::diffusers_key`] drops it (`layers.2.conv.0.weight`), so the indices are
/// diffusers' own, activations and upsamplers included.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant, reason = "a few per model")]
pub enum TinyLayer {
    /// `nn.Conv2d`.
    Conv(Conv2d),
    /// `AutoencoderTinyBlock`.
    Block(AutoencoderTinyBlock),
    /// `nn.ReLU`.
    Relu(Relu),
    /// `nn.Upsample(scale_factor = 2, mode = "nearest")`.
    Upsample(Interpolate2d),
}

impl TinyLayer {
    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c', h', w']` as the layer says
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Conv(c) => conv_forward(c, x),
            Self::Block(b) => b.forward(x),
            Self::Relu(_) => relu(x),
            Self::Upsample(u) => u.forward(x),
        }
    }
}

/// `AutoencoderTinyBlock`: `relu(conv(x) + x)` with `conv` = conv3x3, ReLU, conv3x3,
/// ReLU, conv3x3 (equal widths, so the skip is the identity).
#[derive(Module, Debug)]
pub struct AutoencoderTinyBlock {
    /// The `nn.Sequential` `conv` (indices 0, 2, 4 are the convolutions).
    pub conv: Vec<TinyLayer>,
}

impl AutoencoderTinyBlock {
    fn new(channels: usize, device: &Device) -> Self {
        let c = || TinyLayer::Conv(conv3(channels, channels, 1, true, device));
        Self {
            conv: vec![c(), TinyLayer::Relu(Relu), c(), TinyLayer::Relu(Relu), c()],
        }
    }

    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let (last, body) = self.conv.split_last().expect("five layers");
        let h = body.iter().fold(x.clone(), |h, l| l.forward(h));
        let y = match last {
            TinyLayer::Conv(c) => conv_forward_add(c, h, None, Some(x)),
            other => other.forward(h) + x,
        };
        relu(y)
    }
}

fn run(
    layers: &[TinyLayer],
    x: Tensor<4>,
    mut observe: impl FnMut(usize, &Tensor<4>),
) -> Tensor<4> {
    layers.iter().enumerate().fold(x, |x, (i, l)| {
        let y = l.forward(x);
        observe(i, &y);
        y
    })
}

/// `EncoderTiny`: `(x + 1) / 2`, then the first conv, per level a bias-free stride-2
/// conv (from the second level on) and its blocks, and the conv to latents.
#[derive(Module, Debug)]
pub struct EncoderTiny {
    /// The `nn.Sequential` `layers`.
    pub layers: Vec<TinyLayer>,
}

impl EncoderTiny {
    fn new(c: &AutoencoderTinyConfig, device: &Device) -> Self {
        let w = c.encoder_block_out_channels[0];
        let mut layers = Vec::new();
        for (i, &n) in c.num_encoder_blocks.iter().enumerate() {
            layers.push(TinyLayer::Conv(if i == 0 {
                conv3(c.in_channels, w, 1, true, device)
            } else {
                conv3(w, w, 2, false, device)
            }));
            layers.extend((0..n).map(|_| TinyLayer::Block(AutoencoderTinyBlock::new(w, device))));
        }
        layers.push(TinyLayer::Conv(conv3(
            w,
            c.latent_channels,
            1,
            true,
            device,
        )));
        Self { layers }
    }

    /// Images in `[-1, 1]` to latents; `observe(i, output of layer i)`.
    ///
    /// # Shapes
    /// - `[b, 3, H, W]` to `[b, latent_channels, H / f, W / f]`
    pub fn forward_with_intermediates(
        &self,
        x: Tensor<4>,
        observe: impl FnMut(usize, &Tensor<4>),
    ) -> Tensor<4> {
        run(&self.layers, (x + 1.0) / 2.0, observe)
    }
}

/// `DecoderTiny`: `tanh(x / 3) * 3`, conv + ReLU, per level its blocks, a nearest x2
/// upsampling and a bias-free conv (the last level: no upsampling, a biased conv to
/// RGB), then `x * 2 - 1`.
#[derive(Module, Debug)]
pub struct DecoderTiny {
    /// The `nn.Sequential` `layers`.
    pub layers: Vec<TinyLayer>,
}

impl DecoderTiny {
    fn new(c: &AutoencoderTinyConfig, device: &Device) -> Self {
        let w = c.decoder_block_out_channels[0];
        let mut layers = vec![
            TinyLayer::Conv(conv3(c.latent_channels, w, 1, true, device)),
            TinyLayer::Relu(Relu),
        ];
        let levels = c.num_decoder_blocks.len();
        for (i, &n) in c.num_decoder_blocks.iter().enumerate() {
            let last = i + 1 == levels;
            layers.extend((0..n).map(|_| TinyLayer::Block(AutoencoderTinyBlock::new(w, device))));
            if !last {
                let up = Interpolate2dConfig::new()
                    .with_scale_factor(Some([2.0, 2.0]))
                    .with_mode(InterpolateMode::Nearest)
                    .init();
                layers.push(TinyLayer::Upsample(up));
            }
            let out = if last { c.out_channels } else { w };
            layers.push(TinyLayer::Conv(conv3(w, out, 1, last, device)));
        }
        Self { layers }
    }

    /// Latents (as the diffusion model makes them) to images roughly in `[-1, 1]`,
    /// unclamped; `observe(i, output of layer i)`.
    ///
    /// # Shapes
    /// - `[b, latent_channels, h, w]` to `[b, 3, h * f, w * f]`
    pub fn forward_with_intermediates(
        &self,
        z: Tensor<4>,
        observe: impl FnMut(usize, &Tensor<4>),
    ) -> Tensor<4> {
        let z = (z / 3.0).tanh() * 3.0;
        run(&self.layers, z, observe) * 2.0 - 1.0
    }
}

/// diffusers' `AutoencoderTiny`. Deterministic: [`sd_core::Autoencoder::encode`]
/// returns a point mass ([`DiagonalGaussian::point`]) and draws no noise. Its
/// `scaling_factor` is 1: it encodes to and decodes from the diffusion latents
/// directly.
#[derive(Module, Debug)]
pub struct AutoencoderTiny {
    /// Image to latents.
    pub encoder: EncoderTiny,
    /// Latents to image.
    pub decoder: DecoderTiny,
    scaling_factor: f64,
    shift_factor: f64,
    latent_magnitude: f64,
    latent_shift: f64,
    downscale_factor: usize,
    latent_channels: usize,
}

impl AutoencoderTiny {
    /// Builds the model from a validated config (parameters uninitialised until
    /// loaded).
    ///
    /// # Errors
    /// [`ConfigError`] for values this implementation cannot honour.
    pub fn new(config: &AutoencoderTinyConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            encoder: EncoderTiny::new(config, device),
            decoder: DecoderTiny::new(config, device),
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor,
            latent_magnitude: config.latent_magnitude,
            latent_shift: config.latent_shift,
            downscale_factor: config.downscale_factor(),
            latent_channels: config.latent_channels,
        })
    }

    /// The dtype its weights are stored and computed in.
    pub fn dtype(&self) -> burn::tensor::DType {
        match self.decoder.layers.first() {
            Some(TinyLayer::Conv(c)) => crate::norm::compute_dtype_conv(c),
            _ => burn::tensor::DType::F32,
        }
    }

    /// Encodes images in `[-1, 1]`, keeping the input's dtype; `observe(i, output of
    /// encoder layer i)`.
    ///
    /// # Shapes
    /// - `[b, 3, H, W]` to `[b, latent_channels, H / f, W / f]`
    pub fn encode_with_intermediates(
        &self,
        image: Tensor<4>,
        observe: impl FnMut(usize, &Tensor<4>),
    ) -> Tensor<4> {
        let in_dtype = image.dtype();
        let x = to_dtype(image, self.dtype());
        to_dtype(
            self.encoder.forward_with_intermediates(x, observe),
            in_dtype,
        )
    }

    /// Decodes latents, keeping their dtype; `observe(i, output of decoder layer i)`.
    ///
    /// # Shapes
    /// - `[b, latent_channels, h, w]` to `[b, 3, h * f, w * f]`
    pub fn decode_with_intermediates(
        &self,
        z: Tensor<4>,
        observe: impl FnMut(usize, &Tensor<4>),
    ) -> Tensor<4> {
        let in_dtype = z.dtype();
        let z = to_dtype(z, self.dtype());
        to_dtype(
            self.decoder.forward_with_intermediates(z, observe),
            in_dtype,
        )
    }

    /// diffusers' `scale_latents`: latents to `[0, 1]` for storing as bytes,
    /// `clamp(z / (2 * latent_magnitude) + latent_shift, 0, 1)`.
    pub fn scale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        (z / (2.0 * self.latent_magnitude) + self.latent_shift).clamp(0.0, 1.0)
    }

    /// diffusers' `unscale_latents`, the inverse of [`Self::scale_latents`]:
    /// `(x - latent_shift) * 2 * latent_magnitude`.
    pub fn unscale_latents(&self, x: Tensor<4>) -> Tensor<4> {
        (x - self.latent_shift) * (2.0 * self.latent_magnitude)
    }
}

impl sd_core::Autoencoder for AutoencoderTiny {
    fn encode(&self, image: Tensor<4>) -> Result<DiagonalGaussian, sd_core::CoreError> {
        sd_core::check_vae_image(self, image.dims())?;
        Ok(DiagonalGaussian::point(
            self.encode_with_intermediates(image, |_, _| {}),
        ))
    }

    fn decode(&self, z: Tensor<4>) -> Result<Tensor<4>, sd_core::CoreError> {
        sd_core::check_vae_latents(self, z.dims())?;
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
