//! Greedy encoding of a handful of vectors — a decode step's, a few per quantizer — at full
//! multiply-add rate.
//!
//! A decode step encodes ~6 vectors per quantizer: too few for a matrix product to pay for its
//! packing. [`FewVectorEncoder`] keeps each stage's codebook in [`crate::lanes`] groups of f16 and
//! searches them with the lane kernel. Those lanes are a second copy of the codebooks (half their
//! f32 bytes), which is why callers opt in; the codewords the codes stand for, and the residuals
//! between stages, stay the quantizer's f32 ones. Only the search sees f16-rounded codewords.

use crate::lanes::{LaneBook, DIM, ROWS};
use crate::quantizer::check_vectors;
use crate::{check_finite, Quantizer, Result, RvqError};
use half::f16;

/// A quantizer's codebooks in f16 lane groups, for [`FewVectorEncoder::encode`].
#[derive(Clone, Debug)]
pub struct FewVectorEncoder {
    /// One per stage.
    books: Vec<LaneBook<f16>>,
}

impl FewVectorEncoder {
    /// The lane layout of `rvq`'s codebooks; `None` unless d = 32 and the lane kernel runs here
    /// ([`crate::lanes::available`]), so no copy is made that would not be used.
    pub fn new(rvq: &dyn Quantizer) -> Option<Self> {
        if !crate::lanes::available(rvq.dim()) {
            return None;
        }
        let books = (0..rvq.stages())
            .map(|s| LaneBook::new(&rvq.codebook_f32(s), rvq.dim()))
            .collect::<Option<_>>()?;
        Some(Self { books })
    }

    /// Bytes of the lane copy (what opting in costs).
    pub fn bytes(&self) -> u64 {
        self.books.iter().map(LaneBook::bytes).sum()
    }

    /// Greedy codes of `x` ([n, 32]) into `codes` ([n, stages]), as [`crate::Rvq::encode`] with beam 1
    /// except that each stage's nearest codeword is searched among the f16-rounded codewords
    /// (ties to the lower index). Always `Ok(true)` (an encoder exists only where the lane
    /// kernel runs); the `bool` lets callers treat it as an optional fast path.
    pub fn encode(&self, rvq: &dyn Quantizer, x: &[f32], codes: &mut [u16]) -> Result<bool> {
        let k = rvq.stages();
        if self.books.len() != k {
            return Err(RvqError::Input(format!(
                "lane encoder of {} stages asked to encode for {k}",
                self.books.len()
            )));
        }
        check_vectors(DIM, k, x, codes.len(), "vectors to encode")?;
        check_finite(x, "vectors to encode")?;
        let mut residual = [0f32; ROWS * DIM];
        let (mut best, mut value) = ([0u32; ROWS], [0f32; ROWS]);
        let mut codeword = [0f32; DIM];
        for (xs, codes) in x.chunks(ROWS * DIM).zip(codes.chunks_mut(ROWS * k)) {
            let m = xs.len() / DIM;
            let residual = &mut residual[..xs.len()];
            residual.copy_from_slice(xs);
            for (s, book) in self.books.iter().enumerate() {
                book.nearest(residual, &mut best[..m], &mut value[..m]);
                for (r, rest) in residual.chunks_exact_mut(DIM).enumerate() {
                    codes[r * k + s] = best[r] as u16;
                    rvq.codeword_into(s, best[r] as usize, &mut codeword);
                    for (v, c) in rest.iter_mut().zip(&codeword) {
                        *v -= c;
                    }
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::Rvq;
    use simd::at_each_level;

    /// Slow greedy encoding: exact distances in f64 to the f16-rounded codewords, residuals left
    /// by the f32 ones, stage by stage.
    fn reference(q: &Rvq, x: &[f32]) -> Vec<u16> {
        let mut residual: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        (0..q.stages())
            .map(|s| {
                let dist = |c: usize| -> f64 {
                    let cw = q.codeword(s, c);
                    residual
                        .iter()
                        .zip(cw)
                        .map(|(r, &w)| (r - f16::from_f32(w).to_f32() as f64).powi(2))
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
            let Some(few) = FewVectorEncoder::new(&q) else {
                assert!(!crate::lanes::available(DIM), "the lane kernel runs here");
                eprintln!("no AVX2 here: the lane encoder is not built and not tested");
                return;
            };
            assert_eq!(few.bytes(), 4 * (c.next_multiple_of(16) * DIM * 2) as u64);
            let x: Vec<f32> = (0..n * DIM).map(|_| rng.normal()).collect();
            let want: Vec<u16> = x.chunks_exact(DIM).flat_map(|v| reference(&q, v)).collect();
            for (level, codes) in at_each_level(|_| {
                let mut codes = vec![0u16; n * 4];
                assert!(few.encode(&q, &x, &mut codes).unwrap());
                codes
            }) {
                assert_eq!(codes, want, "C {c}, {n} vectors, {level:?}");
            }
        }
    }

    #[test]
    fn bad_input_and_other_shapes() {
        let other = Rvq::from_codebooks(8, 2, vec![vec![0.0; 16]]).unwrap();
        assert!(FewVectorEncoder::new(&other).is_none(), "d = 32 only");
        let q = Rvq::from_codebooks(DIM, 2, vec![vec![0.5; 2 * DIM]]).unwrap();
        let Some(few) = FewVectorEncoder::new(&q) else {
            eprintln!("no AVX2 here: the lane encoder is not built and not tested");
            return;
        };
        let mut codes = vec![0u16; 1];
        let mut x = vec![0f32; DIM];
        x[3] = f32::NAN;
        assert!(few
            .encode(&q, &x, &mut codes)
            .unwrap_err()
            .to_string()
            .contains("NaN"));
        assert!(few.encode(&q, &[0.0; 31], &mut codes).is_err());
    }
}
