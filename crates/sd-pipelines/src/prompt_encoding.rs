//! Prompt embeddings of a run: the composition's [`TextConditioner`] encodes the
//! prompts; what the U-Net takes besides (SDXL's pooled embedding and time ids)
//! follows from the conditioning and the U-Net.

use burn::prelude::*;
use sd_core::{AddedConditioning, CoreError};

use crate::composed::{GenerationOptions, StableDiffusion};
use crate::conditioner::{PromptEmbeddings, TextConditioner};

impl StableDiffusion<'_> {
    /// Prompt embeddings `[2 * batch, seq, d]` = `[negative; positive]` with
    /// classifier-free guidance ([`Self::uses_cfg`]), else `[batch, seq, d]` of the
    /// prompt.
    ///
    /// # Errors
    /// A `clip_skip` past the text encoder's layers, tokenizer failures, a guidance
    /// scale that is not finite.
    pub fn encode_prompt(&self, options: &GenerationOptions) -> Result<Tensor<3>, CoreError> {
        Ok(self.prompt_embeddings(options)?.embeds)
    }

    /// The conditioner's [`PromptEmbeddings`] for the options.
    ///
    /// # Errors
    /// As [`Self::encode_prompt`].
    pub fn prompt_embeddings(
        &self,
        options: &GenerationOptions,
    ) -> Result<PromptEmbeddings, CoreError> {
        crate::composed::check_options(options)?;
        let cfg = self.uses_cfg(options.guidance_scale);
        self.conditioner.encode(options, cfg, &self.device)
    }

    /// The prompt embeddings and what the U-Net takes besides (SDXL: the pooled
    /// embeddings and time ids; `img2img` picks the image-to-image pipeline's
    /// negative time ids).
    ///
    /// # Errors
    /// As [`Self::encode_prompt`]; an SDXL conditioner with a U-Net that has no
    /// `text_time` addition.
    pub fn encode_conditioning(
        &self,
        options: &GenerationOptions,
        img2img: bool,
    ) -> Result<(Tensor<3>, AddedConditioning), CoreError> {
        let PromptEmbeddings { embeds, pooled } = self.prompt_embeddings(options)?;
        let added = match (&self.conditioner, pooled) {
            (TextConditioner::Sdxl(_), Some(pooled)) => {
                self.sdxl_added(options, pooled, img2img)?
            }
            (_, Some(pooled)) if self.unet.pooled_projection_dim().is_some() => AddedConditioning {
                text_embeds: Some(pooled),
                ..Default::default()
            },
            _ => AddedConditioning::default(),
        };
        Ok((embeds, added))
    }
}
