//! Shared by the real-model tests: the asset folder and one loaded model per test binary.
#![allow(dead_code)]

use llm::Model;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `$RVQ_KV_HOME`, else the workspace's `.rvq-kv` (assets are fetched there on first use).
pub fn home() -> PathBuf {
    match std::env::var_os("RVQ_KV_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.rvq-kv")),
    }
}

pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = eval::assets::ensure_model(&home()).expect("fetching the default model");
        Model::load(&path).expect("loading the default model")
    })
}

pub fn eval_tokens() -> &'static [u32] {
    static TOKENS: OnceLock<Vec<u32>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let path = eval::assets::ensure_eval_text(&home()).expect("fetching sotu-eval");
        let text = eval::text::read_text(&path).expect("reading sotu-eval");
        model()
            .tokenizer
            .encode(&text, true)
            .expect("tokenizing sotu-eval")
    })
}
