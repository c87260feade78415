//! The CLIP BPE tokenizer, through the `tokenizers` crate.

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::error::IoError;

/// Id of `<|startoftext|>` in the CLIP vocabulary.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// `<|endoftext|>`.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// CLIP's tokenizer with Stable Diffusion's padding and truncation.
///
/// Encoding gives `max_length` ids: `[BOS] + content[..max_length - 2] + [EOS]`,
/// right-padded with the pad token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x), as
/// transformers' `padding="max_length", truncation=True` does.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

fn tok_err(e: impl std::fmt::Display) -> IoError {
    IoError::Tokenizer(e.to_string())
}

fn read(path: &Path) -> Result<String, IoError> {
    std::fs::read_to_string(path).map_err(|e| IoError::io(path, e))
}

/// The `tokenizer.json` pipeline transformers' CLIP converter writes, around a
/// vocabulary and merges.
fn clip_tokenizer_json(
    vocab: Value,
    merges: Vec<Value>,
    extra_special: Option<(&str, u32)>,
) -> Value {
    let mut added = vec![
        json!({"id": 49406, "content": BOS_TOKEN, "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}),
        json!({"id": 49407, "content": EOS_TOKEN, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}),
    ];
    if let (Some(id), Some(vocab_map)) = (
        vocab.get(BOS_TOKEN).and_then(Value::as_u64),
        vocab.as_object(),
    ) {
        added[0]["id"] = json!(id);
        if let Some(e) = vocab_map.get(EOS_TOKEN).and_then(Value::as_u64) {
            added[1]["id"] = json!(e);
        }
    }
    if let Some((content, id)) = extra_special {
        added.push(json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    let bos = added[0]["id"].clone();
    let eos = added[1]["id"].clone();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS_TOKEN, eos], "cls": [BOS_TOKEN, bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": EOS_TOKEN, "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` if present, else the hub layout
    /// `vocab.json` + `merges.txt`; `tokenizer_config.json` (if present) gives the pad
    /// token and `model_max_length`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, IoError> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let (pad, max_length) = if config_path.exists() {
            let cfg: Value =
                serde_json::from_str(&read(&config_path)?).map_err(|e| IoError::Json {
                    path: config_path.clone(),
                    source: e,
                })?;
            let pad = match cfg.get("pad_token") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or(EOS_TOKEN)
                    .to_string(),
                _ => EOS_TOKEN.to_string(),
            };
            let max = cfg
                .get("model_max_length")
                .and_then(Value::as_u64)
                .filter(|&m| (3..=4096).contains(&m))
                .unwrap_or(77) as usize;
            (pad, max)
        } else {
            (EOS_TOKEN.to_string(), 77)
        };
        let json_path = dir.join("tokenizer.json");
        if json_path.exists() {
            let tokenizer = Tokenizer::from_file(&json_path).map_err(tok_err)?;
            return Self::new(tokenizer, &pad, max_length);
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        if !vocab_path.exists() || !merges_path.exists() {
            return Err(IoError::NotFound {
                path: dir.to_path_buf(),
                what: "tokenizer.json, or vocab.json and merges.txt".into(),
            });
        }
        let vocab: Value =
            serde_json::from_str(&read(&vocab_path)?).map_err(|e| IoError::Json {
                path: vocab_path.clone(),
                source: e,
            })?;
        Self::from_vocab_merges(vocab, &read(&merges_path)?, &pad, max_length)
    }

    /// OpenAI's CLIP BPE tokenizer (shipped with this crate), for SD 1.x (`pad` =
    /// `<|endoftext|>`) or SD 2.x (`pad` = `!`), 77 tokens.
    pub fn clip(pad: &str) -> Result<Self, IoError> {
        let vocab: Value = serde_json::from_str(include_str!("../assets/clip/vocab.json"))
            .map_err(|e| IoError::Tokenizer(e.to_string()))?;
        Self::from_vocab_merges(vocab, include_str!("../assets/clip/merges.txt"), pad, 77)
    }

    /// Builds the tokenizer from a parsed `vocab.json` and the text of `merges.txt`.
    pub fn from_vocab_merges(
        vocab: Value,
        merges: &str,
        pad: &str,
        max_length: usize,
    ) -> Result<Self, IoError> {
        let merges: Vec<Value> = merges
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let (a, b) = l.split_once(' ').unwrap_or((l, ""));
                json!([a, b])
            })
            .collect();
        let extra = if pad != EOS_TOKEN && pad != BOS_TOKEN {
            let id = vocab.get(pad).and_then(Value::as_u64).ok_or_else(|| {
                IoError::Tokenizer(format!("pad token `{pad}` is not in the vocabulary"))
            })?;
            Some((pad, id as u32))
        } else {
            None
        };
        let json = clip_tokenizer_json(vocab, merges, extra);
        let tokenizer: Tokenizer = json.to_string().parse().map_err(tok_err)?;
        Self::new(tokenizer, pad, max_length)
    }

    fn new(mut tokenizer: Tokenizer, pad: &str, max_length: usize) -> Result<Self, IoError> {
        let id = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| IoError::Tokenizer(format!("`{t}` is not in the vocabulary")))
        };
        let bos_id = id(BOS_TOKEN)?;
        let eos_id = id(EOS_TOKEN)?;
        let pad_id = id(pad)?;
        if pad != EOS_TOKEN && pad != BOS_TOKEN {
            // SD 2.x pads with `!`, which transformers treats as a special token: every
            // `!` in a prompt is split off before BPE.
            tokenizer.add_special_tokens(&[tokenizers::AddedToken::from(pad.to_string(), true)]);
        }
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    /// `[BOS] + content + [EOS]` with no truncation or padding.
    pub fn encode_unpadded(&self, prompt: &str) -> Result<Vec<u32>, IoError> {
        let enc = self.tokenizer.encode(prompt, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The content tokens of a prompt, without BOS/EOS.
    pub fn content_ids(&self, prompt: &str) -> Result<Vec<u32>, IoError> {
        let ids = self.encode_unpadded(prompt)?;
        let start = usize::from(ids.first() == Some(&self.bos_id));
        let end = ids.len() - usize::from(ids.len() > start && ids.last() == Some(&self.eos_id));
        Ok(ids[start..end].to_vec())
    }

    /// `max_length` ids: truncated keeping BOS/EOS, padded with the pad token.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, IoError> {
        let content = self.content_ids(prompt)?;
        Ok(self.wrap(&content))
    }

    /// Wraps content ids (truncated to `max_length - 2`) in BOS/EOS and pads.
    pub fn wrap(&self, content: &[u32]) -> Vec<u32> {
        let n = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..n]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        ids
    }

    /// Sequence length of [`Self::encode`] (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// `<|startoftext|>` id.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// `<|endoftext|>` id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
}

impl sd_core::PromptTokenizer for ClipTokenizer {
    fn encode_padded(&self, prompt: &str) -> Result<Vec<u32>, sd_core::CoreError> {
        self.encode(prompt)
            .map_err(|e| sd_core::CoreError::Tokenizer(e.to_string()))
    }

    fn max_length(&self) -> usize {
        self.max_length
    }

    fn content_ids(&self, text: &str) -> Result<Vec<u32>, sd_core::CoreError> {
        ClipTokenizer::content_ids(self, text)
            .map_err(|e| sd_core::CoreError::Tokenizer(e.to_string()))
    }

    fn bos_id(&self) -> u32 {
        self.bos_id
    }

    fn eos_id(&self) -> u32 {
        self.eos_id
    }

    fn pad_id(&self) -> u32 {
        self.pad_id
    }
}
