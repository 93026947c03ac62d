//! ggml's "k-quants": super-blocks of 256 weights with sub-block scales.
//!
//! Layouts (little-endian, as llama.cpp writes them); "chunk c" is weights 32c..32c + 32:
//! - Q2_K (84 bytes): 16 scale bytes (low nibble scale, high nibble minimum, per 16 weights),
//!   64 bytes of 2-bit codes, d f16, dmin f16. Chunk c = 4n + j reads bytes 32n..32n + 32,
//!   bits 2j..2j + 2. w = d·sc·q − dmin·m.
//! - Q3_K (110 bytes): 32 bytes of high bits, 64 bytes of 2-bit codes, 12 bytes packing 16
//!   six-bit scales, d f16. Chunk c = 4n + j: low bits as Q2_K, high bit c of each of the 32
//!   high-bit bytes; w = d·(sc − 32)·(q − 4).
//! - Q4_K (144 bytes): d f16, dmin f16, 12 bytes packing 8 six-bit scales and minima (one per
//!   32 weights), 128 bytes of nibbles: chunk c reads bytes 32(c/2).., low nibbles for even c.
//!   w = d·sc·q − dmin·m.
//! - Q5_K (176 bytes): as Q4_K with 32 bytes of high bits after the scales (bit c of byte l:
//!   weight l of chunk c).
//! - Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed scales (per
//!   16 weights), d f16. Chunk c = 4h + j: nibble 4(j/2) of byte 64h + 32(j%2) + l, high bits
//!   2j of byte 128 + 32h + l; w = d·sc·(q − 32).
//! - Q8_K (292 bytes): d f32, 256 signed bytes, 16 i16 block sums (unused here); w = d·q.

use crate::format::{f16_at, Format, CHUNK, HALF};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__m256i;

/// Two bits of each of 32 bytes at `qs`, from bit `shift`.
#[inline(always)]
fn crumbs(qs: &[u8], shift: usize) -> [u8; CHUNK] {
    std::array::from_fn(|l| (qs[l] >> shift) & 3)
}

/// As [`crumbs`], in a register.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn crumbs_avx2(p: *const u8, shift: usize) -> __m256i {
    use std::arch::x86_64::*;
    let x = _mm256_loadu_si256(p as *const __m256i);
    let shifted = _mm256_srl_epi16(x, _mm_cvtsi32_si128(shift as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(3))
}

/// Nibbles of 32 bytes at `p`: the low ones, or the high ones when `high`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibbles32_avx2(p: *const u8, high: bool) -> __m256i {
    use std::arch::x86_64::*;
    let x = _mm256_loadu_si256(p as *const __m256i);
    let x = if high { _mm256_srli_epi16(x, 4) } else { x };
    _mm256_and_si256(x, _mm256_set1_epi8(0x0F))
}

/// Bit `bit` of 32 bytes at `p`, moved to bit `to`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bit_avx2(p: *const u8, bit: usize, to: usize) -> __m256i {
    use std::arch::x86_64::*;
    let x = _mm256_loadu_si256(p as *const __m256i);
    let one = _mm256_and_si256(
        _mm256_srl_epi16(x, _mm_cvtsi32_si128(bit as i32)),
        _mm256_set1_epi8(1),
    );
    _mm256_sll_epi16(one, _mm_cvtsi32_si128(to as i32))
}

pub(crate) struct Q2K;
impl Format for Q2K {
    const UNIT: usize = HALF;
    const ELEMS: usize = 256;
    const BYTES: usize = 84;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        let (d, dmin) = (f16_at::<F16C>(b, 80), f16_at::<F16C>(b, 82));
        for k in 0..16 {
            scale[k] = d * (b[k] & 15) as f32;
            offset[k] = -dmin * (b[k] >> 4) as f32;
        }
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [i8; CHUNK] {
        crumbs(&b[16 + 32 * (c / 4)..], 2 * (c % 4)).map(|q| q as i8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], c: usize) -> __m256i {
        crumbs_avx2(b.as_ptr().add(16 + 32 * (c / 4)), 2 * (c % 4))
    }
}

pub(crate) struct Q3K;
impl Q3K {
    /// The 16 six-bit scales: low nibbles from bytes 0..8 (both halves), top two bits from bytes
    /// 8..12 (two bits per scale, four scales per byte).
    fn scale(s: &[u8], k: usize) -> i32 {
        let low = if k < 8 { s[k] & 15 } else { s[k - 8] >> 4 };
        let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    }
}
impl Format for Q3K {
    const UNIT: usize = HALF;
    const ELEMS: usize = 256;
    const BYTES: usize = 110;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        let d = f16_at::<F16C>(b, 108);
        for k in 0..16 {
            scale[k] = d * Self::scale(&b[96..108], k) as f32;
            offset[k] = -4.0 * scale[k];
        }
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [i8; CHUNK] {
        let low = crumbs(&b[32 + 32 * (c / 4)..], 2 * (c % 4));
        std::array::from_fn(|l| (low[l] | (((b[l] >> c) & 1) << 2)) as i8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], c: usize) -> __m256i {
        use std::arch::x86_64::*;
        let low = crumbs_avx2(b.as_ptr().add(32 + 32 * (c / 4)), 2 * (c % 4));
        _mm256_or_si256(low, bit_avx2(b.as_ptr(), c, 2))
    }
}

/// Scale and minimum of sub-block `j` (0..8) from Q4_K's and Q5_K's 12 packed bytes.
#[inline(always)]
fn scale_min_k4(s: &[u8], j: usize) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// Q4_K's and Q5_K's parameters: d, dmin and the scales at bytes 4..16.
#[inline(always)]
fn params_k4<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
    let (d, dmin) = (f16_at::<F16C>(b, 0), f16_at::<F16C>(b, 2));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(&b[4..16], j);
        scale[2 * j..2 * j + 2].fill(d * sc);
        offset[2 * j..2 * j + 2].fill(-dmin * m);
    }
}

/// Nibbles of chunk `c` from 128 bytes at `qs`.
#[inline(always)]
fn nibbles_k(qs: &[u8], c: usize) -> [u8; CHUNK] {
    let bytes = &qs[32 * (c / 2)..];
    std::array::from_fn(|l| {
        if c.is_multiple_of(2) {
            bytes[l] & 15
        } else {
            bytes[l] >> 4
        }
    })
}

pub(crate) struct Q4K;
impl Format for Q4K {
    const ELEMS: usize = 256;
    const BYTES: usize = 144;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        params_k4::<F16C>(b, scale, offset);
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [i8; CHUNK] {
        nibbles_k(&b[16..], c).map(|q| q as i8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], c: usize) -> __m256i {
        nibbles32_avx2(b.as_ptr().add(16 + 32 * (c / 2)), c % 2 == 1)
    }
}

pub(crate) struct Q5K;
impl Format for Q5K {
    const ELEMS: usize = 256;
    const BYTES: usize = 176;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        params_k4::<F16C>(b, scale, offset);
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [i8; CHUNK] {
        let low = nibbles_k(&b[48..], c);
        std::array::from_fn(|l| (low[l] | (((b[16 + l] >> c) & 1) << 4)) as i8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], c: usize) -> __m256i {
        use std::arch::x86_64::*;
        let low = nibbles32_avx2(b.as_ptr().add(48 + 32 * (c / 2)), c % 2 == 1);
        _mm256_or_si256(low, bit_avx2(b.as_ptr().add(16), c, 4))
    }
}

pub(crate) struct Q6K;
impl Format for Q6K {
    const UNIT: usize = HALF;
    const ELEMS: usize = 256;
    const BYTES: usize = 210;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        let d = f16_at::<F16C>(b, 208);
        for k in 0..16 {
            scale[k] = d * (b[192 + k] as i8) as f32;
            offset[k] = -32.0 * scale[k];
        }
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [i8; CHUNK] {
        let (h, j) = (c / 4, c % 4);
        let ql = &b[64 * h + 32 * (j % 2)..];
        let qh = &b[128 + 32 * h..];
        std::array::from_fn(|l| {
            (((ql[l] >> (4 * (j / 2))) & 15) | (((qh[l] >> (2 * j)) & 3) << 4)) as i8
        })
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], c: usize) -> __m256i {
        use std::arch::x86_64::*;
        let (h, j) = (c / 4, c % 4);
        let low = nibbles32_avx2(b.as_ptr().add(64 * h + 32 * (j % 2)), j >= 2);
        let high = crumbs_avx2(b.as_ptr().add(128 + 32 * h), 2 * j);
        _mm256_or_si256(low, _mm256_slli_epi16(high, 4))
    }
}

pub(crate) struct Q8K;
impl Format for Q8K {
    const OFFSET: bool = false;
    const ELEMS: usize = 256;
    const BYTES: usize = 292;
    const UNSIGNED: bool = false;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        scale.fill(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        offset.fill(0.0);
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [i8; CHUNK] {
        std::array::from_fn(|l| b[4 + 32 * c + l] as i8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], c: usize) -> __m256i {
        use std::arch::x86_64::*;
        _mm256_loadu_si256(b.as_ptr().add(4 + 32 * c) as *const __m256i)
    }
}
