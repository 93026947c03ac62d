//! Nearest-codeword search: ‖x − c‖² = ‖x‖² − 2·x·c + ‖c‖², with the dot products from one
//! blocked matrix product per block of vectors and the codeword norms precomputed.

use rayon::prelude::*;

/// Vectors handled per matrix product (bounds the [block, C] score buffer).
pub const BLOCK: usize = 256;

/// `scores[m, n] = a[m, k] · b[n, k]ᵀ`, single-threaded (callers parallelise over blocks).
pub fn dot_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], scores: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && scores.len() >= m * n);
    if m <= FEW_ROWS {
        // A decode step's few query rows: packing b for a matrix product would cost more than
        // the products themselves.
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
    for (j, bj) in b.chunks_exact(k).take(n).enumerate() {
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

/// Dot product with 8 independent partial sums (vectorizes; same order on every run).
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
    acc.iter().sum::<f32>() + tail
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

/// Most rows [`nearest_few_rows`] takes: a decode step encodes a handful of group vectors per
/// quantizer (3 KV heads × 2 groups for SmolLM2).
pub const FEW_VECTORS: usize = 8;

/// For each of the few rows of `x` ([m ≤ FEW_VECTORS, 32]) the index of the nearest row of
/// `codebook` ([C, 32]) given its squared norms — the argmin of ‖c‖² − 2·x·c, as
/// [`argmin_half_norm`] over [`dot_products`] — or `None` where no hand kernel applies (other
/// d, more rows, or no AVX2 at the current [`crate::simd::level`]).
///
/// Why a hand kernel: for so few rows a matrix-product library spends its time packing; this
/// streams the codebook once, 8 codewords at a time, with every row's 8 dot products reduced
/// in registers. Dot products are summed in another order than the matrix product, so a
/// near-tie (within float rounding) may resolve to the other codeword.
pub fn nearest_few_rows(x: &[f32], codebook: &[f32], norms: &[f32], best: &mut [u32]) -> bool {
    let m = best.len();
    if m == 0 || m > FEW_VECTORS || x.len() != m * 32 || codebook.len() != norms.len() * 32 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() >= crate::simd::Level::Avx2 && norms.len() >= 8 {
        // SAFETY: the level says the CPU has AVX2 and FMA; shapes are checked above.
        unsafe { nearest_few_rows_avx2(x, codebook, norms, best) };
        return true;
    }
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nearest_few_rows_avx2(x: &[f32], codebook: &[f32], norms: &[f32], best: &mut [u32]) {
    use std::arch::x86_64::*;
    let m = best.len();
    let c = norms.len();
    let body = c - c % 8;
    // Running per-lane minimum and its codeword index, per row.
    let mut min_val = [_mm256_set1_ps(f32::INFINITY); FEW_VECTORS];
    let mut min_idx = [_mm256_setzero_si256(); FEW_VECTORS];
    let two = _mm256_set1_ps(2.0);
    let xp = x.as_ptr();
    let bp = codebook.as_ptr();
    for c0 in (0..body).step_by(8) {
        let lane_idx = _mm256_add_epi32(
            _mm256_set1_epi32(c0 as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        let nrm = _mm256_loadu_ps(norms.as_ptr().add(c0));
        for r in 0..m {
            let xr = xp.add(r * 32);
            let x0 = _mm256_loadu_ps(xr);
            let x1 = _mm256_loadu_ps(xr.add(8));
            let x2 = _mm256_loadu_ps(xr.add(16));
            let x3 = _mm256_loadu_ps(xr.add(24));
            // acc[i]: 8 partial sums of x_r · codeword c0 + i.
            let dot8 = |i: usize| {
                let w = bp.add((c0 + i) * 32);
                let a = _mm256_mul_ps(x0, _mm256_loadu_ps(w));
                let a = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w.add(8)), a);
                let a = _mm256_fmadd_ps(x2, _mm256_loadu_ps(w.add(16)), a);
                _mm256_fmadd_ps(x3, _mm256_loadu_ps(w.add(24)), a)
            };
            let t0 = _mm256_hadd_ps(dot8(0), dot8(1));
            let t1 = _mm256_hadd_ps(dot8(2), dot8(3));
            let t2 = _mm256_hadd_ps(dot8(4), dot8(5));
            let t3 = _mm256_hadd_ps(dot8(6), dot8(7));
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            // Lane i: the dot product with codeword c0 + i.
            let dots = _mm256_add_ps(
                _mm256_permute2f128_ps(u0, u1, 0x20),
                _mm256_permute2f128_ps(u0, u1, 0x31),
            );
            let val = _mm256_fnmadd_ps(two, dots, nrm); // ‖c‖² − 2·x·c
            let lower = _mm256_cmp_ps(val, min_val[r], _CMP_LT_OQ);
            min_val[r] = _mm256_blendv_ps(min_val[r], val, lower);
            min_idx[r] = _mm256_castps_si256(_mm256_blendv_ps(
                _mm256_castsi256_ps(min_idx[r]),
                _mm256_castsi256_ps(lane_idx),
                lower,
            ));
        }
    }
    for r in 0..m {
        let (mut vals, mut idx) = ([0f32; 8], [0i32; 8]);
        _mm256_storeu_ps(vals.as_mut_ptr(), min_val[r]);
        _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, min_idx[r]);
        // The smallest value; ties to the lowest index, as `argmin_half_norm`.
        let (mut bv, mut bi) = (f32::INFINITY, u32::MAX);
        for l in 0..8 {
            if vals[l] < bv || (vals[l] == bv && (idx[l] as u32) < bi) {
                (bv, bi) = (vals[l], idx[l] as u32);
            }
        }
        let xr = &x[r * 32..(r + 1) * 32];
        for j in body..c {
            let v = norms[j] - 2.0 * dot(xr, &codebook[j * 32..(j + 1) * 32]);
            if v < bv {
                (bv, bi) = (v, j as u32);
            }
        }
        best[r] = if bi == u32::MAX { 0 } else { bi };
    }
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
    fn few_rows_kernel_finds_the_nearest_codeword() {
        let mut rng = SplitMix64::new(31);
        for (m, c) in [(1, 8), (3, 37), (6, 2048), (8, 9), (5, 256)] {
            let x: Vec<f32> = (0..m * 32).map(|_| rng.normal()).collect();
            let cb: Vec<f32> = (0..c * 32).map(|_| rng.normal()).collect();
            let norms = row_norms(&cb, 32);
            for (level, result) in crate::simd::at_each_level(|_| {
                let mut best = vec![0u32; m];
                nearest_few_rows(&x, &cb, &norms, &mut best).then_some(best)
            }) {
                let Some(best) = result else {
                    assert_eq!(level, crate::simd::Level::Portable, "AVX2 runs the kernel");
                    continue;
                };
                for r in 0..m {
                    // Exact distances in f64: the kernel's pick is the nearest up to rounding.
                    let dist = |j: usize| -> f64 {
                        (0..32)
                            .map(|i| (x[r * 32 + i] as f64 - cb[j * 32 + i] as f64).powi(2))
                            .sum()
                    };
                    let min = (0..c).map(dist).fold(f64::INFINITY, f64::min);
                    let got = dist(best[r] as usize);
                    assert!(got <= min * (1.0 + 1e-5), "{m}x{c} row {r}: {got} vs {min}");
                }
            }
        }
        // Ties go to the lowest index, also across lanes: every codeword equal.
        let x = vec![0.5f32; 2 * 32];
        let cb = vec![1.0f32; 16 * 32];
        let mut best = vec![9u32; 2];
        if nearest_few_rows(&x, &cb, &row_norms(&cb, 32), &mut best) {
            assert_eq!(best, vec![0, 0]);
        }
        // Shapes it does not take.
        let mut best = vec![0u32; 9];
        assert!(!nearest_few_rows(
            &[0.0; 9 * 32],
            &cb,
            &row_norms(&cb, 32),
            &mut best
        ));
    }

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
