//! Inpainting (diffusers' `StableDiffusionInpaintPipeline`, and the legacy blend for
//! ordinary U-Nets).

use burn::prelude::*;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use sd_core::{CoreError, NoiseSource, SchedulerRun};

use crate::composed::{
    GenerationOptions, GenerationOutput, StableDiffusion, StepCallback, invalid,
};
use crate::denoise::{Conditioning, ExtraConditioning, KnownRegion};

impl StableDiffusion<'_> {
    /// Inpainting: repaint where `mask` (`[1, 1, H, W]`, 1 = repaint) is set, in
    /// `image` (`[1 or b, 3, H, W]` in `[-1, 1]`).
    ///
    /// With a 9-channel inpainting U-Net the mask and the masked image's latents are
    /// concatenated to its input as diffusers does; with an ordinary 4-channel U-Net the
    /// known region is blended back after every step (the legacy method).
    ///
    /// # Errors
    /// A mask of another size, a U-Net that is neither plain nor inpainting, and as
    /// [`Self::img2img`].
    pub fn inpaint(
        &self,
        options: &GenerationOptions,
        image: Tensor<4>,
        mask: Tensor<4>,
        strength: f64,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let options = &self.options_for_image(options, &image)?;
        let [_, _, h, w] = image.dims();
        let [mb, mc, mh, mw] = mask.dims();
        if mc != 1 || mh != h || mw != w || mb != 1 {
            return Err(invalid(
                "mask",
                format!("shape {:?}, expected [1, 1, {h}, {w}]", mask.dims()),
            ));
        }
        let shape = self.latent_shape(options)?;
        let [b, c, lh, lw] = shape;
        let nine = self.unet.in_channels() == 2 * c + 1;
        if !nine && self.unet.in_channels() != c {
            return Err(invalid(
                "unet",
                format!(
                    "{} input channels: neither a plain nor an inpainting U-Net",
                    self.unet.in_channels()
                ),
            ));
        }
        let (embeds, added) = self.encode_conditioning(options, true)?;
        let (mut run, start) = self.start_at_strength(&options.steps, strength)?;
        let mask = mask.greater_equal_elem(0.5).float();
        let latent_mask = interpolate(
            mask.clone(),
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([lh, lw]),
        );
        let (latents, extra) = if nine {
            let latents =
                self.inpaint_start_latents(options, &image, run.as_ref(), start, strength, noise)?;
            let keep = mask.neg().add_scalar(1.0);
            let masked_latents = self.encode_image(image * keep, b, noise)?;
            let m = latent_mask.repeat_dim(0, b);
            let extra = ExtraConditioning::Concat(Tensor::cat(vec![m, masked_latents], 1));
            (latents, extra)
        } else {
            let (image_latents, sampled) = self.encode_image_sampled(image.clone(), b, noise)?;
            let n = match &options.init_latents {
                Some(l) => l.clone(),
                None => noise.normal(shape, &self.device)?,
            };
            if sampled {
                // diffusers encodes the masked image here too (`prepare_mask_latents`),
                // drawing a posterior sample only a 9-channel model uses: the draw is
                // taken, the encode skipped.
                let [ib, _, _, _] = image.dims();
                noise.normal([ib, shape[1], lh, lw], &self.device)?;
            }
            let latents = if strength >= 1.0 {
                n.clone() * run.init_noise_sigma()
            } else {
                run.add_noise(image_latents.clone(), n.clone(), start)?
            };
            let region = KnownRegion {
                image_latents,
                noise: n,
                mask: latent_mask.repeat_dim(0, b),
            };
            (latents, ExtraConditioning::Blend(region))
        };
        let conditioning = Conditioning {
            embeds,
            guidance: options.guidance_scale,
            extra,
            added,
            skip_layer_guidance: options.skip_layer_guidance.clone(),
        };
        self.denoise_and_decode(run.as_mut(), latents, conditioning, noise, callback)
    }

    /// diffusers' `prepare_latents` for the 9-channel U-Net: pure noise at full
    /// strength, else the image's latents noised to the start step.
    fn inpaint_start_latents(
        &self,
        options: &GenerationOptions,
        image: &Tensor<4>,
        run: &dyn SchedulerRun,
        start: usize,
        strength: f64,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<4>, CoreError> {
        let shape = self.latent_shape(options)?;
        if strength >= 1.0 {
            let n = match &options.init_latents {
                Some(l) => l.clone(),
                None => noise.normal(shape, &self.device)?,
            };
            return Ok(n * run.init_noise_sigma());
        }
        let il = self.encode_image(image.clone(), shape[0], noise)?;
        let n = noise.normal(shape, &self.device)?;
        run.add_noise(il, n, start)
    }
}
