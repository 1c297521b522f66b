//! The OpenAI-compatible HTTP API (actix-web): one file per resource, one route table
//! ([`routes`]), one error mapping ([`error::ApiError`]), and the server's start-up ([`start`]).
//! Handlers are thin: parse and validate at the edge, hand a typed request to the
//! [`Engine`], and shape what comes back.

pub mod chat;
pub mod completions;
pub mod error;
pub mod extractors;
pub mod files;
pub mod fine_tuning;
pub mod health;
pub mod legacy_fine_tunes;
pub mod middleware;
pub mod models;
pub mod stream;
pub mod structured_outputs;
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
use std::sync::{Arc, Weak};
use std::time::Duration;

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

/// Reads a request body of at most `limits.max_body_bytes`: see [`read_body_within`].
pub async fn read_body(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<web::Bytes, ApiError> {
    read_body_within(state, req, payload, state.settings.limits.max_body_bytes).await
}

/// Reads a request body, refusing (413) one larger than `limit` bytes: up front when
/// `Content-Length` says so, otherwise as soon as the stream passes the limit. A client whose
/// body stalls (no byte for `limits.body_timeout_secs`) gets 408, so a trickling body does not
/// hold a connection and its buffer forever, while a large upload on a slow link still arrives.
pub async fn read_body_within(
    state: &AppState,
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    use futures_util::StreamExt;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(ApiError::body_too_large(limit));
    }
    let idle = std::time::Duration::from_secs(state.settings.limits.body_timeout_secs);
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
    loop {
        match actix_web::rt::time::timeout(idle, payload.next()).await {
            Err(_) => return Err(ApiError::body_timeout(idle.as_secs())),
            Ok(None) => return Ok(body.freeze()),
            Ok(Some(Err(e))) => {
                return Err(ApiError::invalid_body(format!(
                    "The request body could not be read: {e}."
                )))
            }
            Ok(Some(Ok(chunk))) => {
                if body.len() + chunk.len() > limit {
                    return Err(ApiError::body_too_large(limit));
                }
                body.extend_from_slice(&chunk);
            }
        }
    }
}

/// Runs CPU-bound request work (parsing a body of megabytes, rendering and tokenising a prompt)
/// on the blocking pool, so the async workers stay free to answer `/health` and other
/// clients; a panic in it fails this request with a 500.
pub async fn off_worker<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(work)
        .await
        .map_err(|_| ApiError::internal("the request failed while it was being prepared"))?
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

/// The route table. Only `/health` (and `/metrics` with `server.public_metrics`) answer without
/// a key; every other route, and the fallback for unknown paths, sits in one scope behind
/// [`middleware::require_key`]: deny by default, whatever the path's spelling.
pub fn routes(public_metrics: bool) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |cfg| {
        cfg.service(resource("/health").route(web::get().to(health::health)));
        if public_metrics {
            cfg.service(metrics());
        }
        cfg.service(
            web::scope("")
                .wrap(from_fn(middleware::require_key))
                .configure(move |cfg| protected_routes(cfg, !public_metrics))
                .default_service(web::to(not_found)),
        );
    }
}

/// A route whose other methods answer 405 in the error envelope.
fn resource(path: &str) -> actix_web::Resource {
    web::resource(path.to_string()).default_service(web::to(method_not_allowed))
}

fn metrics() -> actix_web::Resource {
    resource("/metrics").route(web::get().to(health::metrics))
}

fn protected_routes(cfg: &mut web::ServiceConfig, with_metrics: bool) {
    if with_metrics {
        cfg.service(metrics());
    }
    cfg.service(resource("/v1/chat/completions").route(web::post().to(chat::create)))
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
    /// Not kept alive by this handle: the service holds the data directory's lock.
    fine_tuning: Weak<crate::jobs::FineTuning>,
    handle: actix_web::dev::ServerHandle,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

/// How long a stopping server waits, from the stop, for the running fine-tuning job to reach the
/// end of its step and save its state. A job still training then resumes from its last
/// checkpoint instead, as after a crash; either way the process exits within about this long.
const JOB_STOP_GRACE: Duration = Duration::from_secs(8);

impl RunningServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Blocks until the server stops (SIGTERM, SIGINT or [`RunningServer::stop`]), then for the
    /// running fine-tuning job to save its state (at most [`JOB_STOP_GRACE`] from the stop).
    pub fn wait(self) -> Result<()> {
        let result = match self.thread.join() {
            Ok(result) => result.context("the HTTP server failed"),
            Err(_) => Err(anyhow::anyhow!("the HTTP server thread panicked")),
        };
        if let Some(fine_tuning) = self.fine_tuning.upgrade() {
            if fine_tuning.is_shutting_down() && !fine_tuning.wait_for_runner(JOB_STOP_GRACE) {
                tracing::warn!(
                    "the fine-tuning job did not reach the end of its step in time; it resumes from its last checkpoint"
                );
                if let Err(e) = fine_tuning.forgive_interrupted_attempts() {
                    tracing::warn!("recording the interrupted job's attempt: {e:#}");
                }
            }
        }
        result
    }

    /// Stops the server: queued and running requests end with a 503 (streams with a final
    /// error event), the running fine-tuning job stops at the end of its step with its state
    /// saved, and the HTTP server closes (in-flight responses get a few seconds to finish).
    pub fn stop(&self) {
        begin_shutdown(&self.engine, &self.fine_tuning);
        let handle = self.handle.clone();
        std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(true)));
    }
}

fn begin_shutdown(engine: &Engine, fine_tuning: &Weak<crate::jobs::FineTuning>) {
    engine.shutdown();
    if let Some(fine_tuning) = fine_tuning.upgrade() {
        fine_tuning.shutdown();
    }
}

/// Stops the server on SIGTERM or SIGINT as [`RunningServer::stop`] does; a second signal
/// while it stops exits at once. (actix's own signal handling is off: it would leave the engine
/// and the runner unaware, and on SIGINT cut the streams in flight without a final event.)
async fn stop_on_signal(
    handle: actix_web::dev::ServerHandle,
    engine: Engine,
    fine_tuning: Weak<crate::jobs::FineTuning>,
) {
    let Some(name) = next_signal().await else {
        return;
    };
    tracing::info!("{name}: stopping (requests end, the running fine-tuning job saves its state)");
    begin_shutdown(&engine, &fine_tuning);
    tokio::select! {
        _ = handle.stop(true) => {}
        Some(again) = next_signal() => {
            tracing::warn!("{again} again: exiting now (a running job resumes from its last checkpoint)");
            std::process::exit(130);
        }
    }
}

/// The next SIGTERM or SIGINT (Ctrl-C elsewhere); None when they cannot be listened for.
#[cfg(unix)]
async fn next_signal() -> Option<&'static str> {
    use actix_web::rt::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => Some(tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("cannot listen for SIGTERM and SIGINT: {e}");
            None
        }
    }
}

#[cfg(not(unix))]
async fn next_signal() -> Option<&'static str> {
    actix_web::rt::signal::ctrl_c().await.ok().map(|_| "Ctrl-C")
}

/// Starts the engine (which loads the models in the background) and the HTTP server. Returns
/// once the port is bound; `/health` answers 503 until the models are loaded. Fails at once when
/// another process holds the data directory; the lock on it is released when the server's state
/// is dropped after a stop (a restart in the same process waits for that).
pub fn start(settings: Settings) -> Result<RunningServer> {
    // First of all: the data directory is this server's alone (another process on it fails here,
    // before anything is read or written), and what a crash interrupted there is repaired.
    let data_dir = crate::store::open_data_dir(&settings.data_dir)?;
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
    let public_metrics = settings.server.public_metrics;
    let settings = Arc::new(settings);
    let fine_tuning = crate::jobs::FineTuning::start(settings.clone(), engine.clone(), data_dir)?;
    let runner = Arc::downgrade(&fine_tuning);
    let on_signal = (engine.clone(), runner.clone());
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
                    let cors = middleware::cors(&state.settings.server.cors_origins);
                    App::new()
                        .app_data(state.clone())
                        .app_data(extractors::path_config())
                        .wrap(from_fn(middleware::catch_panics))
                        .wrap(cors)
                        .wrap(from_fn(middleware::track))
                        .configure(routes(public_metrics))
                })
                .workers(workers)
                // A client that closes its connection has given up on the response: abort its
                // handler (dropping the engine's channel cancels the request and frees its batch
                // slot) instead of generating into a half-closed socket.
                .h1_allow_half_closed(false)
                .shutdown_timeout(5)
                .disable_signals()
                .listen(listener)?
                .run();
                let _ = handle_tx.send(server.handle());
                actix_web::rt::spawn(stop_on_signal(server.handle(), on_signal.0, on_signal.1));
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
        fine_tuning: runner,
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
