//! Cross-cutting request handling: metrics and access log, CORS (both outermost, on every
//! request), and API keys (on the protected scope only).

use crate::api::error::ApiError;
use crate::api::AppState;
use actix_cors::Cors;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{Condition, Next};
use actix_web::{web, Error, ResponseError};
use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

/// Counts every response by route pattern and status, and logs it.
pub async fn track(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let endpoint = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = req.method().clone();
    let started = Instant::now();
    let result = next
        .call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body);
    let status = match &result {
        Ok(res) => res.status(),
        Err(e) => e.as_response_error().status_code(),
    };
    if let Some(state) = state {
        state
            .engine
            .metrics()
            .record_request(&endpoint, status.as_u16());
    }
    let ms = started.elapsed().as_millis() as u64;
    // Health checks and scrapes arrive every few seconds: keep them out of the default log.
    if endpoint == "/health" || endpoint == "/metrics" {
        tracing::debug!(%method, endpoint, status = status.as_u16(), ms, "request");
    } else {
        tracing::info!(%method, endpoint, status = status.as_u16(), ms, "request");
    }
    result
}

/// A handler that panics fails its own request with a 500 in the envelope; the worker thread
/// and every other connection on it go on. Innermost, so the 500 still passes through CORS and
/// the access log like any other answer.
pub async fn catch_panics(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let (method, path) = (req.method().clone(), req.path().to_string());
    match AssertUnwindSafe(next.call(req)).catch_unwind().await {
        Ok(result) => result.map(ServiceResponse::map_into_boxed_body),
        Err(panic) => {
            let what = crate::engine::panic_message(panic.as_ref());
            tracing::error!(%method, path, panic = what, "a request handler panicked");
            Err(ApiError::internal("the server failed while handling this request").into())
        }
    }
}

/// CORS (`actix-cors`), off unless `server.cors_origins` names origins; `*` allows any origin.
/// Preflight requests from an allowed origin are answered here; other responses get
/// `Access-Control-Allow-Origin` when the origin is allowed, and go out without it when it is
/// not (the browser then refuses them).
pub fn cors(origins: &[String]) -> Condition<Cors> {
    let cors = Cors::default()
        .allowed_methods(["GET", "POST", "DELETE", "OPTIONS"])
        .allow_any_header()
        .max_age(86_400);
    let cors = if origins.iter().any(|o| o == "*") {
        cors.allow_any_origin().send_wildcard()
    } else {
        // Origins compare without a trailing slash, as configured ones are often written.
        let allowed: Vec<String> = origins
            .iter()
            .map(|o| o.trim_end_matches('/').to_string())
            .collect();
        cors.allowed_origin_fn(move |origin, _| {
            origin
                .to_str()
                .is_ok_and(|origin| allowed.iter().any(|o| o == origin.trim_end_matches('/')))
        })
    };
    Condition::new(!origins.is_empty(), cors)
}

/// Bearer API keys, when keys are configured. This middleware wraps the one scope that holds
/// every protected route (and the unknown-path fallback), so actix runs it only after its
/// router matched that scope: it decides on the path the router decoded and matched, never on a
/// spelling of its own, and a route added to the scope is protected without a second list.
pub async fn require_key(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let authorized = match req.app_data::<web::Data<AppState>>() {
        Some(state) if state.keys.is_empty() => true,
        Some(state) => req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .is_some_and(|(_, key)| state.keys.matches(key.trim())),
        // No state: nothing can vouch for the request.
        None => false,
    };
    if authorized {
        next.call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body)
    } else {
        Ok(req.into_response(ApiError::unauthorized().error_response()))
    }
}
