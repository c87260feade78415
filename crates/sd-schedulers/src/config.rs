//! diffusers' `scheduler_config.json`, read leniently (diffusers writes `-Infinity`).

use sd_core::CoreError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The union of the scheduler-config fields of the classes this crate implements.
///
/// Every field is optional: each scheduler fills in its own class defaults, and, like
/// diffusers, ignores the keys its class does not define.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class (`"EulerDiscreteScheduler"`, ...).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Training timesteps (1000).
    pub num_train_timesteps: Option<usize>,
    /// First beta.
    pub beta_start: Option<f64>,
    /// Last beta.
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: Option<String>,
    /// Explicit betas (override `beta_schedule`).
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    pub prediction_type: Option<String>,
    /// `leading`, `trailing` or `linspace`.
    pub timestep_spacing: Option<String>,
    /// Added to leading-spaced timesteps.
    pub steps_offset: Option<usize>,
    /// Rescale betas to zero terminal SNR.
    pub rescale_betas_zero_snr: Option<bool>,
    /// DDIM / PNDM: the final "previous" alpha is 1 (else `alphas_cumprod[0]`).
    pub set_alpha_to_one: Option<bool>,
    /// DDIM: clip the predicted x0.
    pub clip_sample: Option<bool>,
    /// DDIM: clip range.
    pub clip_sample_range: Option<f64>,
    /// DDIM / DPM: dynamic thresholding (unsupported when true).
    pub thresholding: Option<bool>,
    /// PNDM: skip the Runge-Kutta warm-up (PLMS only). Only `true` is supported.
    pub skip_prk_steps: Option<bool>,
    /// Karras sigmas.
    pub use_karras_sigmas: Option<bool>,
    /// Exponential sigmas.
    pub use_exponential_sigmas: Option<bool>,
    /// Beta sigmas (unsupported when true).
    pub use_beta_sigmas: Option<bool>,
    /// Euler: `linear` (or `log_linear`, unsupported).
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` only.
    pub timestep_type: Option<String>,
    /// `zero` or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// Override of the smallest sigma of Karras / exponential schedules.
    pub sigma_min: Option<f64>,
    /// Override of the largest sigma.
    pub sigma_max: Option<f64>,
    /// DPM-Solver order (only 2 here, DPM++ 2M; 1 is DPM++ 1S).
    pub solver_order: Option<usize>,
    /// DPM-Solver: `dpmsolver++` only.
    pub algorithm_type: Option<String>,
    /// DPM-Solver: `midpoint` or `heun`.
    pub solver_type: Option<String>,
    /// DPM-Solver: first-order final steps.
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: Euler at the final step.
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: lambda clipping (only -inf, i.e. none).
    pub lambda_min_clipped: Option<Value>,
    /// DPM-Solver: Lu lambdas (unsupported when true).
    pub use_lu_lambdas: Option<bool>,
    /// DPM-Solver: flow-matching sigmas (with `prediction_type: "flow_prediction"`).
    pub use_flow_sigmas: Option<bool>,
    /// DPM-Solver: variance type (only null).
    pub variance_type: Option<Value>,
    /// DPM-Solver: dynamic shifting (unsupported when true).
    pub use_dynamic_shifting: Option<bool>,
    /// LCM: the step count of the distillation grid (50).
    pub original_inference_steps: Option<usize>,
    /// LCM: the timestep factor of the boundary condition (10).
    pub timestep_scaling: Option<f64>,
    /// Flow matching (`FlowMatchEulerDiscreteScheduler`, SD 3.x): the sigma shift
    /// (3.0 for SD 3.5).
    pub shift: Option<f64>,
    /// Flow matching with dynamic shifting: the shift at `base_image_seq_len`.
    pub base_shift: Option<f64>,
    /// Flow matching with dynamic shifting: the shift at `max_image_seq_len`.
    pub max_shift: Option<f64>,
    /// Flow matching with dynamic shifting: the smallest image sequence length.
    pub base_image_seq_len: Option<usize>,
    /// Flow matching with dynamic shifting: the largest image sequence length.
    pub max_image_seq_len: Option<usize>,
    /// Flow matching: walk the sigmas reversed.
    pub invert_sigmas: Option<bool>,
    /// Flow matching: stretch the shifted sigmas to end at this value.
    pub shift_terminal: Option<f64>,
    /// Flow matching with dynamic shifting: `exponential` or `linear`.
    pub time_shift_type: Option<String>,
    /// Flow matching: each step re-noises the predicted clean sample.
    pub stochastic_sampling: Option<bool>,
    /// DPM-Solver on flow sigmas: their shift.
    pub flow_shift: Option<f64>,
}

/// Replaces the bare `Infinity`, `-Infinity` and `NaN` tokens diffusers writes (outside
/// strings) by JSON-legal stand-ins: `±1e999` overflows to `±inf` in serde_json... which
/// rejects it, so they become strings `"Infinity"` / `"-Infinity"` / `"NaN"` instead.
pub fn sanitize_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices();
    let mut in_string = false;
    while let Some((i, c)) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        out.push(escaped);
                    }
                }
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push('"');
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| text[i..].starts_with(t));
        match token {
            Some(token) => {
                out.push('"');
                out.push_str(token);
                out.push('"');
                // The token is ASCII: skip its remaining characters.
                for _ in 1..token.len() {
                    chars.next();
                }
            }
            None => out.push(c),
        }
    }
    out
}

impl SchedulerConfig {
    /// Parses a `scheduler_config.json` (accepting `Infinity` / `-Infinity` / `NaN`).
    pub fn from_json(text: &str) -> Result<Self, CoreError> {
        serde_json::from_str(&sanitize_json(text)).map_err(|e| CoreError::InvalidArgument {
            name: "scheduler_config",
            message: e.to_string(),
        })
    }
}

pub(crate) fn unsupported(field: &'static str, message: impl Into<String>) -> CoreError {
    CoreError::Config {
        field,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::sanitize_json;

    #[test]
    fn sanitize_keeps_non_ascii_strings() {
        let text = r#"{"name": "café \"ünï\"", "x": NaN, "y": -Infinity, "z": "NaN"}"#;
        let clean = sanitize_json(text);
        let v: serde_json::Value = serde_json::from_str(&clean).unwrap();
        assert_eq!(v["name"], "café \"ünï\"");
        assert_eq!(v["x"], "NaN");
        assert_eq!(v["y"], "-Infinity");
        assert_eq!(v["z"], "NaN");
    }

    /// SD 3.5's scheduler config (`configs/sd3/sd3-scheduler`) reads, shift and all,
    /// and builds its class.
    #[test]
    fn a_flow_matching_config_reads_and_builds() {
        let text = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler",
            "_diffusers_version": "0.29.0.dev0", "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": false, "base_shift": 0.5, "max_shift": 1.15}"#;
        let config = super::SchedulerConfig::from_json(text).unwrap();
        assert_eq!(config.shift, Some(3.0));
        assert_eq!(config.max_shift, Some(1.15));
        let s = crate::AnyScheduler::from_config(&config).unwrap();
        assert!(matches!(s, crate::AnyScheduler::FlowMatch(_)));
    }
}
