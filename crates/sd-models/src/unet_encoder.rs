//! The U-Net's encoder half as a config builds it: `conv_in`, the time (and SDXL
//! text-time) embeddings, the down blocks and the mid block. `UNet2DConditionModel`
//! and `ControlNetModel` (a trainable copy of that half) are both built from it.

use burn::nn::conv::Conv2d;
use burn::prelude::*;

use crate::config::{DownBlockType, ResolvedUNetBlocks, UNet2DConditionConfig};
use crate::embeddings::TimestepEmbedding;
use crate::error::ConfigError;
use crate::resnet::{ResnetSettings, conv};
use crate::unet_2d_blocks::{BlockAttention, DownBlock2D, UNetMidBlock2DCrossAttn};

/// The modules of the encoder half, to be moved into the model that owns them.
pub(crate) struct UNetEncoder {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock2D>,
    pub mid_block: UNetMidBlock2DCrossAttn,
}

/// The resnets' settings: time embedding width `4 * c0`, the config's groups, eps
/// and output scale.
pub(crate) fn resnet_settings(config: &UNet2DConditionConfig) -> ResnetSettings {
    ResnetSettings {
        temb_channels: Some(config.block_out_channels[0] * 4),
        groups: config.norm_num_groups,
        eps: config.norm_eps,
        output_scale_factor: config.resnet_out_scale_factor,
    }
}

/// The attention settings of level `i`.
pub(crate) fn block_attention(blocks: &ResolvedUNetBlocks, i: usize) -> BlockAttention {
    BlockAttention {
        heads: blocks.num_heads[i],
        layers: blocks.transformer_layers[i],
        context_dim: blocks.cross_attention_dim[i],
    }
}

impl UNetEncoder {
    /// Builds the half from a validated config, as diffusers' constructors do.
    pub fn new(config: &UNet2DConditionConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let blocks = config.blocks()?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let temb_dim = boc[0] * 4;
        let resnet = resnet_settings(config);
        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = boc[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = boc[i];
            let attn =
                (*kind == DownBlockType::CrossAttnDownBlock2D).then(|| block_attention(&blocks, i));
            down_blocks.push(DownBlock2D::new(
                c_in,
                c_out,
                blocks.layers_per_block[i],
                resnet,
                attn,
                i + 1 < n,
                config.downsample_padding,
                device,
            ));
        }
        let mid_resnet = ResnetSettings {
            output_scale_factor: config.mid_block_scale_factor,
            ..resnet
        };
        let mid_block = UNetMidBlock2DCrossAttn::new(
            boc[n - 1],
            mid_resnet,
            block_attention(&blocks, n - 1),
            device,
        );
        Ok(Self {
            conv_in: conv(config.in_channels, boc[0], config.conv_in_kernel, device),
            time_embedding: TimestepEmbedding::new(
                boc[0],
                temb_dim,
                config.time_cond_proj_dim,
                device,
            ),
            add_embedding: config
                .projection_class_embeddings_input_dim
                .filter(|_| config.addition_embed_type.is_some())
                .map(|d| TimestepEmbedding::new(d, temb_dim, None, device)),
            down_blocks,
            mid_block,
        })
    }
}

/// The shapes of the skip states `down_blocks` produce for a `[b, _, h, w]` sample
/// after `conv_in`: conv_in's output, every resnet (or attention) output and every
/// downsampler output, in order; then the mid block's output.
pub(crate) fn skip_shapes(
    conv_in: &Conv2d,
    down_blocks: &[DownBlock2D],
    sample: [usize; 4],
) -> Vec<[usize; 4]> {
    let [b, _, mut h, mut w] = sample;
    let mut c = conv_in.weight.dims()[0];
    let mut shapes = vec![[b, c, h, w]];
    for block in down_blocks {
        for resnet in &block.resnets {
            c = resnet.conv2.weight.dims()[0];
            shapes.push([b, c, h, w]);
        }
        for _ in &block.downsamplers {
            // A 3x3 stride-2 conv with padding 1.
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
            shapes.push([b, c, h, w]);
        }
    }
    shapes.push([b, c, h, w]);
    shapes
}

/// Checks ControlNet residuals against the skip states they are added to: one per
/// skip, each of its skip's shape or pooled to `[b, c, 1, 1]`.
pub(crate) fn check_residuals(
    expected: &[[usize; 4]],
    control: &sd_core::ControlSignals,
) -> Result<(), sd_core::CoreError> {
    let fits = |r: [usize; 4], e: [usize; 4]| r == e || r == [e[0], e[1], 1, 1];
    let Some((mid, skips)) = expected.split_last() else {
        return Ok(());
    };
    if let Some(res) = &control.down_block_additional_residuals {
        if res.len() != skips.len() {
            return Err(sd_core::CoreError::shape(
                "down_block_additional_residuals",
                format!(
                    "{} residuals for {} skip connections",
                    res.len(),
                    skips.len()
                ),
            ));
        }
        for (j, (r, e)) in res.iter().zip(skips).enumerate() {
            if !fits(r.dims(), *e) {
                return Err(sd_core::CoreError::shape(
                    "down_block_additional_residuals",
                    format!("residual {j} has shape {:?}, its skip {e:?}", r.dims()),
                ));
            }
        }
    }
    if let Some(r) = &control.mid_block_additional_residual
        && !fits(r.dims(), *mid)
    {
        return Err(sd_core::CoreError::shape(
            "mid_block_additional_residual",
            format!("shape {:?}, the mid block's output {mid:?}", r.dims()),
        ));
    }
    Ok(())
}

/// Where T2I-Adapter features go, in order, for a `[b, _, h, w]` sample: a
/// cross-attention block's last resnet/attention output (before its downsampler), a
/// plain block's output; then the mid block's output (the last of `skips`).
pub(crate) fn intrablock_shapes(
    down_blocks: &[DownBlock2D],
    sample: [usize; 4],
    skips: &[[usize; 4]],
) -> Vec<[usize; 4]> {
    let [b, _, mut h, mut w] = sample;
    let mut shapes = Vec::with_capacity(down_blocks.len() + 1);
    for block in down_blocks {
        let c = block.resnets.last().map_or(0, |r| r.conv2.weight.dims()[0]);
        let cross = !block.attentions.is_empty();
        if cross {
            shapes.push([b, c, h, w]);
        }
        if !block.downsamplers.is_empty() {
            (h, w) = (h.div_ceil(2), w.div_ceil(2));
        }
        if !cross {
            shapes.push([b, c, h, w]);
        }
    }
    if let Some(mid) = skips.last() {
        shapes.push(*mid);
    }
    shapes
}

/// Checks T2I-Adapter features against where they are added.
pub(crate) fn check_intrablock(
    expected: &[[usize; 4]],
    control: &sd_core::ControlSignals,
) -> Result<(), sd_core::CoreError> {
    let Some(res) = &control.down_intrablock_additional_residuals else {
        return Ok(());
    };
    if res.len() > expected.len() {
        return Err(sd_core::CoreError::shape(
            "down_intrablock_additional_residuals",
            format!("{} features for {} places", res.len(), expected.len()),
        ));
    }
    for (j, (r, e)) in res.iter().zip(expected).enumerate() {
        if r.dims() != *e {
            return Err(sd_core::CoreError::shape(
                "down_intrablock_additional_residuals",
                format!("feature {j} has shape {:?}, where it goes {e:?}", r.dims()),
            ));
        }
    }
    Ok(())
}
