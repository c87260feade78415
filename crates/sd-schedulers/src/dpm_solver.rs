//! DPM-Solver++ (2M): Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of
//! Diffusion Probabilistic Models" (2022), following diffusers'
//! `DPMSolverMultistepScheduler` (`algorithm_type = "dpmsolver++"`).

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Scheduler, SchedulerRun, StepOutput, Steps};
use serde_json::Value;

use crate::config::{SchedulerConfig, unsupported};
use crate::ddim::spaced_int_timesteps;
use crate::schedule::{
    NoiseSchedule, PredictionType, TimestepSpacing, arange_down, check_count, check_descending,
    f32_round, interp_index, linspace, sigma_to_t,
};
use crate::sigmas::SigmaSchedule;

/// Which second-order update (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// diffusers' default.
    Midpoint,
    /// Heun-style correction.
    Heun,
}

/// The DPM++ multistep scheduler (order 1 or 2).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_min: bool,
    lambda_min_clipped: f64,
    sigmas: SigmaSchedule,
    /// `flow_shift` where the config walks flow-matching sigmas (`use_flow_sigmas`
    /// with `prediction_type: "flow_prediction"`, SD 3.x).
    flow_shift: Option<f64>,
}

impl DpmSolverMultistep {
    /// From a diffusers config (class defaults: linspace, order 2, midpoint,
    /// lower_order_final).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self, CoreError> {
        match c.algorithm_type.as_deref() {
            None | Some("dpmsolver++") => {}
            Some(o) => {
                return Err(unsupported(
                    "algorithm_type",
                    format!("`{o}` is not supported (only dpmsolver++)"),
                ));
            }
        }
        let solver_type = match c.solver_type.as_deref() {
            None | Some("midpoint") => SolverType::Midpoint,
            Some("heun") => SolverType::Heun,
            Some(o) => {
                return Err(unsupported(
                    "solver_type",
                    format!("`{o}` is not midpoint or heun"),
                ));
            }
        };
        let order = c.solver_order.unwrap_or(2);
        if !(1..=2).contains(&order) {
            return Err(unsupported(
                "solver_order",
                format!("{order}: only 1 and 2 are supported"),
            ));
        }
        let flow_shift = flow_shift(c)?;
        for (field, v) in [
            ("thresholding", c.thresholding),
            ("use_lu_lambdas", c.use_lu_lambdas),
            ("use_beta_sigmas", c.use_beta_sigmas),
            ("use_dynamic_shifting", c.use_dynamic_shifting),
        ] {
            if v == Some(true) {
                return Err(unsupported(field, "only `false` is supported"));
            }
        }
        if !matches!(c.variance_type, None | Some(Value::Null)) {
            return Err(unsupported("variance_type", "only `null` is supported"));
        }
        let lambda_min_clipped = match &c.lambda_min_clipped {
            None | Some(Value::Null) => f64::NEG_INFINITY,
            Some(Value::String(s)) if s == "-Infinity" => f64::NEG_INFINITY,
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NEG_INFINITY),
            Some(o) => {
                return Err(unsupported(
                    "lambda_min_clipped",
                    format!("`{o}` is not a number"),
                ));
            }
        };
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
        let sigmas = if c.use_karras_sigmas == Some(true) {
            SigmaSchedule::karras()
        } else if c.use_exponential_sigmas == Some(true) {
            SigmaSchedule::Exponential
        } else {
            SigmaSchedule::Model
        };
        let mut schedule = NoiseSchedule::from_config(c)?;
        schedule.fix_zero_terminal_snr(c);
        if flow_shift.is_some() && !matches!(sigmas, SigmaSchedule::Model) {
            return Err(unsupported(
                "use_flow_sigmas",
                "flow sigmas take no Karras or exponential conversion",
            ));
        }
        let prediction = match flow_shift {
            Some(_) => PredictionType::Sample, // unused: flow predictions convert in `step`
            None => PredictionType::from_config(c)?,
        };
        Ok(Self {
            schedule,
            prediction,
            flow_shift,
            spacing: TimestepSpacing::from_config(c, TimestepSpacing::Linspace)?,
            steps_offset: c.steps_offset.unwrap_or(0),
            order,
            solver_type,
            lower_order_final: c.lower_order_final.unwrap_or(true),
            euler_at_final: c.euler_at_final.unwrap_or(false),
            final_sigma_min,
            lambda_min_clipped,
            sigmas,
        })
    }

    /// Replaces the sigma schedule (Karras, exponential, Align Your Steps, custom).
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] for any schedule over flow sigmas.
    pub fn with_sigmas(mut self, sigmas: SigmaSchedule) -> Result<Self, CoreError> {
        if self.flow_shift.is_some() && sigmas != SigmaSchedule::Model {
            return Err(CoreError::Unsupported(
                "DPM++ on flow sigmas walks its own shifted schedule: no sigma schedule".into(),
            ));
        }
        self.sigmas = sigmas;
        Ok(self)
    }

    /// Whether it walks flow-matching sigmas (SD 3.x), and their shift.
    pub fn flow_shift(&self) -> Option<f64> {
        self.flow_shift
    }

    /// diffusers' flow sigmas: `1 - linspace(1, 1/T, n + 1)` shifted, descending,
    /// without the final 0; timesteps `sigma * T` truncated to integers.
    fn flow_timesteps_and_sigmas(
        &self,
        shift: f64,
        steps: &Steps,
    ) -> Result<(Vec<f64>, Vec<f64>), CoreError> {
        let t = self.schedule.num_train_timesteps;
        let Steps::Count(n) = steps else {
            return Err(CoreError::Unsupported(
                "DPM++ on flow sigmas takes a step count only".into(),
            ));
        };
        check_count(*n, t)?;
        let mut sig: Vec<f64> = linspace(1.0, 1.0 / t as f64, n + 1)
            .into_iter()
            .rev()
            .take(*n)
            .map(|a| {
                let s = 1.0 - a;
                shift * s / (1.0 + (shift - 1.0) * s)
            })
            .collect();
        let ts = sig.iter().map(|s| (s * t as f64).trunc()).collect();
        sig.push(if self.final_sigma_min {
            f64::from(self.schedule.train_sigmas()[0])
        } else {
            0.0
        });
        Ok((ts, sig.into_iter().map(f32_round).collect()))
    }

    fn timesteps_and_sigmas(&self, steps: &Steps) -> Result<(Vec<f64>, Vec<f64>), CoreError> {
        if let Some(shift) = self.flow_shift {
            return self.flow_timesteps_and_sigmas(shift, steps);
        }
        let t = self.schedule.num_train_timesteps;
        let train: Vec<f64> = self
            .schedule
            .train_sigmas()
            .into_iter()
            .map(f64::from)
            .collect();
        let log_sigmas = self.schedule.log_sigmas();
        let final_sigma = if self.final_sigma_min {
            f32_round(train[0])
        } else {
            0.0
        };
        let steps = match (steps, &self.sigmas) {
            (Steps::Count(n), SigmaSchedule::AlignYourSteps(p)) => {
                Steps::Timesteps(p.timesteps(*n))
            }
            (Steps::Count(_), SigmaSchedule::Custom(v)) => Steps::Sigmas(v.clone()),
            (s, _) => s.clone(),
        };
        let (ts, mut sig) = match &steps {
            Steps::Sigmas(s) => {
                check_descending("sigmas", s)?;
                let sig: Vec<f64> = s.iter().map(|&x| f32_round(x)).collect();
                let ts = sig[..sig.len() - 1]
                    .iter()
                    .map(|&x| sigma_to_t(x, &log_sigmas).round_ties_even())
                    .collect();
                return Ok((ts, sig));
            }
            Steps::Timesteps(v) => {
                check_descending("timesteps", v)?;
                let ts: Vec<f64> = v.iter().map(|x| x.trunc()).collect();
                if ts.iter().any(|&x| x < 0.0 || x > (t - 1) as f64) {
                    return Err(CoreError::InvalidArgument {
                        name: "timesteps",
                        message: format!("must lie in [0, {}]", t - 1),
                    });
                }
                let sig = ts.iter().map(|&x| interp_index(x, &train)).collect();
                (ts, sig)
            }
            Steps::Count(n) => {
                let n = *n;
                check_count(n, t)?;
                // lambda_t = log(alpha_t) - log(sigma_t); drop the clipped tail.
                let clipped = self
                    .schedule
                    .alphas_cumprod
                    .iter()
                    .map(|&a| 0.5 * (a as f64).ln() - 0.5 * (1.0 - a as f64).ln())
                    .filter(|&l| l < self.lambda_min_clipped)
                    .count();
                let last = t - clipped;
                let ts: Vec<f64> = match self.spacing {
                    TimestepSpacing::Linspace => linspace(0.0, (last - 1) as f64, n + 1)
                        .into_iter()
                        .rev()
                        .take(n)
                        .map(|x| x.round_ties_even())
                        .collect(),
                    TimestepSpacing::Leading => {
                        let ratio = last / (n + 1);
                        (1..=n)
                            .rev()
                            .map(|i| (i * ratio + self.steps_offset) as f64)
                            .collect()
                    }
                    TimestepSpacing::Trailing => arange_down(last as f64, t as f64 / n as f64)
                        .into_iter()
                        .map(|x| x.round_ties_even() - 1.0)
                        .collect(),
                };
                let _ = spaced_int_timesteps;
                match &self.sigmas {
                    SigmaSchedule::Model => {
                        let sig = ts.iter().map(|&x| interp_index(x, &train)).collect();
                        (ts, sig)
                    }
                    other => {
                        let flipped: Vec<f64> = train.iter().rev().cloned().collect();
                        let sig = other.convert(&flipped, n, None, None)?;
                        let round = matches!(other, SigmaSchedule::Karras { .. });
                        let ts = sig
                            .iter()
                            .map(|&s| {
                                let t = sigma_to_t(s, &log_sigmas);
                                if round {
                                    t.round_ties_even()
                                } else {
                                    t.trunc()
                                }
                            })
                            .collect();
                        (ts, sig)
                    }
                }
            }
        };
        sig.push(final_sigma);
        Ok((ts, sig.into_iter().map(f32_round).collect()))
    }
}

struct DpmRun {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: PredictionType,
    order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    flow: bool,
    model_outputs: Vec<Tensor<4>>,
    lower_order_nums: usize,
    begin: usize,
}

impl Scheduler for DpmSolverMultistep {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps
    }

    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        crate::schedule::check_steps(steps)?;
        let (timesteps, sigmas) = self.timesteps_and_sigmas(steps)?;
        Ok(Box::new(DpmRun {
            timesteps,
            sigmas,
            prediction: self.prediction,
            order: self.order,
            solver_type: self.solver_type,
            lower_order_final: self.lower_order_final,
            euler_at_final: self.euler_at_final,
            final_sigma_zero: !self.final_sigma_min,
            flow: self.flow_shift.is_some(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            begin: 0,
        }))
    }

    fn class_name(&self) -> &'static str {
        "DPMSolverMultistepScheduler"
    }
}

/// `(alpha_t, sigma_t)` at noise level `sigma`: of the VP process at a k-diffusion
/// sigma, or `(1 - sigma, sigma)` on flow sigmas.
fn alpha_sigma(sigma: f64, flow: bool) -> (f64, f64) {
    if flow {
        return (1.0 - sigma, sigma);
    }
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

fn lambda(sigma: f64, flow: bool) -> f64 {
    let (a, s) = alpha_sigma(sigma, flow);
    a.ln() - s.ln()
}

/// `flow_shift` where the config asks for flow sigmas; flow sigmas and flow
/// predictions only together.
fn flow_shift(c: &SchedulerConfig) -> Result<Option<f64>, CoreError> {
    let flow_prediction = c.prediction_type.as_deref() == Some("flow_prediction");
    match (c.use_flow_sigmas == Some(true), flow_prediction) {
        (false, false) => Ok(None),
        (true, true) => {
            let shift = c.flow_shift.unwrap_or(1.0);
            if !(shift.is_finite() && shift > 0.0) {
                return Err(unsupported("flow_shift", format!("{shift} is not > 0")));
            }
            Ok(Some(shift))
        }
        _ => Err(unsupported(
            "use_flow_sigmas",
            "flow sigmas go with prediction_type `flow_prediction` (and only with it)",
        )),
    }
}

impl SchedulerRun for DpmRun {
    crate::schedule::run_skeleton!();

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
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
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;
        let sigma_s0 = self.sigmas[i];
        let flow = self.flow;
        let (alpha_s0, sig_s0) = alpha_sigma(sigma_s0, flow);
        let x0 = match self.prediction {
            _ if flow => sample.clone() - model_output * sigma_s0,
            PredictionType::Epsilon => (sample.clone() - model_output * sig_s0) / alpha_s0,
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => sample.clone() * alpha_s0 - model_output * sig_s0,
        };
        self.model_outputs.push(x0.clone());
        if self.model_outputs.len() > self.order {
            self.model_outputs.remove(0);
        }
        let sigma_t = self.sigmas[i + 1];
        let (alpha_t, sig_t) = alpha_sigma(sigma_t, flow);
        let h = lambda(sigma_t, flow) - lambda(sigma_s0, flow);
        let phi = alpha_t * ((-h).exp() - 1.0);
        let first = self.order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = if first {
            sample * (sig_t / sig_s0) - x0.clone() * phi
        } else {
            let _ = lower_order_second;
            let m0 = x0.clone();
            let m1 = self.model_outputs[self.model_outputs.len() - 2].clone();
            let sigma_s1 = self.sigmas[i - 1];
            let h0 = lambda(sigma_s0, flow) - lambda(sigma_s1, flow);
            let r0 = h0 / h;
            let d1 = (m0.clone() - m1) * (1.0 / r0);
            match self.solver_type {
                SolverType::Midpoint => sample * (sig_t / sig_s0) - m0 * phi - d1 * (0.5 * phi),
                SolverType::Heun => {
                    sample * (sig_t / sig_s0) - m0 * phi
                        + d1 * (alpha_t * (((-h).exp() - 1.0) / h + 1.0))
                }
            }
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
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
        let (a, s) = alpha_sigma(self.sigmas[i], self.flow);
        Ok(original * a + noise * s)
    }
}
