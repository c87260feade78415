//! T5's SentencePiece (Unigram) tokenizer from a `tokenizer.json`, with SD 3's
//! padding and truncation.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::IoError;

/// SD 3's default T5 sequence length (`max_sequence_length` of
/// `StableDiffusion3Pipeline`).
pub const SD3_T5_MAX_LENGTH: usize = 256;

/// The longest T5 sequence SD 3 takes (`max_sequence_length` at most 512).
pub const SD3_T5_LENGTH_LIMIT: usize = 512;

/// T5's tokenizer as the SD 3 pipeline calls it: `padding="max_length",
/// truncation=True, add_special_tokens=True`, so every prompt gives `max_length`
/// ids, `content[..max_length - 1] + [</s>]` right-padded with `<pad>`.
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

fn tok_err(e: impl std::fmt::Display) -> IoError {
    IoError::Tokenizer(e.to_string())
}

impl T5Tokenizer {
    /// Loads `tokenizer.json` of a tokenizer folder (`tokenizer_3/`), padding to
    /// [`SD3_T5_MAX_LENGTH`] tokens.
    ///
    /// # Errors
    /// A folder without `tokenizer.json` (T5's `spiece.model` alone is not read:
    /// the diffusers repositories ship the JSON), a file the `tokenizers` crate
    /// cannot read, a vocabulary without `</s>` or `<pad>`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, IoError> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(IoError::NotFound {
                path: dir.to_path_buf(),
                what: "tokenizer.json (T5)".into(),
            });
        }
        let tokenizer = Tokenizer::from_file(&path).map_err(tok_err)?;
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| tok_err(format!("{}: no `{t}` token", path.display())))
        };
        Ok(Self {
            eos_id: id("</s>")?,
            pad_id: id("<pad>")?,
            tokenizer,
            max_length: SD3_T5_MAX_LENGTH,
        })
    }

    /// The same tokenizer padding to `max_length` tokens (diffusers'
    /// `max_sequence_length`, at most 512 for SD 3).
    ///
    /// # Errors
    /// A length of 0 or above 512.
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self, IoError> {
        if !(1..=SD3_T5_LENGTH_LIMIT).contains(&max_length) {
            return Err(IoError::Tokenizer(format!(
                "max_sequence_length {max_length} is outside 1..={SD3_T5_LENGTH_LIMIT}"
            )));
        }
        self.max_length = max_length;
        Ok(self)
    }

    /// The ids of `prompt` without `</s>` or padding.
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn content_ids(&self, prompt: &str) -> Result<Vec<u32>, IoError> {
        let enc = self.tokenizer.encode(prompt, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// `max_length` ids: the content truncated to `max_length - 1`, `</s>`, padding.
    ///
    /// # Errors
    /// Tokenizer failures.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, IoError> {
        sd_core::PromptTokenizer::encode_eos_padded(self, prompt, self.max_length)
            .map_err(|e| IoError::Tokenizer(e.to_string()))
    }

    /// Padded length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }
}

impl sd_core::PromptTokenizer for T5Tokenizer {
    fn encode_padded(&self, prompt: &str) -> Result<Vec<u32>, sd_core::CoreError> {
        self.encode(prompt)
            .map_err(|e| sd_core::CoreError::Tokenizer(e.to_string()))
    }

    fn max_length(&self) -> usize {
        self.max_length
    }

    fn content_ids(&self, text: &str) -> Result<Vec<u32>, sd_core::CoreError> {
        T5Tokenizer::content_ids(self, text)
            .map_err(|e| sd_core::CoreError::Tokenizer(e.to_string()))
    }

    /// T5 has no beginning-of-text token: its pad id.
    fn bos_id(&self) -> u32 {
        self.pad_id
    }

    fn eos_id(&self) -> u32 {
        self.eos_id
    }

    fn pad_id(&self) -> u32 {
        self.pad_id
    }
}
