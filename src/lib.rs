//! rewind: serve and fine-tune time-reversible LLMs.
//!
//! A standard pre-norm decoder is forward Euler in depth, so backprop must keep every layer's
//! input. rewind re-expresses pretrained decoders with time-reversible integrators (midpoint,
//! midpoint(a), leapfrog, hamiltonian) whose inverse rebuilds every hidden state from the top two,
//! so training needs no per-layer activations.
//!
//! Module map (lower layers never import higher ones):
//! - [`model`]: pure math and loading: configs, blocks, reversible schemes, GGUF/safetensors
//!   loaders, tokenizer, chat template, KV cache, sampling, generation.
pub mod model;
pub mod provision;
pub mod cli;
pub mod train;
pub mod memory;
