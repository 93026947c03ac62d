//! Speed and memory of whole-model prefill and decode per cache, at several context lengths,
//! with the time split between the model's own work, attention and cache appends (encoding).

use anyhow::{bail, Result};
use kvcache::hooked::{Hooked, Hooks};
use kvcache::{CacheError, KvCache, MemoryReport, Queries};
use llm::Model;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Clocks on a cache's `append` (storing, i.e. encoding) and `attend` (attention), so a forward
/// pass splits into model / attention / encode.
#[derive(Default)]
pub struct Clocks {
    append_ns: AtomicU64,
    attend_ns: AtomicU64,
}

impl Clocks {
    /// (append, attend) seconds since the last call, and resets the clocks.
    pub fn take(&self) -> (f64, f64) {
        let a = self.append_ns.swap(0, Ordering::Relaxed) as f64 * 1e-9;
        let b = self.attend_ns.swap(0, Ordering::Relaxed) as f64 * 1e-9;
        (a, b)
    }
}

fn clocked<T>(clock: &AtomicU64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    clock.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

impl Hooks for Clocks {
    fn append(
        &self,
        inner: &mut dyn KvCache,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), CacheError> {
        clocked(&self.append_ns, || inner.append(layer, k, v))
    }
    fn attend(
        &self,
        inner: &dyn KvCache,
        layer: usize,
        queries: &Queries,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        clocked(&self.attend_ns, || inner.attend(layer, queries, out))
    }
    fn for_copy(&self) -> Self {
        Self::default()
    }
}

/// A cache whose append and attend are clocked.
pub type TimedCache = Hooked<Clocks>;

/// Peak resident memory of this process so far (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchRow {
    pub cache: String,
    pub ctx: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Per decode step, milliseconds: the model's own work (matmuls, norms), attention, and
    /// storing the new token (encoding, for compressed caches).
    pub decode_model_ms: f64,
    pub decode_attention_ms: f64,
    pub decode_encode_ms: f64,
    /// Encoding's share of a decode step.
    pub encode_fraction: f64,
    pub cache_bytes: u64,
    pub bits_per_element: f64,
    /// Peak resident memory of the process that measured this row (when run alone).
    pub peak_rss_bytes: Option<u64>,
    /// Speeds relative to the first cache in the list, measured in the same run.
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    /// Positions past the model's trained context (RoPE extended, `--beyond-context`): the
    /// outputs there are meaningless, the speeds and bytes are not.
    #[serde(default)]
    pub past_trained_context: bool,
    /// The context was random K/V appended to the cache, not a prefill (`--fill random`): the
    /// prefill column is then the append rate.
    #[serde(default)]
    pub filled_random: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    pub threads: usize,
    /// Whether the caches' steps were measured in turn (see [`BenchOptions::interleave`]).
    #[serde(default)]
    pub interleaved: bool,
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut s = "| cache | ctx | prefill tok/s | decode tok/s | prefill × | decode × | decode ms: model / attention / encode | cache MB | bits/elem | peak RSS MB |\n\
             |---|---:|---:|---:|---:|---:|---|---:|---:|---:|\n".to_string();
        for r in &self.rows {
            let star = if r.past_trained_context { "*" } else { "" };
            s += &format!(
                "| {} | {}{star} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} / {:.1} / {:.2} | {:.1} | {:.2} | {} |\n",
                r.cache,
                r.ctx,
                r.prefill_tokens_per_s,
                r.decode_tokens_per_s,
                r.prefill_ratio,
                r.decode_ratio,
                r.decode_model_ms,
                r.decode_attention_ms,
                r.decode_encode_ms,
                r.cache_bytes as f64 / 1e6,
                r.bits_per_element,
                r.peak_rss_bytes
                    .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
            );
        }
        if self.rows.iter().any(|r| r.filled_random) {
            s += "\nContexts filled with random K/V appended to the caches (`--fill random`), not \
                  a prefill: the prefill column is the append rate; decode speed and bytes are \
                  real.\n";
        }
        if self.interleaved {
            s += "\nThe caches' prefill chunks and decode steps were measured in turn, one of \
                  each, in one process: the ratios share the machine's state, peak RSS is not \
                  any row's own.\n";
        }
        if self.rows.iter().any(|r| r.past_trained_context) {
            s += "\n\\* past the model's trained context (RoPE extended by `--beyond-context`): \
                  speed and memory only, the model's outputs there mean nothing.\n";
        }
        s
    }
}

/// Prefill in chunks of this many tokens (bounds the attention score matrix).
const PREFILL_CHUNK: usize = 256;

/// How [`run`] measures.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Decode steps timed after each prefill.
    pub decode_steps: usize,
    /// The model's context before any [`Model::extend_context`], to mark the rows past it.
    pub trained_context: usize,
    /// Take the caches' prefill chunks and decode steps in turn (one of each cache, then the
    /// next), so that their ratios see the same state of the machine; otherwise each cache is
    /// measured to the end before the next starts.
    pub interleave: bool,
    /// Fill the context with random K/V appended straight to the caches instead of a prefill
    /// (for models too large to prefill tens of thousands of tokens on a CPU): decode speed and
    /// bytes are real, the "prefill" speed is then the caches' append rate.
    pub fill_random: bool,
}

/// K/V of standard normal values: the statistics the caches see from a real model's pre-RoPE
/// keys and values, up to per-channel scales.
fn random_kv(len: usize, rng: &mut rvq::rng::SplitMix64) -> Vec<f32> {
    (0..len).map(|_| rng.normal()).collect()
}

/// One cache's measurement: its clocks and what it held at the end (the cache itself is dropped
/// once measured, so caches measured one after another are not alive together).
struct Measured {
    prefill_s: f64,
    decode_s: f64,
    /// Time in `append` and `attend` during the decode steps.
    encode_s: f64,
    attend_s: f64,
    memory: MemoryReport,
}

/// A cache being measured, with its last logits.
struct Running {
    cache: TimedCache,
    logits: Vec<f32>,
    prefill_s: f64,
    decode_s: f64,
}

/// Prefills `tokens` then decodes `decode_steps` greedy tokens with every cache of `specs`,
/// one chunk or step of each cache in turn; round r starts at cache r mod n, so no cache is
/// always the one after (or before) another.
fn measure(
    model: &Model,
    specs: &[String],
    tokens: &[u32],
    decode_steps: usize,
    fill_random: bool,
) -> Result<Vec<Measured>> {
    let mut runs = specs
        .iter()
        .map(|spec| {
            Ok(Running {
                cache: Hooked::new(model.new_cache(spec)?, Clocks::default()),
                logits: vec![],
                prefill_s: 0.0,
                decode_s: 0.0,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let n = runs.len();
    let shape = model.cache_shape();
    let mut rng = rvq::rng::SplitMix64::new(0);
    for (i, chunk) in tokens.chunks(PREFILL_CHUNK).enumerate() {
        // [chunk, kv_heads, head_dim] per layer, the same for every cache.
        let kv: Vec<(Vec<f32>, Vec<f32>)> = if fill_random {
            let len = chunk.len() * shape.kv_heads * shape.head_dim;
            (0..shape.layers)
                .map(|_| (random_kv(len, &mut rng), random_kv(len, &mut rng)))
                .collect()
        } else {
            vec![]
        };
        for j in 0..n {
            let run = &mut runs[(i + j) % n];
            let t = Instant::now();
            if fill_random {
                for (l, (k, v)) in kv.iter().enumerate() {
                    run.cache.append(l, k, v)?;
                }
            } else {
                run.logits = model.forward(chunk, i * PREFILL_CHUNK, &mut run.cache, Some(1))?;
            }
            run.prefill_s += t.elapsed().as_secs_f64();
        }
    }
    runs.iter().for_each(|r| _ = r.cache.hooks().take());
    for step in 0..decode_steps {
        for j in 0..n {
            let run = &mut runs[(step + j) % n];
            // After a random fill there are no logits yet: the last prompt token goes next.
            let next = if run.logits.is_empty() {
                tokens[tokens.len() - 1]
            } else {
                crate::generate::argmax(&run.logits)
            };
            let t = Instant::now();
            run.logits = model.forward(&[next], tokens.len() + step, &mut run.cache, Some(1))?;
            run.decode_s += t.elapsed().as_secs_f64();
        }
    }
    Ok(runs
        .into_iter()
        .map(|run| {
            let (encode_s, attend_s) = run.cache.hooks().take();
            Measured {
                prefill_s: run.prefill_s,
                decode_s: run.decode_s,
                encode_s,
                attend_s,
                memory: run.cache.memory(),
            }
        })
        .collect())
}

pub fn run(
    model: &Model,
    caches: &[String],
    contexts: &[usize],
    options: BenchOptions,
) -> Result<BenchReport> {
    let BenchOptions {
        decode_steps,
        trained_context,
        interleave,
        fill_random,
    } = options;
    if caches.is_empty() || contexts.is_empty() {
        bail!("bench needs at least one cache and one context length");
    }
    if decode_steps == 0 {
        bail!("--decode-steps must be at least 1 (decode speed is measured over them)");
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
        let runs = if interleave {
            eprintln!("bench: {} caches in turn at ctx {ctx}", caches.len());
            measure(model, caches, &tokens, decode_steps, fill_random)?
        } else {
            let mut runs = vec![];
            for spec in caches {
                eprintln!("bench: {spec} at ctx {ctx}");
                runs.extend(measure(
                    model,
                    std::slice::from_ref(spec),
                    &tokens,
                    decode_steps,
                    fill_random,
                )?);
            }
            runs
        };
        let speeds = |r: &Measured| {
            (
                prefill_len as f64 / r.prefill_s,
                decode_steps as f64 / r.decode_s,
            )
        };
        let (bp, bd) = speeds(&runs[0]);
        for (spec, r) in caches.iter().zip(&runs) {
            let (prefill, decode) = speeds(r);
            let per_step = |x: f64| x * 1e3 / decode_steps as f64;
            let mem = &r.memory;
            rows.push(BenchRow {
                cache: spec.clone(),
                ctx,
                prefill_tokens_per_s: prefill,
                decode_tokens_per_s: decode,
                decode_model_ms: per_step(r.decode_s - r.encode_s - r.attend_s),
                decode_attention_ms: per_step(r.attend_s),
                decode_encode_ms: per_step(r.encode_s),
                encode_fraction: r.encode_s / r.decode_s,
                cache_bytes: mem.bytes,
                bits_per_element: mem.bits_per_element(),
                peak_rss_bytes: (caches.len() == 1 && contexts.len() == 1)
                    .then(peak_rss_bytes)
                    .flatten(),
                prefill_ratio: prefill / bp,
                decode_ratio: decode / bd,
                past_trained_context: ctx > trained_context,
                filled_random: fill_random,
            });
        }
    }
    Ok(BenchReport {
        threads: rayon::current_num_threads(),
        interleaved: interleave && caches.len() > 1,
        rows,
    })
}

impl BenchReport {
    /// Recomputes the speed ratios against the first cache of each context (for rows measured
    /// in separate processes).
    pub fn rebase(&mut self) {
        let firsts: Vec<(usize, f64, f64)> = {
            let mut seen = vec![];
            for r in &self.rows {
                if !seen.iter().any(|&(c, _, _)| c == r.ctx) {
                    seen.push((r.ctx, r.prefill_tokens_per_s, r.decode_tokens_per_s));
                }
            }
            seen
        };
        for r in &mut self.rows {
            if let Some(&(_, p, d)) = firsts.iter().find(|f| f.0 == r.ctx) {
                r.prefill_ratio = r.prefill_tokens_per_s / p;
                r.decode_ratio = r.decode_tokens_per_s / d;
            }
        }
    }
}
