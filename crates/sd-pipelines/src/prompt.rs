//! Long prompts and prompt weighting, as AUTOMATIC1111's web UI and ComfyUI do them.
//!
//! - Weighting syntax: `(text)` multiplies the attention to `text` by 1.1, `[text]`
//!   divides it by 1.1, `(text:1.3)` sets the factor; brackets nest and multiply;
//!   `\(` `\)` `\[` `\]` are literal brackets.
//! - Long prompts: the content tokens are cut into 75-token windows, each wrapped in
//!   BOS/EOS and padded to 77, encoded separately, and the embeddings concatenated
//!   along the sequence axis.

/// A piece of prompt text and its attention weight.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedText {
    /// The text.
    pub text: String,
    /// Its weight (1 is neutral).
    pub weight: f64,
}

/// Parses A1111's attention syntax into weighted pieces (A1111's `parse_prompt_attention`).
pub fn parse_prompt_attention(prompt: &str) -> Vec<WeightedText> {
    let mut res: Vec<WeightedText> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<WeightedText>, from: usize, m: f64| {
        for r in res.iter_mut().skip(from) {
            r.weight *= m;
        }
    };
    let chars: Vec<char> = prompt.chars().collect();
    let mut i = 0;
    let mut text = String::new();
    let flush = |text: &mut String, res: &mut Vec<WeightedText>| {
        if !text.is_empty() {
            res.push(WeightedText {
                text: std::mem::take(text),
                weight: 1.0,
            });
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if i + 1 < chars.len() => {
                text.push(chars[i + 1]);
                i += 2;
                continue;
            }
            '(' => {
                flush(&mut text, &mut res);
                round.push(res.len());
            }
            '[' => {
                flush(&mut text, &mut res);
                square.push(res.len());
            }
            ':' => {
                // `:weight)` closes a round bracket with an explicit weight.
                let rest: String = chars[i + 1..].iter().collect();
                let trimmed = rest.trim_start();
                let num_len = trimmed
                    .char_indices()
                    .take_while(|(_, ch)| {
                        ch.is_ascii_digit() || *ch == '.' || *ch == '+' || *ch == '-'
                    })
                    .map(|(k, ch)| k + ch.len_utf8())
                    .last()
                    .unwrap_or(0);
                let after = trimmed[num_len..].trim_start();
                match (
                    trimmed[..num_len].parse::<f64>(),
                    after.starts_with(')'),
                    round.is_empty(),
                ) {
                    (Ok(w), true, false) => {
                        flush(&mut text, &mut res);
                        let from = round.pop().expect("non-empty");
                        multiply(&mut res, from, w);
                        let consumed = rest.len() - after.len() + 1;
                        i += 1 + rest[..consumed].chars().count();
                        continue;
                    }
                    _ => text.push(':'),
                }
            }
            ')' if !round.is_empty() => {
                flush(&mut text, &mut res);
                let from = round.pop().expect("non-empty");
                multiply(&mut res, from, 1.1);
            }
            ']' if !square.is_empty() => {
                flush(&mut text, &mut res);
                let from = square.pop().expect("non-empty");
                multiply(&mut res, from, 1.0 / 1.1);
            }
            c => text.push(c),
        }
        i += 1;
    }
    flush(&mut text, &mut res);
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    if res.is_empty() {
        res.push(WeightedText {
            text: String::new(),
            weight: 1.0,
        });
    }
    // Merge neighbours of equal weight.
    let mut merged: Vec<WeightedText> = Vec::with_capacity(res.len());
    for r in res {
        match merged.last_mut() {
            Some(last) if last.weight == r.weight => last.text.push_str(&r.text),
            _ => merged.push(r),
        }
    }
    merged
}

/// Cuts `(token, weight)` pairs into windows of `window` tokens (at least one window).
pub fn chunk_tokens(tokens: &[(u32, f64)], window: usize) -> Vec<Vec<(u32, f64)>> {
    if tokens.is_empty() {
        return vec![Vec::new()];
    }
    tokens.chunks(window).map(|c| c.to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(text: &str, weight: f64) -> WeightedText {
        WeightedText {
            text: text.into(),
            weight,
        }
    }

    fn close(a: &[WeightedText], b: &[WeightedText]) {
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.text, y.text);
            assert!((x.weight - y.weight).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn a1111_examples() {
        close(
            &parse_prompt_attention("normal text"),
            &[w("normal text", 1.0)],
        );
        close(
            &parse_prompt_attention("an (important) word"),
            &[w("an ", 1.0), w("important", 1.1), w(" word", 1.0)],
        );
        close(
            &parse_prompt_attention("(unbalanced"),
            &[w("unbalanced", 1.1)],
        );
        close(
            &parse_prompt_attention("\\(literal\\]"),
            &[w("(literal]", 1.0)],
        );
        close(
            &parse_prompt_attention("(unnecessary)(parens)"),
            &[w("unnecessaryparens", 1.1)],
        );
        close(
            &parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                w("a ", 1.0),
                w("house", 1.5730000000000004),
                w(" ", 1.1),
                w("on", 1.0),
                w(" a ", 1.1),
                w("hill", 0.55),
                w(", sun, ", 1.1),
                w("sky", 1.4641000000000006),
                w(".", 1.1),
            ],
        );
        close(&parse_prompt_attention("[[a]]"), &[w("a", 1.0 / 1.21)]);
        close(
            &parse_prompt_attention("ratio 16:9 image"),
            &[w("ratio 16:9 image", 1.0)],
        );
    }

    #[test]
    fn chunks() {
        let t: Vec<(u32, f64)> = (0..160).map(|i| (i, 1.0)).collect();
        let c = chunk_tokens(&t, 75);
        assert_eq!(c.iter().map(Vec::len).collect::<Vec<_>>(), vec![75, 75, 10]);
        assert_eq!(chunk_tokens(&[], 75).len(), 1);
    }
}
