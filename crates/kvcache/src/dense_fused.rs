//! A decode step's attention on a dense (f32 or f16) cache in registers.
//!
//! The generic path ([`crate::attention::dense_attention`]) reads a block of keys into f32,
//! rotates it in memory and multiplies; for a decode step's few query rows that is mostly
//! copies. Here each key is converted, rotated by RoPE and dotted with every row while it is
//! in registers, and each value is added with each row's weight as it is loaded — the same
//! treatment the RVQ cache's codes get ([`crate::rvq::kernels`]), so the two compare fairly.
//! Written once against [`F32x16`] ([`simd::dispatch16!`]): every level gives the same bits,
//! and the rotation is [`Rope::rotate`]'s arithmetic exactly.

use crate::attention;
use crate::rope::{Rope, RopeLayout};
use rvq::lanes::LaneWord;
use simd::vector::F32x16;

/// Query rows up to which the fused kernels run (as for the RVQ cache).
pub use crate::attention::FUSED_ROWS;

/// Whether the fused kernels take heads of this RoPE: 64, 128 or 256 channels.
pub fn fuses(rope: &Rope) -> bool {
    matches!(rope.head_dim(), 64 | 128 | 256)
}

/// `scores[r·stride + t] = q[r] · RoPE_{first_pos + t}(keys[t])` for `keys` [n, hd] before
/// RoPE and `q` [rows ≤ FUSED_ROWS, hd] rotated, both in channel order. Products are summed
/// over 16-lane chunks as a balanced tree, folded to 8 lanes and reduced for 8 keys at once.
pub fn key_scores<E: LaneWord>(
    keys: &[E],
    rope: &Rope,
    first_pos: usize,
    q: &[f32],
    scores: &mut [f32],
    stride: usize,
) {
    let hd = rope.head_dim();
    let (n, rows) = (keys.len() / hd, q.len() / hd);
    assert!(fuses(rope) && keys.len() == n * hd && q.len() == rows * hd);
    attention::check_fused_scores(rows, n, stride, scores, rope, first_pos);
    // Checked above: every key, query row, table row and score slot is in bounds.
    dense_scores(keys, rope, first_pos, q, scores, stride);
}

simd::dispatch16! {
    fn dense_scores<E: LaneWord>(keys: &[E], rope: &Rope, first_pos: usize, q: &[f32], scores: &mut [f32], stride: usize) = dense_scores_body;
}

#[inline(always)]
unsafe fn dense_scores_body<V: F32x16, E: LaneWord>(
    avx2: bool,
    keys: &[E],
    rope: &Rope,
    first_pos: usize,
    q: &[f32],
    scores: &mut [f32],
    stride: usize,
) {
    let args = (keys, rope, first_pos, q, &mut *scores, stride);
    match (rope.head_dim(), rope.layout()) {
        (64, RopeLayout::Interleaved) => scores_ch::<V, E, 4, true>(avx2, args),
        (64, RopeLayout::HalfSplit) => scores_ch::<V, E, 4, false>(avx2, args),
        (128, RopeLayout::Interleaved) => scores_ch::<V, E, 8, true>(avx2, args),
        (128, RopeLayout::HalfSplit) => scores_ch::<V, E, 8, false>(avx2, args),
        (256, RopeLayout::Interleaved) => scores_ch::<V, E, 16, true>(avx2, args),
        (256, RopeLayout::HalfSplit) => scores_ch::<V, E, 16, false>(avx2, args),
        (hd, _) => unreachable!("head_dim {hd}: `fuses` admits 64, 128 and 256"),
    }
}

/// −1 in even lanes, +1 in odd: b·sin enters a' negated and a·sin enters b' as is.
const SIGNS: [f32; 16] = [
    -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0,
];

type ScoreArgs<'a, E> = (&'a [E], &'a Rope, usize, &'a [f32], &'a mut [f32], usize);

/// [`key_scores`] for heads of `CH` 16-lane chunks, interleaved RoPE pairs or half-split.
#[inline(always)]
unsafe fn scores_ch<V: F32x16, E: LaneWord, const CH: usize, const INTERLEAVED: bool>(
    avx2: bool,
    (keys, rope, first_pos, q, scores, stride): ScoreArgs<E>,
) {
    let hd = CH * 16;
    let (n, rows) = (keys.len() / hd, q.len() / hd);
    let sign = V::load(SIGNS.as_ptr());
    let key = |t: usize, i: usize, folded: &mut attention::Folded| {
        let k = keys.as_ptr().add(t * hd);
        let x: [V; CH] = std::array::from_fn(|j| E::load16(k.add(16 * j)));
        let (cos, sin) = rope.angles(first_pos + t);
        let (cos, sin) = (cos.as_ptr(), sin.as_ptr());
        let mut r = [V::zero(); CH];
        if INTERLEAVED {
            // Chunk j holds pairs 8j..8j+8: a' = a·cos − b·sin, b' = b·cos + a·sin.
            for j in 0..CH {
                let (c, s) = (
                    V::load(cos.add(16 * (j / 2))),
                    V::load(sin.add(16 * (j / 2))),
                );
                let (c, s) = if j % 2 == 0 {
                    (c.dup_lo(), s.dup_lo())
                } else {
                    (c.dup_hi(), s.dup_hi())
                };
                r[j] = x[j].mul_add(c, x[j].swap_pairs().mul(s).mul(sign));
            }
        } else {
            // Chunk j < CH/2 pairs with chunk j + CH/2: lo' = lo·cos − hi·sin, hi' = lo·sin + hi·cos.
            for j in 0..CH / 2 {
                let (c, s) = (V::load(cos.add(16 * j)), V::load(sin.add(16 * j)));
                let (lo, hi) = (x[j], x[j + CH / 2]);
                r[j] = lo.mul_sub(c, hi.mul(s));
                r[j + CH / 2] = lo.mul_add(s, hi.mul(c));
            }
        }
        for (row, folded) in folded.iter_mut().enumerate().take(rows) {
            let qr = q.as_ptr().add(row * hd);
            let q = |j: usize| V::load(qr.add(16 * j));
            // Chunk pairs' products fused (one rounding for the pair), then a tree over them.
            let mut pairs = [V::zero(); CH];
            for j in 0..CH / 2 {
                pairs[j] = r[2 * j].mul_add(q(2 * j), r[2 * j + 1].mul(q(2 * j + 1)));
            }
            tree(&pairs, CH / 2).fold8(folded[i].as_mut_ptr());
        }
    };
    let write = |row: usize, t0: usize, sums: &[f32]| {
        scores[row * stride + t0..][..sums.len()].copy_from_slice(sums);
    };
    attention::fused_scores_by_eights(avx2, n, rows, key, write);
}

/// Σ of the first `len` of `xs` (a power of two) as a balanced tree of adjacent pairs:
/// (x0 + x1) + (x2 + x3) for four.
#[inline(always)]
unsafe fn tree<V: F32x16, const N: usize>(xs: &[V; N], len: usize) -> V {
    let mut xs = *xs;
    let mut len = len;
    while len > 1 {
        for j in 0..len / 2 {
            xs[j] = xs[2 * j].add(xs[2 * j + 1]);
        }
        len /= 2;
    }
    xs[0]
}

/// `out[r, ..] = Σ_t probs[r·n + t] · values[t]` for `values` [n, hd] and `probs` [rows ≤
/// FUSED_ROWS, n]: each value loaded once per block of four rows and 64 channels and added
/// with each row's weight, token by token.
pub fn weighted_values<E: LaneWord>(values: &[E], hd: usize, probs: &[f32], out: &mut [f32]) {
    let n = values.len() / hd.max(1);
    let rows = out.len() / hd.max(1);
    assert!(hd.is_multiple_of(64) && values.len() == n * hd && out.len() == rows * hd);
    assert!(
        rows <= FUSED_ROWS && probs.len() == rows * n,
        "probs: [rows, n]"
    );
    // Checked above: every value, weight and output is in bounds.
    dense_values(values, hd, probs, out);
}

simd::dispatch16! {
    fn dense_values<E: LaneWord>(values: &[E], hd: usize, probs: &[f32], out: &mut [f32]) = dense_values_body;
}

#[inline(always)]
unsafe fn dense_values_body<V: F32x16, E: LaneWord>(
    _avx2: bool,
    values: &[E],
    hd: usize,
    probs: &[f32],
    out: &mut [f32],
) {
    let rows = out.len() / hd;
    for c0 in (0..hd).step_by(64) {
        for r0 in (0..rows).step_by(4) {
            let args = (values, hd, c0, probs, r0, &mut *out);
            match rows - r0 {
                1 => values_rows::<V, E, 1>(args),
                2 => values_rows::<V, E, 2>(args),
                3 => values_rows::<V, E, 3>(args),
                _ => values_rows::<V, E, 4>(args),
            }
        }
    }
}

type ValueArgs<'a, E> = (&'a [E], usize, usize, &'a [f32], usize, &'a mut [f32]);

/// Channels `c0..c0 + 64` of rows `r0..r0 + R` of [`weighted_values`].
#[inline(always)]
unsafe fn values_rows<V: F32x16, E: LaneWord, const R: usize>(
    (values, hd, c0, probs, r0, out): ValueArgs<E>,
) {
    let n = values.len() / hd;
    let mut acc = [[V::zero(); 4]; R];
    for t in 0..n {
        let v = values.as_ptr().add(t * hd + c0);
        let x: [V; 4] = std::array::from_fn(|j| E::load16(v.add(16 * j)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let w = V::splat(*probs.get_unchecked((r0 + r) * n + t));
            for (a, x) in acc.iter_mut().zip(&x) {
                *a = w.mul_add(*x, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let o = out.as_mut_ptr().add((r0 + r) * hd + c0);
        for (j, a) in acc.iter().enumerate() {
            a.store(o.add(16 * j));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::check_scores_at_every_level;
    use half::f16;
    use rvq::rng::SplitMix64;

    /// Keys and queries for `hd`, f16-valued so that f32 and f16 storage hold the same numbers.
    fn data(rng: &mut SplitMix64, len: usize) -> (Vec<f32>, Vec<f16>) {
        let h: Vec<f16> = (0..len).map(|_| f16::from_f32(rng.normal())).collect();
        (h.iter().map(|x| x.to_f32()).collect(), h)
    }

    #[test]
    fn fused_scores_are_rotate_then_dot_for_both_layouts_at_every_level() {
        let mut rng = SplitMix64::new(41);
        for hd in [64, 128, 256] {
            for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
                let rope = Rope::new(hd, 10000.0, 100, layout);
                let (n, first_pos) = (21, 70); // two blocks of 8 keys and a tail of 5
                let (k32, k16) = data(&mut rng, n * hd);
                for rows in [1, 3, FUSED_ROWS] {
                    let q: Vec<f32> = (0..rows * hd).map(|_| rng.normal()).collect();
                    // Reference: the same rotation as the generic path, dot products in f64.
                    let mut rotated = k32.clone();
                    rope.rotate_rows(&mut rotated, first_pos);
                    let stride = n + 3;
                    let each = simd::at_each_level(|_| {
                        let mut s32 = vec![f32::NAN; rows * stride];
                        let mut s16 = vec![f32::NAN; rows * stride];
                        key_scores(&k32, &rope, first_pos, &q, &mut s32, stride);
                        key_scores(&k16, &rope, first_pos, &q, &mut s16, stride);
                        assert!(s32
                            .iter()
                            .zip(&s16)
                            .all(|(a, b)| a.to_bits() == b.to_bits()));
                        s32
                    });
                    let want = |r: usize, t: usize| -> f64 {
                        (0..hd)
                            .map(|c| q[r * hd + c] as f64 * rotated[t * hd + c] as f64)
                            .sum()
                    };
                    check_scores_at_every_level(&each, want, (rows, n, stride));
                }
            }
        }
    }

    #[test]
    fn fused_values_are_the_weighted_sum_at_every_level() {
        let mut rng = SplitMix64::new(43);
        for (hd, rows) in [(64, 1), (64, 3), (128, 5), (256, FUSED_ROWS)] {
            let n = 37;
            let (v32, v16) = data(&mut rng, n * hd);
            let probs: Vec<f32> = (0..rows * n).map(|_| rng.unit() as f32).collect();
            let each = simd::at_each_level(|_| {
                let mut o32 = vec![0f32; rows * hd];
                let mut o16 = vec![0f32; rows * hd];
                weighted_values(&v32, hd, &probs, &mut o32);
                weighted_values(&v16, hd, &probs, &mut o16);
                assert_eq!(o32, o16);
                o32
            });
            for (level, got) in &each {
                for r in 0..rows {
                    for c in 0..hd {
                        let want: f64 = (0..n)
                            .map(|t| probs[r * n + t] as f64 * v32[t * hd + c] as f64)
                            .sum();
                        let a = got[r * hd + c] as f64;
                        assert!(
                            (a - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{hd} {rows} {level:?}"
                        );
                    }
                }
            }
            assert!(each.iter().all(|(_, o)| *o == each[0].1), "levels differ");
        }
    }
}
