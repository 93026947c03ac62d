//! Attention terms computed from RVQ codes without building dense keys or values.
//!
//! Keys: the codewords of a block of keys are summed in the quantizer's group order
//! ([`Quantizer::sum_codewords`]), scaled, rotated there by [`GroupRope`] and dotted with
//! queries put in the same order. Nothing is scattered back into channel order. A decode
//! step's few query rows take [`fused_key_scores`] instead: each key is summed, rotated and
//! dotted in registers, with nothing written but its scores. Values: each stage's codes turn
//! the attention weights into a histogram over its codebook, and one product per stage with
//! the codebook gives the output.
//! The loops are compiled per instruction set ([`simd::multiversion!`], [`simd::dispatch16!`]).

use crate::attention;
use crate::rope::{GroupRope, Rope};
use rvq::{Codewords, GroupSum, Quantizer};
use simd::matmul::dot_products;
use simd::vector::F32x16;

// Keys decoded per pass, as many as attention asks for at once: their sums ([KEY_BLOCK,
// head_dim] f32, 64 KB at head_dim 64) stay in L2 while being rotated and multiplied.
use attention::KEY_BLOCK;

/// Query rows up to which keys are scored by [`fused_key_scores`] (a decode step: the query
/// heads of one KV head for a token or a few); more rows share each rotated key through a
/// matrix product instead.
pub use crate::attention::FUSED_ROWS;

/// How many keys (or values) ahead the fused kernels ask for the codewords they will gather
/// to be cached. Measured (attend_speed at 8K with the caches flushed between calls, as the
/// model's weights flush them, i8 books, AVX2): 3.4 ms at 4 to 16 ahead vs 3.6 ms without.
const PREFETCH_KEYS: usize = 8;

/// The stage count the fused kernels are compiled for as a constant (the paper's K): their
/// codeword loops then unroll, every address a base plus an offset. With i8 books in one
/// allocation this took `kernel_speed` from 26.3 to 19.8 ns per key and 20.1 to 15.8 ns per
/// value, against the loop over a run-time count and per-stage allocations (unchecked
/// prefetch slices then 14.1 and 9.2 ns).
const UNROLLED_STAGES: usize = 8;

/// `K`, or the books' stage count where `K` is 0.
#[inline(always)]
fn stage_count<B: GroupSum, const K: usize>(books: B) -> usize {
    if K > 0 {
        K
    } else {
        books.stages()
    }
}

/// `scores[r·stride + t] = scales[t] · q[r] · RoPE_{first_pos + t}(Σ codewords of key t)`,
/// where `q` is [rows, hd] in group order, `codes` [n, groups·stages] and `scales` [n]. Few rows
/// over the paper's head shape go through [`fused_key_scores`], the rest block by block.
#[allow(clippy::too_many_arguments)]
pub fn key_scores(
    rvq: &dyn Quantizer,
    group_rope: &GroupRope,
    rope: &Rope,
    codes: &[u16],
    scales: &[f32],
    first_pos: usize,
    q: &[f32],
    scores: &mut [f32],
    stride: usize,
) {
    let rows = q.len() / rope.head_dim();
    if rows <= FUSED_ROWS && fuses(rvq, group_rope) {
        fused_key_scores(rvq, rope, codes, scales, first_pos, q, scores, stride);
        return;
    }
    key_scores_blocks(
        rvq, group_rope, rope, codes, scales, first_pos, q, scores, stride,
    );
}

/// Whether [`fused_key_scores`] takes these keys: a 64-channel head in two groups of d = 32
/// whose RoPE pairs are (j, 32 + j) at angle j — llama's interleaved pairs under the paper's
/// strided groups.
pub fn fuses(rvq: &dyn Quantizer, group_rope: &GroupRope) -> bool {
    rvq.dim() == 32 && group_rope.pairs_halves() && group_rope.head_dim() == 64
}

/// [`key_scores`] for keys that [`fuses`] takes, with at most [`FUSED_ROWS`] rows: per key the
/// two groups' codewords are summed in registers (stage 0 first, f16 converted as loaded), the
/// pair rotated (x·cos − y·sin, x·sin + y·cos, each one multiply and one fused multiply-add),
/// dotted with every row as x'₀·q₀, then + x'₁·q₁, + y'₀·q₂, + y'₁·q₃ (fused multiply-adds) over
/// 16-lane quarters, folded to 8 lanes and summed for 8 keys at once by
/// [`simd::vector::tree_sums8`], then scaled. Every level computes exactly this, so all give the
/// same bits.
#[allow(clippy::too_many_arguments)]
pub fn fused_key_scores(
    rvq: &dyn Quantizer,
    rope: &Rope,
    codes: &[u16],
    scales: &[f32],
    first_pos: usize,
    q: &[f32],
    scores: &mut [f32],
    stride: usize,
) {
    let (k, n) = (rvq.stages(), scales.len());
    let rows = q.len() / 64;
    assert!(rvq.dim() == 32 && rope.head_dim() == 64 && q.len() == rows * 64);
    assert_eq!(codes.len(), n * 2 * k, "codes: [n, 2·stages]");
    attention::check_fused_scores(rows, n, stride, scores, rope, first_pos);
    rvq::codec::assert_codes_below(codes, rvq.size());
    // Checked above: every code names a codeword inside its [C, 32] codebook, every position
    // a row of the RoPE table, every score a slot of `scores`.
    match rvq.codewords() {
        Codewords::F16(books) => {
            fused_scores(books, rope, codes, scales, first_pos, q, scores, stride)
        }
        Codewords::F32(books) => {
            fused_scores(books, rope, codes, scales, first_pos, q, scores, stride)
        }
        Codewords::I8(books) => {
            fused_scores(books, rope, codes, scales, first_pos, q, scores, stride)
        }
    }
}

simd::dispatch16! {
    fn fused_scores<B: GroupSum>(books: B, rope: &Rope, codes: &[u16], scales: &[f32], first_pos: usize, q: &[f32], scores: &mut [f32], stride: usize) = fused_scores_body;
}

/// See [`fused_key_scores`], which checks the shapes this relies on.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn fused_scores_body<V: F32x16, B: GroupSum>(
    avx2: bool,
    books: B,
    rope: &Rope,
    codes: &[u16],
    scales: &[f32],
    first_pos: usize,
    q: &[f32],
    scores: &mut [f32],
    stride: usize,
) {
    let args = (books, rope, codes, scales, first_pos, q, scores, stride);
    // A decode step's query rows (the GQA group) as a constant too: the rows' query quarters
    // then stay in registers across keys.
    const K: usize = UNROLLED_STAGES;
    match (books.stages() == K, q.len() / 64) {
        (true, 1) => fused_scores_stages::<V, B, K, 1>(avx2, args),
        (true, 2) => fused_scores_stages::<V, B, K, 2>(avx2, args),
        (true, 3) => fused_scores_stages::<V, B, K, 3>(avx2, args),
        (true, 4) => fused_scores_stages::<V, B, K, 4>(avx2, args),
        (true, _) => fused_scores_stages::<V, B, K, 0>(avx2, args),
        (false, _) => fused_scores_stages::<V, B, 0, 0>(avx2, args),
    }
}

/// The arguments of [`fused_scores_body`], passed on as one.
type ScoreArgs<'a, B> = (
    B,
    &'a Rope,
    &'a [u16],
    &'a [f32],
    usize,
    &'a [f32],
    &'a mut [f32],
    usize,
);

/// [`fused_scores_body`] with `K` stages and `R` query rows (0: the count read at run time).
#[inline(always)]
unsafe fn fused_scores_stages<V: F32x16, B: GroupSum, const K: usize, const R: usize>(
    avx2: bool,
    (books, rope, codes, scales, first_pos, q, scores, stride): ScoreArgs<B>,
) {
    let k = stage_count::<B, K>(books);
    let (n, rows) = (scales.len(), if R > 0 { R } else { q.len() / 64 });
    // With R a constant, the rows' query quarters are held in registers across keys.
    let held: [[V; 4]; R] =
        std::array::from_fn(|r| std::array::from_fn(|j| V::load(q.as_ptr().add(r * 64 + j * 16))));
    let key = |t: usize, i: usize, folded: &mut attention::Folded| {
        let c = codes.as_ptr().add(t * 2 * k);
        if t + PREFETCH_KEYS < n {
            let ahead = c.add(PREFETCH_KEYS * 2 * k);
            books.prefetch_group(std::slice::from_raw_parts(ahead, k));
            books.prefetch_group(std::slice::from_raw_parts(ahead.add(k), k));
        }
        let (x0, x1) = books.sum_group::<V>(std::slice::from_raw_parts(c, k));
        let (y0, y1) = books.sum_group::<V>(std::slice::from_raw_parts(c.add(k), k));
        let (cos, sin) = rope.angles(first_pos + t);
        let (c0, c1) = (V::load(cos.as_ptr()), V::load(cos.as_ptr().add(16)));
        let (s0, s1) = (V::load(sin.as_ptr()), V::load(sin.as_ptr().add(16)));
        let rx0 = x0.mul_sub(c0, y0.mul(s0));
        let rx1 = x1.mul_sub(c1, y1.mul(s1));
        let ry0 = x0.mul_add(s0, y0.mul(c0));
        let ry1 = x1.mul_add(s1, y1.mul(c1));
        for (r, folded) in folded.iter_mut().enumerate().take(rows) {
            let qr = match R {
                0 => std::array::from_fn(|j| V::load(q.as_ptr().add(r * 64 + j * 16))),
                _ => held[r],
            };
            let dot = rx0.mul(qr[0]);
            let dot = rx1.mul_add(qr[1], dot);
            let dot = ry0.mul_add(qr[2], dot);
            ry1.mul_add(qr[3], dot).fold8(folded[i].as_mut_ptr());
        }
    };
    let write = |r: usize, t0: usize, sums: &[f32]| {
        let out = &mut scores[r * stride + t0..][..sums.len()];
        for ((o, s), scale) in out.iter_mut().zip(sums).zip(&scales[t0..]) {
            *o = s * scale;
        }
    };
    attention::fused_scores_by_eights(avx2, n, rows, key, write);
}

simd::multiversion! {
    /// [`key_scores`] block by block: a block's keys summed into memory, scaled, rotated, then
    /// multiplied with all rows at once.
    fn key_scores_blocks(
        rvq: &dyn Quantizer,
        group_rope: &GroupRope,
        rope: &Rope,
        codes: &[u16],
        scales: &[f32],
        first_pos: usize,
        q: &[f32],
        scores: &mut [f32],
        stride: usize,
    ) = key_scores_body;
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn key_scores_body(
    rvq: &dyn Quantizer,
    group_rope: &GroupRope,
    rope: &Rope,
    codes: &[u16],
    scales: &[f32],
    first_pos: usize,
    q: &[f32],
    scores: &mut [f32],
    stride: usize,
) {
    let hd = rope.head_dim();
    let groups = hd / rvq.dim();
    let row = groups * rvq.stages();
    let rows = q.len() / hd;
    let block = KEY_BLOCK.min(scales.len());
    let mut keys = vec![0f32; block * hd];
    let mut block_scores = vec![0f32; rows * block];
    let mut scratch = vec![0f32; hd];
    for (b, (codes, scales)) in codes
        .chunks(KEY_BLOCK * row)
        .zip(scales.chunks(KEY_BLOCK))
        .enumerate()
    {
        let n = scales.len();
        let keys = &mut keys[..n * hd];
        rvq.sum_codewords(groups, codes, keys);
        let t0 = b * KEY_BLOCK;
        for (i, (k, &s)) in keys.chunks_exact_mut(hd).zip(scales).enumerate() {
            // Scaled, then rotated: the same arithmetic as decoding to channel order.
            k.iter_mut().for_each(|x| *x *= s);
            group_rope.rotate(rope, k, first_pos + t0 + i, &mut scratch);
        }
        // Plain loops for a decode step's few rows, a matrix product for a prefill's many.
        let bs = &mut block_scores[..rows * n];
        dot_products(rows, n, hd, q, keys, bs);
        for (r, bs) in bs.chunks_exact(n).enumerate() {
            scores[r * stride + t0..r * stride + t0 + n].copy_from_slice(bs);
        }
    }
}

/// `sums[r·groups·32 + g·32 + j] = Σ_t weights[r·n + t] · (Σ_s codeword of stage s named by
/// key t's code of group g)[j]` for the rows r of `sums` ([rows, n] weights, row-major, so a
/// caller builds them with contiguous, vectorised loops): the weighted value sums of a few
/// query rows ([rows, groups·32] in group order, as [`histograms_times_codebooks`] gives them)
/// with each value's codewords summed in registers, stage 0 first, then multiplied by each
/// row's weight and added, token by token. Per token it costs K·G codeword loads against the
/// histograms' K·G scattered adds, and nothing per codeword of the codebooks: measured cheaper
/// than the histograms at 512 to 32K tokens for a decode step's rows. d = 32 only.
pub fn fused_value_sums(
    rvq: &dyn Quantizer,
    groups: usize,
    codes: &[u16],
    weights: &[f32],
    sums: &mut [f32],
) {
    let k = rvq.stages();
    let n = codes.len() / (groups * k).max(1);
    assert!(
        rvq.dim() == 32 && codes.len() == n * groups * k,
        "codes: [n, groups·stages]"
    );
    let rows = sums.len() / (groups * 32).max(1);
    assert_eq!(sums.len(), rows * groups * 32, "sums: [rows, groups·32]");
    assert_eq!(weights.len(), rows * n, "weights: [rows, n]");
    rvq::codec::assert_codes_below(codes, rvq.size());
    // Checked above: every code names a codeword inside its [C, 32] codebook.
    match rvq.codewords() {
        Codewords::F16(books) => value_sums(books, groups, codes, weights, rows, sums),
        Codewords::F32(books) => value_sums(books, groups, codes, weights, rows, sums),
        Codewords::I8(books) => value_sums(books, groups, codes, weights, rows, sums),
    }
}

simd::dispatch16! {
    fn value_sums<B: GroupSum>(books: B, groups: usize, codes: &[u16], weights: &[f32], rows: usize, sums: &mut [f32]) = value_sums_body;
}

/// See [`fused_value_sums`]: one group at a time, up to four rows' sums in registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn value_sums_body<V: F32x16, B: GroupSum>(
    _avx2: bool,
    books: B,
    groups: usize,
    codes: &[u16],
    weights: &[f32],
    rows: usize,
    sums: &mut [f32],
) {
    for g in 0..groups {
        for r0 in (0..rows).step_by(4) {
            let chunk = (books, groups, g, codes, weights, r0, &mut *sums);
            match (books.stages() == UNROLLED_STAGES, rows - r0) {
                (true, 1) => value_sums_rows::<V, B, 1, UNROLLED_STAGES>(chunk),
                (true, 2) => value_sums_rows::<V, B, 2, UNROLLED_STAGES>(chunk),
                (true, 3) => value_sums_rows::<V, B, 3, UNROLLED_STAGES>(chunk),
                (true, _) => value_sums_rows::<V, B, 4, UNROLLED_STAGES>(chunk),
                (false, 1) => value_sums_rows::<V, B, 1, 0>(chunk),
                (false, 2) => value_sums_rows::<V, B, 2, 0>(chunk),
                (false, 3) => value_sums_rows::<V, B, 3, 0>(chunk),
                (false, _) => value_sums_rows::<V, B, 4, 0>(chunk),
            }
        }
    }
}

/// Group `g`, rows `r0..r0 + R` of [`fused_value_sums`].
type ValueChunk<'a, B> = (B, usize, usize, &'a [u16], &'a [f32], usize, &'a mut [f32]);

#[inline(always)]
unsafe fn value_sums_rows<V: F32x16, B: GroupSum, const R: usize, const K: usize>(
    (books, groups, g, codes, weights, r0, sums): ValueChunk<B>,
) {
    let k = stage_count::<B, K>(books);
    let row = groups * k;
    let n = codes.len() / row;
    let mut acc = [[V::zero(); 2]; R];
    for t in 0..n {
        let c = codes.as_ptr().add(t * row + g * k);
        if t + PREFETCH_KEYS < n {
            books.prefetch_group(std::slice::from_raw_parts(c.add(PREFETCH_KEYS * row), k));
        }
        let c = std::slice::from_raw_parts(c, k);
        let (lo, hi) = books.sum_group_unscaled::<V>(c);
        let w = weights.as_ptr().add(r0 * n + t);
        for (r, acc) in acc.iter_mut().enumerate() {
            let wr = V::splat(*w.add(r * n));
            acc[0] = wr.mul_add(lo, acc[0]);
            acc[1] = wr.mul_add(hi, acc[1]);
        }
    }
    // The books' unit, left out of every value's sum, once on each row's.
    let unit = books
        .unit()
        .map(|u| (V::load(u.as_ptr()), V::load(u.as_ptr().add(16))));
    for (r, acc) in acc.iter().enumerate() {
        let out = sums.as_mut_ptr().add(((r0 + r) * groups + g) * 32);
        let (lo, hi) = match unit {
            Some((u0, u1)) => (acc[0].mul(u0), acc[1].mul(u1)),
            None => (acc[0], acc[1]),
        };
        lo.store(out);
        hi.store(out.add(16));
    }
}

/// Query rows per histogram lane group: a histogram entry holds the weights of 4 rows, so
/// one token's update of one code is a single 4-wide add.
pub const HIST_LANES: usize = 4;

/// Entries of the value histograms of `rows` query rows: [stages·groups, C, lanes], where
/// lanes = `rows` rounded up to [`HIST_LANES`].
pub fn histogram_len(rvq: &dyn Quantizer, groups: usize, rows: usize) -> usize {
    rvq.stages() * groups * rvq.size() * rows.next_multiple_of(HIST_LANES)
}

simd::multiversion! {
    /// Accumulates `hist[(stage·groups + g)·C + code][r] += weights[t][r]` over the codes of
    /// tokens t (`codes` [n, groups·stages]; `weights` [n, lanes]: attention weight times scale,
    /// rows padded with zeros to the lanes of [`histogram_len`]).
    pub fn value_histograms(rvq: &dyn Quantizer, groups: usize, codes: &[u16], weights: &[f32], hist: &mut [f32]) = value_histograms_body;
}

#[inline(always)]
fn value_histograms_body(
    rvq: &dyn Quantizer,
    groups: usize,
    codes: &[u16],
    weights: &[f32],
    hist: &mut [f32],
) {
    let (k, c) = (rvq.stages(), rvq.size());
    let row = groups * k;
    if codes.is_empty() {
        return;
    }
    let lanes = weights.len() / (codes.len() / row);
    // One (stage, group) histogram at a time: its C·lanes floats (32 KB at C = 2048, 4 lanes)
    // stay in L1 while every token adds to it; all of them at once would not fit in L2.
    for g in 0..groups {
        for st in 0..k {
            let hist = &mut hist[(st * groups + g) * c * lanes..][..c * lanes];
            if lanes == HIST_LANES {
                add_four_lanes(hist, &codes[g * k + st..], row, weights, c);
                continue;
            }
            for (codes, w) in codes.chunks_exact(row).zip(weights.chunks_exact(lanes)) {
                let at = codes[g * k + st] as usize * lanes;
                for (h, w) in hist[at..at + lanes]
                    .chunks_exact_mut(HIST_LANES)
                    .zip(w.chunks_exact(HIST_LANES))
                {
                    for l in 0..HIST_LANES {
                        h[l] += w[l];
                    }
                }
            }
        }
    }
}

/// One histogram of [`value_histograms`] with 4 lanes: `hist[code][..4] += weights[t][..4]`
/// for the codes `codes[t·row]` of tokens t (each < `c`, checked). Written out for the common
/// lane count: the general loop's run-time bounds and lane count made each add cost ~3.7
/// cycles (kernel_speed).
#[inline(always)]
fn add_four_lanes(hist: &mut [f32], codes: &[u16], row: usize, weights: &[f32], c: usize) {
    let n = weights.len() / HIST_LANES;
    assert!(hist.len() == c * HIST_LANES && (n == 0 || codes.len() > (n - 1) * row));
    for (t, w) in weights.chunks_exact(HIST_LANES).enumerate() {
        let code = codes[t * row] as usize;
        assert!(code < c, "code {code} ≥ C = {c}");
        let h: &mut [f32; HIST_LANES] = (&mut hist[code * HIST_LANES..][..HIST_LANES])
            .try_into()
            .expect("four lanes");
        for l in 0..HIST_LANES {
            h[l] += w[l];
        }
    }
}

/// `sums[r, g·d..(g+1)·d] = Σ_stage Σ_code hist[(stage·groups + g)·C + code][r] · codeword`:
/// the histograms of [`value_histograms`] times their codebooks, read as stored (f16 codewords
/// are converted as they are loaded, not a stage at a time); `sums` is [rows, groups·d] in
/// group order.
pub fn histograms_times_codebooks(
    rvq: &dyn Quantizer,
    groups: usize,
    hist: &[f32],
    rows: usize,
    sums: &mut [f32],
) {
    let (k, c, d) = (rvq.stages(), rvq.size(), rvq.dim());
    let lanes = rows.next_multiple_of(HIST_LANES);
    sums.fill(0.0);
    for st in 0..k {
        for g in 0..groups {
            let h = &hist[(st * groups + g) * c * lanes..][..c * lanes];
            rvq.add_weighted_codewords(st, (h, lanes, rows), &mut sums[g * d..], groups * d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::check_scores_at_every_level;
    use crate::rope::RopeLayout;
    use rvq::rng::SplitMix64;
    use rvq::{Grouping, HalfRvq, I8Rvq, Rvq, VectorLayout};

    /// Slow reference: key t decoded in f64 in channel order (strided groups), scaled, rotated
    /// with llama's interleaved pairs at its position, dotted with each row's channel-order query.
    fn reference(
        rvq: &Rvq,
        rope: &Rope,
        codes: &[u16],
        scales: &[f32],
        first_pos: usize,
        q: &[f32],
    ) -> Vec<f64> {
        let (k, n, rows) = (rvq.stages(), scales.len(), q.len() / 64);
        let mut out = vec![0f64; rows * n];
        for t in 0..n {
            let mut key = [0f64; 64];
            for g in 0..2 {
                for s in 0..k {
                    let w = rvq.codeword(s, codes[t * 2 * k + g * k + s] as usize);
                    for (j, &x) in w.iter().enumerate() {
                        key[2 * j + g] += x as f64; // strided: group g holds channels g, g+2, …
                    }
                }
            }
            let (cos, sin) = rope.angles(first_pos + t);
            let mut rotated = [0f64; 64];
            for i in 0..32 {
                let (a, b) = (
                    key[2 * i] * scales[t] as f64,
                    key[2 * i + 1] * scales[t] as f64,
                );
                let (c, s) = (cos[i] as f64, sin[i] as f64);
                rotated[2 * i] = a * c - b * s;
                rotated[2 * i + 1] = a * s + b * c;
            }
            for r in 0..rows {
                out[r * n + t] = (0..64).map(|j| q[r * 64 + j] as f64 * rotated[j]).sum();
            }
        }
        out
    }

    #[test]
    fn fused_scores_equal_the_slow_reference_at_every_level() {
        // K = 8 runs the unrolled kernels (with rows 1–4 as constants too), K = 5 the loops.
        for k in [UNROLLED_STAGES, 5] {
            fused_scores_match_the_reference(k);
        }
    }

    fn fused_scores_match_the_reference(k: usize) {
        let mut rng = SplitMix64::new(31 + k as u64);
        let (c, n, first_pos) = (300, 37, 90); // 37: four blocks of 8 keys and a tail of 5
        let books = (0..k)
            .map(|s| (0..c * 32).map(|_| rng.normal() / (s + 1) as f32).collect())
            .collect();
        // f16-valued codewords, so the f32 and f16 quantizers hold the same numbers.
        let rvq = HalfRvq::from_rvq(&Rvq::from_codebooks(32, c, books).unwrap())
            .unwrap()
            .to_rvq();
        let half = HalfRvq::from_rvq(&rvq).unwrap();
        let rope = Rope::new(64, 10000.0, 200, RopeLayout::Interleaved);
        let layout = VectorLayout::new(64, 32, Grouping::Strided, true).unwrap();
        let group_rope = GroupRope::new(&rope, &layout).unwrap();
        assert!(fuses(&rvq, &group_rope) && fuses(&half, &group_rope));
        let codes: Vec<u16> = (0..n * 2 * k).map(|_| rng.below(c) as u16).collect();
        let scales: Vec<f32> = (0..n).map(|_| 0.5 + rng.unit() as f32).collect();
        for rows in [1, 2, 3, 4, 5, 8] {
            let q_channels: Vec<f32> = (0..rows * 64).map(|_| rng.normal()).collect();
            let mut q = vec![0f32; rows * 64];
            for (g, c) in q.chunks_exact_mut(64).zip(q_channels.chunks_exact(64)) {
                group_rope.to_group_order(c, g);
            }
            // i8 books hold other values (scaled as loaded): checked against the reference of
            // their dequantized codewords.
            let int8 = I8Rvq::from_rvq(&rvq).unwrap();
            let want = reference(&rvq, &rope, &codes, &scales, first_pos, &q_channels);
            let want_int8 = reference(
                &int8.to_rvq(),
                &rope,
                &codes,
                &scales,
                first_pos,
                &q_channels,
            );
            let stride = n + 4;
            let mut by_books = vec![];
            for (quantizer, want) in [
                (&rvq as &dyn Quantizer, &want),
                (&half, &want),
                (&int8, &want_int8),
            ] {
                let mut each = simd::at_each_level(|_| {
                    let mut scores = vec![f32::NAN; rows * stride];
                    key_scores(
                        quantizer,
                        &group_rope,
                        &rope,
                        &codes,
                        &scales,
                        first_pos,
                        &q,
                        &mut scores,
                        stride,
                    );
                    scores
                });
                let want = |r: usize, t: usize| want[r * n + t];
                check_scores_at_every_level(&each, want, (rows, n, stride));
                by_books.push(each.swap_remove(0).1);
            }
            // f32 and f16 books holding the same values give the same bits.
            assert!(by_books[0]
                .iter()
                .zip(&by_books[1])
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn fused_value_sums_equal_the_slow_sum_at_every_level() {
        // K = 8 runs the unrolled kernel, K = 4 the loop over stages.
        for k in [UNROLLED_STAGES, 4] {
            fused_value_sums_match_the_slow_sum(k);
        }
    }

    fn fused_value_sums_match_the_slow_sum(k: usize) {
        let mut rng = SplitMix64::new(37 + k as u64);
        let (c, n) = (50, 29);
        let books = (0..k)
            .map(|_| (0..c * 32).map(|_| rng.normal()).collect())
            .collect();
        let rvq = HalfRvq::from_rvq(&Rvq::from_codebooks(32, c, books).unwrap())
            .unwrap()
            .to_rvq();
        let half = HalfRvq::from_rvq(&rvq).unwrap();
        // Rows 1–8: every partial chunk of four (1, 2, 3), whole ones, and whole plus partial.
        for (groups, rows) in [
            (2usize, 1usize),
            (2, 2),
            (2, 3),
            (3, 4),
            (2, 6),
            (2, 7),
            (1, 8),
        ] {
            let codes: Vec<u16> = (0..n * groups * k).map(|_| rng.below(c) as u16).collect();
            // [rows, n]
            let weights: Vec<f32> = (0..rows * n).map(|_| rng.unit() as f32).collect();
            // Σ_t weight · (Σ_s codeword) in f64, per row and group, from `books`' codewords.
            let weighted_sums = |books: &Rvq| {
                let mut want = vec![0f64; rows * groups * 32];
                for t in 0..n {
                    for g in 0..groups {
                        for s in 0..k {
                            let w = books.codeword(s, codes[(t * groups + g) * k + s] as usize);
                            for r in 0..rows {
                                for (j, &x) in w.iter().enumerate() {
                                    want[(r * groups + g) * 32 + j] +=
                                        weights[r * n + t] as f64 * x as f64;
                                }
                            }
                        }
                    }
                }
                want
            };
            // i8 books hold other values: checked against their dequantized codewords' sums.
            let int8 = I8Rvq::from_rvq(&rvq).unwrap();
            let (want, want_int8) = (weighted_sums(&rvq), weighted_sums(&int8.to_rvq()));
            for (quantizer, want) in [
                (&rvq as &dyn Quantizer, &want),
                (&half, &want),
                (&int8, &want_int8),
            ] {
                let each = simd::at_each_level(|_| {
                    let mut sums = vec![0f32; rows * groups * 32];
                    fused_value_sums(quantizer, groups, &codes, &weights, &mut sums);
                    sums
                });
                for (level, got) in &each {
                    for (a, w) in got.iter().zip(want) {
                        let at = format!("{groups} groups, {rows} rows, {level:?}");
                        assert!((*a as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{at}");
                    }
                }
                assert!(each.iter().all(|(_, s)| *s == each[0].1), "levels differ");
            }
        }
    }
}
