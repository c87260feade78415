//! Key maps of original CompVis / LDM single-file checkpoints, derived from the
//! U-Net and VAE configs by block arithmetic (no per-model tables).
//!
//! | component | prefix |
//! |---|---|
//! | U-Net | `model.diffusion_model.` |
//! | VAE | `first_stage_model.` |
//! | CLIP text encoder | `cond_stage_model.transformer.` |

use std::collections::BTreeMap;

use sd_models::config::{
    AutoencoderKLConfig, ControlNetConfig, DownBlockType, UNet2DConditionConfig, UpBlockType,
};

/// Prefix of the U-Net's keys.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the VAE's keys.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Prefix of the CLIP-L text encoder's keys (SD 1.x).
pub const TEXT_ENCODER_PREFIX: &str = "cond_stage_model.transformer.";
/// Prefix of the OpenCLIP text encoder's keys (SD 2.x).
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// What a mapped prefix holds, deciding how the rest of the key is renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    UnetResnet,
    VaeResnet,
    VaeAttention,
}

/// A prefix map: diffusers prefix -> (LDM prefix, kind). Longest prefix wins.
#[derive(Debug, Clone, Default)]
pub struct LdmKeyMap {
    prefixes: BTreeMap<String, (String, Kind)>,
    root: String,
}

impl LdmKeyMap {
    fn add(&mut self, diffusers: String, ldm: String, kind: Kind) {
        self.prefixes.insert(diffusers, (ldm, kind));
    }

    /// The U-Net's map.
    pub fn unet(config: &UNet2DConditionConfig) -> Self {
        let mut m = Self {
            root: UNET_PREFIX.into(),
            ..Self::default()
        };
        let p = Kind::Plain;
        m.add("time_embedding.linear_1.".into(), "time_embed.0.".into(), p);
        m.add("time_embedding.linear_2.".into(), "time_embed.2.".into(), p);
        // SDXL's text_time addition.
        m.add("add_embedding.linear_1.".into(), "label_emb.0.0.".into(), p);
        m.add("add_embedding.linear_2.".into(), "label_emb.0.2.".into(), p);
        m.add("conv_in.".into(), "input_blocks.0.0.".into(), p);
        m.add("conv_norm_out.".into(), "out.0.".into(), p);
        m.add("conv_out.".into(), "out.2.".into(), p);
        let n = config.block_out_channels.len();
        let lpb = config
            .layers_per_block
            .per_block(n)
            .unwrap_or_else(|| vec![2; n]);
        let mut idx = 1;
        for (i, kind) in config.down_block_types.iter().enumerate() {
            for j in 0..lpb[i] {
                m.add(
                    format!("down_blocks.{i}.resnets.{j}."),
                    format!("input_blocks.{idx}.0."),
                    Kind::UnetResnet,
                );
                if *kind == DownBlockType::CrossAttnDownBlock2D {
                    m.add(
                        format!("down_blocks.{i}.attentions.{j}."),
                        format!("input_blocks.{idx}.1."),
                        p,
                    );
                }
                idx += 1;
            }
            if i + 1 < n {
                m.add(
                    format!("down_blocks.{i}.downsamplers.0.conv."),
                    format!("input_blocks.{idx}.0.op."),
                    p,
                );
                idx += 1;
            }
        }
        m.add(
            "mid_block.resnets.0.".into(),
            "middle_block.0.".into(),
            Kind::UnetResnet,
        );
        m.add(
            "mid_block.attentions.0.".into(),
            "middle_block.1.".into(),
            p,
        );
        m.add(
            "mid_block.resnets.1.".into(),
            "middle_block.2.".into(),
            Kind::UnetResnet,
        );
        let mut idx = 0;
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let layers = lpb[n - 1 - i] + 1;
            let attn = *kind == UpBlockType::CrossAttnUpBlock2D;
            for j in 0..layers {
                m.add(
                    format!("up_blocks.{i}.resnets.{j}."),
                    format!("output_blocks.{idx}.0."),
                    Kind::UnetResnet,
                );
                if attn {
                    m.add(
                        format!("up_blocks.{i}.attentions.{j}."),
                        format!("output_blocks.{idx}.1."),
                        p,
                    );
                }
                if j + 1 == layers && i + 1 < n {
                    let slot = if attn { 2 } else { 1 };
                    m.add(
                        format!("up_blocks.{i}.upsamplers.0."),
                        format!("output_blocks.{idx}.{slot}."),
                        p,
                    );
                }
                idx += 1;
            }
        }
        m
    }

    /// A ControlNet's map (original `cldm` layout): the U-Net's encoder names
    /// under `root` (`control_model.`, or nothing in files saved alone), plus
    /// `input_hint_block.{0, 2, .., 2k, 14}` for the conditioning embedding's convs,
    /// `zero_convs.j.0` for `controlnet_down_blocks.j` and `middle_block_out.0`.
    pub fn controlnet(config: &ControlNetConfig, root: &str) -> Self {
        let mut m = Self::unet(&config.unet);
        m.root = root.into();
        let p = Kind::Plain;
        m.add(
            "controlnet_cond_embedding.conv_in.".into(),
            "input_hint_block.0.".into(),
            p,
        );
        let blocks = 2 * config
            .conditioning_embedding_out_channels
            .len()
            .saturating_sub(1);
        for k in 0..blocks {
            m.add(
                format!("controlnet_cond_embedding.blocks.{k}."),
                format!("input_hint_block.{}.", 2 * (k + 1)),
                p,
            );
        }
        // cldm's hint encoder is one Sequential whose conv_out sits at 14 (after the
        // six convs of SD's four widths); diffusers reads it there whatever the
        // width count, so smaller encoders leave a gap before it.
        m.add(
            "controlnet_cond_embedding.conv_out.".into(),
            format!("input_hint_block.{}.", 14.max(2 * (blocks + 1))),
            p,
        );
        let n = config.unet.block_out_channels.len();
        let lpb = config
            .unet
            .layers_per_block
            .per_block(n)
            .unwrap_or_else(|| vec![2; n]);
        let skips = 1 + lpb.iter().sum::<usize>() + n - 1;
        for j in 0..skips {
            m.add(
                format!("controlnet_down_blocks.{j}."),
                format!("zero_convs.{j}.0."),
                p,
            );
        }
        m.add(
            "controlnet_mid_block.".into(),
            "middle_block_out.0.".into(),
            p,
        );
        m
    }

    /// The VAE's map.
    pub fn vae(config: &AutoencoderKLConfig) -> Self {
        let mut m = Self {
            root: VAE_PREFIX.into(),
            ..Self::default()
        };
        let p = Kind::Plain;
        let n = config.block_out_channels.len();
        for part in ["encoder", "decoder"] {
            m.add(
                format!("{part}.conv_norm_out."),
                format!("{part}.norm_out."),
                p,
            );
            m.add(
                format!("{part}.mid_block.resnets.0."),
                format!("{part}.mid.block_1."),
                Kind::VaeResnet,
            );
            m.add(
                format!("{part}.mid_block.resnets.1."),
                format!("{part}.mid.block_2."),
                Kind::VaeResnet,
            );
            m.add(
                format!("{part}.mid_block.attentions.0."),
                format!("{part}.mid.attn_1."),
                Kind::VaeAttention,
            );
        }
        for i in 0..n {
            for j in 0..config.layers_per_block {
                m.add(
                    format!("encoder.down_blocks.{i}.resnets.{j}."),
                    format!("encoder.down.{i}.block.{j}."),
                    Kind::VaeResnet,
                );
            }
            m.add(
                format!("encoder.down_blocks.{i}.downsamplers.0."),
                format!("encoder.down.{i}.downsample."),
                p,
            );
            let r = n - 1 - i;
            for j in 0..=config.layers_per_block {
                m.add(
                    format!("decoder.up_blocks.{i}.resnets.{j}."),
                    format!("decoder.up.{r}.block.{j}."),
                    Kind::VaeResnet,
                );
            }
            m.add(
                format!("decoder.up_blocks.{i}.upsamplers.0."),
                format!("decoder.up.{r}.upsample."),
                p,
            );
        }
        m
    }

    /// The same map under another component prefix (`""` for a U-Net stored alone,
    /// as ComfyUI-GGUF files keep it).
    pub fn with_root(mut self, root: &str) -> Self {
        self.root = root.into();
        self
    }

    /// Maps a diffusers key to the full single-file key (with the component prefix).
    pub fn map(&self, key: &str) -> String {
        let found = self
            .prefixes
            .range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(key)))
            .rev()
            .find(|(prefix, _)| key.starts_with(prefix.as_str()));
        let Some((prefix, (ldm, kind))) = found else {
            return format!("{}{key}", self.root);
        };
        let rest = &key[prefix.len()..];
        let rest = match kind {
            Kind::Plain => rest.to_string(),
            Kind::UnetResnet => rename_first(
                rest,
                &[
                    ("norm1", "in_layers.0"),
                    ("conv1", "in_layers.2"),
                    ("time_emb_proj", "emb_layers.1"),
                    ("norm2", "out_layers.0"),
                    ("conv2", "out_layers.3"),
                    ("conv_shortcut", "skip_connection"),
                ],
            ),
            Kind::VaeResnet => rename_first(rest, &[("conv_shortcut", "nin_shortcut")]),
            Kind::VaeAttention => {
                if let Some(r) = rest.strip_prefix("to_out.0.") {
                    format!("proj_out.{r}")
                } else {
                    rename_first(
                        rest,
                        &[
                            ("group_norm", "norm"),
                            ("to_q", "q"),
                            ("to_k", "k"),
                            ("to_v", "v"),
                        ],
                    )
                }
            }
        };
        format!("{}{ldm}{rest}", self.root)
    }
}

fn rename_first(rest: &str, table: &[(&str, &str)]) -> String {
    let (first, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let first = table
        .iter()
        .find(|(from, _)| *from == first)
        .map(|(_, to)| *to)
        .unwrap_or(first);
    if tail.is_empty() {
        first.to_string()
    } else {
        format!("{first}.{tail}")
    }
}

/// The OpenCLIP (SD 2.x single file) key of a CLIP text-model parameter path;
/// q/k/v projections are parts `#0`, `#1`, `#2` of the fused `in_proj_*` tensors.
pub fn open_clip_key(path: &str) -> Option<String> {
    open_clip_key_with(OPEN_CLIP_PREFIX, path)
}

/// [`open_clip_key`] under another prefix (SDXL's `conditioner.embedders.1.model.`).
pub fn open_clip_key_with(p: &str, path: &str) -> Option<String> {
    let rest = path.strip_prefix("text_model.")?;
    if let Some(leaf) = rest.strip_prefix("final_layer_norm.") {
        return Some(format!("{p}ln_final.{leaf}"));
    }
    match rest {
        "embeddings.token_embedding.weight" => return Some(format!("{p}token_embedding.weight")),
        "embeddings.position_embedding.weight" => return Some(format!("{p}positional_embedding")),
        _ => {}
    }
    let rest = rest.strip_prefix("encoder.layers.")?;
    let (i, tail) = rest.split_once('.')?;
    let base = format!("{p}transformer.resblocks.{i}.");
    let (module, leaf) = tail.rsplit_once('.')?;
    Some(match module {
        "self_attn.q_proj" => format!("{base}attn.in_proj_{leaf}#0"),
        "self_attn.k_proj" => format!("{base}attn.in_proj_{leaf}#1"),
        "self_attn.v_proj" => format!("{base}attn.in_proj_{leaf}#2"),
        "self_attn.out_proj" => format!("{base}attn.out_proj.{leaf}"),
        "layer_norm1" => format!("{base}ln_1.{leaf}"),
        "layer_norm2" => format!("{base}ln_2.{leaf}"),
        "mlp.fc1" => format!("{base}mlp.c_fc.{leaf}"),
        "mlp.fc2" => format!("{base}mlp.c_proj.{leaf}"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_unet_keys() {
        let m = LdmKeyMap::unet(&UNet2DConditionConfig::default());
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.0.resnets.1.norm1.bias",
                "input_blocks.2.0.in_layers.0.bias",
            ),
            (
                "down_blocks.0.attentions.1.proj_in.weight",
                "input_blocks.2.1.proj_in.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.weight",
                "input_blocks.3.0.op.weight",
            ),
            (
                "down_blocks.3.resnets.1.conv2.weight",
                "input_blocks.11.0.out_layers.3.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.bias",
                "middle_block.2.emb_layers.1.bias",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
                "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "up_blocks.1.resnets.0.conv_shortcut.weight",
                "output_blocks.3.0.skip_connection.weight",
            ),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (d, l) in cases {
            assert_eq!(m.map(d), format!("{UNET_PREFIX}{l}"), "{d}");
        }
    }

    #[test]
    fn sd15_vae_keys() {
        let config: AutoencoderKLConfig = serde_json::from_str(
            r#"{"block_out_channels":[128,256,512,512],"layers_per_block":2}"#,
        )
        .unwrap();
        let m = LdmKeyMap::vae(&config);
        let cases = [
            (
                "decoder.up_blocks.0.resnets.2.norm1.weight",
                "decoder.up.3.block.2.norm1.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
                "decoder.up.0.block.0.nin_shortcut.bias",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.bias",
                "encoder.mid.attn_1.norm.bias",
            ),
            (
                "encoder.down_blocks.1.downsamplers.0.conv.bias",
                "encoder.down.1.downsample.conv.bias",
            ),
            ("quant_conv.weight", "quant_conv.weight"),
        ];
        for (d, l) in cases {
            assert_eq!(m.map(d), format!("{VAE_PREFIX}{l}"), "{d}");
        }
    }
}
