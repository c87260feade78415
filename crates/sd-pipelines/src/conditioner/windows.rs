//! A1111's long prompts and attention weighting, shared by the conditioners: prompts
//! cut into 75-token windows whose tokens carry their `(word:1.3)` weights, each
//! window encoded alone and the windows concatenated along the sequence.

use burn::prelude::*;
use sd_core::{CoreError, HiddenLayer, PromptTokenizer, TextEncoder};

use crate::prompt::{WeightedText, chunk_tokens, parse_prompt_attention};

/// Token windows, each token with its weight.
pub(crate) type Windows = Vec<Vec<(u32, f64)>>;

/// The content tokens of `prompt` by `tokenizer`, each with its A1111 weight (1
/// without `weighting`).
fn weighted_tokens(
    tokenizer: &dyn PromptTokenizer,
    prompt: &str,
    weighting: bool,
) -> Result<Vec<(u32, f64)>, CoreError> {
    let pieces = if weighting {
        parse_prompt_attention(prompt)
    } else {
        vec![WeightedText {
            text: prompt.to_string(),
            weight: 1.0,
        }]
    };
    let mut tokens = Vec::new();
    for p in pieces {
        for id in tokenizer.content_ids(&p.text)? {
            tokens.push((id, p.weight));
        }
    }
    Ok(tokens)
}

/// How prompts are cut: `long` into 75-token windows (else truncated to one),
/// `weighting` with A1111's attention syntax.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WindowRule {
    pub long: bool,
    pub weighting: bool,
}

impl WindowRule {
    /// The windows of `prompt` by `tokenizer`.
    pub fn windows(
        self,
        tokenizer: &dyn PromptTokenizer,
        prompt: &str,
    ) -> Result<Windows, CoreError> {
        let window = tokenizer.max_length() - 2;
        let tokens = weighted_tokens(tokenizer, prompt, self.weighting)?;
        Ok(if self.long {
            chunk_tokens(&tokens, window)
        } else {
            vec![tokens.into_iter().take(window).collect()]
        })
    }
}

/// Pads every list of windows with empty windows to the longest one's count, so that
/// prompt and negative (and two encoders' windows) concatenate to one length.
pub(crate) fn pad_windows(lists: &mut [&mut Windows]) {
    let n = lists.iter().map(|w| w.len()).max().unwrap_or(0);
    for w in lists.iter_mut() {
        while w.len() < n {
            w.push(Vec::new());
        }
    }
}

/// Encodes token windows as A1111 does: each window as `[BOS, tokens, EOS, pad..]`
/// through `encoder` at `layer`, scaled by its tokens' weights with the window's
/// mean restored, the windows concatenated: `[batch, 77 * windows, d]`; and the
/// first window's pooled projection `[batch, p]` when the encoder has one.
pub(crate) fn encode_windows(
    tokenizer: &dyn PromptTokenizer,
    encoder: &dyn TextEncoder,
    windows: &[Vec<(u32, f64)>],
    layer: HiddenLayer,
    weighting: bool,
    batch: usize,
    device: &Device,
) -> Result<(Tensor<3>, Option<Tensor<2>>), CoreError> {
    let len = tokenizer.max_length();
    let mut parts = Vec::with_capacity(windows.len());
    let mut pooled = None;
    for window in windows {
        let mut ids = vec![i64::from(tokenizer.bos_id())];
        let mut weights = vec![1.0f32];
        for (id, w) in window.iter().take(len - 2) {
            ids.push(i64::from(*id));
            weights.push(*w as f32);
        }
        ids.push(i64::from(tokenizer.eos_id()));
        ids.resize(len, i64::from(tokenizer.pad_id()));
        weights.resize(len, 1.0);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), device);
        let out = encoder.encode(ids, layer)?;
        if pooled.is_none() {
            pooled = Some(out.text_embeds);
        }
        let z = out.hidden_states;
        let z = if weighting && weights.iter().any(|w| *w != 1.0) {
            // A1111: scale by the weights, then restore the original mean.
            let before = z.clone().mean().into_scalar::<f32>() as f64;
            let w = Tensor::<1>::from_data(TensorData::new(weights, [len]), device)
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
    let repeat = |t: Tensor<3>| if batch > 1 { t.repeat_dim(0, batch) } else { t };
    let pooled = pooled
        .flatten()
        .map(|p: Tensor<2>| if batch > 1 { p.repeat_dim(0, batch) } else { p });
    Ok((repeat(Tensor::cat(parts, 1)), pooled))
}
