//! The scheduler contract, after diffusers' schedulers but with the per-run state
//! owned by a run object instead of hidden in a shared scheduler.

use burn::prelude::*;

use crate::error::CoreError;
use crate::noise::NoiseSource;

/// How the steps of a run are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Steps {
    /// A step count, spaced by the config's `timestep_spacing` (and sigma schedule).
    Count(usize),
    /// Explicit (descending) timesteps, e.g. Align Your Steps timesteps.
    Timesteps(Vec<f64>),
    /// Explicit (descending) sigmas ending in 0, e.g. Align Your Steps sigmas
    /// (k-diffusion style schedulers); timesteps follow by log-sigma interpolation.
    Sigmas(Vec<f64>),
}

/// What one scheduler step returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The latents for the next step.
    pub prev_sample: Tensor<4>,
    /// The predicted denoised latents, where the scheduler computes them.
    pub pred_original_sample: Option<Tensor<4>>,
}

/// A scheduler: a shared, immutable object (`Send + Sync`) that hands out owned
/// per-generation runs, so several generations can run at once.
pub trait Scheduler: Send + Sync {
    /// Starts a run with the given steps.
    fn start(&self, steps: &Steps) -> Result<Box<dyn SchedulerRun>, CoreError>;

    /// diffusers class this scheduler follows (e.g. `"EulerDiscreteScheduler"`).
    fn class_name(&self) -> &'static str;

    /// The training timesteps `T` of its noise schedule (1000 for SD); where
    /// `denoising_start` / `denoising_end` fractions cut (`round(T - f * T)`).
    fn num_train_timesteps(&self) -> usize {
        1000
    }
}

/// The state of one generation's denoising loop. Steps go by index `i` into
/// [`SchedulerRun::timesteps`].
pub trait SchedulerRun: Send {
    /// Number of `step` calls (PNDM runs one more than the step count).
    fn len(&self) -> usize {
        self.timesteps().len()
    }

    /// Whether the run has no steps.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Denoiser calls per step (diffusers' `scheduler.order`): 2 for Heun, whose
    /// timesteps list holds each step but the first twice; 1 otherwise.
    fn order(&self) -> usize {
        1
    }

    /// The timesteps the denoiser is called with, one per step (may be fractional).
    fn timesteps(&self) -> &[f64];

    /// Timestep of step `i`.
    ///
    /// # Errors
    /// [`CoreError::StepOutOfRange`] for `i >= len()`.
    fn timestep(&self, i: usize) -> Result<f64, CoreError> {
        self.timesteps()
            .get(i)
            .copied()
            .ok_or(CoreError::StepOutOfRange {
                index: i,
                len: self.len(),
            })
    }

    /// Sigmas (`len() + 1` values ending in the final sigma) for k-diffusion style
    /// schedulers and DPM-Solver; `None` for DDIM and PNDM.
    fn sigmas(&self) -> Option<&[f64]>;

    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the denoiser input at step `i` (identity for DDIM / PNDM / DPM).
    ///
    /// # Shapes
    /// - `[b, c, h, w]` to `[b, c, h, w]`
    ///
    /// # Errors
    /// [`CoreError::StepOutOfRange`] for `i >= len()`.
    fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Result<Tensor<4>, CoreError>;

    /// One denoising step from `sample` at step `i` to the next latents. Schedulers
    /// that add noise (DDIM with eta > 0, Euler ancestral) draw it from `noise`.
    ///
    /// # Shapes
    /// - `model_output`, `sample`: `[b, c, h, w]`; output the same
    ///
    /// # Errors
    /// [`CoreError::StepOutOfRange`] for `i >= len()`, [`CoreError::Shape`] when
    /// `model_output` and `sample` differ in shape (see [`check_step_inputs`]).
    fn step(
        &mut self,
        model_output: Tensor<4>,
        i: usize,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<StepOutput, CoreError>;

    /// Noises clean latents to the noise level of step `i` (img2img, inpainting).
    ///
    /// # Errors
    /// [`CoreError::StepOutOfRange`] for `i >= len()`, [`CoreError::Shape`] when
    /// `original` and `noise` differ in shape.
    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        i: usize,
    ) -> Result<Tensor<4>, CoreError>;

    /// Drops the first `begin` steps (img2img starts part-way).
    fn skip_to(&mut self, begin: usize) -> Result<(), CoreError>;

    /// Index of the first step still to run after [`Self::skip_to`] (0 otherwise).
    fn begin_index(&self) -> usize;
}

/// diffusers' img2img rule: with `steps` steps and `strength` in (0, 1], the first
/// `steps - int(steps * strength)` steps are skipped.
pub fn img2img_start(steps: usize, strength: f64) -> Result<usize, CoreError> {
    check_strength(strength)?;
    let init = ((steps as f64) * strength).floor() as usize;
    Ok(steps - init.min(steps))
}

/// SD 3's img2img rule (`StableDiffusion3Img2ImgPipeline.get_timesteps`): the first
/// `int(steps - steps * strength)` steps are skipped; it differs from
/// [`img2img_start`] where `steps * strength` is fractional.
pub fn img2img_start_sd3(steps: usize, strength: f64) -> Result<usize, CoreError> {
    check_strength(strength)?;
    let n = steps as f64;
    Ok((n - (n * strength).min(n)).max(0.0) as usize)
}

fn check_strength(strength: f64) -> Result<(), CoreError> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(CoreError::InvalidArgument {
            name: "strength",
            message: format!("{strength} is outside (0, 1]"),
        });
    }
    Ok(())
}

/// The checks every [`SchedulerRun::step`] and [`SchedulerRun::add_noise`] makes
/// before touching its tables: `i` inside a run of `len` steps and two tensors of
/// one shape.
///
/// # Errors
/// [`CoreError::StepOutOfRange`] or [`CoreError::Shape`].
pub fn check_step_inputs(
    i: usize,
    len: usize,
    a: &Tensor<4>,
    b: &Tensor<4>,
) -> Result<(), CoreError> {
    CoreError::check_step(i, len)?;
    if a.dims() != b.dims() {
        return Err(CoreError::shape(
            "sample",
            format!("shapes {:?} and {:?} differ", a.dims(), b.dims()),
        ));
    }
    Ok(())
}

/// diffusers' `denoising_end` / `denoising_start` cutoff: how many of `timesteps`
/// (descending) are at or above `round(T - fraction * T)`, i.e. run before the
/// hand-over. A base model with `denoising_end` runs that many steps; a refiner with
/// `denoising_start` skips them.
///
/// # Errors
/// [`CoreError::InvalidArgument`] for a fraction outside (0, 1).
pub fn handover_index(
    timesteps: &[f64],
    num_train_timesteps: usize,
    fraction: f64,
) -> Result<usize, CoreError> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(CoreError::invalid(
            "denoising_end",
            format!("{fraction} is not a fraction in (0, 1)"),
        ));
    }
    let t = num_train_timesteps as f64;
    let cutoff = (t - fraction * t).round();
    Ok(timesteps.iter().filter(|&&ts| ts >= cutoff).count())
}
