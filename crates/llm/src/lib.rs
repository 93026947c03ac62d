//! GGUF language models whose attention reads K/V through a [`kvcache::KvCache`].

pub mod delta;
pub mod error;
pub mod gemma3;
pub mod gguf;
pub mod linear;
pub mod llama;
pub mod model;
pub mod ops;
pub mod qwen2;
pub mod synth;
pub mod threads;
pub mod tiny;
pub mod tokenizer;
pub mod transformer;

pub use error::{LlmError, Result};
pub use model::Model;
pub use tokenizer::Tokenizer;
pub use transformer::Sequence;
