//! [`SdxlConditioner`]: SDXL's two text encoders as diffusers'
//! `StableDiffusionXLPipeline.encode_prompt`: the penultimate hidden states of CLIP
//! ViT-L (`prompt`) and OpenCLIP bigG (`prompt_2`, defaulting to `prompt`)
//! concatenated along the features, and the second encoder's pooled projection.

use burn::prelude::*;
use sd_core::{CoreError, HiddenLayer, PromptTokenizer, TextEncoder};

use super::windows::{WindowRule, Windows, encode_windows, pad_windows};
use super::{PromptEmbeddings, token_ids};
use crate::composed::{GenerationOptions, invalid};

/// SDXL's conditioning: the base model's two encoders or the refiner's second one
/// alone (diffusers' `text_encoder=None`).
#[derive(Clone, Copy)]
pub struct SdxlConditioner<'a> {
    /// `tokenizer` and `text_encoder` (CLIP ViT-L); `None` for the refiner, whose
    /// prompt embeddings are `text_encoder_2`'s alone.
    pub text_encoder: Option<(&'a dyn PromptTokenizer, &'a dyn TextEncoder)>,
    /// `tokenizer_2` (pads with `!`).
    pub tokenizer_2: &'a dyn PromptTokenizer,
    /// `text_encoder_2` (a `CLIPTextModelWithProjection`); its `text_embeds` are the
    /// pooled prompt embedding.
    pub text_encoder_2: &'a dyn TextEncoder,
    /// `force_zeros_for_empty_prompt` (`model_index.json`, true for SDXL base): with
    /// guidance and no negative prompt, the negative embeddings are zeros.
    pub force_zeros_for_empty_prompt: bool,
}

impl std::fmt::Debug for SdxlConditioner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdxlConditioner")
            .field("text_encoder", &self.text_encoder.is_some())
            .field(
                "force_zeros_for_empty_prompt",
                &self.force_zeros_for_empty_prompt,
            )
            .finish_non_exhaustive()
    }
}

/// The second encoder's pooled projection, which SDXL needs.
fn required_pooled(pooled: Option<Tensor<2>>) -> Result<Tensor<2>, CoreError> {
    pooled.ok_or_else(|| {
        invalid(
            "text_encoder_2",
            "SDXL's second text encoder must have a text_projection (CLIPTextModelWithProjection)",
        )
    })
}

/// diffusers' `prompt_2 = prompt_2 or prompt`: an unset or empty second prompt is the
/// first.
pub(super) fn or_first<'s>(second: Option<&'s str>, first: &'s str) -> &'s str {
    second.filter(|s| !s.is_empty()).unwrap_or(first)
}

/// One prompt pair's embeddings: `[rows, seq, d1 + d2]` (refiner `[rows, seq, d2]`)
/// and the pooled projection `[rows, p]`.
type Pair = (Tensor<3>, Tensor<2>);

impl SdxlConditioner<'_> {
    /// The fewest layers of the encoders (what `clip_skip` may skip).
    pub(crate) fn num_hidden_layers(&self) -> usize {
        let second = self.text_encoder_2.num_hidden_layers();
        self.text_encoder
            .map_or(second, |(_, te)| te.num_hidden_layers().min(second))
    }

    /// The prompt embeddings' width: both encoders' (`d1 + d2`) or the refiner's.
    pub(crate) fn hidden_size(&self) -> usize {
        self.text_encoder_2.hidden_size() + self.text_encoder.map_or(0, |(_, te)| te.hidden_size())
    }

    /// The texts each encoder reads: `(first, second)`. The refiner reads `first`
    /// (diffusers zips `[prompt, prompt_2]` with its one encoder).
    fn texts<'s>(&self, first: &'s str, second: Option<&'s str>) -> (&'s str, &'s str) {
        match self.text_encoder {
            Some(_) => (first, or_first(second, first)),
            None => (first, first),
        }
    }

    /// `[negative; positive]` with `cfg` (zeros for an unset negative prompt when
    /// `force_zeros_for_empty_prompt`), else the positive; and the pooled embeddings.
    pub(crate) fn encode(
        &self,
        o: &GenerationOptions,
        cfg: bool,
        device: &Device,
    ) -> Result<PromptEmbeddings, CoreError> {
        // diffusers: hidden_states[-(clip_skip + 2)], no final norm.
        let layer = HiddenLayer::SkipRaw(o.clip_skip.unwrap_or(0) + 1);
        let positive = self.texts(&o.prompt, o.prompt_2.as_deref());
        let negative_1 = o.negative_prompt.as_deref().unwrap_or("");
        let negative = self.texts(negative_1, o.negative_prompt_2.as_deref());
        let zeros = o.negative_prompt.is_none() && self.force_zeros_for_empty_prompt;
        let (pos, neg) = if o.long_prompts || o.prompt_weighting {
            self.encode_windowed(
                o,
                positive,
                (cfg && !zeros).then_some(negative),
                layer,
                device,
            )?
        } else {
            let b = o.batch_size;
            let pos = self.encode_pair(positive, layer, b, device)?;
            let neg = if cfg && !zeros {
                Some(self.encode_pair(negative, HiddenLayer::SkipRaw(1), b, device)?)
            } else {
                None
            };
            (pos, neg)
        };
        let (embeds, pooled) = rows(pos, neg, cfg);
        Ok(PromptEmbeddings {
            embeds,
            pooled: Some(pooled),
        })
    }

    /// One prompt pair through both encoders (the refiner: the second alone).
    fn encode_pair(
        &self,
        (first, second): (&str, &str),
        layer: HiddenLayer,
        batch: usize,
        device: &Device,
    ) -> Result<Pair, CoreError> {
        let b = self
            .text_encoder_2
            .encode(token_ids(self.tokenizer_2, second, batch, device)?, layer)?;
        let pooled = required_pooled(b.text_embeds)?;
        let Some((tokenizer, text_encoder)) = self.text_encoder else {
            return Ok((b.hidden_states, pooled));
        };
        let a = text_encoder.encode(token_ids(tokenizer, first, batch, device)?, layer)?;
        Ok((
            Tensor::cat(vec![a.hidden_states, b.hidden_states], 2),
            pooled,
        ))
    }

    /// Long prompts and A1111 weighting for SDXL, as A1111 does them: 75-token windows
    /// through both encoders, each encoder's windows weighted (its own mean restored)
    /// and concatenated along the sequence, the two encoders along the features:
    /// `[b, 77 * windows, d1 + d2]`; the pooled projection is the second encoder's of
    /// the first window. Every list of windows is padded with empty windows to the
    /// longest's count.
    fn encode_windowed(
        &self,
        o: &GenerationOptions,
        positive: (&str, &str),
        negative: Option<(&str, &str)>,
        layer: HiddenLayer,
        device: &Device,
    ) -> Result<(Pair, Option<Pair>), CoreError> {
        let rule = WindowRule {
            long: o.long_prompts,
            weighting: o.prompt_weighting,
        };
        let first = |text: &str| -> Result<Windows, CoreError> {
            match self.text_encoder {
                Some((tok, _)) => rule.windows(tok, text),
                None => Ok(Vec::new()),
            }
        };
        let mut pos = (
            first(positive.0)?,
            rule.windows(self.tokenizer_2, positive.1)?,
        );
        let mut neg = match negative {
            Some((n1, n2)) => (first(n1)?, rule.windows(self.tokenizer_2, n2)?),
            None => (Vec::new(), Vec::new()),
        };
        let mut lists = vec![&mut pos.1];
        if self.text_encoder.is_some() {
            lists.push(&mut pos.0);
        }
        if negative.is_some() {
            lists.push(&mut neg.1);
            if self.text_encoder.is_some() {
                lists.push(&mut neg.0);
            }
        }
        pad_windows(&mut lists);
        let (w, b) = (o.prompt_weighting, o.batch_size);
        let encode = |(w1, w2): &(Windows, Windows), layer| -> Result<Pair, CoreError> {
            let (h2, pooled) = encode_windows(
                self.tokenizer_2,
                self.text_encoder_2,
                w2,
                layer,
                w,
                b,
                device,
            )?;
            let pooled = required_pooled(pooled)?;
            let Some((tok, te)) = self.text_encoder else {
                return Ok((h2, pooled));
            };
            let h1 = encode_windows(tok, te, w1, layer, w, b, device)?.0;
            Ok((Tensor::cat(vec![h1, h2], 2), pooled))
        };
        let positive = encode(&pos, layer)?;
        let negative = match negative {
            Some(_) => Some(encode(&neg, HiddenLayer::SkipRaw(1))?),
            None => None,
        };
        Ok((positive, negative))
    }
}

/// `[negative; positive]` with `cfg` (zeros where no negative was encoded), else the
/// positive.
pub(super) fn rows((pe, pp): Pair, negative: Option<Pair>, cfg: bool) -> Pair {
    if !cfg {
        return (pe, pp);
    }
    let (ne, np) = negative.unwrap_or_else(|| (pe.zeros_like(), pp.zeros_like()));
    (Tensor::cat(vec![ne, pe], 0), Tensor::cat(vec![np, pp], 0))
}
