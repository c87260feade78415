//! The noise schedule shared by every scheduler: betas, `alphas_cumprod`, training
//! sigmas, timestep spacing, and the sigma-to-timestep interpolation.
//!
//! The tables are computed with f32 arithmetic exactly as diffusers' torch code does
//! (so `alphas_cumprod` matches bit for bit); everything derived from them is f64.

use sd_core::CoreError;

use crate::config::{SchedulerConfig, unsupported};

/// What the denoiser predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise (SD 1.x, SD 2.x-base).
    Epsilon,
    /// `v = alpha * noise - sigma * x0` (SD 2.x-v).
    VPrediction,
    /// The clean sample.
    Sample,
}

impl PredictionType {
    pub(crate) fn from_config(c: &SchedulerConfig) -> Result<Self, CoreError> {
        match c.prediction_type.as_deref() {
            None | Some("epsilon") => Ok(Self::Epsilon),
            Some("v_prediction") => Ok(Self::VPrediction),
            Some("sample") => Ok(Self::Sample),
            Some(o) => Err(unsupported(
                "prediction_type",
                format!("`{o}` is not one of epsilon, v_prediction, sample"),
            )),
        }
    }
}

/// How a step count is spread over the training timesteps (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `arange(N) * (T // N) + steps_offset`, descending.
    Leading,
    /// `round(arange(T, 0, -T / N)) - 1`.
    Trailing,
    /// `linspace(0, T - 1, N)`, descending.
    Linspace,
}

impl TimestepSpacing {
    pub(crate) fn from_config(c: &SchedulerConfig, default: Self) -> Result<Self, CoreError> {
        match c.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(Self::Leading),
            Some("trailing") => Ok(Self::Trailing),
            Some("linspace") => Ok(Self::Linspace),
            Some(o) => Err(unsupported(
                "timestep_spacing",
                format!("`{o}` is not one of leading, trailing, linspace"),
            )),
        }
    }
}

/// The range predictions of `x0` are clamped to: `clip_sample_range` (1) when
/// `clip_sample` is on (the default), `None` otherwise.
pub(crate) fn clip_sample(c: &SchedulerConfig) -> Option<f64> {
    c.clip_sample
        .unwrap_or(true)
        .then(|| c.clip_sample_range.unwrap_or(1.0))
}

/// The most training timesteps a config may ask for (diffusion models use 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// Checks a run's steps before anything is allocated: at most
/// [`MAX_TRAIN_TIMESTEPS`] steps, explicit timesteps and sigmas finite.
pub(crate) fn check_steps(steps: &sd_core::Steps) -> Result<(), CoreError> {
    use sd_core::Steps;
    let (n, values): (usize, &[f64]) = match steps {
        Steps::Count(n) => (*n, &[]),
        Steps::Timesteps(t) => (t.len(), t),
        Steps::Sigmas(s) => (s.len().saturating_sub(1), s),
    };
    if n > MAX_TRAIN_TIMESTEPS {
        return Err(CoreError::invalid(
            "steps",
            format!("{n} steps: at most {MAX_TRAIN_TIMESTEPS}"),
        ));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(CoreError::invalid(
            "steps",
            "timesteps and sigmas must be finite",
        ));
    }
    Ok(())
}

/// Betas and cumulative alphas of the training noise schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// Training timesteps `T`.
    pub num_train_timesteps: usize,
    /// `beta_t`, f32 as diffusers computes them.
    pub betas: Vec<f32>,
    /// `prod_{s <= t} (1 - beta_s)`, f32 cumulative product as torch computes it.
    pub alphas_cumprod: Vec<f32>,
}

/// torch.linspace in f32.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

impl NoiseSchedule {
    /// From the config's `beta_*`, `trained_betas` and `rescale_betas_zero_snr`.
    pub fn from_config(c: &SchedulerConfig) -> Result<Self, CoreError> {
        let t = c.num_train_timesteps.unwrap_or(1000);
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&t) {
            return Err(unsupported(
                "num_train_timesteps",
                format!("{t} is outside 2..={MAX_TRAIN_TIMESTEPS}"),
            ));
        }
        let start = c.beta_start.unwrap_or(0.0001);
        let end = c.beta_end.unwrap_or(0.02);
        let mut betas: Vec<f32> = if let Some(tb) = &c.trained_betas {
            if tb.len() != t {
                return Err(unsupported(
                    "trained_betas",
                    format!("{} values for {t} training timesteps", tb.len()),
                ));
            }
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match c.beta_schedule.as_deref().unwrap_or("linear") {
                "linear" => linspace_f32(start as f32, end as f32, t),
                "scaled_linear" => linspace_f32(start.sqrt() as f32, end.sqrt() as f32, t)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => {
                    let alpha_bar = |x: f64| {
                        ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..t)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / t as f64, (i + 1) as f64 / t as f64);
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                o => {
                    return Err(unsupported(
                        "beta_schedule",
                        format!("`{o}` is not one of linear, scaled_linear, squaredcos_cap_v2"),
                    ));
                }
            }
        };
        if c.rescale_betas_zero_snr == Some(true) {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas_cumprod = cumprod(betas.iter().map(|b| 1.0 - b));
        Ok(Self {
            num_train_timesteps: t,
            betas,
            alphas_cumprod,
        })
    }

    /// With zero terminal SNR the last `alphas_cumprod` is 0 and its sigma infinite;
    /// diffusers' sigma-based schedulers (Euler, Euler ancestral, DPM-Solver) replace
    /// it by `2^-24`, as done here.
    pub(crate) fn fix_zero_terminal_snr(&mut self, config: &SchedulerConfig) {
        if config.rescale_betas_zero_snr == Some(true)
            && let Some(last) = self.alphas_cumprod.last_mut()
        {
            *last = 2f32.powi(-24);
        }
    }

    /// `alpha_cumprod` "before" the first training step, where a DDIM-style step
    /// lands after timestep 0: 1 with `set_alpha_to_one` (the default), else
    /// `alphas_cumprod[0]`.
    pub(crate) fn final_alpha_cumprod(&self, c: &SchedulerConfig) -> f64 {
        if c.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            self.alphas_cumprod[0] as f64
        }
    }

    /// `alphas_cumprod[t]` as f64 (t clamped to the table).
    pub fn alpha_cumprod(&self, t: i64) -> f64 {
        let i = t.clamp(0, self.alphas_cumprod.len() as i64 - 1) as usize;
        self.alphas_cumprod[i] as f64
    }

    /// Training sigmas `sqrt((1 - a) / a)`, f32 as diffusers computes them.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// `ln` of the training sigmas (f32, as `np.log` of an f32 array).
    pub fn log_sigmas(&self) -> Vec<f32> {
        self.train_sigmas().iter().map(|s| s.ln()).collect()
    }
}

/// torch.cumprod of an f32 tensor on the CPU: accumulated in f64, each output
/// rounded to f32.
fn cumprod(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023),
/// diffusers' `rescale_zero_terminal_snr`.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt_bar: Vec<f32> = cumprod(betas.iter().map(|b| 1.0 - b))
        .into_iter()
        .map(f32::sqrt)
        .collect();
    let first = sqrt_bar[0];
    let last = *sqrt_bar.last().expect("non-empty");
    let scaled: Vec<f32> = sqrt_bar
        .iter()
        .map(|s| (s - last) * first / (first - last))
        .collect();
    let bar: Vec<f32> = scaled.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(betas.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub fn interp_index(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x <= 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// diffusers' `_sigma_to_t`: the (fractional) timestep of `sigma` by linear
/// interpolation of the log training sigmas.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let mut low = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `np.linspace(start, stop, n)` in f64.
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + step * i as f64).collect();
    v[n - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for a float step.
///
/// numpy's length `ceil(start / step)` suffers from rounding: `1000 / (1000 / 61)` is
/// `61.00000000000001`, so diffusers' trailing spacing gives 62 timesteps (the last one
/// -1) for 61 steps. The length here tolerates that rounding, so the step count is
/// always honoured; every other count gives diffusers' values.
pub fn arange_down(start: f64, step: f64) -> Vec<f64> {
    let n = (start / step - 1e-9).ceil() as usize;
    (0..n).map(|i| start + i as f64 * -step).collect()
}

/// Karras et al. (2022) sigmas: `(max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize, rho: f64) -> Vec<f64> {
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// Log-uniform sigmas from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// Rounds like f32 storage (diffusers keeps sigmas and float timesteps in f32).
pub fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

pub(crate) fn check_count(n: usize, t: usize) -> Result<(), CoreError> {
    if n == 0 || n > t {
        return Err(CoreError::InvalidArgument {
            name: "steps",
            message: format!("{n} steps: must be in 1..={t}"),
        });
    }
    Ok(())
}

/// The part of [`sd_core::SchedulerRun`] every run of this crate shares, over its
/// fields `timesteps: Vec<f64>` (one per step) and `begin: usize` (the first step
/// to run): `timesteps`, `skip_to` (img2img starts part-way, leaving at least one
/// step) and `begin_index`. A new scheduler's run (flow matching next) expands it in
/// its `impl SchedulerRun` and writes only what differs: sigmas, input scaling,
/// `step`, `add_noise`.
macro_rules! run_skeleton {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.timesteps
        }

        fn skip_to(&mut self, begin: usize) -> Result<(), sd_core::CoreError> {
            self.begin = crate::schedule::check_begin(begin, self.timesteps.len())?;
            Ok(())
        }

        fn begin_index(&self) -> usize {
            self.begin
        }
    };
}
pub(crate) use run_skeleton;

/// `skip_to(begin)` must leave at least one step.
pub(crate) fn check_begin(begin: usize, len: usize) -> Result<usize, CoreError> {
    if begin >= len {
        return Err(CoreError::InvalidArgument {
            name: "begin",
            message: format!("{begin} is past the {len} steps"),
        });
    }
    Ok(begin)
}

pub(crate) fn check_descending(name: &'static str, v: &[f64]) -> Result<(), CoreError> {
    if v.is_empty() || v.iter().any(|x| !x.is_finite()) || v.windows(2).any(|w| w[1] > w[0]) {
        return Err(CoreError::InvalidArgument {
            name,
            message: "must be a non-empty, finite, non-increasing list".into(),
        });
    }
    Ok(())
}
