//! [`ClipConditioner`]: SD 1.x / 2.x conditioning by one CLIP text encoder, as
//! diffusers' `StableDiffusionPipeline.encode_prompt` (plus A1111's long prompts and
//! weighting).

use burn::prelude::*;
use sd_core::{CoreError, HiddenLayer, PromptTokenizer, TextEncoder};

use super::windows::{WindowRule, encode_windows, pad_windows};
use super::{PromptEmbeddings, hidden_layer, token_ids};
use crate::composed::GenerationOptions;

/// SD 1.x / 2.x: the prompt's hidden states from one text encoder (the last layer,
/// or `clip_skip` layers before it with the final norm), the negative prompt's from
/// the last layer; no pooled embedding.
#[derive(Clone, Copy)]
pub struct ClipConditioner<'a> {
    /// The tokenizer (77 tokens).
    pub tokenizer: &'a dyn PromptTokenizer,
    /// The text encoder.
    pub text_encoder: &'a dyn TextEncoder,
}

impl ClipConditioner<'_> {
    /// `[negative; positive]` with `cfg`, else the positive: `[rows, 77 * windows, d]`.
    pub(crate) fn encode(
        &self,
        o: &GenerationOptions,
        cfg: bool,
        device: &Device,
    ) -> Result<PromptEmbeddings, CoreError> {
        let layer = hidden_layer(o.clip_skip, self.text_encoder.num_hidden_layers())?;
        let b = o.batch_size;
        let negative = o.negative_prompt.as_deref().unwrap_or("");
        let embeds = if o.long_prompts || o.prompt_weighting {
            self.encode_windowed(o, negative, layer, cfg, device)?
        } else {
            let encode = |text: &str, layer| -> Result<Tensor<3>, CoreError> {
                let ids = token_ids(self.tokenizer, text, b, device)?;
                Ok(self.text_encoder.encode(ids, layer)?.hidden_states)
            };
            let cond = encode(&o.prompt, layer)?;
            if cfg {
                Tensor::cat(vec![encode(negative, HiddenLayer::Last)?, cond], 0)
            } else {
                cond
            }
        };
        Ok(PromptEmbeddings {
            embeds,
            pooled: None,
        })
    }

    fn encode_windowed(
        &self,
        o: &GenerationOptions,
        negative: &str,
        layer: HiddenLayer,
        cfg: bool,
        device: &Device,
    ) -> Result<Tensor<3>, CoreError> {
        let (tok, te) = (self.tokenizer, self.text_encoder);
        let rule = WindowRule {
            long: o.long_prompts,
            weighting: o.prompt_weighting,
        };
        let (w, b) = (o.prompt_weighting, o.batch_size);
        let mut pos = rule.windows(tok, &o.prompt)?;
        if !cfg {
            return Ok(encode_windows(tok, te, &pos, layer, w, b, device)?.0);
        }
        let mut neg = rule.windows(tok, negative)?;
        pad_windows(&mut [&mut pos, &mut neg]);
        let cond = encode_windows(tok, te, &pos, layer, w, b, device)?.0;
        let uncond = encode_windows(tok, te, &neg, HiddenLayer::Last, w, b, device)?.0;
        Ok(Tensor::cat(vec![uncond, cond], 0))
    }
}
