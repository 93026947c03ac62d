//! The residual quantizer: K codebooks of C codewords of dimension d.

use crate::kernels::{self, row_norms};
use crate::lanes::LaneBook;
use crate::search::{self, Kernel};
use crate::{bits_for, check_finite, Result, RvqError};
use rayon::prelude::*;
use simd::matmul::dot_products;

#[derive(Clone, Debug, PartialEq)]
pub struct Rvq {
    dim: usize,
    size: usize,
    /// [stages] of [size, dim]
    codebooks: Vec<Vec<f32>>,
    /// [stages] of [size]: squared norms of the codewords
    norms: Vec<Vec<f32>>,
}

impl Rvq {
    /// Builds a quantizer from codebooks ([stages] of [size * dim]).
    pub fn from_codebooks(dim: usize, size: usize, codebooks: Vec<Vec<f32>>) -> Result<Self> {
        validate_shape(dim, size, codebooks.len())?;
        for (k, cb) in codebooks.iter().enumerate() {
            if cb.len() != size * dim {
                return Err(RvqError::Config(format!(
                    "codebook {k} holds {} values, expected {size} x {dim}",
                    cb.len()
                )));
            }
            check_finite(cb, &format!("codebook {k}"))?;
        }
        let norms = codebooks.iter().map(|cb| row_norms(cb, dim)).collect();
        Ok(Self {
            dim,
            size,
            codebooks,
            norms,
        })
    }

    /// Vector dimension d.
    pub fn dim(&self) -> usize {
        self.dim
    }
    /// Codewords per stage, C.
    pub fn size(&self) -> usize {
        self.size
    }
    /// Number of stages, K.
    pub fn stages(&self) -> usize {
        self.codebooks.len()
    }
    /// Bits of one code: ceil(log2 C).
    pub fn code_bits(&self) -> u32 {
        bits_for(self.size)
    }
    /// Bits to store one vector's codes (K codes).
    pub fn vector_bits(&self) -> u64 {
        self.stages() as u64 * self.code_bits() as u64
    }
    pub fn codebook(&self, stage: usize) -> &[f32] {
        &self.codebooks[stage]
    }
    /// All codebooks: [stages] of [size, dim].
    pub fn codebooks(&self) -> &[Vec<f32>] {
        &self.codebooks
    }
    pub fn codeword(&self, stage: usize, code: usize) -> &[f32] {
        &self.codebooks[stage][code * self.dim..(code + 1) * self.dim]
    }
    pub(crate) fn codebook_mut(&mut self, stage: usize) -> &mut Vec<f32> {
        &mut self.codebooks[stage]
    }
    pub(crate) fn refresh_norms(&mut self, stage: usize) {
        self.norms[stage] = row_norms(&self.codebooks[stage], self.dim);
    }
    pub(crate) fn norms(&self, stage: usize) -> &[f32] {
        &self.norms[stage]
    }
    /// Bytes of the codebooks as stored (f32).
    pub fn codebook_bytes(&self) -> u64 {
        (self.stages() * self.size * self.dim * 4) as u64
    }

    /// Encodes vectors `x` ([n, dim]) into `codes` ([n, stages]). `beam` = 1 is greedy (the
    /// paper); wider beams keep the `beam` best partial encodings across stages.
    pub fn encode(&self, x: &[f32], beam: usize, codes: &mut [u16]) -> Result<()> {
        check_vectors(self.dim, self.stages(), x, codes.len(), "vectors to encode")?;
        check_finite(x, "vectors to encode")?;
        if beam == 0 {
            return Err(RvqError::Config("beam width must be at least 1".into()));
        }
        if beam == 1 {
            self.encode_greedy(x, codes);
        } else {
            self.encode_beam(x, beam, codes);
        }
        Ok(())
    }

    /// Truncates to the first `stages` stages. Training is stage by stage, so these are the
    /// codebooks a `stages`-stage training with the same seed and data would learn.
    pub fn truncated(&self, stages: usize) -> Result<Self> {
        if stages == 0 || stages > self.stages() {
            return Err(RvqError::Config(format!(
                "stages={stages}: the quantizer has 1..={} stages",
                self.stages()
            )));
        }
        Ok(Self {
            dim: self.dim,
            size: self.size,
            codebooks: self.codebooks[..stages].to_vec(),
            norms: self.norms[..stages].to_vec(),
        })
    }

    /// Greedy encoding, stage by stage over blocks of vectors.
    fn encode_greedy(&self, x: &[f32], codes: &mut [u16]) {
        let (d, k) = (self.dim, self.stages());
        match search::kernel(d, x.len() / d) {
            Kernel::Lanes => return self.encode_greedy_lanes(x, codes),
            Kernel::Rows => {
                return crate::row_search::encode_greedy(&self.codebooks, &self.norms, x, codes)
            }
            Kernel::Matmul => {}
        }
        codes
            .par_chunks_mut(kernels::BLOCK * k)
            .zip(x.par_chunks(kernels::BLOCK * d))
            .for_each_init(Vec::new, |scores, (codes, xb)| {
                let mut residual = xb.to_vec(); // [m, d]
                for s in 0..k {
                    let (book, norms) = (&self.codebooks[s], &self.norms[s]);
                    greedy_stage(book, norms, d, &mut residual, scores, |r, code| {
                        codes[r * k + s] = code
                    });
                }
            });
    }

    /// [`encode_greedy`](Self::encode_greedy) through the lane kernel: the codebooks laid out in
    /// lanes once per call, each block's nearest codewords found without a score matrix.
    fn encode_greedy_lanes(&self, x: &[f32], codes: &mut [u16]) {
        let (d, k) = (self.dim, self.stages());
        let books: Vec<LaneBook<f32>> = self
            .codebooks
            .iter()
            .map(|cb| LaneBook::new(cb, d).expect("d = 32, checked by the caller"))
            .collect();
        codes
            .par_chunks_mut(kernels::BLOCK * k)
            .zip(x.par_chunks(kernels::BLOCK * d))
            .for_each(|(codes, xb)| {
                let m = xb.len() / d;
                let mut residual = xb.to_vec(); // [m, d]
                let (mut best, mut value) = (vec![0u32; m], vec![0f32; m]);
                for (s, book) in books.iter().enumerate() {
                    book.nearest(&residual, &mut best, &mut value);
                    for (r, rest) in residual.chunks_exact_mut(d).enumerate() {
                        codes[r * k + s] = best[r] as u16;
                        for (v, c) in rest.iter_mut().zip(self.codeword(s, best[r] as usize)) {
                            *v -= c;
                        }
                    }
                }
            });
    }

    /// Beam search (as faiss's ResidualQuantizer): each stage extends every kept partial encoding
    /// by every codeword and keeps the `beam` with the smallest residual. Blocks of vectors share
    /// one matrix product per stage over all their hypotheses.
    fn encode_beam(&self, x: &[f32], beam: usize, codes: &mut [u16]) {
        let (d, k) = (self.dim, self.stages());
        codes
            .par_chunks_mut(kernels::BLOCK * k)
            .zip(x.par_chunks(kernels::BLOCK * d))
            .for_each(|(codes, xb)| self.encode_beam_block(xb, beam, codes));
    }

    fn encode_beam_block(&self, xb: &[f32], beam: usize, out: &mut [u16]) {
        let (d, c, k) = (self.dim, self.size, self.stages());
        let m = xb.len() / d;
        // Hypotheses of vector r: rows r·nb..(r+1)·nb of `residuals` [m·nb, d], `norms` [m·nb],
        // `codes` [m·nb, k]. One hypothesis (the vector itself) before stage 0.
        let mut nb = 1;
        let mut residuals = xb.to_vec();
        let mut norms: Vec<f32> = kernels::row_norms(xb, d);
        let mut codes = vec![0u16; m * k];
        let mut scores = Vec::new();
        let mut best: Vec<(f32, usize, usize)> = Vec::with_capacity(beam);
        for s in 0..k {
            scores.resize(m * nb * c, 0.0);
            dot_products(m * nb, c, d, &residuals, &self.codebooks[s], &mut scores);
            let keep = beam.min(nb * c);
            let mut next_res = vec![0f32; m * keep * d];
            let mut next_norms = vec![0f32; m * keep];
            let mut next_codes = vec![0u16; m * keep * k];
            for r in 0..m {
                // The `keep` smallest (distance, hypothesis, code), in order; candidates come in
                // increasing (hypothesis, code), so equal distances keep the earlier one first.
                best.clear();
                for b in 0..nb {
                    let h = r * nb + b;
                    let row = &scores[h * c..(h + 1) * c];
                    for (j, (&dot, &cn)) in row.iter().zip(&self.norms[s]).enumerate() {
                        let dist = norms[h] + cn - 2.0 * dot;
                        if best.len() == keep && dist >= best[keep - 1].0 {
                            continue;
                        }
                        let at = best.partition_point(|e| e.0 <= dist);
                        if best.len() == keep {
                            best.pop();
                        }
                        best.insert(at, (dist, b, j));
                    }
                }
                for (slot, &(_, b, j)) in best.iter().enumerate() {
                    let (from, to) = (r * nb + b, r * keep + slot);
                    let dst = &mut next_res[to * d..(to + 1) * d];
                    for ((y, a), w) in dst
                        .iter_mut()
                        .zip(&residuals[from * d..(from + 1) * d])
                        .zip(self.codeword(s, j))
                    {
                        *y = a - w;
                    }
                    next_norms[to] = dst.iter().map(|v| v * v).sum();
                    next_codes[to * k..to * k + s].copy_from_slice(&codes[from * k..from * k + s]);
                    next_codes[to * k + s] = j as u16;
                }
            }
            (residuals, norms, codes, nb) = (next_res, next_norms, next_codes, keep);
        }
        for r in 0..m {
            out[r * k..(r + 1) * k].copy_from_slice(&codes[r * nb * k..(r * nb + 1) * k]);
        }
    }

    /// Slow reference of beam search for one vector, written the obvious way.
    #[cfg(test)]
    fn encode_beam_one(&self, x: &[f32], beam: usize, out: &mut [u16]) {
        let (d, c, k) = (self.dim, self.size, self.stages());
        // Each beam: (residual [d], its squared norm, codes so far)
        let mut beams: Vec<(Vec<f32>, f32, Vec<u16>)> = vec![(
            x.to_vec(),
            x.iter().map(|v| v * v).sum(),
            Vec::with_capacity(k),
        )];
        let mut dots = vec![0f32; beam * c];
        for s in 0..k {
            let nb = beams.len();
            let flat: Vec<f32> = beams.iter().flat_map(|b| b.0.iter().copied()).collect();
            dots.resize(nb * c, 0.0);
            dot_products(nb, c, d, &flat, &self.codebooks[s], &mut dots);
            // (distance, beam, code) candidates; keep the best `beam` (ties: lower beam, code).
            let mut cands: Vec<(f32, usize, usize)> = Vec::with_capacity(nb * c);
            for (b, (_, rn, _)) in beams.iter().enumerate() {
                for j in 0..c {
                    cands.push((rn + self.norms[s][j] - 2.0 * dots[b * c + j], b, j));
                }
            }
            let keep = beam.min(cands.len());
            cands.select_nth_unstable_by(keep - 1, cmp_cand);
            cands.truncate(keep);
            cands.sort_by(cmp_cand);
            beams = cands
                .iter()
                .map(|&(_, b, j)| {
                    let (res, _, codes) = &beams[b];
                    let cw = self.codeword(s, j);
                    let r: Vec<f32> = res.iter().zip(cw).map(|(a, c)| a - c).collect();
                    let rn = r.iter().map(|v| v * v).sum();
                    let mut codes = codes.clone();
                    codes.push(j as u16);
                    (r, rn, codes)
                })
                .collect();
        }
        out.copy_from_slice(&beams[0].2);
    }

    /// Sums the codewords of `codes` ([n, stages]) into `out` ([n, dim]).
    pub fn decode(&self, codes: &[u16], out: &mut [f32]) -> Result<()> {
        check_vectors(self.dim, self.stages(), out, codes.len(), "decode output")?;
        let (d, k) = (self.dim, self.stages());
        if let Some(&bad) = codes.iter().find(|&&c| c as usize >= self.size) {
            return Err(RvqError::Input(format!(
                "code {bad} outside the codebook of {}",
                self.size
            )));
        }
        for (o, c) in out.chunks_exact_mut(d).zip(codes.chunks_exact(k)) {
            o.fill(0.0);
            for (s, &code) in c.iter().enumerate() {
                for (x, w) in o.iter_mut().zip(self.codeword(s, code as usize)) {
                    *x += w;
                }
            }
        }
        Ok(())
    }

    /// Mean squared error ‖x − x̂‖² per vector and ‖x‖² per vector, summed: (err, energy).
    pub fn squared_error(&self, x: &[f32], beam: usize) -> Result<(f64, f64)> {
        let n = x.len() / self.dim.max(1);
        let mut codes = vec![0u16; n * self.stages()];
        self.encode(x, beam, &mut codes)?;
        let mut y = vec![0f32; x.len()];
        self.decode(&codes, &mut y)?;
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let energy = x.iter().map(|a| (*a as f64).powi(2)).sum();
        Ok((err, energy))
    }
}

/// Fails unless `x` is whole vectors of `dim` and `codes_len` holds `stages` codes for each.
pub(crate) fn check_vectors(
    dim: usize,
    stages: usize,
    x: &[f32],
    codes_len: usize,
    what: &str,
) -> Result<()> {
    if !x.len().is_multiple_of(dim) {
        return Err(RvqError::Input(format!(
            "{what}: {} values is not a whole number of {dim}-dim vectors",
            x.len()
        )));
    }
    let n = x.len() / dim;
    if codes_len != n * stages {
        return Err(RvqError::Input(format!(
            "{what}: {n} vectors need {} codes, got {codes_len}",
            n * stages
        )));
    }
    Ok(())
}

/// One greedy stage over a block of residuals ([m, d]): the nearest codeword of `book` ([C, d],
/// squared norms `norms`) through one matrix product into `scores`, `put(r, code)` for each row,
/// and the codeword subtracted from the row.
pub(crate) fn greedy_stage(
    book: &[f32],
    norms: &[f32],
    d: usize,
    residual: &mut [f32],
    scores: &mut Vec<f32>,
    mut put: impl FnMut(usize, u16),
) {
    let (m, c) = (residual.len() / d, norms.len());
    scores.resize(m * c, 0.0);
    dot_products(m, c, d, residual, book, scores);
    for (r, (rest, row)) in residual
        .chunks_exact_mut(d)
        .zip(scores.chunks_exact(c))
        .enumerate()
    {
        let (best, _) = kernels::argmin_half_norm(row, norms);
        put(r, best as u16);
        for (x, w) in rest.iter_mut().zip(&book[best * d..(best + 1) * d]) {
            *x -= w;
        }
    }
}

#[cfg(test)]
fn cmp_cand(a: &(f32, usize, usize), b: &(f32, usize, usize)) -> std::cmp::Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
}

/// Checks d ≥ 1, C in 2..=65536, K ≥ 1.
pub(crate) fn validate_shape(dim: usize, size: usize, stages: usize) -> Result<()> {
    if dim == 0 {
        return Err(RvqError::Config("dimension d must be at least 1".into()));
    }
    if !(2..=65536).contains(&size) {
        return Err(RvqError::Config(format!(
            "codebook size C = {size} must be in 2..=65536"
        )));
    }
    if stages == 0 {
        return Err(RvqError::Config(
            "at least one stage (K >= 1) is needed".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random(n: usize, rng: &mut SplitMix64) -> Vec<f32> {
        (0..n).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect()
    }

    /// Slow, obvious greedy encoder: explicit distances to every codeword at every stage.
    fn reference_greedy(q: &Rvq, x: &[f32]) -> Vec<u16> {
        let mut r = x.to_vec();
        let mut codes = vec![];
        for s in 0..q.stages() {
            let mut best = (f32::INFINITY, 0);
            for j in 0..q.size() {
                let dist: f32 = r
                    .iter()
                    .zip(q.codeword(s, j))
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum();
                if dist < best.0 {
                    best = (dist, j);
                }
            }
            codes.push(best.1 as u16);
            for (a, b) in r.iter_mut().zip(q.codeword(s, best.1)) {
                *a -= b;
            }
        }
        codes
    }

    /// K random codebooks, stage s scaled by 1/(s+1) like a trained quantizer's.
    fn shrinking_codebooks(rng: &mut SplitMix64, d: usize, c: usize, k: usize) -> Vec<Vec<f32>> {
        (0..k)
            .map(|s| {
                random(c * d, rng)
                    .iter()
                    .map(|v| v / (s + 1) as f32)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn greedy_matches_reference() {
        let mut rng = SplitMix64::new(11);
        let (d, c, k) = (6, 19, 4);
        let cbs = shrinking_codebooks(&mut rng, d, c, k);
        let q = Rvq::from_codebooks(d, c, cbs).unwrap();
        let x = random(300 * d, &mut rng);
        let mut codes = vec![0u16; 300 * k];
        q.encode(&x, 1, &mut codes).unwrap();
        for i in 0..300 {
            assert_eq!(
                &codes[i * k..(i + 1) * k],
                reference_greedy(&q, &x[i * d..(i + 1) * d]).as_slice()
            );
        }
    }

    #[test]
    fn greedy_encoding_of_a_few_paper_shaped_vectors_matches_reference_at_every_level() {
        // 6 vectors of d = 32: a decode step's batch, which takes the few-rows kernel.
        let mut rng = SplitMix64::new(17);
        let (d, c, k) = (32, 2048, 8);
        let q = Rvq::from_codebooks(d, c, shrinking_codebooks(&mut rng, d, c, k)).unwrap();
        let x = random(6 * d, &mut rng);
        let want: Vec<u16> = (0..6)
            .flat_map(|i| reference_greedy(&q, &x[i * d..(i + 1) * d]))
            .collect();
        for (level, codes) in simd::at_each_level(|_| {
            let mut codes = vec![0u16; 6 * k];
            q.encode(&x, 1, &mut codes).unwrap();
            codes
        }) {
            assert_eq!(codes, want, "{level:?}");
        }
    }

    #[test]
    fn greedy_encoding_of_a_paper_shaped_batch_matches_reference_at_every_level() {
        // 300 vectors of d = 32 (a block of 256 and a partial one): the lane kernel where the
        // CPU has AVX2, the matrix product elsewhere; C = 300 is not a multiple of 16 lanes.
        let mut rng = SplitMix64::new(19);
        let (d, c, k, n) = (32, 300, 8, 300);
        let q = Rvq::from_codebooks(d, c, shrinking_codebooks(&mut rng, d, c, k)).unwrap();
        let x = random(n * d, &mut rng);
        let want: Vec<u16> = (0..n)
            .flat_map(|i| reference_greedy(&q, &x[i * d..(i + 1) * d]))
            .collect();
        for (level, codes) in simd::at_each_level(|_| {
            let mut codes = vec![0u16; n * k];
            q.encode(&x, 1, &mut codes).unwrap();
            codes
        }) {
            assert_eq!(codes, want, "{level:?}");
        }
    }

    #[test]
    fn beam_never_worse_than_greedy_and_beam1_is_greedy() {
        let mut rng = SplitMix64::new(5);
        let (d, c, k) = (4, 16, 5);
        let cbs = (0..k).map(|_| random(c * d, &mut rng)).collect();
        let q = Rvq::from_codebooks(d, c, cbs).unwrap();
        let x = random(200 * d, &mut rng);
        let (e1, _) = q.squared_error(&x, 1).unwrap();
        let (e4, _) = q.squared_error(&x, 4).unwrap();
        assert!(e4 <= e1 + 1e-6, "beam 4 {e4} > greedy {e1}");
        let mut a = vec![0u16; 200 * k];
        let mut b = vec![0u16; 200 * k];
        q.encode(&x, 1, &mut a).unwrap();
        for i in 0..200 {
            q.encode_beam_one(&x[i * d..(i + 1) * d], 1, &mut b[i * k..(i + 1) * k]);
        }
        assert_eq!(a, b);
    }

    #[test]
    fn blocked_beam_matches_the_per_vector_reference() {
        let mut rng = SplitMix64::new(8);
        let (d, c, k) = (8, 37, 4);
        let cbs = shrinking_codebooks(&mut rng, d, c, k);
        let q = Rvq::from_codebooks(d, c, cbs).unwrap();
        let n = 600; // more than two blocks
        let x = random(n * d, &mut rng);
        for beam in [2, 5, 200] {
            let mut fast = vec![0u16; n * k];
            q.encode(&x, beam, &mut fast).unwrap();
            let mut slow = vec![0u16; n * k];
            for i in 0..n {
                q.encode_beam_one(&x[i * d..(i + 1) * d], beam, &mut slow[i * k..(i + 1) * k]);
            }
            assert_eq!(fast, slow, "beam {beam}");
        }
    }

    #[test]
    fn truncated_keeps_the_first_stages() {
        let mut rng = SplitMix64::new(3);
        let cbs: Vec<Vec<f32>> = (0..3).map(|_| random(4 * 2, &mut rng)).collect();
        let q = Rvq::from_codebooks(2, 4, cbs.clone()).unwrap();
        let t = q.truncated(2).unwrap();
        assert_eq!(t, Rvq::from_codebooks(2, 4, cbs[..2].to_vec()).unwrap());
        assert!(q.truncated(0).is_err() && q.truncated(4).is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let q = Rvq::from_codebooks(2, 2, vec![vec![0.0, 0.0, 1.0, 1.0]]).unwrap();
        let mut codes = vec![0u16; 1];
        assert!(matches!(
            q.encode(&[f32::NAN, 0.0], 1, &mut codes),
            Err(RvqError::NonFinite(_))
        ));
        assert!(matches!(
            q.encode(&[1.0, 0.0, 3.0], 1, &mut codes),
            Err(RvqError::Input(_))
        ));
        assert!(q.encode(&[1.0, 0.0], 0, &mut codes).is_err());
        assert!(q.decode(&[2], &mut [0.0, 0.0]).is_err());
        assert!(Rvq::from_codebooks(2, 1, vec![vec![0.0; 2]]).is_err());
        assert!(Rvq::from_codebooks(2, 2, vec![]).is_err());
        assert!(Rvq::from_codebooks(0, 2, vec![vec![]]).is_err());
        assert!(Rvq::from_codebooks(2, 2, vec![vec![0.0; 3]]).is_err());
    }
}
