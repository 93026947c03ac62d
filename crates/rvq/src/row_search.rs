//! Nearest codewords of a few d = 32 vectors in a codebook as it is stored: row-major, f32 or
//! f16.
//!
//! A decode step encodes ~6 vectors per quantizer. A matrix product needs the codebook in f32
//! and packed, which costs more than the products; the lane kernel ([`crate::lanes`]) needs a
//! transposed copy, which a KV cache's attention cannot gather codewords from, so both copies
//! would travel through the caches every token. Here two vectors at a time run through the
//! codebook (a stage's 64–128 KB stays in L2 for the next pair), 4 codewords at a time, each
//! codeword chunk converted once for both: the dot products are reduced together by a tree of
//! horizontal adds, and the running minima live in registers. An odd vector goes alone, 8
//! codewords at a time, with the same arithmetic per codeword.

use crate::lanes::{LaneWord, DIM};

/// Codewords scored together.
const BLOCK: usize = 8;

/// Whether [`nearest`] runs here: the lane kernel's condition (d = 32; AVX2, FMA and F16C,
/// decided once per process so that no forced level switches kernels mid-computation).
pub fn available(d: usize) -> bool {
    crate::lanes::available(d)
}

/// For each row r of `x` ([m, 32]): `best[r]` = argmin over codewords c of `book` ([C, 32]) of
/// ‖c‖² − 2·x_r·c, with `norms[c]` = ‖c‖² (ties to the lower index). Panics unless
/// [`available`]`(32)` and the shapes agree.
pub fn nearest<T: LaneWord>(book: &[T], norms: &[f32], x: &[f32], best: &mut [u32]) {
    nearest_prefetching(book, norms, x, best, &[]);
}

/// [`nearest`], asking the CPU meanwhile to bring `next` (the codebook searched next) into L2:
/// spread over the search, the prefetches overlap its arithmetic, where the next search would
/// otherwise wait for memory on its first pass.
pub fn nearest_prefetching<T: LaneWord>(
    book: &[T],
    norms: &[f32],
    x: &[f32],
    best: &mut [u32],
    next: &[T],
) {
    assert!(available(DIM), "the row-search kernel does not run here");
    let c = norms.len();
    assert!(book.len() == c * DIM && x.len() == best.len() * DIM && c > 0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available` found AVX2, FMA and F16C; shapes checked above; prefetches of
    // addresses inside `next` cannot fault.
    unsafe {
        nearest_avx2(book, norms, x, best, next, wide())
    };
}

/// Greedy codes ([m, stages]) of a few vectors `x` ([m, 32]) with [`nearest`] at each stage:
/// `books[s]` ([C, 32]) and `norms[s]` as the quantizer holds them.
pub fn encode_greedy<T: LaneWord, B: std::ops::Deref<Target = [T]>>(
    books: &[B],
    norms: &[Vec<f32>],
    x: &[f32],
    codes: &mut [u16],
) {
    let (m, k) = (x.len() / DIM, books.len());
    let mut residual = x.to_vec(); // [m, 32]
    let mut best = vec![0u32; m];
    for (s, (book, norms)) in books.iter().zip(norms).enumerate() {
        let next = books.get(s + 1).map_or(&[][..], |b| &b[..]);
        nearest_prefetching(book, norms, &residual, &mut best, next);
        for (r, rest) in residual.chunks_exact_mut(DIM).enumerate() {
            codes[r * k + s] = best[r] as u16;
            let word = &book[best[r] as usize * DIM..(best[r] as usize + 1) * DIM];
            for (v, w) in rest.iter_mut().zip(word) {
                *v -= w.to_f32();
            }
        }
    }
}

/// `wide`: the AVX-512 kernel (the caller checked the CPU has it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nearest_avx2<T: LaneWord>(
    book: &[T],
    norms: &[f32],
    x: &[f32],
    best: &mut [u32],
    next: &[T],
    wide: bool,
) {
    let (m, c) = (best.len(), norms.len());
    if wide {
        // Up to six vectors at a time, each codeword chunk converted once for all of them.
        let chunks = m.div_ceil(WIDE_ROWS);
        let mut prefetch = Prefetch::new(next, chunks * (c / BLOCK));
        for (i, best) in best.chunks_mut(WIDE_ROWS).enumerate() {
            let x = &x[i * WIDE_ROWS * DIM..(i * WIDE_ROWS + best.len()) * DIM];
            match best.len() {
                1 => nearest_wide::<T, 1>(book, norms, x, best, &mut prefetch),
                2 => nearest_wide::<T, 2>(book, norms, x, best, &mut prefetch),
                3 => nearest_wide::<T, 3>(book, norms, x, best, &mut prefetch),
                4 => nearest_wide::<T, 4>(book, norms, x, best, &mut prefetch),
                5 => nearest_wide::<T, 5>(book, norms, x, best, &mut prefetch),
                _ => nearest_wide::<T, 6>(book, norms, x, best, &mut prefetch),
            }
        }
        return;
    }
    // Vectors go two at a time (each codeword chunk converted once for both), an odd one alone.
    let steps = m / 2 * (c / PAIR_BLOCK) + m % 2 * (c / BLOCK);
    let mut prefetch = Prefetch::new(next, steps);
    for (pair, best) in best.chunks_exact_mut(2).enumerate() {
        let (a, b) = nearest_pair_avx2(book, norms, &x[2 * pair * DIM..], &mut prefetch);
        (best[0], best[1]) = (a, b);
    }
    if m % 2 == 1 {
        best[m - 1] = nearest_one_avx2(book, norms, &x[(m - 1) * DIM..], &mut prefetch);
    }
}

/// Vectors searched together by the AVX-512 kernel: a decode step's six group vectors per
/// quantizer for SmolLM2 (3 KV heads × 2 groups); their 24 accumulators fit the 32 registers.
const WIDE_ROWS: usize = 6;

/// Whether the AVX-512 kernel runs: decided once per process, like [`available`].
fn wide() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| simd::configured() >= simd::Level::Avx512)
}

/// Best codes of the `R` vectors of `x` ([R, 32]) with AVX-512, in exactly the AVX2 kernels'
/// arithmetic per vector and codeword — so that the codes are the same at both levels: a
/// register holds chunk s (8 lanes) of two codewords side by side, each lane runs the
/// multiply and three multiply-adds over the chunks, and the two halves reduce by the same
/// tree of horizontal adds (per 128-bit lane), giving 8 codewords' dot products in the order
/// c0, c2, c4, c6, c1, c3, c5, c7, which the norms and indices follow.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // r, j, s index register tiles in step
unsafe fn nearest_wide<T: LaneWord, const R: usize>(
    book: &[T],
    norms: &[f32],
    x: &[f32],
    best: &mut [u32],
    prefetch: &mut Prefetch,
) {
    use std::arch::x86_64::*;
    let c = norms.len();
    let whole = c / BLOCK * BLOCK;
    let two = _mm256_set1_ps(2.0);
    let order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    // xs[r][s]: chunk s of vector r in both halves.
    let mut xs = [[_mm512_setzero_ps(); 4]; R];
    for (r, xs) in xs.iter_mut().enumerate() {
        for (s, xs) in xs.iter_mut().enumerate() {
            let p = x.as_ptr().add(r * DIM + 8 * s);
            *xs = f32::load8x2(p, p);
        }
    }
    let mut min_val = [_mm256_set1_ps(f32::INFINITY); R];
    let mut min_idx = [_mm256_setzero_si256(); R];
    for c0 in (0..whole).step_by(BLOCK) {
        prefetch.step();
        let p = book.as_ptr().add(c0 * DIM);
        // acc[r][j]: vector r against codewords c0 + 2j (low half) and c0 + 2j + 1 (high).
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for j in 0..4 {
            let (a, b) = (p.add(2 * j * DIM), p.add((2 * j + 1) * DIM));
            let w = T::load8x2(a, b);
            for r in 0..R {
                acc[r][j] = _mm512_mul_ps(xs[r][0], w);
            }
            for s in 1..4 {
                let w = T::load8x2(a.add(8 * s), b.add(8 * s));
                for r in 0..R {
                    acc[r][j] = _mm512_fmadd_ps(xs[r][s], w, acc[r][j]);
                }
            }
        }
        let norm = _mm256_permutevar8x32_ps(_mm256_loadu_ps(norms.as_ptr().add(c0)), order);
        let idx = _mm256_add_epi32(_mm256_set1_epi32(c0 as i32), order);
        for r in 0..R {
            let a = acc[r];
            let q = hadd512(hadd512(a[0], a[1]), hadd512(a[2], a[3]));
            // 128-bit lanes 0 and 1 hold the halves of c0, c2, c4, c6; lanes 2 and 3 of the odd.
            let lo = _mm512_castps512_ps256(_mm512_shuffle_f32x4::<0b00_00_10_00>(q, q));
            let hi = _mm512_castps512_ps256(_mm512_shuffle_f32x4::<0b00_00_11_01>(q, q));
            let dots = _mm256_add_ps(lo, hi);
            let v = _mm256_fnmadd_ps(two, dots, norm); // ‖c‖² − 2·x·c
            crate::lanes::keep_lower(v, idx, &mut min_val[r], &mut min_idx[r]);
        }
    }
    for (r, best) in best.iter_mut().enumerate() {
        let (mut vals, mut idx) = ([0f32; 8], [0u32; 8]);
        _mm256_storeu_ps(vals.as_mut_ptr(), min_val[r]);
        _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, min_idx[r]);
        *best = finish(book, norms, &x[r * DIM..(r + 1) * DIM], &vals, &idx, whole);
    }
}

/// `_mm256_hadd_ps` in each 128-bit lane of AVX-512 registers: [a0+a1, a2+a3, b0+b1, b2+b3].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn hadd512(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(a, b),
        _mm512_shuffle_ps::<0b11_01_11_01>(a, b),
    )
}

/// Prefetches a codebook into L2 a few cache lines per step of a search, to cover it by the
/// search's end.
pub(crate) struct Prefetch {
    at: *const i8,
    bytes: usize,
    fetched: usize,
    per_step: usize,
}

impl Prefetch {
    pub(crate) fn new<T>(next: &[T], steps: usize) -> Self {
        let bytes = std::mem::size_of_val(next);
        Self {
            at: next.as_ptr() as *const i8,
            bytes,
            fetched: 0,
            per_step: bytes.div_ceil(64).div_ceil(steps.max(1)),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    pub(crate) unsafe fn step(&mut self) {
        use std::arch::x86_64::*;
        for _ in 0..self.per_step {
            if self.fetched < self.bytes {
                _mm_prefetch::<_MM_HINT_T1>(self.at.add(self.fetched));
                self.fetched += 64;
            }
        }
    }
}

/// Codewords scored together when two vectors share them: 4 codewords × 2 vectors take 8
/// accumulators, leaving registers for the codeword chunk and both vectors' chunks.
const PAIR_BLOCK: usize = 4;

/// Best codes of vectors `x[..32]` and `x[32..64]`. Per vector and codeword the arithmetic is
/// [`nearest_one_avx2`]'s (a multiply, three multiply-adds, the same tree of adds), so the codes
/// do not depend on how vectors are paired.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nearest_pair_avx2<T: LaneWord>(
    book: &[T],
    norms: &[f32],
    x: &[f32],
    prefetch: &mut Prefetch,
) -> (u32, u32) {
    use std::arch::x86_64::*;
    let c = norms.len();
    let whole = c / PAIR_BLOCK * PAIR_BLOCK;
    let (xa, xb) = (x.as_ptr(), x.as_ptr().add(DIM));
    let two = _mm_set1_ps(2.0);
    let step = _mm_setr_epi32(0, 1, 2, 3);
    let mut min_val = [_mm_set1_ps(f32::INFINITY); 2];
    let mut min_idx = [_mm_setzero_si128(); 2];
    for c0 in (0..whole).step_by(PAIR_BLOCK) {
        prefetch.step();
        let p = book.as_ptr().add(c0 * DIM);
        // acc[t] = [vector a's, vector b's] partial sums with codeword c0 + t.
        let mut acc = [[_mm256_setzero_ps(); 2]; PAIR_BLOCK];
        for (t, acc) in acc.iter_mut().enumerate() {
            let w = T::load8(p.add(t * DIM));
            acc[0] = _mm256_mul_ps(_mm256_loadu_ps(xa), w);
            acc[1] = _mm256_mul_ps(_mm256_loadu_ps(xb), w);
        }
        for s in 1..4 {
            for (t, acc) in acc.iter_mut().enumerate() {
                let w = T::load8(p.add(t * DIM + 8 * s));
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xa.add(8 * s)), w, acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xb.add(8 * s)), w, acc[1]);
            }
        }
        let norm = _mm_loadu_ps(norms.as_ptr().add(c0));
        let idx = _mm_add_epi32(_mm_set1_epi32(c0 as i32), step);
        for v in 0..2 {
            // Lane t = the dot product with codeword c0 + t, in `tree_sum8`'s order.
            let a = [acc[0][v], acc[1][v], acc[2][v], acc[3][v]];
            let q = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let dots = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
            let d = _mm_fnmadd_ps(two, dots, norm); // ‖c‖² − 2·x·c
            let lower = _mm_cmplt_ps(d, min_val[v]);
            min_val[v] = _mm_min_ps(d, min_val[v]);
            min_idx[v] = _mm_castps_si128(_mm_blendv_ps(
                _mm_castsi128_ps(min_idx[v]),
                _mm_castsi128_ps(idx),
                lower,
            ));
        }
    }
    let mut out = [0u32; 2];
    for (v, out) in out.iter_mut().enumerate() {
        let (mut vals, mut idx) = ([0f32; 4], [0u32; 4]);
        _mm_storeu_ps(vals.as_mut_ptr(), min_val[v]);
        _mm_storeu_si128(idx.as_mut_ptr() as *mut __m128i, min_idx[v]);
        *out = finish(book, norms, &x[v * DIM..(v + 1) * DIM], &vals, &idx, whole);
    }
    (out[0], out[1])
}

/// The score every kernel here gives codeword `word` ([32]) against `x` ([32]) when the codebook
/// holds whole blocks: `norm` − 2·x·c with x·c rounded as they round it — per lane l < 8 a
/// product, then multiply-adds over chunks s = 1..4 (x[8s + l]·c[8s + l]), then [`tree_sum8`]
/// over the lanes. For kernels that choose candidates another way and must agree with these.
///
/// [`tree_sum8`]: simd::vector::tree_sum8
#[inline(always)]
pub fn score<T: LaneWord>(x: &[f32], word: &[T], norm: f32) -> f32 {
    let mut lanes = [0f32; 8];
    for (l, lane) in lanes.iter_mut().enumerate() {
        *lane = x[l] * word[l].to_f32();
        for s in 1..4 {
            *lane = x[8 * s + l].mul_add(word[8 * s + l].to_f32(), *lane);
        }
    }
    norm - 2.0 * simd::vector::tree_sum8(&lanes)
}

/// The best of a vector's lanes (value, codeword index), ties to the lower index, then of the
/// codewords from `whole` on, one at a time.
fn finish<T: LaneWord>(
    book: &[T],
    norms: &[f32],
    x: &[f32],
    vals: &[f32],
    idx: &[u32],
    whole: usize,
) -> u32 {
    let (mut bv, mut bi) = crate::lanes::best_of_lanes(vals, idx);
    for (j, word) in book.chunks_exact(DIM).enumerate().skip(whole) {
        let dot: f32 = x.iter().zip(word).map(|(a, w)| a * w.to_f32()).sum();
        let v = norms[j] - 2.0 * dot;
        if v < bv {
            (bv, bi) = (v, j as u32);
        }
    }
    bi
}

/// Best code of vector `x[..32]`: its 32 values and its running minimum (lane l: the best among
/// codewords ≡ l mod 8) stay in registers, and successive blocks are independent work for the
/// out-of-order core.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nearest_one_avx2<T: LaneWord>(
    book: &[T],
    norms: &[f32],
    x: &[f32],
    prefetch: &mut Prefetch,
) -> u32 {
    use std::arch::x86_64::*;
    let c = norms.len();
    let whole = c / BLOCK * BLOCK;
    let two = _mm256_set1_ps(2.0);
    let step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let xr = x.as_ptr();
    let xs = [
        _mm256_loadu_ps(xr),
        _mm256_loadu_ps(xr.add(8)),
        _mm256_loadu_ps(xr.add(16)),
        _mm256_loadu_ps(xr.add(24)),
    ];
    let mut min_val = _mm256_set1_ps(f32::INFINITY);
    let mut min_idx = _mm256_setzero_si256();
    for c0 in (0..whole).step_by(BLOCK) {
        prefetch.step();
        let p = book.as_ptr().add(c0 * DIM);
        let mut acc = [_mm256_setzero_ps(); BLOCK];
        for (t, acc) in acc.iter_mut().enumerate() {
            let w = p.add(t * DIM);
            *acc = _mm256_mul_ps(xs[0], T::load8(w));
            *acc = _mm256_fmadd_ps(xs[1], T::load8(w.add(8)), *acc);
            *acc = _mm256_fmadd_ps(xs[2], T::load8(w.add(16)), *acc);
            *acc = _mm256_fmadd_ps(xs[3], T::load8(w.add(24)), *acc);
        }
        // Lane t = the dot product with codeword c0 + t.
        let dots = simd::vector::hadd_tree8(&acc);
        let norm = _mm256_loadu_ps(norms.as_ptr().add(c0));
        let v = _mm256_fnmadd_ps(two, dots, norm); // ‖c‖² − 2·x·c
        let idx = _mm256_add_epi32(_mm256_set1_epi32(c0 as i32), step);
        crate::lanes::keep_lower(v, idx, &mut min_val, &mut min_idx);
    }
    let (mut vals, mut idx) = ([0f32; 8], [0u32; 8]);
    _mm256_storeu_ps(vals.as_mut_ptr(), min_val);
    _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, min_idx);
    finish(book, norms, &x[..DIM], &vals, &idx, whole)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::row_norms;
    use crate::rng::SplitMix64;
    use half::f16;

    fn check<T: LaneWord>(rng: &mut SplitMix64, c: usize, m: usize, spread: f32) {
        let stored: Vec<T> = (0..c * DIM)
            .map(|_| T::from_f32(rng.normal() * spread))
            .collect();
        let book: Vec<f32> = stored.iter().map(|w| w.to_f32()).collect();
        let norms = row_norms(&book, DIM);
        let x: Vec<f32> = (0..m * DIM).map(|_| rng.normal()).collect();
        let want: Vec<u32> = x
            .chunks_exact(DIM)
            .map(|v| crate::lanes::nearest_reference(&book, v))
            .collect();
        let mut got = vec![0u32; m];
        nearest(&stored, &norms, &x, &mut got);
        assert_eq!(got, want, "C {c}, {m} vectors");
    }

    #[test]
    fn nearest_equals_the_slow_reference_in_f32_f16_and_i8() {
        if !available(DIM) {
            eprintln!("no AVX2/FMA/F16C here: the row-search kernel does not run, nor its test");
            return;
        }
        let mut rng = SplitMix64::new(5);
        // Sizes with and without a tail past the blocks of 8; one vector to a batch's worth.
        for (c, m) in [(2048, 6), (37, 3), (8, 1), (300, 13), (5, 2)] {
            check::<f32>(&mut rng, c, m, 1.0);
            check::<f16>(&mut rng, c, m, 1.0);
            check::<i8>(&mut rng, c, m, 40.0);
        }
    }

    #[test]
    fn the_avx512_kernel_finds_the_avx2_kernels_codes_bit_for_bit() {
        if simd::detected() < simd::Level::Avx512 {
            eprintln!("no AVX-512 here: nothing to compare the AVX2 kernels with");
            return;
        }
        let mut rng = SplitMix64::new(9);
        // Coarse values make exact ties between codewords common; 1 to 13 vectors cover every
        // chunk of six and the pair and single kernels; C = 300 has a tail past the blocks.
        for (c, m) in [(2048, 6), (300, 13), (64, 1), (37, 5)] {
            let stored: Vec<f16> = (0..c * DIM)
                .map(|_| f16::from_f32((rng.below(9) as f32 - 4.0) * 0.5))
                .collect();
            let book: Vec<f32> = stored.iter().map(|w| w.to_f32()).collect();
            let norms = row_norms(&book, DIM);
            let x: Vec<f32> = (0..m * DIM)
                .map(|_| (rng.below(9) as f32 - 4.0) * 0.5)
                .collect();
            let run = |wide: bool| {
                let mut got = vec![0u32; m];
                // SAFETY: AVX-512 (so AVX2) checked above; shapes as `nearest` asserts.
                unsafe { nearest_avx2(&stored, &norms, &x, &mut got, &[], wide) };
                got
            };
            let want: Vec<u32> = x
                .chunks_exact(DIM)
                .map(|v| crate::lanes::nearest_reference(&book, v))
                .collect();
            assert_eq!(run(true), run(false), "C {c}, {m} vectors");
            assert_eq!(run(true), want, "C {c}, {m} vectors");
        }
        // i8 codewords (converted exactly at both levels), over their whole range.
        for (c, m) in [(2048, 6), (300, 13), (37, 5)] {
            let stored: Vec<i8> = (0..c * DIM)
                .map(|_| (rng.below(255) as i32 - 127) as i8)
                .collect();
            let norms = row_norms(&stored.iter().map(|&q| q as f32).collect::<Vec<_>>(), DIM);
            let x: Vec<f32> = (0..m * DIM).map(|_| rng.normal() * 60.0).collect();
            let run = |wide: bool| {
                let mut got = vec![0u32; m];
                // SAFETY: as above.
                unsafe { nearest_avx2(&stored, &norms, &x, &mut got, &[], wide) };
                got
            };
            assert_eq!(run(true), run(false), "i8, C {c}, {m} vectors");
        }
        // Midpoints of two random codewords: which of the two wins is decided by rounding
        // alone, so sums in another order would flip some of the codes.
        let (c, m) = (2048, 3000);
        let stored: Vec<f16> = (0..c * DIM).map(|_| f16::from_f32(rng.normal())).collect();
        let book: Vec<f32> = stored.iter().map(|w| w.to_f32()).collect();
        let norms = row_norms(&book, DIM);
        let x: Vec<f32> = (0..m)
            .flat_map(|_| {
                let (a, b) = (rng.below(c), rng.below(c));
                (0..DIM)
                    .map(|j| (book[a * DIM + j] + book[b * DIM + j]) * 0.5)
                    .collect::<Vec<_>>()
            })
            .collect();
        let run = |wide: bool| {
            let mut got = vec![0u32; m];
            // SAFETY: as above.
            unsafe { nearest_avx2(&stored, &norms, &x, &mut got, &[], wide) };
            got
        };
        assert_eq!(run(true), run(false));
    }

    /// argmin over codewords of [`score`], ties to the lower index.
    fn argmin_score<T: LaneWord>(book: &[T], norms: &[f32], x: &[f32]) -> u32 {
        let (mut bv, mut bi) = (f32::INFINITY, 0u32);
        for (j, (w, &n)) in book.chunks_exact(DIM).zip(norms).enumerate() {
            let v = score(x, w, n);
            if v < bv {
                (bv, bi) = (v, j as u32);
            }
        }
        bi
    }

    #[test]
    fn score_rounds_as_the_kernels_do() {
        if !available(DIM) {
            eprintln!("no AVX2/FMA/F16C here: the row-search kernel does not run, nor its test");
            return;
        }
        let mut rng = SplitMix64::new(13);
        // Midpoints of two codewords: which wins is decided by rounding alone, so a score
        // rounded in another order than the kernels' would disagree with them on some.
        let (c, m) = (2048, 1200);
        let stored: Vec<i8> = (0..c * DIM)
            .map(|_| (rng.normal() * 40.0).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let scale: Vec<f32> = (0..DIM).map(|j| 0.003 + 0.001 * j as f32).collect();
        let words: Vec<f32> = stored
            .iter()
            .zip(scale.iter().cycle())
            .map(|(&q, s)| q as f32 * s)
            .collect();
        let norms = row_norms(&words, DIM);
        let x: Vec<f32> = (0..m)
            .flat_map(|_| {
                let (a, b) = (rng.below(c), rng.below(c));
                let mid = |j: usize| {
                    (stored[a * DIM + j] as f32 + stored[b * DIM + j] as f32) * 0.5 * scale[j]
                };
                (0..DIM).map(|j| mid(j) * scale[j]).collect::<Vec<_>>()
            })
            .collect();
        let mut got = vec![0u32; m];
        nearest(&stored, &norms, &x, &mut got);
        let want: Vec<u32> = x
            .chunks_exact(DIM)
            .map(|v| argmin_score(&stored, &norms, v))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        if !available(DIM) {
            return;
        }
        // Codewords 3 and 11 equal (different lanes of different blocks), and 20 (in the tail).
        let mut book = vec![5f32; 21 * DIM];
        for j in [3, 11, 20] {
            book[j * DIM..(j + 1) * DIM].fill(1.0);
        }
        let norms = row_norms(&book, DIM);
        // One vector (the single-vector kernel), three (a pair and a single).
        let mut got = [0u32];
        nearest(&book, &norms, &[1.0; DIM], &mut got);
        assert_eq!(got, [3]);
        let mut got = [0u32; 3];
        nearest(&book, &norms, &[1.0; 3 * DIM], &mut got);
        assert_eq!(got, [3; 3]);
    }
}
