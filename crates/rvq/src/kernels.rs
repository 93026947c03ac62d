//! Nearest-codeword search: ‖x − c‖² = ‖x‖² − 2·x·c + ‖c‖², with the dot products from one
//! blocked matrix product per block of vectors and the codeword norms precomputed.

use rayon::prelude::*;

/// Vectors handled per matrix product (bounds the [block, C] score buffer).
pub const BLOCK: usize = 256;

/// `scores[m, n] = a[m, k] · b[n, k]ᵀ`, single-threaded (callers parallelise over blocks).
pub fn dot_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], scores: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && scores.len() >= m * n);
    // SAFETY: the assert bounds every index reachable with these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            scores.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Squared norm of each row of `rows` ([n, d]).
pub fn row_norms(rows: &[f32], d: usize) -> Vec<f32> {
    rows.chunks_exact(d)
        .map(|r| r.iter().map(|v| v * v).sum())
        .collect()
}

/// For each row of `x` ([n, d]) the index of the nearest row of `codebook` ([C, d]) and the
/// squared distance to it. Ties go to the lower index. Parallel over blocks of rows; the result
/// does not depend on the thread count.
pub fn nearest(x: &[f32], d: usize, codebook: &[f32], norms: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let n = x.len() / d;
    let c = norms.len();
    let mut idx = vec![0u32; n];
    let mut dist = vec![0f32; n];
    idx.par_chunks_mut(BLOCK)
        .zip(dist.par_chunks_mut(BLOCK))
        .zip(x.par_chunks(BLOCK * d))
        .for_each_init(Vec::new, |scores, ((idx, dist), xb)| {
            let m = xb.len() / d;
            scores.resize(m * c, 0.0);
            dot_products(m, c, d, xb, codebook, scores);
            for (r, (i_out, d_out)) in idx.iter_mut().zip(dist.iter_mut()).enumerate() {
                let row = &scores[r * c..(r + 1) * c];
                let (best, best_val) = argmin_half_norm(row, norms);
                let xn: f32 = xb[r * d..(r + 1) * d].iter().map(|v| v * v).sum();
                *i_out = best as u32;
                *d_out = (xn + best_val).max(0.0);
            }
        });
    (idx, dist)
}

/// argmin over j of norms[j] − 2·dots[j]; returns (j, value).
#[inline]
pub fn argmin_half_norm(dots: &[f32], norms: &[f32]) -> (usize, f32) {
    let mut best = 0;
    let mut best_val = f32::INFINITY;
    for (j, (&dp, &nm)) in dots.iter().zip(norms).enumerate() {
        let v = nm - 2.0 * dp;
        if v < best_val {
            best_val = v;
            best = j;
        }
    }
    (best, best_val)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn nearest_matches_brute_force() {
        let mut rng = SplitMix64::new(3);
        let (n, c, d) = (700, 37, 5);
        let x: Vec<f32> = (0..n * d).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect();
        let cb: Vec<f32> = (0..c * d).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect();
        let (idx, dist) = nearest(&x, d, &cb, &row_norms(&cb, d));
        for i in 0..n {
            let xi = &x[i * d..(i + 1) * d];
            let dists: Vec<f32> = (0..c)
                .map(|j| {
                    xi.iter()
                        .zip(&cb[j * d..(j + 1) * d])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum()
                })
                .collect();
            let best = dists.iter().cloned().fold(f32::INFINITY, f32::min);
            assert!((dists[idx[i] as usize] - best).abs() < 1e-5);
            assert!((dist[i] - best).abs() < 1e-4);
        }
    }
}
