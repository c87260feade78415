//! Randomness: one trait for every draw of Gaussian noise, a seeded RNG and a
//! recorded-noise replayer.

use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::CoreError;

/// A source of standard-normal noise tensors, drawn in order.
///
/// Everything random in a generation (initial latents, the VAE posterior sample,
/// img2img's `add_noise`, ancestral / DDIM-eta scheduler noise) goes through one
/// source the caller owns, so a run is reproducible and can be replayed.
pub trait NoiseSource {
    /// Draws a `[b, c, h, w]` tensor of N(0, 1) noise on `device`.
    fn normal(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>, CoreError>;
}

/// Gaussian noise from a seeded, portable CPU RNG (`StdRng`): the same seed gives the
/// same numbers on every machine and backend.
#[derive(Debug, Clone)]
pub struct NoiseRng {
    rng: StdRng,
}

impl NoiseRng {
    /// A generator seeded with `seed`.
    pub fn seed(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for NoiseRng {
    fn normal(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>, CoreError> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// Replays a recorded sequence of noise tensors in draw order (how diffusers'
/// recorded `noise_NNN` / `step_noises` are reproduced).
#[derive(Debug, Clone)]
pub struct RecordedNoise {
    tensors: Vec<Tensor<4>>,
    next: usize,
}

impl RecordedNoise {
    /// Replays `tensors` in order.
    pub fn new(tensors: Vec<Tensor<4>>) -> Self {
        Self { tensors, next: 0 }
    }

    /// How many tensors were drawn so far.
    pub fn drawn(&self) -> usize {
        self.next
    }

    /// How many remain.
    pub fn remaining(&self) -> usize {
        self.tensors.len() - self.next
    }
}

impl NoiseSource for RecordedNoise {
    fn normal(&mut self, shape: [usize; 4], device: &Device) -> Result<Tensor<4>, CoreError> {
        let Some(t) = self.tensors.get(self.next) else {
            return Err(CoreError::InvalidArgument {
                name: "noise",
                message: format!(
                    "the recording holds {} tensors; draw {} asked for more",
                    self.tensors.len(),
                    self.next + 1
                ),
            });
        };
        if t.dims() != shape {
            return Err(CoreError::InvalidArgument {
                name: "noise",
                message: format!(
                    "recorded tensor {} has shape {:?}, {:?} was drawn",
                    self.next,
                    t.dims(),
                    shape
                ),
            });
        }
        self.next += 1;
        Ok(t.clone().to_device(device))
    }
}
