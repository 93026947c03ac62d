//! What every integer block format provides to the shared kernels.
//!
//! Each format stores blocks of 32 or 256 weights. Whatever its packing, a block reads as
//! chunks of 32 small integer codes and, per 16 weights, an affine map `w = scale·code + offset`
//! (the format's block scale times its sub-block scale, and its minimum or the code's centre).
//! Codes are kept unsigned where the format allows (`code + 8` for Q4_0, …), so that AVX2's
//! `vpmaddubsw` (unsigned × signed bytes) multiplies them by the activations directly; the
//! centre moves into the offset, which the kernels apply once per 16 weights to the activations'
//! sum.

/// Weights per chunk: one 256-bit register of byte codes.
pub const CHUNK: usize = 32;
/// Weights that share one scale and offset.
pub const HALF: usize = 16;

pub(crate) trait Format {
    /// Weights per block.
    const ELEMS: usize;
    /// Bytes per block.
    const BYTES: usize;
    /// Whether codes are ≥ 0 (all formats but Q8_0 and Q8_K), so they can multiply activations
    /// as unsigned bytes; signed codes go through the sign trick.
    const UNSIGNED: bool;
    const CHUNKS: usize = Self::ELEMS / CHUNK;
    /// Weights that share one scale and offset: [`HALF`], or [`CHUNK`] where both halves of
    /// every chunk share them (the kernels then sum a whole chunk in integers).
    const UNIT: usize = CHUNK;
    /// Whether any offset is non-zero (not for Q8_0 and Q8_K, whose codes are centred).
    const OFFSET: bool = true;
    /// For blocks of 32 whose params are just an f16 scale d at byte 0 and an offset (an f16
    /// minimum, or −centre·d): the one-row kernel keeps the bits and converts 8 rows' at once.
    const F16_SCALE: Option<F16Scale> = None;

    /// Scale and offset of each 16 weights of `block` ([ELEMS / 16] each); `F16C`: the caller
    /// enables that instruction set, which converts the f16 scales in one instruction.
    fn params<const F16C: bool>(block: &[u8], scale: &mut [f32], offset: &mut [f32]);

    /// Codes of weights `32c..32c + 32` of `block`.
    fn codes(block: &[u8], c: usize) -> [i8; CHUNK];

    /// The same codes as 32 bytes of a register.
    ///
    /// # Safety
    /// The CPU has AVX2; `block` holds `BYTES` bytes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn codes_avx2(block: &[u8], c: usize) -> std::arch::x86_64::__m256i;
}

/// See [`Format::F16_SCALE`].
#[derive(Clone, Copy)]
pub(crate) struct F16Scale {
    /// Where the f16 minimum is, if the offset is one.
    pub min_at: Option<usize>,
    /// Else the offset is −centre·d.
    pub centre: f32,
}

/// Little-endian f16 at `b[at..at + 2]`: with F16C's instruction when the caller enables it,
/// else in inlined integer code (`half`'s `to_f32` checks the CPU on every call).
#[inline(always)]
pub(crate) fn f16_at<const F16C: bool>(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    #[cfg(target_arch = "x86_64")]
    if F16C {
        use std::arch::x86_64::*;
        // SAFETY: F16C is enabled in every caller that passes `F16C = true`.
        return unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) };
    }
    half::f16::from_bits(bits).to_f32_const()
}

/// 16 bytes at `p` as the low nibbles in bytes 0..16 and the high nibbles in bytes 16..32.
///
/// # Safety
/// AVX2; 16 readable bytes at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn nibbles_avx2(p: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let x = _mm_loadu_si128(p as *const __m128i);
    let low = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(x, low);
    let hi = _mm_and_si128(_mm_srli_epi16(x, 4), low);
    _mm256_set_m128i(hi, lo)
}

/// The 32 bits at `p` (little-endian) as 32 bytes, `value` where the bit is set and 0 elsewhere.
///
/// # Safety
/// AVX2; 4 readable bytes at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn bits_avx2(p: *const u8, value: i8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let word = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    // Byte i takes source byte i / 8, then keeps bit i % 8.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(word),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(value))
}
