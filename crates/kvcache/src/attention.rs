//! Causal multi-head attention over keys and values read from a cache.
//!
//! This is the default `KvCache::attend`: it asks the cache for dense pre-RoPE keys and values,
//! rotates the keys to their positions, and runs softmax(q·kᵀ·scale)·v with two matrix products
//! per KV head. Backends that can attend on their compressed form override `attend` instead.

use crate::{CacheError, KvCache};
use rayon::prelude::*;
use std::ops::Range;

/// Queries of one layer, already rotated to their positions.
#[derive(Clone, Copy, Debug)]
pub struct Queries<'a> {
    /// [tokens, q_heads, head_dim]
    pub q: &'a [f32],
    pub tokens: usize,
    pub q_heads: usize,
    /// Position of query row 0; row i sits at `first_pos + i` and sees keys `..=first_pos + i`.
    pub first_pos: usize,
    /// Softmax temperature, usually 1/sqrt(head_dim).
    pub scale: f32,
    /// Sliding window: a query at position p sees only keys at positions > p - window.
    pub window: Option<usize>,
}

/// Largest block of query rows attended at once: bounds the score matrix at long context.
const QUERY_BLOCK: usize = 256;

/// The codec's row-major kernels: `matmul_bt` = a · bᵀ, `matmul` = a · b (single-threaded).
pub use rvq::kernels::{dot_products as matmul_bt, matmul};

/// Checks the query shape against the cache and returns the number of keys needed.
pub fn check_queries<C: KvCache + ?Sized>(
    cache: &C,
    layer: usize,
    queries: &Queries,
    out: &[f32],
) -> Result<usize, CacheError> {
    let shape = cache.shape();
    let hd = shape.head_dim;
    if layer >= shape.layers {
        return Err(CacheError::Shape(format!(
            "layer {layer} out of range ({} layers)",
            shape.layers
        )));
    }
    if queries.q_heads == 0 || !queries.q_heads.is_multiple_of(shape.kv_heads) {
        return Err(CacheError::Shape(format!(
            "{} query heads is not a multiple of {} KV heads",
            queries.q_heads, shape.kv_heads
        )));
    }
    let expected = queries.tokens * queries.q_heads * hd;
    if queries.q.len() != expected || out.len() != expected {
        return Err(CacheError::Shape(format!(
            "queries/output hold {}/{} values, expected {expected} = {} tokens x {} heads x {hd}",
            queries.q.len(),
            out.len(),
            queries.tokens,
            queries.q_heads
        )));
    }
    let needed = queries.first_pos + queries.tokens;
    if needed > cache.len(layer) {
        return Err(CacheError::Shape(format!(
            "queries reach position {} but layer {layer} holds {} tokens",
            needed - 1,
            cache.len(layer)
        )));
    }
    Ok(needed)
}

/// Positions read from the cache at once: the block's keys or values stay in L1/L2 while they
/// are used, instead of materialising the whole context densely.
pub const KEY_BLOCK: usize = 256;

/// Scores one KV head's query rows against a span of keys: `q` [rows, hd] (queries already
/// rotated, channel order) and positions `span` → `scores` [rows, span.len()] = q · RoPE(k_t).
pub type KeyScorer<'a> =
    dyn Fn(usize, &[f32], Range<usize>, &mut [f32]) -> Result<(), CacheError> + Sync + 'a;

/// Turns one KV head's attention weights into outputs: `probs` [rows, n] over positions
/// `first_key..first_key + n` (zero outside each row's mask) → `out` [rows, hd].
pub type ValueReducer<'a> =
    dyn Fn(usize, &[f32], usize, usize, &mut [f32]) -> Result<(), CacheError> + Sync + 'a;

/// Attention through dense block reads of the cache. `out`: [tokens, q_heads, head_dim].
pub fn dense_attention<C: KvCache + ?Sized>(
    cache: &C,
    layer: usize,
    queries: &Queries,
    out: &mut [f32],
) -> Result<(), CacheError> {
    let hd = cache.shape().head_dim;
    let score = |h: usize, q: &[f32], span: Range<usize>, scores: &mut [f32]| {
        dense_key_scores(cache, layer, h, q, span, scores)
    };
    let reduce = |h: usize, probs: &[f32], first_key: usize, n: usize, out: &mut [f32]| {
        dense_values(cache, layer, h, probs, first_key, n, hd, out)
    };
    attention_with(cache, layer, queries, out, &score, &reduce)
}

/// [`KeyScorer`] through dense reads: keys are read, rotated to their positions and multiplied.
pub fn dense_key_scores<C: KvCache + ?Sized>(
    cache: &C,
    layer: usize,
    head: usize,
    q: &[f32],
    span: Range<usize>,
    scores: &mut [f32],
) -> Result<(), CacheError> {
    let hd = cache.shape().head_dim;
    let (rows, len) = (q.len() / hd, span.len());
    let mut keys = vec![0f32; len * hd];
    cache.read_keys(layer, head, span.clone(), &mut keys)?;
    cache.rope(layer).rotate_rows(&mut keys, span.start);
    matmul_bt(rows, len, hd, q, &keys, scores);
    Ok(())
}

/// Σ_t probs[r, t] · v_t over positions `first_key..first_key + n`, reading values in blocks.
#[allow(clippy::too_many_arguments)]
pub fn dense_values<C: KvCache + ?Sized>(
    cache: &C,
    layer: usize,
    head: usize,
    probs: &[f32],
    first_key: usize,
    n: usize,
    hd: usize,
    out: &mut [f32],
) -> Result<(), CacheError> {
    out.fill(0.0);
    let read = |span: Range<usize>, vals: &mut [f32]| cache.read_values(layer, head, span, vals);
    accumulate_values(read, probs, first_key, n, first_key..first_key + n, hd, out)
}

/// `out` ([rows, hd]) += Σ_{t ∈ span} probs[r, t − first_key] · v_t, where `probs` is
/// [rows, n] over positions `first_key..first_key + n` and `read` fills values of a position
/// range; values are read `KEY_BLOCK` positions at a time.
pub fn accumulate_values(
    read: impl Fn(Range<usize>, &mut [f32]) -> Result<(), CacheError>,
    probs: &[f32],
    first_key: usize,
    n: usize,
    span: Range<usize>,
    hd: usize,
    out: &mut [f32],
) -> Result<(), CacheError> {
    let rows = out.len() / hd;
    let block = KEY_BLOCK.min(span.len());
    let mut vals = vec![0f32; block * hd];
    let mut p = vec![0f32; rows * block];
    let mut partial = vec![0f32; rows * hd];
    for b0 in span.clone().step_by(KEY_BLOCK) {
        let len = KEY_BLOCK.min(span.end - b0);
        let vals = &mut vals[..len * hd];
        read(b0..b0 + len, vals)?;
        let p = &mut p[..rows * len];
        for r in 0..rows {
            let at = r * n + b0 - first_key;
            p[r * len..(r + 1) * len].copy_from_slice(&probs[at..at + len]);
        }
        matmul(rows, hd, len, p, vals, &mut partial);
        for (o, x) in out.iter_mut().zip(&partial) {
            *o += x;
        }
    }
    Ok(())
}

/// Causal attention whose scores come from `score_keys` block by block and whose values are
/// reduced by `reduce_values`, so a backend can do both on its compressed form.
pub fn attention_with<C: KvCache + ?Sized>(
    cache: &C,
    layer: usize,
    queries: &Queries,
    out: &mut [f32],
    score_keys: &KeyScorer,
    reduce_values: &ValueReducer,
) -> Result<(), CacheError> {
    check_queries(cache, layer, queries, out)?;
    let shape = cache.shape();
    let (hd, kv_heads) = (shape.head_dim, shape.kv_heads);
    let group = queries.q_heads / kv_heads;
    let first_key = match queries.window {
        Some(w) => (queries.first_pos + 1).saturating_sub(w),
        None => 0,
    };

    // One task per KV head; each returns its [tokens, group, head_dim] slab.
    let per_head: Vec<Result<Vec<f32>, CacheError>> = (0..kv_heads)
        .into_par_iter()
        .map(|h| {
            let heads = (h, group);
            attend_one_head(hd, queries, heads, first_key, score_keys, reduce_values)
        })
        .collect();

    for (h, slab) in per_head.into_iter().enumerate() {
        let slab = slab?;
        for i in 0..queries.tokens {
            for j in 0..group {
                let dst = (i * queries.q_heads + h * group + j) * hd;
                let src = (i * group + j) * hd;
                out[dst..dst + hd].copy_from_slice(&slab[src..src + hd]);
            }
        }
    }
    Ok(())
}

/// Softmax attention of the `group` query heads of KV head `h` (`heads` = (h, group)) over
/// positions `first_key..`. Returns [tokens, group, hd].
fn attend_one_head(
    hd: usize,
    queries: &Queries,
    (h, group): (usize, usize),
    first_key: usize,
    score_keys: &KeyScorer,
    reduce_values: &ValueReducer,
) -> Result<Vec<f32>, CacheError> {
    let n = queries.tokens;
    let mut result = vec![0f32; n * group * hd];
    let mut i0 = 0;
    while i0 < n {
        let i1 = (i0 + QUERY_BLOCK).min(n);
        let rows = (i1 - i0) * group;
        // Keys this block can see: up to the last query's position.
        let t_end = queries.first_pos + i1 - first_key;
        // [rows, hd], row r = (i - i0) * group + j
        let mut q = vec![0f32; rows * hd];
        for i in i0..i1 {
            for j in 0..group {
                let src = (i * queries.q_heads + h * group + j) * hd;
                let r = (i - i0) * group + j;
                q[r * hd..(r + 1) * hd].copy_from_slice(&queries.q[src..src + hd]);
            }
        }
        let mut scores = vec![0f32; rows * t_end]; // [rows, t_end]
        let mut block_scores = vec![0f32; rows * KEY_BLOCK.min(t_end)];
        for b0 in (0..t_end).step_by(KEY_BLOCK) {
            let len = KEY_BLOCK.min(t_end - b0);
            let bs = &mut block_scores[..rows * len];
            score_keys(h, &q, first_key + b0..first_key + b0 + len, bs)?;
            for r in 0..rows {
                scores[r * t_end + b0..r * t_end + b0 + len]
                    .copy_from_slice(&bs[r * len..(r + 1) * len]);
            }
        }
        for i in i0..i1 {
            let pos = queries.first_pos + i;
            let lo = match queries.window {
                Some(w) => (pos + 1).saturating_sub(w).saturating_sub(first_key),
                None => 0,
            };
            let hi = pos + 1 - first_key; // exclusive
            for j in 0..group {
                let r = (i - i0) * group + j;
                softmax_masked(
                    &mut scores[r * t_end..(r + 1) * t_end],
                    lo,
                    hi,
                    queries.scale,
                );
            }
        }
        reduce_values(
            h,
            &scores,
            first_key,
            t_end,
            &mut result[i0 * group * hd..i1 * group * hd],
        )?;
        i0 = i1;
    }
    Ok(result)
}

/// In place: row[lo..hi] = softmax(row[lo..hi] * scale), zero elsewhere.
pub fn softmax_masked(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    let mut max = f32::NEG_INFINITY;
    for &s in &row[lo..hi] {
        max = max.max(s * scale);
    }
    let mut sum = 0f32;
    for s in &mut row[lo..hi] {
        *s = (*s * scale - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in &mut row[lo..hi] {
        *s *= inv;
    }
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
}
