//! transformers' `DepthAnythingForDepthEstimation` (Depth Anything V1 and V2): a
//! DINOv2 backbone, the DPT neck (reassemble + fusion) and the depth head. Module
//! paths are those of the hub checkpoints (`neck.reassemble_stage.layers.{i}.resize`,
//! `neck.fusion_stage.layers.{i}.residual_layer1.convolution1`, `head.conv1`), so weight
//! keys map 1:1.

use burn::nn::Linear;
use burn::nn::conv::{Conv2d, ConvTranspose2d, ConvTranspose2dConfig};
use burn::prelude::*;
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use sd_core::CoreError;
use sd_kernels::ops::{conv_forward, conv_forward_add, to_dtype, to_f32};

use crate::attention::{linear, linear_forward};
use crate::config::{
    DepthAnythingConfig, DepthEstimationType, ReassembleResize, reassemble_resize,
};
use crate::dinov2::Dinov2Backbone;
use crate::error::ConfigError;
use crate::resnet::{conv, conv_strided};

/// How a reassemble layer resizes: burn names the variant in module paths
/// (`resize.Up.weight`); [`crate::diffusers_key`] drops it (`resize.weight`).
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant, reason = "four per model")]
pub enum ReassembleResizeLayer {
    /// `nn.ConvTranspose2d(kernel = stride = factor)`.
    Up(ConvTranspose2d),
    /// `nn.Conv2d(3x3, stride = 1 / factor, padding 1)`.
    Down(Conv2d),
}

/// `DepthAnythingReassembleLayer`: a 1x1 projection, then the resize.
#[derive(Module, Debug)]
pub struct DepthAnythingReassembleLayer {
    /// The 1x1 convolution `[channels, hidden, 1, 1]` as a linear layer `[channels,
    /// hidden]` (the stored 4-D weight loads into it).
    pub projection: Linear,
    /// Up or down; `None` for `nn.Identity` (factor 1).
    pub resize: Option<ReassembleResizeLayer>,
}

/// `DepthAnythingReassembleStage`.
#[derive(Module, Debug)]
pub struct DepthAnythingReassembleStage {
    /// One per feature map.
    pub layers: Vec<DepthAnythingReassembleLayer>,
}

/// `DepthAnythingPreActResidualLayer`: `x + conv2(relu(conv1(relu(x))))`.
#[derive(Module, Debug)]
pub struct DepthAnythingPreActResidualLayer {
    /// First 3x3 convolution.
    pub convolution1: Conv2d,
    /// Second 3x3 convolution.
    pub convolution2: Conv2d,
}

impl DepthAnythingPreActResidualLayer {
    /// # Shapes
    /// - `[b, fusion, h, w]` to the same
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = conv_forward(&self.convolution1, relu(x.clone()));
        conv_forward_add(&self.convolution2, relu(h), None, Some(x))
    }
}

/// `DepthAnythingFeatureFusionLayer`.
#[derive(Module, Debug)]
pub struct DepthAnythingFeatureFusionLayer {
    /// 1x1 projection after the upsampling.
    pub projection: Conv2d,
    /// Applied to the skip (finer) feature map.
    pub residual_layer1: DepthAnythingPreActResidualLayer,
    /// Applied to the sum.
    pub residual_layer2: DepthAnythingPreActResidualLayer,
}

impl DepthAnythingFeatureFusionLayer {
    /// `hidden (+ residual_layer1(residual))`, `residual_layer2`, then a bilinear
    /// resize (corners aligned) to `size` or twice the size, then the projection.
    ///
    /// # Shapes
    /// - `hidden`: `[b, fusion, h, w]`; `residual`: `[b, fusion, h', w']` (resized to
    ///   `h x w` when it differs); output: `[b, fusion, size]` or `[b, fusion, 2h, 2w]`
    pub fn forward(
        &self,
        hidden: Tensor<4>,
        residual: Option<Tensor<4>>,
        size: Option<[usize; 2]>,
    ) -> Tensor<4> {
        let [_, _, h, w] = hidden.dims();
        let hidden = match residual {
            Some(r) => {
                let [_, _, rh, rw] = r.dims();
                let r = if [rh, rw] == [h, w] {
                    r
                } else {
                    bilinear(r, [h, w], false)
                };
                hidden + self.residual_layer1.forward(r)
            }
            None => hidden,
        };
        let hidden = self.residual_layer2.forward(hidden);
        let hidden = bilinear(hidden, size.unwrap_or([2 * h, 2 * w]), true);
        conv_forward(&self.projection, hidden)
    }
}

fn bilinear(x: Tensor<4>, size: [usize; 2], align_corners: bool) -> Tensor<4> {
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(align_corners)
            .with_output_size(size),
    )
}

/// `DepthAnythingFeatureFusionStage`.
#[derive(Module, Debug)]
pub struct DepthAnythingFeatureFusionStage {
    /// One per feature map, applied coarse to fine.
    pub layers: Vec<DepthAnythingFeatureFusionLayer>,
}

/// `DepthAnythingNeck`: reassemble the token maps into images, a 3x3 convolution
/// each to the fusion width, then fuse them coarse to fine.
#[derive(Module, Debug)]
pub struct DepthAnythingNeck {
    /// Tokens to feature maps.
    pub reassemble_stage: DepthAnythingReassembleStage,
    /// 3x3, no bias, to `fusion_hidden_size`.
    pub convs: Vec<Conv2d>,
    /// Fusion.
    pub fusion_stage: DepthAnythingFeatureFusionStage,
}

impl DepthAnythingNeck {
    fn new(c: &DepthAnythingConfig, device: &Device) -> Result<Self, ConfigError> {
        let f = c.fusion_hidden_size;
        let hidden = c.reassemble_hidden_size;
        let mut layers = Vec::new();
        for (&ch, &factor) in c.neck_hidden_sizes.iter().zip(&c.reassemble_factors) {
            let resize = match reassemble_resize(factor)? {
                ReassembleResize::Up(n) => Some(ReassembleResizeLayer::Up(
                    ConvTranspose2dConfig::new([ch, ch], [n, n])
                        .with_stride([n, n])
                        .init(device),
                )),
                ReassembleResize::Down(n) => Some(ReassembleResizeLayer::Down(conv_strided(
                    ch, ch, 3, n, true, device,
                ))),
                ReassembleResize::Keep => None,
            };
            layers.push(DepthAnythingReassembleLayer {
                projection: linear(hidden, ch, true, device),
                resize,
            });
        }
        let residual = || DepthAnythingPreActResidualLayer {
            convolution1: conv(f, f, 3, device),
            convolution2: conv(f, f, 3, device),
        };
        Ok(Self {
            reassemble_stage: DepthAnythingReassembleStage { layers },
            convs: c
                .neck_hidden_sizes
                .iter()
                .map(|&ch| conv_strided(ch, f, 3, 1, false, device))
                .collect(),
            fusion_stage: DepthAnythingFeatureFusionStage {
                layers: c
                    .neck_hidden_sizes
                    .iter()
                    .map(|_| DepthAnythingFeatureFusionLayer {
                        projection: conv(f, f, 1, device),
                        residual_layer1: residual(),
                        residual_layer2: residual(),
                    })
                    .collect(),
            },
        })
    }

    /// The fused maps, coarse to fine.
    ///
    /// # Shapes
    /// - `features`: tensors `[b, 1 + ph * pw, hidden]` (CLS first)
    /// - output: one `[b, fusion, h_i, w_i]` per feature map, the last the finest
    ///   (`2 x` the largest reassembled map)
    pub fn forward(&self, features: Vec<Tensor<3>>, ph: usize, pw: usize) -> Vec<Tensor<4>> {
        let maps: Vec<Tensor<4>> = features
            .into_iter()
            .zip(&self.reassemble_stage.layers)
            .zip(&self.convs)
            .map(|((tokens, layer), conv3)| {
                // The 1x1 projection as the linear layer it is, on the patch tokens, then
                // to an image (on wgpu, burn's 1x1 convolution of the permuted token
                // grid came out wrong for some maps, depending on the autotuned kernel)
                let [b, n, _] = tokens.dims();
                let x = linear_forward(&layer.projection, tokens.narrow(1, 1, n - 1));
                let ch = x.dims()[2];
                let x = x.swap_dims(1, 2).reshape([b, ch, ph, pw]);
                let x = match &layer.resize {
                    Some(ReassembleResizeLayer::Up(t)) => t.forward(x),
                    Some(ReassembleResizeLayer::Down(d)) => conv_forward(d, x),
                    None => x,
                };
                conv_forward(conv3, x)
            })
            .collect();
        let mut fused: Vec<Tensor<4>> = Vec::with_capacity(maps.len());
        let reversed: Vec<Tensor<4>> = maps.into_iter().rev().collect();
        for (i, layer) in self.fusion_stage.layers.iter().enumerate() {
            let size = reversed.get(i + 1).map(|m| {
                let [_, _, h, w] = m.dims();
                [h, w]
            });
            let out = match fused.last() {
                None => layer.forward(reversed[i].clone(), None, size),
                Some(prev) => layer.forward(prev.clone(), Some(reversed[i].clone()), size),
            };
            fused.push(out);
        }
        fused
    }
}

/// `DepthAnythingDepthEstimationHead`: 3x3 to half the width, bilinear resize to the
/// input's size, 3x3 + ReLU, 1x1 to one channel, ReLU (relative) or sigmoid times
/// `max_depth` (metric).
#[derive(Module, Debug)]
pub struct DepthAnythingDepthEstimationHead {
    /// `fusion -> fusion / 2`, 3x3.
    pub conv1: Conv2d,
    /// `fusion / 2 -> head_hidden_size`, 3x3.
    pub conv2: Conv2d,
    /// `head_hidden_size -> 1`, 1x1.
    pub conv3: Conv2d,
    metric: bool,
    max_depth: f64,
}

impl DepthAnythingDepthEstimationHead {
    /// # Shapes
    /// - `x`: `[b, fusion, h, w]`; output: `[b, out_h, out_w]`
    pub fn forward(&self, x: Tensor<4>, out_h: usize, out_w: usize) -> Tensor<3> {
        let x = conv_forward(&self.conv1, x);
        let x = bilinear(x, [out_h, out_w], true);
        let x = relu(conv_forward(&self.conv2, x));
        let x = conv_forward(&self.conv3, x);
        let x = if self.metric { sigmoid(x) } else { relu(x) };
        let [b, _, h, w] = x.dims();
        (x * self.max_depth).reshape([b, h, w])
    }
}

/// `DepthAnythingForDepthEstimation` (keys `backbone.*`, `neck.*`, `head.*`).
#[derive(Module, Debug)]
pub struct DepthAnythingForDepthEstimation {
    /// DINOv2.
    pub backbone: Dinov2Backbone,
    /// Reassemble + fusion.
    pub neck: DepthAnythingNeck,
    /// Depth head.
    pub head: DepthAnythingDepthEstimationHead,
    head_index: usize,
    channels: usize,
}

impl DepthAnythingForDepthEstimation {
    /// Builds the model from its config.
    pub fn new(config: &DepthAnythingConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let f = config.fusion_hidden_size;
        Ok(Self {
            backbone: Dinov2Backbone::new(&config.backbone_config, device)?,
            neck: DepthAnythingNeck::new(config, device)?,
            head: DepthAnythingDepthEstimationHead {
                conv1: conv(f, f / 2, 3, device),
                conv2: conv(f / 2, config.head_hidden_size, 3, device),
                conv3: conv(config.head_hidden_size, 1, 1, device),
                metric: config.depth_estimation_type == DepthEstimationType::Metric,
                max_depth: config.max_depth(),
            },
            head_index: config.head_index()?,
            channels: config.backbone_config.num_channels,
        })
    }

    /// Patch side in pixels: inputs are read in whole patches.
    pub fn patch_size(&self) -> usize {
        self.backbone.patch_size()
    }

    /// Whether the model predicts metric depth (metres, larger is farther) rather
    /// than relative inverse depth (larger is nearer).
    pub fn is_metric(&self) -> bool {
        self.head.metric
    }

    /// The predicted depth (relative: inverse depth, larger is nearer), unchecked; see
    /// [`Self::predict_depth`].
    ///
    /// # Shapes
    /// - `pixel_values`: `[b, channels, h, w]`, normalised as the image processor does
    /// - output: `[b, (h / p) * p, (w / p) * p]`, f32 whatever the weights' dtype (the
    ///   input is cast to it)
    pub fn forward(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let [_, _, h, w] = pixel_values.dims();
        let p = self.patch_size();
        let (ph, pw) = (h / p, w / p);
        let dtype = crate::norm::compute_dtype_conv(&self.head.conv3);
        let features = self.backbone.forward(to_dtype(pixel_values, dtype));
        let fused = self.neck.forward(features, ph, pw);
        to_f32(
            self.head
                .forward(fused[self.head_index].clone(), ph * p, pw * p),
        )
    }

    /// [`Self::forward`] with its input checked.
    ///
    /// # Errors
    /// A channel count other than the config's, or a side shorter than a patch.
    pub fn predict_depth(&self, pixel_values: Tensor<4>) -> Result<Tensor<3>, CoreError> {
        let [_, c, h, w] = pixel_values.dims();
        let p = self.patch_size();
        if c != self.channels || h < p || w < p {
            return Err(CoreError::shape(
                "pixel_values",
                format!(
                    "[_, {c}, {h}, {w}]: expected {} channels and sides of at least {p}",
                    self.channels
                ),
            ));
        }
        Ok(self.forward(pixel_values))
    }
}
