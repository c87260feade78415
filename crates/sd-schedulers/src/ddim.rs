//! DDIM: Song, Meng, Ermon, "Denoising Diffusion Implicit Models" (2020), following
//! diffusers' `DDIMScheduler`.

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Scheduler, SchedulerRun, StepOutput, Steps};

use crate::config::{SchedulerConfig, unsupported};
use crate::schedule::{
    NoiseSchedule, PredictionType, TimestepSpacing, arange_down, check_count, check_descending,
    linspace, sigma_to_t,
};
use crate::sigmas::AysPreset;

/// Spaced integer timesteps, descending, as DDIM / PNDM-style schedulers space them.
pub(crate) fn spaced_int_timesteps(
    spacing: TimestepSpacing,
    t: usize,
    n: usize,
    offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even())
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n).rev().map(|i| (i * ratio + offset) as f64).collect()
        }
        TimestepSpacing::Trailing => arange_down(t as f64, t as f64 / n as f64)
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
    }
}

/// The DDIM scheduler. `eta = 0` is deterministic DDIM; `eta = 1` is DDPM-like.
#[derive(Debug, Clone)]
pub struct Ddim {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    final_alpha_cumprod: f64,
    clip_sample: Option<f64>,
    eta: f64,
    ays: Option<AysPreset>,
}

impl Ddim {
    /// From a diffusers scheduler config (class defaults: leading spacing).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self, CoreError> {
        let schedule = NoiseSchedule::from_config(c)?;
        if c.thresholding == Some(true) {
            return Err(unsupported(
                "thresholding",
                "dynamic thresholding is not supported",
            ));
        }
        let final_alpha_cumprod = schedule.final_alpha_cumprod(c);
        Ok(Self {
            prediction: PredictionType::from_config(c)?,
            spacing: TimestepSpacing::from_config(c, TimestepSpacing::Leading)?,
            steps_offset: c.steps_offset.unwrap_or(0),
            final_alpha_cumprod,
            clip_sample: crate::schedule::clip_sample(c),
            eta: 0.0,
            ays: None,
            schedule,
        })
    }

    /// Sets eta (0 deterministic; noise is drawn in `step` when > 0).
    pub fn with_eta(mut self, eta: f64) -> Self {
        self.eta = eta;
        self
    }

    /// Uses the Align Your Steps timesteps for a step count.
    pub fn with_ays(mut self, preset: AysPreset) -> Self {
        self.ays = Some(preset);
        self
    }

    /// The noise schedule.
    pub fn noise_schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }
}

struct DdimRun {
    timesteps: Vec<f64>,
    alpha_t: Vec<f64>,
    alpha_prev: Vec<f64>,
    prediction: PredictionType,
    clip_sample: Option<f64>,
    eta: f64,
    begin: usize,
}

impl Scheduler for Ddim {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps
    }

    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        crate::schedule::check_steps(steps)?;
        let t = self.schedule.num_train_timesteps;
        let (timesteps, prev): (Vec<f64>, Vec<i64>) = match steps {
            Steps::Count(n) if self.ays.is_none() => {
                check_count(*n, t)?;
                let ts = spaced_int_timesteps(self.spacing, t, *n, self.steps_offset);
                // diffusers: prev_t = t - T // N, whatever the spacing.
                let prev = ts.iter().map(|&x| x as i64 - (t / n) as i64).collect();
                (ts, prev)
            }
            other => {
                let ts: Vec<f64> = match other {
                    Steps::Count(n) => self.ays.expect("ays").timesteps(*n),
                    Steps::Timesteps(v) => v.iter().map(|x| x.round()).collect(),
                    Steps::Sigmas(s) => {
                        let log_sigmas = self.schedule.log_sigmas();
                        s[..s.len().saturating_sub(1)]
                            .iter()
                            .map(|&x| sigma_to_t(x, &log_sigmas).round())
                            .collect()
                    }
                };
                check_descending("timesteps", &ts)?;
                if ts.iter().any(|&x| x < 0.0 || x >= t as f64) {
                    return Err(CoreError::InvalidArgument {
                        name: "timesteps",
                        message: format!("must lie in [0, {t})"),
                    });
                }
                let prev = (0..ts.len())
                    .map(|i| ts.get(i + 1).map(|&x| x as i64).unwrap_or(-1))
                    .collect();
                (ts, prev)
            }
        };
        let alpha_t = timesteps
            .iter()
            .map(|&x| self.schedule.alpha_cumprod(x as i64))
            .collect();
        let alpha_prev = prev
            .iter()
            .map(|&p| {
                if p >= 0 {
                    self.schedule.alpha_cumprod(p)
                } else {
                    self.final_alpha_cumprod
                }
            })
            .collect();
        Ok(Box::new(DdimRun {
            timesteps,
            alpha_t,
            alpha_prev,
            prediction: self.prediction,
            clip_sample: self.clip_sample,
            eta: self.eta,
            begin: 0,
        }))
    }

    fn class_name(&self) -> &'static str {
        "DDIMScheduler"
    }
}

/// `(x0, eps)` predicted from a model output with `alpha_prod_t = a`.
pub(crate) fn split_prediction(
    prediction: PredictionType,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    a: f64,
) -> (Tensor<4>, Tensor<4>) {
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    match prediction {
        PredictionType::Epsilon => ((sample - model_output.clone() * sb) / sa, model_output),
        PredictionType::Sample => (model_output.clone(), (sample - model_output * sa) / sb),
        PredictionType::VPrediction => (
            sample.clone() * sa - model_output.clone() * sb,
            model_output * sa + sample * sb,
        ),
    }
}

impl SchedulerRun for DdimRun {
    crate::schedule::run_skeleton!();

    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Result<Tensor<4>, CoreError> {
        CoreError::check_step(i, self.timesteps.len())?;
        Ok(sample)
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput, CoreError> {
        sd_core::check_step_inputs(i, self.timesteps.len(), &model_output, &sample)?;
        let (a_t, a_prev) = (self.alpha_t[i], self.alpha_prev[i]);
        let shape = model_output.dims();
        let device = model_output.device();
        let (mut x0, eps) = split_prediction(self.prediction, model_output, sample, a_t);
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r, r);
        }
        let variance = ((1.0 - a_prev) / (1.0 - a_t)) * (1.0 - a_t / a_prev);
        let std = self.eta * variance.sqrt();
        let dir = eps * (1.0 - a_prev - std * std).max(0.0).sqrt();
        let mut prev = x0.clone() * a_prev.sqrt() + dir;
        if self.eta > 0.0 {
            prev = prev + noise.normal(shape, &device)? * std;
        }
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        i: usize,
    ) -> Result<Tensor<4>, CoreError> {
        sd_core::check_step_inputs(i, self.timesteps.len(), &original, &noise)?;
        let a = self.alpha_t[i];
        Ok(original * a.sqrt() + noise * (1.0 - a).sqrt())
    }
}
