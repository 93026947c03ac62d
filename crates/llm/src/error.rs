use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {reason}")]
    NotGguf { path: PathBuf, reason: String },
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("GGUF metadata: {0}")]
    Metadata(String),
    #[error("GGUF tensor {name}: {reason}")]
    Tensor { name: String, reason: String },
    #[error("weights delta {path}: {reason}")]
    Delta { path: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Cache(#[from] kvcache::CacheError),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LlmError>;
