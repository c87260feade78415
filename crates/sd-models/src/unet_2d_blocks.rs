//! The U-Net's blocks: `CrossAttnDownBlock2D` / `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D` / `UpBlock2D`.
//!
//! A block with attention and one without share a struct: `attentions` is empty for
//! the plain kinds, exactly as their weight keys are absent.

use burn::prelude::*;

use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use crate::transformer_2d::Transformer2DModel;

/// Attention settings of a block, `None` for the plain kinds.
#[derive(Debug, Clone, Copy)]
pub struct BlockAttention {
    /// Heads.
    pub heads: usize,
    /// Transformer layers per attention.
    pub layers: usize,
    /// Width of the conditioning.
    pub context_dim: usize,
}

impl BlockAttention {
    /// `n` transformers over `channels` channels, one per ResNet of a block.
    fn transformers(
        self,
        n: usize,
        channels: usize,
        groups: usize,
        device: &Device,
    ) -> Vec<Transformer2DModel> {
        (0..n)
            .map(|_| {
                Transformer2DModel::new(
                    channels,
                    self.heads,
                    self.layers,
                    self.context_dim,
                    groups,
                    device,
                )
            })
            .collect()
    }
}

/// A down block: `num_layers` (ResNet, optional transformer) pairs, then an optional
/// stride-2 downsampler.
#[derive(Module, Debug)]
pub struct DownBlock2D {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Transformers after each ResNet (empty for `DownBlock2D`).
    pub attentions: Vec<Transformer2DModel>,
    /// The downsampler (empty in the last block).
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock2D {
    /// Builds a block as diffusers' `get_down_block` does.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        num_layers: usize,
        resnet: ResnetSettings,
        attention: Option<BlockAttention>,
        add_downsample: bool,
        downsample_padding: usize,
        device: &Device,
    ) -> Self {
        let resnets = (0..num_layers)
            .map(|i| ResnetBlock2D::new(if i == 0 { c_in } else { c_out }, c_out, resnet, device))
            .collect();
        let attentions = attention
            .map(|a| a.transformers(num_layers, c_out, resnet.groups, device))
            .unwrap_or_default();
        let downsamplers = if add_downsample {
            vec![Downsample2D::new(c_out, Some(downsample_padding), device)]
        } else {
            Vec::new()
        };
        Self {
            resnets,
            attentions,
            downsamplers,
        }
    }

    /// Returns the output and the states kept for the skip connections.
    ///
    /// # Shapes
    /// - `x`: `[b, c_in, h, w]`, `temb`: `[b, t]`, `context`: `[b, m, d]`
    /// - output: `[b, c_out, h', w']` (halved when downsampling)
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
    ) -> (Tensor<4>, Vec<Tensor<4>>) {
        self.forward_with_residual(x, temb, context, None)
    }

    /// [`Self::forward`] with a T2I-Adapter feature added to the last
    /// resnet/attention output (before the downsampler), as diffusers'
    /// `CrossAttnDownBlock2D` does with `additional_residuals`.
    pub fn forward_with_residual(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        residual: Option<Tensor<4>>,
    ) -> (Tensor<4>, Vec<Tensor<4>>) {
        let mut h = x;
        let mut residual = residual;
        let n = self.resnets.len();
        let mut states = Vec::with_capacity(n + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(h, Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(h, context.clone());
            }
            if i + 1 == n
                && let Some(r) = residual.take()
            {
                h = h + r;
            }
            states.push(h.clone());
        }
        for down in &self.downsamplers {
            h = down.forward(h);
            states.push(h.clone());
        }
        (h, states)
    }
}

/// `UNetMidBlock2DCrossAttn`: ResNet, then (transformer, ResNet) pairs.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn {
    /// The transformers.
    pub attentions: Vec<Transformer2DModel>,
    /// The ResNets (one more than transformers).
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2DCrossAttn {
    /// A mid block with one transformer, as in SD.
    pub fn new(
        channels: usize,
        resnet: ResnetSettings,
        attention: BlockAttention,
        device: &Device,
    ) -> Self {
        Self {
            attentions: attention.transformers(1, channels, resnet.groups, device),
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(channels, channels, resnet, device))
                .collect(),
        }
    }

    /// # Shapes
    /// - `x`: `[b, c, h, w]` to `[b, c, h, w]`
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        let mut h = self.resnets[0].forward(x, Some(temb.clone()));
        for (attn, resnet) in self.attentions.iter().zip(self.resnets.iter().skip(1)) {
            h = attn.forward(h, context.clone());
            h = resnet.forward(h, Some(temb.clone()));
        }
        h
    }
}

/// An up block: `num_layers` (ResNet over the concatenated skip, optional
/// transformer) pairs, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpBlock2D {
    /// ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Transformers after each ResNet (empty for `UpBlock2D`).
    pub attentions: Vec<Transformer2DModel>,
    /// The upsampler (empty in the last block).
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock2D {
    /// Builds a block as diffusers' `get_up_block` does.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        c_in: usize,
        c_out: usize,
        prev_c_out: usize,
        num_layers: usize,
        resnet: ResnetSettings,
        attention: Option<BlockAttention>,
        add_upsample: bool,
        device: &Device,
    ) -> Self {
        let resnets = (0..num_layers)
            .map(|i| {
                let skip = if i == num_layers - 1 { c_in } else { c_out };
                let res_in = if i == 0 { prev_c_out } else { c_out };
                ResnetBlock2D::new(res_in + skip, c_out, resnet, device)
            })
            .collect();
        let attentions = attention
            .map(|a| a.transformers(num_layers, c_out, resnet.groups, device))
            .unwrap_or_default();
        let upsamplers = if add_upsample {
            vec![Upsample2D::new(c_out, device)]
        } else {
            Vec::new()
        };
        Self {
            resnets,
            attentions,
            upsamplers,
        }
    }

    /// Consumes skip states from the end of `skips`; `upsample_size` is the size of the
    /// next skip state.
    ///
    /// # Shapes
    /// - `x`: `[b, prev_c_out, h, w]`; output `[b, c_out, h', w']`
    pub fn forward(
        &self,
        x: Tensor<4>,
        skips: &mut Vec<Tensor<4>>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        upsample_size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        let mut h = x;
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip state per up-block resnet");
            h = resnet.forward(Tensor::cat(vec![h, skip], 1), Some(temb.clone()));
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(h, context.clone());
            }
        }
        for up in &self.upsamplers {
            h = up.forward(h, upsample_size);
        }
        h
    }
}
