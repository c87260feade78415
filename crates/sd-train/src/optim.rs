//! Optimisation pieces burn leaves to the caller: diffusers' learning-rate schedules
//! with warm-up, clipping by the global gradient norm, exponential moving averages of
//! the weights, and parameter ids that stay the same across runs (so a saved optimizer
//! state finds its parameters again on resume).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// A learning-rate schedule, as diffusers' `get_scheduler` defines them: the rate of
/// optimizer step `k` (0-based) is `lr * factor(k)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr` throughout.
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then constant.
    ConstantWithWarmup {
        /// Warm-up length in optimizer steps.
        warmup_steps: usize,
    },
    /// Warm-up, then linear decay to 0 at `total_steps`.
    Linear {
        /// Warm-up length in optimizer steps.
        warmup_steps: usize,
        /// Optimizer steps of the whole run.
        total_steps: usize,
    },
    /// Warm-up, then a half cosine to 0 at `total_steps`.
    Cosine {
        /// Warm-up length in optimizer steps.
        warmup_steps: usize,
        /// Optimizer steps of the whole run.
        total_steps: usize,
    },
}

impl LrSchedule {
    /// The factor of optimizer step `step`.
    pub fn factor(&self, step: usize) -> f64 {
        let warm = |w: usize| -> Option<f64> { (step < w).then(|| step as f64 / w.max(1) as f64) };
        match *self {
            Self::Constant => 1.0,
            Self::ConstantWithWarmup { warmup_steps } => warm(warmup_steps).unwrap_or(1.0),
            Self::Linear {
                warmup_steps,
                total_steps,
            } => warm(warmup_steps).unwrap_or_else(|| {
                let left = total_steps.saturating_sub(step) as f64;
                (left / total_steps.saturating_sub(warmup_steps).max(1) as f64).max(0.0)
            }),
            Self::Cosine {
                warmup_steps,
                total_steps,
            } => warm(warmup_steps).unwrap_or_else(|| {
                let progress = (step - warmup_steps) as f64
                    / total_steps.saturating_sub(warmup_steps).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }),
        }
    }
}

/// FNV-1a of the path: the same id for the same parameter in every run.
fn path_id(path: &str) -> ParamId {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    ParamId::from(h)
}

/// Gives every parameter an id derived from its path, so optimizer state saved by one
/// run is found again by the next (burn keys it by [`ParamId`], which is otherwise
/// random per construction).
pub fn stable_param_ids<M: Module>(module: M) -> M {
    struct Renumber {
        path: Vec<String>,
    }
    impl ModuleMapper for Renumber {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (_, tensor, mapper) = param.consume();
            Param::from_mapped_value(path_id(&self.path.join(".")), tensor, mapper)
        }
    }
    module.map(&mut Renumber { path: Vec::new() })
}

/// Number of trainable parameters.
pub fn num_trainable<M: Module>(module: &M) -> usize {
    struct Count(usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.val().is_require_grad() {
                self.0 += param.lazy_shape().num_elements();
            }
        }
    }
    let mut c = Count(0);
    module.visit(&mut c);
    c.0
}

fn grad_of<const D: usize>(grads: &GradientsParams, id: ParamId) -> Option<Tensor<D>> {
    grads.get::<D>(id)
}

/// The global L2 norm of `grads` over the trainable parameters of `module`, and the
/// gradients scaled by `min(1, max_norm / (norm + 1e-6))` when `max_norm` is given
/// (PyTorch's `clip_grad_norm_`).
pub fn clip_grad_norm<M: Module>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: Option<f64>,
) -> (GradientsParams, f64) {
    struct SumSq<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
        ids: Vec<(ParamId, usize)>,
    }
    impl ModuleVisitor for SumSq<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = grad_of::<D>(self.grads, param.id) {
                let s = g.powi_scalar(2).sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
                self.ids.push((param.id, D));
            }
        }
    }
    let mut v = SumSq {
        grads: &grads,
        total: None,
        ids: Vec::new(),
    };
    module.visit(&mut v);
    let ids = v.ids;
    let norm = v
        .total
        .map(|t| t.into_scalar::<f32>() as f64)
        .unwrap_or(0.0)
        .sqrt();
    if let Some(max) = max_norm {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for (id, rank) in ids {
                match rank {
                    1 => scale::<1>(&mut grads, id, coef),
                    2 => scale::<2>(&mut grads, id, coef),
                    3 => scale::<3>(&mut grads, id, coef),
                    4 => scale::<4>(&mut grads, id, coef),
                    _ => {}
                }
            }
        }
    }
    (grads, norm)
}

fn scale<const D: usize>(grads: &mut GradientsParams, id: ParamId, coef: f64) {
    if let Some(g) = grads.remove::<D>(id) {
        grads.register(id, g.mul_scalar(coef));
    }
}

/// An exponential moving average of a model's trainable weights (diffusers' `EMAModel`
/// without warm-up): after optimizer step `n` (1-based) the decay is
/// `min(decay, (1 + n') / (10 + n'))` with `n' = n - 1` (0 at the first step, which
/// copies the weights).
#[derive(Debug, Clone)]
pub struct Ema<M: Module> {
    /// The averaged model (inference, no autodiff).
    pub model: M,
    /// The decay cap.
    pub decay: f64,
    /// Optimizer steps seen.
    pub step: usize,
}

impl<M: Module> Ema<M> {
    /// Starts from the weights of `model` (taken off autodiff).
    pub fn new(model: &M, decay: f64) -> Self {
        Self {
            model: model.valid(),
            decay,
            step: 0,
        }
    }

    /// The decay the next update uses.
    pub fn next_decay(&self) -> f64 {
        let n = self.step as f64; // (step + 1) - 1
        if n <= 0.0 {
            return 0.0;
        }
        ((1.0 + n) / (10.0 + n)).min(self.decay)
    }

    /// Moves the average towards `model`'s trainable weights.
    pub fn update(&mut self, model: &M) {
        let decay = self.next_decay();
        self.step += 1;
        struct Values {
            out: HashMap<ParamId, TensorAny>,
        }
        impl ModuleVisitor for Values {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.val().is_require_grad() {
                    self.out.insert(
                        param.id,
                        TensorAny::new(param.val().without_autodiff().detach()),
                    );
                }
            }
        }
        let mut values = Values {
            out: HashMap::new(),
        };
        model.visit(&mut values);
        struct Blend {
            values: HashMap<ParamId, TensorAny>,
            decay: f64,
        }
        impl ModuleMapper for Blend {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let Some(v) = self.values.remove(&param.id) else {
                    return param;
                };
                let v: Tensor<D> = v.get();
                let decay = self.decay;
                param.map(|ema| ema.mul_scalar(decay) + v.mul_scalar(1.0 - decay))
            }
        }
        self.model = self.model.clone().map(&mut Blend {
            values: values.out,
            decay,
        });
    }
}

/// A tensor of any rank (flattened, with its shape), to carry values between a
/// visitor and a mapper.
#[derive(Debug, Clone)]
struct TensorAny {
    flat: Tensor<1>,
    shape: Vec<usize>,
}

impl TensorAny {
    fn new<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        let n: usize = shape.iter().product();
        Self {
            flat: t.reshape([n]),
            shape,
        }
    }

    fn get<const D: usize>(self) -> Tensor<D> {
        let shape: [usize; D] = self.shape.try_into().expect("rank");
        self.flat.reshape(shape)
    }
}

/// The id and value of the rank-`D` parameter at burn path `path` (for instance
/// `conv_in.weight`; linear weights are seen as `[in, out]`).
pub fn param_by_path<const D: usize, M: Module>(
    module: &M,
    path: &str,
) -> Option<(ParamId, Tensor<D>)> {
    struct Find<'a, const D: usize> {
        target: &'a str,
        path: Vec<String>,
        found: Option<(ParamId, Tensor<D>)>,
    }
    impl<const D: usize> ModuleVisitor for Find<'_, D> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const E: usize>(&mut self, param: &Param<Tensor<E>>) {
            if E == D && self.found.is_none() && self.path.join(".") == self.target {
                let t = param.val();
                let dims: [usize; D] = t.dims().to_vec().try_into().expect("rank");
                self.found = Some((param.id, t.reshape(dims)));
            }
        }
    }
    let mut f = Find::<D> {
        target: path,
        path: Vec::new(),
        found: None,
    };
    module.visit(&mut f);
    f.found
}
