//! Flow matching (rectified flow, SD 3 / SD 3.5): diffusers'
//! `FlowMatchEulerDiscreteScheduler` and `FlowMatchHeunDiscreteScheduler`.
//!
//! The model predicts the velocity `v = noise - x0` at noise level `sigma` in [0, 1],
//! where the latents are `x = sigma * noise + (1 - sigma) * x0`; a step moves the
//! latents along it, `x' = x + (sigma' - sigma) * v`. The run starts from unscaled
//! noise and feeds the latents to the model unscaled (`init_noise_sigma` 1, identity
//! `scale_model_input`); the model's timestep is `sigma * T`.
//!
//! diffusers' schedule, reproduced in its precision: the training sigmas
//! `linspace(1, T, T) / T` are shifted (`shift * s / (1 + (shift - 1) * s)`) in f32
//! at construction, `set_timesteps(N)` spaces `linspace(sigma_max * T, sigma_min * T, N)`
//! between the *shifted* extremes in f64 and shifts again (so the smallest sigma is
//! shifted twice), then optionally stretches to `shift_terminal`, converts to Karras or
//! exponential spacing, casts to f32 and appends 0 (or 1 with `invert_sigmas`).

use burn::prelude::*;
use sd_core::{CoreError, NoiseSource, Scheduler, SchedulerRun, StepOutput, Steps};

use crate::config::{SchedulerConfig, unsupported};
use crate::schedule::{check_count, f32_round, linspace};
use crate::sigmas::SigmaSchedule;

/// How dynamic shifting maps `mu` onto the sigmas (`time_shift_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeShift {
    /// `e^mu / (e^mu + (1 / s - 1))` (diffusers' default).
    Exponential,
    /// `mu / (mu + (1 / s - 1))`.
    Linear,
}

/// Which flow-matching update a [`FlowMatch`] scheduler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowMethod {
    /// `FlowMatchEulerDiscreteScheduler`: one model call per step.
    Euler,
    /// `FlowMatchHeunDiscreteScheduler`: Heun's second-order correction, two model
    /// calls per step but the last (the run's timesteps repeat each but the first).
    Heun,
}

/// A flow-matching scheduler built from a `FlowMatch*` scheduler config.
#[derive(Debug, Clone)]
pub struct FlowMatch {
    method: FlowMethod,
    num_train_timesteps: usize,
    shift: f64,
    dynamic: Option<DynamicShift>,
    mu: Option<f64>,
    shift_terminal: Option<f64>,
    invert_sigmas: bool,
    stochastic: bool,
    sigmas: SigmaSchedule,
    /// The shifted training sigmas' extremes (`sigma_max`, `sigma_min`), f32.
    sigma_range: (f64, f64),
}

/// Resolution-dependent shifting (`use_dynamic_shifting`): `mu` from the image's
/// sequence length, interpolated between two anchors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DynamicShift {
    /// `base_shift` (0.5): `mu` at `base_image_seq_len`.
    pub base_shift: f64,
    /// `max_shift` (1.15): `mu` at `max_image_seq_len`.
    pub max_shift: f64,
    /// `base_image_seq_len` (256).
    pub base_image_seq_len: usize,
    /// `max_image_seq_len` (4096).
    pub max_image_seq_len: usize,
    /// `time_shift_type`.
    pub time_shift: TimeShift,
}

impl DynamicShift {
    /// The SD 3 pipeline's `calculate_shift`: `mu` for an image of `seq_len` latent
    /// patches (`(h / 16) * (w / 16)` pixels for SD 3), linear through the anchors.
    pub fn mu(&self, seq_len: usize) -> f64 {
        let m = (self.max_shift - self.base_shift)
            / (self.max_image_seq_len as f64 - self.base_image_seq_len as f64);
        let b = self.base_shift - m * self.base_image_seq_len as f64;
        seq_len as f64 * m + b
    }
}

impl FlowMatch {
    /// From a diffusers config (class defaults: shift 1, no dynamic shifting).
    ///
    /// # Errors
    /// Config values the class cannot honour (beta sigmas, two sigma conversions at
    /// once, a shift or `shift_terminal` outside its range, an unknown
    /// `time_shift_type`); Heun with options its diffusers class does not read.
    pub fn from_config(c: &SchedulerConfig, method: FlowMethod) -> Result<Self, CoreError> {
        let t = c.num_train_timesteps.unwrap_or(1000);
        if !(2..=crate::schedule::MAX_TRAIN_TIMESTEPS).contains(&t) {
            return Err(unsupported(
                "num_train_timesteps",
                format!(
                    "{t} is outside 2..={}",
                    crate::schedule::MAX_TRAIN_TIMESTEPS
                ),
            ));
        }
        let shift = c.shift.unwrap_or(1.0);
        if !(shift.is_finite() && shift > 0.0) {
            return Err(unsupported("shift", format!("{shift} is not > 0")));
        }
        let dynamic = match (method, c.use_dynamic_shifting == Some(true)) {
            (FlowMethod::Euler, true) => Some(dynamic_shift(c)?),
            _ => None,
        };
        let sigmas = match method {
            FlowMethod::Heun => SigmaSchedule::Model,
            FlowMethod::Euler => sigma_schedule(c)?,
        };
        let shift_terminal = match (method, c.shift_terminal) {
            (FlowMethod::Euler, Some(s)) if s != 0.0 => {
                if !(0.0..1.0).contains(&s) {
                    return Err(unsupported(
                        "shift_terminal",
                        format!("{s} is outside (0, 1)"),
                    ));
                }
                Some(s)
            }
            _ => None,
        };
        let euler = method == FlowMethod::Euler;
        Ok(Self {
            method,
            num_train_timesteps: t,
            shift,
            sigma_range: training_sigma_range(t, shift, dynamic.is_none()),
            dynamic,
            mu: None,
            shift_terminal,
            invert_sigmas: euler && c.invert_sigmas == Some(true),
            stochastic: euler && c.stochastic_sampling == Some(true),
            sigmas,
        })
    }

    /// The shift (`shift`, 3.0 for SD 3.5).
    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// The dynamic shifting settings, where the config turns it on.
    pub fn dynamic_shift(&self) -> Option<&DynamicShift> {
        self.dynamic.as_ref()
    }

    /// Sets `mu` of dynamic shifting (diffusers' `set_timesteps(mu=...)`).
    pub fn with_mu(mut self, mu: f64) -> Self {
        self.mu = Some(mu);
        self
    }

    /// Sets `mu` for an image of `seq_len` latent patches where the config shifts
    /// dynamically (as the SD 3 pipeline does); a fixed-shift scheduler is unchanged.
    pub fn with_image_seq_len(self, seq_len: usize) -> Self {
        match self.dynamic {
            Some(d) => self.with_mu(d.mu(seq_len)),
            None => self,
        }
    }

    /// Replaces the sigma conversion (Karras or exponential spacing of the shifted
    /// sigmas; Align Your Steps tables are for SD 1.x / XL and are refused).
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] for Align Your Steps, or any schedule on Heun.
    pub fn with_sigmas(mut self, sigmas: SigmaSchedule) -> Result<Self, CoreError> {
        match (&sigmas, self.method) {
            (SigmaSchedule::Model, _) => {}
            (SigmaSchedule::AlignYourSteps(_), _) => {
                return Err(CoreError::Unsupported(
                    "Align Your Steps tables are SD 1.x / SDXL noise levels, not flow sigmas"
                        .into(),
                ));
            }
            (_, FlowMethod::Heun) => {
                return Err(CoreError::Unsupported(
                    "FlowMatchHeunDiscreteScheduler takes no sigma schedule".into(),
                ));
            }
            _ => {}
        }
        self.sigmas = sigmas;
        Ok(self)
    }

    /// The update rule.
    pub fn method(&self) -> FlowMethod {
        self.method
    }

    /// `shift * s / (1 + (shift - 1) * s)`, or the dynamic time shift with `mu`.
    fn shift_sigmas(&self, sigmas: Vec<f64>, single: bool) -> Result<Vec<f64>, CoreError> {
        let r = |x: f64| if single { f32_round(x) } else { x };
        match &self.dynamic {
            None => Ok(sigmas
                .into_iter()
                .map(|s| r(r(self.shift * s) / r(1.0 + r((self.shift - 1.0) * s))))
                .collect()),
            Some(d) => {
                let mu = self.mu.ok_or_else(|| {
                    CoreError::invalid(
                        "mu",
                        "this scheduler shifts dynamically (use_dynamic_shifting): give the \
                         image size (with_image_seq_len) or mu",
                    )
                })?;
                let m = match d.time_shift {
                    TimeShift::Exponential => mu.exp(),
                    TimeShift::Linear => mu,
                };
                Ok(sigmas
                    .into_iter()
                    .map(|s| r(m / r(m + r(r(1.0 / s) - 1.0))))
                    .collect())
            }
        }
    }

    /// The run's `n` sigmas before the final one, and its timesteps where given.
    fn run_sigmas(&self, steps: &Steps) -> Result<(Vec<f64>, Option<Vec<f64>>), CoreError> {
        let t = self.num_train_timesteps as f64;
        let (sigmas, given, single) = match steps {
            Steps::Count(n) => {
                check_count(*n, self.num_train_timesteps)?;
                let (max, min) = self.sigma_range;
                let ts = linspace(max * t, min * t, *n);
                (ts.into_iter().map(|x| x / t).collect(), None, false)
            }
            Steps::Sigmas(s) => {
                check_unit("sigmas", s)?;
                let s: Vec<f64> = s.iter().map(|&x| f32_round(x)).collect();
                (s, None, true)
            }
            Steps::Timesteps(ts) => {
                let ts: Vec<f64> = ts.iter().map(|&x| f32_round(x)).collect();
                check_unit("timesteps", &ts.iter().map(|x| x / t).collect::<Vec<_>>())?;
                let sig = ts.iter().map(|&x| f32_round(x / t)).collect();
                (sig, Some(ts), true)
            }
        };
        let n = sigmas.len();
        let mut sigmas = self.shift_sigmas(sigmas, single)?;
        if let Some(terminal) = self.shift_terminal {
            let r = |x: f64| if single { f32_round(x) } else { x };
            let scale = r(r(1.0 - sigmas[n - 1]) / r(1.0 - terminal));
            sigmas = sigmas
                .into_iter()
                .map(|s| r(1.0 - r(r(1.0 - s) / scale)))
                .collect();
        }
        if !matches!(self.sigmas, SigmaSchedule::Model) {
            sigmas = self.sigmas.convert(&sigmas, n, None, None)?;
        }
        Ok((sigmas.into_iter().map(f32_round).collect(), given))
    }
}

/// The dynamic-shift settings of a config, checked.
fn dynamic_shift(c: &SchedulerConfig) -> Result<DynamicShift, CoreError> {
    let time_shift = match c.time_shift_type.as_deref() {
        None | Some("exponential") => TimeShift::Exponential,
        Some("linear") => TimeShift::Linear,
        Some(o) => {
            return Err(unsupported(
                "time_shift_type",
                format!("`{o}` is not exponential or linear"),
            ));
        }
    };
    let d = DynamicShift {
        base_shift: c.base_shift.unwrap_or(0.5),
        max_shift: c.max_shift.unwrap_or(1.15),
        base_image_seq_len: c.base_image_seq_len.unwrap_or(256),
        max_image_seq_len: c.max_image_seq_len.unwrap_or(4096),
        time_shift,
    };
    if d.base_image_seq_len == d.max_image_seq_len
        || !(d.base_shift.is_finite() && d.max_shift.is_finite())
    {
        return Err(unsupported(
            "base_image_seq_len",
            "dynamic shifting needs two different sequence lengths and finite shifts",
        ));
    }
    Ok(d)
}

/// Karras / exponential / none; beta sigmas are refused, and two at once as diffusers.
fn sigma_schedule(c: &SchedulerConfig) -> Result<SigmaSchedule, CoreError> {
    if c.use_beta_sigmas == Some(true) {
        return Err(unsupported(
            "use_beta_sigmas",
            "beta sigmas are not supported",
        ));
    }
    match (
        c.use_karras_sigmas == Some(true),
        c.use_exponential_sigmas == Some(true),
    ) {
        (true, true) => Err(unsupported(
            "use_karras_sigmas",
            "only one of use_karras_sigmas and use_exponential_sigmas can be used",
        )),
        (true, false) => Ok(SigmaSchedule::karras()),
        (false, true) => Ok(SigmaSchedule::Exponential),
        (false, false) => Ok(SigmaSchedule::Model),
    }
}

/// `(sigma_max, sigma_min)` of the training sigmas `linspace(1, T, T) / T` (shifted
/// in f32 where the shift is fixed), as `__init__` computes them.
fn training_sigma_range(t: usize, shift: f64, shifted: bool) -> (f64, f64) {
    let f = |s: f32| -> f64 {
        if !shifted {
            return s as f64;
        }
        let shift = shift as f32;
        ((shift * s) / (1.0 + (shift - 1.0) * s)) as f64
    };
    let tf = t as f32;
    // `linspace(1, T, T)[::-1] / T`: the first is T / T = 1, the last 1 / T.
    (f(1.0), f(1.0 / tf))
}

/// Explicit sigmas (or timesteps / T) lie in [0, 1], finite, at least one.
fn check_unit(name: &'static str, v: &[f64]) -> Result<(), CoreError> {
    if v.is_empty()
        || v.iter()
            .any(|x| !(x.is_finite() && (0.0..=1.0).contains(x)))
    {
        return Err(CoreError::invalid(
            name,
            "flow matching takes a non-empty list of sigmas in [0, 1] (timesteps in [0, T])",
        ));
    }
    Ok(())
}

impl Scheduler for FlowMatch {
    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        crate::schedule::check_steps(steps)?;
        if self.method == FlowMethod::Heun && !matches!(steps, Steps::Count(_)) {
            return Err(CoreError::Unsupported(
                "FlowMatchHeunDiscreteScheduler takes a step count only".into(),
            ));
        }
        let (mut sigmas, given) = self.run_sigmas(steps)?;
        let t = self.num_train_timesteps as f64;
        let end = if self.invert_sigmas {
            sigmas = sigmas.into_iter().map(|s| f32_round(1.0 - s)).collect();
            1.0
        } else {
            0.0
        };
        let mut timesteps: Vec<f64> = match given {
            Some(ts) if !self.invert_sigmas => ts,
            _ => sigmas.iter().map(|&s| f32_round(s * t)).collect(),
        };
        sigmas.push(end);
        if self.method == FlowMethod::Heun {
            timesteps = repeat_after_first(&timesteps);
            let last = sigmas.len() - 1;
            let mut doubled = repeat_after_first(&sigmas[..last]);
            doubled.push(sigmas[last]);
            sigmas = doubled;
        }
        Ok(Box::new(FlowRun {
            method: self.method,
            stochastic: self.stochastic,
            timesteps,
            sigmas,
            heun: None,
            begin: 0,
        }))
    }

    fn class_name(&self) -> &'static str {
        match self.method {
            FlowMethod::Euler => "FlowMatchEulerDiscreteScheduler",
            FlowMethod::Heun => "FlowMatchHeunDiscreteScheduler",
        }
    }

    fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }
}

/// `[a, b, c]` to `[a, b, b, c, c]` (Heun's repeated timesteps).
fn repeat_after_first(v: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(2 * v.len());
    for (i, &x) in v.iter().enumerate() {
        out.push(x);
        if i > 0 {
            out.push(x);
        }
    }
    out
}

/// Heun's first-order half: the derivative, the step and the sample it started from.
struct HeunState {
    derivative: Tensor<4>,
    dt: f64,
    sample: Tensor<4>,
}

struct FlowRun {
    method: FlowMethod,
    stochastic: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    heun: Option<HeunState>,
    begin: usize,
}

impl FlowRun {
    fn heun_step(&mut self, model_output: Tensor<4>, i: usize, sample: Tensor<4>) -> Tensor<4> {
        match self.heun.take() {
            None => {
                let dt = self.sigmas[i + 1] - self.sigmas[i];
                if i + 2 < self.sigmas.len() {
                    self.heun = Some(HeunState {
                        derivative: model_output.clone(),
                        dt,
                        sample: sample.clone(),
                    });
                }
                sample + model_output * dt
            }
            Some(first) => {
                let derivative = (first.derivative + model_output) * 0.5;
                first.sample + derivative * first.dt
            }
        }
    }
}

impl SchedulerRun for FlowRun {
    crate::schedule::run_skeleton!();

    fn order(&self) -> usize {
        match self.method {
            FlowMethod::Euler => 1,
            FlowMethod::Heun => 2,
        }
    }

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
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput, CoreError> {
        sd_core::check_step_inputs(i, self.timesteps.len(), &model_output, &sample)?;
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = sample.clone() - model_output.clone() * sigma;
        let prev = match self.method {
            FlowMethod::Heun => self.heun_step(model_output, i, sample),
            FlowMethod::Euler if self.stochastic => {
                let shape = sample.dims();
                let device = sample.device();
                x0.clone() * (1.0 - next) + noise.normal(shape, &device)? * next
            }
            FlowMethod::Euler => sample + model_output * (next - sigma),
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
        let sigma = self.sigmas[i];
        Ok(noise * sigma + original * (1.0 - sigma))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd35() -> SchedulerConfig {
        SchedulerConfig::from_json(
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}"#,
        )
        .unwrap()
    }

    /// SD 3.5 at 4 steps: diffusers' 1000, 857.69, 602.15, 8.93 (the smallest sigma
    /// shifted twice).
    #[test]
    fn sd35_four_steps() {
        let s = FlowMatch::from_config(&sd35(), FlowMethod::Euler).unwrap();
        let run = s.start(&Steps::Count(4)).unwrap();
        let want = [1000.0, 857.692_3, 602.150_6, 8.928_572];
        for (g, w) in run.timesteps().iter().zip(want) {
            assert!((g - w).abs() < 1e-3, "{g} vs {w}");
        }
        assert_eq!(run.sigmas().unwrap().last(), Some(&0.0));
    }

    #[test]
    fn dynamic_shifting_needs_mu_and_bad_values_are_refused() {
        let mut c = sd35();
        c.use_dynamic_shifting = Some(true);
        let s = FlowMatch::from_config(&c, FlowMethod::Euler).unwrap();
        let err = s.start(&Steps::Count(4)).err().unwrap().to_string();
        assert!(err.contains("with_image_seq_len"), "{err}");
        assert!(s.with_image_seq_len(4096).start(&Steps::Count(4)).is_ok());
        let mut bad = sd35();
        bad.shift = Some(0.0);
        assert!(FlowMatch::from_config(&bad, FlowMethod::Euler).is_err());
        let s = FlowMatch::from_config(&sd35(), FlowMethod::Euler).unwrap();
        assert!(s.start(&Steps::Sigmas(vec![1.5, 0.5])).is_err());
        assert!(s.start(&Steps::Count(0)).is_err());
        let heun = FlowMatch::from_config(&sd35(), FlowMethod::Heun).unwrap();
        assert!(heun.start(&Steps::Sigmas(vec![1.0, 0.5])).is_err());
    }
}
