//! `GET /v1/models`, `GET /v1/models/{id}`, `DELETE /v1/models/{id}`.

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::engine::registry::ModelSpec;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

/// OpenAI's `Model` object.
fn card(spec: &ModelSpec) -> Value {
    json!({"id": spec.id, "object": "model", "created": spec.created, "owned_by": spec.owned_by})
}

fn find_model(state: &AppState, id: &str) -> Result<ModelSpec, ApiError> {
    state
        .engine
        .registry()
        .spec(id)
        .ok_or_else(|| ApiError::model_not_found(id))
}

pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let data: Vec<Value> = state.engine.registry().specs().iter().map(card).collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

pub async fn retrieve(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let spec = find_model(&state, &id)?;
    Ok(HttpResponse::Ok().json(card(&spec)))
}

/// Only fine-tuned models can be deleted; the base models come from the configuration.
pub async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let spec = find_model(&state, &id)?;
    if !spec.is_fine_tuned() {
        return Err(ApiError::forbidden(format!(
            "The model `{id}` is a base model served from the configuration; only fine-tuned (`ft:`) models can be deleted."
        )));
    }
    // Removing a model directory and syncing the registry is disk work: off the HTTP workers.
    let (service, model) = (state.fine_tuning.clone(), id.into_inner());
    crate::api::off_worker(move || {
        service
            .delete_model(&model)
            .map_err(|e| ApiError::internal(format!("{e:#}")))
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({"id": spec.id, "object": "model", "deleted": true})))
}
