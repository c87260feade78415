//! PNDM / PLMS: Liu et al., "Pseudo Numerical Methods for Diffusion Models on
//! Manifolds" (2022), following diffusers' `PNDMScheduler` with `skip_prk_steps`
//! (the linear multistep part only, as Stable Diffusion uses it).

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Scheduler, SchedulerRun, StepOutput, Steps};

use crate::config::{SchedulerConfig, unsupported};
use crate::schedule::{NoiseSchedule, PredictionType, TimestepSpacing, check_count};

/// The PLMS scheduler. A run of `N` steps calls the model `N + 1` times (its second
/// timestep repeats).
#[derive(Debug, Clone)]
pub struct Pndm {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    final_alpha_cumprod: f64,
}

impl Pndm {
    /// From a diffusers scheduler config (class defaults: leading spacing).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self, CoreError> {
        if c.skip_prk_steps == Some(false) {
            return Err(unsupported(
                "skip_prk_steps",
                "only PLMS (`skip_prk_steps: true`) is supported, as Stable Diffusion uses it",
            ));
        }
        let prediction = PredictionType::from_config(c)?;
        if prediction == PredictionType::Sample {
            return Err(unsupported(
                "prediction_type",
                "PNDM supports epsilon and v_prediction",
            ));
        }
        let schedule = NoiseSchedule::from_config(c)?;
        let final_alpha_cumprod = schedule.final_alpha_cumprod(c);
        Ok(Self {
            prediction,
            spacing: TimestepSpacing::from_config(c, TimestepSpacing::Leading)?,
            steps_offset: c.steps_offset.unwrap_or(0),
            final_alpha_cumprod,
            schedule,
        })
    }
}

struct PndmRun {
    timesteps: Vec<f64>,
    schedule: NoiseSchedule,
    prediction: PredictionType,
    final_alpha_cumprod: f64,
    ratio: i64,
    ets: Vec<Tensor<4>>,
    counter: usize,
    cur_sample: Option<Tensor<4>>,
    begin: usize,
}

impl Scheduler for Pndm {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps
    }

    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        crate::schedule::check_steps(steps)?;
        let t = self.schedule.num_train_timesteps;
        let Steps::Count(n) = steps else {
            return Err(CoreError::Unsupported(
                "PNDM takes a step count; use DDIM, Euler or DPM++ for explicit timesteps or sigmas".into(),
            ));
        };
        let n = *n;
        check_count(n, t)?;
        // Ascending `_timesteps` as diffusers builds them.
        let asc: Vec<f64> = match self.spacing {
            TimestepSpacing::Leading => (0..n)
                .map(|i| (i * (t / n) + self.steps_offset) as f64)
                .collect(),
            TimestepSpacing::Linspace => crate::schedule::linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .map(|x| x.round_ties_even())
                .collect(),
            TimestepSpacing::Trailing => {
                let mut v: Vec<f64> = crate::schedule::arange_down(t as f64, t as f64 / n as f64)
                    .into_iter()
                    .map(|x| x.round_ties_even() - 1.0)
                    .collect();
                v.reverse();
                v
            }
        };
        // plms: [_t[:-1], _t[-2:-1], _t[-1:]] reversed.
        let mut plms = asc[..n - 1].to_vec();
        if n >= 2 {
            plms.push(asc[n - 2]);
        }
        plms.push(asc[n - 1]);
        plms.reverse();
        Ok(Box::new(PndmRun {
            timesteps: plms,
            schedule: self.schedule.clone(),
            prediction: self.prediction,
            final_alpha_cumprod: self.final_alpha_cumprod,
            ratio: (t / n) as i64,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
            begin: 0,
        }))
    }

    fn class_name(&self) -> &'static str {
        "PNDMScheduler"
    }
}

impl PndmRun {
    fn alpha(&self, t: i64) -> f64 {
        if t >= 0 {
            self.schedule.alpha_cumprod(t)
        } else {
            self.final_alpha_cumprod
        }
    }

    fn prev_sample(
        &self,
        sample: Tensor<4>,
        t: i64,
        prev_t: i64,
        model_output: Tensor<4>,
    ) -> Tensor<4> {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev_t);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let model_output = match self.prediction {
            PredictionType::VPrediction => model_output * a_t.sqrt() + sample.clone() * b_t.sqrt(),
            _ => model_output,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        sample * sample_coeff - model_output * ((a_prev - a_t) / denom)
    }
}

impl SchedulerRun for PndmRun {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput, CoreError> {
        sd_core::check_step_inputs(i, self.timesteps.len(), &model_output, &sample)?;
        let mut t = self.timesteps[i] as i64;
        let mut prev_t = t - self.ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let (model_output, sample) = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            (model_output, sample)
        } else if n == 1 && self.counter == 1 {
            let cur = self.cur_sample.take().unwrap_or(sample);
            ((model_output + e[0].clone()) / 2.0, cur)
        } else if n == 2 {
            ((e[1].clone() * 3.0 - e[0].clone()) / 2.0, sample)
        } else if n == 3 {
            (
                (e[2].clone() * 23.0 - e[1].clone() * 16.0 + e[0].clone() * 5.0) / 12.0,
                sample,
            )
        } else {
            (
                (e[n - 1].clone() * 55.0 - e[n - 2].clone() * 59.0 + e[n - 3].clone() * 37.0
                    - e[n - 4].clone() * 9.0)
                    / 24.0,
                sample,
            )
        };
        let prev = self.prev_sample(sample, t, prev_t, model_output);
        self.counter += 1;
        Ok(StepOutput {
            prev_sample: prev,
            pred_original_sample: None,
        })
    }

    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        i: usize,
    ) -> Result<Tensor<4>, CoreError> {
        sd_core::check_step_inputs(i, self.timesteps.len(), &original, &noise)?;
        let a = self.schedule.alpha_cumprod(self.timesteps[i] as i64);
        Ok(original * a.sqrt() + noise * (1.0 - a).sqrt())
    }
}
