//! Hires fix (A1111's "highres. fix"): text to image at a base size, the result
//! upscaled (its latents, or the decoded picture), then denoised again at the target
//! size from part of the way, as image to image does.

use burn::nn::interpolate::{Interpolate2dConfig, InterpolateMode};
use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Steps};

use crate::composed::{
    GenerationOptions, GenerationOutput, StableDiffusion, StepCallback, invalid,
};
use crate::denoise::{Conditioning, ExtraConditioning};

/// How the first pass is brought to the target size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiresUpscaler {
    /// The latents, bilinearly (A1111's default "Latent"; wants a strength of about
    /// 0.5 or more, or the picture stays soft).
    #[default]
    Latent,
    /// The latents, nearest neighbour (A1111's "Latent (nearest)").
    LatentNearest,
    /// The latents, bicubic (A1111's "Latent (bicubic)").
    LatentBicubic,
    /// The decoded picture with a Lanczos-3 filter, encoded again (A1111's
    /// "Lanczos": sharper at low strengths, one more VAE decode and encode).
    Lanczos,
}

/// The settings of a hires fix. The defaults are A1111's: twice the size, strength
/// 0.7, the first pass's step count, the latent upscaler.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HiresFix {
    /// Target size over the base size (> 1); each side is rounded down to a multiple
    /// of 8.
    pub scale: f64,
    /// The share of the second pass's steps that run, as image to image's strength
    /// (A1111's "denoising strength"), in (0, 1].
    pub strength: f64,
    /// Steps of the second pass before the strength cut (`None`: the first pass's).
    pub steps: Option<usize>,
    /// How the first pass is upscaled.
    pub upscaler: HiresUpscaler,
}

impl Default for HiresFix {
    fn default() -> Self {
        Self {
            scale: 2.0,
            strength: 0.7,
            steps: None,
            upscaler: HiresUpscaler::Latent,
        }
    }
}

impl HiresFix {
    /// The target size for a base size: each side times [`Self::scale`], rounded down
    /// to a multiple of 8.
    ///
    /// # Errors
    /// A scale that is not a finite number above 1, or a target side over 65536.
    pub fn target_size(&self, width: usize, height: usize) -> Result<(usize, usize), CoreError> {
        if !(self.scale.is_finite() && self.scale > 1.0) {
            return Err(invalid(
                "hires scale",
                format!("{} is not a number above 1", self.scale),
            ));
        }
        let side = |v: usize| {
            let s = (v as f64 * self.scale / 8.0).floor() * 8.0;
            if s > 65536.0 {
                Err(invalid("hires scale", format!("{s} pixels is too large")))
            } else {
                Ok(s as usize)
            }
        };
        Ok((side(width)?, side(height)?))
    }

    /// The second pass's steps for a first pass of `steps`.
    pub(crate) fn second_pass_steps(&self, steps: &Steps) -> Steps {
        self.steps.map_or_else(|| steps.clone(), Steps::Count)
    }
}

impl StableDiffusion<'_> {
    /// Text to image with a hires fix: `options` at its size, then the result
    /// upscaled by `hires` and denoised again at the target size. The callback sees
    /// both passes (each with its own step count). The prompt is encoded once.
    ///
    /// # Errors
    /// As [`Self::txt2img`], a bad scale or strength, a strength leaving no step.
    pub fn txt2img_hires(
        &self,
        options: &GenerationOptions,
        hires: &HiresFix,
        noise: &mut dyn NoiseSource,
        mut callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let (width, height) = hires.target_size(options.width, options.height)?;
        let second = GenerationOptions {
            width,
            height,
            steps: hires.second_pass_steps(&options.steps),
            init_latents: None,
            ..options.clone()
        };
        let shape = self.latent_shape(&second)?;
        let (embeds, added) = self.encode_conditioning(options, false)?;
        let first = self.txt2img_latents(
            options,
            (embeds.clone(), added.clone()),
            options.init_latents.clone(),
            noise,
            callback.as_mut().map(|c| &mut **c as _),
        )?;
        let upscaled = match hires.upscaler {
            HiresUpscaler::Latent => resize_latents(first, shape, InterpolateMode::Linear),
            HiresUpscaler::LatentNearest => resize_latents(first, shape, InterpolateMode::Nearest),
            HiresUpscaler::LatentBicubic => resize_latents(first, shape, InterpolateMode::Cubic),
            HiresUpscaler::Lanczos => {
                let image = lanczos(&self.decode_unmarked(first)?, width, height, &self.device);
                self.encode_image(image, shape[0], noise)?
            }
        };
        let (mut run, start) = self.start_at_strength(&second.steps, hires.strength)?;
        let n = noise.normal(shape, &self.device)?;
        let latents = run.add_noise(upscaled, n, start)?;
        let conditioning = Conditioning {
            embeds,
            guidance: options.guidance_scale,
            extra: ExtraConditioning::None,
            // The second pass at the target size: SDXL's default time ids follow it.
            added: match &added.text_embeds {
                Some(p) => self.sdxl_added(&second, p.clone(), false)?,
                None => added,
            },
            skip_layer_guidance: options.skip_layer_guidance.clone(),
        };
        self.denoise_and_decode(run.as_mut(), latents, conditioning, noise, callback)
    }
}

/// Latents resized to `shape` (PyTorch's `interpolate`, `align_corners = False`).
fn resize_latents(latents: Tensor<4>, shape: [usize; 4], mode: InterpolateMode) -> Tensor<4> {
    Interpolate2dConfig::new()
        .with_output_size(Some([shape[2], shape[3]]))
        .with_mode(mode)
        .with_align_corners(false)
        .init()
        .forward(latents)
}

/// Pictures `[b, 3, h, w]` in `[0, 1]` resized with Lanczos-3 to `[b, 3, height,
/// width]` in `[-1, 1]` (through 8-bit RGB and Pillow's Lanczos, as A1111 does).
fn lanczos(images: &Tensor<4>, width: usize, height: usize, device: &Device) -> Tensor<4> {
    let parts = sd_io::image::tensor_to_images(images)
        .into_iter()
        .map(|im| {
            let resized = sd_io::image::lanczos(&im.into(), width, height);
            sd_io::image::image_to_tensor(&resized, device)
        })
        .collect();
    Tensor::cat(parts, 0)
}

#[cfg(test)]
mod tests {
    use super::HiresFix;

    #[test]
    fn target_sizes_round_down_to_multiples_of_8() {
        let h = HiresFix {
            scale: 1.5,
            ..HiresFix::default()
        };
        assert_eq!(h.target_size(512, 344).unwrap(), (768, 512));
        assert_eq!(
            HiresFix::default().target_size(512, 512).unwrap(),
            (1024, 1024)
        );
        for bad in [1.0, 0.5, f64::NAN, f64::INFINITY, 1e9] {
            let h = HiresFix {
                scale: bad,
                ..HiresFix::default()
            };
            assert!(h.target_size(512, 512).is_err(), "{bad}");
        }
    }
}
