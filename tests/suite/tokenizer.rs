//! Tokenizer parity: all 30 prompts of `tokenizer/tokens.json`, from both the
//! hub layout (vocab.json + merges.txt) and tokenizer.json.

use crate::common;

use stable_diffusion::io::ClipTokenizer;

fn check(tokenizer: &ClipTokenizer) {
    let text = std::fs::read_to_string(common::fixture("tokenizer/tokens.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts = json["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 30);
    for record in prompts {
        let prompt = record["prompt"].as_str().unwrap();
        let expected: Vec<u32> = record["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tokenizer.encode(prompt).unwrap();
        assert_eq!(ids, expected, "prompt {prompt:?}");
        let content = tokenizer.content_ids(prompt).unwrap();
        assert_eq!(
            content.len(),
            record["num_content_tokens"].as_u64().unwrap() as usize,
            "{prompt:?}"
        );
    }
}

#[test]
fn hub_layout_vocab_and_merges_match_diffusers() {
    let tokenizer = ClipTokenizer::from_dir(common::fixture("tiny-sd15/tokenizer")).unwrap();
    assert_eq!(tokenizer.pad_id(), 49407);
    check(&tokenizer);
}

#[test]
fn tokenizer_json_matches_diffusers() {
    let tokenizer = ClipTokenizer::from_dir(common::fixture("tokenizer")).unwrap();
    check(&tokenizer);
}

#[test]
fn sd2_pads_with_exclamation_mark_and_splits_it() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(common::fixture("tokenizer").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        common::fixture("configs/sd21/tokenizer/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.pad_id(), 0);
    let ids = tokenizer.encode("wow!!").unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(
        &ids[2..5],
        &[0, 0, 49407],
        "`!!` must be two pad-special tokens"
    );
    assert!(ids[5..].iter().all(|&i| i == 0));
}
