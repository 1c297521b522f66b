//! `GET /health` (public: load balancers and container health checks) and `GET /metrics`.

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::engine::metrics::Exposition;
use actix_web::http::header;
use actix_web::{web, HttpResponse};
use serde_json::json;

/// 200 once every configured model is loaded and both the engine thread and the fine-tuning
/// runner are alive; 503 while loading, after a load failed, once either thread has died
/// (a restart is needed), and while the server shuts down.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    let stopped = if !state.engine.is_alive() {
        Some((
            "engine_stopped",
            "The inference engine has stopped; the server needs a restart.",
        ))
    } else if !state.fine_tuning.is_alive() {
        Some((
            "fine_tuning_stopped",
            "The fine-tuning runner has stopped; the server needs a restart.",
        ))
    } else if state.engine.is_shutting_down() {
        Some(("shutting_down", "The server is shutting down."))
    } else {
        None
    };
    if let Some((status, message)) = stopped {
        // The error envelope, with the health status beside it.
        let error = ApiError::unavailable(message);
        let mut body = error.body();
        body["status"] = json!(status);
        return HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", error.retry_after.unwrap_or(1).to_string()))
            .json(body);
    }
    let registry = state.engine.registry();
    if registry.base_models_ready() {
        return HttpResponse::Ok().json(json!({"status": "ok"}));
    }
    match registry.base_model_failure() {
        Some(error) => {
            HttpResponse::ServiceUnavailable().json(json!({"status": "failed", "error": error}))
        }
        None => HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(json!({"status": "loading"})),
    }
}

/// OpenMetrics text when the scraper's `Accept` prefers it (as Prometheus's does), the
/// Prometheus text format (0.0.4) otherwise.
pub async fn metrics(
    state: web::Data<AppState>,
    accept: Option<web::Header<header::Accept>>,
) -> HttpResponse {
    let format = accept
        .and_then(|accept| {
            accept.ranked().iter().find_map(|mime| {
                match (mime.type_().as_str(), mime.subtype().as_str()) {
                    ("application", "openmetrics-text") => Some(Exposition::OpenMetrics),
                    ("text", "plain" | "*") | ("*", "*") => Some(Exposition::Prometheus),
                    _ => None,
                }
            })
        })
        .unwrap_or(Exposition::Prometheus);
    HttpResponse::Ok()
        .content_type(format.content_type())
        .body(state.engine.metrics().render(format))
}
