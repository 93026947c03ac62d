//! GGUF language models whose attention reads K/V through a [`kvcache::KvCache`].

pub mod error;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod model;
pub mod ops;
pub mod tokenizer;

pub use error::{LlmError, Result};
pub use model::Model;
pub use tokenizer::Tokenizer;
