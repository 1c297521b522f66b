//! What chat and completions share once a request is validated: finding the model, queueing the
//! request, and turning the engine's events into a JSON body or a server-sent event stream.
//!
//! SSE framing follows what the official client parses: data-only events (`data: <json>\n\n`),
//! `data: [DONE]` last, `: keep-alive` comments while a request waits (the client ignores lines
//! starting with `:`), and after a failure a `data: {"error": ...}` event, then the end.

use crate::api::error::ApiError;
use crate::api::validation::{self, SamplingFields};
use crate::api::{off_worker, AppState};
use crate::engine::registry::{Lookup, ServedModel};
use crate::engine::{Engine, Event, EventStream, GenerateRequest};
use crate::model::generate::{FinishReason, StepOutput, TokenLogprob};
use actix_web::web::{self, Bytes};
use actix_web::HttpResponse;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// How long a stream may stay silent before a keep-alive comment goes out; writing also lets
/// the server notice a client that has gone.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The wire type of a generation request (chat, legacy completions): its own fields, the
/// sampling fields they share, and its validation against the model it names.
pub trait GenerationBody: DeserializeOwned + Send + 'static {
    type Validated: Send + 'static;
    fn model(&self) -> &str;
    fn set_sampling(&mut self, sampling: SamplingFields);
    fn validate(
        self,
        model: Arc<ServedModel>,
        state: &AppState,
    ) -> Result<Self::Validated, ApiError>;
}

/// A generation body parsed and validated off the HTTP workers (a prompt of megabytes is
/// rendered and tokenised there), with the model it names.
pub async fn prepare<B: GenerationBody>(
    state: &web::Data<AppState>,
    body: Bytes,
) -> Result<(Arc<ServedModel>, B::Validated), ApiError> {
    let state = state.clone();
    off_worker(move || {
        let (mut request, sampling): (B, _) = validation::parse_generation_body(&body)?;
        request.set_sampling(sampling);
        let model = served_model(&state.engine, request.model())?;
        let validated = request.validate(model.clone(), &state)?;
        Ok((model, validated))
    })
    .await
}

/// The loaded model named by a request, or the error the client should see.
pub fn served_model(engine: &Engine, id: &str) -> Result<Arc<ServedModel>, ApiError> {
    match engine.registry().lookup(id) {
        Lookup::Ready(m) => Ok(m),
        Lookup::NotFound => Err(ApiError::model_not_found(id)),
        Lookup::Loading => Err(ApiError::unavailable(format!(
            "The model `{id}` is still loading; retry shortly."
        ))),
        Lookup::Failed(e) => Err(ApiError::unavailable(format!(
            "The model `{id}` failed to load: {e}"
        ))),
    }
}

/// Token usage of a finished request, in OpenAI's `CompletionUsage` shape.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// One choice's complete output.
#[derive(Debug, Clone, Default)]
pub struct ChoiceOutput {
    pub text: String,
    /// Logprobs of the tokens that make up `text` (end-of-turn tokens left out).
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
    pub tokens: usize,
}

/// Whether a step's logprob belongs in the response: the end-of-turn token that stopped
/// generation is not part of the text.
pub fn reported_logprob(model: &ServedModel, output: &StepOutput) -> Option<TokenLogprob> {
    let eos = output.finish == Some(FinishReason::Stop) && model.tokenizer.is_eos(output.token);
    output.logprob.clone().filter(|_| !eos)
}

/// Runs a request to the end and gathers every choice.
pub async fn collect(
    model: &ServedModel,
    mut events: EventStream,
    choices: usize,
) -> Result<Vec<ChoiceOutput>, ApiError> {
    let mut out = vec![ChoiceOutput::default(); choices];
    while let Some(event) = events.recv().await {
        match event {
            Event::Token { choice, output } => {
                let c = &mut out[choice];
                c.tokens += 1;
                c.text.push_str(&output.text);
                c.logprobs.extend(reported_logprob(model, &output));
                if output.finish.is_some() {
                    c.finish = output.finish;
                }
            }
            Event::Error(e) => return Err(ApiError::from(e)),
        }
    }
    if out.iter().any(|c| c.finish.is_none()) {
        return Err(ApiError::internal(
            "generation ended before every choice finished",
        ));
    }
    Ok(out)
}

/// Queues a validated request.
pub fn submit(engine: &Engine, request: GenerateRequest) -> Result<EventStream, ApiError> {
    engine.submit(request).map_err(ApiError::from)
}

/// Turns engine events into the chunks of one endpoint's stream.
pub trait ChunkFormat: 'static {
    /// Chunks sent before any token (the chat role chunks).
    fn start(&mut self) -> Vec<Value>;
    fn token(&mut self, choice: usize, output: StepOutput) -> Vec<Value>;
    /// Chunks after the last token (the usage chunk).
    fn end(&mut self) -> Vec<Value>;
}

fn event(value: &Value) -> Bytes {
    let mut s = String::with_capacity(256);
    s.push_str("data: ");
    s.push_str(&value.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

/// The SSE response for a queued request. Dropping it (the client went away) drops the event
/// receiver, which the engine sees and cancels the request.
pub fn sse_response<F: ChunkFormat>(events: EventStream, mut format: F) -> HttpResponse {
    let first: VecDeque<Bytes> = format.start().iter().map(event).collect();
    let state = (events, format, first, false);
    let body = futures_util::stream::unfold(
        state,
        |(mut events, mut format, mut queue, mut ended)| async move {
            loop {
                if let Some(bytes) = queue.pop_front() {
                    return Some((
                        Ok::<_, actix_web::Error>(bytes),
                        (events, format, queue, ended),
                    ));
                }
                if ended {
                    return None;
                }
                match tokio::time::timeout(KEEP_ALIVE, events.recv()).await {
                    Ok(Some(Event::Token { choice, output })) => {
                        queue.extend(format.token(choice, output).iter().map(event))
                    }
                    Ok(Some(Event::Error(e))) => {
                        queue.push_back(event(&ApiError::from(e).body()));
                        ended = true;
                    }
                    Ok(None) => {
                        queue.extend(format.end().iter().map(event));
                        queue.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                        ended = true;
                    }
                    Err(_) => queue.push_back(Bytes::from_static(b": keep-alive\n\n")),
                }
            }
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

/// `chatcmpl-…` / `cmpl-…` ids.
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The fields a response object and every stream chunk of one request share (`id`, `object`,
/// `created`, `model`, `system_fingerprint`), around the endpoint's own choices.
pub struct Envelope {
    pub id: String,
    pub created: u64,
    pub model: Arc<ServedModel>,
    /// `object` of the whole response (`chat.completion`, `text_completion`).
    pub object: &'static str,
    /// `object` of a stream chunk (`chat.completion.chunk`, `text_completion`).
    pub chunk_object: &'static str,
    /// Stream chunks carry `"usage": null` until the last one, which carries only usage.
    pub include_usage: bool,
}

impl Envelope {
    fn wrap(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model.id,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    /// The non-streamed response.
    pub fn response(&self, choices: Vec<Value>, usage: Value) -> Value {
        let mut out = self.wrap(self.object, Value::Array(choices));
        out["usage"] = usage;
        out
    }

    /// A stream chunk holding one choice.
    pub fn chunk(&self, choice: Value) -> Value {
        let mut out = self.wrap(self.chunk_object, json!([choice]));
        if self.include_usage {
            out["usage"] = Value::Null;
        }
        out
    }

    /// The stream's last chunk when usage was asked for.
    pub fn usage_chunk(&self, usage: Value) -> Vec<Value> {
        if !self.include_usage {
            return Vec::new();
        }
        let mut out = self.wrap(self.chunk_object, json!([]));
        out["usage"] = usage;
        vec![out]
    }
}
