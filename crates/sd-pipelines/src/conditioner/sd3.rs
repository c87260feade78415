//! [`Sd3Conditioner`]: SD 3's three text encoders as diffusers'
//! `StableDiffusion3Pipeline.encode_prompt`: the penultimate hidden states of CLIP-L
//! (`prompt`) and CLIP-G (`prompt_2`) side by side, zero-padded to the T5 width and
//! followed along the sequence by T5's last hidden state (`prompt_3`); the pooled
//! embedding is both CLIP encoders' projections side by side.

use burn::prelude::*;
use sd_core::{CoreError, HiddenLayer, PromptTokenizer, SequenceEncoder, TextEncoder};
use sd_models::norm::to_dtype;

use super::sdxl::{or_first, rows};
use super::{PromptEmbeddings, ids_tensor, token_ids};
use crate::composed::{GenerationOptions, invalid};

/// SD 3's default `max_sequence_length` (T5 tokens).
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = sd_io::t5_tokenizer::SD3_T5_MAX_LENGTH;

/// SD 3 / SD 3.5 conditioning.
#[derive(Clone, Copy)]
pub struct Sd3Conditioner<'a> {
    /// `tokenizer` and `text_encoder` (CLIP-L with projection).
    pub clip_l: (&'a dyn PromptTokenizer, &'a dyn TextEncoder),
    /// `tokenizer_2` and `text_encoder_2` (CLIP-G with projection).
    pub clip_g: (&'a dyn PromptTokenizer, &'a dyn TextEncoder),
    /// `tokenizer_3` and `text_encoder_3` (T5-XXL); `None`: its states are zeros,
    /// as diffusers without `text_encoder_3`.
    pub t5: Option<(&'a dyn PromptTokenizer, &'a dyn SequenceEncoder)>,
    /// The transformer's `joint_attention_dim`: the prompt embeddings' width (T5's).
    pub joint_attention_dim: usize,
}

impl std::fmt::Debug for Sd3Conditioner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sd3Conditioner")
            .field("t5", &self.t5.is_some())
            .field("joint_attention_dim", &self.joint_attention_dim)
            .finish_non_exhaustive()
    }
}

/// The three texts of one prompt set.
struct Texts<'s> {
    clip_l: &'s str,
    clip_g: &'s str,
    t5: &'s str,
}

impl Sd3Conditioner<'_> {
    /// The fewest layers of the CLIP encoders (what `clip_skip` may skip).
    pub(crate) fn num_hidden_layers(&self) -> usize {
        self.clip_l
            .1
            .num_hidden_layers()
            .min(self.clip_g.1.num_hidden_layers())
    }

    /// Checks the options against the encoders: no A1111 windows or weighting (SD 3
    /// truncates as diffusers does), CLIP widths that fit the T5 width, a T5 length
    /// in `1..=SD3_T5_LENGTH_LIMIT` (512).
    pub(crate) fn check(&self, o: &GenerationOptions) -> Result<(), CoreError> {
        if o.long_prompts || o.prompt_weighting {
            return Err(invalid(
                "long_prompts",
                "SD 3 prompts are truncated as diffusers does (77 CLIP, max_sequence_length T5 \
                 tokens); A1111 windows and weighting are for SD 1.x / 2.x / XL",
            ));
        }
        let clip = self.clip_l.1.hidden_size() + self.clip_g.1.hidden_size();
        if clip > self.joint_attention_dim {
            return Err(invalid(
                "text_encoder_2",
                format!(
                    "the CLIP states ({clip} wide) are wider than the transformer's text \
                     width {}",
                    self.joint_attention_dim
                ),
            ));
        }
        if let Some((_, t5)) = self.t5
            && t5.hidden_size() != self.joint_attention_dim
        {
            return Err(invalid(
                "text_encoder_3",
                format!(
                    "T5 states are {} wide, the transformer takes {}",
                    t5.hidden_size(),
                    self.joint_attention_dim
                ),
            ));
        }
        let len = self.max_sequence_length(o);
        let limit = sd_io::t5_tokenizer::SD3_T5_LENGTH_LIMIT;
        if !(1..=limit).contains(&len) {
            return Err(invalid(
                "max_sequence_length",
                format!("{len} is outside 1..={limit}"),
            ));
        }
        Ok(())
    }

    fn max_sequence_length(&self, o: &GenerationOptions) -> usize {
        o.max_sequence_length.unwrap_or(DEFAULT_MAX_SEQUENCE_LENGTH)
    }

    /// `[negative; positive]` with `cfg`, else the positive; the pooled embeddings
    /// batched the same way.
    pub(crate) fn encode(
        &self,
        o: &GenerationOptions,
        cfg: bool,
        device: &Device,
    ) -> Result<PromptEmbeddings, CoreError> {
        let len = self.max_sequence_length(o);
        let positive = Texts {
            clip_l: &o.prompt,
            clip_g: or_first(o.prompt_2.as_deref(), &o.prompt),
            t5: or_first(o.prompt_3.as_deref(), &o.prompt),
        };
        // diffusers: hidden_states[-(clip_skip + 2)], no final norm; negatives at -2.
        let layer = HiddenLayer::SkipRaw(o.clip_skip.unwrap_or(0) + 1);
        let pos = self.encode_texts(&positive, layer, len, o.batch_size, device)?;
        let neg = if cfg {
            let n = o.negative_prompt.as_deref().unwrap_or("");
            let negative = Texts {
                clip_l: n,
                clip_g: or_first(o.negative_prompt_2.as_deref(), n),
                t5: or_first(o.negative_prompt_3.as_deref(), n),
            };
            let layer = HiddenLayer::SkipRaw(1);
            Some(self.encode_texts(&negative, layer, len, o.batch_size, device)?)
        } else {
            None
        };
        let (embeds, pooled) = rows(pos, neg, cfg);
        Ok(PromptEmbeddings {
            embeds,
            pooled: Some(pooled),
        })
    }

    /// One prompt set: `[b, 77 + len, joint_attention_dim]` and `[b, pooled]`.
    fn encode_texts(
        &self,
        texts: &Texts<'_>,
        layer: HiddenLayer,
        len: usize,
        batch: usize,
        device: &Device,
    ) -> Result<(Tensor<3>, Tensor<2>), CoreError> {
        let mut states = Vec::with_capacity(2);
        let mut pooled = Vec::with_capacity(2);
        for ((tokenizer, encoder), text) in
            [(self.clip_l, texts.clip_l), (self.clip_g, texts.clip_g)]
        {
            let out = encoder.encode(token_ids(tokenizer, text, batch, device)?, layer)?;
            pooled.push(out.text_embeds.ok_or_else(|| {
                invalid(
                    "text_encoder",
                    "SD 3's CLIP encoders need a text_projection (CLIPTextModelWithProjection)",
                )
            })?);
            states.push(out.hidden_states);
        }
        let clip = Tensor::cat(states, 2);
        let [b, seq, width] = clip.dims();
        let clip = if width < self.joint_attention_dim {
            let pad = Tensor::zeros([b, seq, self.joint_attention_dim - width], device);
            Tensor::cat(vec![clip.clone(), to_dtype(pad, clip.dtype())], 2)
        } else {
            clip
        };
        let t5 = match self.t5 {
            Some((tokenizer, encoder)) => {
                let ids = tokenizer.encode_eos_padded(texts.t5, len)?;
                encoder.encode_sequence(ids_tensor(ids, batch, device))?
            }
            None => Tensor::zeros([batch, len, self.joint_attention_dim], device),
        };
        let t5 = to_dtype(t5, clip.dtype());
        Ok((Tensor::cat(vec![clip, t5], 1), Tensor::cat(pooled, 1)))
    }
}
