//! Text around the network: the tokenizer (GGUF and Hugging Face vocabularies), chat templates
//! (rendering conversations, tools and generation prompts) and stop strings over streamed text.
//! Knows nothing of tensors.

pub mod chat_template;
pub mod openai_message;
pub mod stop;
pub mod tokenizer;
