//! A quantizer whose codebooks are held in i8 with one scale per stage and channel: half the
//! bytes of f16 codebooks, a quarter of f32's.
//!
//! Why: a decode step reads every layer's codebooks from memory (the encoder searches each
//! stage, attention gathers codewords), and at SmolLM2's size they are most of the bytes a
//! step reads from the cache side. Codeword c of stage s is `scale_s ⊙ q_{s,c}` with q in
//! −127..=127 and `scale_s[j]` the stage's range `max_c |book_s[c, j]| / 127` rounded up to a
//! whole number m_s[j] of one unit u[j] per channel: per channel, because keys keep uneven
//! channels after the std scaling; whole units, so that a vector's K codewords sum exactly in
//! i16 lanes (Σ_s m_s · q_s, 16 or 32 lanes an instruction) and convert to f32 once, instead of
//! each being converted and scaled in f32 (measured: 15–25% off RVQ attention in the model).
//!
//! An [`I8Rvq`] decodes as the f32 quantizer of its dequantized codewords ([`I8Rvq::to_rvq`])
//! within one rounding (its sums are exact until the last product), and encodes beams through
//! it. Greedy codes search the i8 codewords as held (a decode step's few vectors always, batches
//! where AVX-512 VNNI runs), against the residual multiplied by the stage's scales — the same
//! distances rounded another way, so a near tie may pick the other codeword.

use crate::aligned::LineAligned;
use crate::codec::{
    add_weighted_codewords, check_sums, encode_held, sum_codewords_each, sum_groups_d32, Codewords,
    HeldEncoder, Quantizer, RowWeights, ScaledI8,
};
use crate::kernels;
use crate::kernels::row_norms;
use crate::lanes::LaneWord;
use crate::search::{self, Kernel};
use crate::vnni_search::{self, StageBound};
use crate::{Result, Rvq};
use rayon::prelude::*;
use std::borrow::Cow;

/// Bound on Σ_s m_s of one channel's stage multipliers: with |q| ≤ 127 every sum of a vector's
/// K codewords, Σ_s m_s · q_s, fits an i16 (127 · 258 = 32766).
pub const MAX_MULTIPLIER_SUM: i32 = i16::MAX as i32 / 127;

/// A quantizer whose codebooks are held in i8. Stage s, channel j has step `unit[j] · m_s[j]`
/// with an integer multiplier m_s[j] — the stage's own range (max |c_j| / 127) rounded up to a
/// whole number of units, at most 1/m_s coarser — so that the codewords of a vector sum
/// exactly in i16 lanes, stage steps and all, before one conversion to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct I8Rvq {
    dim: usize,
    size: usize,
    /// [stages, size, dim] in one allocation from a cache line's start: a kernel gathering a
    /// vector's K codewords then addresses them all from one base.
    codebooks: LineAligned<i8>,
    /// [stages] of [dim]: `unit ⊙ multipliers[s]`
    scales: Vec<Vec<f32>>,
    /// [stages, dim]
    multipliers: Vec<i16>,
    /// [dim]
    unit: Vec<f32>,
    /// [stages] of [size]: squared norms of the dequantized codewords
    norms: Vec<Vec<f32>>,
    /// [stages]: what the integer search needs to bound its rounding
    bounds: Vec<StageBound>,
}

impl I8Rvq {
    /// `rvq`'s codebooks quantized per stage and channel, round to nearest on each stage's step
    /// (a channel that is zero in every codeword of every stage keeps unit 0; one zero in a stage
    /// gets multiplier 0 there). More stages than [`MAX_MULTIPLIER_SUM`] cannot all have a
    /// multiplier of at least 1 and are an error.
    pub fn from_rvq(rvq: &Rvq) -> Result<Self> {
        let (dim, size, k) = (rvq.dim(), rvq.size(), rvq.stages());
        if k as i32 > MAX_MULTIPLIER_SUM {
            return Err(crate::RvqError::Config(format!(
                "i8 codebooks hold at most {MAX_MULTIPLIER_SUM} stages (their sums must be exact \
                 in i16); this quantizer has {k}"
            )));
        }
        // [stages] of [dim]: each stage's own range per channel, max |c_j| / 127.
        let ranges: Vec<Vec<f32>> = (0..k)
            .map(|s| {
                let mut r = vec![0f32; dim];
                for word in rvq.codebook(s).chunks_exact(dim) {
                    r.iter_mut()
                        .zip(word)
                        .for_each(|(m, &v)| *m = m.max(v.abs()));
                }
                r.iter().map(|m| m / 127.0).collect()
            })
            .collect();
        let (multipliers, unit) = stage_multipliers(&ranges);
        let scales: Vec<Vec<f32>> = multipliers
            .iter()
            .map(|m| {
                m.iter()
                    .zip(&unit)
                    .map(|(&m, &u)| f32::from(m) * u)
                    .collect()
            })
            .collect();
        let codebooks: Vec<i8> = (0..k)
            .flat_map(|s| {
                let scale = &scales[s];
                rvq.codebook(s).chunks_exact(dim).flat_map(move |word| {
                    word.iter().zip(scale).map(|(&v, &sc)| match sc > 0.0 {
                        true => i8::from_f32(v / sc),
                        false => 0,
                    })
                })
            })
            .collect();
        let mut out = Self {
            dim,
            size,
            codebooks: LineAligned::from_slice(&codebooks),
            scales,
            multipliers: multipliers.concat(),
            unit,
            norms: Vec::with_capacity(k),
            bounds: Vec::with_capacity(k),
        };
        for s in 0..k {
            out.norms.push(row_norms(&out.dequantized(s), dim));
            out.bounds
                .push(StageBound::of(out.codebook(s), &out.norms[s]));
        }
        Ok(out)
    }

    /// The f32 quantizer of the same (dequantized) codewords.
    pub fn to_rvq(&self) -> Rvq {
        let books = (0..self.stages()).map(|s| self.dequantized(s)).collect();
        Rvq::from_codebooks(self.dim, self.size, books).expect("dequantized codebooks are finite")
    }

    /// Stage `stage`'s codebook as stored: [C, d] of i8.
    pub fn codebook(&self, stage: usize) -> &[i8] {
        let len = self.size * self.dim;
        &self.codebooks[stage * len..(stage + 1) * len]
    }

    /// Stage `stage`'s per-channel scales: [d].
    pub fn scales(&self, stage: usize) -> &[f32] {
        &self.scales[stage]
    }

    /// Stage `stage`'s multipliers of the unit: [d].
    pub fn multipliers(&self, stage: usize) -> &[i16] {
        &self.multipliers[stage * self.dim..(stage + 1) * self.dim]
    }

    /// The per-channel unit of every stage's step: [d].
    pub fn unit(&self) -> &[f32] {
        &self.unit
    }

    /// The codebooks and scales as the fused kernels gather them.
    fn scaled(&self) -> ScaledI8<'_> {
        ScaledI8::new(&self.codebooks, &self.multipliers, &self.unit)
    }

    /// Stage `stage`'s codebook as f32: [C, d], each entry unit · (m · q) — the integer product
    /// exact, one rounding, as the i16 sums of [`GroupSum`](crate::GroupSum) give a single codeword.
    fn dequantized(&self, stage: usize) -> Vec<f32> {
        let (book, d) = (self.codebook(stage), self.dim);
        let mut out = vec![0f32; book.len()];
        for (w, o) in book.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            dequantize(w, self.multipliers(stage), &self.unit, o);
        }
        out
    }

    /// Greedy codes of a few d = 32 vectors: each stage's i8 codebook searched as held by
    /// [`crate::row_search`] (through integer dot products where [`vnni_search`] runs, with the
    /// same codes), against the residual times the stage's scales (‖c‖² − 2·x·c =
    /// ‖c‖² − 2·(x ⊙ scale)·q); the residual then loses the dequantized codeword.
    fn encode_few_greedy(&self, x: &[f32], codes: &mut [u16]) {
        let (d, k) = (self.dim, self.stages());
        let m = x.len() / d;
        let mut residual = x.to_vec(); // [m, d]
        let mut scaled = vec![0f32; m * d];
        let mut best = vec![0u32; m];
        let mut word = vec![0f32; d];
        for s in 0..k {
            let scale = &self.scales[s];
            for (o, r) in scaled.chunks_exact_mut(d).zip(residual.chunks_exact(d)) {
                o.iter_mut()
                    .zip(r.iter().zip(scale))
                    .for_each(|(o, (r, sc))| *o = r * sc);
            }
            let next = if s + 1 < k { self.codebook(s + 1) } else { &[] };
            let book = self.codebook(s);
            let (norms, bound) = (&self.norms[s], self.bounds[s]);
            vnni_search::nearest_prefetching(book, norms, bound, &scaled, &mut best, next);
            for (r, rest) in residual.chunks_exact_mut(d).enumerate() {
                codes[r * k + s] = best[r] as u16;
                self.codeword_into(s, best[r] as usize, &mut word);
                rest.iter_mut().zip(&word).for_each(|(v, w)| *v -= w);
            }
        }
    }
}

/// `out[j] = unit[j] · (m[j] · q[j])`: the integer product exact, then one rounding.
fn dequantize(q: &[i8], m: &[i16], unit: &[f32], out: &mut [f32]) {
    for (((o, &q), &m), &u) in out.iter_mut().zip(q).zip(m).zip(unit) {
        *o = f32::from(i16::from(q) * m) * u;
    }
}

/// Per channel j, integer multipliers m_s[j] of one unit u[j] with m_s · u ≥ `ranges[s][j]`
/// (every stage's codewords fit ±127 steps) and Σ_s m_s ≤ [`MAX_MULTIPLIER_SUM`]: u = Σ_s r_s /
/// (258 − K), m_s = ⌈r_s / u⌉ ≤ r_s / u + 1. Returns ([stages] of [d] multipliers, [d] units).
fn stage_multipliers(ranges: &[Vec<f32>]) -> (Vec<Vec<i16>>, Vec<f32>) {
    let (k, dim) = (ranges.len(), ranges.first().map_or(0, Vec::len));
    let mut multipliers = vec![vec![0i16; dim]; k];
    let mut unit = vec![0f32; dim];
    let budget = (MAX_MULTIPLIER_SUM - k as i32).max(1) as f64;
    for j in 0..dim {
        let total: f64 = ranges.iter().map(|r| f64::from(r[j])).sum();
        if total == 0.0 {
            continue;
        }
        // Rounded up so that the f32 unit times ⌈r / u⌉ still covers r; at least the smallest
        // normal f32, below which every ⌈r / u⌉ of a normal codebook is 1 anyway.
        let mut u = ((total / budget) as f32).max(f32::MIN_POSITIVE);
        let ceil = |r: f32, u: f32| (f64::from(r) / f64::from(u)).ceil();
        while ranges.iter().map(|r| ceil(r[j], u)).sum::<f64>() > f64::from(MAX_MULTIPLIER_SUM) {
            u = f32::from_bits(u.to_bits() + 1);
        }
        unit[j] = u;
        for (m, r) in multipliers.iter_mut().zip(ranges) {
            m[j] = ceil(r[j], u) as i16;
        }
    }
    (multipliers, unit)
}

impl Quantizer for I8Rvq {
    fn dim(&self) -> usize {
        self.dim
    }
    fn size(&self) -> usize {
        self.size
    }
    fn stages(&self) -> usize {
        self.scales.len()
    }
    fn bytes(&self) -> u64 {
        // Per stage the i8 codebook, f32 squared norms, f32 scales, i16 multipliers and the
        // integer search's bound; the f32 unit.
        let stage =
            self.size * (self.dim + 4) + self.dim * (4 + 2) + std::mem::size_of::<StageBound>();
        (self.stages() * stage + self.dim * 4) as u64
    }
    fn codebook_f32(&self, stage: usize) -> Cow<'_, [f32]> {
        Cow::Owned(self.dequantized(stage))
    }
    fn codewords(&self) -> Codewords<'_> {
        Codewords::I8(self.scaled())
    }
    fn codeword_into(&self, stage: usize, code: usize, out: &mut [f32]) {
        let d = self.dim;
        let word = &self.codebook(stage)[code * d..(code + 1) * d];
        dequantize(word, self.multipliers(stage), &self.unit, out);
    }
    fn encode(&self, x: &[f32], beam: usize, codes: &mut [u16]) -> Result<()> {
        // A decode step's few vectors search the i8 codewords as held where the row search
        // runs; so do batches where the integer kernel runs, blocks of vectors on all threads
        // (several times the f32 lane kernel's rate on a dequantized copy: `examples/lanes_speed`).
        let (d, k) = (self.dim, self.stages());
        let few = |x: &[f32], codes: &mut [u16]| self.encode_few_greedy(x, codes);
        let batch = |x: &[f32], codes: &mut [u16]| {
            // An equal share per thread in whole kernel rows (a prompt of 60 tokens is 360
            // vectors: blocks of 256 would leave one thread 104), at most a block per task.
            let n = x.len() / d;
            let share = n.div_ceil(rayon::current_num_threads());
            let per_task = share
                .next_multiple_of(vnni_search::ROWS)
                .min(kernels::BLOCK);
            codes
                .par_chunks_mut(per_task * k)
                .zip(x.par_chunks(per_task * d))
                .for_each(|(codes, x)| self.encode_few_greedy(x, codes));
        };
        let greedy: Option<&HeldEncoder> = match search::kernel(d, x.len() / d) {
            Kernel::Rows => Some(&few),
            Kernel::Lanes if vnni_search::available() && vnni_search::takes(self.size) => {
                Some(&batch)
            }
            _ => None,
        };
        encode_held(self, x, beam, codes, greedy, || self.to_rvq())
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
        add_weighted_codewords(self.codebook(stage), d, weights, &mut sums, d);
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

    /// Channels of different spreads, as keys have.
    fn random_rvq(rng: &mut SplitMix64, d: usize, c: usize, k: usize) -> Rvq {
        crate::testkit::random_rvq_with(rng, d, c, k, |i| (1 + i % 5) as f32)
    }

    #[test]
    fn codewords_are_rounded_on_whole_units_that_cover_each_stage() {
        let mut rng = SplitMix64::new(8);
        let k = 3;
        let q = random_rvq(&mut rng, 32, 200, k);
        let i8q = I8Rvq::from_rvq(&q).unwrap();
        // Per stage 200 codewords of 32 bytes and an f32 norm each, 32 f32 scales and i16
        // multipliers, a bound of two f32; 32 f32 units.
        assert_eq!(
            i8q.bytes() as usize,
            k * (200 * (32 + 4) + 32 * 6 + 8) + 32 * 4
        );
        for j in 0..32 {
            let unit = i8q.unit()[j];
            let total: i32 = (0..k).map(|s| i32::from(i8q.multipliers(s)[j])).sum();
            assert!(total <= MAX_MULTIPLIER_SUM, "channel {j}: {total}");
            for s in 0..k {
                let range = (q.codebook(s).iter().skip(j).step_by(32))
                    .fold(0f32, |m, v| m.max(v.abs()))
                    / 127.0;
                // The stage's step covers its range, and is at most one unit coarser.
                let m = f32::from(i8q.multipliers(s)[j]);
                assert!(m * unit >= range && (m - 1.0) * unit < range, "{s} {j}");
                assert_eq!(i8q.scales(s)[j], m * unit);
            }
        }
        for s in 0..k {
            let (book, back) = (q.codebook(s), i8q.codebook_f32(s));
            for (i, (&b, &v)) in back.iter().zip(book).enumerate() {
                let step = i8q.scales(s)[i % 32];
                assert!((b - v).abs() <= 0.5 * step * (1.0 + 1e-5), "{s} {i}");
            }
        }
        // A channel that is zero everywhere stays zero (no 0/0); one zero in a single stage
        // gets multiplier 0 there.
        let books = vec![
            vec![0.0, 2.0, 0.0, -127.0, 0.0, 5.0],
            vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ];
        let z = I8Rvq::from_rvq(&Rvq::from_codebooks(2, 3, books.clone()).unwrap()).unwrap();
        assert_eq!(z.unit()[0], 0.0);
        assert_eq!(z.multipliers(1), &[0, 0]);
        assert!((0..3).all(|c| (z.codebook_f32(0)[2 * c + 1] - books[0][2 * c + 1]).abs() <= 0.5));
        assert!(z.codebook_f32(1).iter().all(|&v| v == 0.0));
        // More stages than whole units can be shared out: named, not wrapped.
        let many = Rvq::from_codebooks(2, 2, vec![vec![1.0, 1.0, -1.0, 0.5]; 259]).unwrap();
        let err = I8Rvq::from_rvq(&many).unwrap_err().to_string();
        assert!(
            err.contains("at most 258 stages") && err.contains("259"),
            "{err}"
        );
        assert!(I8Rvq::from_rvq(
            &Rvq::from_codebooks(2, 2, vec![vec![1.0, 1.0, -1.0, 0.5]; 258]).unwrap()
        )
        .is_ok());
    }

    /// Eight stages whose codewords sit at the channel's extreme, all with one sign: the i16
    /// sums reach 127 · Σ m and must neither wrap nor round, at every level.
    #[test]
    fn the_largest_sums_of_codewords_are_exact() {
        let (d, c, k) = (32, 4, 8);
        // Stage s spans ±2^-s; codeword 0 is +max, codeword 1 −max in every channel.
        let books: Vec<Vec<f32>> = (0..k)
            .map(|s| {
                let top = (0.5f32).powi(s as i32) * (1.0 + 0.1 * s as f32);
                (0..c * d)
                    .map(|i| match i / d {
                        0 => top,
                        1 => -top,
                        w => top * (w as f32 / 7.0 - 0.3),
                    })
                    .collect()
            })
            .collect();
        let q = I8Rvq::from_rvq(&Rvq::from_codebooks(d, c, books).unwrap()).unwrap();
        for sign in [0u16, 1] {
            let codes = vec![sign; 2 * k];
            let want: Vec<f64> = (0..2 * d)
                .map(|i| {
                    (0..k)
                        .map(|s| f64::from(q.codebook_f32(s)[sign as usize * d + i % d]))
                        .sum()
                })
                .collect();
            let mut got = vec![0f32; 2 * d];
            for (level, got) in simd::at_each_level(|_| {
                q.sum_codewords(2, &codes, &mut got);
                got.clone()
            }) {
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (f64::from(*g) - w).abs() <= 1e-6 * w.abs(),
                        "{level:?}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn decoding_matches_the_dequantized_f32_quantizer() {
        let mut rng = SplitMix64::new(9);
        for (d, groups) in [(32, 2), (6, 3)] {
            let q = I8Rvq::from_rvq(&random_rvq(&mut rng, d, 300, 4)).unwrap();
            let f = q.to_rvq();
            let n = 23;
            let codes: Vec<u16> = (0..n * groups * 4).map(|_| rng.below(300) as u16).collect();
            let (mut a, mut b) = (vec![0f32; n * groups * d], vec![0f32; n * groups * d]);
            let each = simd::at_each_level(|_| {
                q.sum_codewords(groups, &codes, &mut a);
                a.clone()
            });
            Quantizer::sum_codewords(&f, groups, &codes, &mut b);
            // Exact i16 sums, one conversion, one product: the same bits at every level.
            assert!(each.iter().all(|(_, a)| a == &each[0].1), "{d}");
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

    /// A batch (past the lane kernel's threshold, several blocks) gets, vector by vector, the
    /// codes each vector gets alone: batches and a decode step's few vectors search alike.
    #[test]
    fn batch_encoding_gives_each_vector_its_own_codes() {
        let mut rng = SplitMix64::new(11);
        let (c, k, n) = (2048, 8, 2 * kernels::BLOCK + 37);
        let q = I8Rvq::from_rvq(&random_rvq(&mut rng, 32, c, k)).unwrap();
        let x: Vec<f32> = (0..n * 32).map(|_| rng.normal() * 2.0).collect();
        let mut batch = vec![0u16; n * k];
        q.encode(&x, 1, &mut batch).unwrap();
        for (r, x) in x.chunks_exact(32).enumerate() {
            let mut alone = vec![0u16; k];
            q.encode(x, 1, &mut alone).unwrap();
            assert_eq!(&batch[r * k..(r + 1) * k], &alone[..], "vector {r}");
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
        let q = I8Rvq::from_rvq(&random_rvq(&mut rng, 32, c, k)).unwrap();
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
