//! The Stable Diffusion pipelines: txt2img, img2img and inpainting, composed from the
//! traits of this crate and behaving as diffusers' `StableDiffusionPipeline`,
//! `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline`.

use burn::prelude::*;

use crate::autoencoder::Autoencoder;
use crate::denoiser::Denoiser;
use crate::error::CoreError;
use crate::noise::NoiseSource;
use crate::scheduler::{Scheduler, SchedulerRun, Steps, img2img_start};
use crate::text_encoder::{HiddenLayer, TextEncoder};

/// Turns a prompt into token ids (`[BOS] + content + [EOS]`, padded to
/// [`PromptTokenizer::max_length`]).
pub trait PromptTokenizer {
    /// The padded ids of one prompt.
    fn encode_padded(&self, prompt: &str) -> Result<Vec<u32>, CoreError>;

    /// The sequence length (77 for CLIP).
    fn max_length(&self) -> usize;

    /// The content ids of a text, without BOS/EOS and untruncated.
    fn content_ids(&self, text: &str) -> Result<Vec<u32>, CoreError>;

    /// Beginning-of-text id.
    fn bos_id(&self) -> u32;

    /// End-of-text id.
    fn eos_id(&self) -> u32;

    /// Padding id.
    fn pad_id(&self) -> u32;
}

/// Options shared by every pipeline.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// What to draw.
    pub prompt: String,
    /// What to avoid; `None` is the empty prompt (diffusers' default).
    pub negative_prompt: Option<String>,
    /// How the scheduler picks its steps.
    pub steps: Steps,
    /// Classifier-free guidance scale; `<= 1` runs no unconditional pass.
    pub guidance_scale: f64,
    /// Image width in pixels (a multiple of 8).
    pub width: usize,
    /// Image height in pixels (a multiple of 8).
    pub height: usize,
    /// diffusers' `clip_skip` (applied to the positive prompt only).
    pub clip_skip: Option<usize>,
    /// Images per prompt.
    pub batch_size: usize,
    /// Initial latents `[batch, 4, h / 8, w / 8]` instead of drawing them (before
    /// scaling by `init_noise_sigma`, as diffusers' `latents=`).
    pub init_latents: Option<Tensor<4>>,
    /// Prompts longer than 75 tokens are encoded in 75-token windows and concatenated
    /// (A1111 / ComfyUI); off by default, where diffusers truncates.
    pub long_prompts: bool,
    /// A1111 attention syntax `(word:1.3)`, `(word)`, `[word]`; off by default.
    pub prompt_weighting: bool,
}

impl Default for GenerationOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            steps: Steps::Count(50),
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            clip_skip: None,
            batch_size: 1,
            init_latents: None,
            long_prompts: false,
            prompt_weighting: false,
        }
    }
}

/// What a step callback sees.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// Index of the step just taken (into the run's timesteps).
    pub step: usize,
    /// Total steps of the run.
    pub total: usize,
    /// The step's timestep.
    pub timestep: f64,
    /// The latents after the step.
    pub latents: &'a Tensor<4>,
}

/// Pixels added on each side by [`StableDiffusion::outpaint`] (multiples of 8).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extend {
    /// Added columns on the left.
    pub left: usize,
    /// Added columns on the right.
    pub right: usize,
    /// Added rows on top.
    pub top: usize,
    /// Added rows at the bottom.
    pub bottom: usize,
}

/// The outpainting blend weight of each canvas pixel: 1 in the new area, falling
/// linearly to 0 over `seam` pixels into the original, 0 beyond.
pub fn outpaint_alpha(
    ch: usize,
    cw: usize,
    h: usize,
    w: usize,
    e: Extend,
    seam: usize,
) -> Vec<f32> {
    let mut alpha = vec![0f32; ch * cw];
    for y in 0..ch {
        for x in 0..cw {
            let inside = y >= e.top && y < e.top + h && x >= e.left && x < e.left + w;
            alpha[y * cw + x] = if !inside {
                1.0
            } else {
                let mut d = usize::MAX;
                if e.left > 0 {
                    d = d.min(x - e.left);
                }
                if e.right > 0 {
                    d = d.min(e.left + w - 1 - x);
                }
                if e.top > 0 {
                    d = d.min(y - e.top);
                }
                if e.bottom > 0 {
                    d = d.min(e.top + h - 1 - y);
                }
                if d >= seam {
                    0.0
                } else {
                    (seam - d) as f32 / (seam + 1) as f32
                }
            };
        }
    }
    alpha
}

/// A cheap preview of SD 1.x/2.x latents without the VAE: a fixed linear map from the
/// 4 latent channels to RGB (A1111's "Approx cheap"), at latent resolution.
///
/// # Shapes
/// - `[b, 4, h, w]` to `[b, 3, h, w]` in `[0, 1]`
pub fn latent_preview(latents: &Tensor<4>) -> Tensor<4> {
    const FACTORS: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let [b, c, h, w] = latents.dims();
    let device = latents.device();
    let m = Tensor::<2>::from_data(
        TensorData::new(
            FACTORS.iter().flatten().copied().collect::<Vec<f32>>(),
            [4, 3],
        ),
        &device,
    );
    let x = latents
        .clone()
        .slice([0..b, 0..c.min(4), 0..h, 0..w])
        .permute([0, 2, 3, 1])
        .reshape([b * h * w, c.min(4)]);
    let m = m.slice([0..c.min(4), 0..3]);
    let rgb = x.matmul(m).reshape([b, h, w, 3]).permute([0, 3, 1, 2]);
    ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)
}

/// Spherical interpolation of two noise tensors (linear when nearly parallel).
pub fn slerp(a: Tensor<4>, b: Tensor<4>, t: f64) -> Tensor<4> {
    let dot = (a.clone() * b.clone()).sum().into_scalar::<f32>() as f64;
    let na = (a.clone() * a.clone()).sum().into_scalar::<f32>() as f64;
    let nb = (b.clone() * b.clone()).sum().into_scalar::<f32>() as f64;
    let cos = dot / (na.sqrt() * nb.sqrt()).max(1e-12);
    if cos.abs() > 0.9995 {
        return a.clone() + (b - a) * t;
    }
    let theta = cos.acos();
    let s = theta.sin();
    a * (((1.0 - t) * theta).sin() / s) + b * ((t * theta).sin() / s)
}

/// A per-step callback; returning `false` cancels the run.
pub type StepCallback<'c> = &'c mut dyn FnMut(&StepInfo<'_>) -> bool;

/// The result of a pipeline.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// The final latents, before decoding.
    pub latents: Tensor<4>,
    /// Decoded images `[batch, 3, H, W]` in `[0, 1]`.
    pub images: Tensor<4>,
}

/// A Stable Diffusion model assembled from its parts (any implementations of the traits).
pub struct StableDiffusion<'a> {
    /// The tokenizer.
    pub tokenizer: &'a dyn PromptTokenizer,
    /// The text encoder.
    pub text_encoder: &'a dyn TextEncoder,
    /// The denoiser (a 4-channel or a 9-channel inpainting U-Net).
    pub unet: &'a dyn Denoiser,
    /// The autoencoder.
    pub vae: &'a dyn Autoencoder,
    /// The scheduler.
    pub scheduler: &'a dyn Scheduler,
    /// Where tensors are created.
    pub device: Device,
}

fn invalid(name: &'static str, message: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument {
        name,
        message: message.into(),
    }
}

/// Checks an image size is positive and divisible by 8.
pub fn check_size(width: usize, height: usize) -> Result<(), CoreError> {
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 || !v.is_multiple_of(8) {
            return Err(invalid(
                name,
                format!("{v} is not a positive multiple of 8"),
            ));
        }
    }
    Ok(())
}

impl StableDiffusion<'_> {
    fn ids(&self, prompt: &str, batch: usize) -> Result<Tensor<2, Int>, CoreError> {
        let ids = self.tokenizer.encode_padded(prompt)?;
        let n = ids.len();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device);
        Ok(if batch > 1 { t.repeat_dim(0, batch) } else { t })
    }

    /// Prompt embeddings `[2 * batch, seq, d]` = `[negative; positive]` with guidance,
    /// else `[batch, seq, d]` of the prompt.
    pub fn encode_prompt(&self, options: &GenerationOptions) -> Result<Tensor<3>, CoreError> {
        let layer = match options.clip_skip {
            None | Some(0) => HiddenLayer::Last,
            Some(k) => {
                if k >= self.text_encoder.num_hidden_layers() {
                    return Err(invalid(
                        "clip_skip",
                        format!("{k} skips every layer of the text encoder"),
                    ));
                }
                HiddenLayer::Skip(k)
            }
        };
        let b = options.batch_size.max(1);
        if options.long_prompts || options.prompt_weighting {
            return self.encode_prompt_chunked(options, layer, b);
        }
        let cond = self
            .text_encoder
            .encode(self.ids(&options.prompt, b)?, layer)
            .hidden_states;
        if options.guidance_scale <= 1.0 {
            return Ok(cond);
        }
        let negative = options.negative_prompt.as_deref().unwrap_or("");
        let uncond = self
            .text_encoder
            .encode(self.ids(negative, b)?, HiddenLayer::Last)
            .hidden_states;
        Ok(Tensor::cat(vec![uncond, cond], 0))
    }

    fn weighted_tokens(&self, prompt: &str, weighting: bool) -> Result<Vec<(u32, f64)>, CoreError> {
        let pieces = if weighting {
            crate::prompt::parse_prompt_attention(prompt)
        } else {
            vec![crate::prompt::WeightedText {
                text: prompt.to_string(),
                weight: 1.0,
            }]
        };
        let mut tokens = Vec::new();
        for p in pieces {
            for id in self.tokenizer.content_ids(&p.text)? {
                tokens.push((id, p.weight));
            }
        }
        Ok(tokens)
    }

    fn encode_chunks(
        &self,
        chunks: &[Vec<(u32, f64)>],
        layer: HiddenLayer,
        weighting: bool,
        batch: usize,
    ) -> Result<Tensor<3>, CoreError> {
        let len = self.tokenizer.max_length();
        let mut parts = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let mut ids = vec![i64::from(self.tokenizer.bos_id())];
            let mut weights = vec![1.0f32];
            for (id, w) in chunk.iter().take(len - 2) {
                ids.push(i64::from(*id));
                weights.push(*w as f32);
            }
            ids.push(i64::from(self.tokenizer.eos_id()));
            ids.resize(len, i64::from(self.tokenizer.pad_id()));
            weights.resize(len, 1.0);
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &self.device);
            let z = self.text_encoder.encode(ids, layer).hidden_states;
            let z = if weighting && weights.iter().any(|w| *w != 1.0) {
                // A1111: scale by the weights, then restore the original mean.
                let before = z.clone().mean().into_scalar::<f32>() as f64;
                let w = Tensor::<1>::from_data(TensorData::new(weights, [len]), &self.device)
                    .reshape([1, len, 1]);
                let z = z * w;
                let after = z.clone().mean().into_scalar::<f32>() as f64;
                if after != 0.0 {
                    z * (before / after)
                } else {
                    z
                }
            } else {
                z
            };
            parts.push(z);
        }
        let z = Tensor::cat(parts, 1);
        Ok(if batch > 1 { z.repeat_dim(0, batch) } else { z })
    }

    fn encode_prompt_chunked(
        &self,
        o: &GenerationOptions,
        layer: HiddenLayer,
        b: usize,
    ) -> Result<Tensor<3>, CoreError> {
        let window = self.tokenizer.max_length() - 2;
        let split = |tokens: Vec<(u32, f64)>| {
            if o.long_prompts {
                crate::prompt::chunk_tokens(&tokens, window)
            } else {
                vec![tokens.into_iter().take(window).collect()]
            }
        };
        let mut pos = split(self.weighted_tokens(&o.prompt, o.prompt_weighting)?);
        if o.guidance_scale <= 1.0 {
            return self.encode_chunks(&pos, layer, o.prompt_weighting, b);
        }
        let negative = o.negative_prompt.as_deref().unwrap_or("");
        let mut neg = split(self.weighted_tokens(negative, o.prompt_weighting)?);
        // Positive and negative get the same number of windows.
        while neg.len() < pos.len() {
            neg.push(Vec::new());
        }
        while pos.len() < neg.len() {
            pos.push(Vec::new());
        }
        let cond = self.encode_chunks(&pos, layer, o.prompt_weighting, b)?;
        let uncond = self.encode_chunks(&neg, HiddenLayer::Last, o.prompt_weighting, b)?;
        Ok(Tensor::cat(vec![uncond, cond], 0))
    }

    /// Decodes scaled latents to images in `[0, 1]`.
    ///
    /// # Shapes
    /// - `[b, 4, h, w]` to `[b, 3, h * 8, w * 8]`
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let raw = self.vae.decode(latents / self.vae.scaling_factor());
        (raw / 2.0 + 0.5).clamp(0.0, 1.0)
    }

    fn latent_shape(&self, o: &GenerationOptions) -> Result<[usize; 4], CoreError> {
        check_size(o.width, o.height)?;
        if o.batch_size == 0 {
            return Err(invalid("batch_size", "must be at least 1"));
        }
        let f = self.vae.downscale_factor();
        if !o.width.is_multiple_of(f) || !o.height.is_multiple_of(f) {
            return Err(invalid(
                "width",
                format!("must be a multiple of the VAE factor {f}"),
            ));
        }
        Ok([
            o.batch_size,
            self.vae.latent_channels(),
            o.height / f,
            o.width / f,
        ])
    }

    /// Text to image.
    pub fn txt2img(
        &self,
        options: &GenerationOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let embeds = self.encode_prompt(options)?;
        self.txt2img_with_embeds(
            options,
            embeds,
            options.init_latents.clone(),
            noise,
            callback,
        )
    }

    /// Text to image from precomputed prompt embeddings (see [`Self::encode_prompt`])
    /// and optional initial latents (unscaled noise).
    pub fn txt2img_with_embeds(
        &self,
        options: &GenerationOptions,
        embeds: Tensor<3>,
        init_latents: Option<Tensor<4>>,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        if self.unet.in_channels() != self.vae.latent_channels() {
            return Err(invalid(
                "unet",
                format!(
                    "txt2img needs a {}-channel U-Net (this one takes {}); use inpaint",
                    self.vae.latent_channels(),
                    self.unet.in_channels()
                ),
            ));
        }
        let shape = self.latent_shape(options)?;
        let mut run = self.scheduler.start(&options.steps)?;
        let latents = match init_latents {
            Some(l) => {
                if l.dims() != shape {
                    return Err(invalid(
                        "init_latents",
                        format!("shape {:?}, expected {:?}", l.dims(), shape),
                    ));
                }
                l
            }
            None => noise.normal(shape, &self.device)?,
        } * run.init_noise_sigma();
        let latents = self.denoise(
            run.as_mut(),
            latents,
            &embeds,
            options.guidance_scale,
            None,
            None,
            noise,
            callback,
        )?;
        Ok(GenerationOutput {
            images: self.decode(latents.clone()),
            latents,
        })
    }

    /// Latent interpolation between two generations: frame `k` of `frames` uses the
    /// prompt embeddings interpolated linearly and the initial noise spherically
    /// (`slerp`) at `t = k / (frames - 1)`. The end frames equal the plain
    /// generations of `a` with `noise_a` and of `b` with `noise_b`.
    #[allow(clippy::too_many_arguments)]
    pub fn interpolate(
        &self,
        a: &GenerationOptions,
        b: &GenerationOptions,
        noise_a: Tensor<4>,
        noise_b: Tensor<4>,
        frames: usize,
        noise: &mut dyn NoiseSource,
        mut callback: Option<StepCallback<'_>>,
    ) -> Result<Vec<GenerationOutput>, CoreError> {
        if frames == 0 {
            return Err(invalid("frames", "must be at least 1"));
        }
        if noise_a.dims() != noise_b.dims() {
            return Err(invalid("noise_b", "must have the shape of noise_a"));
        }
        let ea = self.encode_prompt(a)?;
        let eb = self.encode_prompt(b)?;
        if ea.dims() != eb.dims() {
            return Err(invalid(
                "prompt",
                format!(
                    "the two prompts encode to shapes {:?} and {:?}",
                    ea.dims(),
                    eb.dims()
                ),
            ));
        }
        let mut out = Vec::with_capacity(frames);
        for k in 0..frames {
            let t = if frames == 1 {
                0.0
            } else {
                k as f64 / (frames - 1) as f64
            };
            let (e, x) = if t == 0.0 {
                (ea.clone(), noise_a.clone())
            } else if t == 1.0 {
                (eb.clone(), noise_b.clone())
            } else {
                (
                    ea.clone() + (eb.clone() - ea.clone()) * t,
                    slerp(noise_a.clone(), noise_b.clone(), t),
                )
            };
            let cb = callback
                .as_mut()
                .map(|c| &mut **c as &mut dyn FnMut(&StepInfo<'_>) -> bool);
            out.push(self.txt2img_with_embeds(a, e, Some(x), noise, cb)?);
        }
        Ok(out)
    }

    /// Outpainting: extends `image` (`[1, 3, H, W]` in `[-1, 1]`) by `extend` pixels
    /// (multiples of 8) filled by edge replication, inpaints the new area plus a seam of
    /// `seam` pixels into the original, and blends linearly over the seam. Original
    /// pixels farther than `seam` from the new area come back unchanged.
    #[allow(clippy::too_many_arguments)]
    pub fn outpaint(
        &self,
        options: &GenerationOptions,
        image: Tensor<4>,
        extend: Extend,
        seam: usize,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let [_, c, h, w] = image.dims();
        if c != 3 {
            return Err(invalid("image", format!("{c} channels, 3 expected")));
        }
        for (name, v) in [
            ("left", extend.left),
            ("right", extend.right),
            ("top", extend.top),
            ("bottom", extend.bottom),
        ] {
            if !v.is_multiple_of(8) {
                return Err(invalid(name, format!("{v} is not a multiple of 8")));
            }
        }
        if extend.left + extend.right + extend.top + extend.bottom == 0 {
            return Err(invalid("extend", "extend at least one side"));
        }
        let (ch, cw) = (
            h + extend.top + extend.bottom,
            w + extend.left + extend.right,
        );
        let mut x = image.clone();
        if extend.left > 0 {
            let strip = x
                .clone()
                .slice([0..1, 0..3, 0..h, 0..1])
                .repeat_dim(3, extend.left);
            x = Tensor::cat(vec![strip, x], 3);
        }
        if extend.right > 0 {
            let wx = x.dims()[3];
            let strip = x
                .clone()
                .slice([0..1, 0..3, 0..h, wx - 1..wx])
                .repeat_dim(3, extend.right);
            x = Tensor::cat(vec![x, strip], 3);
        }
        if extend.top > 0 {
            let strip = x
                .clone()
                .slice([0..1, 0..3, 0..1, 0..cw])
                .repeat_dim(2, extend.top);
            x = Tensor::cat(vec![strip, x], 2);
        }
        if extend.bottom > 0 {
            let hx = x.dims()[2];
            let strip = x
                .clone()
                .slice([0..1, 0..3, hx - 1..hx, 0..cw])
                .repeat_dim(2, extend.bottom);
            x = Tensor::cat(vec![x, strip], 2);
        }
        let alpha = outpaint_alpha(ch, cw, h, w, extend, seam);
        let mask: Vec<f32> = alpha
            .iter()
            .map(|&a| if a > 0.0 { 1.0 } else { 0.0 })
            .collect();
        let alpha = Tensor::<4>::from_data(TensorData::new(alpha, [1, 1, ch, cw]), &self.device);
        let mask = Tensor::<4>::from_data(TensorData::new(mask, [1, 1, ch, cw]), &self.device);
        let o = GenerationOptions {
            width: cw,
            height: ch,
            ..options.clone()
        };
        let out = self.inpaint(&o, x.clone(), mask, 1.0, noise, callback)?;
        let b = out.images.dims()[0];
        let original = (x / 2.0 + 0.5).repeat_dim(0, b);
        let alpha = alpha.repeat_dim(0, b);
        let keep = alpha.clone().neg().add_scalar(1.0);
        let images = out.images * alpha + original * keep;
        Ok(GenerationOutput {
            latents: out.latents,
            images,
        })
    }

    /// Image to image: `image` in `[-1, 1]`, `[b, 3, H, W]`; `strength` in (0, 1].
    pub fn img2img(
        &self,
        options: &GenerationOptions,
        image: Tensor<4>,
        strength: f64,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let [_, c, h, w] = image.dims();
        if c != 3 {
            return Err(invalid("image", format!("{c} channels, 3 expected")));
        }
        let options = &GenerationOptions {
            width: w,
            height: h,
            ..options.clone()
        };
        let shape = self.latent_shape(options)?;
        let embeds = self.encode_prompt(options)?;
        let (mut run, start) = self.start_at_strength(&options.steps, strength)?;
        let image_latents = self.encode_image(image, shape[0], noise)?;
        let n = noise.normal(shape, &self.device)?;
        let latents = run.add_noise(image_latents, n, start);
        let latents = self.denoise(
            run.as_mut(),
            latents,
            &embeds,
            options.guidance_scale,
            None,
            None,
            noise,
            callback,
        )?;
        Ok(GenerationOutput {
            images: self.decode(latents.clone()),
            latents,
        })
    }

    /// `vae.encode(image)` posterior sample times the scaling factor, repeated to `batch`.
    fn encode_image(
        &self,
        image: Tensor<4>,
        batch: usize,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<4>, CoreError> {
        let dist = self.vae.encode(image);
        let eps = noise.normal(dist.mean.dims(), &self.device)?;
        let l = dist.sample(eps) * self.vae.scaling_factor();
        let b = l.dims()[0];
        Ok(if b == batch {
            l
        } else {
            l.repeat_dim(0, batch / b.max(1))
        })
    }

    /// Inpainting: repaint where `mask` (`[1, 1, H, W]`, 1 = repaint) is set.
    ///
    /// With a 9-channel inpainting U-Net the mask and the masked image's latents are
    /// concatenated to its input as diffusers does; with an ordinary 4-channel U-Net the
    /// known region is blended back after every step (the legacy method).
    #[allow(clippy::too_many_arguments)]
    pub fn inpaint(
        &self,
        options: &GenerationOptions,
        image: Tensor<4>,
        mask: Tensor<4>,
        strength: f64,
        noise: &mut dyn NoiseSource,
        callback: Option<StepCallback<'_>>,
    ) -> Result<GenerationOutput, CoreError> {
        let [_, _, h, w] = image.dims();
        let [mb, mc, mh, mw] = mask.dims();
        if mc != 1 || mh != h || mw != w || mb != 1 {
            return Err(invalid(
                "mask",
                format!("shape {:?}, expected [1, 1, {h}, {w}]", mask.dims()),
            ));
        }
        let options = &GenerationOptions {
            width: w,
            height: h,
            ..options.clone()
        };
        let shape = self.latent_shape(options)?;
        let [b, _, lh, lw] = shape;
        let nine = self.unet.in_channels() == 2 * shape[1] + 1;
        if !nine && self.unet.in_channels() != shape[1] {
            return Err(invalid(
                "unet",
                format!(
                    "{} input channels: neither a plain nor an inpainting U-Net",
                    self.unet.in_channels()
                ),
            ));
        }
        let embeds = self.encode_prompt(options)?;
        let (mut run, start) = self.start_at_strength(&options.steps, strength)?;
        let mask = mask.greater_equal_elem(0.5).float();
        let full_strength = strength >= 1.0;

        // Initial latents, as diffusers' prepare_latents.
        let (latents, image_latents, fixed_noise) = if nine {
            let latents = match &options.init_latents {
                Some(l) if full_strength => l.clone() * run.init_noise_sigma(),
                _ if full_strength => noise.normal(shape, &self.device)? * run.init_noise_sigma(),
                _ => {
                    let il = self.encode_image(image.clone(), b, noise)?;
                    let n = noise.normal(shape, &self.device)?;
                    run.add_noise(il, n, start)
                }
            };
            (latents, None, None)
        } else {
            let il = self.encode_image(image.clone(), b, noise)?;
            let n = match &options.init_latents {
                Some(l) => l.clone(),
                None => noise.normal(shape, &self.device)?,
            };
            let latents = if full_strength {
                n.clone() * run.init_noise_sigma()
            } else {
                run.add_noise(il.clone(), n.clone(), start)
            };
            (latents, Some(il), Some(n))
        };

        let keep = mask.clone().neg().add_scalar(1.0);
        let latent_mask = burn::tensor::module::interpolate(
            mask.clone(),
            burn::tensor::ops::InterpolateOptions::new(burn::tensor::ops::InterpolateMode::Nearest)
                .with_output_size([lh, lw]),
        );
        let extra = if nine {
            let masked = image * keep;
            let masked_latents = self.encode_image(masked, b, noise)?;
            let m = latent_mask.clone().repeat_dim(0, b);
            Some(Tensor::cat(vec![m, masked_latents], 1))
        } else {
            None
        };
        let blend = match (image_latents, fixed_noise) {
            (Some(il), Some(n)) => Some((il, n, latent_mask.repeat_dim(0, b))),
            _ => None,
        };
        let latents = self.denoise(
            run.as_mut(),
            latents,
            &embeds,
            options.guidance_scale,
            extra,
            blend,
            noise,
            callback,
        )?;
        Ok(GenerationOutput {
            images: self.decode(latents.clone()),
            latents,
        })
    }

    /// Starts a run and skips to diffusers' img2img `t_start` for `strength`.
    fn start_at_strength(
        &self,
        steps: &Steps,
        strength: f64,
    ) -> Result<(Box<dyn SchedulerRun>, usize), CoreError> {
        let mut run = self.scheduler.start(steps)?;
        let start = img2img_start(run.len(), strength)?;
        if start >= run.len() {
            return Err(invalid(
                "strength",
                format!("{strength} leaves no step to run"),
            ));
        }
        run.skip_to(start)?;
        Ok((run, start))
    }

    /// The denoising loop: CFG with one batched U-Net call (`[uncond, cond]`),
    /// optional extra input channels, optional legacy inpainting blend.
    #[allow(clippy::too_many_arguments)]
    fn denoise(
        &self,
        run: &mut dyn SchedulerRun,
        mut latents: Tensor<4>,
        embeds: &Tensor<3>,
        guidance: f64,
        extra: Option<Tensor<4>>,
        blend: Option<(Tensor<4>, Tensor<4>, Tensor<4>)>,
        noise: &mut dyn NoiseSource,
        mut callback: Option<StepCallback<'_>>,
    ) -> Result<Tensor<4>, CoreError> {
        let cfg = guidance > 1.0;
        let total = run.len();
        // Loop invariants: the extra channels (doubled for CFG) and the blend's
        // complement mask.
        let extra = extra.map(|e| {
            if cfg {
                Tensor::cat(vec![e.clone(), e], 0)
            } else {
                e
            }
        });
        let blend = blend.map(|(image_latents, n, mask)| {
            let keep = mask.clone().neg().add_scalar(1.0);
            (image_latents, n, mask, keep)
        });
        for i in run.begin_index()..total {
            let t = run.timestep(i);
            let x = run.scale_model_input(latents.clone(), i);
            let x = if cfg {
                Tensor::cat(vec![x.clone(), x], 0)
            } else {
                x
            };
            let x = match &extra {
                Some(e) => Tensor::cat(vec![x, e.clone()], 1),
                None => x,
            };
            let b = x.dims()[0];
            let ts = Tensor::<1>::full([b], t, &self.device);
            let out = self.unet.forward(x, ts, embeds.clone());
            let pred = if cfg {
                let mut halves = out.chunk(2, 0);
                let c = halves.pop().expect("two halves");
                let u = halves.pop().expect("two halves");
                u.clone() + (c - u) * guidance
            } else {
                out
            };
            latents = run.step(pred, i, latents, noise)?.prev_sample;
            if let Some((image_latents, n, mask, keep)) = &blend {
                let known = if i + 1 < total {
                    run.add_noise(image_latents.clone(), n.clone(), i + 1)
                } else {
                    image_latents.clone()
                };
                latents = known * keep.clone() + latents * mask.clone();
            }
            if let Some(cb) = callback.as_mut() {
                let info = StepInfo {
                    step: i,
                    total,
                    timestep: t,
                    latents: &latents,
                };
                if !cb(&info) {
                    return Err(CoreError::Cancelled(i));
                }
            }
        }
        Ok(latents)
    }
}
