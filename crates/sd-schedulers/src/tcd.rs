//! Trajectory Consistency Distillation: Zheng et al., "Trajectory Consistency
//! Distillation" (2024), following diffusers' `TCDScheduler` (few-step sampling of
//! TCD and TCD-LoRA models, with `gamma` setting the stochasticity).

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Scheduler, SchedulerRun, StepOutput, Steps};

use crate::config::{SchedulerConfig, unsupported};
use crate::lcm::{distillation_timesteps, original_steps};
use crate::schedule::{NoiseSchedule, PredictionType, check_descending};

/// The gamma `TCDScheduler.step` uses when given none (its `eta = 0.3`).
pub const DEFAULT_GAMMA: f64 = 0.3;

/// The TCD scheduler: the LCM distillation grid's timesteps; each step predicts
/// the clean sample, noises it back to the intermediate timestep
/// `s = floor((1 - gamma) * t_prev)` with the model's own noise, then forward to
/// `t_prev` with fresh noise (none at the last step, none at all when `gamma = 0`).
#[derive(Debug, Clone)]
pub struct Tcd {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    original_steps: usize,
    final_alpha_cumprod: f64,
    gamma: f64,
}

impl Tcd {
    /// From a diffusers scheduler config (`original_inference_steps` 50 by default),
    /// with gamma [`DEFAULT_GAMMA`].
    pub fn from_config(c: &SchedulerConfig) -> Result<Self, CoreError> {
        let schedule = NoiseSchedule::from_config(c)?;
        if c.thresholding == Some(true) {
            return Err(unsupported(
                "thresholding",
                "dynamic thresholding is not supported",
            ));
        }
        Ok(Self {
            prediction: PredictionType::from_config(c)?,
            original_steps: original_steps(c, schedule.num_train_timesteps)?,
            final_alpha_cumprod: schedule.final_alpha_cumprod(c),
            gamma: DEFAULT_GAMMA,
            schedule,
        })
    }

    /// Sets gamma (diffusers' `eta` argument of `step`): 0 deterministic, 1 fully
    /// stochastic. diffusers' pipelines pass their own `eta` (0 unless given), so to
    /// reproduce a diffusers pipeline run that set none, use 0.
    ///
    /// # Errors
    /// [`CoreError::InvalidArgument`] outside `[0, 1]`.
    pub fn with_gamma(mut self, gamma: f64) -> Result<Self, CoreError> {
        if !(0.0..=1.0).contains(&gamma) {
            return Err(CoreError::invalid(
                "eta",
                format!("TCD's gamma (eta) must be in [0, 1], not {gamma}"),
            ));
        }
        self.gamma = gamma;
        Ok(self)
    }

    /// The gamma of the scheduler.
    pub fn gamma(&self) -> f64 {
        self.gamma
    }
}

impl Scheduler for Tcd {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps
    }

    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        crate::schedule::check_steps(steps)?;
        let timesteps = match steps {
            Steps::Count(n) => distillation_timesteps(
                "TCD",
                self.schedule.num_train_timesteps,
                self.original_steps,
                *n,
            )?,
            Steps::Timesteps(ts) => {
                check_descending("timesteps", ts)?;
                if ts
                    .iter()
                    .any(|&t| t.round() >= self.schedule.num_train_timesteps as f64)
                {
                    return Err(CoreError::invalid(
                        "timesteps",
                        "must be below num_train_timesteps",
                    ));
                }
                ts.iter().map(|t| t.round()).collect()
            }
            Steps::Sigmas(_) => {
                return Err(CoreError::Unsupported(
                    "TCD walks timesteps: pass Steps::Count or Steps::Timesteps".into(),
                ));
            }
        };
        Ok(Box::new(TcdRun {
            scheduler: self.clone(),
            timesteps,
            begin: 0,
        }))
    }

    fn class_name(&self) -> &'static str {
        "TCDScheduler"
    }
}

/// One TCD run.
#[derive(Debug)]
struct TcdRun {
    scheduler: Tcd,
    timesteps: Vec<f64>,
    begin: usize,
}

impl TcdRun {
    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.scheduler.schedule.alpha_cumprod(t)
        } else {
            self.scheduler.final_alpha_cumprod
        }
    }
}

impl SchedulerRun for TcdRun {
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
        let gamma = self.scheduler.gamma;
        let t = self.timesteps[i] as i64;
        let last = i + 1 == self.timesteps.len();
        let prev_t = if last {
            0
        } else {
            self.timesteps[i + 1] as i64
        };
        // diffusers: floor((1 - eta) * prev_timestep) on a float32 tensor.
        let s = ((1.0 - gamma) as f32 * prev_t as f32).floor() as i64;
        let (a_t, a_prev, a_s) = (self.alpha(t), self.alpha(prev_t), self.alpha(s));
        let b_s = 1.0 - a_s;
        let (x0, eps) =
            crate::ddim::split_prediction(self.scheduler.prediction, model_output, sample, a_t);
        let noised = x0.clone() * a_s.sqrt() + eps * b_s.sqrt();
        let prev_sample = if gamma > 0.0 && !last {
            let n = noise.normal(noised.dims(), &noised.device())?;
            noised.clone() * (a_prev / a_s).sqrt() + n * (1.0 - a_prev / a_s).sqrt()
        } else {
            noised
        };
        Ok(StepOutput {
            prev_sample,
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
        let a = self.alpha(self.timesteps[i] as i64);
        Ok(original * a.sqrt() + noise * (1.0 - a).sqrt())
    }
}
