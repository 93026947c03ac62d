//! Nearest codewords of d = 32 vectors at full multiply-add rate: codebooks in lane groups.
//!
//! A matrix product of a few rows × C codewords × d = 32 spends its time packing and reducing,
//! and its scores then take a second pass for the argmin. Here a codebook is laid out transposed
//! in groups of 16 codewords ([C/16][32][16]: dimension j of 16 codewords side by side), so the
//! dot products of up to 6 vectors with 16 codewords accumulate in 12 AVX2 registers by
//! broadcast multiply-adds, with no horizontal sums, and the running minimum is kept in
//! registers too. Lanes hold f32, or f16 where the codebook is streamed from memory every call
//! (half the bytes; the distances are then to the f16-rounded codewords).

use crate::kernels::row_norms;
use simd::vector::F32x16;

/// Codewords side by side in one lane group.
pub const LANES: usize = 16;
/// Vectors searched at once: 6 × 2 accumulators + 2 codeword loads + 1 broadcast fit the 16
/// AVX2 registers.
pub const ROWS: usize = 6;
/// Vectors from which a batch search lays the codebook out in lanes for the call: building the
/// lanes touches each codeword once, the search touches it once per vector.
pub const MIN_BATCH: usize = 32;
/// The only dimension the kernel is written for (the paper's group size).
pub const DIM: usize = 32;

/// Whether the lane kernel runs here for vectors of dimension `d`: d = 32 and the CPU has AVX2,
/// FMA and F16C, unless `RVQ_KV_SIMD` asks for portable code. Decided once per process, not by
/// [`simd::force`]: the lane kernel sums in another order than the matrix product, so a
/// level forced mid-run (tests do) must not switch between them under a running computation.
pub fn available(d: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    d == DIM && *ON.get_or_init(|| simd::configured() >= simd::Level::Avx2)
}

/// What a lane holds: f32, or f16 for half the bytes.
pub trait LaneWord: Copy + Default + Send + Sync + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Eight lanes at `p` as f32.
    ///
    /// # Safety
    /// 8 values must be readable at `p`, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Eight lanes at `a` then eight at `b` as the two halves of one AVX-512 register.
    ///
    /// # Safety
    /// 8 values must be readable at `a` and at `b`, and the CPU must have AVX-512 F and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8x2(a: *const Self, b: *const Self) -> std::arch::x86_64::__m512;
    /// Sixteen lanes at `p` as f32, for kernels written against [`F32x16`].
    ///
    /// # Safety
    /// 16 values must be readable at `p`, and the CPU must run `V`'s level.
    unsafe fn load16<V: F32x16>(p: *const Self) -> V;
}

impl LaneWord for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(a: *const Self, b: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let lo = _mm512_castps256_ps512(_mm256_loadu_ps(a));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castps_pd(lo),
            _mm256_castps_pd(_mm256_loadu_ps(b)),
        ))
    }
    #[inline(always)]
    unsafe fn load16<V: F32x16>(p: *const Self) -> V {
        V::load(p)
    }
}

impl LaneWord for half::f16 {
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(a: *const Self, b: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let lo = _mm256_castsi128_si256(_mm_loadu_si128(a as *const __m128i));
        let both = _mm256_inserti128_si256::<1>(lo, _mm_loadu_si128(b as *const __m128i));
        _mm512_cvtph_ps(both)
    }
    #[inline(always)]
    unsafe fn load16<V: F32x16>(p: *const Self) -> V {
        V::load_f16(p)
    }
}

/// i8 lanes: a codebook quantized per channel ([`crate::I8Rvq`]), the scales applied outside.
impl LaneWord for i8 {
    fn from_f32(v: f32) -> Self {
        v.round().clamp(-127.0, 127.0) as i8
    }
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(a: *const Self, b: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let both = _mm_unpacklo_epi64(
            _mm_loadl_epi64(a as *const __m128i),
            _mm_loadl_epi64(b as *const __m128i),
        );
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(both))
    }
    #[inline(always)]
    unsafe fn load16<V: F32x16>(p: *const Self) -> V {
        V::load_i8(p)
    }
}

/// One codebook of d = 32 in lane groups.
#[derive(Clone, Debug)]
pub struct LaneBook<T> {
    /// [ceil(C/16)][32][16]; codewords past C are zero.
    lanes: Vec<T>,
    /// [ceil(C/16)·16]: squared norms of the codewords as stored in the lanes (rounded, for
    /// f16), +∞ past C so padding never wins.
    norms: Vec<f32>,
}

impl<T: LaneWord> LaneBook<T> {
    /// The lane layout of `codebook` ([C, 32]); `None` unless its rows have 32 values and the
    /// kernel runs here ([`available`]).
    pub fn new(codebook: &[f32], d: usize) -> Option<Self> {
        if !available(d) || codebook.is_empty() || !codebook.len().is_multiple_of(DIM) {
            return None;
        }
        let size = codebook.len() / DIM;
        let padded = size.next_multiple_of(LANES);
        let mut lanes = vec![T::default(); padded * DIM];
        let mut stored = vec![0f32; size * DIM];
        for (i, (cw, st)) in codebook
            .chunks_exact(DIM)
            .zip(stored.chunks_exact_mut(DIM))
            .enumerate()
        {
            for (j, (&v, s)) in cw.iter().zip(st).enumerate() {
                let w = T::from_f32(v);
                lanes[((i / LANES) * DIM + j) * LANES + i % LANES] = w;
                *s = w.to_f32();
            }
        }
        let mut norms = row_norms(&stored, DIM);
        norms.resize(padded, f32::INFINITY);
        Some(Self { lanes, norms })
    }

    /// Bytes of the lanes.
    pub fn bytes(&self) -> u64 {
        (self.lanes.len() * std::mem::size_of::<T>()) as u64
    }

    /// For each row r of `x` ([n, 32]): `best[r]` = argmin over codewords c of ‖c‖² − 2·x_r·c
    /// (ties to the lower index) and `value[r]` that minimum.
    pub fn nearest(&self, x: &[f32], best: &mut [u32], value: &mut [f32]) {
        let n = x.len() / DIM;
        assert!(x.len() == n * DIM && best.len() == n && value.len() == n);
        #[cfg(target_arch = "x86_64")]
        {
            let mut rows = [0f32; ROWS * DIM];
            let (mut b, mut v) = ([0u32; ROWS], [0f32; ROWS]);
            for ((xs, best), value) in x
                .chunks(ROWS * DIM)
                .zip(best.chunks_mut(ROWS))
                .zip(value.chunks_mut(ROWS))
            {
                for (r, &v) in rows.iter_mut().zip(xs) {
                    *r = -2.0 * v; // exact: the kernel then only adds
                }
                rows[xs.len()..].fill(0.0);
                // SAFETY: a LaneBook exists only where `available` found AVX2, FMA and F16C;
                // the shapes are its own construction ([blocks][32][16] lanes, [blocks·16] norms).
                unsafe { nearest_avx2(&rows, &self.lanes, &self.norms, &mut b, &mut v) };
                best.copy_from_slice(&b[..best.len()]);
                value.copy_from_slice(&v[..value.len()]);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no LaneBook is built off x86-64");
    }
}

/// `best[r]`, `value[r]` = argmin and min over codewords of ‖c‖² − 2·x_r·c for the 6 rows of `x`
/// ([6, 32]), given `x` already multiplied by −2 (`minus_two_x`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nearest_avx2<T: LaneWord>(
    minus_two_x: &[f32; ROWS * DIM],
    lanes: &[T],
    norms: &[f32],
    best: &mut [u32; ROWS],
    value: &mut [f32; ROWS],
) {
    use std::arch::x86_64::*;
    assert!(lanes.len() == norms.len() * DIM);
    let (xp, lp) = (minus_two_x.as_ptr(), lanes.as_ptr());
    // Per row, lane i holds the best of the codewords whose index is i mod 8: one running
    // minimum per row instead of one per accumulator keeps fewer registers live.
    let mut min_val = [_mm256_set1_ps(f32::INFINITY); ROWS];
    let mut min_idx = [_mm256_setzero_si256(); ROWS];
    let step = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for b in 0..norms.len() / LANES {
        let block = lp.add(b * DIM * LANES);
        let first = b * LANES;
        // acc[2r + h] = ‖c‖² − 2·x_r·c for codewords 16b + 8h .. 16b + 8h + 8: seeded with the
        // norms, so the scores need no pass of their own.
        let norm_lo = _mm256_loadu_ps(norms.as_ptr().add(first));
        let norm_hi = _mm256_loadu_ps(norms.as_ptr().add(first + 8));
        let mut acc = [
            norm_lo, norm_hi, norm_lo, norm_hi, norm_lo, norm_hi, norm_lo, norm_hi, norm_lo,
            norm_hi, norm_lo, norm_hi,
        ];
        for j in 0..DIM {
            let lo = T::load8(block.add(j * LANES));
            let hi = T::load8(block.add(j * LANES + 8));
            for r in 0..ROWS {
                let xj = _mm256_broadcast_ss(&*xp.add(r * DIM + j));
                acc[2 * r] = _mm256_fmadd_ps(xj, lo, acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(xj, hi, acc[2 * r + 1]);
            }
        }
        // Lower half first, strict <: ties keep the lower index.
        for h in 0..2 {
            let idx = _mm256_add_epi32(_mm256_set1_epi32((first + 8 * h) as i32), step);
            for r in 0..ROWS {
                keep_lower(acc[2 * r + h], idx, &mut min_val[r], &mut min_idx[r]);
            }
        }
    }
    for r in 0..ROWS {
        let (mut vals, mut idx) = ([0f32; 8], [0u32; 8]);
        _mm256_storeu_ps(vals.as_mut_ptr(), min_val[r]);
        _mm256_storeu_si256(idx.as_mut_ptr() as *mut __m256i, min_idx[r]);
        let (bv, bi) = best_of_lanes(&vals, &idx);
        (best[r], value[r]) = (bi, bv);
    }
}

/// Per lane: where `v` is below the running minimum `min_val`, it and its codeword index from
/// `idx` replace it (strict <: a tie keeps the earlier, lower index).
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn keep_lower(
    v: std::arch::x86_64::__m256,
    idx: std::arch::x86_64::__m256i,
    min_val: &mut std::arch::x86_64::__m256,
    min_idx: &mut std::arch::x86_64::__m256i,
) {
    use std::arch::x86_64::*;
    let lower = _mm256_cmp_ps(v, *min_val, _CMP_LT_OQ);
    *min_val = _mm256_min_ps(v, *min_val);
    *min_idx = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(*min_idx),
        _mm256_castsi256_ps(idx),
        lower,
    ));
}

/// The smallest of per-lane running minima `vals` and its codeword index from `idx`, ties to the
/// lower index: what a kernel keeping one minimum per lane reports.
pub(crate) fn best_of_lanes(vals: &[f32], idx: &[u32]) -> (f32, u32) {
    let (mut bv, mut bi) = (f32::INFINITY, 0u32);
    for (&v, &i) in vals.iter().zip(idx) {
        if v < bv || (v == bv && i < bi) {
            (bv, bi) = (v, i);
        }
    }
    (bv, bi)
}

/// Slow nearest codeword of `x` among `book` ([C, 32]): exact distances in f64, ties to the
/// lower index. The reference the kernels' tests compare with.
#[cfg(test)]
pub(crate) fn nearest_reference(book: &[f32], x: &[f32]) -> u32 {
    let dist = |cw: &[f32]| -> f64 {
        x.iter()
            .zip(cw)
            .map(|(&a, &w)| (a as f64 - w as f64).powi(2))
            .sum()
    };
    let (mut best, mut best_d) = (0, f64::INFINITY);
    for (i, cw) in book.chunks_exact(DIM).enumerate() {
        let d = dist(cw);
        if d < best_d {
            (best, best_d) = (i as u32, d);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use simd::at_each_level;

    /// Slow nearest codeword: exact distances in f64 to the codewords as the lanes store them.
    fn reference<T: LaneWord>(book: &[f32], x: &[f32]) -> u32 {
        let stored: Vec<f32> = book.iter().map(|&w| T::from_f32(w).to_f32()).collect();
        nearest_reference(&stored, x)
    }

    fn check<T: LaneWord>(rng: &mut SplitMix64, c: usize, n: usize) {
        let book: Vec<f32> = (0..c * DIM).map(|_| rng.normal()).collect();
        let Some(lanes) = LaneBook::<T>::new(&book, DIM) else {
            assert!(!available(DIM));
            eprintln!("no AVX2/FMA/F16C here: the lane kernel is not built and not tested");
            return;
        };
        let words = c.next_multiple_of(LANES) * DIM;
        assert_eq!(lanes.bytes(), (words * std::mem::size_of::<T>()) as u64);
        let x: Vec<f32> = (0..n * DIM).map(|_| rng.normal()).collect();
        let want: Vec<u32> = x
            .chunks_exact(DIM)
            .map(|v| reference::<T>(&book, v))
            .collect();
        // The kernel does not depend on a forced level: the same answer at each.
        for (level, (best, value)) in at_each_level(|_| {
            let (mut best, mut value) = (vec![0u32; n], vec![0f32; n]);
            lanes.nearest(&x, &mut best, &mut value);
            (best, value)
        }) {
            assert_eq!(best, want, "C {c}, {n} vectors, {level:?}");
            for ((v, &b), xr) in value.iter().zip(&best).zip(x.chunks_exact(DIM)) {
                let exact: f64 = (0..DIM)
                    .map(|j| {
                        let w = T::from_f32(book[b as usize * DIM + j]).to_f32() as f64;
                        w * w - 2.0 * w * xr[j] as f64
                    })
                    .sum();
                assert!(
                    (*v as f64 - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "{v} {exact}"
                );
            }
        }
    }

    #[test]
    fn nearest_equals_the_slow_reference_in_f32_and_f16() {
        let mut rng = SplitMix64::new(3);
        // Sizes that are and are not multiples of 16; row counts that cross chunks of 6.
        for (c, n) in [(2048, 6), (37, 13), (16, 1), (300, 7), (256, 40)] {
            check::<f32>(&mut rng, c, n);
            check::<half::f16>(&mut rng, c, n);
        }
    }

    #[test]
    fn other_dimensions_have_no_lane_layout() {
        assert!(LaneBook::<f32>::new(&[0.0; 16], 8).is_none());
        assert!(LaneBook::<f32>::new(&[0.0; 33], 32).is_none());
        assert!(!available(8));
    }
}
