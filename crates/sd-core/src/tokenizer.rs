//! The tokenizer contract: prompts to the token ids a [`crate::TextEncoder`] reads.

use crate::error::CoreError;

/// Turns a prompt into token ids (`[BOS] + content + [EOS]`, padded to
/// [`PromptTokenizer::max_length`]).
pub trait PromptTokenizer {
    /// The padded ids of one prompt: `max_length` ids.
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

    /// `len` ids in T5's layout (no BOS): the content truncated to `len - 1`, EOS,
    /// then padding.
    ///
    /// # Errors
    /// Tokenizer failures.
    fn encode_eos_padded(&self, text: &str, len: usize) -> Result<Vec<u32>, CoreError> {
        let mut ids = self.content_ids(text)?;
        ids.truncate(len.saturating_sub(1));
        ids.push(self.eos_id());
        ids.resize(len, self.pad_id());
        Ok(ids)
    }
}
