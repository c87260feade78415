//! Text conditioners: how a run's prompts become what the denoiser is conditioned
//! on, one type per conditioning family, chosen once when a model is loaded.
//!
//! - [`ClipConditioner`]: SD 1.x / 2.x, one CLIP text encoder (diffusers'
//!   `StableDiffusionPipeline.encode_prompt`).
//! - [`SdxlConditioner`]: SDXL, CLIP ViT-L and OpenCLIP bigG with the pooled
//!   projection (`StableDiffusionXLPipeline.encode_prompt`), or the refiner's second
//!   encoder alone; `prompt_2` / `negative_prompt_2` go to the second encoder.
//!
//! - [`Sd3Conditioner`]: SD 3 / SD 3.5, CLIP-L, CLIP-G and T5
//!   (`StableDiffusion3Pipeline.encode_prompt`); `prompt_3` goes to T5.
//!
//! A family with other encoders (CLIP-L + T5) is one more variant of
//! [`TextConditioner`] with its own file; the denoising loop only sees
//! [`PromptEmbeddings`].

mod clip;
mod owned;
mod sd3;
mod sdxl;
mod windows;

use burn::prelude::*;
use sd_core::{CoreError, HiddenLayer, PromptTokenizer, TextEncoder};

pub use clip::ClipConditioner;
pub use owned::TextEncoders;
pub use sd3::{DEFAULT_MAX_SEQUENCE_LENGTH, Sd3Conditioner};
pub use sdxl::SdxlConditioner;

use crate::composed::{GenerationOptions, invalid};

/// What a text conditioner gives the denoiser for a run.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// The prompt embeddings `[2 * batch, seq, d]` = `[negative; positive]` with
    /// classifier-free guidance, else `[batch, seq, d]`.
    pub embeds: Tensor<3>,
    /// The pooled embedding, batched as `embeds` (SDXL: `[rows, 1280]`); `None` for
    /// families without one.
    pub pooled: Option<Tensor<2>>,
}

/// The text conditioner of a run: one variant per conditioning family, each
/// borrowing its tokenizers and encoders (any [`TextEncoder`] implementation).
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum TextConditioner<'a> {
    /// SD 1.x / 2.x.
    Clip(ClipConditioner<'a>),
    /// SDXL base or refiner.
    Sdxl(SdxlConditioner<'a>),
    /// SD 3 / SD 3.5.
    Sd3(Sd3Conditioner<'a>),
}

impl std::fmt::Debug for TextConditioner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Clip(_) => f.write_str("TextConditioner::Clip"),
            Self::Sdxl(x) => x.fmt(f),
            Self::Sd3(x) => x.fmt(f),
        }
    }
}

impl<'a> TextConditioner<'a> {
    /// SD 1.x / 2.x conditioning by one tokenizer and text encoder.
    pub fn clip(tokenizer: &'a dyn PromptTokenizer, text_encoder: &'a dyn TextEncoder) -> Self {
        Self::Clip(ClipConditioner {
            tokenizer,
            text_encoder,
        })
    }

    /// Encodes the options' prompts (`prompt`, `negative_prompt`, and where the family
    /// has a second encoder `prompt_2`, `negative_prompt_2`) for `options.batch_size`
    /// images; the negative half only with `cfg` (classifier-free guidance).
    ///
    /// # Errors
    /// A `clip_skip` past the encoders' layers, a second prompt the family has no
    /// encoder for, tokenizer failures, an SDXL second encoder without projection.
    pub fn encode(
        &self,
        options: &GenerationOptions,
        cfg: bool,
        device: &Device,
    ) -> Result<PromptEmbeddings, CoreError> {
        self.check(options)?;
        match self {
            Self::Clip(c) => c.encode(options, cfg, device),
            Self::Sdxl(x) => x.encode(options, cfg, device),
            Self::Sd3(x) => x.encode(options, cfg, device),
        }
    }

    /// Checks what the options ask of the text encoders without running them: the
    /// clip skip against the encoders' layers, a second prompt only where the family
    /// has a second encoder.
    ///
    /// # Errors
    /// [`CoreError::InvalidArgument`] naming the option.
    pub fn check(&self, options: &GenerationOptions) -> Result<(), CoreError> {
        if !matches!(self, Self::Sd3(_)) {
            refuse_set(
                &[
                    ("prompt_3", options.prompt_3.is_some()),
                    ("negative_prompt_3", options.negative_prompt_3.is_some()),
                ],
                "a third prompt is for SD 3's T5 encoder",
            )?;
            refuse_set(
                &[("max_sequence_length", options.max_sequence_length.is_some())],
                "the T5 sequence length is an SD 3 setting",
            )?;
        }
        let layers = match self {
            Self::Clip(c) => {
                refuse_set(
                    &[
                        ("prompt_2", options.prompt_2.is_some()),
                        ("negative_prompt_2", options.negative_prompt_2.is_some()),
                    ],
                    "the model has one text encoder; a second prompt is for SDXL's second encoder",
                )?;
                c.text_encoder.num_hidden_layers()
            }
            Self::Sdxl(x) => x.num_hidden_layers(),
            Self::Sd3(x) => {
                x.check(options)?;
                x.num_hidden_layers()
            }
        };
        hidden_layer(options.clip_skip, layers).map(|_| ())
    }

    /// The step the family's image-to-image and inpainting pipelines start a run of
    /// `steps` at for `strength` in (0, 1]: diffusers' SD 1.x / 2.x / XL rule
    /// `steps - int(steps * strength)`, or SD 3's `int(steps - steps * strength)`
    /// (they differ where `steps * strength` is fractional).
    ///
    /// # Errors
    /// A strength outside (0, 1].
    pub fn img2img_start(&self, steps: usize, strength: f64) -> Result<usize, CoreError> {
        match self {
            Self::Sd3(_) => sd_core::img2img_start_sd3(steps, strength),
            _ => sd_core::img2img_start(steps, strength),
        }
    }

    /// [`Self::img2img_start`] as an index into `run`'s timesteps: diffusers counts
    /// `t_start` in steps and multiplies it by the scheduler's order (Heun's list
    /// holds each step but the first twice: `2 N - 1` entries for `N` steps).
    ///
    /// # Errors
    /// A strength outside (0, 1].
    pub fn img2img_start_in(
        &self,
        run: &dyn sd_core::SchedulerRun,
        strength: f64,
    ) -> Result<usize, CoreError> {
        let order = run.order().max(1);
        Ok(self.img2img_start(run.len().div_ceil(order), strength)? * order)
    }

    /// The width of the prompt embeddings' features (`d`).
    pub fn hidden_size(&self) -> usize {
        match self {
            Self::Clip(c) => c.text_encoder.hidden_size(),
            Self::Sdxl(x) => x.hidden_size(),
            Self::Sd3(x) => x.joint_attention_dim,
        }
    }
}

/// The hidden layer `clip_skip` asks for of an encoder with `layers` layers.
///
/// # Errors
/// A clip skip that skips every layer.
pub(crate) fn hidden_layer(
    clip_skip: Option<usize>,
    layers: usize,
) -> Result<HiddenLayer, CoreError> {
    match clip_skip {
        None | Some(0) => Ok(HiddenLayer::Last),
        Some(k) if k >= layers => Err(invalid(
            "clip_skip",
            format!("{k} skips every layer of the text encoder ({layers} layers)"),
        )),
        Some(k) => Ok(HiddenLayer::Skip(k)),
    }
}

/// Token ids `[batch, max_length]` of `prompt` by `tokenizer`, padded.
///
/// # Errors
/// Tokenizer failures.
pub fn token_ids(
    tokenizer: &dyn PromptTokenizer,
    prompt: &str,
    batch: usize,
    device: &Device,
) -> Result<Tensor<2, Int>, CoreError> {
    Ok(ids_tensor(tokenizer.encode_padded(prompt)?, batch, device))
}

/// One row of ids as `[batch, ids.len()]`.
pub(crate) fn ids_tensor(ids: Vec<u32>, batch: usize, device: &Device) -> Tensor<2, Int> {
    let n = ids.len();
    let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
    let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device);
    if batch > 1 { t.repeat_dim(0, batch) } else { t }
}

/// The first of `options` that is set, refused with `message`.
fn refuse_set(options: &[(&'static str, bool)], message: &str) -> Result<(), CoreError> {
    match options.iter().find(|(_, set)| *set) {
        Some((name, _)) => Err(invalid(name, message)),
        None => Ok(()),
    }
}
