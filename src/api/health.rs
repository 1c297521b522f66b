//! `GET /health` (public: load balancers and container health checks) and `GET /metrics`.

use crate::api::AppState;
use actix_web::{web, HttpResponse};
use serde_json::json;

/// 200 once every configured model is loaded; 503 while loading or after a load failed.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
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

/// Prometheus text format.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.engine.metrics().render())
}
