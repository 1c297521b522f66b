//! `POST /v1/chat/completions`: wire types, validation into a [`GenerateRequest`], and the
//! response in both shapes (one JSON object, or `chat.completion.chunk` events).

use crate::api::error::ApiError;
use crate::api::stream::{
    self, finish_reason, reported_logprob, usage, ChoiceOutput, ChunkFormat, Envelope,
};
use crate::api::validation::{self, SamplingFields, ValidationError, MAX_TOP_LOGPROBS};
use crate::api::{read_body, AppState};
use crate::api::{structured_outputs, tools};
use crate::engine::constraint::{Grammar, Spec};
use crate::engine::registry::ServedModel;
use crate::engine::{unix_now, GenerateRequest};
use crate::model::generate::{FinishReason, GenerationParams, StepOutput, TokenLogprob};
use crate::settings::Limits;
use crate::text::chat_template::ChatMessage;
use crate::text::openai_message::{self, MessageError};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// `CreateChatCompletionRequest`, as far as a local model uses it; other fields are ignored.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<Value>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub response_format: Option<Value>,
    /// rewind's extension (vLLM style): regex, Lark grammar, choice or JSON Schema.
    pub structured_outputs: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// Read from the same body by [`stream::prepare`].
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// A validated chat request and how to answer it.
pub struct ChatRequest {
    pub generate: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Tools were offered: the reply is searched for calls.
    pub tools: bool,
    pub prompt_tokens: usize,
}

/// OpenAI messages into the template's messages.
pub fn messages(raw: &[Value]) -> Result<Vec<ChatMessage>, ValidationError> {
    if raw.is_empty() {
        return Err(ValidationError::EmptyMessages);
    }
    raw.iter()
        .enumerate()
        .map(|(index, m)| {
            openai_message::from_openai(m).map_err(|e| match e {
                MessageError::Role(role) => ValidationError::InvalidRole { index, role },
                MessageError::Content(reason) => ValidationError::InvalidContent { index, reason },
            })
        })
        .collect()
}

/// `response_format` into a constraint (None: free text). Its shape and size are checked here;
/// [`compile`] checks the schema itself against what llguidance supports.
pub fn response_format(
    value: Option<&Value>,
    limits: &Limits,
) -> Result<Option<Spec>, ValidationError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match value.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Spec::json_object())),
        Some("json_schema") => {
            let spec = value.get("json_schema").ok_or_else(|| {
                ValidationError::ResponseFormat("`json_schema` is missing".into())
            })?;
            let schema = spec.get("schema").cloned().unwrap_or(json!({}));
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(ValidationError::ResponseFormat(
                    "`json_schema.schema` must be a JSON Schema object".into(),
                ));
            }
            validation::schema_within("response_format", &schema, limits)?;
            Ok(Some(Spec::JsonSchema(schema)))
        }
        Some(other) => Err(ValidationError::ResponseFormat(format!(
            "unknown type `{other}`; expected text, json_object or json_schema"
        ))),
        None => Err(ValidationError::ResponseFormat("`type` is missing".into())),
    }
}

/// Compiles a constraint for `model`; what llguidance refuses is a 400 from `invalid`.
pub fn compile(
    model: &ServedModel,
    spec: &Spec,
    invalid: fn(String) -> ValidationError,
) -> Result<Arc<Grammar>, ValidationError> {
    model
        .token_table()
        .compile(spec)
        .map_err(|e| invalid(format!("{e:#}")))
}

impl stream::GenerationBody for ChatCompletionRequest {
    type Validated = ChatRequest;

    fn model(&self) -> &str {
        &self.model
    }

    fn set_sampling(&mut self, sampling: SamplingFields) {
        self.sampling = sampling;
    }

    fn validate(self, model: Arc<ServedModel>, state: &AppState) -> Result<ChatRequest, ApiError> {
        let limits = &state.settings.limits;
        let sampling = self.sampling.validate(model.vocab_size, limits)?;
        validation::at_most("messages", self.messages.len(), limits.max_messages)?;
        let mut msgs = messages(&self.messages)?;
        let mut setup = tools::validate(self.tools.as_deref(), self.tool_choice.as_ref(), limits)?;
        let offered = setup.tools.is_some();
        if !model.supports_tools {
            if let Some(tools) = setup.tools.take() {
                tools::describe_in_messages(&mut msgs, &tools);
            }
        }
        let logprobs = self.logprobs.unwrap_or(false);
        let top = self.top_logprobs.unwrap_or(0);
        if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
            return Err(ValidationError::OutOfRange {
                param: "top_logprobs",
                value: top.to_string(),
                range: format!("[0, {MAX_TOP_LOGPROBS}]"),
            }
            .into());
        }
        if top > 0 && !logprobs {
            return Err(ValidationError::TopLogprobsWithoutLogprobs.into());
        }
        let format = match structured_outputs::spec(self.structured_outputs.as_ref(), limits)? {
            Some(_) if self.response_format.as_ref().is_some_and(|f| !f.is_null()) => {
                return Err(ValidationError::StructuredOutputs(
                    "give either `structured_outputs` or `response_format`, not both".into(),
                )
                .into());
            }
            Some(spec) => Some(compile(&model, &spec, ValidationError::StructuredOutputs)?),
            None => response_format(self.response_format.as_ref(), limits)?
                .map(|spec| compile(&model, &spec, ValidationError::ResponseFormat))
                .transpose()?,
        };
        // A required or named tool call is enforced by its grammar, over any response_format.
        let grammar = match &setup.forced {
            Some(spec) => Some(compile(&model, spec, ValidationError::Tools)?),
            None => format,
        };
        let prompt = model
            .template
            .render(&msgs, true, setup.tools.as_ref())
            .map_err(|e| ValidationError::Template(format!("{e:#}")))?;
        let ids = model
            .tokenizer
            .encode(&prompt, true)
            .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e:#}")))?;
        let (requested, param) = match self.max_completion_tokens {
            Some(m) => (Some(m), "max_completion_tokens"),
            None => (self.max_tokens, "max_tokens"),
        };
        let max_tokens = validation::max_tokens(
            requested,
            param,
            ids.len(),
            model.context_length,
            limits.max_tokens,
            "messages",
        )?;
        let params = GenerationParams {
            max_tokens,
            sampling: sampling.params,
            stop: sampling.stop,
            stop_token_ids: Vec::new(),
            logprobs: logprobs.then_some(top as usize),
        };
        let prompt_tokens = ids.len();
        Ok(ChatRequest {
            generate: GenerateRequest {
                model,
                prompts: vec![ids],
                n: sampling.n,
                params,
                grammar,
            },
            stream: sampling.stream,
            include_usage: sampling.include_usage,
            logprobs,
            tools: offered,
            prompt_tokens,
        })
    }
}

/// `ChatCompletionTokenLogprob`.
fn logprob_entry(lp: &TokenLogprob) -> Value {
    json!({
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.bytes,
        "top_logprobs": lp.top.iter().map(|(t, b, l)| json!({"token": t, "logprob": l, "bytes": b})).collect::<Vec<_>>(),
    })
}

/// The assistant message and finish reason of one choice, with tool calls split out.
fn message(output: &ChoiceOutput, tools: bool) -> (Value, &'static str) {
    let finish = finish_reason(output.finish.unwrap_or(FinishReason::Stop));
    if tools {
        let parsed = tools::parse(&output.text);
        if !parsed.calls.is_empty() {
            let content = (!parsed.content.is_empty()).then_some(parsed.content);
            let msg = json!({"role": "assistant", "content": content, "refusal": null, "tool_calls": parsed.calls});
            return (msg, "tool_calls");
        }
    }
    (
        json!({"role": "assistant", "content": output.text, "refusal": null}),
        finish,
    )
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(&state, &req, payload).await?;
    let (model, chat) = stream::prepare::<ChatCompletionRequest>(&state, body).await?;
    let choices = chat.generate.choices();
    let events = stream::submit(&state.engine, chat.generate)?;
    let envelope = Envelope {
        id: stream::response_id("chatcmpl"),
        created: unix_now(),
        model: model.clone(),
        object: "chat.completion",
        chunk_object: "chat.completion.chunk",
        include_usage: chat.include_usage,
    };
    if chat.stream {
        let format = ChatChunks {
            envelope,
            choices,
            logprobs: chat.logprobs,
            tools: chat.tools,
            prompt_tokens: chat.prompt_tokens,
            completion_tokens: 0,
            held: vec![String::new(); choices],
        };
        return Ok(stream::sse_response(events, format));
    }
    let outputs = stream::collect(&model, events, choices).await?;
    let completion_tokens = outputs.iter().map(|c| c.tokens).sum();
    let choices: Vec<Value> = outputs
        .iter()
        .enumerate()
        .map(|(index, output)| {
            let (message, finish) = message(output, chat.tools);
            let logprobs = chat
                .logprobs
                .then(|| json!({"content": output.logprobs.iter().map(logprob_entry).collect::<Vec<_>>(), "refusal": null}));
            json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        })
        .collect();
    Ok(HttpResponse::Ok()
        .json(envelope.response(choices, usage(chat.prompt_tokens, completion_tokens))))
}

/// `chat.completion.chunk` events: the role first for every choice, content deltas, one
/// chunk with the finish reason per choice, the usage chunk last when asked for.
struct ChatChunks {
    envelope: Envelope,
    choices: usize,
    logprobs: bool,
    tools: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// With tools offered, a choice's text is held until it ends, since only the whole reply
    /// tells a tool call from prose.
    held: Vec<String>,
}

impl ChatChunks {
    fn chunk(&self, index: usize, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
        self.envelope.chunk(
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}),
        )
    }
}

impl ChunkFormat for ChatChunks {
    fn start(&mut self) -> Vec<Value> {
        (0..self.choices)
            .map(|i| {
                self.chunk(
                    i,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                )
            })
            .collect()
    }

    fn token(&mut self, choice: usize, output: StepOutput) -> Vec<Value> {
        self.completion_tokens += 1;
        let mut out = Vec::new();
        if self.tools {
            self.held[choice].push_str(&output.text);
            if let Some(reason) = output.finish {
                let text = std::mem::take(&mut self.held[choice]);
                let parsed = tools::parse(&text);
                if parsed.calls.is_empty() {
                    if !text.is_empty() {
                        out.push(self.chunk(choice, json!({"content": text}), Value::Null, None));
                    }
                    out.push(self.chunk(
                        choice,
                        json!({}),
                        Value::Null,
                        Some(finish_reason(reason)),
                    ));
                } else {
                    if !parsed.content.is_empty() {
                        out.push(self.chunk(
                            choice,
                            json!({"content": parsed.content}),
                            Value::Null,
                            None,
                        ));
                    }
                    // Each call in one chunk: id, type and name with the complete arguments.
                    for (i, call) in parsed.calls.iter().enumerate() {
                        let mut call = call.clone();
                        call["index"] = json!(i);
                        out.push(self.chunk(
                            choice,
                            json!({"tool_calls": [call]}),
                            Value::Null,
                            None,
                        ));
                    }
                    out.push(self.chunk(choice, json!({}), Value::Null, Some("tool_calls")));
                }
            }
            return out;
        }
        let logprob = if self.logprobs {
            reported_logprob(&self.envelope.model, &output)
        } else {
            None
        };
        if !output.text.is_empty() || logprob.is_some() {
            let logprobs = match &logprob {
                Some(lp) => json!({"content": [logprob_entry(lp)], "refusal": null}),
                None => Value::Null,
            };
            out.push(self.chunk(choice, json!({"content": output.text}), logprobs, None));
        }
        if let Some(reason) = output.finish {
            out.push(self.chunk(choice, json!({}), Value::Null, Some(finish_reason(reason))));
        }
        out
    }

    fn end(&mut self) -> Vec<Value> {
        self.envelope
            .usage_chunk(usage(self.prompt_tokens, self.completion_tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::{parse_line, Example};

    /// Training builds its prompts with serving's own message mapping.
    #[test]
    fn training_maps_messages_as_serving_does() {
        let line = r#"{"messages":[{"role":"developer","content":"d"},{"role":"user","content":"u"},{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"function","name":"f","content":"r"},{"role":"assistant","content":"a"}]}"#;
        let Example::Chat(trained) = parse_line(line).unwrap() else {
            panic!("a chat example")
        };
        let raw: Value = serde_json::from_str(line).unwrap();
        let served = messages(raw["messages"].as_array().unwrap()).unwrap();
        assert_eq!(trained, served);
        assert_eq!(trained[0].role, "system");
        assert_eq!(trained[3].role, "tool");
    }

    #[test]
    fn messages_are_normalised() {
        let raw = vec![
            json!({"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}),
            json!({"role": "user", "content": "Hi", "name": "ann"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
            json!({"role": "tool", "content": "42", "tool_call_id": "c"}),
        ];
        let m = messages(&raw).unwrap();
        assert_eq!(
            (m[0].role.as_str(), m[0].content.as_str()),
            ("system", "Be brief.")
        );
        assert_eq!(m[1].name.as_deref(), Some("ann"));
        assert!(m[2].tool_calls.is_some() && m[2].content.is_empty());
        assert_eq!(m[3].tool_call_id.as_deref(), Some("c"));
    }

    #[test]
    fn bad_messages_name_the_field() {
        let err = |raw: Value| {
            messages(raw.as_array().unwrap())
                .unwrap_err()
                .param()
                .unwrap()
        };
        assert_eq!(err(json!([])), "messages");
        assert_eq!(
            err(json!([{"role": "robot", "content": "x"}])),
            "messages[0].role"
        );
        assert_eq!(
            err(json!([{"role": "user", "content": "x"}, {"role": "user"}])),
            "messages[1].content"
        );
        assert_eq!(
            err(
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
            ),
            "messages[0].content"
        );
    }

    #[test]
    fn response_formats() {
        assert!(response_format(None, &Limits::default()).unwrap().is_none());
        assert!(
            response_format(Some(&json!({"type": "text"})), &Limits::default())
                .unwrap()
                .is_none()
        );
        assert!(
            response_format(Some(&json!({"type": "json_object"})), &Limits::default())
                .unwrap()
                .is_some()
        );
        let schema = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}});
        assert!(response_format(Some(&schema), &Limits::default())
            .unwrap()
            .is_some());
        for bad in [
            json!({"type": "yaml"}),
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"schema": "an object"}}),
            json!({"type": "json_schema", "json_schema": {"schema": [{"type": "object"}]}}),
            json!({"type": "json_schema", "json_schema": {"schema": {"enum": ["x".repeat(70_000)]}}}),
        ] {
            assert_eq!(
                response_format(Some(&bad), &Limits::default())
                    .unwrap_err()
                    .param()
                    .as_deref(),
                Some("response_format")
            );
        }
    }
}
