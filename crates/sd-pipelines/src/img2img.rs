//! Image to image (diffusers' `StableDiffusionImg2ImgPipeline`).

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource};

use crate::composed::{GenerationOptions, GenerationOutput, StableDiffusion, StepCallback};
use crate::denoise::{Conditioning, ExtraConditioning};

impl StableDiffusion<'_> {
    /// Image to image: `image` `[1 or b, 3, H, W]` in `[-1, 1]` (its size is the
    /// output's), `strength` in (0, 1].
    ///
    /// # Errors
    /// Invalid options, an image that is not RGB or not a multiple of 8, a strength
    /// outside (0, 1] or one leaving no step, model and scheduler errors.
    pub fn img2img(
        &self,
        options: &GenerationOptions,
        image: Tensor<4>,
        strength: f64,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let options = &self.options_for_image(options, &image)?;
        let shape = self.latent_shape(options)?;
        let (embeds, added) = self.encode_conditioning(options, true)?;
        let (mut run, start) = self.start_at_strength(&options.steps, strength)?;
        let image_latents = self.encode_image(image, shape[0], noise)?;
        let n = noise.normal(shape, &self.device)?;
        let latents = run.add_noise(image_latents, n, start)?;
        let conditioning = Conditioning {
            embeds,
            guidance: options.guidance_scale,
            extra: ExtraConditioning::None,
            added,
            skip_layer_guidance: options.skip_layer_guidance.clone(),
        };
        self.denoise_and_decode(run.as_mut(), latents, conditioning, noise, callback)
    }

    /// The refiner's half of a hand-over (diffusers' image-to-image pipeline with
    /// `denoising_start`): `latents` (`[b, 4, h, w]`, a base run's output stopped at
    /// `denoising_end`) continue from the first timestep below `round(T - start *
    /// T)`, as they are (no noise added). The picture's size and batch are the
    /// latents'.
    ///
    /// # Errors
    /// A fraction outside (0, 1) or one leaving no step, latents with other than the
    /// VAE's channels, model and scheduler errors.
    pub fn img2img_from_latents(
        &self,
        options: &GenerationOptions,
        latents: Tensor<4>,
        denoising_start: f64,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let [b, c, h, w] = latents.dims();
        let f = self.vae.downscale_factor();
        let options = &GenerationOptions {
            width: w * f,
            height: h * f,
            batch_size: b,
            ..options.clone()
        };
        if c != self.vae.latent_channels() {
            return Err(crate::composed::invalid(
                "latents",
                format!(
                    "{c} channels, the VAE's latents have {}",
                    self.vae.latent_channels()
                ),
            ));
        }
        self.latent_shape(options)?;
        let (embeds, added) = self.encode_conditioning(options, true)?;
        let mut run = self.scheduler.start(&options.steps)?;
        let done = sd_core::handover_index(
            run.timesteps(),
            self.scheduler.num_train_timesteps(),
            denoising_start,
        )?;
        if done >= run.len() {
            return Err(crate::composed::invalid(
                "denoising_start",
                format!("{denoising_start} leaves no step to run"),
            ));
        }
        run.skip_to(done)?;
        let conditioning = Conditioning {
            embeds,
            guidance: options.guidance_scale,
            extra: ExtraConditioning::None,
            added,
            skip_layer_guidance: options.skip_layer_guidance.clone(),
        };
        self.denoise_and_decode(run.as_mut(), latents, conditioning, noise, callback)
    }
}
