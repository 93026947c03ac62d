//! The integer kernels every format shares: weight rows against rows of [`Q8Rows`].
//!
//! Per unit of 16 or 32 weights sharing a scale (see [`Format::UNIT`]): the codes times the
//! activations' bytes summed exactly in i32 (`vpmaddubsw` + `vpmaddwd` on AVX2, `vpdpbusd` with
//! AVX-512 VNNI), then `products = fma(sum, scale·d, products)` and, for formats with offsets,
//! `offsets = fma(offset, d·Σq, offsets)`; the product is `products + offsets`. Both SIMD
//! kernels follow this order exactly, so a product has the same bits whichever computes it,
//! alone or in a batch (a server's batching never changes a greedy answer):
//! - one activation row ([`tile`], decode) reads the weight rows one after another (the stream
//!   the hardware prefetchers follow), keeps each chunk's integer sums, and runs the float steps
//!   of 8 rows side by side, one lane each (the sums reduced across registers by `vphaddd`);
//! - a batch ([`tile_lanes`]) puts 8 activation rows in the lanes ([`Q8Lanes`]) and broadcasts
//!   4 codes of one weight row to all of them, so each unpacked code serves 8 rows and each
//!   loaded activation serves several weight rows, with no reduction across lanes.
//!
//! The portable build sums in its own order (the reference the tests hold every level to).

use crate::activations::{Q8Lanes, Q8Row, Q8Rows, LANES};
use crate::format::{Format, CHUNK, HALF};
use simd::Level;

/// `out[j·x.rows + r]` = weight row j of `w` (rows of `row_bytes`) · activation row r.
pub(crate) type TileFn = fn(Level, &[u8], usize, &Q8Rows, &mut [f32]);
/// `out[j·width + r]` = weight row j · activation row r, `width` = the lanes of every group; a
/// SIMD level only.
pub(crate) type LanesFn = fn(Level, &[u8], usize, &Q8Lanes, &mut [f32]);

/// Which of the SIMD builds a level runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// AVX-512 VNNI (with VL): `vpdpbusd`.
    Vnni,
    /// AVX2, FMA and F16C (also AVX-512 without VNNI).
    Avx2,
    Portable,
}

impl Build {
    fn of(level: Level) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let vnni = *VNNI.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            });
            match level {
                Level::Avx512 if vnni => Self::Vnni,
                Level::Avx512 | Level::Avx2 => Self::Avx2,
                Level::Portable => Self::Portable,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = level;
            Self::Portable
        }
    }
}

pub(crate) fn tile<F: Format>(
    level: Level,
    w: &[u8],
    row_bytes: usize,
    x: &Q8Rows,
    out: &mut [f32],
) {
    match Build::of(level) {
        // SAFETY: the level never exceeds what the CPU reports, VNNI is checked.
        #[cfg(target_arch = "x86_64")]
        Build::Vnni => unsafe { tile_vnni::<F>(w, row_bytes, x, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { tile_avx2::<F>(w, row_bytes, x, out) },
        _ => tile_portable::<F>(w, row_bytes, x, out),
    }
}

/// Whether `level` runs [`tile_lanes`] (a SIMD build).
pub(crate) fn has_lanes(level: Level) -> bool {
    Build::of(level) != Build::Portable
}

/// Only where [`has_lanes`]: the portable build has one kernel, [`tile`].
pub(crate) fn tile_lanes<F: Format>(
    level: Level,
    w: &[u8],
    row_bytes: usize,
    x: &Q8Lanes,
    out: &mut [f32],
) {
    match Build::of(level) {
        // SAFETY: the level never exceeds what the CPU reports, VNNI is checked.
        #[cfg(target_arch = "x86_64")]
        Build::Vnni => unsafe { lanes_vnni::<F>(w, row_bytes, x, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { lanes_avx2::<F>(w, row_bytes, x, out) },
        _ => unreachable!("the batched kernel at {level:?}: the caller checks `has_lanes`"),
    }
}

fn tile_portable<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Rows, out: &mut [f32]) {
    for (wrow, out) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(x.rows)) {
        for (r, o) in out.iter_mut().enumerate() {
            *o = dot_portable::<F>(wrow, &x.row(r));
        }
    }
}

/// The scalar reference of the kernels (also the portable build), summed in its own order.
fn dot_portable<F: Format>(w: &[u8], x: &Q8Row) -> f32 {
    let halves = F::ELEMS / HALF;
    let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
    let mut acc = 0f32;
    for (b, block) in w.chunks_exact(F::BYTES).enumerate() {
        F::params::<false>(block, &mut scale[..halves], &mut offset[..halves]);
        for c in 0..F::CHUNKS {
            let ch = b * F::CHUNKS + c;
            let codes = F::codes(block, c);
            let xq = &x.q[ch * CHUNK..(ch + 1) * CHUNK];
            let mut s = [0i32; 2];
            for (l, (&q, &v)) in codes.iter().zip(xq).enumerate() {
                s[l / HALF] += q as i32 * v as i32;
            }
            acc += x.d[ch] * (scale[2 * c] * s[0] as f32 + scale[2 * c + 1] * s[1] as f32);
        }
        let dsums = &x.dsums[b * halves..(b + 1) * halves];
        acc += offset[..halves]
            .iter()
            .zip(dsums)
            .map(|(o, s)| o * s)
            .sum::<f32>();
    }
    acc
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Rows, out: &mut [f32]) {
    tile_simd::<F, false>(w, row_bytes, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn tile_vnni<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Rows, out: &mut [f32]) {
    tile_simd::<F, true>(w, row_bytes, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lanes_avx2<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Lanes, out: &mut [f32]) {
    // 16 registers: two weight rows' accumulators and sums beside the activations.
    lanes_simd::<F, false, 2>(w, row_bytes, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn lanes_vnni<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Lanes, out: &mut [f32]) {
    // 32 registers with AVX-512: four weight rows share each activation load.
    lanes_simd::<F, true, 4>(w, row_bytes, x, out)
}

/// `acc` + the products of 4 unsigned bytes of `a` and signed bytes of `b` per i32 lane.
///
/// # Safety
/// AVX2 (and AVX-512 VNNI + VL when `VNNI`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn accumulate<const VNNI: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(acc, a, b)
    } else {
        // Pairs of products fit i16: codes ≤ 128 (Q8's |−128|), |b| ≤ 127.
        let pairs = _mm256_maddubs_epi16(a, b);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// Lane l: Σ codes·activations over weights 4l..4l + 4 of one chunk. Signed codes multiply by
/// their magnitude, their sign moved onto the activations (|x| ≤ 127, so no overflow).
///
/// # Safety
/// As [`accumulate`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn chunk_sums<F: Format, const VNNI: bool>(codes: __m256i, x: __m256i) -> __m256i {
    let zero = _mm256_setzero_si256();
    if F::UNSIGNED {
        accumulate::<VNNI>(zero, codes, x)
    } else {
        accumulate::<VNNI>(
            zero,
            _mm256_sign_epi8(codes, codes),
            _mm256_sign_epi8(x, codes),
        )
    }
}

/// Bytes ahead of a row's current block that the batched kernel asks the cache for: it reads
/// several weight rows at once, interleaved, which the hardware prefetchers follow poorly
/// (without this, 8 rows against Q8_0 weights from memory run at about half the speed).
const PREFETCH_AHEAD: usize = 2048;

/// Starts loading the line `PREFETCH_AHEAD` bytes past `row[at]` (never faults, even past the end).
///
/// # Safety
/// SSE.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch(row: *const u8, at: usize) {
    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at + PREFETCH_AHEAD) as *const i8);
}

/// The SIMD kernels' running sums, one lane per product, in the same order in every kernel:
/// per unit `products += sums·(scale·d)` and `offsets += offset·(d·Σq)`, two chains, so that
/// neither waits on the other; the product is their sum at the end.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Acc {
    products: __m256,
    offsets: __m256,
}

#[cfg(target_arch = "x86_64")]
impl Acc {
    /// # Safety
    /// AVX.
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self {
            products: _mm256_setzero_ps(),
            offsets: _mm256_setzero_ps(),
        }
    }

    /// One unit's step.
    ///
    /// # Safety
    /// AVX2 and FMA.
    #[inline(always)]
    unsafe fn step<F: Format>(
        &mut self,
        sums: __m256i,
        scale: __m256,
        offset: __m256,
        d: __m256,
        dsum: __m256,
    ) {
        let scaled = _mm256_mul_ps(scale, d);
        self.products = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scaled, self.products);
        if F::OFFSET {
            self.offsets = _mm256_fmadd_ps(offset, dsum, self.offsets);
        }
    }

    /// # Safety
    /// AVX.
    #[inline(always)]
    unsafe fn total(self) -> __m256 {
        _mm256_add_ps(self.products, self.offsets)
    }
}

/// Each activation row against the weight rows 8 at a time: each row's chunk sums and params in
/// turn (one contiguous stream of weights: the hardware prefetchers follow it, and reading rows
/// interleaved halves the bandwidth they reach), then the 8 rows' float steps side by side, one
/// lane each.
///
/// # Safety
/// AVX2, FMA and F16C (and AVX-512 VNNI + VL when `VNNI`); `w` holds whole rows of blocks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_simd<F: Format, const VNNI: bool>(
    w: &[u8],
    row_bytes: usize,
    x: &Q8Rows,
    out: &mut [f32],
) {
    let chunks = row_bytes / F::BYTES * F::CHUNKS;
    // Taken out and put back, not borrowed in a closure: a closure would not inherit this
    // function's instruction sets, and the kernel inlined into it would lose them.
    let mut scratch = SCRATCH.take();
    scratch.resize(chunks);
    let sums = &mut scratch.sums[..LANES * chunks];
    let scale = &mut scratch.scale[..2 * chunks * LANES];
    let offset = &mut scratch.offset[..2 * chunks * LANES];
    let bits = &mut scratch.bits[..2 * chunks * LANES];
    let (wrows, n) = (w.len() / row_bytes, x.rows);
    for r in 0..n {
        let xr = x.row(r);
        for first in (0..wrows).step_by(LANES) {
            for (i, sums) in sums.chunks_exact_mut(chunks).enumerate() {
                // A last partial group repeats its last row in the spare lanes.
                let at = (first + i).min(wrows - 1) * row_bytes;
                let row = w.get_unchecked(at..at + row_bytes);
                row_sums::<F, VNNI>(row, &xr, sums, scale, offset, bits, i);
            }
            let mut v = [0f32; LANES];
            _mm256_storeu_ps(
                v.as_mut_ptr(),
                across_rows::<F>(sums, scale, offset, bits, &xr),
            );
            for (i, &v) in v.iter().take(wrows - first).enumerate() {
                out[(first + i) * n + r] = v;
            }
        }
    }
    SCRATCH.set(scratch);
}

/// The one-row kernel's working space, kept by each thread: a decode step multiplies hundreds
/// of matrices, each split into several tasks, and would otherwise allocate and zero it (18 KB
/// for 1,536 columns) in every task.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Scratch {
    /// [LANES, chunks]: the sums of each chunk's 8 quads.
    sums: Vec<__m256i>,
    /// [units, LANES]: params, at most 2 units a chunk.
    scale: Vec<f32>,
    offset: Vec<f32>,
    /// [2, chunks, LANES]: f16 scales, then minimums (formats with [`Format::F16_SCALE`]).
    bits: Vec<u16>,
}

#[cfg(target_arch = "x86_64")]
impl Scratch {
    fn resize(&mut self, chunks: usize) {
        if self.sums.len() < LANES * chunks {
            // SAFETY: an all-zero bit pattern is a valid __m256i.
            self.sums
                .resize(LANES * chunks, unsafe { std::mem::zeroed() });
            self.scale.resize(2 * chunks * LANES, 0.0);
            self.offset.resize(2 * chunks * LANES, 0.0);
            self.bits.resize(2 * chunks * LANES, 0);
        }
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// One weight row's chunk sums against `x` (`sums`: [chunks]), and its params into lane `lane`
/// of `scale` and `offset` ([units, LANES], a unit per [`Format::UNIT`] weights).
///
/// # Safety
/// As [`tile_simd`]; `row` holds whole blocks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_sums<F: Format, const VNNI: bool>(
    row: &[u8],
    x: &Q8Row,
    sums: &mut [__m256i],
    scale: &mut [f32],
    offset: &mut [f32],
    bits: &mut [u16],
    lane: usize,
) {
    let halves = F::ELEMS / HALF;
    let (mut s, mut o) = ([0f32; 16], [0f32; 16]);
    let chunks = sums.len();
    for (b, block) in row.chunks_exact(F::BYTES).enumerate() {
        if let Some(f16) = F::F16_SCALE {
            // Blocks of one chunk: b is the chunk.
            let at = b * LANES + lane;
            *bits.get_unchecked_mut(at) = u16::from_le_bytes([block[0], block[1]]);
            if let Some(m) = f16.min_at {
                *bits.get_unchecked_mut(chunks * LANES + at) =
                    u16::from_le_bytes([block[m], block[m + 1]]);
            }
        } else {
            F::params::<true>(block, &mut s[..halves], &mut o[..halves]);
            // One entry per unit: where a chunk shares one scale, its second half's is not read.
            let units = F::ELEMS / F::UNIT;
            for u in 0..units {
                let at = (b * units + u) * LANES + lane;
                *scale.get_unchecked_mut(at) = s[u * F::UNIT / HALF];
                if F::OFFSET {
                    *offset.get_unchecked_mut(at) = o[u * F::UNIT / HALF];
                }
            }
        }
        for c in 0..F::CHUNKS {
            let ch = b * F::CHUNKS + c;
            let xq = _mm256_loadu_si256(x.q.as_ptr().add(ch * CHUNK) as *const __m256i);
            *sums.get_unchecked_mut(ch) = chunk_sums::<F, VNNI>(F::codes_avx2(block, c), xq);
        }
    }
}

/// Entry `k` of [units, LANES] params, one lane per row.
///
/// # Safety
/// AVX; `p` holds `(k + 1)·LANES` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes(p: &[f32], k: usize) -> __m256 {
    _mm256_loadu_ps(p.as_ptr().add(k * LANES))
}

/// Lane i: the float steps of weight row i's chunk sums (see [`tile_simd`]) against `x`.
///
/// # Safety
/// As [`tile_simd`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn across_rows<F: Format>(
    sums: &[__m256i],
    scale: &[f32],
    offset: &[f32],
    bits: &[u16],
    x: &Q8Row,
) -> __m256 {
    let chunks = sums.len() / LANES;
    let mut acc = Acc::zero();
    for ch in 0..chunks {
        let s = |i: usize| *sums.get_unchecked(i * chunks + ch);
        // Rows 0..4 (and 4..8): [weights 0..16 of each row | weights 16..32 of each row].
        let a = _mm256_hadd_epi32(_mm256_hadd_epi32(s(0), s(1)), _mm256_hadd_epi32(s(2), s(3)));
        let b = _mm256_hadd_epi32(_mm256_hadd_epi32(s(4), s(5)), _mm256_hadd_epi32(s(6), s(7)));
        let low = _mm256_permute2x128_si256(a, b, 0x20);
        let high = _mm256_permute2x128_si256(a, b, 0x31);
        let d = _mm256_set1_ps(*x.d.get_unchecked(ch));
        let (ds0, ds1) = (
            *x.dsums.get_unchecked(2 * ch),
            *x.dsums.get_unchecked(2 * ch + 1),
        );
        if F::UNIT == CHUNK {
            let sums = _mm256_add_epi32(low, high);
            let dsum = _mm256_set1_ps(ds0 + ds1);
            let (s, o) = match F::F16_SCALE {
                Some(f16) => {
                    let at = bits.as_ptr().add(ch * LANES);
                    let s = _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i));
                    // The products `params` forms: −centre·d, or the minimum as it is.
                    let o = match f16.min_at {
                        Some(_) => _mm256_cvtph_ps(_mm_loadu_si128(
                            at.add(chunks * LANES) as *const __m128i
                        )),
                        None => _mm256_mul_ps(_mm256_set1_ps(-f16.centre), s),
                    };
                    (s, o)
                }
                None => (lanes(scale, ch), lanes(offset, ch)),
            };
            acc.step::<F>(sums, s, o, d, dsum);
        } else {
            for (h, (sums, ds)) in [(low, ds0), (high, ds1)].into_iter().enumerate() {
                let k = 2 * ch + h;
                let dsum = _mm256_set1_ps(ds);
                acc.step::<F>(sums, lanes(scale, k), lanes(offset, k), d, dsum);
            }
        }
    }
    acc.total()
}

/// Every weight row against every group of activation rows, `RM` weight rows at a time.
///
/// # Safety
/// As [`tile_simd`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn lanes_simd<F: Format, const VNNI: bool, const RM: usize>(
    w: &[u8],
    row_bytes: usize,
    x: &Q8Lanes,
    out: &mut [f32],
) {
    let (wrows, width) = (w.len() / row_bytes, x.groups() * LANES);
    for first in (0..wrows).step_by(RM) {
        let mut rows = [w.as_ptr(); RM];
        for (i, p) in rows.iter_mut().enumerate() {
            *p = w.as_ptr().add((first + i).min(wrows - 1) * row_bytes);
        }
        for g in 0..x.groups() {
            let acc = weight_rows::<F, VNNI, RM>(&rows, row_bytes / F::BYTES, x, g);
            for (i, acc) in acc.iter().take(wrows - first).enumerate() {
                let at = (first + i) * width + g * LANES;
                _mm256_storeu_ps(out[at..at + LANES].as_mut_ptr(), *acc);
            }
        }
    }
}

/// Lane r of entry i: weight row `rows[i]` · activation row r of group `g`.
///
/// # Safety
/// As [`tile_simd`]; each of `rows` points at `blocks` whole blocks.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn weight_rows<F: Format, const VNNI: bool, const RM: usize>(
    rows: &[*const u8; RM],
    blocks: usize,
    x: &Q8Lanes,
    g: usize,
) -> [__m256; RM] {
    let halves = F::ELEMS / HALF;
    // This group's [cols / 4, LANES, 4] bytes, [chunks, LANES] scales, [halves, LANES] sums.
    let q = x.q.as_ptr().add(g * x.cols * LANES);
    let d = x.d.as_ptr().add(g * x.cols / CHUNK * LANES);
    let dsums = x.dsums.as_ptr().add(g * x.cols / HALF * LANES);
    let (mut scale, mut offset) = ([[0f32; 16]; RM], [[0f32; 16]; RM]);
    let mut acc = [Acc::zero(); RM];
    for b in 0..blocks {
        let mut block = [[].as_slice(); RM];
        for i in 0..RM {
            prefetch(rows[i], b * F::BYTES);
            block[i] = std::slice::from_raw_parts(rows[i].add(b * F::BYTES), F::BYTES);
            F::params::<true>(block[i], &mut scale[i][..halves], &mut offset[i][..halves]);
        }
        for c in 0..F::CHUNKS {
            let ch = b * F::CHUNKS + c;
            // Each weight row's codes: magnitudes, and the signed codes for their signs.
            let mut codes = [_mm256_setzero_si256(); RM];
            let mut signs = [_mm256_setzero_si256(); RM];
            for i in 0..RM {
                signs[i] = F::codes_avx2(block[i], c);
                codes[i] = if F::UNSIGNED {
                    signs[i]
                } else {
                    _mm256_sign_epi8(signs[i], signs[i])
                };
            }
            // [weights 0..16, weights 16..32] of each weight row, per activation row.
            let mut sums = [[_mm256_setzero_si256(); 2]; RM];
            // The halves alternate, so that twice as many sums are in flight.
            for k in (0..CHUNK / 4).map(|j| (j % 2) * 4 + j / 2) {
                let xv = _mm256_loadu_si256(q.add((ch * 8 + k) * 32) as *const __m256i);
                // Codes 4k..4k + 4 in every lane.
                let at = _mm256_set1_epi32(k as i32);
                for i in 0..RM {
                    let xs = if F::UNSIGNED {
                        xv
                    } else {
                        _mm256_sign_epi8(xv, _mm256_permutevar8x32_epi32(signs[i], at))
                    };
                    let wv = _mm256_permutevar8x32_epi32(codes[i], at);
                    sums[i][k / 4] = accumulate::<VNNI>(sums[i][k / 4], wv, xs);
                }
            }
            let dx = _mm256_loadu_ps(d.add(ch * LANES));
            let ds0 = _mm256_loadu_ps(dsums.add(2 * ch * LANES));
            let ds1 = _mm256_loadu_ps(dsums.add((2 * ch + 1) * LANES));
            for i in 0..RM {
                let (s0, o0) = (
                    _mm256_set1_ps(scale[i][2 * c]),
                    _mm256_set1_ps(offset[i][2 * c]),
                );
                if F::UNIT == CHUNK {
                    let both = _mm256_add_epi32(sums[i][0], sums[i][1]);
                    acc[i].step::<F>(both, s0, o0, dx, _mm256_add_ps(ds0, ds1));
                } else {
                    acc[i].step::<F>(sums[i][0], s0, o0, dx, ds0);
                    let s1 = _mm256_set1_ps(scale[i][2 * c + 1]);
                    let o1 = _mm256_set1_ps(offset[i][2 * c + 1]);
                    acc[i].step::<F>(sums[i][1], s1, o1, dx, ds1);
                }
            }
        }
    }
    let mut total = [_mm256_setzero_ps(); RM];
    for i in 0..RM {
        total[i] = acc[i].total();
    }
    total
}
