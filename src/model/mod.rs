//! The model layer: the network and its math: everything needed to load an LLM, express it in
//! a reversible form and generate from it. Knows nothing of HTTP, jobs or storage; the text
//! around it (tokenizer, chat template, stop strings) is in `text`.

pub mod attention;
pub mod block;
pub mod config;
pub mod custom_vjp;
pub mod decoder;
pub mod flash_attention;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod matmul;
pub mod ops;
pub mod packed_decoder;
pub mod parallel;
pub mod reversible;
pub mod rope;
pub mod sampling;
