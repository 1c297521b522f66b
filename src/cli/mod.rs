//! Command implementations behind `main.rs`; each file is one command family.

pub mod bench;
pub mod convert;
pub mod generate;
pub mod progress;
pub mod pull;
pub mod serve;
pub mod train;

use crate::model::loader::{self, LoadOptions, LoadedModel, WeightFormat};
use crate::model::reversible::ReversibleConfig;
use anyhow::Result;

/// Logs go to stderr through `tracing`; `RUST_LOG` filters (default: info).
pub fn init_tracing() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Options shared by every command that loads a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, a model directory, or a known model name (fetched if absent).
    #[arg(long)]
    pub model: Option<String>,
    /// How weights are held in memory.
    #[arg(long, value_enum, default_value = "f32")]
    pub format: WeightFormat,
    /// Run with this coupling scheme instead of the model's own (e.g. `midpoint(a=-0.125)`).
    #[arg(long)]
    pub scheme: Option<String>,
    /// Run on the GPU (requires a build with `--features cuda`).
    #[arg(long)]
    pub cuda: bool,
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel> {
        let path = crate::provision::resolve(self.model.as_deref())?;
        let reversible = self
            .scheme
            .as_deref()
            .map(ReversibleConfig::parse)
            .transpose()?;
        let device = if self.cuda {
            candle_core::Device::new_cuda(0)?
        } else {
            candle_core::Device::Cpu
        };
        let started = std::time::Instant::now();
        let loaded = loader::load(
            &path,
            &LoadOptions {
                format: self.format,
                device,
                reversible,
            },
        )?;
        tracing::info!(model = %path.display(), scheme = %loaded.model.reversible.label(), secs = started.elapsed().as_secs_f32(), "model loaded");
        Ok(loaded)
    }

    /// Loads the model for generation: on the CPU with f32 or quantized weights, repacked for
    /// the CPU decode path.
    pub fn load_for_inference(&self) -> Result<LoadedModel> {
        let mut loaded = self.load()?;
        loaded.model.pack_for_decoding()?;
        Ok(loaded)
    }
}
