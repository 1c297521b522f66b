//! Validation at the edge: the JSON body becomes a typed request once, before anything is
//! queued, and each broken rule is one [`ValidationError`] variant that names the OpenAI
//! parameter at fault. The engine never re-checks.

use crate::model::sampling::SamplingParams;
use crate::settings::Limits;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;

/// OpenAI accepts up to 4 stop sequences.
pub const MAX_STOPS: usize = 4;
/// Alternatives per position the sampler reports (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("We could not parse the JSON body of your request: {0}")]
    InvalidJson(String),
    #[error("Missing required parameter: '{0}'.")]
    MissingField(String),
    #[error("Invalid type for '{}': {message}", param.as_deref().unwrap_or("body"))]
    InvalidType {
        param: Option<String>,
        message: String,
    },
    #[error("Invalid value for '{param}': {value} is outside {range}.")]
    OutOfRange {
        param: &'static str,
        value: String,
        range: String,
    },
    #[error("'messages' must contain at least one message.")]
    EmptyMessages,
    #[error("Invalid value '{role}' for 'messages[{index}].role': expected system, developer, user, assistant or tool.")]
    InvalidRole { index: usize, role: String },
    #[error("Invalid 'messages[{index}].content': {reason}")]
    InvalidContent { index: usize, reason: String },
    #[error("'stop' accepts at most {MAX_STOPS} sequences, got {0}.")]
    TooManyStops(usize),
    #[error("'{param}' accepts at most {max} entries, got {count}.")]
    TooMany {
        param: &'static str,
        count: usize,
        max: usize,
    },
    #[error("'{param}' is too large: {what} (the limit is {max}).")]
    TooLarge {
        param: String,
        what: String,
        max: usize,
    },
    #[error("Invalid key '{0}' in 'logit_bias': keys must be token ids.")]
    LogitBiasKey(String),
    #[error("'logit_bias' names token {id}, outside the vocabulary of {vocab} tokens.")]
    LogitBiasToken { id: u64, vocab: usize },
    #[error("'top_logprobs' requires 'logprobs' to be true.")]
    TopLogprobsWithoutLogprobs,
    #[error("'prompt' is empty.")]
    EmptyPrompt,
    #[error("'prompt' contains token id {id}, outside the vocabulary of {vocab} tokens.")]
    PromptToken { id: u64, vocab: usize },
    #[error(
        "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt} in the {what}, {completion} in the completion). Please reduce the length of the {what} or completion.",
        prompt + completion
    )]
    ContextLength {
        param: &'static str,
        what: &'static str,
        context: usize,
        prompt: usize,
        completion: usize,
    },
    #[error("Invalid 'response_format': {0}")]
    ResponseFormat(String),
    #[error("Invalid 'structured_outputs': {0}")]
    StructuredOutputs(String),
    #[error("Invalid 'tools': {0}")]
    Tools(String),
    #[error("Invalid 'tool_choice': {0}")]
    ToolChoice(String),
    #[error("'{param}' is not supported: {reason}")]
    Unsupported { param: &'static str, reason: String },
    #[error("The model's chat template cannot render these messages: {0}")]
    Template(String),
}

impl ValidationError {
    /// The request parameter at fault, as OpenAI names it.
    pub fn param(&self) -> Option<String> {
        use ValidationError::*;
        match self {
            InvalidJson(_) => None,
            MissingField(p) => Some(p.clone()),
            InvalidType { param, .. } => param.clone(),
            OutOfRange { param, .. } | Unsupported { param, .. } | ContextLength { param, .. } => {
                Some(param.to_string())
            }
            EmptyMessages | Template(_) => Some("messages".into()),
            InvalidRole { index, .. } => Some(format!("messages[{index}].role")),
            InvalidContent { index, .. } => Some(format!("messages[{index}].content")),
            TooManyStops(_) => Some("stop".into()),
            TooMany { param, .. } => Some(param.to_string()),
            TooLarge { param, .. } => Some(param.clone()),
            LogitBiasKey(_) | LogitBiasToken { .. } => Some("logit_bias".into()),
            TopLogprobsWithoutLogprobs => Some("top_logprobs".into()),
            EmptyPrompt | PromptToken { .. } => Some("prompt".into()),
            ResponseFormat(_) => Some("response_format".into()),
            StructuredOutputs(_) => Some("structured_outputs".into()),
            Tools(_) => Some("tools".into()),
            ToolChoice(_) => Some("tool_choice".into()),
        }
    }

    /// OpenAI's error code for the rule.
    pub fn code(&self) -> &'static str {
        use ValidationError::*;
        match self {
            InvalidJson(_) => "invalid_json",
            MissingField(_) => "missing_required_parameter",
            InvalidType { .. } => "invalid_type",
            ContextLength { .. } => "context_length_exceeded",
            Unsupported { .. } => "unsupported_parameter",
            _ => "invalid_value",
        }
    }
}

/// Parses a JSON body into `T`: see [`json_object`] and [`from_object`].
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ValidationError> {
    from_object(&json_object(bytes)?)
}

/// The body as a JSON object (serde_json bounds its nesting, so no body recurses deeply).
pub fn json_object(bytes: &[u8]) -> Result<Value, ValidationError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ValidationError::InvalidJson(e.to_string()))?;
    if !value.is_object() {
        return Err(ValidationError::InvalidJson(
            "the body must be a JSON object".into(),
        ));
    }
    Ok(value)
}

/// A generation request's body: its own fields (`T`, whose `sampling` field serde skips) and the
/// sampling fields chat and completions share, each read from the same parsed body. (Not a
/// `#[serde(flatten)]`: through one, a wrong value's path is lost.)
pub fn parse_generation_body<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, SamplingFields), ValidationError> {
    let body = json_object(bytes)?;
    Ok((from_object(&body)?, from_object(&body)?))
}

/// Reads `T` from a parsed body in one pass, tracking where it is: a value of the wrong shape is
/// reported with its path (`messages[2].content`), so the error names the parameter without
/// trying the body again key by key.
pub fn from_object<T: DeserializeOwned>(value: &Value) -> Result<T, ValidationError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            let field = match path.as_str() {
                "." => field.to_string(),
                parent => format!("{parent}.{field}"),
            };
            return ValidationError::MissingField(field);
        }
        ValidationError::InvalidType {
            param: (path != ".").then_some(path),
            message,
        }
    })
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields chat and completions requests share.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extra body (vLLM's name): 0 or -1 disables it.
    pub top_k: Option<i64>,
    /// Extra body.
    pub min_p: Option<f64>,
    /// Extra body: HF-style repetition penalty.
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

/// The validated sampling part of a request.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

fn range(param: &'static str, value: f64, lo: f64, hi: f64) -> Result<f32, ValidationError> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(value as f32)
    } else {
        Err(ValidationError::OutOfRange {
            param,
            value: value.to_string(),
            range: format!("[{lo}, {hi}]"),
        })
    }
}

impl SamplingFields {
    pub fn validate(&self, vocab: usize, limits: &Limits) -> Result<Sampling, ValidationError> {
        let mut p = SamplingParams::default();
        if let Some(t) = self.temperature {
            p.temperature = range("temperature", t, 0.0, 2.0)?;
        }
        if let Some(v) = self.top_p {
            p.top_p = range("top_p", v, 0.0, 1.0)?;
        }
        if let Some(k) = self.top_k {
            if k < -1 {
                return Err(ValidationError::OutOfRange {
                    param: "top_k",
                    value: k.to_string(),
                    range: "-1 (disabled) or >= 0".into(),
                });
            }
            p.top_k = k.max(0) as usize;
        }
        if let Some(v) = self.min_p {
            p.min_p = range("min_p", v, 0.0, 1.0)?;
        }
        if let Some(v) = self.repetition_penalty {
            // Checked as the sampler holds it: in f32, 1e-50 is 0 and 1e300 infinite, which the
            // sampler refuses mid-request (a 500).
            let held = v as f32;
            if !(v.is_finite() && held.is_finite() && held > 0.0) {
                return Err(ValidationError::OutOfRange {
                    param: "repetition_penalty",
                    value: v.to_string(),
                    range: "(0, inf)".into(),
                });
            }
            p.repetition_penalty = held;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = range("presence_penalty", v, -2.0, 2.0)?;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = range("frequency_penalty", v, -2.0, 2.0)?;
        }
        if let Some(bias) = &self.logit_bias {
            if bias.len() > limits.max_logit_bias {
                return Err(ValidationError::TooMany {
                    param: "logit_bias",
                    count: bias.len(),
                    max: limits.max_logit_bias,
                });
            }
            let mut entries = Vec::with_capacity(bias.len());
            for (key, &value) in bias {
                let id: u64 = key
                    .trim()
                    .parse()
                    .map_err(|_| ValidationError::LogitBiasKey(key.clone()))?;
                if id >= vocab as u64 {
                    return Err(ValidationError::LogitBiasToken { id, vocab });
                }
                entries.push((id as u32, range("logit_bias", value, -100.0, 100.0)?));
            }
            entries.sort_by_key(|e| e.0);
            p.logit_bias = entries;
        }
        // Negative seeds are valid int64s; their bits seed the generator all the same.
        p.seed = self.seed.map(|s| s as u64);
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOPS {
            return Err(ValidationError::TooManyStops(stop.len()));
        }
        if let Some(long) = stop
            .iter()
            .find(|s| s.chars().count() > limits.max_stop_chars)
        {
            return Err(ValidationError::TooLarge {
                param: "stop".into(),
                what: format!("a sequence of {} characters", long.chars().count()),
                max: limits.max_stop_chars,
            });
        }
        let n = self.n.unwrap_or(1);
        if n < 1 || n > limits.max_n as i64 {
            return Err(ValidationError::OutOfRange {
                param: "n",
                value: n.to_string(),
                range: format!("[1, {}]", limits.max_n),
            });
        }
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream
            && self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        Ok(Sampling {
            params: p,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            n: n as usize,
            stream,
            include_usage,
        })
    }
}

/// A list parameter of at most `max` entries.
pub fn at_most(param: &'static str, count: usize, max: usize) -> Result<(), ValidationError> {
    if count > max {
        return Err(ValidationError::TooMany { param, count, max });
    }
    Ok(())
}

/// A JSON schema the server reads (a `response_format`, a tool's `parameters`) within
/// `limits.max_schema_bytes` serialised and `limits.max_schema_depth` levels of nesting.
pub fn schema_within(param: &str, schema: &Value, limits: &Limits) -> Result<(), ValidationError> {
    let too_large = |what: String, max: usize| ValidationError::TooLarge {
        param: param.to_string(),
        what,
        max,
    };
    let bytes = serde_json::to_vec(schema).map_or(usize::MAX, |v| v.len());
    if bytes > limits.max_schema_bytes {
        return Err(too_large(format!("{bytes} bytes"), limits.max_schema_bytes));
    }
    // Nesting of the JSON itself (a schema level is at least one object), walked without
    // recursion.
    let mut pending = vec![(schema, 0usize)];
    while let Some((value, depth)) = pending.pop() {
        // Two JSON levels per schema level (`properties` then the property).
        if depth > 2 * limits.max_schema_depth + 1 {
            return Err(too_large(
                "nested too deeply".into(),
                limits.max_schema_depth,
            ));
        }
        match value {
            Value::Array(items) => pending.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => pending.extend(map.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// Resolves the completion budget and checks the context: prompt plus completion must fit.
/// Without a requested value the completion may use the rest of the context, up to `cap`.
pub fn max_tokens(
    requested: Option<i64>,
    param: &'static str,
    prompt: usize,
    context: usize,
    cap: usize,
    what: &'static str,
) -> Result<usize, ValidationError> {
    let context_error = |completion| ValidationError::ContextLength {
        param: if what == "messages" {
            "messages"
        } else {
            "prompt"
        },
        what,
        context,
        prompt,
        completion,
    };
    match requested {
        Some(m) => {
            if m < 1 || m > cap as i64 {
                return Err(ValidationError::OutOfRange {
                    param,
                    value: m.to_string(),
                    range: format!("[1, {cap}]"),
                });
            }
            let m = m as usize;
            if prompt + m > context {
                return Err(context_error(m));
            }
            Ok(m)
        }
        None if prompt >= context => Err(context_error(1)),
        None => Ok(cap.min(context - prompt)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Probe {
        #[allow(dead_code)]
        model: String,
    }

    fn parse(json: &[u8]) -> Result<SamplingFields, ValidationError> {
        parse_generation_body::<Probe>(json).map(|(_, sampling)| sampling)
    }

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn shape_errors_name_the_parameter() {
        assert_eq!(parse(b"{").unwrap_err().code(), "invalid_json");
        assert_eq!(parse(b"[1]").unwrap_err().code(), "invalid_json");
        assert_eq!(
            parse(br#"{"n": 1}"#).unwrap_err(),
            ValidationError::MissingField("model".into())
        );
        let e = parse(br#"{"model": "m", "temperature": "hot", "foo": 1}"#).unwrap_err();
        assert_eq!(e.param().as_deref(), Some("temperature"), "{e}");
        let e = parse(br#"{"model": 5, "n": 1}"#).unwrap_err();
        assert_eq!(
            (e.param().as_deref(), e.code()),
            (Some("model"), "invalid_type"),
            "{e}"
        );
        // Unknown fields are ignored.
        let p = parse(br#"{"model": "m", "store": true, "metadata": {"a": "b"}}"#).unwrap();
        assert!(p.temperature.is_none());
        // Nested values are named by their path; one pass reports a type error among many keys.
        let e = parse(br#"{"model": "m", "stream_options": {"include_usage": 3}}"#).unwrap_err();
        assert_eq!(
            e.param().as_deref(),
            Some("stream_options.include_usage"),
            "{e}"
        );
        let mut many = String::from(r#"{"model": "m", "n": "x""#);
        for i in 0..100_000 {
            many.push_str(&format!(r#", "k{i}": {i}"#));
        }
        many.push('}');
        let started = std::time::Instant::now();
        let e = parse(many.as_bytes()).unwrap_err();
        assert_eq!(e.param().as_deref(), Some("n"), "{e}");
        assert!(
            started.elapsed().as_secs_f64() < 2.0,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn ranges_are_checked_per_parameter() {
        let check = |json: &str| parse(json.as_bytes()).unwrap().validate(100, &limits());
        for (json, param) in [
            (r#"{"model":"m","temperature":2.5}"#, "temperature"),
            (r#"{"model":"m","top_p":-0.1}"#, "top_p"),
            (r#"{"model":"m","top_k":-2}"#, "top_k"),
            (r#"{"model":"m","presence_penalty":3}"#, "presence_penalty"),
            (r#"{"model":"m","n":0}"#, "n"),
            (r#"{"model":"m","n":1000}"#, "n"),
            (r#"{"model":"m","stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"model":"m","logit_bias":{"abc":1}}"#, "logit_bias"),
            (r#"{"model":"m","logit_bias":{"100":1}}"#, "logit_bias"),
            (r#"{"model":"m","logit_bias":{"5":101}}"#, "logit_bias"),
        ] {
            let e = check(json).unwrap_err();
            assert_eq!(e.param().as_deref(), Some(param), "{json}: {e}");
        }
        let s = check(r#"{"model":"m","temperature":0,"top_k":-1,"stop":"\n","logit_bias":{"7":-100},"seed":-1,"n":2,"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(
            (s.params.top_k, s.n, s.stream, s.include_usage),
            (0, 2, true, true)
        );
        assert_eq!(s.stop, ["\n"]);
        assert_eq!(s.params.logit_bias, [(7, -100.0)]);
        assert_eq!(s.params.seed, Some(u64::MAX));
    }

    #[test]
    fn context_is_checked_before_queueing() {
        assert_eq!(
            max_tokens(Some(10), "max_tokens", 5, 100, 50, "messages"),
            Ok(10)
        );
        assert_eq!(
            max_tokens(None, "max_tokens", 5, 100, 50, "messages"),
            Ok(50)
        );
        assert_eq!(
            max_tokens(None, "max_tokens", 80, 100, 50, "messages"),
            Ok(20)
        );
        let e = max_tokens(Some(30), "max_tokens", 80, 100, 50, "messages").unwrap_err();
        assert_eq!(
            (e.code(), e.param().as_deref()),
            ("context_length_exceeded", Some("messages"))
        );
        assert!(
            e.to_string()
                .contains("maximum context length is 100 tokens"),
            "{e}"
        );
        assert_eq!(
            max_tokens(None, "max_tokens", 100, 100, 50, "prompt")
                .unwrap_err()
                .code(),
            "context_length_exceeded"
        );
        let e = max_tokens(Some(0), "max_completion_tokens", 1, 100, 50, "messages").unwrap_err();
        assert_eq!(e.param().as_deref(), Some("max_completion_tokens"));
    }
}
