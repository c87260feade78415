//! Prompt embeddings as diffusers' `encode_prompt`, plus A1111's long prompts and
//! attention weighting.

use burn::prelude::*;
use sd_core::{AddedConditioning, CoreError, HiddenLayer, PromptTokenizer, TextEncoder};

use crate::composed::{GenerationOptions, StableDiffusion, invalid};
use crate::prompt::{WeightedText, chunk_tokens, parse_prompt_attention};

impl StableDiffusion<'_> {
    fn ids(&self, prompt: &str, batch: usize) -> Result<Tensor<2, Int>, CoreError> {
        let ids = self.tokenizer.encode_padded(prompt)?;
        let n = ids.len();
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let t = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &self.device);
        Ok(if batch > 1 { t.repeat_dim(0, batch) } else { t })
    }

    /// The hidden layer `clip_skip` asks for, checked against the text encoder.
    fn hidden_layer(&self, clip_skip: Option<usize>) -> Result<HiddenLayer, CoreError> {
        match clip_skip {
            None | Some(0) => Ok(HiddenLayer::Last),
            Some(k) if k >= self.text_encoder.num_hidden_layers() => Err(invalid(
                "clip_skip",
                format!(
                    "{k} skips every layer of the text encoder ({} layers)",
                    self.text_encoder.num_hidden_layers()
                ),
            )),
            Some(k) => Ok(HiddenLayer::Skip(k)),
        }
    }

    /// Prompt embeddings `[2 * batch, seq, d]` = `[negative; positive]` with
    /// classifier-free guidance ([`Self::uses_cfg`]), else `[batch, seq, d]` of the
    /// prompt.
    ///
    /// # Errors
    /// A `clip_skip` past the text encoder's layers, tokenizer failures, a guidance
    /// scale that is not finite.
    pub fn encode_prompt(&self, options: &GenerationOptions) -> Result<Tensor<3>, CoreError> {
        crate::composed::check_options(options)?;
        if let Some(x) = &self.sdxl {
            return Ok(self.encode_prompt_sdxl(x, options)?.0);
        }
        let layer = self.hidden_layer(options.clip_skip)?;
        let b = options.batch_size;
        if options.long_prompts || options.prompt_weighting {
            return self.encode_prompt_chunked(options, layer, b);
        }
        let cond = self
            .text_encoder
            .encode(self.ids(&options.prompt, b)?, layer)?
            .hidden_states;
        if !self.uses_cfg(options.guidance_scale) {
            return Ok(cond);
        }
        let negative = options.negative_prompt.as_deref().unwrap_or("");
        let uncond = self
            .text_encoder
            .encode(self.ids(negative, b)?, HiddenLayer::Last)?
            .hidden_states;
        Ok(Tensor::cat(vec![uncond, cond], 0))
    }

    /// The prompt embeddings and what the U-Net takes besides (SDXL: the pooled
    /// embeddings and time ids; `img2img` picks the image-to-image pipeline's
    /// negative time ids).
    ///
    /// # Errors
    /// As [`Self::encode_prompt`]; an SDXL text encoder pair with a U-Net that has no
    /// `text_time` addition.
    pub fn encode_conditioning(
        &self,
        options: &GenerationOptions,
        img2img: bool,
    ) -> Result<(Tensor<3>, AddedConditioning), CoreError> {
        crate::composed::check_options(options)?;
        match &self.sdxl {
            Some(x) => {
                let (embeds, pooled) = self.encode_prompt_sdxl(x, options)?;
                let added = self.sdxl_added(options, pooled, img2img)?;
                Ok((embeds, added))
            }
            None => Ok((self.encode_prompt(options)?, AddedConditioning::default())),
        }
    }

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

    /// The prompt's and the negative prompt's tokens by `tokenizer`, cut into 75-token
    /// windows (or truncated to one without `long_prompts`); the negative's windows
    /// (empty without guidance) padded with empty ones to the prompt's count and back.
    pub(crate) fn prompt_windows(
        &self,
        tokenizer: &dyn PromptTokenizer,
        o: &GenerationOptions,
    ) -> Result<[Windows; 2], CoreError> {
        let window = tokenizer.max_length() - 2;
        let split = |tokens: Vec<(u32, f64)>| {
            if o.long_prompts {
                chunk_tokens(&tokens, window)
            } else {
                vec![tokens.into_iter().take(window).collect()]
            }
        };
        let mut pos = split(Self::weighted_tokens(
            tokenizer,
            &o.prompt,
            o.prompt_weighting,
        )?);
        if !self.uses_cfg(o.guidance_scale) {
            return Ok([pos, Vec::new()]);
        }
        let negative = o.negative_prompt.as_deref().unwrap_or("");
        let mut neg = split(Self::weighted_tokens(
            tokenizer,
            negative,
            o.prompt_weighting,
        )?);
        while neg.len() < pos.len() {
            neg.push(Vec::new());
        }
        while pos.len() < neg.len() {
            pos.push(Vec::new());
        }
        Ok([pos, neg])
    }

    /// Encodes token windows as A1111 does: each window as `[BOS, tokens, EOS, pad..]`
    /// through `encoder` at `layer`, scaled by its tokens' weights with the window's
    /// mean restored, the windows concatenated: `[batch, 77 * windows, d]`; and the
    /// first window's pooled projection `[batch, p]` when the encoder has one.
    pub(crate) fn encode_windows(
        &self,
        tokenizer: &dyn PromptTokenizer,
        encoder: &dyn TextEncoder,
        windows: &[Vec<(u32, f64)>],
        layer: HiddenLayer,
        weighting: bool,
        batch: usize,
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
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, len]), &self.device);
            let out = encoder.encode(ids, layer)?;
            if pooled.is_none() {
                pooled = Some(out.text_embeds);
            }
            let z = out.hidden_states;
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
        let repeat = |t: Tensor<3>| if batch > 1 { t.repeat_dim(0, batch) } else { t };
        let pooled = pooled
            .flatten()
            .map(|p: Tensor<2>| if batch > 1 { p.repeat_dim(0, batch) } else { p });
        Ok((repeat(Tensor::cat(parts, 1)), pooled))
    }

    fn encode_prompt_chunked(
        &self,
        o: &GenerationOptions,
        layer: HiddenLayer,
        b: usize,
    ) -> Result<Tensor<3>, CoreError> {
        let (tok, te) = (self.tokenizer, self.text_encoder);
        let w = o.prompt_weighting;
        let [pos, neg] = self.prompt_windows(tok, o)?;
        let cond = self.encode_windows(tok, te, &pos, layer, w, b)?.0;
        if !self.uses_cfg(o.guidance_scale) {
            return Ok(cond);
        }
        let uncond = self
            .encode_windows(tok, te, &neg, HiddenLayer::Last, w, b)?
            .0;
        Ok(Tensor::cat(vec![uncond, cond], 0))
    }
}

/// Token windows, each token with its weight.
pub(crate) type Windows = Vec<Vec<(u32, f64)>>;
