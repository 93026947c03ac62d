//! Speed and memory of whole-model prefill and decode per cache, at several context lengths.

use anyhow::{bail, Result};
use llm::Model;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub cache: String,
    pub ctx: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub cache_bytes: u64,
    pub bits_per_element: f64,
    /// Speeds relative to the first cache in the list, measured in the same run.
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut s = "| cache | ctx | prefill tok/s | decode tok/s | prefill × | decode × | cache bytes | bits/elem |\n\
             |---|---|---|---|---|---|---|---|\n".to_string();
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {} | {:.2} |\n",
                r.cache,
                r.ctx,
                r.prefill_tokens_per_s,
                r.decode_tokens_per_s,
                r.prefill_ratio,
                r.decode_ratio,
                r.cache_bytes,
                r.bits_per_element
            );
        }
        s
    }
}

/// Prefill in chunks of this many tokens (bounds the attention score matrix).
const PREFILL_CHUNK: usize = 256;

pub fn run(
    model: &Model,
    caches: &[String],
    contexts: &[usize],
    decode_steps: usize,
) -> Result<BenchReport> {
    if caches.is_empty() || contexts.is_empty() {
        bail!("bench needs at least one cache and one context length");
    }
    // Each context is filled by a prefill of `ctx - decode_steps` tokens, then `decode_steps`
    // single-token steps that end exactly at `ctx`.
    for &ctx in contexts {
        if ctx > model.context_len() || ctx <= decode_steps {
            bail!(
                "context {ctx} must exceed the {decode_steps} decode steps and fit the model's {}",
                model.context_len()
            );
        }
    }
    let mut rows = Vec::new();
    // Deterministic pseudo-text: token ids spread over the vocabulary.
    let vocab = model.vocab() as u64;
    for &ctx in contexts {
        let prefill_len = ctx - decode_steps;
        let tokens: Vec<u32> = (0..prefill_len as u64)
            .map(|i| ((i * 7919 + 13) % vocab) as u32)
            .collect();
        let mut base: Option<(f64, f64)> = None;
        for spec in caches {
            eprintln!("bench: {spec} at ctx {ctx}");
            let mut cache = model.new_cache(spec)?;
            let t = Instant::now();
            let mut logits = Vec::new();
            for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
                logits = model.forward(chunk, i * PREFILL_CHUNK, cache.as_mut(), Some(1))?;
            }
            let prefill = prefill_len as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            for step in 0..decode_steps {
                let next = crate::generate::argmax(&logits);
                logits = model.forward(&[next], prefill_len + step, cache.as_mut(), Some(1))?;
            }
            let decode = decode_steps as f64 / t.elapsed().as_secs_f64();
            let (bp, bd) = *base.get_or_insert((prefill, decode));
            let mem = cache.memory();
            rows.push(BenchRow {
                cache: spec.clone(),
                ctx,
                prefill_tokens_per_s: prefill,
                decode_tokens_per_s: decode,
                cache_bytes: mem.bytes,
                bits_per_element: mem.bits_per_element(),
                prefill_ratio: prefill / bp,
                decode_ratio: decode / bd,
            });
        }
    }
    Ok(BenchReport {
        threads: rayon::current_num_threads(),
        rows,
    })
}
