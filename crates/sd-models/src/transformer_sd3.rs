//! diffusers' `SD3Transformer2DModel` (MMDiT): the denoiser of SD 3 and SD 3.5. The
//! latents are cut into patches with a cropped 2-D sin-cos position table, attend
//! jointly with the projected text states through the joint blocks, conditioned on
//! the timestep plus the pooled CLIP embedding, and are put back together by an
//! adaptive norm, a projection and unpatchify.

use burn::nn::Linear;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::activation::silu;
use sd_core::{AddedConditioning, CoreError, Denoiser};
use sd_kernels::ops::linear_forward;

use crate::ada_norm::AdaLayerNormContinuous;
use crate::attention::linear;
use crate::config::SD3Transformer2DConfig;
use crate::embeddings::{TimestepEmbedding, timestep_embedding};
use crate::error::ConfigError;
use crate::joint_transformer_block::JointTransformerBlock;
use crate::resnet::conv_forward;

/// diffusers' `PatchEmbed` with `pos_embed_max_size` (SD 3's cropping): a strided
/// convolution per patch plus the centre crop of a fixed sin-cos table. The table
/// (`pos_embed.pos_embed`, a buffer) is computed for the crop, not stored.
#[derive(Module, Debug)]
pub struct PatchEmbed {
    /// `[inner, in_channels, p, p]`, stride `p`.
    pub proj: Conv2d,
    patch_size: usize,
    max_size: usize,
    base_size: usize,
}

/// diffusers' `get_2d_sincos_pos_embed` rows for the `h x w` patches at the centre of
/// a `max_size`-square grid whose coordinates are `i / (max_size / base_size)`: per
/// patch, `[sin, cos]` of its column coordinate over the first half of the `dim`
/// channels and of its row over the second (frequencies `10000^(-k / (dim / 4))`, in
/// f64, as diffusers builds the buffer).
///
/// # Shapes
/// - output `[h * w * dim]` values, row-major patches
pub fn cropped_sincos_pos_embed(
    dim: usize,
    max_size: usize,
    base_size: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let (top, left) = ((max_size - h) / 2, (max_size - w) / 2);
    let step = (max_size as f64 / base_size as f64) as f32;
    let coord = |i: usize| f64::from(i as f32 / step);
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(h * w * dim);
    for i in 0..h {
        let row = coord(top + i);
        for j in 0..w {
            let col = coord(left + j);
            for pos in [col, row] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    out
}

impl PatchEmbed {
    /// # Shapes
    /// - `latent`: `[b, c, h, w]`, h and w multiples of the patch side within the
    ///   table; output `[b, (h / p) * (w / p), inner]`
    pub fn forward(&self, latent: Tensor<4>) -> Tensor<3> {
        let [b, _, h, w] = latent.dims();
        let (h, w) = (h / self.patch_size, w / self.patch_size);
        let x = conv_forward(&self.proj, latent);
        let d = x.dims()[1];
        let x = x.reshape([b, d, h * w]).swap_dims(1, 2);
        let table = cropped_sincos_pos_embed(d, self.max_size, self.base_size, h, w);
        let pos = Tensor::<3>::from_data(TensorData::new(table, [1, h * w, d]), &x.device());
        x.clone() + crate::norm::to_dtype(pos, x.dtype())
    }
}

/// diffusers' `PixArtAlphaTextProjection` with SiLU: `linear_2(silu(linear_1(x)))`.
#[derive(Module, Debug)]
pub struct TextProjection {
    /// First projection.
    pub linear_1: Linear,
    /// Second projection.
    pub linear_2: Linear,
}

/// `CombinedTimestepTextProjEmbeddings`: the timestep's 256 sinusoidal features
/// (cos first) embedded, plus the pooled text embedding projected.
#[derive(Module, Debug)]
pub struct CombinedTimestepTextProjEmbeddings {
    /// `[256] -> [inner]`.
    pub timestep_embedder: TimestepEmbedding,
    /// `[pooled_projection_dim] -> [inner]`.
    pub text_embedder: TextProjection,
}

impl CombinedTimestepTextProjEmbeddings {
    /// # Shapes
    /// - `timestep`: `[b]` (f32, `sigma * 1000`), `pooled`: `[b, pooled_dim]`; output
    ///   `[b, inner]`
    pub fn forward(&self, timestep: Tensor<1>, pooled: Tensor<2>) -> Tensor<2> {
        let dtype = pooled.dtype();
        let proj = timestep_embedding(crate::norm::to_f32(timestep), 256, true, 0.0);
        let t = self
            .timestep_embedder
            .forward(crate::norm::to_dtype(proj, dtype), None);
        let p = &self.text_embedder;
        t + linear_forward(&p.linear_2, silu(linear_forward(&p.linear_1, pooled)))
    }
}

/// `SD3Transformer2DModel` (keys as diffusers': `pos_embed.proj`, `time_text_embed.*`,
/// `context_embedder`, `transformer_blocks.{i}.*`, `norm_out.linear`, `proj_out`).
#[derive(Module, Debug)]
pub struct SD3Transformer2DModel {
    /// Patches and positions.
    pub pos_embed: PatchEmbed,
    /// Timestep + pooled text conditioning.
    pub time_text_embed: CombinedTimestepTextProjEmbeddings,
    /// `[joint_attention_dim] -> [inner]` for the text states.
    pub context_embedder: Linear,
    /// Joint blocks.
    pub transformer_blocks: Vec<JointTransformerBlock>,
    /// Output norm.
    pub norm_out: AdaLayerNormContinuous,
    /// `[inner] -> [p * p * out_channels]`.
    pub proj_out: Linear,
    in_channels: usize,
    out_channels: usize,
    joint_attention_dim: usize,
    pooled_projection_dim: usize,
}

impl SD3Transformer2DModel {
    /// Builds the model from a config (parameters initialised lazily).
    pub fn new(config: &SD3Transformer2DConfig, device: &Device) -> Result<Self, ConfigError> {
        config.validate()?;
        let (d, p, heads) = (
            config.inner_dim(),
            config.patch_size,
            config.num_attention_heads,
        );
        let n = config.num_layers;
        let blocks = (0..n)
            .map(|i| {
                let dual = config.dual_attention_layers.contains(&i);
                JointTransformerBlock::new(d, heads, i + 1 == n, config.qk_rms_norm(), dual, device)
            })
            .collect();
        Ok(Self {
            pos_embed: PatchEmbed {
                proj: Conv2dConfig::new([config.in_channels, d], [p, p])
                    .with_stride([p, p])
                    .init(device),
                patch_size: p,
                max_size: config.pos_embed_max_size,
                base_size: config.sample_size / p,
            },
            time_text_embed: CombinedTimestepTextProjEmbeddings {
                timestep_embedder: TimestepEmbedding::new(256, d, None, device),
                text_embedder: TextProjection {
                    linear_1: linear(config.pooled_projection_dim, d, true, device),
                    linear_2: linear(d, d, true, device),
                },
            },
            context_embedder: linear(
                config.joint_attention_dim,
                config.caption_projection_dim,
                true,
                device,
            ),
            transformer_blocks: blocks,
            norm_out: AdaLayerNormContinuous::new(d, d, device),
            proj_out: linear(d, p * p * config.out_channels, true, device),
            in_channels: config.in_channels,
            out_channels: config.out_channels,
            joint_attention_dim: config.joint_attention_dim,
            pooled_projection_dim: config.pooled_projection_dim,
        })
    }

    /// The dtype its weights are stored and computed in.
    pub fn dtype(&self) -> burn::tensor::DType {
        crate::norm::compute_dtype_linear(&self.proj_out)
    }

    /// Latent channels in.
    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    /// Width of the text states it takes (`joint_attention_dim`).
    pub fn joint_attention_dim(&self) -> usize {
        self.joint_attention_dim
    }

    /// Width of the pooled embedding it takes.
    pub fn pooled_projection_dim(&self) -> usize {
        self.pooled_projection_dim
    }

    /// Checks the inputs of [`Self::forward`] before anything runs.
    fn check(
        &self,
        sample: [usize; 4],
        timesteps: [usize; 1],
        context: [usize; 3],
        pooled: [usize; 2],
        skip_layers: &[usize],
    ) -> Result<(), CoreError> {
        let [b, c, h, w] = sample;
        let p = self.pos_embed.patch_size;
        let max = self.pos_embed.max_size * p;
        let fail = |name, message: String| Err(CoreError::shape(name, message));
        if b == 0 || c != self.in_channels {
            return fail(
                "sample",
                format!("{sample:?}: expected [b, {}, h, w]", self.in_channels),
            );
        }
        if h == 0 || w == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) || h > max || w > max {
            return fail(
                "sample",
                format!(
                    "{h}x{w} latents: sides must be multiples of the patch side {p}, at most {max}"
                ),
            );
        }
        if timesteps != [b] {
            return fail("timesteps", format!("{timesteps:?} for a batch of {b}"));
        }
        if context[0] != b || context[1] == 0 || context[2] != self.joint_attention_dim {
            return fail(
                "encoder_hidden_states",
                format!(
                    "{context:?}: expected [{b}, seq, {}]",
                    self.joint_attention_dim
                ),
            );
        }
        if pooled != [b, self.pooled_projection_dim] {
            return fail(
                "pooled_projections",
                format!("{pooled:?}: expected [{b}, {}]", self.pooled_projection_dim),
            );
        }
        let n = self.transformer_blocks.len();
        if let Some(l) = skip_layers.iter().find(|&&l| l >= n) {
            return Err(CoreError::invalid(
                "skip_layers",
                format!("{l} is not a block (0..{n})"),
            ));
        }
        Ok(())
    }

    /// The predicted velocity for latents `sample` at `timesteps` (`sigma * 1000`),
    /// with text states `encoder_hidden_states` and the pooled CLIP embedding;
    /// blocks in `skip_layers` are passed over (skip-layer guidance).
    ///
    /// # Shapes
    /// - `sample`: `[b, in_channels, h, w]`; `timesteps`: `[b]`
    /// - `encoder_hidden_states`: `[b, seq, joint_attention_dim]`
    /// - `pooled_projections`: `[b, pooled_projection_dim]`
    /// - output: `[b, out_channels, h, w]`
    ///
    /// # Errors
    /// [`CoreError::Shape`] for inputs of other shapes (latent sides not multiples
    /// of the patch or beyond the position table), [`CoreError::InvalidArgument`]
    /// for a skipped block that does not exist.
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        pooled_projections: Tensor<2>,
        skip_layers: &[usize],
    ) -> Result<Tensor<4>, CoreError> {
        self.check(
            sample.dims(),
            timesteps.dims(),
            encoder_hidden_states.dims(),
            pooled_projections.dims(),
            skip_layers,
        )?;
        let [b, _, h, w] = sample.dims();
        let dtype = self.dtype();
        let mut x = self.pos_embed.forward(crate::norm::to_dtype(sample, dtype));
        let temb = self
            .time_text_embed
            .forward(timesteps, crate::norm::to_dtype(pooled_projections, dtype));
        let mut context = linear_forward(
            &self.context_embedder,
            crate::norm::to_dtype(encoder_hidden_states, dtype),
        );
        for (i, block) in self.transformer_blocks.iter().enumerate() {
            if skip_layers.contains(&i) {
                continue;
            }
            let (nx, nc) = block.forward(x, context.clone(), temb.clone());
            x = nx;
            if let Some(nc) = nc {
                context = nc;
            }
        }
        let x = linear_forward(&self.proj_out, self.norm_out.forward(x, temb));
        Ok(self.unpatchify(x, b, h, w))
    }

    /// Number of joint blocks (the range of skip-layer guidance's blocks).
    pub fn num_layers(&self) -> usize {
        self.transformer_blocks.len()
    }

    /// `[b, (h/p)(w/p), p p c]` to `[b, c, h, w]` (diffusers' `nhwpqc -> nchpwq`).
    fn unpatchify(&self, x: Tensor<3>, b: usize, h: usize, w: usize) -> Tensor<4> {
        let p = self.pos_embed.patch_size;
        let c = self.out_channels;
        let (hp, wp) = (h / p, w / p);
        x.reshape([b, hp, wp, p, p, c])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, c, h, w])
    }
}

/// The transformer as a [`Denoiser`]: the pooled CLIP embedding travels as
/// [`AddedConditioning::text_embeds`] (checked against `pooled_projection_dim`).
impl Denoiser for SD3Transformer2DModel {
    fn forward(
        &self,
        sample: Tensor<4>,
        _timesteps: Tensor<1>,
        _encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<4>, CoreError> {
        Err(CoreError::shape(
            "text_embeds",
            format!(
                "the SD 3 transformer needs the pooled text embedding [{}, {}] (forward_added)",
                sample.dims()[0],
                self.pooled_projection_dim
            ),
        ))
    }

    fn forward_added(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &AddedConditioning,
    ) -> Result<Tensor<4>, CoreError> {
        self.forward_skipping(sample, timesteps, encoder_hidden_states, added, &[])
    }

    fn forward_skipping(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        added: &AddedConditioning,
        skip_layers: &[usize],
    ) -> Result<Tensor<4>, CoreError> {
        sd_core::check_added_conditioning(self, sample.dims()[0], added)?;
        let pooled = added.text_embeds.clone().expect("checked");
        let out = SD3Transformer2DModel::forward(
            self,
            sample.clone(),
            timesteps,
            encoder_hidden_states,
            pooled,
            skip_layers,
        )?;
        Ok(crate::norm::to_dtype(out, sample.dtype()))
    }

    fn pooled_projection_dim(&self) -> Option<usize> {
        Some(self.pooled_projection_dim)
    }

    fn sample_multiple(&self) -> usize {
        self.pos_embed.patch_size
    }

    fn in_channels(&self) -> usize {
        self.in_channels
    }

    fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn cross_attention_dim(&self) -> usize {
        self.joint_attention_dim
    }
}
