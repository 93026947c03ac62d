//! Causal multi-head attention over keys and values read from a cache.
//!
//! This is the default `KvCache::attend`: it asks the cache for dense pre-RoPE keys and values,
//! rotates the keys to their positions, and runs softmax(q·kᵀ·scale)·v with two matrix products
//! per KV head. Backends that can attend on their compressed form override `attend` instead.

use crate::{CacheError, KvCache};
#[cfg(test)]
use crate::{CacheShape, Rope};
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
pub use simd::matmul::{dot_products as matmul_bt, matmul};

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

/// Query rows of a decode step that the fused kernels ([`crate::rvq::kernels`],
/// [`crate::dense_fused`]) score in registers.
pub const FUSED_ROWS: usize = 8;

/// Each row's 16-lane dot products of up to 8 keys, folded to 8 lanes: [rows][key][8].
pub(crate) type Folded = [[[f32; 8]; 8]; FUSED_ROWS];

/// Checks what a fused score kernel writes: `rows` ≤ [`FUSED_ROWS`] rows of `n` scores
/// `stride` apart inside `scores`, at positions `first_pos..` that `rope`'s table holds.
pub(crate) fn check_fused_scores(
    rows: usize,
    n: usize,
    stride: usize,
    scores: &[f32],
    rope: &crate::Rope,
    first_pos: usize,
) {
    assert!(rows <= FUSED_ROWS, "at most {FUSED_ROWS} rows");
    assert!(
        first_pos + n <= rope.max_positions(),
        "positions beyond the RoPE table"
    );
    assert!(
        rows == 0 || scores.len() >= (rows - 1) * stride + n,
        "scores: rows × stride"
    );
}

/// The loop of a fused score kernel over `n` keys: `key(t, i, folded)` writes key t's folded
/// dot products with each row into `folded[r][i]` (i = t mod 8); every 8 keys they are summed
/// by [`simd::vector::tree_sums8`] and `write(r, t0, sums)` gets row r's sums of keys
/// `t0..t0 + sums.len()`.
///
/// # Safety
/// As for `tree_sums8` with `avx2`.
#[inline(always)]
pub(crate) unsafe fn fused_scores_by_eights(
    avx2: bool,
    n: usize,
    rows: usize,
    mut key: impl FnMut(usize, usize, &mut Folded),
    mut write: impl FnMut(usize, usize, &[f32]),
) {
    let mut folded: Folded = [[[0f32; 8]; 8]; FUSED_ROWS];
    let mut sums = [0f32; 8];
    for t0 in (0..n).step_by(8) {
        let m = 8.min(n - t0);
        for i in 0..m {
            key(t0 + i, i, &mut folded);
        }
        for (r, folded) in folded.iter().enumerate().take(rows) {
            simd::vector::tree_sums8(folded, &mut sums, avx2);
            write(r, t0, &sums[..m]);
        }
    }
}

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
///
/// Tasks run in parallel; the split depends only on the shapes, never on the thread count. A
/// prefill's query tokens come in at least two blocks ([`query_block`]), each block a task
/// that attends for every head in turn. A decode step is one block with only the model's few
/// KV heads to share out (SmolLM2: 3, on two cores, one idle a third of the time), so each
/// head's keys come in [`key_parts`] parts, one task each that scores its keys, exponentiates
/// them below its own maximum and reduces their values ([`PartShare`]); a head's shares then
/// combine, in key order, into its softmax-weighted output. One parallel region per layer, no
/// wait between the scores and the values; the parts are whole key blocks, scored exactly as
/// in one pass.
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
    let block = query_block(queries.tokens);
    let blocks: Vec<Range<usize>> = (0..queries.tokens)
        .step_by(block)
        .map(|i0| i0..(i0 + block).min(queries.tokens))
        .collect();
    let ctx = Context {
        hd,
        group,
        first_key,
        queries,
    };
    // The keys a block of query tokens sees, relative to `first_key`: up to its last query's.
    let unit = |head: usize, tokens: &Range<usize>| Unit {
        head,
        tokens: tokens.clone(),
        keys: queries.first_pos + tokens.end - first_key,
    };
    // Writes a unit's output [tokens, group, hd] into `out` rows `out_first..` of its tokens.
    let place = |u: &Unit, slab: &[f32], out: &mut [f32], out_first: usize| {
        for (i, rows) in u.tokens.clone().zip(slab.chunks_exact(group * hd)) {
            let dst = ((i - out_first) * queries.q_heads + u.head * group) * hd;
            out[dst..dst + group * hd].copy_from_slice(rows);
        }
    };
    if blocks.len() > 1 {
        // One task per query block, its heads in turn: each writes its own rows of `out`, and
        // one score matrix per task is alive at a time (results held for all tasks fragmented
        // the heap: +67 MB peak RSS over an 8K prefill).
        let block_len = block * queries.q_heads * hd;
        return out
            .par_chunks_mut(block_len)
            .zip(blocks.par_iter())
            .try_for_each(|(out, tokens)| {
                for head in 0..kv_heads {
                    let u = unit(head, tokens);
                    let scores = ctx.scores(&u, 0..u.keys, score_keys)?;
                    let slab = ctx.softmax_and_values(&u, scores, reduce_values)?;
                    place(&u, &slab, out, tokens.start);
                }
                Ok(())
            });
    }
    // A single block (or none: zero queries attend to nothing): its keys in parts over the
    // heads, each part scored, weighted and reduced in one task (see [`PartShare`]).
    let units: Vec<Unit> = blocks
        .iter()
        .flat_map(|tokens| (0..kv_heads).map(|h| unit(h, tokens)))
        .collect();
    let parts: Vec<(usize, Range<usize>)> = units
        .iter()
        .enumerate()
        .flat_map(|(i, u)| key_parts(u.keys).into_iter().map(move |k| (i, k)))
        .collect();
    let shares: Vec<PartShare> = parts
        .par_iter()
        .map(|(i, keys)| ctx.part_share(&units[*i], keys.clone(), score_keys, reduce_values))
        .collect::<Result<_, _>>()?;
    // Each head's shares combined in key order (a split fixed by the shapes: same bits every run).
    let rows = |u: &Unit| u.tokens.len() * group;
    let mut per_unit: Vec<Vec<PartShare>> = units.iter().map(|_| vec![]).collect();
    for ((i, _), share) in parts.iter().zip(shares) {
        per_unit[*i].push(share);
    }
    let slabs: Vec<Vec<f32>> = units
        .iter()
        .zip(&per_unit)
        .map(|(u, shares)| combine_shares(shares, rows(u), hd))
        .collect();
    for (u, slab) in units.iter().zip(&slabs) {
        place(u, slab, out, 0);
    }
    Ok(())
}

/// Query tokens below which a call is one block whose keys are split instead (a decode step,
/// a few speculative tokens): their score rows are small enough to hold for all heads.
const FEW_QUERY_TOKENS: usize = 16;

/// Query tokens per block: all of a few; otherwise at least two blocks (a 256-token prefill
/// chunk over 3 KV heads is 6 tasks instead of 3), at most [`QUERY_BLOCK`] tokens each.
fn query_block(tokens: usize) -> usize {
    if tokens < FEW_QUERY_TOKENS {
        tokens.max(1)
    } else {
        tokens.div_ceil(2).min(QUERY_BLOCK)
    }
}

/// Keys each part of a single query block's keys gets at least: below that the second core's
/// help costs more than it brings.
const MIN_PART_KEYS: usize = 1024;

/// The key ranges (relative to the first visible key) scored as separate tasks: two halves cut
/// at a [`KEY_BLOCK`] boundary from 2 · [`MIN_PART_KEYS`] keys on, else one.
fn key_parts(keys: usize) -> Vec<Range<usize>> {
    if keys < 2 * MIN_PART_KEYS {
        #[allow(clippy::single_range_in_vec_init)] // one part: all the keys, as a range
        return vec![0..keys];
    }
    let mid = (keys / 2).next_multiple_of(KEY_BLOCK).min(keys);
    vec![0..mid, mid..keys]
}

/// One attention: the `group` query heads of KV head `head` for query `tokens`, over `keys`
/// keys from the first visible one. Its rows are r = (i − tokens.start)·group + j.
struct Unit {
    head: usize,
    tokens: Range<usize>,
    keys: usize,
}

/// What every task of one `attention_with` call shares.
struct Context<'a> {
    hd: usize,
    group: usize,
    first_key: usize,
    queries: &'a Queries<'a>,
}

impl Context<'_> {
    /// Scores [rows, keys.len()] of the unit's query rows against its keys `keys`.
    fn scores(
        &self,
        u: &Unit,
        keys: Range<usize>,
        score_keys: &KeyScorer,
    ) -> Result<Vec<f32>, CacheError> {
        let (hd, group, queries) = (self.hd, self.group, self.queries);
        let rows = u.tokens.len() * group;
        let n = keys.len();
        // [rows, hd]
        let mut q = vec![0f32; rows * hd];
        for i in u.tokens.clone() {
            for j in 0..group {
                let src = (i * queries.q_heads + u.head * group + j) * hd;
                let r = (i - u.tokens.start) * group + j;
                q[r * hd..(r + 1) * hd].copy_from_slice(&queries.q[src..src + hd]);
            }
        }
        let mut scores = vec![0f32; rows * n]; // [rows, n]
        let mut block_scores = vec![0f32; rows * KEY_BLOCK.min(n)];
        for b0 in (0..n).step_by(KEY_BLOCK) {
            let len = KEY_BLOCK.min(n - b0);
            let bs = &mut block_scores[..rows * len];
            let first = self.first_key + keys.start + b0;
            score_keys(u.head, &q, first..first + len, bs)?;
            for r in 0..rows {
                scores[r * n + b0..r * n + b0 + len].copy_from_slice(&bs[r * len..(r + 1) * len]);
            }
        }
        Ok(scores)
    }

    /// Softmax of each row of `scores` under its causal (and window) mask, then the values:
    /// the unit's output [tokens, group, hd].
    fn softmax_and_values(
        &self,
        u: &Unit,
        scores: Vec<f32>,
        reduce_values: &ValueReducer,
    ) -> Result<Vec<f32>, CacheError> {
        let probs = self.softmax(u, scores);
        self.values(u, &probs, reduce_values)
    }

    /// The unit's attention weights [rows, keys]: each row of `scores` through the softmax
    /// under its causal (and window) mask.
    fn softmax(&self, u: &Unit, mut scores: Vec<f32>) -> Vec<f32> {
        let n = u.keys;
        for (r, lo, hi) in self.masked_rows(u) {
            softmax_masked(&mut scores[r * n..(r + 1) * n], lo, hi, self.queries.scale);
        }
        scores
    }

    /// The unit's rows r in order, each with the keys `lo..hi` its query token sees under the
    /// causal (and window) mask, relative to the first visible key.
    fn masked_rows<'u>(&'u self, u: &'u Unit) -> impl Iterator<Item = (usize, usize, usize)> + 'u {
        u.tokens.clone().flat_map(move |i| {
            let pos = self.queries.first_pos + i;
            let lo = match self.queries.window {
                Some(w) => (pos + 1).saturating_sub(w).saturating_sub(self.first_key),
                None => 0,
            };
            let hi = pos + 1 - self.first_key;
            let first_row = (i - u.tokens.start) * self.group;
            (first_row..first_row + self.group).map(move |r| (r, lo, hi))
        })
    }

    /// The unit's attention over its keys `keys`, as a [`PartShare`]: scored, each row's
    /// visible keys exponentiated below their own maximum, the values weighted by those
    /// exponentials. A part holding all the unit's keys is the whole softmax, done as such.
    fn part_share(
        &self,
        u: &Unit,
        keys: Range<usize>,
        score_keys: &KeyScorer,
        reduce_values: &ValueReducer,
    ) -> Result<PartShare, CacheError> {
        let rows = u.tokens.len() * self.group;
        let mut scores = self.scores(u, keys.clone(), score_keys)?; // [rows, keys.len()]
        if keys.len() == u.keys {
            return Ok(PartShare {
                max: vec![0.0; rows],
                sum: vec![1.0; rows],
                out: self.softmax_and_values(u, scores, reduce_values)?,
            });
        }
        let n = keys.len();
        let (mut max, mut sum) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        let local = |x: usize| x.clamp(keys.start, keys.end) - keys.start;
        for (r, lo, hi) in self.masked_rows(u) {
            let row = &mut scores[r * n..(r + 1) * n];
            let (m, s) = exp_masked(row, local(lo), local(hi), self.queries.scale);
            max.push(m);
            sum.push(s);
        }
        let mut out = vec![0f32; rows * self.hd];
        reduce_values(u.head, &scores, self.first_key + keys.start, n, &mut out)?;
        Ok(PartShare { max, sum, out })
    }

    /// The values weighed by `probs` ([rows, u.keys]): the unit's output [tokens, group, hd].
    fn values(
        &self,
        u: &Unit,
        probs: &[f32],
        reduce_values: &ValueReducer,
    ) -> Result<Vec<f32>, CacheError> {
        let mut out = vec![0f32; u.tokens.len() * self.group * self.hd];
        reduce_values(u.head, probs, self.first_key, u.keys, &mut out)?;
        Ok(out)
    }
}

simd::multiversion! {
    /// In place: row[lo..hi] = softmax(row[lo..hi] · scale), zero elsewhere. The maximum and
    /// the sum run over 16 lanes, then a fixed tree; [`exp`] is a polynomial: the loops
    /// vectorize, and every level computes the same bits.
    pub fn softmax_masked(row: &mut [f32], lo: usize, hi: usize, scale: f32) = softmax_masked_body;
}

/// Lanes of [`softmax_masked`]'s maximum and sum.
const SOFTMAX_LANES: usize = 16;

#[inline(always)]
fn softmax_masked_body(row: &mut [f32], lo: usize, hi: usize, scale: f32) {
    let (_, sum) = exp_masked_body(row, lo, hi, scale);
    let inv = 1.0 / sum;
    for s in &mut row[lo..hi] {
        *s *= inv;
    }
}

simd::multiversion! {
    /// In place: row[lo..hi] = e^(row · scale − max), zero elsewhere; returns (max, Σ) of the
    /// exponentials, with max the largest of row[lo..hi] · scale (−∞ for an empty range, whose
    /// Σ is 0). [`softmax_masked`] divides by Σ; a part of a row's keys keeps both to be
    /// combined with the other parts' ([`combine_shares`]).
    pub fn exp_masked(row: &mut [f32], lo: usize, hi: usize, scale: f32) -> (f32, f32) = exp_masked_body;
}

#[inline(always)]
fn exp_masked_body(row: &mut [f32], lo: usize, hi: usize, scale: f32) -> (f32, f32) {
    const L: usize = SOFTMAX_LANES;
    let xs = &mut row[lo..hi];
    let whole = xs.len() / L * L;
    let mut lanes = [f32::NEG_INFINITY; L];
    for c in xs[..whole].chunks_exact(L) {
        for l in 0..L {
            let v = c[l] * scale;
            lanes[l] = if v > lanes[l] { v } else { lanes[l] };
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for &s in &xs[whole..] {
        max = max.max(s * scale);
    }
    let mut sums = [0f32; L];
    for c in xs[..whole].chunks_exact_mut(L) {
        for l in 0..L {
            c[l] = exp(c[l] * scale - max);
            sums[l] += c[l];
        }
    }
    let mut sum = lane_sum(&sums);
    for s in &mut xs[whole..] {
        *s = exp(*s * scale - max);
        sum += *s;
    }
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
    (max, sum)
}

/// One task's share of a unit's attention over a part of its keys, per query row r: `max[r]`
/// the largest scaled score of the row's keys in the part (−∞ if it sees none), `sum[r]` the
/// sum of their e^(score − max[r]), and `out` [rows, hd] the values weighted by those
/// exponentials. The parts of a unit then combine as one softmax would (flash attention's
/// split over keys): each task scores, weights and reduces its own keys, with no wait for the
/// other parts between the scores and the values.
struct PartShare {
    max: Vec<f32>,
    sum: Vec<f32>,
    out: Vec<f32>,
}

/// The unit's output [rows, hd] from its parts' shares (in key order): per row
/// Σ_p c_p · out_p / Σ_p c_p · sum_p with c_p = e^(max_p − max over the parts). A single share
/// of max 0 and sum 1 (a whole softmax) passes through unchanged: e^0 = 1 and the division
/// by 1 are exact.
fn combine_shares(shares: &[PartShare], rows: usize, hd: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * hd];
    for (r, o) in out.chunks_exact_mut(hd).enumerate() {
        let seen = || shares.iter().filter(|s| s.sum[r] > 0.0);
        let top = seen().map(|s| s.max[r]).fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = seen().map(|s| exp(s.max[r] - top) * s.sum[r]).sum();
        for share in seen() {
            let c = exp(share.max[r] - top) / total;
            let part = &share.out[r * hd..(r + 1) * hd];
            o.iter_mut().zip(part).for_each(|(o, &v)| *o += c * v);
        }
    }
    out
}

/// Σ of 16 lanes as a balanced tree (a fixed order).
#[inline(always)]
fn lane_sum(a: &[f32; SOFTMAX_LANES]) -> f32 {
    let h: [f32; 8] = std::array::from_fn(|l| a[l] + a[l + 8]);
    simd::vector::tree_sum8(&h)
}

/// e^x for softmax: 2^n · e^r with n = round(x / ln 2) and |r| ≤ ln 2 / 2, e^r by Cephes'
/// single-precision polynomial (within 2 ulp of the exact value; the test checks it). Plain
/// arithmetic that vectorizes, where `f32::exp` is a library call per value. Arguments below
/// −87 give e^−87 (≈ 1.6e−38, the smallest normal range) instead of something smaller: in a
/// softmax, whose sum is at least 1, the difference is invisible.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375: few bits, so n · LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let k = x * LOG2E + ROUND;
    let n = k - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let e = (p * (r * r) + r) + 1.0;
    // The integer n sits in k's low mantissa bits; 2^n is n + 127 in the exponent field.
    let n_int = k.to_bits() as i32 - ROUND.to_bits() as i32;
    e * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// For tests of score kernels: each level's scores ([rows, stride], `n` scored per row) are
/// within float tolerance of `want(r, t)`, leave the padding past `n` as the NaN it was filled
/// with, and are the same bits at every level.
#[cfg(test)]
pub(crate) fn check_scores_at_every_level(
    each: &[(simd::Level, Vec<f32>)],
    want: impl Fn(usize, usize) -> f64,
    (rows, n, stride): (usize, usize, usize),
) {
    for (level, got) in each {
        for r in 0..rows {
            for t in 0..n {
                let (a, w) = (got[r * stride + t] as f64, want(r, t));
                assert!(
                    (a - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{level:?} row {r} key {t}"
                );
            }
            let padding = &got[r * stride + n..(r + 1) * stride];
            assert!(
                padding.iter().all(|x| x.is_nan()),
                "{level:?}: wrote past row {r}"
            );
        }
    }
    let same = |s: &Vec<f32>| {
        s.iter()
            .zip(&each[0].1)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    };
    assert!(
        each.iter().all(|(_, s)| same(s)),
        "levels give different bits"
    );
}

#[cfg(test)]
/// Slow reference for tests: attention of queries ([n, q_heads, hd]) at positions `first_pos..`
/// over pre-RoPE keys and values ([tokens, kv_heads, hd]), explicit loops in f64, softmax
/// temperature 1/sqrt(hd).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reference_attention_from(
    k: &[f32],
    v: &[f32],
    q: &[f32],
    first_pos: usize,
    rope: &Rope,
    s: CacheShape,
    q_heads: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let hd = s.head_dim;
    let n = q.len() / (q_heads * hd);
    let group = q_heads / s.kv_heads;
    let mut out = vec![0f32; q.len()];
    for i in 0..n {
        for qh in 0..q_heads {
            let h = qh / group;
            let qv = &q[(i * q_heads + qh) * hd..][..hd];
            let pos = first_pos + i;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let mut scores = vec![];
            for t in lo..=pos {
                let mut key = k[(t * s.kv_heads + h) * hd..][..hd].to_vec();
                rope.rotate(&mut key, t);
                let d: f64 = qv
                    .iter()
                    .zip(&key)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                scores.push(d / (hd as f64).sqrt());
            }
            let m = scores.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
            for (t, sc) in (lo..).zip(&scores) {
                let p = (sc - m).exp() / z;
                for c in 0..hd {
                    out[(i * q_heads + qh) * hd + c] +=
                        (p * v[(t * s.kv_heads + h) * hd + c] as f64) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let ulp = (want as f32).abs() * f32::EPSILON;
            worst = worst.max((exp(x) as f64 - want).abs() / ulp as f64);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1e30), exp(-87.0));
        assert!(exp(-87.0) > 0.0 && exp(-87.0) < 2e-38);
    }

    #[test]
    fn softmax_matches_the_f64_definition_and_is_the_same_at_every_level() {
        let mut rng = rvq::rng::SplitMix64::new(9);
        // Lengths below, at and past the 16 lanes; masks that cut both ends.
        for (n, lo, hi) in [
            (1, 0, 1),
            (16, 0, 16),
            (37, 3, 35),
            (300, 0, 300),
            (50, 49, 50),
        ] {
            let row: Vec<f32> = (0..n).map(|_| 20.0 * rng.normal()).collect();
            let scale = 0.125;
            let xs: Vec<f64> = row[lo..hi].iter().map(|&s| (s * scale) as f64).collect();
            let max = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = xs.iter().map(|x| (x - max).exp()).sum();
            let each = simd::at_each_level(|_| {
                let mut r = row.clone();
                softmax_masked(&mut r, lo, hi, scale);
                r
            });
            assert!(
                each.iter().all(|(_, r)| *r == each[0].1),
                "levels differ at {n}"
            );
            for (i, &p) in each[0].1.iter().enumerate() {
                let want = if (lo..hi).contains(&i) {
                    (xs[i - lo] - max).exp() / z
                } else {
                    0.0
                };
                assert!((p as f64 - want).abs() < 1e-6 * (1.0 + want), "{n}: {i}");
            }
        }
    }
}
