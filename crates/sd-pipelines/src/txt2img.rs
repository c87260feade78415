//! Text to image (diffusers' `StableDiffusionPipeline`).

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource};

use crate::composed::{
    GenerationOptions, GenerationOutput, StableDiffusion, StepCallback, invalid,
};
use crate::denoise::{Conditioning, ExtraConditioning};
use sd_core::AddedConditioning;

impl StableDiffusion<'_> {
    /// Text to image.
    ///
    /// # Errors
    /// Invalid options (size, guidance, clip skip, steps), a U-Net that is not a
    /// plain one, model and scheduler errors, cancellation.
    pub fn txt2img(
        &self,
        options: &GenerationOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let (embeds, added) = self.encode_conditioning(options, false)?;
        let latents = self.txt2img_latents(
            options,
            (embeds, added),
            options.init_latents.clone(),
            noise,
            callback,
        )?;
        Ok(GenerationOutput {
            images: self.decode(latents.clone())?,
            latents,
        })
    }

    /// Text to image from precomputed prompt embeddings (see [`Self::encode_prompt`])
    /// and optional initial latents (unscaled noise, `[b, 4, h / 8, w / 8]`). SD 1.x /
    /// 2.x: an SDXL U-Net also needs the added conditioning of
    /// [`Self::encode_conditioning`], which [`Self::txt2img`] passes.
    ///
    /// # Errors
    /// As [`Self::txt2img`], and initial latents of another shape.
    pub fn txt2img_with_embeds(
        &self,
        options: &GenerationOptions,
        embeds: Tensor<3>,
        init_latents: Option<Tensor<4>>,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let added = AddedConditioning::default();
        let latents =
            self.txt2img_latents(options, (embeds, added), init_latents, noise, callback)?;
        Ok(GenerationOutput {
            images: self.decode(latents.clone())?,
            latents,
        })
    }

    /// [`Self::txt2img_with_embeds`] without the decode: the final latents.
    pub(crate) fn txt2img_latents(
        &self,
        options: &GenerationOptions,
        (embeds, added): (Tensor<3>, AddedConditioning),
        init_latents: Option<Tensor<4>>,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<Tensor<4>, CoreError> {
        if self.unet.in_channels() != self.vae.latent_channels() {
            return Err(invalid(
                "unet",
                format!(
                    "txt2img needs a {}-channel U-Net (this one takes {}); use inpaint",
                    self.vae.latent_channels(),
                    self.unet.in_channels()
                ),
            ));
        }
        let shape = self.latent_shape(options)?;
        let mut run = self.scheduler.start(&options.steps)?;
        let latents = match init_latents {
            Some(l) if l.dims() != shape => {
                return Err(invalid(
                    "init_latents",
                    format!("shape {:?}, expected {:?}", l.dims(), shape),
                ));
            }
            Some(l) => l,
            None => noise.normal(shape, &self.device)?,
        } * run.init_noise_sigma();
        let conditioning = Conditioning {
            embeds,
            guidance: options.guidance_scale,
            extra: ExtraConditioning::None,
            added,
            skip_layer_guidance: options.skip_layer_guidance.clone(),
        };
        let end = match options.denoising_end {
            Some(f) => {
                sd_core::handover_index(run.timesteps(), self.scheduler.num_train_timesteps(), f)?
            }
            None => run.len(),
        };
        self.denoise_until(run.as_mut(), latents, conditioning, noise, callback, end)
    }
}
