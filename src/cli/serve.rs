//! `rewind serve`: the OpenAI-compatible server.

use crate::model::loader::WeightFormat;
use crate::settings::{Overrides, Settings};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Configuration file (default: ./config.toml when it exists, else built-in defaults).
    #[arg(long, env = "REWIND_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides `server.host`).
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one (overrides `server.port`).
    #[arg(long)]
    pub port: Option<u16>,
    /// Serve only this model: a known name, a .gguf file or a model directory (overrides `models`).
    #[arg(long)]
    pub model: Option<String>,
    /// How the served models' weights are held in memory.
    #[arg(long, value_enum)]
    pub format: Option<WeightFormat>,
    /// Run the served models with this reversible coupling scheme.
    #[arg(long)]
    pub scheme: Option<String>,
    /// Directory for the server's state (overrides `data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let config = args.config.clone().or_else(|| {
        let default = PathBuf::from("config.toml");
        default.is_file().then_some(default)
    });
    let overrides = Overrides {
        host: args.host,
        port: args.port,
        model: args.model,
        format: args.format,
        scheme: args.scheme,
        data_dir: args.data_dir,
    };
    let settings = Settings::load(config.as_deref(), &overrides)?;
    if let Some(path) = &config {
        tracing::info!(config = %path.display(), "configuration read");
    }
    let models: Vec<String> = settings
        .served_models()
        .iter()
        .map(|m| m.served_id())
        .collect();
    tracing::info!(models = ?models, auth = !settings.server.api_keys.is_empty(), "starting");
    let server = crate::api::start(settings)?;
    // Serving a model that cannot load is a configuration error: fail instead of answering 503
    // forever.
    loop {
        let registry = server.engine.registry();
        if registry.base_models_ready() {
            tracing::info!(url = %server.url(), "ready");
            break;
        }
        if server.engine.is_shutting_down() {
            break; // stopped (SIGTERM, SIGINT) before the models were loaded
        }
        if let Some(error) = registry.base_model_failure() {
            server.stop();
            let _ = server.wait();
            bail!("could not load {error}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    server.wait()
}
