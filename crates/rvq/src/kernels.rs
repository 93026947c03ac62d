//! Nearest-codeword search: ‖x − c‖² = ‖x‖² − 2·x·c + ‖c‖², with the dot products from one
//! blocked matrix product per block of vectors and the codeword norms precomputed — or, for
//! batches of d = 32 vectors on a CPU with AVX2, from the [`crate::lanes`] kernel.

use crate::lanes::LaneBook;
use crate::search::{self, Kernel};
use rayon::prelude::*;
use simd::matmul::dot_products;

/// Vectors handled per matrix product (bounds the [block, C] score buffer).
pub const BLOCK: usize = 256;

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
    // Training searches batches; fewer vectors than a lane batch take the matrix product.
    if search::kernel(d, n) == Kernel::Lanes {
        let book = LaneBook::<f32>::new(codebook, d).expect("d = 32, checked above");
        idx.par_chunks_mut(BLOCK)
            .zip(dist.par_chunks_mut(BLOCK))
            .zip(x.par_chunks(BLOCK * d))
            .for_each(|((idx, dist), xb)| {
                book.nearest(xb, idx, dist);
                for (dist, x) in dist.iter_mut().zip(xb.chunks_exact(d)) {
                    *dist = (x.iter().map(|v| v * v).sum::<f32>() + *dist).max(0.0);
                }
            });
        return (idx, dist);
    }
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

simd::multiversion! {
    /// argmin over j of norms[j] − 2·dots[j]; returns (j, value), ties to the lowest j.
    /// Compiled per instruction set (see [`simd`]); every level gives the same answer.
    pub fn argmin_half_norm(dots: &[f32], norms: &[f32]) -> (usize, f32) = argmin_lanes;
}

/// Two passes that vectorise: the minimum over 16 independent lanes, then the first index
/// that reaches it (the same float expression, so the comparison is exact).
#[inline(always)]
fn argmin_lanes(dots: &[f32], norms: &[f32]) -> (usize, f32) {
    const LANES: usize = 16;
    let n = dots.len().min(norms.len());
    let (dots, norms) = (&dots[..n], &norms[..n]);
    let mut lanes = [f32::INFINITY; LANES];
    let body = n - n % LANES;
    for (cd, cn) in dots[..body]
        .chunks_exact(LANES)
        .zip(norms[..body].chunks_exact(LANES))
    {
        for i in 0..LANES {
            let v = cn[i] - 2.0 * cd[i];
            lanes[i] = if v < lanes[i] { v } else { lanes[i] };
        }
    }
    let mut best_val = f32::INFINITY;
    for &l in &lanes {
        if l < best_val {
            best_val = l;
        }
    }
    for j in body..n {
        let v = norms[j] - 2.0 * dots[j];
        if v < best_val {
            best_val = v;
        }
    }
    for j in 0..n {
        if norms[j] - 2.0 * dots[j] == best_val {
            return (j, best_val);
        }
    }
    (0, best_val) // only when every value is NaN; inputs are checked finite upstream
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn argmin_is_the_same_at_every_level_including_ties() {
        let mut rng = SplitMix64::new(8);
        for n in [1, 15, 16, 17, 2048, 2049] {
            let dots: Vec<f32> = (0..n).map(|_| (rng.below(50) as f32) * 0.25).collect();
            let norms: Vec<f32> = (0..n).map(|_| (rng.below(50) as f32) * 0.5).collect();
            let all = simd::at_each_level(|_| argmin_half_norm(&dots, &norms));
            let fast = all[0].1;
            assert!(all.iter().all(|(_, r)| *r == fast), "{all:?}");
            // Brute force: the lowest index of the minimum.
            let vals: Vec<f32> = dots.iter().zip(&norms).map(|(d, c)| c - 2.0 * d).collect();
            let m = vals.iter().cloned().fold(f32::INFINITY, f32::min);
            assert_eq!(fast, (vals.iter().position(|&v| v == m).unwrap(), m));
        }
    }

    #[test]
    fn nearest_matches_brute_force() {
        let mut rng = SplitMix64::new(3);
        // d = 5 takes the matrix product; d = 32 the lane kernel where the CPU has AVX2.
        for (n, c, d) in [(700, 37, 5), (300, 300, 32), (7, 40, 32)] {
            let x: Vec<f32> = (0..n * d).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect();
            let cb: Vec<f32> = (0..c * d).map(|_| rng.unit() as f32 * 2.0 - 1.0).collect();
            for (level, (idx, dist)) in
                simd::at_each_level(|_| nearest(&x, d, &cb, &row_norms(&cb, d)))
            {
                for i in 0..n {
                    let xi = &x[i * d..(i + 1) * d];
                    let dists: Vec<f64> = (0..c)
                        .map(|j| {
                            xi.iter()
                                .zip(&cb[j * d..(j + 1) * d])
                                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                                .sum()
                        })
                        .collect();
                    let best = dists.iter().cloned().fold(f64::INFINITY, f64::min);
                    let at = format!("{n}x{c}x{d} {level:?}");
                    assert!((dists[idx[i] as usize] - best).abs() < 1e-5, "{at}");
                    assert!((dist[i] as f64 - best).abs() < 1e-4, "{at}");
                }
            }
        }
    }
}
