//! The OpenAI-compatible HTTP API (actix-web): one file per resource, one route table
//! ([`routes`]), one error mapping ([`error::ApiError`]), and the server's start-up ([`start`]).
//! Handlers are thin: parse and validate at the edge, hand a typed request to the
//! [`Engine`], and shape what comes back.

pub mod chat;
pub mod completions;
pub mod error;
pub mod files;
pub mod fine_tuning;
pub mod health;
pub mod legacy_fine_tunes;
pub mod middleware;
pub mod models;
pub mod stream;
pub mod tools;
pub mod validation;

use crate::api::error::ApiError;
use crate::engine::Engine;
use crate::settings::Settings;
use actix_web::http::header;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

/// Accepted API keys, kept as SHA-256 digests and compared in constant time: the comparison
/// takes as long whichever key (if any) matches and wherever a wrong key differs, and hashing
/// first means neither the keys' contents nor their lengths shape the timing.
#[derive(Default)]
pub struct ApiKeys(Vec<[u8; 32]>);

impl ApiKeys {
    pub fn new(keys: &[String]) -> Self {
        Self(
            keys.iter()
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut any = 0u8;
        for key in &self.0 {
            let diff = key
                .iter()
                .zip(&digest)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            // 1 when equal, 0 otherwise, without branching on the bytes.
            any |= ((diff as u16).wrapping_sub(1) >> 8) as u8 & 1;
        }
        std::hint::black_box(any) == 1
    }
}

pub struct AppState {
    pub engine: Engine,
    pub settings: Arc<Settings>,
    pub keys: ApiKeys,
    /// Files, fine-tuning jobs and their runner.
    pub fine_tuning: Arc<crate::jobs::FineTuning>,
}

/// Reads a request body, refusing (413) one larger than `limits.max_body_bytes`: up front when
/// `Content-Length` says so, otherwise as soon as the stream passes the limit.
pub async fn read_body(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<web::Bytes, ApiError> {
    let limit = state.settings.limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::body_too_large(limit));
    }
    match payload.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(ApiError::internal(format!("reading the request body: {e}"))),
        Err(_) => Err(ApiError::body_too_large(limit)),
    }
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found(format!(
        "Unknown path `{} {}`.",
        req.method(),
        req.path()
    )))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::method_not_allowed())
}

/// The route table.
pub fn routes(cfg: &mut web::ServiceConfig) {
    let resource =
        |path: &str| web::resource(path.to_string()).default_service(web::to(method_not_allowed));
    cfg.service(resource("/health").route(web::get().to(health::health)))
        .service(resource("/metrics").route(web::get().to(health::metrics)))
        .service(resource("/v1/chat/completions").route(web::post().to(chat::create)))
        .service(resource("/v1/completions").route(web::post().to(completions::create)))
        .service(resource("/v1/models").route(web::get().to(models::list)))
        .service(
            // Model ids may contain `/` (`org/name`) and `:` (`ft:...`).
            resource("/v1/models/{model:.+}")
                .route(web::get().to(models::retrieve))
                .route(web::delete().to(models::delete)),
        )
        .service(
            resource("/v1/files")
                .route(web::get().to(files::list))
                .route(web::post().to(files::create)),
        )
        .service(
            resource("/v1/files/{id}")
                .route(web::get().to(files::retrieve))
                .route(web::delete().to(files::delete)),
        )
        .service(resource("/v1/files/{id}/content").route(web::get().to(files::content)))
        .service(
            resource("/v1/fine_tuning/jobs")
                .route(web::get().to(fine_tuning::list))
                .route(web::post().to(fine_tuning::create)),
        )
        .service(resource("/v1/fine_tuning/jobs/{id}").route(web::get().to(fine_tuning::retrieve)))
        .service(
            resource("/v1/fine_tuning/jobs/{id}/cancel").route(web::post().to(fine_tuning::cancel)),
        )
        .service(
            resource("/v1/fine_tuning/jobs/{id}/pause").route(web::post().to(fine_tuning::pause)),
        )
        .service(
            resource("/v1/fine_tuning/jobs/{id}/resume").route(web::post().to(fine_tuning::resume)),
        )
        .service(
            resource("/v1/fine_tuning/jobs/{id}/events").route(web::get().to(fine_tuning::events)),
        )
        .service(
            resource("/v1/fine_tuning/jobs/{id}/checkpoints")
                .route(web::get().to(fine_tuning::checkpoints)),
        );
    // The deprecated fine-tunes API, at its `/v1` path and at the bare path older clients used.
    for prefix in ["/v1/fine-tunes", "/fine_tunes"] {
        cfg.service(
            resource(prefix)
                .route(web::get().to(legacy_fine_tunes::list))
                .route(web::post().to(legacy_fine_tunes::create)),
        )
        .service(
            resource(&format!("{prefix}/{{id}}")).route(web::get().to(legacy_fine_tunes::retrieve)),
        )
        .service(
            resource(&format!("{prefix}/{{id}}/cancel"))
                .route(web::post().to(legacy_fine_tunes::cancel)),
        )
        .service(
            resource(&format!("{prefix}/{{id}}/events"))
                .route(web::get().to(legacy_fine_tunes::events)),
        );
    }
}

/// A server running on its own thread.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub engine: Engine,
    handle: actix_web::dev::ServerHandle,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Blocks until the server stops (a signal, or [`RunningServer::stop`]).
    pub fn wait(self) -> Result<()> {
        match self.thread.join() {
            Ok(result) => result.context("the HTTP server failed"),
            Err(_) => anyhow::bail!("the HTTP server thread panicked"),
        }
    }

    /// Asks the server to stop; in-flight requests get a few seconds to finish.
    pub fn stop(&self) {
        let handle = self.handle.clone();
        std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(true)));
    }
}

/// Starts the engine (which loads the models in the background) and the HTTP server. Returns
/// once the port is bound; `/health` answers 503 until the models are loaded.
pub fn start(settings: Settings) -> Result<RunningServer> {
    let engine = Engine::start(&settings)?;
    let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))
        .with_context(|| format!("binding {}:{}", settings.server.host, settings.server.port))?;
    let addr = listener.local_addr()?;
    let workers = match settings.server.workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    };
    let keys = ApiKeys::new(&settings.server.api_keys);
    let settings = Arc::new(settings);
    let fine_tuning = crate::jobs::FineTuning::start(settings.clone(), engine.clone())?;
    let state = web::Data::new(AppState {
        engine: engine.clone(),
        settings,
        keys,
        fine_tuning,
    });
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("rewind-http".into())
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(state.clone())
                        .wrap(from_fn(middleware::auth))
                        .wrap(from_fn(middleware::cors))
                        .wrap(from_fn(middleware::track))
                        .configure(routes)
                        .default_service(web::to(not_found))
                })
                .workers(workers)
                // A client that closes its connection has given up on the response: abort its
                // handler (dropping the engine's channel cancels the request and frees its batch
                // slot) instead of generating into a half-closed socket.
                .h1_allow_half_closed(false)
                .shutdown_timeout(5)
                .listen(listener)?
                .run();
                let _ = handle_tx.send(server.handle());
                server.await
            })
        })?;
    let handle = match handle_rx.recv() {
        Ok(handle) => handle,
        Err(_) => {
            return Err(match thread.join() {
                Ok(Err(e)) => anyhow::Error::new(e).context("starting the HTTP server"),
                _ => anyhow::anyhow!("the HTTP server failed to start"),
            })
        }
    };
    tracing::info!("listening on http://{addr}");
    Ok(RunningServer {
        addr,
        engine,
        handle,
        thread,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::new(&["sk-one".into(), "sk-two".into()]);
        assert!(keys.matches("sk-one") && keys.matches("sk-two"));
        assert!(!keys.matches("sk-on") && !keys.matches("sk-one ") && !keys.matches(""));
        assert!(ApiKeys::new(&[]).is_empty());
    }
}
