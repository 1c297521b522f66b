//! Constrained decoding (`response_format`, forced tool calls) with llguidance.
//!
//! A request's constraint is a [`Spec`]: a JSON Schema, or a Lark grammar (which may embed JSON
//! Schemas). The HTTP layer checks its shape and size, then compiles it against the model's
//! [`TokenTable`] into a [`Grammar`]: a 400 for whatever llguidance refuses, before the request
//! is queued. Each constrained sequence gets its own [`Constrained`] matcher, which the engine
//! asks for a token mask before sampling and feeds the sampled token after, so constrained and
//! free sequences share one batch.
//!
//! JSON is generated in one fixed layout (`, ` and `: ` separators, no other whitespace): a small
//! model offered free whitespace can loop on blank lines, and a fixed layout is still valid JSON.

use crate::text::tokenizer::TextTokenizer;
use anyhow::{anyhow, bail, Result};
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};

/// What a request constrains its output to, before compilation.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// Output valid against this JSON Schema.
    JsonSchema(Value),
    /// Output matching this Lark grammar (llguidance's dialect, `%json` schemas included).
    Lark(String),
    /// Output matching this regular expression, whole.
    Regex(String),
}

impl Spec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object() -> Self {
        Spec::JsonSchema(json!({"type": "object"}))
    }
}

/// `text` as a Lark string literal (its escapes are JSON's).
pub fn lark_literal(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

/// The layout options llguidance reads from a schema's `x-guidance` key; any the client sent are
/// replaced.
pub fn with_layout(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        map.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// Bounds on llguidance's work, so a hostile schema can neither stall the engine thread (each
/// mask and token is bounded by the step fuel) nor exhaust memory at compile time.
fn parser_limits() -> ParserLimits {
    ParserLimits {
        max_items_in_row: 2_000,
        initial_lexer_fuel: 1_000_000,
        step_lexer_fuel: 200_000,
        step_max_items: 50_000,
        max_lexer_states: 100_000,
        max_grammar_size: 200_000,
        precompute_large_lexemes: true,
        verbose_errors: true,
    }
}

/// The vocabulary as llguidance needs it (a byte trie with the EOS tokens), built once per model.
pub struct TokenTable {
    factory: Result<ParserFactory, String>,
    /// Length of a logits row (the model's vocabulary, which may exceed the tokenizer's).
    vocab: usize,
}

impl TokenTable {
    /// Special tokens carry llguidance's 0xFF marker, so grammar text never matches them; the
    /// end-of-turn ones are allowed only once the output is complete.
    pub fn new(tokenizer: &TextTokenizer, vocab: usize) -> Self {
        let known = vocab.min(tokenizer.vocab_size());
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                if id as usize >= known {
                    return Vec::new();
                }
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_special(id) || tokenizer.is_eos(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(&bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let eos: Vec<u32> = tokenizer
            .eos_ids
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab)
            .collect();
        let factory = catch_unwind(|| -> Result<ParserFactory> {
            let Some(&first) = eos.first() else {
                bail!("the tokenizer has no end-of-sequence token");
            };
            let info = TokRxInfo::new(vocab as u32, first);
            let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
            let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
            let mut factory = ParserFactory::new_simple(&env)?;
            factory.quiet();
            *factory.limits_mut() = parser_limits();
            Ok(factory)
        })
        .map_err(|_| anyhow!("building the token trie panicked"))
        .and_then(|r| r)
        .map_err(|e| format!("constrained decoding is unavailable for this model: {e:#}"));
        Self { factory, vocab }
    }

    /// Length of a logits row.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The bytes of a token as the grammar sees them (special tokens with the 0xFF marker).
    pub fn bytes(&self, id: u32) -> Vec<u8> {
        match &self.factory {
            Ok(f) if (id as usize) < self.vocab => f.tok_env().tok_trie().token(id).to_vec(),
            _ => Vec::new(),
        }
    }

    /// Compiles `spec`; the error says why llguidance refused it (or that it admits no output).
    pub fn compile(&self, spec: &Spec) -> Result<Arc<Grammar>> {
        let factory = self.factory.as_ref().map_err(|e| anyhow!("{e}"))?;
        let top = match spec {
            Spec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_layout(schema)),
            Spec::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
            Spec::Regex(pattern) => TopLevelGrammar::from_regex(pattern),
        };
        let compiled = catch_unwind(AssertUnwindSafe(|| -> Result<Matcher> {
            let parser = factory.create_parser(top)?;
            let matcher = Matcher::new(Ok(parser));
            if let Some(e) = matcher.get_error() {
                bail!("{e}");
            }
            // A grammar that admits nothing (an unproductive recursion, an empty enum) is
            // refused now rather than stalling the sequence later.
            let mask = matcher.clone().compute_mask()?;
            if mask.is_zero() {
                bail!("the schema admits no output");
            }
            Ok(matcher)
        }))
        .map_err(|_| anyhow!("the grammar compiler failed on this schema"))??;
        Ok(Arc::new(Grammar {
            fresh: Mutex::new(compiled),
        }))
    }
}

/// A compiled constraint: every sequence of the request starts from a copy of this matcher.
pub struct Grammar {
    fresh: Mutex<Matcher>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

impl Grammar {
    pub fn start(&self) -> Constrained {
        let matcher = self.fresh.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Constrained { matcher }
    }
}

/// One sequence's position in its grammar.
pub struct Constrained {
    matcher: Matcher,
}

impl Constrained {
    /// The tokens allowed next: the grammar's, and only the end-of-sequence tokens once it is
    /// complete (EOS is also allowed wherever the output may end).
    pub fn mask(&mut self) -> Result<SimpleVob> {
        self.matcher.compute_mask_or_eos()
    }

    /// Sets the logits of the tokens the grammar does not allow next to -inf.
    pub fn apply(&mut self, row: &mut [f32]) -> Result<()> {
        let mask = self.mask()?;
        for (id, logit) in row.iter_mut().enumerate() {
            if !mask.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past the sampled token (an end-of-sequence token ends the output instead).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token)
    }

    /// Whether the output so far is complete.
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// SmolLM2's tokenizer when the base model is present.
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

    fn allowed(mask: &SimpleVob, vocab: usize) -> Vec<usize> {
        (0..vocab).filter(|&i| mask.is_allowed(i as u32)).collect()
    }

    /// Feeds `text` token by token as the tokenizer splits it; false when the grammar refuses.
    fn feed(tokenizer: &TextTokenizer, c: &mut Constrained, text: &str) -> bool {
        tokenizer
            .encode(text, false)
            .unwrap()
            .into_iter()
            .all(|t| c.mask().unwrap().is_allowed(t) && c.advance(t).is_ok())
    }

    #[test]
    fn masks_follow_the_grammar() {
        let Some(tokenizer) = smollm() else { return };
        let vocab = tokenizer.vocab_size();
        let started = std::time::Instant::now();
        let table = TokenTable::new(&tokenizer, vocab);
        let built = started.elapsed();
        let id = |s: &str| tokenizer.encode(s, false).unwrap()[0];
        let grammar = table.compile(&Spec::json_object()).unwrap();
        let mut c = grammar.start();
        let started = std::time::Instant::now();
        let mask = c.mask().unwrap();
        let structural = started.elapsed();
        assert!(
            mask.is_allowed(id("{")) && !mask.is_allowed(id("hello")) && !mask.is_allowed(id("["))
        );
        assert!(
            !tokenizer.eos_ids.iter().any(|&e| mask.is_allowed(e)),
            "EOS before the object is complete"
        );
        assert!(feed(&tokenizer, &mut c, "{\"na"));
        let started = std::time::Instant::now();
        let mask = c.mask().unwrap();
        let in_string = started.elapsed();
        let count = allowed(&mask, vocab).len();
        assert!(
            count > vocab / 2,
            "most tokens fit inside a string ({count})"
        );
        assert!(feed(&tokenizer, &mut c, "me\": 1}"));
        assert!(c.is_accepting());
        let mut eos: Vec<usize> = tokenizer.eos_ids.iter().map(|&e| e as usize).collect();
        eos.sort();
        assert_eq!(
            allowed(&c.mask().unwrap(), vocab),
            eos,
            "only EOS after the object"
        );
        eprintln!("table {built:?}, structural mask {structural:?}, in-string mask {in_string:?}");
        assert!(structural.as_millis() < 200 && in_string.as_millis() < 200);
    }

    #[test]
    fn schemas_constrain_patterns_lengths_ranges_and_refs() {
        let Some(tokenizer) = smollm() else { return };
        let table = TokenTable::new(&tokenizer, tokenizer.vocab_size());
        let schema = json!({
            "$defs": {"node": {"type": "object", "properties": {
                "v": {"type": "integer", "minimum": 1, "maximum": 9},
                "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                "required": ["v", "kids"], "additionalProperties": false}},
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                "tag": {"type": "string", "minLength": 2, "maxLength": 3},
                "kind": {"enum": ["a", "b"]},
                "tree": {"$ref": "#/$defs/node"}},
            "required": ["code", "tag", "kind", "tree"],
            "additionalProperties": false
        });
        let grammar = table.compile(&Spec::JsonSchema(schema)).unwrap();
        let ok = "{\"code\": \"ABC-12\", \"tag\": \"xy\", \"kind\": \"b\", \"tree\": {\"v\": 3, \"kids\": [{\"v\": 1, \"kids\": []}]}}";
        let mut c = grammar.start();
        assert!(feed(&tokenizer, &mut c, ok) && c.is_accepting());
        for bad in [
            "{\"code\": \"AB-12\"",
            "{\"code\": \"ABC-12\", \"tag\": \"wxyz\"",
            "{\"code\": \"ABC-12\", \"tag\": \"x\"}",
            "{\"code\": \"ABC-12\", \"tag\": \"xy\", \"kind\": \"c\"",
            "{\"code\": \"ABC-12\", \"tag\": \"xy\", \"kind\": \"a\", \"tree\": {\"v\": 10",
            "{\"code\": \"ABC-12\", \"tag\": \"xy\", \"kind\": \"a\", \"extra\"",
            "{\"code\":\"ABC-12\"",
        ] {
            let mut c = grammar.start();
            assert!(!feed(&tokenizer, &mut c, bad), "accepted {bad}");
        }
    }

    #[test]
    fn lark_tool_calls_embed_json_schemas() {
        let Some(tokenizer) = smollm() else { return };
        let table = TokenTable::new(&tokenizer, tokenizer.vocab_size());
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
        let lark = format!(
            "start: {} args\n args: %json {}\n",
            serde_json::to_string("<tool_call>\n").unwrap(),
            with_layout(&schema)
        );
        let grammar = table.compile(&Spec::Lark(lark)).unwrap();
        let mut c = grammar.start();
        assert!(feed(&tokenizer, &mut c, "<tool_call>\n{\"city\": \"Paris\"}") && c.is_accepting());
        let mut c = grammar.start();
        assert!(!feed(&tokenizer, &mut c, "Sure"));
    }

    #[test]
    fn unusable_schemas_are_errors_not_panics() {
        let Some(tokenizer) = smollm() else { return };
        let table = TokenTable::new(&tokenizer, tokenizer.vocab_size());
        for bad in [
            json!({"type": "tuple"}),
            json!({"$ref": "#"}),
            json!({"$ref": "#/$defs/missing"}),
            json!({"enum": []}),
            json!({"type": "string", "pattern": "(unclosed"}),
            json!({"type": "integer", "minimum": 5, "maximum": 1}),
        ] {
            assert!(
                table.compile(&Spec::JsonSchema(bad.clone())).is_err(),
                "{bad}"
            );
        }
        assert!(table.compile(&Spec::Lark("start: nope".into())).is_err());
    }
}
