//! LoRA files: the kohya / A1111 layout and diffusers' layouts, read and written.
//!
//! Recognised keys (U-Net and CLIP text encoder; `{m}` is the diffusers module name,
//! `{k}` the same with `_` for `.`):
//! - kohya: `lora_unet_{k}.lora_down.weight`, `.lora_up.weight`, `.alpha`;
//!   `lora_te_{k}...` for the text encoder (`lora_te1_` also accepted), `lora_te2_`
//!   for SDXL's second; SDXL U-Nets' layers in the original naming
//!   (`lora_unet_input_blocks_4_1_...`) through [`LoraFile::weights_for_aliased`];
//! - diffusers: `unet.{m}.lora.down.weight` / `.lora.up.weight` (what
//!   `save_lora_weights` writes), PEFT's `unet.{m}.lora_A.weight` / `.lora_B.weight`,
//!   the older attention-processor keys (`unet.{...}.processor.to_q_lora.down.weight`),
//!   `text_encoder.{m}...`, `text_encoder_2.{m}...`, and PEFT's `base_model.model.{m}...` (U-Net). Alpha comes
//!   from `{m}.alpha` keys, else from the `lora_adapter_metadata` header diffusers writes,
//!   else it equals the rank.
//!
//! LoHa, LoKr, DoRA and other non-LoRA networks are reported as unsupported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::DType;
use sd_models::lora::{LoraLayer, LoraWeights, adaptable_weights};

use crate::error::IoError;
use crate::save::{NamedTensor, write_safetensors};
use crate::weights::WeightSource;

/// Which model a LoRA layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraComponent {
    /// The U-Net.
    Unet,
    /// The CLIP text encoder (SDXL's first).
    TextEncoder,
    /// SDXL's second text encoder (`text_encoder_2`, `lora_te2_`).
    TextEncoder2,
}

impl LoraComponent {
    /// Every component.
    pub const ALL: [LoraComponent; 3] = [
        LoraComponent::Unet,
        LoraComponent::TextEncoder,
        LoraComponent::TextEncoder2,
    ];

    /// The key prefix of the diffusers layout (`unet`, `text_encoder`), also the
    /// component's name in `lora_adapter_metadata`.
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            LoraComponent::Unet => "unet",
            LoraComponent::TextEncoder => "text_encoder",
            LoraComponent::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The key prefix of the kohya layout (`lora_unet_`, `lora_te_`, `lora_te2_`).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            LoraComponent::Unet => "lora_unet_",
            LoraComponent::TextEncoder => "lora_te_",
            LoraComponent::TextEncoder2 => "lora_te2_",
        }
    }
}

/// The key layout of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya's sd-scripts / A1111 (`lora_unet_..._to_q.lora_down.weight`).
    Kohya,
    /// diffusers (`unet.....to_q.lora.down.weight`, or PEFT's `lora_A` / `lora_B`).
    Diffusers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Down,
    Up,
    Alpha,
}

#[derive(Debug, Default)]
struct RawLayer {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// A LoRA safetensors file, parsed into layers per component; map them onto a model
/// with [`LoraFile::weights_for`].
#[derive(Debug)]
pub struct LoraFile {
    path: PathBuf,
    source: WeightSource,
    format: LoraFormat,
    /// (component, module name: diffusers dotted for diffusers files, underscored
    /// for kohya files) -> keys.
    layers: BTreeMap<(LoraComponent, String), RawLayer>,
    default_alpha: BTreeMap<LoraComponent, f32>,
}

const UNSUPPORTED_NETWORKS: [&str; 8] = [
    "hada_w1",
    "hada_w2",
    "lokr_w1",
    "lokr_w2",
    "dora_scale",
    ".diff",
    "oft_",
    "lora_mid",
];

fn unsupported(path: &Path, what: String) -> IoError {
    IoError::Unsupported(format!("{}: {what}", path.display()))
}

/// Splits a diffusers-layout key into (component, module, role).
fn parse_diffusers(key: &str) -> Option<(LoraComponent, String, Role)> {
    let (component, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (LoraComponent::Unet, r)
    } else if let Some(r) = key.strip_prefix("transformer.") {
        // SD 3's denoiser (`StableDiffusion3Pipeline.save_lora_weights`).
        (LoraComponent::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (LoraComponent::TextEncoder2, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (LoraComponent::TextEncoder, r)
    } else if let Some(r) = key.strip_prefix("base_model.model.") {
        (LoraComponent::Unet, r)
    } else {
        return None;
    };
    const SUFFIXES: [(&str, Role); 11] = [
        (".lora.down.weight", Role::Down),
        (".lora.up.weight", Role::Up),
        (".lora_A.weight", Role::Down),
        (".lora_B.weight", Role::Up),
        (".lora_A.default.weight", Role::Down),
        (".lora_B.default.weight", Role::Up),
        (".lora_down.weight", Role::Down),
        (".lora_up.weight", Role::Up),
        (".lora_linear_layer.down.weight", Role::Down),
        (".lora_linear_layer.up.weight", Role::Up),
        (".alpha", Role::Alpha),
    ];
    for (suffix, role) in SUFFIXES {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((component, processor_name(module), role));
        }
    }
    // Attention-processor keys: `{attn}.processor.to_q_lora.down.weight`.
    for (suffix, role) in [(".down.weight", Role::Down), (".up.weight", Role::Up)] {
        if let Some(module) = rest.strip_suffix(suffix)
            && module.contains(".processor.")
        {
            return Some((component, processor_name(module), role));
        }
    }
    None
}

/// `{attn}.processor.to_q_lora` -> `{attn}.to_q`; `to_out_lora` -> `to_out.0`.
fn processor_name(module: &str) -> String {
    let Some((attn, proc)) = module.split_once(".processor.") else {
        return module.to_string();
    };
    let proj = proc.strip_suffix("_lora").unwrap_or(proc);
    let proj = if proj == "to_out" { "to_out.0" } else { proj };
    format!("{attn}.{proj}")
}

/// Splits a kohya key into (component, underscored module, role).
fn parse_kohya(key: &str) -> Option<(LoraComponent, String, Role)> {
    let (component, rest) = if let Some(r) = key.strip_prefix("lora_unet_") {
        (LoraComponent::Unet, r)
    } else if let Some(r) = key
        .strip_prefix("lora_te_")
        .or_else(|| key.strip_prefix("lora_te1_"))
    {
        (LoraComponent::TextEncoder, r)
    } else if let Some(r) = key.strip_prefix("lora_te2_") {
        (LoraComponent::TextEncoder2, r)
    } else {
        return None;
    };
    let (module, suffix) = rest.split_once('.')?;
    let role = match suffix {
        "lora_down.weight" => Role::Down,
        "lora_up.weight" => Role::Up,
        "alpha" => Role::Alpha,
        _ => return None,
    };
    Some((component, module.to_string(), role))
}

impl LoraFile {
    /// Opens and parses a LoRA file. Every tensor must be a recognised LoRA key, each
    /// layer must have both factors, and networks other than LoRA (LoHa, LoKr, DoRA)
    /// are refused.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, IoError> {
        let path = path.as_ref().to_path_buf();
        let source = WeightSource::open(&path)?;
        let keys: Vec<&String> = source.tensors().keys().collect();
        if keys.is_empty() {
            return Err(unsupported(&path, "the file holds no tensors".into()));
        }
        if let Some(k) = keys
            .iter()
            .find(|k| UNSUPPORTED_NETWORKS.iter().any(|n| k.contains(n)))
        {
            return Err(unsupported(
                &path,
                format!("`{k}` belongs to a network type other than LoRA (LoHa/LoKr/DoRA/...)"),
            ));
        }
        let format = if keys.iter().any(|k| k.starts_with("lora_")) {
            LoraFormat::Kohya
        } else {
            LoraFormat::Diffusers
        };
        let mut layers: BTreeMap<(LoraComponent, String), RawLayer> = BTreeMap::new();
        let mut unknown = Vec::new();
        for key in keys {
            let parsed = match format {
                LoraFormat::Kohya => parse_kohya(key),
                LoraFormat::Diffusers => parse_diffusers(key),
            };
            let Some((component, module, role)) = parsed else {
                unknown.push(key.clone());
                continue;
            };
            let layer = layers.entry((component, module)).or_default();
            let slot = match role {
                Role::Down => &mut layer.down,
                Role::Up => &mut layer.up,
                Role::Alpha => &mut layer.alpha,
            };
            *slot = Some(key.clone());
        }
        if !unknown.is_empty() {
            unknown.truncate(5);
            return Err(unsupported(
                &path,
                format!("not LoRA keys this reader knows: {}", unknown.join(", ")),
            ));
        }
        for ((_, module), layer) in &layers {
            if layer.down.is_none() || layer.up.is_none() {
                return Err(unsupported(
                    &path,
                    format!("LoRA layer `{module}` lacks its down or up factor"),
                ));
            }
        }
        let mut default_alpha = BTreeMap::new();
        if let Some(meta) = source.metadata().get("lora_adapter_metadata")
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(meta)
        {
            for component in LoraComponent::ALL {
                let prefixes: &[&str] = match component {
                    // SD 3's files name the denoiser `transformer`.
                    LoraComponent::Unet => &["unet", "transformer"],
                    c => &[c.diffusers_prefix()],
                };
                if let Some(a) = prefixes
                    .iter()
                    .find_map(|p| json.get(format!("{p}.lora_alpha")).and_then(|v| v.as_f64()))
                {
                    default_alpha.insert(component, a as f32);
                }
            }
        }
        Ok(Self {
            path,
            source,
            format,
            layers,
            default_alpha,
        })
    }

    /// The file's key layout.
    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file holds layers for `component`.
    pub fn has(&self, component: LoraComponent) -> bool {
        self.layers.keys().any(|(c, _)| *c == component)
    }

    /// The layers of `component`, keyed by the weight paths of `model` (the U-Net or
    /// the text encoder the LoRA is for). A layer naming a module `model` lacks, or
    /// whose factors do not fit it, is an error.
    pub fn weights_for<M: Module>(
        &self,
        component: LoraComponent,
        model: &M,
    ) -> Result<LoraWeights, IoError> {
        self.weights_for_aliased(component, model, |_| None)
    }

    /// [`Self::weights_for`] where a module may also go by another name:
    /// `alias(diffusers key of the weight)` gives it in the original (LDM) naming,
    /// e.g. `input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight`, as kohya's SDXL
    /// LoRAs spell the U-Net (`lora_unet_input_blocks_4_1_..._to_k`). An alias may
    /// end in `#{part}/{parts}`: the weight is that row slice of a fused original
    /// module (SD 3's `qkv`), and takes the same rows of the layer's up factor; or in
    /// `#swap`: the original orders the two halves of the rows the other way.
    pub fn weights_for_aliased<M: Module>(
        &self,
        component: LoraComponent,
        model: &M,
        alias: impl Fn(&str) -> Option<String>,
    ) -> Result<LoraWeights, IoError> {
        let weights = adaptable_weights(model);
        // Module name as the file spells it -> the weights it adapts: (burn weight
        // path, weight shape, which rows of the layer's delta).
        let mut by_name: BTreeMap<String, Vec<Target>> = BTreeMap::new();
        let spell = |name: &str| match self.format {
            LoraFormat::Kohya => name.replace('.', "_"),
            LoraFormat::Diffusers => name.to_string(),
        };
        for (path, shape) in &weights {
            let key = sd_models::diffusers_key(path);
            let module = key.strip_suffix(".weight").unwrap_or(&key).to_string();
            let target = |rows| Target {
                path: path.clone(),
                shape: shape.clone(),
                rows,
            };
            if let Some(other) = alias(&key) {
                let (other, rows) = split_rows(&other);
                let other = other.strip_suffix(".weight").unwrap_or(other);
                let targets = by_name.entry(spell(other)).or_default();
                targets.retain(|t| t.path != *path);
                targets.push(target(rows));
            }
            if component != LoraComponent::Unet
                && self.format == LoraFormat::Diffusers
                && let Some(short) = module.strip_prefix("text_model.")
            {
                // transformers 5's CLIPTextModel has no `text_model.` level, so the
                // files PEFT makes from it name `encoder.layers.0.self_attn.q_proj`.
                by_name.insert(short.to_string(), vec![target(Rows::All)]);
            }
            by_name.insert(spell(&module), vec![target(Rows::All)]);
        }
        let mut out = LoraWeights::default();
        let mut unknown = Vec::new();
        for ((c, module), raw) in &self.layers {
            if *c != component {
                continue;
            }
            let Some(targets) = by_name.get(module) else {
                unknown.push(module.clone());
                continue;
            };
            for t in targets {
                let layer = self.read_layer(component, module, raw, &t.shape, t.rows)?;
                out.layers.insert(t.path.clone(), layer);
            }
        }
        if !unknown.is_empty() {
            return Err(IoError::Lora {
                path: self.path.clone(),
                source: sd_models::lora::LoraError::UnknownLayers(unknown),
            });
        }
        Ok(out)
    }

    fn read_layer(
        &self,
        component: LoraComponent,
        module: &str,
        raw: &RawLayer,
        weight_shape: &[usize],
        rows: Rows,
    ) -> Result<LoraLayer, IoError> {
        let mismatch = |reason: String| IoError::Lora {
            path: self.path.clone(),
            source: sd_models::lora::LoraError::Mismatch {
                key: module.to_string(),
                reason,
            },
        };
        let (down_key, up_key) = (raw.down.as_ref().unwrap(), raw.up.as_ref().unwrap());
        let down_shape = self.source.get(down_key).unwrap().shape.clone();
        let up_shape = self.source.get(up_key).unwrap().shape.clone();
        // burn shapes: linear `[in, out]`, convolution `[out, in, kh, kw]`.
        let (fan_out, fan_in) = match weight_shape.len() {
            2 => (weight_shape[1], weight_shape[0]),
            _ => (weight_shape[0], weight_shape[1..].iter().product()),
        };
        if down_shape.len() < 2 || up_shape.len() < 2 {
            return Err(mismatch(format!(
                "factor shapes {down_shape:?} / {up_shape:?} are not matrices"
            )));
        }
        let rank = down_shape[0];
        let down_fan_in: usize = down_shape[1..].iter().product();
        let up_rank: usize = up_shape[1..].iter().product();
        let up_rows = match rows {
            Rows::Part { parts, .. } => up_shape[0] / parts.max(1),
            _ => up_shape[0],
        };
        if up_rows != fan_out || down_fan_in != fan_in || up_rank != rank {
            return Err(mismatch(format!(
                "down {down_shape:?} and up {up_shape:?} do not make a [{fan_out}, {fan_in}] \
                 delta"
            )));
        }
        let read = |key: &str, shape: Vec<usize>| -> Result<Vec<f32>, IoError> {
            self.source
                .read_float(key, DType::F32, shape)?
                .try_into_vec::<f32>()
                .map_err(|e| unsupported(&self.path, format!("`{key}`: {e:?}")))
        };
        let down = read(down_key, down_shape)?;
        let up = rows.take(read(up_key, up_shape)?, rank);
        let alpha = match &raw.alpha {
            Some(k) => {
                let v = read(k, self.source.get(k).unwrap().shape.clone())?;
                Some(*v.first().ok_or_else(|| mismatch("empty alpha".into()))?)
            }
            None => self.default_alpha.get(&component).copied(),
        };
        Ok(LoraLayer {
            down,
            up,
            rank,
            fan_in,
            fan_out,
            alpha,
        })
    }
}

/// A weight a LoRA layer adapts.
struct Target {
    path: String,
    shape: Vec<usize>,
    rows: Rows,
}

/// Which rows of a layer's delta (its up factor's rows) a weight takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    All,
    /// Rows `part` of `parts` equal slices (a fused original module).
    Part {
        part: usize,
        parts: usize,
    },
    /// The two halves swapped.
    Swapped,
}

impl Rows {
    /// The rows of an up factor `[n, rank]` (row-major) this weight takes.
    fn take(self, up: Vec<f32>, rank: usize) -> Vec<f32> {
        let row = rank.max(1);
        match self {
            Rows::All => up,
            Rows::Part { part, parts } => {
                let n = up.len() / row / parts.max(1) * row;
                up[part * n..(part + 1) * n].to_vec()
            }
            Rows::Swapped => {
                let half = up.len() / row / 2 * row;
                [&up[half..], &up[..half]].concat()
            }
        }
    }
}

/// Splits an alias's `#{part}/{parts}` or `#swap` suffix off.
fn split_rows(alias: &str) -> (&str, Rows) {
    let Some((name, suffix)) = alias.rsplit_once('#') else {
        return (alias, Rows::All);
    };
    if suffix == "swap" {
        return (name, Rows::Swapped);
    }
    match suffix.split_once('/').map(|(a, b)| (a.parse(), b.parse())) {
        Some((Ok(part), Ok(parts))) if part < parts => (name, Rows::Part { part, parts }),
        _ => (alias, Rows::All),
    }
}

/// The shapes a layer is stored with: 2-D factors for linear weights; for
/// convolutions down `[rank, in, kh, kw]` and up `[out, rank, 1, 1]`.
fn factor_shapes(layer: &LoraLayer, weight_shape: Option<&[usize]>) -> (Vec<usize>, Vec<usize>) {
    match weight_shape {
        Some(s) if s.len() == 4 => (
            vec![layer.rank, s[1], s[2], s[3]],
            vec![layer.fan_out, layer.rank, 1, 1],
        ),
        _ => (
            vec![layer.rank, layer.fan_in],
            vec![layer.fan_out, layer.rank],
        ),
    }
}

/// The LoRA layers of one component to save, with the shapes of the weights they adapt
/// (for the module names and convolution shapes).
pub struct LoraToSave<'a> {
    /// U-Net or text encoder.
    pub component: LoraComponent,
    /// The layers.
    pub weights: &'a LoraWeights,
    /// The adapted model's weight shapes by path
    /// ([`sd_models::lora::adaptable_weights`]).
    pub weight_shapes: BTreeMap<String, Vec<usize>>,
}

impl<'a> LoraToSave<'a> {
    /// The layers `weights` of `model` (the U-Net or a text encoder), as `component`.
    pub fn new<M: Module>(component: LoraComponent, weights: &'a LoraWeights, model: &M) -> Self {
        Self {
            component,
            weights,
            weight_shapes: adaptable_weights(model),
        }
    }
}

/// Writes LoRA layers in `format`, f32 or f16 (`dtype`).
///
/// kohya files carry an `.alpha` per layer and `ss_network_dim` / `ss_network_alpha`
/// metadata; diffusers files carry `lora_adapter_metadata` (rank and alpha per
/// component), so every layer of a component must share one rank and alpha there.
pub fn save_lora(
    path: impl AsRef<Path>,
    parts: &[LoraToSave<'_>],
    format: LoraFormat,
    dtype: DType,
) -> Result<(), IoError> {
    let path = path.as_ref();
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut adapter_meta = serde_json::Map::new();
    for part in parts {
        let shapes = &part.weight_shapes;
        let mut rank_alpha: Option<(usize, f32)> = None;
        for (weight_path, layer) in &part.weights.layers {
            let Some(weight_shape) = shapes.get(weight_path) else {
                return Err(IoError::Lora {
                    path: path.to_path_buf(),
                    source: sd_models::lora::LoraError::UnknownLayers(vec![weight_path.clone()]),
                });
            };
            let key = sd_models::diffusers_key(weight_path);
            let module = key.strip_suffix(".weight").unwrap_or(&key);
            let alpha = layer.alpha.unwrap_or(layer.rank as f32);
            let (down_shape, up_shape) = factor_shapes(layer, Some(weight_shape));
            let (down_key, up_key) = match format {
                LoraFormat::Kohya => {
                    let name = format!(
                        "{}{}",
                        part.component.kohya_prefix(),
                        module.replace('.', "_")
                    );
                    tensors.push(NamedTensor {
                        key: format!("{name}.alpha"),
                        shape: vec![],
                        values: vec![alpha],
                    });
                    (
                        format!("{name}.lora_down.weight"),
                        format!("{name}.lora_up.weight"),
                    )
                }
                LoraFormat::Diffusers => {
                    let prefix = part.component.diffusers_prefix();
                    match rank_alpha {
                        None => rank_alpha = Some((layer.rank, alpha)),
                        Some(ra) if ra == (layer.rank, alpha) => {}
                        Some(_) => {
                            return Err(IoError::Unsupported(format!(
                                "{}: the diffusers LoRA layout holds one rank and alpha per \
                                 component, these layers differ; save in the kohya layout",
                                path.display()
                            )));
                        }
                    }
                    (
                        format!("{prefix}.{module}.lora.down.weight"),
                        format!("{prefix}.{module}.lora.up.weight"),
                    )
                }
            };
            tensors.push(NamedTensor {
                key: down_key,
                shape: down_shape,
                values: layer.down.clone(),
            });
            tensors.push(NamedTensor {
                key: up_key,
                shape: up_shape,
                values: layer.up.clone(),
            });
            if format == LoraFormat::Kohya {
                metadata.insert("ss_network_dim".into(), layer.rank.to_string());
                metadata.insert("ss_network_alpha".into(), alpha.to_string());
            }
        }
        if let Some((rank, alpha)) = rank_alpha {
            let prefix = part.component.diffusers_prefix();
            adapter_meta.insert(format!("{prefix}.r"), rank.into());
            adapter_meta.insert(format!("{prefix}.lora_alpha"), alpha.into());
        }
    }
    match format {
        LoraFormat::Kohya => {
            metadata.insert("ss_network_module".into(), "networks.lora".into());
        }
        LoraFormat::Diffusers => {
            metadata.insert("format".into(), "pt".into());
            if !adapter_meta.is_empty() {
                metadata.insert(
                    "lora_adapter_metadata".into(),
                    serde_json::Value::Object(adapter_meta).to_string(),
                );
            }
        }
    }
    write_safetensors(path, &tensors, dtype, &metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_keys_parse() {
        let (c, m, r) = parse_diffusers(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight",
        )
        .unwrap();
        assert_eq!(c, LoraComponent::Unet);
        assert_eq!(
            m,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
        );
        assert_eq!(r, Role::Up);
        let (_, m, r) =
            parse_diffusers("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight")
                .unwrap();
        assert_eq!(
            m,
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
        );
        assert_eq!(r, Role::Down);
        let (c, m, r) = parse_diffusers(
            "text_encoder.text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight",
        )
        .unwrap();
        assert_eq!(c, LoraComponent::TextEncoder);
        assert_eq!(m, "text_model.encoder.layers.3.self_attn.q_proj");
        assert_eq!(r, Role::Down);
        assert!(parse_diffusers("vae.decoder.conv_in.weight").is_none());
    }

    #[test]
    fn kohya_keys_parse() {
        let (c, m, r) = parse_kohya(
            "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k.lora_down.weight",
        )
        .unwrap();
        assert_eq!(c, LoraComponent::Unet);
        assert_eq!(
            m,
            "up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_k"
        );
        assert_eq!(r, Role::Down);
        let (c, _, r) = parse_kohya("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha").unwrap();
        assert_eq!(c, LoraComponent::TextEncoder);
        assert_eq!(r, Role::Alpha);
        assert!(parse_kohya("lora_unet_x.hada_w1_a").is_none());
    }
}
