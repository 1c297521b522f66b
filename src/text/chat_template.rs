//! Chat templates: the model's own Jinja template (from GGUF metadata or `tokenizer_config.json`)
//! rendered with minijinja, configured the way Hugging Face `apply_chat_template` configures
//! Jinja2 (trim_blocks, lstrip_blocks, Python string methods, `raise_exception`,
//! `strftime_now`, a `tojson` that writes like Python's `json.dumps`).
//!
//! [`ChatTemplate::render_with_assistant_spans`] also locates each assistant turn in the
//! rendering, so training puts its loss on exactly the text inference would have generated.

use crate::text::tokenizer::TextTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// The name the template is registered under inside its environment.
const TEMPLATE: &str = "chat";

/// ChatML, for models that ship no template.
const CHATML: &str = "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

/// Markers that close an assistant turn in common templates, besides the tokenizer's EOS.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
];

/// One chat message, in the shape OpenAI requests and HF templates both use. Optional fields
/// that are absent are left out of the template context entirely, since templates test them
/// with `is defined` / `in message`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// `null` (an assistant message with only tool calls) reads as empty; an array of content
    /// parts reads as the concatenation of its text parts.
    #[serde(default, deserialize_with = "deserialize_content")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

fn deserialize_content<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<String, D::Error> {
    let value = serde_json::Value::deserialize(deserializer)?;
    content_text(Some(&value), true)
        .map_err(|e| serde::de::Error::custom(format!("message content: {e}")))
}

/// Message content as text: a string, or an array of text (or refusal) parts concatenated;
/// `null` or missing reads as empty where `may_be_empty` (an assistant message with only tool
/// calls). Other parts (images, audio, files) are refused: the models read text only.
pub fn content_text(
    content: Option<&serde_json::Value>,
    may_be_empty: bool,
) -> Result<String, String> {
    match content {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        None | Some(serde_json::Value::Null) if may_be_empty => Ok(String::new()),
        Some(serde_json::Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("type").and_then(serde_json::Value::as_str) {
                    Some("text") | Some("refusal") => {
                        let t = part
                            .get("text")
                            .or_else(|| part.get("refusal"))
                            .and_then(serde_json::Value::as_str);
                        text.push_str(t.ok_or("a text part needs a string `text`")?);
                    }
                    Some(other) => {
                        return Err(format!(
                            "content parts of type `{other}` are not supported: the model reads text only"
                        ))
                    }
                    None => return Err("each content part needs a `type`".into()),
                }
            }
            Ok(text)
        }
        _ => Err("expected a string or an array of text parts".into()),
    }
}

/// A compiled chat template with the special-token strings it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    /// Where the template came from, for error messages.
    name: String,
    bos_token: String,
    eos_token: String,
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `name` says where it came from in error messages. Syntax errors are
    /// reported here, not at the first request.
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let (name, source) = (name.into(), source.into());
        let mut env = Environment::new();
        // HF renders with Jinja2(trim_blocks=True, lstrip_blocks=True); templates are written
        // for exactly that whitespace handling.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow::anyhow!("configuring the template syntax: {e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE, source.clone())
            .map_err(|e| {
                anyhow::anyhow!("chat template `{name}` does not compile: {}", describe(&e))
            })?;
        Ok(Self {
            source,
            name,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            env: Arc::new(env),
        })
    }

    /// Plain ChatML (`<|im_start|>role\n...<|im_end|>\n`), for models without a template.
    pub fn chatml_default() -> Result<Self> {
        Self::new("built-in ChatML", CHATML, "", "<|im_end|>")
    }

    /// The template in `tokenizer.chat_template`, or ChatML (with a warning) if there is none.
    pub fn from_gguf_metadata(
        metadata: &HashMap<String, gguf_file::Value>,
        tokenizer: &TextTokenizer,
    ) -> Result<Self> {
        let (bos, eos) = special_strings(tokenizer);
        match metadata.get("tokenizer.chat_template") {
            Some(value) => {
                let source = value
                    .to_string()
                    .map_err(|e| anyhow::anyhow!("`tokenizer.chat_template`: {e}"))?;
                Self::new("GGUF tokenizer.chat_template", source.as_str(), bos, eos)
            }
            None => {
                tracing::warn!("the GGUF file has no chat template: using ChatML");
                Ok(Self {
                    bos_token: bos,
                    eos_token: eos,
                    ..Self::chatml_default()?
                })
            }
        }
    }

    /// The template of a Hugging Face model directory: `chat_template.jinja`, else the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of
    /// which `default` is used), else ChatML with a warning.
    pub fn from_hf_dir(dir: &Path, tokenizer: &TextTokenizer) -> Result<Self> {
        let (bos, eos) = special_strings(tokenizer);
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?;
            return Self::new(jinja.display().to_string(), source, bos, eos);
        }
        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            let config: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?;
            let source = match &config["chat_template"] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(named) => {
                    let template = |t: &serde_json::Value| {
                        t.get("template")
                            .and_then(|s| s.as_str())
                            .map(str::to_string)
                    };
                    named
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| named.first())
                        .and_then(template)
                }
                _ => None,
            };
            if let Some(source) = source {
                return Self::new(
                    format!("{} chat_template", config_path.display()),
                    source,
                    bos,
                    eos,
                );
            }
        }
        tracing::warn!("{}: no chat template: using ChatML", dir.display());
        Ok(Self {
            bos_token: bos,
            eos_token: eos,
            ..Self::chatml_default()?
        })
    }

    /// Writes `chat_template.jinja` and sets `chat_template` in `tokenizer_config.json`
    /// (creating it, or keeping its other keys), so both current and older HF tools find it.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let jinja = dir.join("chat_template.jinja");
        std::fs::write(&jinja, &self.source)
            .with_context(|| format!("writing {}", jinja.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let mut config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", config_path.display()))?
        } else {
            serde_json::json!({})
        };
        let obj = config
            .as_object_mut()
            .with_context(|| format!("{} is not a JSON object", config_path.display()))?;
        obj.insert("chat_template".into(), self.source.clone().into());
        let text = serde_json::to_string_pretty(&config)?;
        std::fs::write(&config_path, text)
            .with_context(|| format!("writing {}", config_path.display()))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins. `tools` is the OpenAI `tools` array, passed to the template as `tools`
    /// (`none` when absent, as HF does).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| anyhow::anyhow!("chat template `{}`: {}", self.name, describe(&e)))?;
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            tools => tools.map(|t| Value::from(Serde(t))).unwrap_or(Value::from(())),
            documents => Value::from(()),
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        template.render(ctx).map_err(|e| {
            anyhow::anyhow!(
                "chat template `{}` failed to render: {}",
                self.name,
                describe(&e)
            )
        })
    }

    /// The full rendering of a finished conversation (no generation prompt) and the byte range
    /// of each assistant turn in it: the reply text plus the end-of-turn marker the model must
    /// learn to emit (`Paris.<|im_end|>`), without the header before it or the newline after.
    ///
    /// Each turn is found by rendering prefixes: `messages[..i]` with a generation prompt ends
    /// where turn `i` starts, and `messages[..=i]` contains its end.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[ChatMessage],
    ) -> Result<(String, Vec<Range<usize>>)> {
        self.render_with_assistant_spans_and_tools(messages, None)
    }

    /// [`ChatTemplate::render_with_assistant_spans`] for conversations that declare tools.
    pub fn render_with_assistant_spans_and_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(messages, false, tools)?;
        let mut spans = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let through = self.render(&messages[..=i], false, tools)?;
            if !full.starts_with(&through) {
                bail!(
                    "chat template `{}` renders the conversation up to message {i} differently from the whole \
                     conversation, so assistant turns cannot be located for training",
                    self.name
                );
            }
            let before = self.render(&messages[..i], true, tools)?;
            let start = if through.starts_with(&before) {
                before.len()
            } else {
                // Some templates only render preamble (a default system prompt) inside the
                // message loop, so a prefix ending before the first message is not a prefix of
                // the longer rendering; fall back to where the reply's text is.
                let content = message.content.trim();
                match (!content.is_empty())
                    .then(|| through.rfind(content))
                    .flatten()
                {
                    Some(at) => at,
                    None => bail!(
                        "chat template `{}`: cannot locate assistant message {i} in the rendering",
                        self.name
                    ),
                }
            };
            spans.push(start..self.turn_end(&through, start, &message.content));
        }
        Ok((full, spans))
    }

    /// Where the assistant turn starting at `start` ends: after the first end-of-turn marker
    /// that follows the reply text, or at the end of the text if the template writes none.
    fn turn_end(&self, rendered: &str, start: usize, content: &str) -> usize {
        let tail = &rendered[start..];
        // Skip the reply itself, so a marker quoted inside it is not taken for the real one.
        let content = content.trim();
        let from = match tail.find(content) {
            Some(at) if !content.is_empty() => at + content.len(),
            _ => 0,
        };
        let marker_end = std::iter::once(self.eos_token.as_str())
            .chain(END_OF_TURN.iter().copied())
            .filter(|m| !m.is_empty())
            .filter_map(|m| tail[from..].find(m).map(|at| from + at + m.len()))
            .min();
        start + marker_end.unwrap_or_else(|| tail.trim_end().len())
    }
}

fn special_strings(tokenizer: &TextTokenizer) -> (String, String) {
    (
        tokenizer.bos_token.clone().unwrap_or_default(),
        tokenizer.eos_token.clone().unwrap_or_default(),
    )
}

/// A minijinja error with its location and cause chain, on one line.
fn describe(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// `raise_exception(message)`: templates call it to reject conversations they cannot format.
fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time, formatted like Python's `strftime`. UTC, since
/// servers run in UTC and a prompt should not depend on the host's time zone.
fn strftime_now(format: String) -> String {
    strftime_utc(&format, Timestamp::now())
}

/// Formats a time in UTC with `strftime` directives; unknown ones are kept as written.
fn strftime_utc(format: &str, time: Timestamp) -> String {
    time.to_zoned_datetime(TimeZone::UTC)
        .strftime(format)
        .to_string()
}

/// `tojson` as HF defines it: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`. Unlike minijinja's built-in it does not escape HTML
/// characters and uses Python's `", "` / `": "` spacing, so prompts match what the model saw in
/// training. An optional positional argument is the indent, as in Jinja2.
fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ))
        }
        // Python drops the space after ',' when indenting, since a newline follows.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: cannot serialize: {e}"),
        )
    })?;
    let style = PyJson {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    style.write(&mut out, &json, 0);
    Ok(Value::from_safe_string(out))
}

/// Python `json.dumps` formatting options.
struct PyJson<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn write(&self, out: &mut String, value: &serde_json::Value, level: usize) {
        match value {
            serde_json::Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push(']');
            }
            serde_json::Value::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.string(out, key);
                    out.push_str(self.key_sep);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push('}');
            }
            serde_json::Value::Array(_) => out.push_str("[]"),
            serde_json::Value::Object(_) => out.push_str("{}"),
            serde_json::Value::String(s) => self.string(out, s),
            serde_json::Value::Null => out.push_str("null"),
            serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            serde_json::Value::Number(n) => out.push_str(&n.to_string()),
        }
    }

    /// The separator before item `i` of a container, then its indentation.
    fn separate(&self, out: &mut String, i: usize, level: usize) {
        if i > 0 {
            out.push_str(self.item_sep);
        }
        self.newline(out, level);
    }

    fn newline(&self, out: &mut String, level: usize) {
        if let Some(indent) = self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn string(&self, out: &mut String, s: &str) {
        // serde_json escapes exactly what Python does with ensure_ascii=False: quotes,
        // backslashes and control characters.
        let quoted = serde_json::Value::String(s.to_string()).to_string();
        if !self.ensure_ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if c.is_ascii() {
                out.push(c);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn model_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// SmolLM2's template and tokenizer from the GGUF file, or `None` (with a note) if absent.
    fn smollm() -> Option<(ChatTemplate, TextTokenizer)> {
        let path = model_path();
        if !path.exists() {
            eprintln!("skipping: {} is absent", path.display());
            return None;
        }
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let tokenizer = TextTokenizer::from_gguf_metadata(&content.metadata).unwrap();
        let template = ChatTemplate::from_gguf_metadata(&content.metadata, &tokenizer).unwrap();
        Some((template, tokenizer))
    }

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::user("What is the capital of France?"),
            ChatMessage::assistant("Paris."),
            ChatMessage::user("And of Italy?"),
            ChatMessage::assistant("Rome."),
        ]
    }

    const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

    #[test]
    fn smollm_generation_prompt() {
        let Some((template, _)) = smollm() else {
            return;
        };
        assert_eq!(template.name(), "GGUF tokenizer.chat_template");
        let text = template
            .render(
                &[ChatMessage::user("What is the capital of France?")],
                true,
                None,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
        // A given system prompt replaces the default one.
        let text = template
            .render(
                &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
                false,
                None,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn smollm_rendering_tokenizes_markers_as_specials() {
        let Some((template, tokenizer)) = smollm() else {
            return;
        };
        let text = template
            .render(&[ChatMessage::user("Hi")], true, None)
            .unwrap();
        let ids = tokenizer.encode(&text, true).unwrap();
        assert_eq!(&ids[..3], [1, 9690, 198], "<|im_start|> system \\n");
        assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 3);
        assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
    }

    #[test]
    fn smollm_assistant_spans() {
        let Some((template, _)) = smollm() else {
            return;
        };
        let (full, spans) = template
            .render_with_assistant_spans(&conversation())
            .unwrap();
        let want = format!(
            "{SMOL_SYSTEM}<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n\
             <|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\nRome.<|im_end|>\n"
        );
        assert_eq!(full, want);
        let texts: Vec<&str> = spans.iter().map(|r| &full[r.clone()]).collect();
        assert_eq!(texts, ["Paris.<|im_end|>", "Rome.<|im_end|>"]);
        // The same rendering serves inference: everything before a span is the prompt.
        let prompt = template.render(&conversation()[..3], true, None).unwrap();
        assert_eq!(prompt, &full[..spans[1].start]);
    }

    #[test]
    fn spans_when_the_conversation_starts_with_the_assistant() {
        // SmolLM's default system prompt only renders inside the loop, so the empty prefix is
        // no prefix of the one-message rendering: the span comes from the reply's position.
        let Some((template, _)) = smollm() else {
            return;
        };
        let (full, spans) = template
            .render_with_assistant_spans(&[ChatMessage::assistant("Hello!")])
            .unwrap();
        assert_eq!(
            full,
            format!("{SMOL_SYSTEM}<|im_start|>assistant\nHello!<|im_end|>\n")
        );
        assert_eq!(&full[spans[0].clone()], "Hello!<|im_end|>");
    }

    #[test]
    fn shareable_across_threads() {
        // The server renders from several worker threads with one loaded model.
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
        assert_send_sync::<TextTokenizer>();
        assert_send_sync::<crate::model::sampling::Sampler>();
    }

    #[test]
    fn chatml_default_and_spans_with_a_quoted_marker() {
        let template = ChatTemplate::chatml_default().unwrap();
        let messages = [
            ChatMessage::user("q"),
            ChatMessage::assistant("say <|im_end|> twice"),
        ];
        assert_eq!(
            template.render(&messages[..1], true, None).unwrap(),
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
        );
        let (full, spans) = template.render_with_assistant_spans(&messages).unwrap();
        assert_eq!(&full[spans[0].clone()], "say <|im_end|> twice<|im_end|>");
    }

    #[test]
    fn spans_without_an_end_marker_cover_the_reply() {
        let source = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}";
        let template = ChatTemplate::new("plain", source, "", "").unwrap();
        let messages = [ChatMessage::user("hi"), ChatMessage::assistant("hello")];
        let (full, spans) = template.render_with_assistant_spans(&messages).unwrap();
        assert_eq!(full, "user: hi\nassistant: hello\n");
        assert_eq!(&full[spans[0].clone()], "hello");
    }

    #[test]
    fn unstable_prefixes_are_an_error() {
        // Renders the last message differently from earlier ones (like templates that strip
        // reasoning from past turns), so spans cannot be taken from prefixes.
        let source = "{% for m in messages %}{% if loop.last %}[{{ m.content }}]{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let template = ChatTemplate::new("unstable", source, "", "").unwrap();
        let err = template
            .render_with_assistant_spans(&[ChatMessage::assistant("a"), ChatMessage::user("b")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`unstable`"), "{err}");
    }

    #[test]
    fn whitespace_follows_hf_trim_and_lstrip_blocks() {
        // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before.
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let template = ChatTemplate::new("ws", source, "", "").unwrap();
        assert_eq!(
            template
                .render(
                    &[ChatMessage::user("x"), ChatMessage::user("y")],
                    false,
                    None
                )
                .unwrap(),
            "x\ny\n"
        );
    }

    #[test]
    fn errors_name_the_template() {
        let err = ChatTemplate::new("broken.jinja", "{% for %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`broken.jinja`") && err.contains("does not compile"),
            "{err}"
        );

        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}ok";
        let template = ChatTemplate::new("strict", source, "", "").unwrap();
        assert_eq!(
            template
                .render(&[ChatMessage::user("x")], false, None)
                .unwrap(),
            "ok"
        );
        let err = template
            .render(&[ChatMessage::assistant("x")], false, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`strict`")
                && err.contains("Conversations must start with a user message"),
            "{err}"
        );
    }

    #[test]
    fn python_methods_and_optional_fields() {
        let source = "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.tool_call_id is defined }}|{{ 'tool_calls' in m }}\n{% endfor %}";
        let template = ChatTemplate::new("py", source, "", "").unwrap();
        let mut tool = ChatMessage::new("tool", "  42 ");
        tool.tool_call_id = Some("call_1".into());
        let text = template
            .render(&[ChatMessage::user(" hi "), tool], false, None)
            .unwrap();
        // Booleans print as Python does, as in Jinja2.
        assert_eq!(text, "HI|False|False\n42|True|False\n");
    }

    #[test]
    fn tools_are_passed_or_none() {
        let source = "{% if tools is not none %}{% for t in tools %}{{ t.function.name }};{% endfor %}{% else %}no tools{% endif %}";
        let template = ChatTemplate::new("tools", source, "", "").unwrap();
        assert_eq!(template.render(&[], false, None).unwrap(), "no tools");
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather"}}]);
        assert_eq!(
            template.render(&[], false, Some(&tools)).unwrap(),
            "get_weather;"
        );
    }

    #[test]
    fn tojson_writes_like_python() {
        let template = |s: &str| {
            ChatTemplate::new("json", s, "", "")
                .unwrap()
                .render(&[], false, None)
                .unwrap()
        };
        // json.dumps({"a": [1, 2.5, 'x"<é', None, True]}, ensure_ascii=False)
        assert_eq!(
            template(r#"{{ {"a": [1, 2.5, 'x"<é', none, true]} | tojson }}"#),
            r#"{"a": [1, 2.5, "x\"<é", null, true]}"#
        );
        // json.dumps({"a": [1, {"b": "é"}], "c": {}}, indent=2, ensure_ascii=False)
        assert_eq!(
            template(r#"{{ {"a": [1, {"b": "é"}]} | tojson(indent=2) }}"#),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": \"é\"\n    }\n  ]\n}"
        );
        assert_eq!(
            template(r#"{{ "é😀" | tojson(ensure_ascii=true) }}"#),
            r#""\u00e9\ud83d\ude00""#
        );
        assert_eq!(
            template(r#"{{ [1, 2] | tojson(separators=[",", ":"]) }}"#),
            "[1,2]"
        );
        assert_eq!(
            template(r#"{{ {"b": 1, "a": 2} | tojson(sort_keys=true) }}"#),
            r#"{"a": 2, "b": 1}"#
        );
        assert_eq!(template(r#"{{ [[], {}] | tojson }}"#), "[[], {}]");
    }

    #[test]
    fn strftime_matches_known_dates() {
        let at = |secs: i64| Timestamp::from_second(secs).unwrap();
        // 1700000000 = Tuesday 2023-11-14 22:13:20 UTC.
        assert_eq!(strftime_utc("%d %b %Y", at(1_700_000_000)), "14 Nov 2023");
        assert_eq!(
            strftime_utc("%A %B %e %H:%M:%S %I%p %j %y %%", at(1_700_000_000)),
            "Tuesday November 14 22:13:20 10PM 318 23 %"
        );
        assert_eq!(
            strftime_utc("%Y-%m-%d %a %Z %z", at(0)),
            "1970-01-01 Thu UTC +0000"
        );
        // 2024-02-29 (leap day) = 19782 days after the epoch.
        assert_eq!(
            strftime_utc("%Y-%m-%d %j", at(19_782 * 86_400)),
            "2024-02-29 060"
        );
        assert_eq!(strftime_utc("%Y-%m-%d", at(-86_400)), "1969-12-31");
        // An unknown directive is kept, as Python's strftime does.
        assert_eq!(strftime_utc("%Y %! %", at(0)), "1970 %! %");
        let template = ChatTemplate::new("date", "{{ strftime_now('%Y') }}", "", "").unwrap();
        let year: i32 = template.render(&[], false, None).unwrap().parse().unwrap();
        assert!((2024..2200).contains(&year), "{year}");
    }

    #[test]
    fn message_content_accepts_null_and_parts() {
        let m: ChatMessage =
            serde_json::from_str(r#"{"role": "assistant", "content": null, "tool_calls": []}"#)
                .unwrap();
        assert_eq!((m.content.as_str(), m.tool_calls.is_some()), ("", true));
        let m: ChatMessage =
            serde_json::from_str(r#"{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}"#).unwrap();
        assert_eq!(m.content, "ab");
        let m: ChatMessage = serde_json::from_str(r#"{"role": "user"}"#).unwrap();
        assert_eq!(m.content, "");
        assert!(serde_json::from_str::<ChatMessage>(r#"{"role": "user", "content": 3}"#).is_err());
        // Absent optional fields are not serialized (templates test them with `is defined`).
        assert_eq!(
            serde_json::to_string(&ChatMessage::user("x")).unwrap(),
            r#"{"role":"user","content":"x"}"#
        );
    }

    #[test]
    fn save_and_reload_from_a_directory() {
        let Some((template, tokenizer)) = smollm() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        tokenizer.save_hf(dir.path()).unwrap();
        template.save_hf(dir.path()).unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["chat_template"].as_str(), Some(template.source()));
        assert_eq!(config["eos_token"].as_str(), Some("<|im_end|>"));
        let back = ChatTemplate::from_hf_dir(dir.path(), &tokenizer).unwrap();
        assert_eq!(back.source(), template.source());
        assert_eq!(
            (back.bos_token(), back.eos_token()),
            ("<|im_start|>", "<|im_end|>")
        );

        // Without chat_template.jinja the tokenizer_config.json copy is used.
        std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
        assert_eq!(
            ChatTemplate::from_hf_dir(dir.path(), &tokenizer)
                .unwrap()
                .source(),
            template.source()
        );
    }
}
