//! Attention terms computed from RVQ codes without building dense keys or values.
//!
//! Keys: the codewords of a block of keys are summed in the quantizer's group order
//! ([`Quantizer::sum_codewords`]), scaled, rotated there by [`GroupRope`] and dotted with
//! queries put in the same order. Nothing is scattered back into channel order. Values: each
//! stage's codes turn the attention weights into a histogram over its codebook, and one product
//! per stage with the codebook gives the output.
//! Both loops are compiled per instruction set ([`rvq::multiversion!`]).

use crate::rope::{GroupRope, Rope};
use rvq::kernels::dot_products;
use rvq::Quantizer;

/// Keys decoded per pass, as many as attention asks for at once (its 256-position blocks): their
/// sums ([256, head_dim] f32, 64 KB) stay in L2 while being rotated and multiplied.
const KEY_BLOCK: usize = 256;

rvq::multiversion! {
    /// `scores[r·stride + t] = scales[t] · q[r] · RoPE_{first_pos + t}(Σ codewords of key t)`,
    /// where `q` is [rows, hd] in group order, `codes` [n, groups·stages] and `scales` [n].
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

/// Query rows per histogram lane group: a histogram entry holds the weights of 4 rows, so
/// one token's update of one code is a single 4-wide add.
pub const HIST_LANES: usize = 4;

/// Entries of the value histograms of `rows` query rows: [stages·groups, C, lanes], where
/// lanes = `rows` rounded up to [`HIST_LANES`].
pub fn histogram_len(rvq: &dyn Quantizer, groups: usize, rows: usize) -> usize {
    rvq.stages() * groups * rvq.size() * rows.next_multiple_of(HIST_LANES)
}

rvq::multiversion! {
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
