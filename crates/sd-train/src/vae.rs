//! Training a VAE (`AutoencoderKL`) from scratch: reconstruction error plus a weighted
//! KL divergence to the unit Gaussian, as the first stage of a latent diffusion model.

use burn::optim::{AdamWConfig, GradientsParams};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sd_models::AutoencoderKL;

use crate::optim::LrSchedule;
use crate::trainer::gaussian;

/// Settings of [`train_vae`].
#[derive(Debug, Clone)]
pub struct VaeTrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak AdamW learning rate (linear warm-up over 5% of the steps, then cosine decay to 0).
    pub learning_rate: f64,
    /// Weight of the KL term (small: the latents stay informative).
    pub kl_weight: f64,
    /// Seed of batches and posterior samples.
    pub seed: u64,
}

/// Trains `vae` (built on an autodiff device) on `images` (`[1, 3, H, W]` in `[-1, 1]`)
/// with `mse(decode(z), x) + kl_weight * KL(q(z|x) || N(0, I))`, `z` sampled from the
/// posterior; calls `on_step(step, reconstruction, kl)`. Returns the trained VAE off
/// autodiff.
pub fn train_vae(
    mut vae: AutoencoderKL,
    images: &[Tensor<4>],
    config: &VaeTrainConfig,
    mut on_step: impl FnMut(usize, f64, f64),
) -> AutoencoderKL {
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut rng = StdRng::seed_from_u64(config.seed);
    let warmup = (config.steps / 20).max(1);
    for step in 0..config.steps {
        let batch: Vec<Tensor<4>> = (0..config.batch_size)
            .map(|_| images[rng.random_range(0..images.len())].clone())
            .collect();
        let x = Tensor::cat(batch, 0);
        let moments = vae.encode_moments(x.clone());
        let [b, c2, h, w] = moments.dims();
        let mut parts = moments.split(c2 / 2, 1);
        let logvar = parts.pop().unwrap().clamp(-30.0, 20.0);
        let mean = parts.pop().unwrap();
        let device = x.device();
        let eps = gaussian([b, c2 / 2, h, w], &mut rng, &device.without_autodiff());
        let z = mean.clone() + logvar.clone().mul_scalar(0.5).exp() * eps;
        let recon = vae.decode_with_intermediates(z, |_, _| {});
        let rec = (recon - x).powi_scalar(2).mean();
        let kl = (mean.powi_scalar(2) + logvar.clone().exp() - logvar)
            .sub_scalar(1.0)
            .mul_scalar(0.5)
            .mean();
        let loss = rec.clone() + kl.clone().mul_scalar(config.kl_weight);
        on_step(
            step,
            rec.into_scalar::<f32>() as f64,
            kl.into_scalar::<f32>() as f64,
        );
        let grads = GradientsParams::from_grads(loss.backward(), &vae);
        let lr = config.learning_rate
            * LrSchedule::Cosine {
                warmup_steps: warmup,
                total_steps: config.steps,
            }
            .factor(step);
        vae = optim.step(lr, vae, grads);
    }
    vae.valid()
}

/// `1 / std` of the posterior means of `images`: the `scaling_factor` that gives the
/// diffusion model unit-variance latents (how SD's 0.18215 was chosen).
pub fn latent_scaling_factor(vae: &AutoencoderKL, images: &[Tensor<4>]) -> f64 {
    let mut values = Vec::new();
    for chunk in images.chunks(16) {
        let moments = vae.encode_moments(Tensor::cat(chunk.to_vec(), 0));
        let c2 = moments.dims()[1];
        let mean = moments.narrow(1, 0, c2 / 2);
        values.extend(
            mean.into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap_or_default(),
        );
    }
    let n = values.len().max(1) as f64;
    let mu = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / n;
    1.0 / var.sqrt().max(1e-6)
}
