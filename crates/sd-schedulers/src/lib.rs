#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod any;
pub mod config;
pub mod ddim;
pub mod dpm_solver;
pub mod flow_match;
pub mod k_diffusion;
pub mod lcm;
pub mod names;
pub mod pndm;
pub mod schedule;
pub mod sigmas;
pub mod tcd;

pub use any::AnyScheduler;
pub use config::SchedulerConfig;
pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use flow_match::{DynamicShift, FlowMatch, FlowMethod, TimeShift};
pub use k_diffusion::{KDiffusion, KMethod};
pub use lcm::Lcm;
pub use names::{SCHEDULER_NAMES, SchedulerName};
pub use pndm::Pndm;
pub use schedule::{NoiseSchedule, PredictionType, TimestepSpacing};
pub use sigmas::{AysPreset, SigmaSchedule};
pub use tcd::Tcd;
