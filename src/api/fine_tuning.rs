//! `/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume, events, checkpoints.
//!
//! Besides OpenAI's fields, a create request may carry rewind's own options in one extension
//! field, `rewind`: `{"scheme": "midpoint(a=-0.125)", "strategy": "reversible", "lora_rank": 8,
//! "lora_alpha": 16}` (all optional). The strategy defaults to `reversible` whenever the scheme
//! (the job's, else the served model's) is reversible, and to `checkpoint` otherwise.

use crate::api::error::ApiError;
use crate::api::extractors::Query;
use crate::api::files::{bad_request, file_not_found, internal};
use crate::api::off_worker;
use crate::api::validation::parse_body;
use crate::api::AppState;
use crate::engine::unix_now;
use crate::jobs::{FineTuning, StateError};
use crate::model::reversible::ReversibleConfig;
use crate::store::{CheckpointRecord, EventRecord, JobRecord, RewindOptions};
use crate::train::backward::Strategy;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

/// What both job APIs need to create a job, once their wire formats are read.
pub struct NewJob {
    pub id_prefix: &'static str,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    /// `n_epochs`, `batch_size`, `learning_rate_multiplier`, each optional.
    pub hyperparameters: Value,
    pub suffix: Option<String>,
    pub max_suffix: usize,
    pub seed: Option<i64>,
    pub metadata: Option<Value>,
    pub rewind: Option<RewindOptions>,
}

#[derive(Deserialize)]
struct CreateRequest {
    model: String,
    training_file: String,
    #[serde(default)]
    validation_file: Option<String>,
    #[serde(default)]
    hyperparameters: Option<Value>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    method: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    rewind: Option<RewindOptions>,
}

/// Checks one hyperparameter: absent or "auto" stays "auto"; a number must be in range.
fn hyperparameter(
    value: Option<&Value>,
    name: &str,
    integer: bool,
    min: f64,
    max: f64,
) -> Result<Value, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(json!("auto")),
        Some(Value::String(s)) if s == "auto" => Ok(json!("auto")),
        Some(v) => {
            let n = v
                .as_f64()
                .filter(|n| !integer || n.fract() == 0.0)
                .filter(|n| *n >= min && *n <= max && (min > 0.0 || *n > 0.0));
            match n {
                Some(n) if integer => Ok(json!(n as u64)),
                Some(n) => Ok(json!(n)),
                None => Err(bad_request(
                    format!(
                        "`{name}` must be \"auto\" or {} between {min} and {max}; got {v}.",
                        if integer { "an integer" } else { "a number" }
                    ),
                    Some(&format!("hyperparameters.{name}")),
                    "invalid_value",
                )),
            }
        }
    }
}

/// OpenAI's rule for `metadata`: at most 16 string values, keys of at most 64 characters and
/// values of at most 512.
fn check_metadata(metadata: &Value) -> Result<(), ApiError> {
    let invalid = |why: &str| {
        bad_request(
            format!("`metadata` {why}."),
            Some("metadata"),
            "invalid_value",
        )
    };
    match metadata {
        Value::Null => Ok(()),
        Value::Object(map) if map.len() > 16 => Err(invalid("has more than 16 keys")),
        Value::Object(map) => {
            for (key, value) in map {
                if key.chars().count() > 64 {
                    return Err(invalid("has a key longer than 64 characters"));
                }
                match value {
                    Value::String(v) if v.chars().count() <= 512 => {}
                    Value::String(_) => {
                        return Err(invalid("has a value longer than 512 characters"))
                    }
                    _ => return Err(invalid("values must be strings")),
                }
            }
            Ok(())
        }
        _ => Err(invalid("must be an object of strings")),
    }
}

/// Validates a new job's request against the served models and stored files and creates it.
pub async fn create_job(state: &AppState, new: NewJob) -> Result<JobRecord, ApiError> {
    if state.engine.registry().spec(&new.model).is_none() {
        return Err(ApiError::model_not_found(&new.model));
    }
    let store = &state.fine_tuning.store;
    for (param, id) in [
        ("training_file", Some(&new.training_file)),
        ("validation_file", new.validation_file.as_ref()),
    ] {
        let Some(id) = id else { continue };
        let file = store.file(id).map_err(internal)?.ok_or_else(|| {
            let mut e = file_not_found(id);
            e.param = Some(param.into());
            e
        })?;
        if file.purpose != "fine-tune" {
            return Err(bad_request(
                format!(
                    "File `{id}` has purpose `{}`; fine-tuning needs `fine-tune`.",
                    file.purpose
                ),
                Some(param),
                "invalid_value",
            ));
        }
    }
    let hp = &new.hyperparameters;
    let max = &state.settings.fine_tuning;
    let hyperparameters = json!({
        "n_epochs": hyperparameter(hp.get("n_epochs"), "n_epochs", true, 1.0, max.max_n_epochs as f64)?,
        "batch_size": hyperparameter(hp.get("batch_size"), "batch_size", true, 1.0, max.max_batch_size as f64)?,
        "learning_rate_multiplier": hyperparameter(hp.get("learning_rate_multiplier"), "learning_rate_multiplier", false, 0.0, max.max_learning_rate_multiplier)?,
    });
    if let Some(metadata) = &new.metadata {
        check_metadata(metadata)?;
    }
    if let Some(suffix) = &new.suffix {
        if suffix.chars().count() > new.max_suffix || suffix.contains(':') {
            return Err(bad_request(
                format!(
                    "`suffix` must be at most {} characters, without `:`.",
                    new.max_suffix
                ),
                Some("suffix"),
                "invalid_value",
            ));
        }
    }
    let seed = match new.seed {
        None => rand::random::<u32>() as u64 & 0x7fff_ffff,
        Some(s) if (0..=2_147_483_647).contains(&s) => s as u64,
        Some(_) => {
            return Err(bad_request(
                "`seed` must be between 0 and 2147483647.",
                Some("seed"),
                "invalid_value",
            ))
        }
    };
    let rewind = new.rewind.unwrap_or_default();
    if let Some(rank) = rewind.lora_rank {
        if rank > max.max_lora_rank {
            return Err(bad_request(
                format!(
                    "`rewind.lora_rank` must be between 0 and {} (fine_tuning.max_lora_rank); got {rank}.",
                    max.max_lora_rank
                ),
                Some("rewind.lora_rank"),
                "invalid_value",
            ));
        }
    }
    if let Some(alpha) = rewind.lora_alpha {
        if !(alpha.is_finite() && alpha > 0.0 && alpha <= 1e6) {
            return Err(bad_request(
                format!("`rewind.lora_alpha` must be a number in (0, 1e6]; got {alpha}."),
                Some("rewind.lora_alpha"),
                "invalid_value",
            ));
        }
    }
    if let Some(scheme) = &rewind.scheme {
        // Checked as the trainer's loader will check it, and more: a blend that is not finite
        // (`midpoint(a=1e309)`, `a=NaN`) would train to NaN rather than fail.
        ReversibleConfig::parse(scheme)
            .and_then(|config| {
                // A parsed scheme's blend is one constant, so one layer stands for all.
                config.validate(1)?;
                anyhow::ensure!(
                    config.blend(0).is_finite(),
                    "the blend `a` must be a finite number"
                );
                Ok(config)
            })
            .map_err(|e| {
                bad_request(
                    format!("`rewind.scheme`: {e:#}"),
                    Some("rewind.scheme"),
                    "invalid_value",
                )
            })?;
    }
    if let Some(strategy) = &rewind.strategy {
        serde_json::from_value::<Strategy>(json!(strategy)).map_err(|_| {
            bad_request(
                format!(
                    "`rewind.strategy` must be reversible, checkpoint or store; got `{strategy}`."
                ),
                Some("rewind.strategy"),
                "invalid_value",
            )
        })?;
    }
    let now = unix_now();
    let job = JobRecord {
        id: crate::store::new_id(new.id_prefix),
        created_at: now,
        updated_at: now,
        model: new.model,
        training_file: new.training_file,
        validation_file: new.validation_file,
        status: "validating_files".into(),
        fine_tuned_model: None,
        finished_at: None,
        error: None,
        hyperparameters,
        result_files: Vec::new(),
        trained_tokens: None,
        seed,
        suffix: new.suffix,
        metadata: new.metadata,
        rewind,
        legacy: new.id_prefix == "ft-",
        attempts: 0,
    };
    let service = state.fine_tuning.clone();
    off_worker(move || service.create(job).map_err(internal)).await
}

/// OpenAI's `FineTuningJob` object.
pub fn job_object(j: &JobRecord) -> Value {
    json!({
        "object": "fine_tuning.job", "id": j.id, "model": j.model, "created_at": j.created_at, "finished_at": j.finished_at,
        "fine_tuned_model": j.fine_tuned_model, "organization_id": "org-rewind", "result_files": j.result_files,
        "status": j.status, "validation_file": j.validation_file, "training_file": j.training_file,
        "hyperparameters": j.hyperparameters, "trained_tokens": j.trained_tokens, "integrations": [], "seed": j.seed,
        "estimated_finish": null, "user_provided_suffix": j.suffix, "metadata": j.metadata,
        "method": {"type": "supervised", "supervised": {"hyperparameters": j.hyperparameters}},
        "error": j.error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "param": e.param})),
        "rewind": j.rewind,
    })
}

fn event_object(e: &EventRecord) -> Value {
    json!({"object": "fine_tuning.job.event", "id": e.id, "created_at": e.created_at, "level": e.level, "message": e.message, "type": e.kind, "data": e.data})
}

fn checkpoint_object(c: &CheckpointRecord) -> Value {
    json!({
        "object": "fine_tuning.job.checkpoint", "id": c.id, "created_at": c.created_at, "fine_tuning_job_id": c.job_id,
        "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint, "step_number": c.step_number, "metrics": c.metrics,
    })
}

pub fn job_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No fine-tuning job `{id}`."))
}

pub fn find_job(state: &AppState, id: &str) -> Result<JobRecord, ApiError> {
    state
        .fine_tuning
        .store
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| job_not_found(id))
}

pub async fn cancel_job(state: &AppState, id: &str) -> Result<JobRecord, ApiError> {
    change_job(state, id, FineTuning::cancel).await
}

/// A pause, resume or cancel, off the HTTP workers: each commits a durable transaction.
async fn change_job(
    state: &AppState,
    id: &str,
    change: fn(&FineTuning, &str) -> std::result::Result<JobRecord, StateError>,
) -> Result<JobRecord, ApiError> {
    let (service, id) = (state.fine_tuning.clone(), id.to_string());
    off_worker(move || state_change(change(&service, &id), &id)).await
}

/// A pause, resume or cancel's result in the API's terms: 404 for an unknown job, 400 for a
/// job whose status does not allow it.
fn state_change(
    result: std::result::Result<JobRecord, StateError>,
    id: &str,
) -> Result<JobRecord, ApiError> {
    result.map_err(|e| match e {
        StateError::NotFound(id) => job_not_found(&id),
        StateError::WrongState { .. } => {
            bad_request(format!("Job `{id}`: {e}."), None, "invalid_state")
        }
        StateError::Store(e) => internal(e),
    })
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = crate::api::read_body(&state, &req, payload).await?;
    let request: CreateRequest = off_worker(move || Ok(parse_body(&body)?)).await?;
    // `method` supersedes the deprecated top-level `hyperparameters`.
    let mut hyperparameters = request.hyperparameters.unwrap_or_else(|| json!({}));
    if let Some(method) = &request.method {
        match method.get("type").and_then(Value::as_str) {
            Some("supervised") => {
                if let Some(hp) = method.pointer("/supervised/hyperparameters") {
                    hyperparameters = hp.clone();
                }
            }
            other => {
                return Err(bad_request(
                    format!(
                        "`method.type` {}: only `supervised` fine-tuning is supported.",
                        other
                            .map(|t| format!("`{t}`"))
                            .unwrap_or("is missing".into())
                    ),
                    Some("method.type"),
                    "invalid_value",
                ))
            }
        }
    }
    if !hyperparameters.is_object() {
        return Err(bad_request(
            "`hyperparameters` must be an object.",
            Some("hyperparameters"),
            "invalid_value",
        ));
    }
    let job = create_job(
        &state,
        NewJob {
            id_prefix: "ftjob-",
            model: request.model,
            training_file: request.training_file,
            validation_file: request.validation_file,
            hyperparameters,
            suffix: request.suffix,
            max_suffix: 64,
            seed: request.seed,
            metadata: request.metadata,
            rewind: request.rewind,
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(job_object(&job)))
}

#[derive(Deserialize)]
pub struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

fn limit(query: &PageQuery, default: usize) -> Result<usize, ApiError> {
    match query.limit {
        None => Ok(default),
        Some(n) if (1..=10_000).contains(&n) => Ok(n),
        Some(_) => Err(bad_request(
            "`limit` must be between 1 and 10000.",
            Some("limit"),
            "invalid_value",
        )),
    }
}

pub async fn list(
    state: web::Data<AppState>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let page = state
        .fine_tuning
        .store
        .list_jobs(query.after.as_deref(), limit(&query, 20)?)
        .map_err(internal)?;
    let data: Vec<Value> = page.data.iter().map(job_object).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": page.has_more})))
}

pub async fn retrieve(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(job_object(&find_job(&state, &id)?)))
}

pub async fn cancel(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(job_object(&cancel_job(&state, &id).await?)))
}

pub async fn pause(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job = change_job(&state, &id, FineTuning::pause).await?;
    Ok(HttpResponse::Ok().json(job_object(&job)))
}

pub async fn resume(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let job = change_job(&state, &id, FineTuning::resume).await?;
    Ok(HttpResponse::Ok().json(job_object(&job)))
}

pub async fn events(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    find_job(&state, &id)?;
    let page = state
        .fine_tuning
        .store
        .list_events(&id, query.after.as_deref(), limit(&query, 20)?)
        .map_err(internal)?;
    let data: Vec<Value> = page.data.iter().map(event_object).collect();
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": data, "has_more": page.has_more})))
}

pub async fn checkpoints(
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    find_job(&state, &id)?;
    let page = state
        .fine_tuning
        .store
        .list_checkpoints(&id, query.after.as_deref(), limit(&query, 10)?)
        .map_err(internal)?;
    let data: Vec<Value> = page.data.iter().map(checkpoint_object).collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list", "data": data, "has_more": page.has_more,
        "first_id": page.data.first().map(|c| c.id.clone()), "last_id": page.data.last().map(|c| c.id.clone()),
    })))
}
