//! `AnyScheduler`: a scheduler picked at run time from a config's `_class_name` or
//! a user-facing name.

use sd_core::{CoreError, Scheduler, SchedulerRun, Steps};

use crate::config::SchedulerConfig;
use crate::ddim::Ddim;
use crate::dpm_solver::DpmSolverMultistep;
use crate::flow_match::{FlowMatch, FlowMethod};
use crate::k_diffusion::{KDiffusion, KMethod};
use crate::lcm::Lcm;
use crate::names::{SCHEDULER_NAMES, SchedulerName};
use crate::pndm::Pndm;
use crate::sigmas::SigmaSchedule;
use crate::tcd::Tcd;

/// One of the schedulers of this crate (more are to come: match with a wildcard arm).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum AnyScheduler {
    /// `DDIMScheduler`.
    Ddim(Ddim),
    /// `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `LMSDiscreteScheduler`.
    KDiffusion(KDiffusion),
    /// `DPMSolverMultistepScheduler`.
    DpmSolver(DpmSolverMultistep),
    /// `PNDMScheduler` (PLMS).
    Pndm(Pndm),
    /// `LCMScheduler` (Latent Consistency Models, LCM-LoRA).
    Lcm(Lcm),
    /// `TCDScheduler` (Trajectory Consistency Distillation, TCD-LoRA).
    Tcd(Tcd),
    /// `FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler` (SD 3.x).
    FlowMatch(FlowMatch),
}

impl AnyScheduler {
    /// Builds the class named by `config.class_name`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self, CoreError> {
        let class = config
            .class_name
            .as_deref()
            .ok_or_else(|| CoreError::Config {
                field: "_class_name",
                message: "missing".into(),
            })?;
        Self::from_class(class, config)
    }

    /// Parses a `scheduler_config.json` and builds its class.
    pub fn from_json(text: &str) -> Result<Self, CoreError> {
        Self::from_config(&SchedulerConfig::from_json(text)?)
    }

    /// Builds diffusers class `class` from `config` (the way `Class.from_config` swaps
    /// schedulers: keys the class does not define are ignored).
    pub fn from_class(class: &str, config: &SchedulerConfig) -> Result<Self, CoreError> {
        Ok(match class {
            "DDIMScheduler" => Self::Ddim(Ddim::from_config(config)?),
            "EulerDiscreteScheduler" => {
                Self::KDiffusion(KDiffusion::from_config(config, KMethod::Euler)?)
            }
            "EulerAncestralDiscreteScheduler" => {
                Self::KDiffusion(KDiffusion::from_config(config, KMethod::EulerAncestral)?)
            }
            "LMSDiscreteScheduler" => {
                Self::KDiffusion(KDiffusion::from_config(config, KMethod::Lms)?)
            }
            "DPMSolverMultistepScheduler" => {
                Self::DpmSolver(DpmSolverMultistep::from_config(config)?)
            }
            "PNDMScheduler" => Self::Pndm(Pndm::from_config(config)?),
            "LCMScheduler" => Self::Lcm(Lcm::from_config(config)?),
            "TCDScheduler" => Self::Tcd(Tcd::from_config(config)?),
            "FlowMatchEulerDiscreteScheduler" => {
                Self::FlowMatch(FlowMatch::from_config(config, FlowMethod::Euler)?)
            }
            "FlowMatchHeunDiscreteScheduler" => {
                Self::FlowMatch(FlowMatch::from_config(config, FlowMethod::Heun)?)
            }
            other => {
                return Err(CoreError::Config {
                    field: "_class_name",
                    message: format!("`{other}` is not supported ({})", supported_classes()),
                });
            }
        })
    }

    /// Builds a scheduler by a name of [`SCHEDULER_NAMES`] (ours, its A1111
    /// spelling "Euler a", "DPM++ 2M Karras", or an alias) over a model's scheduler
    /// config. Over a flow-matching config (SD 3.x) a name builds its flow-matching
    /// class (`euler`: `FlowMatchEulerDiscreteScheduler`; `dpmpp-2m`: DPM++ on flow
    /// sigmas with the config's shift).
    ///
    /// # Errors
    /// An unknown name (listing the known ones); a name without a form for the
    /// model's kind of config (`ddim` on SD 3, `heun` on SD 1.5); a config the class
    /// cannot honour.
    pub fn from_name(name: &str, base: &SchedulerConfig) -> Result<Self, CoreError> {
        let entry = SchedulerName::find(name).ok_or_else(|| CoreError::InvalidArgument {
            name: "scheduler",
            message: format!(
                "unknown scheduler `{name}`; known: {}",
                SchedulerName::known()
            ),
        })?;
        let flow = SchedulerName::is_flow_config(base);
        let class = entry.class_for(flow).ok_or_else(|| {
            let (kind, fits) = if flow {
                (
                    "a flow-matching model (SD 3.x)",
                    SchedulerName::known_for(true),
                )
            } else {
                (
                    "a diffusion model (SD 1.x / 2.x / XL)",
                    SchedulerName::known_for(false),
                )
            };
            CoreError::invalid(
                "scheduler",
                format!("`{name}` does not apply to {kind}; these do: {fits}"),
            )
        })?;
        Self::from_class(class, &entry.config(base))
    }

    /// Sets the image size where the scheduler shifts by resolution (flow matching
    /// with `use_dynamic_shifting`: `seq_len` latent patches); others are unchanged.
    pub fn with_image_seq_len(self, seq_len: usize) -> Self {
        match self {
            Self::FlowMatch(f) => Self::FlowMatch(f.with_image_seq_len(seq_len)),
            other => other,
        }
    }

    /// Replaces the sigma schedule where the scheduler walks sigmas (Euler family,
    /// LMS, DPM++); DDIM takes the Align Your Steps timesteps; PNDM has none.
    pub fn with_sigmas(self, sigmas: SigmaSchedule) -> Result<Self, CoreError> {
        Ok(match self {
            Self::KDiffusion(k) => Self::KDiffusion(k.with_sigmas(sigmas)),
            Self::DpmSolver(d) => Self::DpmSolver(d.with_sigmas(sigmas)?),
            Self::FlowMatch(f) => Self::FlowMatch(f.with_sigmas(sigmas)?),
            Self::Ddim(d) => match sigmas {
                SigmaSchedule::AlignYourSteps(p) => Self::Ddim(d.with_ays(p)),
                SigmaSchedule::Model => Self::Ddim(d),
                _ => {
                    return Err(CoreError::Unsupported(
                        "DDIM walks timesteps: only Align Your Steps applies; pass explicit sigmas as Steps::Sigmas".into(),
                    ));
                }
            },
            Self::Lcm(l) => match sigmas {
                SigmaSchedule::Model => Self::Lcm(l),
                _ => {
                    return Err(CoreError::Unsupported(
                        "LCM walks its distillation grid's timesteps: no sigma schedule".into(),
                    ));
                }
            },
            Self::Tcd(t) => match sigmas {
                SigmaSchedule::Model => Self::Tcd(t),
                _ => {
                    return Err(CoreError::Unsupported(
                        "TCD walks its distillation grid's timesteps: no sigma schedule".into(),
                    ));
                }
            },
            Self::Pndm(p) => match sigmas {
                SigmaSchedule::Model => Self::Pndm(p),
                _ => {
                    return Err(CoreError::Unsupported(
                        "PNDM (PLMS) has no sigma schedule; sigma schedules and Align Your Steps \
                         apply to euler, euler-a, lms, dpmpp-2m and dpmpp-2m-karras (and AYS \
                         timesteps to ddim)"
                            .into(),
                    ));
                }
            },
        })
    }

    /// Sets DDIM's `eta` (0 is deterministic DDIM, 1 DDPM-like; the noise comes from the
    /// run's noise source) or TCD's gamma (`[0, 1]`, diffusers' `eta` of its `step`). Euler ancestral is diffusers' fixed `eta = 1` and takes only
    /// that; the deterministic samplers take only 0.
    ///
    /// # Errors
    /// [`CoreError::InvalidArgument`] for a negative or non-finite `eta`, or an `eta`
    /// the scheduler cannot honour.
    pub fn with_eta(self, eta: f64) -> Result<Self, CoreError> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(CoreError::invalid(
                "eta",
                format!("{eta} is not a finite value >= 0"),
            ));
        }
        let fixed = match &self {
            Self::Ddim(d) => return Ok(Self::Ddim(d.clone().with_eta(eta))),
            Self::Tcd(t) => return Ok(Self::Tcd(t.clone().with_gamma(eta)?)),
            Self::KDiffusion(k) if k.is_ancestral() => 1.0,
            _ => 0.0,
        };
        if eta == fixed {
            return Ok(self);
        }
        Err(CoreError::invalid(
            "eta",
            format!(
                "{} runs at eta = {fixed}; eta is a setting of ddim and tcd only",
                self.class_name()
            ),
        ))
    }

    fn inner(&self) -> &dyn Scheduler {
        match self {
            Self::Ddim(s) => s,
            Self::KDiffusion(s) => s,
            Self::DpmSolver(s) => s,
            Self::Pndm(s) => s,
            Self::Lcm(s) => s,
            Self::Tcd(s) => s,
            Self::FlowMatch(s) => s,
        }
    }
}

impl Scheduler for AnyScheduler {
    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError> {
        self.inner().start(steps)
    }

    fn class_name(&self) -> &'static str {
        self.inner().class_name()
    }

    fn num_train_timesteps(&self) -> usize {
        self.inner().num_train_timesteps()
    }
}

/// The classes of [`SCHEDULER_NAMES`], each once.
fn supported_classes() -> String {
    let mut classes: Vec<&str> = Vec::new();
    for e in SCHEDULER_NAMES {
        if !classes.contains(&e.class) {
            classes.push(e.class);
        }
    }
    classes.join(", ")
}
