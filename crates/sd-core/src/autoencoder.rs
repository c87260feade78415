//! The autoencoder contract (the VAE of Stable Diffusion).

use burn::prelude::*;

use crate::error::CoreError;

/// A diagonal Gaussian posterior `N(mean, exp(logvar))` over latents, or a point
/// mass at `mean` for a deterministic encoder (TAESD).
///
/// Follows diffusers' `DiagonalGaussianDistribution`: `logvar` is clamped to
/// `[-30, 20]` when built from moments.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// Mean `[batch, latent_channels, h, w]`.
    pub mean: Tensor<4>,
    /// Log-variance, clamped, same shape as `mean`; `None` for a point mass.
    pub logvar: Option<Tensor<4>>,
}

impl DiagonalGaussian {
    /// Splits encoder moments `[batch, 2 * latent_channels, h, w]` into mean and
    /// clamped log-variance.
    pub fn from_moments(moments: Tensor<4>) -> Self {
        let [_, c2, _, _] = moments.dims();
        let mut parts = moments.split(c2 / 2, 1);
        let logvar = parts.pop().expect("two halves").clamp(-30.0, 20.0);
        let mean = parts.pop().expect("two halves");
        Self {
            mean,
            logvar: Some(logvar),
        }
    }

    /// A point mass at `latents` (a deterministic encoder's output).
    pub fn point(latents: Tensor<4>) -> Self {
        Self {
            mean: latents,
            logvar: None,
        }
    }

    /// Whether sampling draws anything (false for a point mass).
    pub fn is_random(&self) -> bool {
        self.logvar.is_some()
    }

    /// Standard deviation `exp(0.5 * logvar)` (zeros for a point mass).
    pub fn std(&self) -> Tensor<4> {
        match &self.logvar {
            Some(l) => (l.clone() * 0.5).exp(),
            None => self.mean.zeros_like(),
        }
    }

    /// Draws `mean + std * noise` with caller-supplied standard normal `noise`
    /// (same shape as `mean`), so the draw is reproducible and replayable; a point
    /// mass returns `mean` and ignores `noise`.
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        match &self.logvar {
            Some(_) => self.mean.clone() + self.std() * noise,
            None => self.mean.clone(),
        }
    }

    /// The mode of the distribution (its mean).
    pub fn mode(&self) -> Tensor<4> {
        self.mean.clone()
    }
}

/// A variational autoencoder mapping images to latents and back.
pub trait Autoencoder {
    /// Encodes images in `[-1, 1]` to the latent posterior (unscaled latents).
    ///
    /// # Shapes
    /// - `image`: `[batch, 3, H, W]`, H and W multiples of [`Self::downscale_factor`]
    /// - output: mean and logvar `[batch, latent_channels, H / f, W / f]`
    ///
    /// # Errors
    /// [`CoreError::Shape`] for an image without 3 channels or whose sides are not
    /// multiples of [`Self::downscale_factor`].
    fn encode(&self, image: Tensor<4>) -> Result<DiagonalGaussian, CoreError>;

    /// Decodes unscaled latents `z` (the denoiser's latents through
    /// [`Self::unscale_latents`] first) to images, roughly in `[-1, 1]`, unclamped.
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, h, w]`
    /// - output: `[batch, 3, h * f, w * f]`
    ///
    /// # Errors
    /// [`CoreError::Shape`] for latents with other than [`Self::latent_channels`].
    fn decode(&self, z: Tensor<4>) -> Result<Tensor<4>, CoreError>;

    /// The factor latents are multiplied by after encoding (0.18215 for SD 1.x/2.x).
    fn scaling_factor(&self) -> f64;

    /// The shift subtracted from latents before scaling (`shift_factor`: 0.0609 for
    /// the SD 3 VAE; 0 for SD 1.x/2.x/XL).
    fn shift_factor(&self) -> f64 {
        0.0
    }

    /// The denoiser's latents to the decoder's input:
    /// `latents / scaling_factor + shift_factor`.
    ///
    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, h, w]`
    fn unscale_latents(&self, latents: Tensor<4>) -> Tensor<4> {
        let z = latents / self.scaling_factor();
        match self.shift_factor() {
            0.0 => z,
            shift => z + shift,
        }
    }

    /// Encoded latents to the denoiser's: `(z - shift_factor) * scaling_factor`.
    ///
    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, h, w]`
    fn scale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        let z = match self.shift_factor() {
            0.0 => z,
            shift => z - shift,
        };
        z * self.scaling_factor()
    }

    /// Spatial downscaling between images and latents (8 for SD).
    fn downscale_factor(&self) -> usize;

    /// Number of latent channels (4 for SD).
    fn latent_channels(&self) -> usize;
}

/// Checks an image for [`Autoencoder::encode`]: `[b, 3, H, W]`, H and W positive
/// multiples of the downscale factor.
///
/// # Errors
/// [`CoreError::Shape`] naming what does not fit.
pub fn check_vae_image(
    vae: &(impl Autoencoder + ?Sized),
    image: [usize; 4],
) -> Result<(), CoreError> {
    let [_, c, h, w] = image;
    if c != 3 {
        return Err(CoreError::shape(
            "image",
            format!("{c} channels, 3 expected"),
        ));
    }
    let f = vae.downscale_factor();
    if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
        return Err(CoreError::shape(
            "image",
            format!("{w}x{h} pixels: the sides must be positive multiples of {f}"),
        ));
    }
    Ok(())
}

/// Checks latents for [`Autoencoder::decode`]: `[b, latent_channels, h, w]`, h, w > 0.
///
/// # Errors
/// [`CoreError::Shape`] naming what does not fit.
pub fn check_vae_latents(
    vae: &(impl Autoencoder + ?Sized),
    z: [usize; 4],
) -> Result<(), CoreError> {
    let [_, c, h, w] = z;
    if c != vae.latent_channels() || h == 0 || w == 0 {
        return Err(CoreError::shape(
            "latents",
            format!(
                "shape {z:?}: expected [batch, {}, h > 0, w > 0]",
                vae.latent_channels()
            ),
        ));
    }
    Ok(())
}
