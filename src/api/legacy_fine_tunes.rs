//! The deprecated fine-tunes API (`/v1/fine-tunes`, also at `/fine_tunes`): create, list,
//! retrieve, cancel and events (`?stream=true` streams them as SSE until the job finishes, then
//! `data: [DONE]`). These are views of the same job store as `/v1/fine_tuning/jobs`: a job
//! created here is visible there and the other way round.
//!
//! Mapping: status `validating_files`/`queued` -> `pending`; `hyperparameters` -> `hyperparams`
//! (`prompt_loss_weight` is echoed but not used: prompts never carry loss); file ids -> file
//! objects. `model` defaults to the first served model.

use crate::api::error::ApiError;
use crate::api::extractors::Query;
use crate::api::files::{file_object, internal};
use crate::api::fine_tuning::{cancel_job, create_job, find_job, NewJob};
use crate::api::validation::parse_body;
use crate::api::AppState;
use crate::store::{EventRecord, JobRecord, RewindOptions};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

#[derive(Deserialize)]
struct CreateRequest {
    training_file: String,
    #[serde(default)]
    validation_file: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n_epochs: Option<Value>,
    #[serde(default)]
    batch_size: Option<Value>,
    #[serde(default)]
    learning_rate_multiplier: Option<Value>,
    #[serde(default)]
    hyperparameters: Option<Value>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    rewind: Option<RewindOptions>,
}

fn event_object(e: &EventRecord) -> Value {
    json!({"object": "fine-tune-event", "created_at": e.created_at, "level": e.level, "message": e.message})
}

fn fine_tune_object(state: &AppState, j: &JobRecord, with_events: bool) -> Result<Value, ApiError> {
    let store = &state.fine_tuning.store;
    let files = |ids: &mut dyn Iterator<Item = &String>| -> Result<Vec<Value>, ApiError> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(f) = store.file(id).map_err(internal)? {
                out.push(file_object(&f));
            }
        }
        Ok(out)
    };
    let status = match j.status.as_str() {
        "validating_files" | "queued" => "pending",
        other => other,
    };
    let hp = &j.hyperparameters;
    let mut object = json!({
        "object": "fine-tune", "id": j.id, "created_at": j.created_at, "updated_at": j.updated_at, "model": j.model,
        "fine_tuned_model": j.fine_tuned_model, "organization_id": "org-rewind", "status": status,
        "hyperparams": {"n_epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
                        "learning_rate_multiplier": hp["learning_rate_multiplier"], "prompt_loss_weight": 0.01},
        "training_files": files(&mut std::iter::once(&j.training_file))?,
        "validation_files": files(&mut j.validation_file.iter())?,
        "result_files": files(&mut j.result_files.iter())?,
    });
    if with_events {
        let events = store.events_since(&j.id, 0).map_err(internal)?;
        object["events"] = events.iter().map(event_object).collect();
    }
    Ok(object)
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = crate::api::read_body(&state, &req, payload).await?;
    let request: CreateRequest = crate::api::off_worker(move || Ok(parse_body(&body)?)).await?;
    let mut hyperparameters = request.hyperparameters.unwrap_or_else(|| json!({}));
    // As in the current API: a `hyperparameters` that is not an object would otherwise drop the
    // top-level `n_epochs`, `batch_size` and `learning_rate_multiplier` unchecked.
    if !hyperparameters.is_object() {
        return Err(crate::api::files::bad_request(
            "`hyperparameters` must be an object.",
            Some("hyperparameters"),
            "invalid_value",
        ));
    }
    for (key, value) in [
        ("n_epochs", request.n_epochs),
        ("batch_size", request.batch_size),
        ("learning_rate_multiplier", request.learning_rate_multiplier),
    ] {
        if let (Some(v), Some(map)) = (value, hyperparameters.as_object_mut()) {
            map.insert(key.into(), v);
        }
    }
    let model = match request.model {
        Some(m) => m,
        None => state
            .settings
            .served_models()
            .first()
            .map(|m| m.served_id())
            .unwrap_or_default(),
    };
    let job = create_job(
        &state,
        NewJob {
            id_prefix: "ft-",
            model,
            training_file: request.training_file,
            validation_file: request.validation_file,
            hyperparameters,
            suffix: request.suffix,
            max_suffix: 40,
            seed: None,
            metadata: None,
            rewind: request.rewind,
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(fine_tune_object(&state, &job, true)?))
}

pub async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let page = state
        .fine_tuning
        .store
        .list_jobs(None, crate::store::ALL)
        .map_err(internal)?;
    let data = page
        .data
        .iter()
        .map(|j| fine_tune_object(&state, j, false))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})))
}

pub async fn retrieve(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job = find_job(&state, &id)?;
    Ok(HttpResponse::Ok().json(fine_tune_object(&state, &job, true)?))
}

pub async fn cancel(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job = cancel_job(&state, &id).await?;
    Ok(HttpResponse::Ok().json(fine_tune_object(&state, &job, true)?))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    stream: Option<String>,
}

/// How often a streamed event list looks for new events.
const POLL: Duration = Duration::from_millis(250);

pub async fn events(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    find_job(&state, &id)?;
    let store = state.fine_tuning.store.clone();
    if !matches!(query.stream.as_deref(), Some("true" | "1" | "True")) {
        let events = store.events_since(&id, 0).map_err(internal)?;
        let data: Vec<Value> = events.iter().map(event_object).collect();
        return Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data})));
    }
    // (sent so far, finished): every poll sends the events recorded since, and the stream ends
    // once the job is terminal and its last events have gone out.
    let id = id.into_inner();
    let stream = futures_util::stream::unfold(
        (store, id, 0usize, false, true),
        |(store, id, sent, done, first)| async move {
            if done {
                return None;
            }
            if !first {
                actix_web::rt::time::sleep(POLL).await;
            }
            let result = (|| -> anyhow::Result<(String, usize, bool)> {
                // Read the status first: events written after it are caught by the next poll.
                let terminal = store.job(&id)?.is_none_or(|j| j.is_terminal());
                let events = store.events_since(&id, sent)?;
                let mut chunk = String::new();
                for e in &events {
                    chunk.push_str(&format!("data: {}\n\n", event_object(e)));
                }
                if terminal {
                    chunk.push_str("data: [DONE]\n\n");
                }
                Ok((chunk, sent + events.len(), terminal))
            })();
            let (chunk, sent, done) = match result {
                Ok(r) => r,
                Err(e) => (
                    format!("data: {}\n\n", ApiError::internal(format!("{e:#}")).body()),
                    sent,
                    true,
                ),
            };
            Some((
                Ok::<_, actix_web::Error>(web::Bytes::from(chunk)),
                (store, id, sent, done, false),
            ))
        },
    );
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream))
}
