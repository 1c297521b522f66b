//! Text <-> token ids, built either from a GGUF file's embedded vocabulary or from a Hugging Face
//! `tokenizer.json`, plus an incremental detokenizer for streaming.
//!
//! GGUF files carry the vocabulary, merges and token types but not the pre-tokenizer itself, only
//! its name (`tokenizer.ggml.pre`); [`TextTokenizer::from_gguf_metadata`] rebuilds the pipeline
//! that the named Hugging Face tokenizer uses, so ids match what the model was trained on.
//!
//! Encoding never adds BOS/EOS itself: chat templates render them as text, and raw prompts get a
//! BOS from the caller when [`TextTokenizer::add_bos`] says the model expects one.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's split regex (`tokenizer.ggml.pre = qwen2`): digits one at a time, letters with one
/// leading non-letter, punctuation runs with their trailing newlines.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama 3's split regex (`tokenizer.ggml.pre = llama-bpe`): like Qwen2 but digits in groups of
/// up to three.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens that end an assistant turn in common chat formats. Generation stops on any of
/// them that the vocabulary has as a special token, besides the declared EOS: a chat model's
/// declared EOS is often the end-of-document token, not the end-of-turn one, or vice versa.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
];

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer with the facts generation needs: which ids begin and end a text, which are
/// special, and the raw bytes behind every id.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer with special tokens treated as plain text (`parse_special = false`);
    /// built on first use, since most callers never need it.
    literal: OnceLock<Tokenizer>,
    pub bos_id: Option<u32>,
    /// Ids that end generation: the EOS first, then other end-of-turn tokens.
    pub eos_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Whether raw (non-chat) prompts should start with `bos_id`.
    pub add_bos: bool,
    /// UTF-8 bytes each id stands for (empty for ids the vocabulary skips).
    bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    known: Vec<bool>,
}

impl std::fmt::Debug for TextTokenizer {
    // The wrapped tokenizer would print the whole vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// The pieces both constructors gather before [`TextTokenizer::assemble`].
struct Declared {
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    extra_eos: Vec<u32>,
    pad_id: Option<u32>,
    add_bos: Option<bool>,
}

impl TextTokenizer {
    /// Builds the tokenizer embedded in a GGUF file (byte-level BPE, `tokenizer.ggml.model =
    /// gpt2`). The pre-tokenizer follows `tokenizer.ggml.pre`: `smollm`/`starcoder`/`refact`
    /// (digits split, then the GPT-2 regex), `qwen2`, `llama-bpe`, and `gpt2`/`default`
    /// (GPT-2 regex); other names fall back to the GPT-2 regex with a warning.
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let model = gguf_str(metadata, "tokenizer.ggml.model")?
            .context("the GGUF file has no tokenizer (`tokenizer.ggml.model` is missing)")?;
        if model != "gpt2" {
            bail!(
                "unsupported tokenizer model `{model}` (tokenizer.ggml.model): rewind supports byte-level BPE \
                 (`gpt2`, used by SmolLM, Qwen2, Llama 3); SentencePiece (`llama`) and others are not implemented"
            );
        }
        let tokens = gguf_strings(metadata, "tokenizer.ggml.tokens")?
            .context("missing `tokenizer.ggml.tokens`")?;
        let merges = gguf_strings(metadata, "tokenizer.ggml.merges")?
            .context("missing `tokenizer.ggml.merges`")?;
        let types = gguf_ints(metadata, "tokenizer.ggml.token_type")?;
        if let Some(types) = &types {
            if types.len() != tokens.len() {
                bail!(
                    "`tokenizer.ggml.token_type` has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                );
            }
        }
        let pre = gguf_str(metadata, "tokenizer.ggml.pre")?.unwrap_or("default");

        let mut vocab = Vocab::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            // Keep the first id of a duplicated string, so `id_of` is stable.
            vocab.entry(token.to_string()).or_insert(id as u32);
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| {
                        format!("malformed merge `{m}` (expected two tokens separated by a space)")
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama 3 looks whole pre-tokens up in the vocabulary before merging.
            .ignore_merges(pre == "llama-bpe")
            .build()
            .map_err(|e| anyhow!("building the BPE model: {e}"))?;

        let mut inner = Tokenizer::new(bpe);
        let byte_level = |regex: bool| {
            ByteLevel::default()
                .add_prefix_space(false)
                .use_regex(regex)
        };
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(pattern.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("compiling the `{pre}` split regex: {e}"))?;
            Ok(split.into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" | "starcoder" | "refact" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
            }
            "qwen2" => {
                inner
                    .with_normalizer(Some(NFC))
                    .map_err(|e| anyhow!("setting the NFC normalizer: {e}"))?;
                Sequence::new(vec![
                    split(QWEN2_SPLIT)?,
                    byte_level(false).trim_offsets(false).into(),
                ])
                .into()
            }
            "llama-bpe" => {
                Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false).into()]).into()
            }
            "gpt2" | "default" => byte_level(true).into(),
            other => {
                tracing::warn!("unknown tokenizer.ggml.pre `{other}`: splitting with the GPT-2 regex, ids may differ from the original tokenizer");
                byte_level(true).into()
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));

        // Control tokens are special (skipped by `decode(.., true)`, matched in text only when
        // parsing specials); user-defined ones are ordinary added tokens that are always matched
        // whole, e.g. Qwen's `<tool_call>`. Both keep their vocabulary ids.
        if let Some(types) = &types {
            let added = |kind: i64| {
                tokens
                    .iter()
                    .zip(types)
                    .filter(move |(_, t)| **t == kind)
                    .map(move |(tok, _)| {
                        AddedToken::from(tok.to_string(), kind == TOKEN_TYPE_CONTROL)
                            .normalized(false)
                    })
            };
            inner
                .add_special_tokens(added(TOKEN_TYPE_CONTROL))
                .map_err(|e| anyhow!("adding control tokens: {e}"))?;
            inner
                .add_tokens(added(TOKEN_TYPE_USER_DEFINED))
                .map_err(|e| anyhow!("adding user-defined tokens: {e}"))?;
        }

        let id = |key: &str| -> Result<Option<u32>> {
            Ok(gguf_int(metadata, key)?
                .filter(|&v| v >= 0 && (v as usize) < tokens.len())
                .map(|v| v as u32))
        };
        let declared = Declared {
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            extra_eos: [
                id("tokenizer.ggml.eot_token_id")?,
                id("tokenizer.ggml.eom_token_id")?,
            ]
            .into_iter()
            .flatten()
            .collect(),
            pad_id: id("tokenizer.ggml.padding_token_id")?,
            add_bos: match metadata.get("tokenizer.ggml.add_bos_token") {
                Some(v) => Some(
                    v.to_bool()
                        .map_err(|e| anyhow!("`tokenizer.ggml.add_bos_token`: {e}"))?,
                ),
                None => None,
            },
        };
        Self::assemble(inner, declared)
    }

    /// Loads `tokenizer.json` from a Hugging Face (or rewind) model directory, with BOS/EOS from
    /// `tokenizer_config.json` and extra EOS ids from `generation_config.json` when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "{}: no tokenizer.json (rewind needs the fast-tokenizer file)",
                dir.display()
            );
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let generation =
            read_json_if_present(&dir.join("generation_config.json"))?.unwrap_or_default();

        let named =
            |key: &str| special_token_name(&config[key]).and_then(|name| inner.token_to_id(&name));
        let ids = |key: &str| -> Vec<u32> {
            match &generation[key] {
                serde_json::Value::Number(n) => n.as_u64().map(|v| v as u32).into_iter().collect(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                _ => Vec::new(),
            }
        };
        let generation_eos = ids("eos_token_id");
        let declared = Declared {
            bos_id: named("bos_token").or_else(|| ids("bos_token_id").first().copied()),
            eos_id: named("eos_token").or_else(|| generation_eos.first().copied()),
            extra_eos: generation_eos,
            pad_id: named("pad_token").or_else(|| ids("pad_token_id").first().copied()),
            add_bos: config["add_bos_token"].as_bool(),
        };
        Self::assemble(inner, declared).with_context(|| format!("{}", path.display()))
    }

    /// Precomputes the per-id tables and the end-of-turn set.
    fn assemble(inner: Tokenizer, declared: Declared) -> Result<Self> {
        let vocab = inner.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if size == 0 {
            bail!("the tokenizer has an empty vocabulary");
        }
        let byte_level = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        let mut bytes = vec![Vec::new(); size];
        let mut known = vec![false; size];
        for id in 0..size as u32 {
            if let Some(token) = inner.id_to_token(id) {
                bytes[id as usize] = if byte_level {
                    byte_level_bytes(&token)
                } else {
                    piece_bytes(&token)
                };
                known[id as usize] = true;
            }
        }
        let mut special = vec![false; size];
        for (id, token) in inner.get_added_tokens_decoder() {
            if token.special && (id as usize) < size {
                special[id as usize] = true;
            }
        }

        let mut eos_ids: Vec<u32> = declared
            .eos_id
            .into_iter()
            .chain(declared.extra_eos)
            .collect();
        for name in END_OF_TURN {
            if let Some(id) = inner.token_to_id(name).filter(|&id| special[id as usize]) {
                eos_ids.push(id);
            }
        }
        let mut seen = std::collections::HashSet::new();
        eos_ids.retain(|id| seen.insert(*id));

        let name = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id));
        let add_bos = match declared.add_bos {
            Some(v) => v,
            // Tokenizers that prepend BOS in their post-processor (Llama 3) say so only there.
            None => match declared.bos_id {
                Some(bos) => {
                    let probe = inner
                        .encode_fast("", true)
                        .map_err(|e| anyhow!("probing the post-processor: {e}"))?;
                    probe.get_ids().first() == Some(&bos)
                }
                None => false,
            },
        };
        Ok(Self {
            bos_token: name(declared.bos_id),
            eos_token: name(eos_ids.first().copied()),
            bos_id: declared.bos_id,
            eos_ids,
            pad_id: declared.pad_id,
            add_bos,
            literal: OnceLock::new(),
            inner,
            bytes,
            special,
            known,
        })
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids for `text`, without BOS/EOS. With `parse_special`, special tokens written as
    /// text (as a chat template renders them) become their ids; without it they are tokenized
    /// like any other text, so user content cannot inject them.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tokenizer = if parse_special {
            &self.inner
        } else {
            self.literal()
        };
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids with the byte range of `text` each one covers, for masking spans (such as
    /// assistant turns) in training data. The ranges tile `text` exactly when the tokenizer does
    /// not normalize it; otherwise they come from the tokenizer's own offsets.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        parse_special: bool,
    ) -> Result<(Vec<u32>, Vec<Range<usize>>)> {
        let tokenizer = if parse_special {
            &self.inner
        } else {
            self.literal()
        };
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        let ids = encoding.get_ids().to_vec();
        // Byte-level BPE round-trips bytes exactly, so the token byte lengths give offsets that
        // include leading spaces (which the tokenizer's own offsets may trim).
        let mut ranges = Vec::with_capacity(ids.len());
        let mut at = 0;
        let mut exact = true;
        for &id in &ids {
            let b = self
                .bytes
                .get(id as usize)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if text.as_bytes().get(at..at + b.len()) != Some(b) {
                exact = false;
                break;
            }
            ranges.push(at..at + b.len());
            at += b.len();
        }
        if !exact || at != text.len() {
            ranges = encoding.get_offsets().iter().map(|&(s, e)| s..e).collect();
        }
        Ok((ids, ranges))
    }

    fn literal(&self) -> &Tokenizer {
        self.literal.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        })
    }

    /// Text for `ids`; with `skip_special`, special tokens (BOS, EOS, chat markers) are dropped.
    /// Bytes that do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("detokenizing: {e}"))
    }

    /// The text of one token (partial UTF-8 characters shown as U+FFFD); `None` for ids outside
    /// the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<String> {
        let i = id as usize;
        self.known
            .get(i)
            .copied()
            .unwrap_or(false)
            .then(|| String::from_utf8_lossy(&self.bytes[i]).into_owned())
    }

    /// The raw bytes a token stands for (OpenAI logprobs `bytes`): a byte-level BPE token may be
    /// part of a UTF-8 character. Empty for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.bytes.get(id as usize).cloned().unwrap_or_default()
    }

    fn bytes_of(&self, id: u32) -> &[u8] {
        self.bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Whether `id` is a special (control) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// One more than the largest token id. The model's output layer may be larger (padded);
    /// ids past this have no text.
    pub fn vocab_size(&self) -> usize {
        self.bytes.len()
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json`, and merges into `tokenizer_config.json` (bos/eos/pad token
    /// names, `add_bos_token`) and `generation_config.json` (bos/eos/pad ids) so that
    /// [`TextTokenizer::from_hf_dir`] and Hugging Face tools reload the same tokenizer. Existing
    /// keys in those two files are kept; the chat template is the `ChatTemplate`'s to write.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, true)
            .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;

        let name = |id: Option<u32>| match id.and_then(|id| self.inner.id_to_token(id)) {
            Some(name) => serde_json::Value::String(name),
            None => serde_json::Value::Null,
        };
        let config_path = dir.join("tokenizer_config.json");
        let mut config =
            read_json_if_present(&config_path)?.unwrap_or_else(|| serde_json::json!({}));
        let obj = config
            .as_object_mut()
            .with_context(|| format!("{} is not a JSON object", config_path.display()))?;
        obj.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
        obj.insert("bos_token".into(), name(self.bos_id));
        obj.insert("eos_token".into(), name(self.eos_ids.first().copied()));
        obj.insert("pad_token".into(), name(self.pad_id));
        obj.insert("add_bos_token".into(), self.add_bos.into());
        obj.insert("add_eos_token".into(), false.into());
        obj.insert("clean_up_tokenization_spaces".into(), false.into());
        write_json(&config_path, &config)?;

        let generation_path = dir.join("generation_config.json");
        let mut generation =
            read_json_if_present(&generation_path)?.unwrap_or_else(|| serde_json::json!({}));
        let obj = generation
            .as_object_mut()
            .with_context(|| format!("{} is not a JSON object", generation_path.display()))?;
        let id = |id: Option<u32>| id.map_or(serde_json::Value::Null, |v| v.into());
        obj.insert("bos_token_id".into(), id(self.bos_id));
        obj.insert(
            "eos_token_id".into(),
            match self.eos_ids.as_slice() {
                [one] => (*one).into(),
                many => many.to_vec().into(),
            },
        );
        obj.insert("pad_token_id".into(), id(self.pad_id));
        write_json(&generation_path, &generation)
    }
}

/// Turns streamed token ids into text without ever splitting a UTF-8 character: byte-level BPE
/// tokens can end in the middle of one, so incomplete trailing bytes wait for the next token.
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    skip_special: bool,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    /// Special tokens produce no text, as OpenAI-compatible servers stream by default.
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            skip_special: true,
        }
    }

    /// A decoder that also streams special tokens' text (e.g. to show `<|im_start|>`).
    pub fn keeping_special() -> Self {
        Self {
            pending: Vec::new(),
            skip_special: false,
        }
    }

    /// Adds a token; returns the text completed by it (possibly empty). Ids outside the
    /// vocabulary have no text and produce nothing.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<String> {
        if self.skip_special && tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(tokenizer.bytes_of(id));
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return Ok(out);
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for its remaining bytes.
                        None => {
                            self.pending.drain(..valid);
                            return Ok(out);
                        }
                        // Bytes that can never become valid: replace them as a full decode would.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: any incomplete character left becomes U+FFFD.
    pub fn flush(&mut self, _tokenizer: &TextTokenizer) -> Result<String> {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok(text)
    }
}

/// GPT-2's byte-to-character table, inverted: printable Latin-1 bytes stand for themselves, the
/// other bytes were shifted to U+0100 and up so that every token is printable text.
fn gpt2_char_to_byte(c: char) -> Option<u8> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let code = c as u32;
    if printable(code) {
        return Some(code as u8);
    }
    // The n-th non-printable byte (in byte order) maps to U+0100 + n.
    let n = code.checked_sub(0x100)?;
    (0u32..=255)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// Bytes of a byte-level BPE token, as the ByteLevel decoder computes them: a token with any
/// character outside the byte alphabet (an added token such as `<tool call>`) is its own UTF-8.
fn byte_level_bytes(token: &str) -> Vec<u8> {
    token
        .chars()
        .map(gpt2_char_to_byte)
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
}

/// Bytes of a token from a non-byte-level (SentencePiece-style) vocabulary: `<0xAB>` byte
/// fallback tokens are one byte, `▁` is a space.
fn piece_bytes(token: &str) -> Vec<u8> {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if hex.len() == 2 {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

/// A special token's name from `tokenizer_config.json`: a string or an `AddedToken` object.
fn special_token_name(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(value))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn gguf_str<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(v) => Ok(Some(
            v.to_string().map_err(|e| anyhow!("`{key}`: {e}"))?.as_str(),
        )),
    }
}

fn int_of(value: &Value) -> Option<i64> {
    // Writers differ in the integer width they use.
    match *value {
        Value::U8(v) => Some(v as i64),
        Value::I8(v) => Some(v as i64),
        Value::U16(v) => Some(v as i64),
        Value::I16(v) => Some(v as i64),
        Value::U32(v) => Some(v as i64),
        Value::I32(v) => Some(v as i64),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

fn gguf_int(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<i64>> {
    match metadata.get(key) {
        None => Ok(None),
        Some(v) => int_of(v)
            .map(Some)
            .with_context(|| format!("`{key}` is not an integer")),
    }
}

fn gguf_strings<'a>(
    metadata: &'a HashMap<String, Value>,
    key: &str,
) -> Result<Option<Vec<&'a str>>> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let items = value.to_vec().map_err(|e| anyhow!("`{key}`: {e}"))?;
    let strings = items
        .iter()
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|e| anyhow!("`{key}`: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(strings))
}

fn gguf_ints(metadata: &HashMap<String, Value>, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let items = value.to_vec().map_err(|e| anyhow!("`{key}`: {e}"))?;
    let ints = items
        .iter()
        .map(|v| int_of(v).with_context(|| format!("`{key}` holds a non-integer")))
        .collect::<Result<_>>()?;
    Ok(Some(ints))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    fn model_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// SmolLM2's tokenizer, read once for all tests; `None` (with a note) if the model is absent.
    fn smollm() -> Option<&'static TextTokenizer> {
        static TOKENIZER: OnceLock<Option<TextTokenizer>> = OnceLock::new();
        TOKENIZER
            .get_or_init(|| {
                let path = model_path();
                if !path.exists() {
                    eprintln!("skipping: {} is absent", path.display());
                    return None;
                }
                let mut file = std::fs::File::open(&path).expect("open gguf");
                let content =
                    candle_core::quantized::gguf_file::Content::read(&mut file).expect("read gguf");
                Some(TextTokenizer::from_gguf_metadata(&content.metadata).expect("build tokenizer"))
            })
            .as_ref()
    }

    const ROUND_TRIP: &[&str] = &[
        "Hello, world!",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n",
        "Café naïve résumé, Ångström",
        "你好，世界！日本語のテキスト",
        "Emoji: 😀👍🏽🇺🇸 and ❤️",
        "Numbers 12345 and 3.14159",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}",
        "<|im_start|>user\nHi<|im_end|>",
    ];

    #[test]
    fn gpt2_byte_table_is_a_bijection() {
        // 'Ġ' (U+0120) is the space byte, 'Ċ' (U+010A) the newline, '!' itself.
        assert_eq!(gpt2_char_to_byte('Ġ'), Some(b' '));
        assert_eq!(gpt2_char_to_byte('Ċ'), Some(b'\n'));
        assert_eq!(gpt2_char_to_byte('!'), Some(b'!'));
        assert_eq!(gpt2_char_to_byte(' '), None);
        let mut seen = [false; 256];
        for code in 0x21..0x200u32 {
            if let Some(b) = char::from_u32(code).and_then(gpt2_char_to_byte) {
                assert!(!seen[b as usize], "byte {b} mapped twice");
                seen[b as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(byte_level_bytes("ĠParis"), b" Paris");
        // Added tokens with characters outside the alphabet are their own UTF-8.
        assert_eq!(byte_level_bytes("<tool call>"), b"<tool call>");
        assert_eq!(piece_bytes("<0xE2>"), [0xe2]);
        assert_eq!(piece_bytes("\u{2581}Hi"), b" Hi");
    }

    #[test]
    fn smollm_metadata() {
        let Some(t) = smollm() else { return };
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(t.bos_id, Some(1));
        assert_eq!(t.bos_token.as_deref(), Some("<|im_start|>"));
        assert_eq!(t.eos_token.as_deref(), Some("<|im_end|>"));
        // The declared EOS first, then <|endoftext|> (id 0) as another end-of-turn token.
        assert_eq!(t.eos_ids, [2, 0]);
        assert_eq!(t.pad_id, Some(2));
        assert!(!t.add_bos);
        assert!(t.is_special(1) && t.is_special(16) && !t.is_special(17));
        assert_eq!(t.id_of("user"), Some(4093));
    }

    #[test]
    fn smollm_encodes_chat_markers_and_digits() {
        let Some(t) = smollm() else { return };
        assert_eq!(
            t.encode("<|im_start|>user\n", true).unwrap(),
            [1, 4093, 198]
        );
        // Without parse_special the marker is ordinary text, never id 1.
        let literal = t.encode("<|im_start|>user\n", false).unwrap();
        assert!(literal.len() > 3 && !literal.contains(&1), "{literal:?}");
        assert_eq!(t.decode(&literal, false).unwrap(), "<|im_start|>user\n");
        // Digits one at a time: '0' is id 32 ('!' is 17 and ASCII follows in order).
        assert_eq!(t.encode("12345", true).unwrap(), [33, 34, 35, 36, 37]);
    }

    #[test]
    fn smollm_round_trips() {
        let Some(t) = smollm() else { return };
        for text in ROUND_TRIP {
            let ids = t.encode(text, true).unwrap();
            assert_eq!(&t.decode(&ids, false).unwrap(), text);
            // Token bytes concatenate to the text, including tokens that split a character.
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| t.token_bytes(id)).collect();
            assert_eq!(bytes, text.as_bytes());
        }
        let ids = t.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
        assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi");
    }

    #[test]
    fn smollm_token_text_and_bytes() {
        let Some(t) = smollm() else { return };
        assert_eq!(t.token_text(4093).as_deref(), Some("user"));
        assert_eq!(t.token_bytes(198), b"\n");
        assert_eq!(t.token_text(1).as_deref(), Some("<|im_start|>"));
        assert_eq!(t.token_text(49152), None);
        assert!(t.token_bytes(u32::MAX).is_empty());
        // A character split over tokens: the pieces are not valid UTF-8 on their own.
        let ids = t.encode("😀", true).unwrap();
        let pieces: Vec<Vec<u8>> = ids.iter().map(|&id| t.token_bytes(id)).collect();
        assert_eq!(pieces.concat(), "😀".as_bytes());
        if ids.len() > 1 {
            assert!(std::str::from_utf8(&pieces[0]).is_err());
        }
    }

    #[test]
    fn smollm_offsets_tile_the_text() {
        let Some(t) = smollm() else { return };
        let text = "<|im_start|>assistant\n The capital is Paris.<|im_end|>";
        let (ids, ranges) = t.encode_with_offsets(text, true).unwrap();
        assert_eq!(ids, t.encode(text, true).unwrap());
        assert_eq!(ranges.first().map(|r| r.start), Some(0));
        assert_eq!(ranges.last().map(|r| r.end), Some(text.len()));
        for (pair, &id) in ranges.windows(2).zip(&ids) {
            assert_eq!(pair[0].end, pair[1].start);
            assert_eq!(text.as_bytes()[pair[0].clone()], t.token_bytes(id)[..]);
        }
    }

    #[test]
    fn stream_decoder_never_splits_characters() {
        let Some(t) = smollm() else { return };
        for text in ROUND_TRIP {
            let ids = t.encode(text, false).unwrap();
            let mut d = StreamDecoder::keeping_special();
            let mut out = String::new();
            for &id in &ids {
                let piece = d.push(t, id).unwrap();
                assert!(
                    !piece.contains(char::REPLACEMENT_CHARACTER),
                    "{text:?}: {piece:?}"
                );
                out.push_str(&piece);
            }
            out.push_str(&d.flush(t).unwrap());
            assert_eq!(&out, text);
        }
    }

    #[test]
    fn stream_decoder_skips_specials_and_flushes_broken_bytes() {
        let Some(t) = smollm() else { return };
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(t, 1).unwrap(), "");
        assert_eq!(d.push(t, 4093).unwrap(), "user");
        // The first byte of a 4-byte emoji alone waits; flushing it yields U+FFFD.
        let ids = t.encode("😀", true).unwrap();
        if ids.len() > 1 {
            assert_eq!(d.push(t, ids[0]).unwrap(), "");
            assert_eq!(d.flush(t).unwrap(), "\u{FFFD}");
        }
        // An unknown id produces nothing.
        assert_eq!(d.push(t, 1_000_000).unwrap(), "");
    }

    #[test]
    fn smollm_save_and_reload() {
        let Some(t) = smollm() else { return };
        let dir = tempfile::tempdir().unwrap();
        t.save_hf(dir.path()).unwrap();
        let back = TextTokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(back.vocab_size(), t.vocab_size());
        assert_eq!(
            (back.bos_id, &back.eos_ids, back.pad_id, back.add_bos),
            (t.bos_id, &t.eos_ids, t.pad_id, t.add_bos)
        );
        assert_eq!(
            (&back.bos_token, &back.eos_token),
            (&t.bos_token, &t.eos_token)
        );
        for text in ROUND_TRIP {
            for parse_special in [true, false] {
                assert_eq!(
                    back.encode(text, parse_special).unwrap(),
                    t.encode(text, parse_special).unwrap(),
                    "{text:?}"
                );
            }
        }
        assert!((0..17).all(|id| back.is_special(id)) && !back.is_special(17));
        assert_eq!(back.token_bytes(216), t.token_bytes(216));
    }

    /// Reference ids produced by the Hugging Face tokenizer, when that fixture is present.
    #[test]
    fn smollm_matches_reference_fixture() {
        let Some(t) = smollm() else { return };
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_reference.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("skipping: {} is absent", path.display());
            return;
        };
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = value
            .as_array()
            .or_else(|| value.get("cases").and_then(|c| c.as_array()))
            .expect("fixture: an array of cases or {\"cases\": [...]}");
        assert!(!cases.is_empty());
        for case in cases {
            let input = case["text"].as_str().expect("case.text");
            let want: Vec<u32> = case["ids"]
                .as_array()
                .expect("case.ids")
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let parse_special = case
                .get("parse_special")
                .and_then(|v| v.as_bool())
                .unwrap_or(true);
            assert_eq!(t.encode(input, parse_special).unwrap(), want, "{input:?}");
            if let Some(decoded) = case.get("decoded").and_then(|v| v.as_str()) {
                assert_eq!(t.decode(&want, false).unwrap(), decoded, "{input:?}");
            }
            if let Some(decoded) = case.get("decoded_skip_special").and_then(|v| v.as_str()) {
                assert_eq!(t.decode(&want, true).unwrap(), decoded, "{input:?}");
            }
        }
    }

    #[test]
    fn unsupported_models_are_named() {
        let mut metadata = HashMap::new();
        metadata.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        );
        let err = TextTokenizer::from_gguf_metadata(&metadata)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported tokenizer model `llama`"), "{err}");
        let err = TextTokenizer::from_gguf_metadata(&HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no tokenizer"), "{err}");
    }

    /// A toy byte-level vocabulary in GGUF form, to test the pre-tokenizer choices without a model.
    fn toy(pre: &str) -> TextTokenizer {
        let alphabet: Vec<String> = (0u32..0x200)
            .filter_map(char::from_u32)
            .filter(|&c| gpt2_char_to_byte(c).is_some())
            .map(String::from)
            .collect();
        let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_end|>".to_string()];
        tokens.extend(alphabet);
        for merged in ["12", "123", "ab", "Ġa"] {
            tokens.push(merged.to_string());
        }
        // "Ġ a" outranks "a b", so " ab" becomes " a" + "b".
        let merges = ["1 2", "12 3", "Ġ a", "a b"];
        let mut types = vec![TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        types.resize(tokens.len(), 1);
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let mut md = HashMap::new();
        md.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        );
        md.insert("tokenizer.ggml.pre".to_string(), Value::String(pre.into()));
        md.insert("tokenizer.ggml.tokens".to_string(), strings(tokens));
        md.insert(
            "tokenizer.ggml.merges".to_string(),
            strings(merges.iter().map(|s| s.to_string()).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(types.into_iter().map(|t| Value::I32(t as i32)).collect()),
        );
        md.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(0));
        TextTokenizer::from_gguf_metadata(&md).unwrap()
    }

    #[test]
    fn pre_tokenizer_follows_the_gguf_name() {
        let pieces = |t: &TextTokenizer, s: &str| -> Vec<String> {
            t.encode(s, true)
                .unwrap()
                .iter()
                .map(|&id| t.token_text(id).unwrap())
                .collect()
        };
        // gpt2: digits stay together, so "123" merges; "ab" after a space becomes " a" + "b".
        let gpt2 = toy("gpt2");
        assert_eq!(pieces(&gpt2, "123 ab"), ["123", " a", "b"]);
        // smollm: digits split first, so no digit merge applies.
        assert_eq!(pieces(&toy("smollm"), "123 ab"), ["1", "2", "3", " a", "b"]);
        // qwen2: one digit per piece too; llama-bpe: groups of up to three digits.
        assert_eq!(pieces(&toy("qwen2"), "1234"), ["1", "2", "3", "4"]);
        assert_eq!(pieces(&toy("llama-bpe"), "1234"), ["123", "4"]);
        // An unknown name falls back to the GPT-2 regex.
        assert_eq!(pieces(&toy("something-new"), "123 ab"), ["123", " a", "b"]);
        // End-of-turn tokens beyond the declared EOS are found by name.
        assert_eq!(gpt2.eos_ids, [0, 1]);
    }
}
