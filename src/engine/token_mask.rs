//! Which vocabulary entries a grammar allows next.
//!
//! Tokens are walked through the [`Matcher`] byte by byte. Two things keep this cheap enough to
//! run before every sampling step of a constrained sequence:
//! - the vocabulary is stored as a byte trie, so tokens sharing a prefix share its walk and a
//!   dead prefix prunes its whole subtree (outside strings almost everything dies at once);
//! - inside a string, where nearly every token is valid, tokens made only of ordinary
//!   characters are admitted without walking them; only the few with quotes, backslashes or
//!   control characters are checked.

use crate::engine::grammar::Matcher;
use crate::text::tokenizer::TextTokenizer;

/// The vocabulary in the shapes the mask needs; built once per model.
pub struct TokenTable {
    /// Length of a logits row (the model's vocabulary, which may exceed the tokenizer's).
    vocab: usize,
    bytes: Vec<Vec<u8>>,
    eos: Vec<u32>,
    /// Ordinary tokens that are valid anywhere inside a JSON string.
    plain: Vec<u32>,
    /// Ordinary tokens that are not: they hold `"`, `\` or control characters.
    structural: Vec<u32>,
    trie: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    /// Tokens whose bytes end here.
    tokens: Vec<u32>,
}

impl TokenTable {
    /// Special tokens never appear inside constrained output; the end-of-turn ones are allowed
    /// only once the document is complete.
    pub fn new(tokenizer: &TextTokenizer, vocab: usize) -> Self {
        let mut trie = vec![TrieNode::default()];
        let mut bytes = vec![Vec::new(); vocab];
        let (mut plain, mut structural) = (Vec::new(), Vec::new());
        for id in 0..vocab.min(tokenizer.vocab_size()) as u32 {
            let b = tokenizer.token_bytes(id);
            if b.is_empty() || tokenizer.is_special(id) || tokenizer.is_eos(id) {
                continue;
            }
            let mut node = 0usize;
            for &byte in &b {
                node = match trie[node].children.iter().find(|(c, _)| *c == byte) {
                    Some(&(_, child)) => child as usize,
                    None => {
                        trie.push(TrieNode::default());
                        let child = trie.len() - 1;
                        trie[node].children.push((byte, child as u32));
                        child
                    }
                };
            }
            trie[node].tokens.push(id);
            if b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\') {
                plain.push(id);
            } else {
                structural.push(id);
            }
            bytes[id as usize] = b;
        }
        let eos = tokenizer
            .eos_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab)
            .collect();
        Self {
            vocab,
            bytes,
            eos,
            plain,
            structural,
            trie,
        }
    }

    pub fn bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Fills `allowed` (one entry per logit) with the tokens that keep `matcher` valid.
    pub fn mask(&self, matcher: &Matcher, allowed: &mut Vec<bool>) {
        allowed.clear();
        allowed.resize(self.vocab, false);
        if matcher.can_finish() {
            for &id in &self.eos {
                allowed[id as usize] = true;
            }
        }
        if !matcher.is_alive() || matcher.is_done() {
            return;
        }
        if matcher.in_plain_string() {
            for &id in &self.plain {
                allowed[id as usize] = true;
            }
            for &id in &self.structural {
                let mut m = matcher.clone();
                if m.feed(&self.bytes[id as usize]) {
                    allowed[id as usize] = true;
                }
            }
            return;
        }
        let mut stack: Vec<(u32, Matcher)> = vec![(0, matcher.clone())];
        while let Some((node, state)) = stack.pop() {
            for &(byte, child) in &self.trie[node as usize].children {
                let mut next = state.clone();
                if !next.push(byte) {
                    continue;
                }
                for &id in &self.trie[child as usize].tokens {
                    allowed[id as usize] = true;
                }
                if !self.trie[child as usize].children.is_empty() {
                    stack.push((child, next));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::grammar::Grammar;
    use std::path::Path;

    /// SmolLM2's tokenizer when the default model is present.
    fn smollm() -> Option<TextTokenizer> {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return None;
        }
        let mut file = std::fs::File::open(&path).ok()?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).ok()?;
        TextTokenizer::from_gguf_metadata(&content.metadata).ok()
    }

    #[test]
    fn masks_follow_the_grammar() {
        let Some(tokenizer) = smollm() else { return };
        let vocab = tokenizer.vocab_size();
        let started = std::time::Instant::now();
        let table = TokenTable::new(&tokenizer, vocab);
        let built = started.elapsed();
        let id = |s: &str| tokenizer.encode(s, false).unwrap()[0];
        let mut allowed = Vec::new();

        let mut m = Matcher::new(Grammar::json_object());
        let started = std::time::Instant::now();
        table.mask(&m, &mut allowed);
        let structural = started.elapsed();
        assert!(
            allowed[id("{") as usize]
                && !allowed[id("hello") as usize]
                && !allowed[id("[") as usize]
        );
        assert!(
            !tokenizer.eos_ids.iter().any(|&e| allowed[e as usize]),
            "EOS before the object is complete"
        );

        assert!(m.feed(b"{\"na"));
        let started = std::time::Instant::now();
        table.mask(&m, &mut allowed);
        let in_string = started.elapsed();
        let count = allowed.iter().filter(|&&a| a).count();
        assert!(
            count > vocab / 2,
            "most tokens fit inside a string ({count})"
        );
        assert!(allowed[id("me") as usize] && allowed[id("\":") as usize]);

        assert!(m.feed(b"me\": 1}"));
        table.mask(&m, &mut allowed);
        let only: Vec<usize> = (0..vocab).filter(|&i| allowed[i]).collect();
        let mut eos: Vec<usize> = tokenizer.eos_ids.iter().map(|&e| e as usize).collect();
        eos.sort();
        assert_eq!(only, eos, "only EOS after the object");
        // Generous bounds: these run before every constrained sampling step.
        eprintln!("table {built:?}, structural mask {structural:?}, in-string mask {in_string:?}");
        assert!(structural.as_millis() < 200 && in_string.as_millis() < 200);
    }
}
