//! A quantizer whose codebooks are held in i8 with one f32 scale per stage and channel: half
//! the bytes of f16 codebooks, a quarter of f32's.
//!
//! Why: a decode step reads every layer's codebooks from memory (the encoder searches each
//! stage, attention gathers codewords), and at SmolLM2's size they are most of the bytes a
//! step reads from the cache side. Codeword c of stage s is `scale_s ⊙ q_{s,c}` with q in
//! −127..=127 and `scale_s[j] = max_c |book_s[c, j]| / 127`: per channel, because keys keep
//! uneven channels after the std scaling.
//!
//! An [`I8Rvq`] decodes exactly as the f32 quantizer of its dequantized codewords
//! ([`I8Rvq::to_rvq`]), and encodes batches through it. A decode step's few vectors are
//! searched on the i8 codewords as held, against the residual multiplied by the stage's scales
//! — the same distances rounded another way, so a near tie may pick the other codeword.

use crate::codec::{
    add_weighted_codewords, check_sums, encode_held, sum_codewords_each, sum_groups_d32, Codewords,
    Quantizer, RowWeights, ScaledI8,
};
use crate::kernels::row_norms;
use crate::lanes::LaneWord;
use crate::{Result, Rvq};
use std::borrow::Cow;

/// A quantizer whose codebooks are held in i8 with per-stage, per-channel f32 scales.
#[derive(Clone, Debug, PartialEq)]
pub struct I8Rvq {
    dim: usize,
    size: usize,
    /// [stages] of [size, dim]
    codebooks: Vec<Vec<i8>>,
    /// [stages] of [dim]
    scales: Vec<Vec<f32>>,
    /// [stages] of [size]: squared norms of the dequantized codewords
    norms: Vec<Vec<f32>>,
}

impl I8Rvq {
    /// `rvq`'s codebooks quantized per stage and channel (round to nearest; a channel that is
    /// zero in every codeword keeps scale 0).
    pub fn from_rvq(rvq: &Rvq) -> Self {
        let (dim, size) = (rvq.dim(), rvq.size());
        let mut out = Self {
            dim,
            size,
            codebooks: Vec::with_capacity(rvq.stages()),
            scales: Vec::with_capacity(rvq.stages()),
            norms: Vec::with_capacity(rvq.stages()),
        };
        for s in 0..rvq.stages() {
            let book = rvq.codebook(s);
            let mut scale = vec![0f32; dim];
            for word in book.chunks_exact(dim) {
                for (m, &v) in scale.iter_mut().zip(word) {
                    *m = m.max(v.abs());
                }
            }
            scale.iter_mut().for_each(|m| *m /= 127.0);
            let q: Vec<i8> = book
                .chunks_exact(dim)
                .flat_map(|word| {
                    word.iter().zip(&scale).map(|(&v, &sc)| match sc > 0.0 {
                        true => i8::from_f32(v / sc),
                        false => 0,
                    })
                })
                .collect();
            out.codebooks.push(q);
            out.scales.push(scale);
            out.norms.push(row_norms(&out.dequantized(s), dim));
        }
        out
    }

    /// The f32 quantizer of the same (dequantized) codewords.
    pub fn to_rvq(&self) -> Rvq {
        let books = (0..self.stages()).map(|s| self.dequantized(s)).collect();
        Rvq::from_codebooks(self.dim, self.size, books).expect("dequantized codebooks are finite")
    }

    /// Stage `stage`'s codebook as stored: [C, d] of i8.
    pub fn codebook(&self, stage: usize) -> &[i8] {
        &self.codebooks[stage]
    }

    /// Stage `stage`'s per-channel scales: [d].
    pub fn scales(&self, stage: usize) -> &[f32] {
        &self.scales[stage]
    }

    /// The codebooks and scales as the fused kernels gather them.
    fn scaled(&self) -> ScaledI8<'_> {
        ScaledI8 {
            books: &self.codebooks,
            scales: &self.scales,
        }
    }

    /// Stage `stage`'s codebook as f32: [C, d].
    fn dequantized(&self, stage: usize) -> Vec<f32> {
        let scale = &self.scales[stage];
        self.codebooks[stage]
            .chunks_exact(self.dim)
            .flat_map(|w| w.iter().zip(scale).map(|(&q, &sc)| q.to_f32() * sc))
            .collect()
    }

    /// Greedy codes of a few d = 32 vectors: each stage's i8 codebook searched as held by
    /// [`crate::row_search`], against the residual times the stage's scales (‖c‖² − 2·x·c =
    /// ‖c‖² − 2·(x ⊙ scale)·q); the residual then loses the dequantized codeword.
    fn encode_few_greedy(&self, x: &[f32], codes: &mut [u16]) {
        let (d, k) = (self.dim, self.stages());
        let m = x.len() / d;
        let mut residual = x.to_vec(); // [m, d]
        let mut scaled = vec![0f32; m * d];
        let mut best = vec![0u32; m];
        for s in 0..k {
            let scale = &self.scales[s];
            for (o, r) in scaled.chunks_exact_mut(d).zip(residual.chunks_exact(d)) {
                o.iter_mut()
                    .zip(r.iter().zip(scale))
                    .for_each(|(o, (r, sc))| *o = r * sc);
            }
            let next = self.codebooks.get(s + 1).map_or(&[][..], |b| &b[..]);
            let book = &self.codebooks[s];
            crate::row_search::nearest_prefetching(book, &self.norms[s], &scaled, &mut best, next);
            for (r, rest) in residual.chunks_exact_mut(d).enumerate() {
                codes[r * k + s] = best[r] as u16;
                let word = &book[best[r] as usize * d..][..d];
                for ((v, q), sc) in rest.iter_mut().zip(word).zip(scale) {
                    *v -= q.to_f32() * sc;
                }
            }
        }
    }
}

impl Quantizer for I8Rvq {
    fn dim(&self) -> usize {
        self.dim
    }
    fn size(&self) -> usize {
        self.size
    }
    fn stages(&self) -> usize {
        self.codebooks.len()
    }
    fn bytes(&self) -> u64 {
        (self.stages() * (self.size * self.dim + self.dim * 4)) as u64
    }
    fn codebook_f32(&self, stage: usize) -> Cow<'_, [f32]> {
        Cow::Owned(self.dequantized(stage))
    }
    fn codewords(&self) -> Codewords<'_> {
        Codewords::I8(self.scaled())
    }
    fn codeword_into(&self, stage: usize, code: usize, out: &mut [f32]) {
        let d = self.dim;
        let word = &self.codebooks[stage][code * d..(code + 1) * d];
        for ((o, q), sc) in out.iter_mut().zip(word).zip(&self.scales[stage]) {
            *o = q.to_f32() * sc;
        }
    }
    fn encode(&self, x: &[f32], beam: usize, codes: &mut [u16]) -> Result<()> {
        // A decode step's few vectors search the i8 codewords as held where the row search runs.
        let few = |x: &[f32], codes: &mut [u16]| self.encode_few_greedy(x, codes);
        let few = crate::row_search::available(self.dim).then_some(&few as _);
        encode_held(self, x, beam, codes, few, || self.to_rvq())
    }
    fn sum_codewords(&self, groups: usize, codes: &[u16], acc: &mut [f32]) {
        check_sums(self, groups, codes, acc);
        match self.dim {
            32 => sum_groups_d32(self.scaled(), codes, acc),
            _ => sum_codewords_each(self, codes, acc),
        }
    }
    fn add_weighted_codewords(
        &self,
        stage: usize,
        weights: RowWeights,
        out: &mut [f32],
        stride: usize,
    ) {
        // Σ_c w_c · (scale ⊙ q_c) = scale ⊙ Σ_c w_c · q_c: the i8 codewords weighted as held,
        // then scaled once per row.
        let (d, rows) = (self.dim, weights.2);
        let mut sums = vec![0f32; rows * d];
        add_weighted_codewords(&self.codebooks[stage], d, weights, &mut sums, d);
        let scale = &self.scales[stage];
        for (r, sums) in sums.chunks_exact(d).enumerate() {
            let o = &mut out[r * stride..r * stride + d];
            for ((o, s), sc) in o.iter_mut().zip(sums).zip(scale) {
                *o += s * sc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random_rvq(rng: &mut SplitMix64, d: usize, c: usize, k: usize) -> Rvq {
        // Channels of different spreads, as keys have.
        let books = (0..k)
            .map(|s| {
                (0..c * d)
                    .map(|i| rng.normal() * (1 + i % d % 5) as f32 / (s + 1) as f32)
                    .collect()
            })
            .collect();
        Rvq::from_codebooks(d, c, books).unwrap()
    }

    #[test]
    fn codewords_are_the_per_channel_rounding_of_the_f32_ones() {
        let mut rng = SplitMix64::new(8);
        let q = random_rvq(&mut rng, 32, 200, 3);
        let i8q = I8Rvq::from_rvq(&q);
        assert_eq!(i8q.bytes(), 3 * (200 * 32 + 32 * 4));
        for s in 0..3 {
            let book = q.codebook(s);
            for j in 0..32 {
                let max = book
                    .iter()
                    .skip(j)
                    .step_by(32)
                    .fold(0f32, |m, v| m.max(v.abs()));
                assert_eq!(i8q.scales(s)[j], max / 127.0);
            }
            let back = i8q.codebook_f32(s);
            for (i, (&b, &v)) in back.iter().zip(book).enumerate() {
                // Within half a step of the f32 value, and the channel's extreme exactly ±127.
                let step = i8q.scales(s)[i % 32];
                assert!((b - v).abs() <= 0.5 * step * (1.0 + 1e-5), "{s} {i}");
            }
            let q_book = i8q.codebook(s);
            assert!((0..32).all(|j| q_book.iter().skip(j).step_by(32).any(|q| q.abs() == 127)));
        }
        // A channel that is zero everywhere stays zero (no 0/0).
        let book = vec![0.0, 2.0, 0.0, -127.0, 0.0, 5.0];
        let z = I8Rvq::from_rvq(&Rvq::from_codebooks(2, 3, vec![book.clone()]).unwrap());
        assert_eq!(z.scales(0), &[0.0, 1.0]);
        assert_eq!(*z.codebook_f32(0), book);
    }

    #[test]
    fn decoding_matches_the_dequantized_f32_quantizer() {
        let mut rng = SplitMix64::new(9);
        for (d, groups) in [(32, 2), (6, 3)] {
            let q = I8Rvq::from_rvq(&random_rvq(&mut rng, d, 300, 4));
            let f = q.to_rvq();
            let n = 23;
            let codes: Vec<u16> = (0..n * groups * 4).map(|_| rng.below(300) as u16).collect();
            let (mut a, mut b) = (vec![0f32; n * groups * d], vec![0f32; n * groups * d]);
            let each = crate::simd::at_each_level(|_| {
                q.sum_codewords(groups, &codes, &mut a);
                a.clone()
            });
            Quantizer::sum_codewords(&f, groups, &codes, &mut b);
            for (level, a) in &each {
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{d} {level:?}");
                }
            }
            // The weighted codewords of one stage, against the f32 quantizer's.
            let rows = 3;
            let w: Vec<f32> = (0..300 * 4).map(|_| rng.unit() as f32).collect();
            let (mut a, mut b) = (vec![1f32; rows * 2 * d], vec![1f32; rows * 2 * d]);
            q.add_weighted_codewords(2, (&w, 4, rows), &mut a, 2 * d);
            f.add_weighted_codewords(2, (&w, 4, rows), &mut b, 2 * d);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{d}");
            }
        }
    }

    /// The few-vector search finds, at every stage, a codeword whose distance to the residual
    /// is the smallest (f64) within float rounding; codes equal the f32 quantizer's but for
    /// such near ties.
    #[test]
    fn few_vector_encoding_picks_the_nearest_codeword_at_every_stage() {
        // Without AVX2 the vectors go through the f32 quantizer, and all of this holds exactly.
        let mut rng = SplitMix64::new(10);
        let (c, k, m) = (2048, 8, 6);
        let q = I8Rvq::from_rvq(&random_rvq(&mut rng, 32, c, k));
        let f = q.to_rvq();
        let x: Vec<f32> = (0..m * 32).map(|_| rng.normal() * 2.0).collect();
        let mut codes = vec![0u16; m * k];
        q.encode(&x, 1, &mut codes).unwrap();
        let mut want = vec![0u16; m * k];
        f.encode(&x, 1, &mut want).unwrap();
        let agree = codes.iter().zip(&want).filter(|(a, b)| a == b).count();
        assert!(
            agree * 100 >= 95 * codes.len(),
            "{agree} of {}",
            codes.len()
        );
        for r in 0..m {
            let mut residual: Vec<f64> =
                x[r * 32..(r + 1) * 32].iter().map(|&v| v as f64).collect();
            for s in 0..k {
                let dist = |code: usize| -> f64 {
                    let w = f.codeword(s, code);
                    residual
                        .iter()
                        .zip(w)
                        .map(|(a, &b)| (a - b as f64).powi(2))
                        .sum()
                };
                let best = (0..c).map(dist).fold(f64::INFINITY, f64::min);
                let got = dist(codes[r * k + s] as usize);
                let norm: f64 = residual.iter().map(|v| v * v).sum();
                assert!(
                    got - best <= 1e-5 * (norm + best),
                    "row {r} stage {s}: {got} vs {best}"
                );
                for (a, &b) in residual
                    .iter_mut()
                    .zip(f.codeword(s, codes[r * k + s] as usize))
                {
                    *a -= b as f64;
                }
            }
        }
    }
}
