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
use crate::format::{f16_at, F16Scale, Format, CHUNK};
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

/// Q4_0, Q4_1, Q5_0 and Q5_1: one layout with or without a minimum (`MIN`) and a fifth bit per
/// weight (`HIGH`): d f16, [m f16], [32 high bits], 16 bytes of nibbles. Without a minimum the
/// codes are centred: w = d·(q − 8) or d·(q − 16).
pub(crate) struct Nibbles<const MIN: bool, const HIGH: bool>;
pub(crate) type Q4_0 = Nibbles<false, false>;
pub(crate) type Q4_1 = Nibbles<true, false>;
pub(crate) type Q5_0 = Nibbles<false, true>;
pub(crate) type Q5_1 = Nibbles<true, true>;

impl<const MIN: bool, const HIGH: bool> Nibbles<MIN, HIGH> {
    /// Where the high bits start (after d and the minimum).
    const HIGH_AT: usize = 2 + 2 * MIN as usize;
    /// Where the nibbles start.
    const NIBBLES_AT: usize = Self::HIGH_AT + 4 * HIGH as usize;
}

impl<const MIN: bool, const HIGH: bool> Format for Nibbles<MIN, HIGH> {
    const ELEMS: usize = 32;
    const BYTES: usize = Self::NIBBLES_AT + 16;
    const UNSIGNED: bool = true;
    const F16_SCALE: Option<F16Scale> = Some(F16Scale {
        min_at: if MIN { Some(2) } else { None },
        centre: if HIGH { 16.0 } else { 8.0 },
    });
    #[inline(always)]
    fn params<const F16C: bool>(b: &[u8], scale: &mut [f32], offset: &mut [f32]) {
        let d = f16_at::<F16C>(b, 0);
        scale.fill(d);
        offset.fill(if MIN {
            f16_at::<F16C>(b, 2)
        } else {
            -(if HIGH { 16.0 } else { 8.0 }) * d
        });
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [i8; CHUNK] {
        let high = if HIGH { u32_at(b, Self::HIGH_AT) } else { 0 };
        nibble_codes(&b[Self::NIBBLES_AT..Self::NIBBLES_AT + 16], high)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn codes_avx2(b: &[u8], _: usize) -> __m256i {
        use std::arch::x86_64::*;
        let low = nibbles_avx2(b.as_ptr().add(Self::NIBBLES_AT));
        if HIGH {
            _mm256_or_si256(low, bits_avx2(b.as_ptr().add(Self::HIGH_AT), 16))
        } else {
            low
        }
    }
}

pub(crate) struct Q8_0;
impl Format for Q8_0 {
    const OFFSET: bool = false;
    const F16_SCALE: Option<F16Scale> = Some(F16Scale {
        min_at: None,
        centre: 0.0,
    });
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
