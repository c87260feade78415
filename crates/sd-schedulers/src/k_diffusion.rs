//! Schedulers on the sigma parameterisation of Karras et al. (2022): Euler, Euler
//! ancestral and LMS, following diffusers' `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler` and `LMSDiscreteScheduler`.

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Scheduler, SchedulerRun, StepOutput, Steps};

use crate::config::{SchedulerConfig, unsupported};
use crate::schedule::{
    NoiseSchedule, PredictionType, TimestepSpacing, arange_down, check_count, check_descending,
    f32_round, interp_index, linspace, sigma_to_t,
};
use crate::sigmas::SigmaSchedule;

/// Settings shared by the sigma-based schedulers.
#[derive(Debug, Clone)]
pub(crate) struct SigmaBase {
    pub schedule: NoiseSchedule,
    pub prediction: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub sigmas: SigmaSchedule,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigma_min: bool,
}

impl SigmaBase {
    pub fn from_config(
        c: &SchedulerConfig,
        karras_allowed: bool,
        zero_snr_fix: bool,
    ) -> Result<Self, CoreError> {
        let mut schedule = NoiseSchedule::from_config(c)?;
        if zero_snr_fix {
            schedule.fix_zero_terminal_snr(c);
        }
        let mut sigmas = SigmaSchedule::Model;
        if karras_allowed {
            if c.use_beta_sigmas == Some(true) {
                return Err(unsupported(
                    "use_beta_sigmas",
                    "beta sigmas are not supported",
                ));
            }
            if c.use_karras_sigmas == Some(true) {
                sigmas = SigmaSchedule::karras();
            } else if c.use_exponential_sigmas == Some(true) {
                sigmas = SigmaSchedule::Exponential;
            }
        }
        let final_sigma_min = match c.final_sigmas_type.as_deref() {
            None | Some("zero") => false,
            Some("sigma_min") => true,
            Some(o) => {
                return Err(unsupported(
                    "final_sigmas_type",
                    format!("`{o}` is not zero or sigma_min"),
                ));
            }
        };
        Ok(Self {
            prediction: PredictionType::from_config(c)?,
            spacing: TimestepSpacing::from_config(c, TimestepSpacing::Linspace)?,
            steps_offset: c.steps_offset.unwrap_or(0),
            sigmas,
            sigma_min: c.sigma_min,
            sigma_max: c.sigma_max,
            final_sigma_min,
            schedule,
        })
    }

    fn final_sigma(&self) -> f64 {
        if self.final_sigma_min {
            let a = self.schedule.alphas_cumprod[0];
            f32_round((((1.0 - a) / a) as f64).sqrt())
        } else {
            0.0
        }
    }

    /// Float timesteps and `n + 1` sigmas for a run, as diffusers' Euler computes them.
    pub fn timesteps_and_sigmas(&self, steps: &Steps) -> Result<(Vec<f64>, Vec<f64>), CoreError> {
        let t = self.schedule.num_train_timesteps;
        let log_sigmas = self.schedule.log_sigmas();
        let train: Vec<f64> = self
            .schedule
            .train_sigmas()
            .into_iter()
            .map(f64::from)
            .collect();
        let from_sigmas = |s: &[f64]| -> Result<(Vec<f64>, Vec<f64>), CoreError> {
            check_descending("sigmas", s)?;
            if s.len() < 2 {
                return Err(CoreError::InvalidArgument {
                    name: "sigmas",
                    message: "need at least two sigmas (one step and the final sigma)".into(),
                });
            }
            let sig: Vec<f64> = s.iter().map(|&x| f32_round(x)).collect();
            let ts = sig[..sig.len() - 1]
                .iter()
                .map(|&x| f32_round(sigma_to_t(x, &log_sigmas)))
                .collect();
            Ok((ts, sig))
        };
        let steps = match (steps, &self.sigmas) {
            (Steps::Count(n), SigmaSchedule::AlignYourSteps(p)) => Steps::Sigmas(p.sigmas(*n)),
            (Steps::Count(_), SigmaSchedule::Custom(v)) => Steps::Sigmas(v.clone()),
            (s, _) => s.clone(),
        };
        match &steps {
            Steps::Sigmas(s) => from_sigmas(s),
            Steps::Timesteps(ts) => {
                check_descending("timesteps", ts)?;
                let ts: Vec<f64> = ts.iter().map(|&x| f32_round(x)).collect();
                if ts.iter().any(|&x| x < 0.0 || x > (t - 1) as f64) {
                    return Err(CoreError::InvalidArgument {
                        name: "timesteps",
                        message: format!("must lie in [0, {}]", t - 1),
                    });
                }
                let mut sig: Vec<f64> = ts
                    .iter()
                    .map(|&x| f32_round(interp_index(x, &train)))
                    .collect();
                sig.push(self.final_sigma());
                Ok((ts, sig))
            }
            Steps::Count(n) => {
                let n = *n;
                check_count(n, t)?;
                let ts: Vec<f64> = match self.spacing {
                    TimestepSpacing::Linspace => linspace(0.0, (t - 1) as f64, n)
                        .into_iter()
                        .rev()
                        .map(f32_round)
                        .collect(),
                    TimestepSpacing::Leading => (0..n)
                        .rev()
                        .map(|i| (i * (t / n)) as f64 + self.steps_offset as f64)
                        .collect(),
                    TimestepSpacing::Trailing => arange_down(t as f64, t as f64 / n as f64)
                        .into_iter()
                        .map(|x| x.round_ties_even() - 1.0)
                        .collect(),
                };
                let model: Vec<f64> = ts.iter().map(|&x| interp_index(x, &train)).collect();
                let (ts, mut sig) = match &self.sigmas {
                    SigmaSchedule::Model => (ts, model),
                    other => {
                        let sig = other.convert(&model, n, self.sigma_min, self.sigma_max)?;
                        let ts = sig
                            .iter()
                            .map(|&s| f32_round(sigma_to_t(s, &log_sigmas)))
                            .collect();
                        (ts, sig)
                    }
                };
                sig.push(self.final_sigma());
                Ok((ts, sig.into_iter().map(f32_round).collect()))
            }
        }
    }

    pub fn init_noise_sigma(&self, sigmas: &[f64]) -> f64 {
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }
}

/// Predicted x0 from a model output at noise level `sigma` (k-diffusion form).
pub(crate) fn k_pred_x0(
    prediction: PredictionType,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    sigma: f64,
) -> Tensor<4> {
    match prediction {
        PredictionType::Epsilon => sample - model_output * sigma,
        PredictionType::VPrediction => {
            model_output * (-sigma / (sigma * sigma + 1.0).sqrt()) + sample / (sigma * sigma + 1.0)
        }
        PredictionType::Sample => model_output,
    }
}

/// Which update rule a [`KDiffusion`] scheduler uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KMethod {
    /// Euler (Karras et al. 2022, Algorithm 2 without churn).
    Euler,
    /// Euler ancestral: an Euler step to `sigma_down` plus fresh noise of `sigma_up`.
    EulerAncestral,
    /// Linear multistep of order 4 (k-diffusion's `sample_lms`).
    Lms,
}

/// Euler, Euler ancestral or LMS.
#[derive(Debug, Clone)]
pub struct KDiffusion {
    base: SigmaBase,
    method: KMethod,
}

impl KDiffusion {
    /// Whether this is Euler ancestral (which adds fresh noise every step).
    pub fn is_ancestral(&self) -> bool {
        self.method == KMethod::EulerAncestral
    }

    /// From a diffusers config; `method` picks the class.
    pub fn from_config(c: &SchedulerConfig, method: KMethod) -> Result<Self, CoreError> {
        if let Some(t) = c.interpolation_type.as_deref()
            && t != "linear"
            && method == KMethod::Euler
        {
            return Err(unsupported(
                "interpolation_type",
                format!("`{t}` is not supported (only linear)"),
            ));
        }
        if let Some(t) = c.timestep_type.as_deref()
            && t != "discrete"
            && method == KMethod::Euler
        {
            return Err(unsupported(
                "timestep_type",
                format!("`{t}` is not supported (only discrete)"),
            ));
        }
        Ok(Self {
            base: SigmaBase::from_config(
                c,
                method != KMethod::EulerAncestral,
                method != KMethod::Lms,
            )?,
            method,
        })
    }

    /// Replaces the sigma schedule (Karras, exponential, Align Your Steps, custom).
    pub fn with_sigmas(mut self, sigmas: SigmaSchedule) -> Self {
        self.base.sigmas = sigmas;
        self
    }

    /// The update rule.
    pub fn method(&self) -> KMethod {
        self.method
    }
}

struct KRun {
    method: KMethod,
    prediction: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    derivatives: Vec<Tensor<4>>,
    begin: usize,
}

impl Scheduler for KDiffusion {
    fn num_train_timesteps(&self) -> usize {
        self.base.schedule.num_train_timesteps
    }

    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        crate::schedule::check_steps(steps)?;
        let (timesteps, sigmas) = self.base.timesteps_and_sigmas(steps)?;
        Ok(Box::new(KRun {
            method: self.method,
            prediction: self.base.prediction,
            init_noise_sigma: self.base.init_noise_sigma(&sigmas),
            timesteps,
            sigmas,
            derivatives: Vec::new(),
            begin: 0,
        }))
    }

    fn class_name(&self) -> &'static str {
        match self.method {
            KMethod::Euler => "EulerDiscreteScheduler",
            KMethod::EulerAncestral => "EulerAncestralDiscreteScheduler",
            KMethod::Lms => "LMSDiscreteScheduler",
        }
    }
}

/// k-diffusion's LMS coefficient: the integral over `[sigmas[t], sigmas[t + 1]]` of the
/// Lagrange basis polynomial `current` on the last `order` sigmas (exact Gauss-Legendre).
fn lms_coefficient(sigmas: &[f64], order: usize, t: usize, current: usize) -> f64 {
    let basis = |tau: f64| {
        let mut prod = 1.0;
        for k in 0..order {
            if k == current {
                continue;
            }
            prod *= (tau - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k]);
        }
        prod
    };
    const NODES: [f64; 5] = [
        0.0,
        -0.538_469_310_105_683_1,
        0.538_469_310_105_683_1,
        -0.906_179_845_938_664,
        0.906_179_845_938_664,
    ];
    const WEIGHTS: [f64; 5] = [
        0.568_888_888_888_888_9,
        0.478_628_670_499_366_5,
        0.478_628_670_499_366_5,
        0.236_926_885_056_189_1,
        0.236_926_885_056_189_1,
    ];
    let (a, b) = (sigmas[t], sigmas[t + 1]);
    let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
    NODES
        .iter()
        .zip(WEIGHTS)
        .map(|(x, w)| w * basis(mid + half * x))
        .sum::<f64>()
        * half
}

impl SchedulerRun for KRun {
    crate::schedule::run_skeleton!();

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Result<Tensor<4>, CoreError> {
        CoreError::check_step(i, self.timesteps.len())?;
        let s = self.sigmas[i];
        Ok(sample / (s * s + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput, CoreError> {
        sd_core::check_step_inputs(i, self.timesteps.len(), &model_output, &sample)?;
        let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
        let shape = model_output.dims();
        let device = model_output.device();
        let x0 = k_pred_x0(self.prediction, model_output, sample.clone(), sigma);
        let derivative = (sample.clone() - x0.clone()) / sigma;
        let prev = match self.method {
            KMethod::Euler => sample + derivative * (sigma_next - sigma),
            KMethod::EulerAncestral => {
                let up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
                    / (sigma * sigma))
                    .sqrt();
                let down = (sigma_next * sigma_next - up * up).max(0.0).sqrt();
                let prev = sample + derivative * (down - sigma);
                prev + noise.normal(shape, &device)? * up
            }
            KMethod::Lms => {
                self.derivatives.push(derivative);
                if self.derivatives.len() > 4 {
                    self.derivatives.remove(0);
                }
                let order = (i + 1).min(4); // as diffusers, also after `skip_to`
                let mut prev = sample;
                for (k, d) in self.derivatives.iter().rev().take(order).enumerate() {
                    prev = prev + d.clone() * lms_coefficient(&self.sigmas, order, i, k);
                }
                prev
            }
        };
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
        Ok(original + noise * self.sigmas[i])
    }
}
