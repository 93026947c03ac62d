//! The one integer kernel every format shares: weight rows against rows of [`Q8Rows`].
//!
//! Per chunk of 32 weights: the codes times the activations' bytes summed exactly in i32 (four
//! products per lane: `vpmaddubsw` + `vpmaddwd` on AVX2, `vpdpbusd` with AVX-512 VNNI), then one
//! fused multiply-add by the chunk's scales times the activations' scale; the offsets multiply
//! the activations' per-16 sums once per block. Up to [`ROWS`] activation rows share each chunk's
//! unpacked codes, so prefill unpacks every weight once per four rows.

use crate::activations::{Q8Row, Q8Rows};
use crate::format::{Format, CHUNK, HALF};
use simd::Level;

/// Activation rows multiplied by each unpacked chunk.
const ROWS: usize = 4;

/// `out[j·x.rows + r]` = weight row j of `w` (rows of `row_bytes`) · activation row r.
pub(crate) type TileFn = fn(Level, &[u8], usize, &Q8Rows, &mut [f32]);

/// Whether this CPU has AVX-512 VNNI (with VL), checked once.
#[cfg(target_arch = "x86_64")]
fn has_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
    })
}

pub(crate) fn tile<F: Format>(
    level: Level,
    w: &[u8],
    row_bytes: usize,
    x: &Q8Rows,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        match level {
            // SAFETY: the level never exceeds what the CPU reports, VNNI is checked.
            Level::Avx512 if has_vnni() => return unsafe { tile_vnni::<F>(w, row_bytes, x, out) },
            // SAFETY: as above.
            Level::Avx512 | Level::Avx2 => return unsafe { tile_avx2::<F>(w, row_bytes, x, out) },
            Level::Portable => {}
        }
    }
    let _ = level;
    tile_portable::<F>(w, row_bytes, x, out)
}

/// Every weight row (rows of `row_bytes`) against every group of up to [`ROWS`] activation
/// rows, and where each group's products go. A macro, not a closure: the kernels must be
/// inlined into the function that enables their instruction set.
macro_rules! each_row_group {
    ($w:expr, $row_bytes:expr, $x:expr, $out:expr, |$wrow:ident, $xs:ident, $o:ident| $dot:expr) => {{
        let rows: Vec<Q8Row> = (0..$x.rows).map(|r| $x.row(r)).collect();
        for ($wrow, out) in $w
            .chunks_exact($row_bytes)
            .zip($out.chunks_exact_mut($x.rows))
        {
            for ($xs, $o) in rows.chunks(ROWS).zip(out.chunks_mut(ROWS)) {
                $dot;
            }
        }
    }};
}

fn tile_portable<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Rows, out: &mut [f32]) {
    each_row_group!(w, row_bytes, x, out, |wrow, xs, o| {
        for (x, o) in xs.iter().zip(o) {
            *o = dot_portable::<F>(wrow, x);
        }
    });
}

/// The scalar reference of the kernel (also the portable build).
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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Rows, out: &mut [f32]) {
    each_row_group!(w, row_bytes, x, out, |wrow, xs, o| dot_avx2::<F, false>(
        wrow, xs, o
    ));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn tile_vnni<F: Format>(w: &[u8], row_bytes: usize, x: &Q8Rows, out: &mut [f32]) {
    each_row_group!(w, row_bytes, x, out, |wrow, xs, o| dot_avx2::<F, true>(
        wrow, xs, o
    ));
}

/// `out[r]` = weight row `w` · `xs[r]` for up to [`ROWS`] activation rows.
///
/// # Safety
/// AVX2, FMA and F16C (and AVX-512 VNNI + VL when `VNNI`); `w` holds whole blocks covering the rows.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx2<F: Format, const VNNI: bool>(w: &[u8], xs: &[Q8Row], out: &mut [f32]) {
    match xs.len() {
        1 => dot_rows_avx2::<F, VNNI, 1>(w, xs, out),
        2 => dot_rows_avx2::<F, VNNI, 2>(w, xs, out),
        3 => dot_rows_avx2::<F, VNNI, 3>(w, xs, out),
        _ => dot_rows_avx2::<F, VNNI, 4>(w, xs, out),
    }
}

/// [`dot_avx2`] for exactly `R` rows, so that the accumulators stay in registers (indexed by a
/// loop of constant count: iterating over `xs` instead leaves the count to run time, and the
/// accumulators spill to memory, at half the speed).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn dot_rows_avx2<F: Format, const VNNI: bool, const R: usize>(
    w: &[u8],
    xs: &[Q8Row],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let halves = F::ELEMS / HALF;
    let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_offset = [0f32; R];
    let ones = _mm256_set1_epi16(1);
    for (b, block) in w.chunks_exact(F::BYTES).enumerate() {
        F::params::<true>(block, &mut scale[..halves], &mut offset[..halves]);
        for c in 0..F::CHUNKS {
            let ch = b * F::CHUNKS + c;
            let codes = F::codes_avx2(block, c);
            // Unsigned codes multiply the activations as they are; signed ones by their
            // magnitude, the sign moved onto the activations (|x| ≤ 127, so no overflow).
            let magnitude = if F::UNSIGNED {
                codes
            } else {
                _mm256_sign_epi8(codes, codes)
            };
            let (s0, s1) = (scale[2 * c], scale[2 * c + 1]);
            for r in 0..R {
                let x = xs.get_unchecked(r);
                let mut xq = _mm256_loadu_si256(x.q.as_ptr().add(ch * CHUNK) as *const __m256i);
                if !F::UNSIGNED {
                    xq = _mm256_sign_epi8(xq, codes);
                }
                let sums = if VNNI {
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), magnitude, xq)
                } else {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xq), ones)
                };
                // i32 lanes 0..4 hold weights 0..16, lanes 4..8 weights 16..32.
                let d = *x.d.get_unchecked(ch);
                let s = _mm256_set_m128(_mm_set1_ps(s1 * d), _mm_set1_ps(s0 * d));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, acc[r]);
            }
        }
        for r in 0..R {
            let x = xs.get_unchecked(r);
            let dsums = x.dsums.get_unchecked(b * halves..(b + 1) * halves);
            for (o, s) in offset[..halves].iter().zip(dsums) {
                acc_offset[r] += o * s;
            }
        }
    }
    for r in 0..R {
        let v = acc[r];
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        out[r] = _mm_cvtss_f32(one) + acc_offset[r];
    }
}
