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
        };
        self.denoise_and_decode(run.as_mut(), latents, conditioning, noise, callback)
    }
}
