//! Latent Consistency Models: Luo et al., "Latent Consistency Models" (2023),
//! following diffusers' `LCMScheduler` (few-step sampling of LCM and LCM-LoRA models).

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Scheduler, SchedulerRun, StepOutput, Steps};

use crate::config::{SchedulerConfig, unsupported};
use crate::schedule::{NoiseSchedule, PredictionType, check_descending};

/// `sigma_data` of the consistency boundary condition.
const SIGMA_DATA: f64 = 0.5;

/// The LCM scheduler: timesteps picked from the `original_inference_steps` grid the
/// model was distilled on, a consistency-model step with the boundary-condition
/// scalings, fresh noise between steps.
#[derive(Debug, Clone)]
pub struct Lcm {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    original_steps: usize,
    timestep_scaling: f64,
    final_alpha_cumprod: f64,
    clip_sample: Option<f64>,
}

impl Lcm {
    /// From a diffusers scheduler config (`original_inference_steps` 50 and
    /// `timestep_scaling` 10 by default, as diffusers).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self, CoreError> {
        let schedule = NoiseSchedule::from_config(c)?;
        if c.thresholding == Some(true) {
            return Err(unsupported(
                "thresholding",
                "dynamic thresholding is not supported",
            ));
        }
        let original_steps = original_steps(c, schedule.num_train_timesteps)?;
        let timestep_scaling = c.timestep_scaling.unwrap_or(10.0);
        if !timestep_scaling.is_finite() {
            return Err(unsupported("timestep_scaling", "must be finite"));
        }
        let final_alpha_cumprod = schedule.final_alpha_cumprod(c);
        Ok(Self {
            prediction: PredictionType::from_config(c)?,
            original_steps,
            timestep_scaling,
            final_alpha_cumprod,
            clip_sample: crate::schedule::clip_sample(c),
            schedule,
        })
    }

    /// diffusers' `set_timesteps`: `n` of the distillation grid
    /// `[k - 1, 2k - 1, ..., T - 1]` (`k = T / original_inference_steps`), descending,
    /// at `floor(linspace(0, len, n, endpoint=False))`.
    fn timesteps(&self, n: usize) -> Result<Vec<f64>, CoreError> {
        distillation_timesteps(
            "LCM",
            self.schedule.num_train_timesteps,
            self.original_steps,
            n,
        )
    }
}

/// `n` timesteps of a consistency distillation grid (LCM, TCD):
/// `[k - 1, 2k - 1, ..., T - 1]` with `k = T / original_steps`, descending, at
/// `floor(linspace(0, len, n, endpoint=False))`.
///
/// # Errors
/// `n` outside `1..=original_steps`.
pub(crate) fn distillation_timesteps(
    name: &str,
    num_train_timesteps: usize,
    original_steps: usize,
    n: usize,
) -> Result<Vec<f64>, CoreError> {
    let k = num_train_timesteps / original_steps;
    let origin: Vec<usize> = (1..=original_steps).rev().map(|i| i * k - 1).collect();
    if n == 0 || n > original_steps {
        return Err(CoreError::invalid(
            "steps",
            format!("{name} takes 1 to {original_steps} steps (its original_inference_steps)"),
        ));
    }
    let len = origin.len();
    Ok((0..n)
        .map(|i| origin[(i as f64 * len as f64 / n as f64).floor() as usize] as f64)
        .collect())
}

/// `original_inference_steps` of a config (50 by default), within the training
/// timesteps.
pub(crate) fn original_steps(
    c: &SchedulerConfig,
    num_train_timesteps: usize,
) -> Result<usize, CoreError> {
    let original_steps = c.original_inference_steps.unwrap_or(50);
    if original_steps == 0 || original_steps > num_train_timesteps {
        return Err(unsupported(
            "original_inference_steps",
            format!("{original_steps} is outside 1..={num_train_timesteps}"),
        ));
    }
    Ok(original_steps)
}

impl Scheduler for Lcm {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps
    }

    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        crate::schedule::check_steps(steps)?;
        let timesteps = match steps {
            Steps::Count(n) => self.timesteps(*n)?,
            Steps::Timesteps(ts) => {
                check_descending("timesteps", ts)?;
                ts.iter().map(|t| t.round()).collect()
            }
            Steps::Sigmas(_) => {
                return Err(CoreError::Unsupported(
                    "LCM walks timesteps: pass Steps::Count or Steps::Timesteps".into(),
                ));
            }
        };
        Ok(Box::new(LcmRun {
            scheduler: self.clone(),
            timesteps,
            begin: 0,
        }))
    }

    fn class_name(&self) -> &'static str {
        "LCMScheduler"
    }
}

/// One LCM run.
#[derive(Debug)]
struct LcmRun {
    scheduler: Lcm,
    timesteps: Vec<f64>,
    begin: usize,
}

impl LcmRun {
    fn alpha(&self, t: f64) -> f64 {
        if t >= 0.0 {
            self.scheduler.schedule.alpha_cumprod(t as i64)
        } else {
            self.scheduler.final_alpha_cumprod
        }
    }

    /// `c_skip`, `c_out` of the boundary condition at timestep `t`.
    fn scalings(&self, t: f64) -> (f64, f64) {
        let scaled = t * self.scheduler.timestep_scaling;
        let d2 = SIGMA_DATA * SIGMA_DATA;
        let c_skip = d2 / (scaled * scaled + d2);
        let c_out = scaled / (scaled * scaled + d2).sqrt();
        (c_skip, c_out)
    }
}

impl SchedulerRun for LcmRun {
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
        let t = self.timesteps[i];
        let last = i + 1 == self.timesteps.len();
        let prev_t = if last { t } else { self.timesteps[i + 1] };
        let (a_t, a_prev) = (self.alpha(t), self.alpha(prev_t));
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let mut x0 = match self.scheduler.prediction {
            PredictionType::Epsilon => (sample.clone() - model_output * b_t.sqrt()) / a_t.sqrt(),
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => sample.clone() * a_t.sqrt() - model_output * b_t.sqrt(),
        };
        if let Some(r) = self.scheduler.clip_sample {
            x0 = x0.clamp(-r, r);
        }
        let (c_skip, c_out) = self.scalings(t);
        let denoised = x0 * c_out + sample * c_skip;
        let prev_sample = if last {
            denoised.clone()
        } else {
            let n = noise.normal(denoised.dims(), &denoised.device())?;
            denoised.clone() * a_prev.sqrt() + n * b_prev.sqrt()
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: Some(denoised),
        })
    }

    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        i: usize,
    ) -> Result<Tensor<4>, CoreError> {
        sd_core::check_step_inputs(i, self.timesteps.len(), &original, &noise)?;
        let a = self.alpha(self.timesteps[i]);
        Ok(original * a.sqrt() + noise * (1.0 - a).sqrt())
    }
}
