//! The diffusion training objective: DDPM forward noising, the prediction target and
//! the per-sample loss weights (min-SNR), as diffusers' training scripts compute them.

use burn::prelude::*;
use sd_schedulers::{NoiseSchedule, PredictionType, SchedulerConfig};

use crate::error::TrainError;

/// The noise schedule a model was trained with, and what it predicts.
#[derive(Debug, Clone)]
pub struct Objective {
    /// `alphas_cumprod[t]` for `t` in `0..num_train_timesteps`.
    pub alphas_cumprod: Vec<f32>,
    /// What the U-Net predicts.
    pub prediction_type: PredictionType,
    /// min-SNR weighting `gamma` (Hang et al. 2023); `None` weighs every timestep 1.
    pub snr_gamma: Option<f32>,
}

impl Objective {
    /// From a scheduler config (`beta_*`, `num_train_timesteps`, `prediction_type`).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, TrainError> {
        let schedule = NoiseSchedule::from_config(config)?;
        let prediction_type = match config.prediction_type.as_deref() {
            None | Some("epsilon") => PredictionType::Epsilon,
            Some("v_prediction") => PredictionType::VPrediction,
            Some(other) => {
                return Err(TrainError::Config(format!(
                    "prediction_type `{other}`: training supports epsilon and v_prediction"
                )));
            }
        };
        Ok(Self {
            alphas_cumprod: schedule.alphas_cumprod,
            prediction_type,
            snr_gamma: None,
        })
    }

    /// Number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    fn per_sample(
        &self,
        timesteps: &[usize],
        f: impl Fn(f64) -> f64,
        device: &Device,
    ) -> Tensor<4> {
        let v: Vec<f32> = timesteps
            .iter()
            .map(|&t| f(self.alphas_cumprod[t] as f64) as f32)
            .collect();
        Tensor::<1>::from_floats(v.as_slice(), device).reshape([timesteps.len(), 1, 1, 1])
    }

    /// The timesteps as the U-Net takes them.
    ///
    /// # Shapes
    /// - output: `[timesteps.len()]`
    pub fn timestep_tensor(timesteps: &[usize], device: &Device) -> Tensor<1> {
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        Tensor::<1>::from_floats(t.as_slice(), device)
    }

    /// `sqrt(a_t) x0 + sqrt(1 - a_t) noise` (diffusers' `DDPMScheduler.add_noise`).
    ///
    /// # Shapes
    /// - `x0`, `noise`: `[b, c, h, w]`; `timesteps`: `b` values below `T`
    pub fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, timesteps: &[usize]) -> Tensor<4> {
        let device = x0.device();
        let a = self.per_sample(timesteps, f64::sqrt, &device);
        let s = self.per_sample(timesteps, |a| (1.0 - a).sqrt(), &device);
        x0 * a + noise * s
    }

    /// What the U-Net should output: the noise, or `v = sqrt(a_t) noise - sqrt(1 - a_t) x0`.
    pub fn target(&self, x0: Tensor<4>, noise: Tensor<4>, timesteps: &[usize]) -> Tensor<4> {
        match self.prediction_type {
            PredictionType::VPrediction => {
                let device = x0.device();
                let a = self.per_sample(timesteps, f64::sqrt, &device);
                let s = self.per_sample(timesteps, |a| (1.0 - a).sqrt(), &device);
                noise * a - x0 * s
            }
            _ => noise,
        }
    }

    /// Per-sample loss weights: `min(snr, gamma) / snr` (epsilon) or
    /// `min(snr, gamma) / (snr + 1)` (v), `snr = a_t / (1 - a_t)`; all 1 without gamma.
    pub fn weights(&self, timesteps: &[usize]) -> Vec<f32> {
        timesteps
            .iter()
            .map(|&t| {
                let Some(gamma) = self.snr_gamma else {
                    return 1.0;
                };
                // f32 as diffusers' compute_snr.
                let a = self.alphas_cumprod[t];
                let snr = (a.sqrt() / (1.0 - a).sqrt()).powi(2);
                let w = snr.min(gamma);
                match self.prediction_type {
                    PredictionType::VPrediction => w / (snr + 1.0),
                    _ => w / snr,
                }
            })
            .collect()
    }

    /// The loss: the mean squared error of each sample, weighted, averaged over the
    /// batch (the plain mean squared error without min-SNR).
    ///
    /// # Shapes
    /// - `prediction`, `target`: `[b, c, h, w]`; output `[1]`
    pub fn loss(&self, prediction: Tensor<4>, target: Tensor<4>, timesteps: &[usize]) -> Tensor<1> {
        let [b, c, h, w] = prediction.dims();
        let err = (prediction - target).powi_scalar(2).reshape([b, c * h * w]);
        let per_sample = err.mean_dim(1).reshape([b]);
        match self.snr_gamma {
            None => per_sample.mean(),
            Some(_) => {
                let weights = self.weights(timesteps);
                let wt = Tensor::<1>::from_floats(weights.as_slice(), &per_sample.device());
                (per_sample * wt).mean()
            }
        }
    }
}
