//! ggml's blocks of 32 weights: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Layouts (little-endian, as llama.cpp writes them):
//! - Q4_0: d f16, 16 bytes of nibbles; w = d·(q − 8). Weight j < 16 is byte j's low nibble,
//!   weight j + 16 its high nibble.
//! - Q4_1: d f16, m f16, nibbles; w = d·q + m.
//! - Q5_0: d f16, 32 high bits (bit j: weight j), nibbles; w = d·(q − 16).
//! - Q5_1: d f16, m f16, high bits, nibbles; w = d·q + m.
//! - Q8_0: d f16, 32 signed bytes; w = d·q.

#[cfg(target_arch = "x86_64")]
use crate::format::{bits_avx2, nibbles_avx2};
use crate::format::{f16_at, Format, CHUNK};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::__m256i;

/// Codes from 16 bytes of nibbles at `qs`, plus 16 where the bit of `high` is set.
#[inline(always)]
fn nibble_codes(qs: &[u8], high: u32) -> [i8; CHUNK] {
    std::array::from_fn(|j| {
        let nibble = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 };
        (nibble | ((((high >> j) & 1) as u8) << 4)) as i8
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) struct Q4_0;
impl Format for Q4_0 {
    const ELEMS: usize = 32;
    const BYTES: usize = 18;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        let d = f16_at::<F16C>(b, 0);
        scale.fill(d);
        offset.fill(-8.0 * d);
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [i8; CHUNK] {
        nibble_codes(&b[2..18], 0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], _: usize) -> __m256i {
        nibbles_avx2(b.as_ptr().add(2))
    }
}

pub(crate) struct Q4_1;
impl Format for Q4_1 {
    const ELEMS: usize = 32;
    const BYTES: usize = 20;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        scale.fill(f16_at::<F16C>(b, 0));
        offset.fill(f16_at::<F16C>(b, 2));
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [i8; CHUNK] {
        nibble_codes(&b[4..20], 0)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], _: usize) -> __m256i {
        nibbles_avx2(b.as_ptr().add(4))
    }
}

pub(crate) struct Q5_0;
impl Format for Q5_0 {
    const ELEMS: usize = 32;
    const BYTES: usize = 22;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        let d = f16_at::<F16C>(b, 0);
        scale.fill(d);
        offset.fill(-16.0 * d);
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [i8; CHUNK] {
        nibble_codes(&b[6..22], u32_at(b, 2))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], _: usize) -> __m256i {
        use std::arch::x86_64::*;
        _mm256_or_si256(
            nibbles_avx2(b.as_ptr().add(6)),
            bits_avx2(b.as_ptr().add(2), 16),
        )
    }
}

pub(crate) struct Q5_1;
impl Format for Q5_1 {
    const ELEMS: usize = 32;
    const BYTES: usize = 24;
    const UNSIGNED: bool = true;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        scale.fill(f16_at::<F16C>(b, 0));
        offset.fill(f16_at::<F16C>(b, 2));
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [i8; CHUNK] {
        nibble_codes(&b[8..24], u32_at(b, 4))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], _: usize) -> __m256i {
        use std::arch::x86_64::*;
        _mm256_or_si256(
            nibbles_avx2(b.as_ptr().add(8)),
            bits_avx2(b.as_ptr().add(4), 16),
        )
    }
}

pub(crate) struct Q8_0;
impl Format for Q8_0 {
    const ELEMS: usize = 32;
    const BYTES: usize = 34;
    const UNSIGNED: bool = false;
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        scale.fill(f16_at::<F16C>(b, 0));
        offset.fill(0.0);
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [i8; CHUNK] {
        std::array::from_fn(|j| b[2 + j] as i8)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], _: usize) -> __m256i {
        use std::arch::x86_64::*;
        _mm256_loadu_si256(b.as_ptr().add(2) as *const __m256i)
    }
}
