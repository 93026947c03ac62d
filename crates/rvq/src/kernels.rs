//! Nearest-codeword search: ‖x − c‖² = ‖x‖² − 2·x·c + ‖c‖², with the dot products from one
//! blocked matrix product per block of vectors and the codeword norms precomputed — or, for
//! batches of d = 32 vectors on a CPU with AVX2, from the [`crate::lanes`] kernel.

use crate::lanes::{self, LaneBook};
use crate::vector::tree_sum8;
use rayon::prelude::*;

/// Vectors handled per matrix product (bounds the [block, C] score buffer).
pub const BLOCK: usize = 256;

/// `scores[m, n] = a[m, k] · b[n, k]ᵀ`, single-threaded (callers parallelise over blocks).
pub fn dot_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], scores: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && scores.len() >= m * n);
    if m <= FEW_ROWS {
        // A decode step's few query rows: packing b for a matrix product would cost more than
        // the products themselves.
        #[cfg(target_arch = "x86_64")]
        if k.is_multiple_of(8) && crate::simd::level() >= crate::simd::Level::Avx2 {
            // SAFETY: AVX2 is present (the level never exceeds the CPU's); shapes asserted above.
            unsafe { dot_products_by_eight_avx2(m, n, k, a, b, scores) };
            return;
        }
        few_rows_dot_products(m, n, k, a, b, scores);
        return;
    }
    // b is [n, k]: column j of bᵀ starts at j·k, its rows are contiguous.
    gemm_row_major(m, n, k, a, b, k as isize, 1, scores);
}

/// `c[m, n] = a[m, k] · b[k, n]`, all row-major, single-threaded.
pub fn matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m <= FEW_ROWS {
        few_rows_matmul(m, n, k, a, b, c);
        return;
    }
    gemm_row_major(m, n, k, a, b, 1, n as isize, c);
}

/// Up to this many rows of `a`, the products are plain loops instead of a matrix product.
const FEW_ROWS: usize = 4;

crate::multiversion! {
    fn few_rows_dot_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], scores: &mut [f32]) = few_rows_dot_products_body;
}

#[inline(always)]
fn few_rows_dot_products_body(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    scores: &mut [f32],
) {
    dot_columns(m, n, k, a, b, scores, 0);
}

/// Columns `first..n` of `scores[m, n] = a[m, k] · b[n, k]ᵀ`, one [`dot`] each.
#[inline(always)]
fn dot_columns(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    scores: &mut [f32],
    first: usize,
) {
    for (j, bj) in b.chunks_exact(k).take(n).enumerate().skip(first) {
        for i in 0..m {
            scores[i * n + j] = dot(&a[i * k..(i + 1) * k], bj);
        }
    }
}

crate::multiversion! {
    fn few_rows_matmul(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) = few_rows_matmul_body;
}

#[inline(always)]
fn few_rows_matmul_body(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    c[..m * n].fill(0.0);
    for (r, br) in b.chunks_exact(n).take(k).enumerate() {
        for i in 0..m {
            let w = a[i * k + r];
            for (x, y) in c[i * n..(i + 1) * n].iter_mut().zip(br) {
                *x += w * y;
            }
        }
    }
}

/// [`few_rows_dot_products`] for k a multiple of 8, eight rows of `b` at a time: their eight
/// partial-sum vectors are reduced together by a tree of horizontal adds (9 instructions for 8
/// dot products, not 8 separate reductions). Multiplies and adds are separate instructions and
/// the tree is [`dot`]'s, so the sums are bit-identical to the portable code's.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_products_by_eight_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    scores: &mut [f32],
) {
    use std::arch::x86_64::*;
    let whole = n / 8 * 8;
    for j0 in (0..whole).step_by(8) {
        let keys = b.as_ptr().add(j0 * k);
        for i in 0..m {
            let row = a.as_ptr().add(i * k);
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..k).step_by(8) {
                let x = _mm256_loadu_ps(row.add(c));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let y = _mm256_loadu_ps(keys.add(t * k + c));
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(x, y));
                }
            }
            // Lane l of the sums = `tree_sum8` of acc[l].
            let sums = crate::vector::hadd_tree8(&acc);
            _mm256_storeu_ps(scores.as_mut_ptr().add(i * n + j0), sums);
        }
    }
    dot_columns(m, n, k, a, b, scores, whole);
}

/// Dot product with 8 independent partial sums (vectorizes; same order on every run), reduced
/// by [`tree_sum8`], the order of the vector kernels' tree of horizontal adds.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    tree_sum8(&acc) + tail
}

/// Row-major `c = a · B` where B's element (row r, column j) is `b[r·b_rs + j·b_cs]`.
/// Callers assert that every index these strides reach lies inside the slices.
#[allow(clippy::too_many_arguments)]
fn gemm_row_major(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_cs: isize,
    b_rs: isize,
    c: &mut [f32],
) {
    // SAFETY: the callers' asserts bound every index reachable with these strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
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
    if n >= lanes::MIN_BATCH && lanes::available(d) {
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

crate::multiversion! {
    /// argmin over j of norms[j] − 2·dots[j]; returns (j, value), ties to the lowest j.
    /// Compiled per instruction set (see [`crate::simd`]); every level gives the same answer.
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
    fn products_match_the_slow_definition_for_few_and_many_rows() {
        let mut rng = SplitMix64::new(12);
        for (m, n, k) in [
            (1, 7, 5),
            (3, 300, 64),
            (2, 19, 16),
            (4, 9, 17),
            (5, 33, 8),
            (70, 40, 32),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let bt: Vec<f32> = (0..k * n).map(|i| b[(i % n) * k + i / n]).collect(); // [k, n]
            let each = crate::simd::at_each_level(|_| {
                let mut got = vec![0f32; m * n];
                dot_products(m, n, k, &a, &b, &mut got); // b as [n, k]
                let mut got_mm = vec![0f32; m * n];
                matmul(m, n, k, &a, &bt, &mut got_mm);
                (got, got_mm)
            });
            // Every compiled version computes the same sums in the same order.
            assert!(each.iter().all(|(_, r)| *r == each[0].1), "{m}x{n}x{k}");
            let (got, got_mm) = &each[0].1;
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|r| a[i * k + r] as f64 * b[j * k + r] as f64)
                        .sum();
                    assert!((got[i * n + j] as f64 - want).abs() < 1e-4, "{m}x{n}x{k}");
                    assert!(
                        (got_mm[i * n + j] as f64 - want).abs() < 1e-4,
                        "{m}x{n}x{k}"
                    );
                }
            }
        }
    }

    #[test]
    fn argmin_is_the_same_at_every_level_including_ties() {
        let mut rng = SplitMix64::new(8);
        for n in [1, 15, 16, 17, 2048, 2049] {
            let dots: Vec<f32> = (0..n).map(|_| (rng.below(50) as f32) * 0.25).collect();
            let norms: Vec<f32> = (0..n).map(|_| (rng.below(50) as f32) * 0.5).collect();
            let all = crate::simd::at_each_level(|_| argmin_half_norm(&dots, &norms));
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
                crate::simd::at_each_level(|_| nearest(&x, d, &cb, &row_norms(&cb, d)))
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
