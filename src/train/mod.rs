//! Training: gradients through any scheme with three backward strategies (stored activations,
//! per-layer checkpoints, and the activation-free reversible backward), the chunked loss,
//! optimizer, data and checkpoints. Knows nothing of HTTP or jobs.

pub mod backward;
pub mod block_vjp;
pub mod checkpoint;
pub mod data;
pub mod exact;
pub mod grads;
pub mod loss;
pub mod memory_fit;
pub mod optimizer;
pub mod trainable;
pub mod trainer;
