//! Greedy encoding of a handful of vectors — a decode step's, a few per quantizer — at full
//! multiply-add rate.
//!
//! A matrix product over 6 rows × C codewords × d = 32 spends its time packing and reducing; here
//! each codebook is also kept transposed in lane groups ([C/16][d][16]: dimension j of 16
//! codewords side by side), so 16 codewords' dot products with up to 6 vectors accumulate in 12
//! registers by broadcast multiply-adds, with no horizontal sums. It costs a second copy of the
//! codebooks (the same bytes again), which is why callers opt in.

use crate::kernels::row_norms;
use crate::{check_finite, Result, Rvq, RvqError};

/// Codewords side by side in one lane group.
const LANES: usize = 16;
/// Vectors searched at once: 6 × 2 accumulators + 2 codeword loads + 1 broadcast fit the 16
/// AVX2 registers.
const ROWS: usize = 6;
/// The only group dimension the kernel is written for (the paper's).
const DIM: usize = 32;

/// A quantizer's codebooks in lane groups, for [`FewVectorEncoder::encode`].
#[derive(Clone, Debug)]
pub struct FewVectorEncoder {
    /// [stages] of [ceil(C/16)][DIM][16]; codewords past C are zero.
    lanes: Vec<Vec<f32>>,
    /// [stages] of [ceil(C/16)·16]: squared norms, +∞ past C so padding never wins.
    norms: Vec<Vec<f32>>,
}

impl FewVectorEncoder {
    /// The lane layout of `rvq`'s codebooks; `None` unless d = 32.
    pub fn new(rvq: &Rvq) -> Option<Self> {
        if rvq.dim() != DIM {
            return None;
        }
        let padded = rvq.size().next_multiple_of(LANES);
        let (lanes, norms) = (0..rvq.stages())
            .map(|s| {
                let book = rvq.codebook(s);
                let mut t = vec![0f32; padded * DIM];
                for (i, cw) in book.chunks_exact(DIM).enumerate() {
                    for (j, &v) in cw.iter().enumerate() {
                        t[((i / LANES) * DIM + j) * LANES + i % LANES] = v;
                    }
                }
                let mut n = row_norms(book, DIM);
                n.resize(padded, f32::INFINITY);
                (t, n)
            })
            .unzip();
        Some(Self { lanes, norms })
    }

    /// Bytes of the lane copy (what opting in costs).
    pub fn bytes(&self) -> u64 {
        self.lanes.iter().map(|t| t.len() as u64 * 4).sum()
    }

    /// Greedy codes of `x` ([n, 32]) into `codes` ([n, stages]), as [`Rvq::encode`] with beam 1
    /// (ties to the lower index; dot products summed in another order, so a near-tie within float
    /// rounding may resolve to the other codeword). `Ok(false)` when this CPU or the forced
    /// [`crate::simd::level`] has no AVX2: the caller encodes the ordinary way.
    pub fn encode(&self, rvq: &Rvq, x: &[f32], codes: &mut [u16]) -> Result<bool> {
        let k = rvq.stages();
        if self.lanes.len() != k || !x.len().is_multiple_of(DIM) || codes.len() != x.len() / DIM * k
        {
            return Err(RvqError::Input(format!(
                "{} values and {} code slots do not make vectors of {DIM} with {k} codes",
                x.len(),
                codes.len()
            )));
        }
        check_finite(x, "vectors to encode")?;
        #[cfg(target_arch = "x86_64")]
        if crate::simd::level() >= crate::simd::Level::Avx2 {
            let mut residual = vec![0f32; ROWS * DIM];
            let mut best = [0u32; ROWS];
            for (xs, codes) in x.chunks(ROWS * DIM).zip(codes.chunks_mut(ROWS * k)) {
                let m = xs.len() / DIM;
                residual.fill(0.0); // rows past m stay zero
                residual[..xs.len()].copy_from_slice(xs);
                for s in 0..k {
                    // SAFETY: the level says the CPU has AVX2 and FMA; the layout's shapes are
                    // its own construction ([blocks][32][16] and [blocks·16]).
                    unsafe { nearest_avx2(&residual, &self.lanes[s], &self.norms[s], &mut best) };
                    for r in 0..m {
                        codes[r * k + s] = best[r] as u16;
                        let cw = rvq.codeword(s, best[r] as usize);
                        for (v, c) in residual[r * DIM..(r + 1) * DIM].iter_mut().zip(cw) {
                            *v -= c;
                        }
                    }
                }
            }
            return Ok(true);
        }
        Ok(false)
    }
}

/// `best[r]` = argmin over codewords of ‖c‖² − 2·x_r·c for the 6 rows of `x` ([6, 32]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nearest_avx2(x: &[f32], lanes: &[f32], norms: &[f32], best: &mut [u32; ROWS]) {
    use std::arch::x86_64::*;
    assert!(x.len() == ROWS * DIM && lanes.len() == norms.len() * DIM);
    let (xp, lp) = (x.as_ptr(), lanes.as_ptr());
    let mut min_val = [_mm256_set1_ps(f32::INFINITY); 2 * ROWS];
    let mut min_idx = [_mm256_setzero_si256(); 2 * ROWS];
    let two = _mm256_set1_ps(2.0);
    let step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for b in 0..norms.len() / LANES {
        let block = lp.add(b * DIM * LANES);
        // acc[2r + h]: dot products of row r with codewords 16b + 8h .. 16b + 8h + 8.
        let mut acc = [_mm256_setzero_ps(); 2 * ROWS];
        for j in 0..DIM {
            let lo = _mm256_loadu_ps(block.add(j * LANES));
            let hi = _mm256_loadu_ps(block.add(j * LANES + 8));
            for r in 0..ROWS {
                let xj = _mm256_broadcast_ss(&*xp.add(r * DIM + j));
                acc[2 * r] = _mm256_fmadd_ps(xj, lo, acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(xj, hi, acc[2 * r + 1]);
            }
        }
        for h in 0..2 {
            let first = b * LANES + 8 * h;
            let norm = _mm256_loadu_ps(norms.as_ptr().add(first));
            let idx = _mm256_add_epi32(_mm256_set1_epi32(first as i32), step);
            for r in 0..ROWS {
                let a = 2 * r + h;
                let v = _mm256_fnmadd_ps(two, acc[a], norm); // ‖c‖² − 2·x·c
                let lower = _mm256_cmp_ps(v, min_val[a], _CMP_LT_OQ);
                min_val[a] = _mm256_blendv_ps(min_val[a], v, lower);
                min_idx[a] = _mm256_castps_si256(_mm256_blendv_ps(
                    _mm256_castsi256_ps(min_idx[a]),
                    _mm256_castsi256_ps(idx),
                    lower,
                ));
            }
        }
    }
    for (r, out) in best.iter_mut().enumerate() {
        let (mut bv, mut bi) = (f32::INFINITY, 0u32);
        for a in [2 * r, 2 * r + 1] {
            let (mut vals, mut idx) = ([0f32; 8], [0u32; 8]);
            _mm256_storeu_ps(vals.as_mut_ptr(), min_val[a]);
            _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, min_idx[a]);
            for (&v, &i) in vals.iter().zip(&idx) {
                if v < bv || (v == bv && i < bi) {
                    (bv, bi) = (v, i);
                }
            }
        }
        *out = bi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::simd::{at_each_level, Level};

    /// Slow greedy encoding: exact distances in f64, stage by stage.
    fn reference(q: &Rvq, x: &[f32]) -> Vec<u16> {
        let mut residual: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        (0..q.stages())
            .map(|s| {
                let dist = |c: usize| -> f64 {
                    let cw = q.codeword(s, c);
                    residual
                        .iter()
                        .zip(cw)
                        .map(|(r, &w)| (r - w as f64).powi(2))
                        .sum()
                };
                let best = (0..q.size())
                    .min_by(|&a, &b| dist(a).total_cmp(&dist(b)))
                    .unwrap();
                let cw = q.codeword(s, best);
                residual
                    .iter_mut()
                    .zip(cw)
                    .for_each(|(r, &w)| *r -= w as f64);
                best as u16
            })
            .collect()
    }

    #[test]
    fn encodes_as_the_slow_greedy_reference() {
        let mut rng = SplitMix64::new(3);
        for (c, n) in [(2048, 6), (37, 13), (16, 1), (300, 7)] {
            let books = (0..4)
                .map(|s| {
                    (0..c * DIM)
                        .map(|_| rng.normal() / (s + 1) as f32)
                        .collect()
                })
                .collect();
            let q = Rvq::from_codebooks(DIM, c, books).unwrap();
            let few = FewVectorEncoder::new(&q).unwrap();
            assert_eq!(few.bytes(), 4 * (c.next_multiple_of(16) * DIM * 4) as u64);
            let x: Vec<f32> = (0..n * DIM).map(|_| rng.normal()).collect();
            let want: Vec<u16> = x.chunks_exact(DIM).flat_map(|v| reference(&q, v)).collect();
            for (level, got) in at_each_level(|_| {
                let mut codes = vec![0u16; n * 4];
                few.encode(&q, &x, &mut codes).unwrap().then_some(codes)
            }) {
                match got {
                    Some(codes) => assert_eq!(codes, want, "C {c}, {n} vectors, {level:?}"),
                    None => assert_eq!(level, Level::Portable, "AVX2 takes the kernel"),
                }
            }
        }
    }

    #[test]
    fn bad_input_and_other_shapes() {
        let q = Rvq::from_codebooks(DIM, 2, vec![vec![0.5; 2 * DIM]]).unwrap();
        let few = FewVectorEncoder::new(&q).unwrap();
        let mut codes = vec![0u16; 1];
        let mut x = vec![0f32; DIM];
        x[3] = f32::NAN;
        assert!(few
            .encode(&q, &x, &mut codes)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
        assert!(few.encode(&q, &[0.0; 31], &mut codes).is_err());
        let other = Rvq::from_codebooks(8, 2, vec![vec![0.0; 16]]).unwrap();
        assert!(FewVectorEncoder::new(&other).is_none(), "d = 32 only");
    }
}
