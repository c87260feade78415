//! LoRA (low-rank adaptation) of the models' linear and convolution weights.
//!
//! A LoRA layer holds two factors in PyTorch layout, `down` (`[rank, fan_in]`, fan-in
//! being `in` for a linear layer and `in * kh * kw` for a convolution) and `up`
//! (`[out, rank]`), and a scale (`alpha / rank`, times a strength). The adapted
//! weight is `W + scale * up @ down`, reshaped to the weight's PyTorch shape.
//!
//! Two ways to use one, with equal outputs:
//! - [`LoraMode::Merge`] adds the deltas into the weights once: no cost per step, but
//!   the model no longer holds the original weights.
//! - [`LoraMode::OnTheFly`] attaches a [`LoraDelta`] reparameterization to each weight
//!   (burn's [`Reparameterization`]): the effective weight is recomputed on each use
//!   ([`Param::val`]) and the base weights stay as they are. To go back, keep a clone
//!   of the model from before (cloning a burn module shares its tensors, so it costs
//!   no memory); [`merge_lora`] folds the layers in. The factors are parameters, which
//!   is also how LoRA training sees them ([`attach_trainable_lora`]).
//!
//! Layers are keyed by the burn path of the weight parameter
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`);
//! [`crate::diffusers_key`] gives the diffusers name. Reading and writing the kohya
//! and diffusers file layouts is `sd-io`'s job.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{
    Module, ModuleMapper, ModuleVisitor, Param, Reparameterization, Reparameterizer,
};
use burn::prelude::*;
use burn::tensor::{DType, Distribution};

/// One LoRA layer as stored in a file, in PyTorch layout.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// Down-projection `[rank, fan_in]` (`lora_down` / `lora_A`), row-major.
    pub down: Vec<f32>,
    /// Up-projection `[fan_out, rank]` (`lora_up` / `lora_B`), row-major.
    pub up: Vec<f32>,
    /// The rank.
    pub rank: usize,
    /// `fan_in`: `in` for linear layers, `in * kh * kw` for convolutions.
    pub fan_in: usize,
    /// `fan_out`: the weight's first axis.
    pub fan_out: usize,
    /// `alpha`; the delta is scaled by `alpha / rank` (`None`: `alpha = rank`).
    pub alpha: Option<f32>,
}

impl LoraLayer {
    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a as f64 / self.rank as f64)
    }
}

/// The LoRA layers of one model, keyed by weight path (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    /// Layers by burn weight path.
    pub layers: BTreeMap<String, LoraLayer>,
}

impl LoraWeights {
    /// Number of adapted weights.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether no weight is adapted.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Number of LoRA parameters.
    pub fn num_params(&self) -> usize {
        self.layers
            .values()
            .map(|l| l.down.len() + l.up.len())
            .sum()
    }
}

/// How [`apply_lora`] applies the layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Add the deltas into the weights (no cost at inference).
    #[default]
    Merge,
    /// Keep the base weights and add the deltas on each use (removable).
    OnTheFly,
}

/// Errors of applying LoRA layers to a model.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Layers of the file name weights the model does not have.
    #[error("{} LoRA layer(s) name weights this model does not have: {}", .0.len(), preview(.0))]
    UnknownLayers(Vec<String>),
    /// A layer's factors do not fit the weight.
    #[error("LoRA layer `{key}` does not fit: {reason}")]
    Mismatch {
        /// The weight path.
        key: String,
        /// What does not fit.
        reason: String,
    },
    /// On-the-fly layers are already attached: merge them or remove them first.
    #[error(
        "the model already carries on-the-fly LoRA layers; apply all LoRAs in one call, or \
         merge / remove the attached ones first"
    )]
    AlreadyAttached,
}

fn preview(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(5)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > 5 {
        s.push_str(", ...");
    }
    s
}

/// One set of LoRA factors of a [`LoraDelta`].
#[derive(Module, Debug)]
pub struct LoraFactors {
    /// `[rank, fan_in]`.
    pub down: Param<Tensor<2>>,
    /// `[fan_out, rank]`.
    pub up: Param<Tensor<2>>,
    /// `alpha / rank` times the strength.
    pub scale: f64,
}

/// The reparameterization of a weight by one or more LoRA layers:
/// `W + sum_i scale_i * up_i @ down_i`.
///
/// On a linear layer's weight (burn's `[d_in, d_out]` view of PyTorch's `[out, in]`)
/// the delta is transposed; on a convolution's `[out, in, kh, kw]` it is reshaped.
#[derive(Module, Debug)]
pub struct LoraDelta {
    /// The LoRA layers, summed.
    pub factors: Vec<LoraFactors>,
}

impl LoraDelta {
    /// `sum_i scale_i * up_i @ down_i` in PyTorch layout, `[fan_out, fan_in]`.
    pub fn delta(&self) -> Tensor<2> {
        let mut sum: Option<Tensor<2>> = None;
        for f in &self.factors {
            let d = f.up.val().matmul(f.down.val()).mul_scalar(f.scale);
            sum = Some(match sum {
                Some(s) => s + d,
                None => d,
            });
        }
        sum.expect("a LoraDelta holds at least one layer")
    }
}

/// The delta in the weight's own layout.
fn delta_for<const D: usize>(delta: Tensor<2>, base_shape: Shape) -> Tensor<D> {
    if D == 2 {
        // Linear layers keep PyTorch's `[out, in]` and expose `[in, out]`.
        delta.transpose().reshape(base_shape)
    } else {
        delta.reshape(base_shape)
    }
}

impl Reparameterization for LoraDelta {
    const NAME: &'static str = "lora";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        // An 8-bit base weight (a GGUF file's) is dequantised for each use.
        let base = sd_kernels::ops::dequantized(base);
        let delta = delta_for::<D>(self.delta(), base.shape());
        let delta = if delta.dtype() != base.dtype() {
            delta.cast(base.dtype())
        } else {
            delta
        };
        base + delta
    }
}

/// PyTorch `(fan_out, fan_in)` of a weight of burn shape `dims` (rank 2: a linear layer
/// `[in, out]`; rank 4: a convolution `[out, in, kh, kw]`).
fn fans(dims: &[usize]) -> Option<(usize, usize)> {
    match dims.len() {
        2 => Some((dims[1], dims[0])),
        4 => Some((dims[0], dims[1] * dims[2] * dims[3])),
        _ => None,
    }
}

/// Paths of the weights LoRA can adapt (rank-2 linear and rank-4 convolution weights).
pub fn adaptable_weights<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Collect {
        path: Vec<String>,
        out: BTreeMap<String, Vec<usize>>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.path.join(".");
            if (D == 2 || D == 4) && path.ends_with(".weight") && !path.contains(".lora.") {
                self.out
                    .insert(path, param.lazy_shape().iter().copied().collect());
            }
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}

/// Whether any weight of `module` carries on-the-fly LoRA layers.
pub fn has_lora<M: Module>(module: &M) -> bool {
    struct Find(bool);
    impl ModuleVisitor for Find {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if name == <LoraDelta as Reparameterization>::NAME
                && container_type == "Reparameterization"
            {
                self.0 = true;
            }
        }
    }
    let mut f = Find(false);
    module.visit(&mut f);
    f.0
}

/// Checks every layer against the module's weights.
fn check_layers(
    weights: &BTreeMap<String, Vec<usize>>,
    loras: &[(&LoraWeights, f32)],
) -> Result<(), LoraError> {
    let mut unknown = BTreeSet::new();
    for (lora, _) in loras {
        for (key, layer) in &lora.layers {
            let Some(dims) = weights.get(key) else {
                unknown.insert(key.clone());
                continue;
            };
            let (fan_out, fan_in) = fans(dims).expect("adaptable weights are rank 2 or 4");
            let reason = if layer.fan_out != fan_out || layer.fan_in != fan_in {
                Some(format!(
                    "factors give a [{}, {}] delta, the weight is [{fan_out}, {fan_in}]",
                    layer.fan_out, layer.fan_in
                ))
            } else if layer.down.len() != layer.rank * layer.fan_in
                || layer.up.len() != layer.fan_out * layer.rank
            {
                Some("factor sizes do not match rank and fans".into())
            } else if layer.rank == 0 {
                Some("rank 0".into())
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(LoraError::Mismatch {
                    key: key.clone(),
                    reason,
                });
            }
        }
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(LoraError::UnknownLayers(unknown.into_iter().collect()))
    }
}

/// The factors of `layer` on `device`, in f32 (the delta is cast to the weight's dtype).
fn factors(layer: &LoraLayer, strength: f32, device: &Device) -> LoraFactors {
    let down = Tensor::<2>::from_data(
        TensorData::new(layer.down.clone(), [layer.rank, layer.fan_in]),
        (device, DType::F32),
    );
    let up = Tensor::<2>::from_data(
        TensorData::new(layer.up.clone(), [layer.fan_out, layer.rank]),
        (device, DType::F32),
    );
    LoraFactors {
        down: Param::from_tensor(down).set_require_grad(false),
        up: Param::from_tensor(up).set_require_grad(false),
        scale: layer.scale() * strength as f64,
    }
}

/// The layers of every LoRA for the weight at `path`, or `None` if none adapts it.
fn delta_of(loras: &[(&LoraWeights, f32)], path: &str, device: &Device) -> Option<LoraDelta> {
    let factors: Vec<LoraFactors> = loras
        .iter()
        .filter_map(|(lora, strength)| {
            lora.layers
                .get(path)
                .map(|layer| factors(layer, *strength, device))
        })
        .collect();
    (!factors.is_empty()).then_some(LoraDelta { factors })
}

struct Attach<'a> {
    loras: &'a [(&'a LoraWeights, f32)],
}

impl Reparameterizer for Attach<'_> {
    type Reparam = LoraDelta;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraDelta>) {
        let delta = delta_of(self.loras, path, &param.lazy_device());
        (param, delta)
    }
}

struct Merge<'a> {
    loras: &'a [(&'a LoraWeights, f32)],
    path: Vec<String>,
}

impl ModuleMapper for Merge<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let Some(delta) = delta_of(self.loras, &path, &param.lazy_device()) else {
            return param;
        };
        param.map(|w| {
            let w_dtype = w.dtype();
            let merged = delta.apply(sd_kernels::ops::to_f32(w));
            match w_dtype {
                DType::F32 => merged,
                // The sum of an 8-bit weight (a GGUF file's) and the delta is no
                // longer 8-bit: it is kept in f16 (on the CPU, where weights stay
                // 8-bit, the kernels compute in f32 from it).
                DType::QFloat(_) => merged.cast(DType::F16),
                d => merged.cast(d),
            }
        })
    }
}

/// Applies LoRA layers, each with a strength (1.0: as trained), to `module`.
///
/// Every layer must name a rank-2 or rank-4 weight of `module` with matching fans,
/// else nothing is applied and the error lists what does not fit. Several LoRAs for
/// the same weight are summed. With [`LoraMode::OnTheFly`] the model must not carry
/// on-the-fly layers already (pass all LoRAs in one call).
pub fn apply_lora<M: Module>(
    module: M,
    loras: &[(&LoraWeights, f32)],
    mode: LoraMode,
) -> Result<M, LoraError> {
    check_layers(&adaptable_weights(&module), loras)?;
    match mode {
        LoraMode::Merge => Ok(module.map(&mut Merge {
            loras,
            path: Vec::new(),
        })),
        LoraMode::OnTheFly => {
            if has_lora(&module) {
                return Err(LoraError::AlreadyAttached);
            }
            Ok(module.apply_reparameterization(Attach { loras }))
        }
    }
}

/// Folds on-the-fly LoRA layers into the weights (burn's `materialize`).
pub fn merge_lora<M: Module>(module: M) -> M {
    module.materialize()
}

/// Which weights LoRA training adapts: those whose path, without `.weight`, ends with
/// one of these module names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTargets(pub Vec<String>);

impl LoraTargets {
    /// The U-Net attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`), as
    /// diffusers' LoRA training scripts adapt them.
    pub fn unet_attention() -> Self {
        Self(
            ["to_q", "to_k", "to_v", "to_out"]
                .map(String::from)
                .to_vec(),
        )
    }

    /// The CLIP text encoder's attention projections (`q_proj`, `k_proj`, `v_proj`,
    /// `out_proj`).
    pub fn text_encoder_attention() -> Self {
        Self(
            ["q_proj", "k_proj", "v_proj", "out_proj"]
                .map(String::from)
                .to_vec(),
        )
    }

    /// Whether the weight at `path` is a target.
    pub fn matches(&self, path: &str) -> bool {
        let Some(module) = path.strip_suffix(".weight") else {
            return false;
        };
        let name = module.rsplit('.').next().unwrap_or(module);
        self.0.iter().any(|t| t == name)
    }
}

/// Settings of a trainable LoRA.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Rank of the factors.
    pub rank: usize,
    /// Scaling numerator: the delta is `alpha / rank * up @ down`.
    pub alpha: f32,
    /// Adapted weights.
    pub targets: LoraTargets,
}

struct AttachTrainable<'a> {
    config: &'a LoraConfig,
}

impl Reparameterizer for AttachTrainable<'_> {
    type Reparam = LoraDelta;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<LoraDelta>) {
        let param = param.set_require_grad(false);
        let dims: Vec<usize> = param.lazy_shape().iter().copied().collect();
        let Some((fan_out, fan_in)) = fans(&dims) else {
            return (param, None);
        };
        if !self.config.targets.matches(path) {
            return (param, None);
        }
        let device = param.lazy_device();
        let rank = self.config.rank;
        // diffusers' LoRA scripts (`init_lora_weights="gaussian"`): down ~ N(0, 1/rank),
        // up = 0, so the adapted model starts equal to the base.
        let down = Tensor::<2>::random(
            [rank, fan_in],
            Distribution::Normal(0.0, 1.0 / rank as f64),
            &device,
        );
        let up = Tensor::<2>::zeros([fan_out, rank], &device);
        let delta = LoraDelta {
            factors: vec![LoraFactors {
                down: Param::from_tensor(down),
                up: Param::from_tensor(up),
                scale: self.config.alpha as f64 / rank as f64,
            }],
        };
        (param, Some(delta))
    }
}

/// Freezes every parameter of `module` and attaches trainable LoRA factors (down
/// Gaussian with std `1 / rank`, up zero) to the targeted weights. Put the module on an
/// autodiff device first; only the factors then receive gradients.
pub fn attach_trainable_lora<M: Module>(module: M, config: &LoraConfig) -> Result<M, LoraError> {
    if has_lora(&module) {
        return Err(LoraError::AlreadyAttached);
    }
    Ok(module.apply_reparameterization(AttachTrainable { config }))
}

/// The trained LoRA layers of `module` (made by [`attach_trainable_lora`] with
/// `config`), as [`LoraWeights`] ready to save: `alpha` is the config's.
pub fn extract_lora<M: Module>(module: &M, config: &LoraConfig) -> LoraWeights {
    #[derive(Default)]
    struct Extract {
        path: Vec<String>,
        down: BTreeMap<String, Tensor<2>>,
        up: BTreeMap<String, Tensor<2>>,
    }
    impl ModuleVisitor for Extract {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // `{weight path}.lora.factors.0.{down|up}`: the first set of factors.
            let path = self.path.join(".");
            let Some((weight, rest)) = path.split_once(".lora.factors.0.") else {
                return;
            };
            if D != 2 {
                return;
            }
            let t: Tensor<2> = param.val().reshape(param.lazy_shape());
            match rest {
                "down" => self.down.insert(weight.to_string(), t),
                "up" => self.up.insert(weight.to_string(), t),
                _ => None,
            };
        }
    }
    let mut e = Extract::default();
    module.visit(&mut e);
    let read = |t: Tensor<2>| {
        sd_kernels::ops::to_f32(t)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 data")
    };
    let mut layers = BTreeMap::new();
    for (key, down) in e.down {
        let Some(up) = e.up.remove(&key) else {
            continue;
        };
        let [rank, fan_in] = down.dims();
        let [fan_out, _] = up.dims();
        layers.insert(
            key,
            LoraLayer {
                down: read(down),
                up: read(up),
                rank,
                fan_in,
                fan_out,
                alpha: Some(config.alpha),
            },
        );
    }
    LoraWeights { layers }
}

/// Sets the factors made by [`attach_trainable_lora`] to `weights` (a saved training
/// state), keeping the parameters' ids and trainability. Layers `weights` lacks keep
/// their values.
pub fn load_lora_factors<M: Module>(module: M, weights: &LoraWeights) -> Result<M, LoraError> {
    struct Set<'a> {
        path: Vec<String>,
        weights: &'a LoraWeights,
        error: Option<LoraError>,
    }
    impl ModuleMapper for Set<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.path.join(".");
            let Some((weight, part)) = path.split_once(".lora.factors.0.") else {
                return param;
            };
            let Some(layer) = self.weights.layers.get(weight) else {
                return param;
            };
            let (values, shape) = match part {
                "down" => (&layer.down, [layer.rank, layer.fan_in]),
                "up" => (&layer.up, [layer.fan_out, layer.rank]),
                _ => return param,
            };
            let dims: Vec<usize> = param.lazy_shape().iter().copied().collect();
            if dims != shape {
                self.error = Some(LoraError::Mismatch {
                    key: path.clone(),
                    reason: format!("saved {shape:?}, the model has {dims:?}"),
                });
                return param;
            }
            let values = values.clone();
            param.map(|t| {
                let device = t.device();
                let dtype = t.dtype();
                let n: Tensor<D> =
                    Tensor::from_data(TensorData::new(values, dims), (&device, DType::F32));
                // A new tensor is not tracked: keep the factor trainable.
                n.cast(dtype).set_require_grad(t.is_require_grad())
            })
        }
    }
    let mut set = Set {
        path: Vec::new(),
        weights,
        error: None,
    };
    let module = module.map(&mut set);
    match set.error {
        Some(e) => Err(e),
        None => Ok(module),
    }
}
