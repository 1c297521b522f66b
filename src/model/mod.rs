//! The model layer: everything needed to load an LLM, express it in a reversible form and
//! generate from it. Knows nothing of HTTP, jobs or storage.

pub mod attention;
pub mod block;
pub mod chat_template;
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
pub mod stop;
pub mod tokenizer;
