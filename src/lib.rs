//! rewind: serve and fine-tune time-reversible LLMs.
//!
//! A standard pre-norm decoder is forward Euler in depth, so backprop must keep every layer's
//! input. rewind re-expresses pretrained decoders with time-reversible integrators (midpoint,
//! midpoint(a), leapfrog, hamiltonian) whose inverse rebuilds every hidden state from the top two,
//! so training needs no per-layer activations.
//!
//! Module map (lower layers never import higher ones):
//! - [`kernels`]: CPU inference kernels (packed weights, 8-bit dot products per instruction
//!   set, a persistent thread team), knowing nothing of models.
//! - [`model`]: pure math and loading: configs, blocks, reversible schemes, GGUF/safetensors
//!   loaders, KV cache, sampling, generation.
//! - [`text`]: tokenizer, chat templates and stop strings: the text around the network.
//! - [`settings`]: the server's typed configuration (`config.toml`, `REWIND_*`, flags).
//! - [`engine`]: the device-owning inference thread: continuous batching under a KV memory
//!   budget, a pure scheduler, the model registry, JSON-constrained decoding, metrics.
//! - [`durable`]: crash-safe writes (atomic, fsynced files; directories published whole) and
//!   the start-up repair of interrupted ones, used by every module that writes state.
//! - [`store`]: the on-disk layout of the data directory: its lock, the fine-tuning service's
//!   SQLite database and file blobs.
//! - [`jobs`]: the fine-tuning job lifecycle: validation, queue, the training runner, events,
//!   cancellation, resume after a restart, result files.
//! - [`api`]: the OpenAI-compatible HTTP server (chat, completions, models, files, fine-tuning
//!   jobs and the legacy fine-tunes API, health, metrics).
pub mod api;
pub mod cli;
pub mod convert;
pub mod durable;
pub mod engine;
pub mod jobs;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod provision;
pub mod settings;
pub mod store;
pub mod text;
pub mod train;
