//! Sigma schedules: the model's own, Karras, exponential, Align Your Steps, custom.

use sd_core::CoreError;

use crate::schedule::{exponential_sigmas, karras_sigmas, linspace};

/// Align Your Steps presets (Sabour, Fidler, Kreis: "Align Your Steps: Optimizing
/// Sampling Schedules in Diffusion Models", NVIDIA 2024).
///
/// The 10-step values are the published ones, as diffusers ships them in
/// `diffusers.schedulers.AysSchedules` (`StableDiffusionSigmas`,
/// `StableDiffusionTimesteps`, `StableDiffusionXLSigmas`, `StableDiffusionXLTimesteps`).
/// Other step counts use the paper's (and ComfyUI's `AlignYourStepsScheduler`)
/// method: log-linear interpolation of the 10-step schedule, with the final 0 sigma
/// replaced by the training `sigma_min` (0.0292) for the interpolation and restored
/// afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AysPreset {
    /// Stable Diffusion 1.5 (and 2.x-base).
    Sd15,
    /// Stable Diffusion XL.
    Sdxl,
}

/// The SD 1.5 10-step AYS sigmas.
pub const AYS_SD15_SIGMAS: [f64; 11] = [
    14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0,
];
/// The SD 1.5 10-step AYS timesteps.
pub const AYS_SD15_TIMESTEPS: [f64; 10] = [
    999.0, 850.0, 736.0, 645.0, 545.0, 455.0, 343.0, 233.0, 124.0, 24.0,
];
/// The SDXL 10-step AYS sigmas.
pub const AYS_SDXL_SIGMAS: [f64; 11] = [
    14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0,
];
/// The SDXL 10-step AYS timesteps.
pub const AYS_SDXL_TIMESTEPS: [f64; 10] = [
    999.0, 845.0, 730.0, 587.0, 443.0, 310.0, 193.0, 116.0, 53.0, 13.0,
];
/// Smallest training sigma of the SD noise schedule, used in place of the final 0.
const SD_SIGMA_MIN: f64 = 0.029167158;

/// NVIDIA's `loglinear_interp`: resample a descending positive schedule to `n` points,
/// linearly in log space.
pub fn loglinear_interp(values: &[f64], n: usize) -> Vec<f64> {
    let m = values.len();
    if n == m {
        return values.to_vec();
    }
    let ys: Vec<f64> = values.iter().rev().map(|v| v.ln()).collect();
    let xs = linspace(0.0, 1.0, m);
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|x| {
            let j = xs.iter().rposition(|&xi| xi <= x).unwrap_or(0).min(m - 2);
            let w = (x - xs[j]) / (xs[j + 1] - xs[j]);
            (ys[j] + w * (ys[j + 1] - ys[j])).exp()
        })
        .rev()
        .collect()
}

impl AysPreset {
    /// Parses `sd15` / `sdxl`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sd15" | "sd1.5" | "sd" => Some(Self::Sd15),
            "sdxl" | "xl" => Some(Self::Sdxl),
            _ => None,
        }
    }

    /// `steps + 1` sigmas ending in 0: the published ones at 10 steps, else log-linear
    /// interpolation of them.
    pub fn sigmas(self, steps: usize) -> Vec<f64> {
        let base = match self {
            Self::Sd15 => AYS_SD15_SIGMAS,
            Self::Sdxl => AYS_SDXL_SIGMAS,
        };
        if steps == 10 {
            return base.to_vec();
        }
        let mut levels = base.to_vec();
        levels[10] = SD_SIGMA_MIN;
        let mut out = loglinear_interp(&levels, steps + 1);
        out[steps] = 0.0;
        out
    }

    /// `steps` integer timesteps: the published ones at 10 steps, else log-linear
    /// interpolation of them, rounded (kept strictly descending).
    pub fn timesteps(self, steps: usize) -> Vec<f64> {
        let base = match self {
            Self::Sd15 => AYS_SD15_TIMESTEPS,
            Self::Sdxl => AYS_SDXL_TIMESTEPS,
        };
        if steps == 10 {
            return base.to_vec();
        }
        let mut out: Vec<f64> = loglinear_interp(&base, steps)
            .into_iter()
            .map(|t| t.round())
            .collect();
        for i in 1..out.len() {
            if out[i] >= out[i - 1] {
                out[i] = (out[i - 1] - 1.0).max(0.0);
            }
        }
        out
    }
}

/// Which sigmas a k-diffusion style scheduler (Euler, Euler ancestral, LMS,
/// DPM-Solver) walks.
#[derive(Debug, Clone, PartialEq)]
pub enum SigmaSchedule {
    /// The model's training sigmas at the spaced timesteps (diffusers' default).
    Model,
    /// Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
    /// Generative Models", with exponent `rho` (7 in diffusers / A1111).
    Karras {
        /// The exponent.
        rho: f64,
    },
    /// Log-uniform between the largest and smallest sigma.
    Exponential,
    /// Align Your Steps.
    AlignYourSteps(AysPreset),
    /// Explicit descending sigmas ending in 0 (their count fixes the step count).
    Custom(Vec<f64>),
}

impl SigmaSchedule {
    /// Karras with diffusers' rho = 7.
    pub fn karras() -> Self {
        Self::Karras { rho: 7.0 }
    }

    /// Resamples spaced model sigmas (descending, without the final one) into this
    /// schedule's `n` sigmas, for the Model / Karras / exponential variants.
    pub(crate) fn convert(
        &self,
        model: &[f64],
        n: usize,
        min: Option<f64>,
        max: Option<f64>,
    ) -> Result<Vec<f64>, CoreError> {
        let sigma_min = min.unwrap_or(model[model.len() - 1]);
        let sigma_max = max.unwrap_or(model[0]);
        Ok(match self {
            Self::Model => model.to_vec(),
            Self::Karras { rho } => karras_sigmas(sigma_min, sigma_max, n, *rho),
            Self::Exponential => exponential_sigmas(sigma_min, sigma_max, n),
            Self::AlignYourSteps(_) | Self::Custom(_) => {
                return Err(CoreError::Unsupported(
                    "explicit sigma schedules replace spacing".into(),
                ));
            }
        })
    }
}
