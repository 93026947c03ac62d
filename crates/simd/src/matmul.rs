//! Small dense matrix products: `a · bᵀ` and `a · b` for attention and the codec's searches.
//! A few rows (a decode step) run plain multiversioned loops, since packing `b` for a matrix
//! product would cost more than the products; more rows go to the `gemm` crate.

use crate::vector::tree_sum8;

/// `scores[m, n] = a[m, k] · b[n, k]ᵀ`, single-threaded (callers parallelise over blocks).
pub fn dot_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], scores: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && scores.len() >= m * n);
    if m <= FEW_ROWS {
        // A decode step's few query rows: packing b for a matrix product would cost more than
        // the products themselves.
        #[cfg(target_arch = "x86_64")]
        if k.is_multiple_of(8) && crate::level() >= crate::Level::Avx2 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn products_match_the_slow_definition_for_few_and_many_rows() {
        let mut rng = StdRng::seed_from_u64(12);
        for (m, n, k) in [
            (1, 7, 5),
            (3, 300, 64),
            (2, 19, 16),
            (4, 9, 17),
            (5, 33, 8),
            (70, 40, 32),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let b: Vec<f32> = (0..n * k).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let bt: Vec<f32> = (0..k * n).map(|i| b[(i % n) * k + i / n]).collect(); // [k, n]
            let each = crate::at_each_level(|_| {
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
}
