//! The text-encoder contract (CLIP in Stable Diffusion 1.x/2.x).

use burn::prelude::*;

use crate::error::CoreError;

/// Which hidden layer of the encoder to return as the prompt embedding.
///
/// `Skip(n)` follows diffusers' `clip_skip = n`: the output of the layer `n` places
/// before the last one (`hidden_states[-(n + 1)]`), passed through the final layer norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HiddenLayer {
    /// The last layer, through the final layer norm: the ordinary prompt embedding.
    #[default]
    Last,
    /// Skip the last `n` layers (A1111 / ComfyUI "CLIP skip" is `n + 1`).
    Skip(usize),
    /// Skip the last `n` layers and leave out the final layer norm
    /// (`hidden_states[-(n + 1)]` as it is): SDXL's prompt embedding is `SkipRaw(1)`
    /// of both encoders, and its `clip_skip = k` is `SkipRaw(k + 1)`.
    SkipRaw(usize),
}

impl HiddenLayer {
    /// The number of layers skipped.
    pub fn skipped(self) -> usize {
        match self {
            Self::Last => 0,
            Self::Skip(k) | Self::SkipRaw(k) => k,
        }
    }
}

/// What a text encoder returns.
#[derive(Debug, Clone)]
pub struct TextEncoderOutput {
    /// Prompt embeddings `[batch, seq_len, hidden]` of the requested layer.
    pub hidden_states: Tensor<3>,
    /// Pooled output `[batch, hidden]`: the final hidden state at the end-of-text token.
    pub pooled: Tensor<2>,
    /// The pooled output through the encoder's `text_projection` `[batch,
    /// projection_dim]` (`CLIPTextModelWithProjection`'s `text_embeds`: SDXL's pooled
    /// prompt embedding); `None` for encoders without one.
    pub text_embeds: Option<Tensor<2>>,
}

/// A text encoder turning token ids into conditioning for the denoiser.
pub trait TextEncoder {
    /// Encodes token ids.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq_len]` (seq_len at most [`Self::max_position_embeddings`])
    /// - output hidden states: `[batch, seq_len, hidden_size]`, pooled `[batch, hidden_size]`
    ///
    /// # Errors
    /// [`CoreError::Shape`] for more ids than [`Self::max_position_embeddings`] or an
    /// empty sequence; [`CoreError::InvalidArgument`] for a [`HiddenLayer::Skip`]
    /// that skips every layer.
    fn encode(
        &self,
        input_ids: Tensor<2, Int>,
        layer: HiddenLayer,
    ) -> Result<TextEncoderOutput, CoreError>;

    /// Width of the embeddings (768 for CLIP-L, 1024 for OpenCLIP-H).
    fn hidden_size(&self) -> usize;

    /// Longest token sequence accepted (77 for CLIP).
    fn max_position_embeddings(&self) -> usize;

    /// Number of transformer layers (the upper bound of [`HiddenLayer::Skip`]).
    fn num_hidden_layers(&self) -> usize;
}

/// A text encoder whose whole last hidden state is the conditioning (T5 of SD 3):
/// no layers to pick, no pooled output.
pub trait SequenceEncoder {
    /// The last hidden state of `input_ids`.
    ///
    /// # Shapes
    /// - `input_ids`: `[batch, seq_len]`; output `[batch, seq_len, hidden_size]`
    ///
    /// # Errors
    /// [`CoreError::Shape`] for an empty batch or sequence.
    fn encode_sequence(&self, input_ids: Tensor<2, Int>) -> Result<Tensor<3>, CoreError>;

    /// Width of the states (4096 for T5-XXL).
    fn hidden_size(&self) -> usize;
}

/// Checks the inputs of [`TextEncoder::encode`] against an encoder's sizes.
///
/// # Errors
/// As [`TextEncoder::encode`].
pub fn check_text_encoder_inputs(
    encoder: &(impl TextEncoder + ?Sized),
    input_ids: [usize; 2],
    layer: HiddenLayer,
) -> Result<(), CoreError> {
    let [_, seq] = input_ids;
    if seq == 0 || seq > encoder.max_position_embeddings() {
        return Err(CoreError::shape(
            "input_ids",
            format!(
                "{seq} tokens, the text encoder takes 1 to {}",
                encoder.max_position_embeddings()
            ),
        ));
    }
    let k = layer.skipped();
    if k > 0 && k >= encoder.num_hidden_layers() {
        return Err(CoreError::InvalidArgument {
            name: "clip_skip",
            message: format!(
                "skipping {k} layers leaves none of the text encoder's {}",
                encoder.num_hidden_layers()
            ),
        });
    }
    Ok(())
}
