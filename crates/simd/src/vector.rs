//! Sixteen f32 lanes as one AVX-512 register, two AVX2 registers or a plain array.
//!
//! A hot loop written once against [`F32x16`] and compiled by [`dispatch16!`](crate::dispatch16)
//! runs at every [`Level`](crate::Level) with the same operations lane for lane, so every
//! level gives the same bits: adds, multiplies and subtractions are separate or fused into one
//! rounding at every level alike ([`F32x16::mul_add`]), the i8 codeword
//! sums ([`F32x16::sum_i8_multiples`]) are exact integer arithmetic before one product, and the
//! one horizontal reduction, [`F32x16::fold8`] followed by [`tree_sums8`], has a fixed order.
//!
//! Where a whole AVX-512 register pays: a d = 32 codeword is two registers instead of four,
//! and an f16 codeword converts with two instructions instead of four. Codeword element types
//! load through [`LaneWord::load16`](../rvq/lanes/struct.LaneWord.html).

use half::f16;

/// Sixteen f32 lanes.
///
/// # Safety
/// One contract for every method: the caller runs at the level the type needs (see
/// [`dispatch16!`](crate::dispatch16)), and pointers are valid for 16 values (8 for
/// `fold8`'s output).
#[allow(clippy::missing_safety_doc)] // stated once, above
pub trait F32x16: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    /// Sixteen f16 values at `p`, converted exactly.
    unsafe fn load_f16(p: *const f16) -> Self;
    /// Sixteen i8 values at `p`, converted exactly.
    unsafe fn load_i8(p: *const i8) -> Self;
    /// The two 16-lane halves of `Σ m ⊙ q` over the pairs (q: 32 i8, m: 32 i16) of `words`:
    /// the products and their sum in i16 lanes — exact, as the caller keeps every partial sum
    /// within i16 — then one conversion.
    unsafe fn sum_i8_integers(words: impl Iterator<Item = (*const i8, *const i16)>)
        -> (Self, Self);
    /// [`F32x16::sum_i8_integers`] times `unit` (32 f32): `unit ⊙ Σ m ⊙ q`, one product.
    #[inline(always)]
    unsafe fn sum_i8_multiples(
        words: impl Iterator<Item = (*const i8, *const i16)>,
        unit: *const f32,
    ) -> (Self, Self) {
        let (lo, hi) = Self::sum_i8_integers(words);
        (lo.mul(Self::load(unit)), hi.mul(Self::load(unit.add(16))))
    }
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    /// self · a + b with one rounding: the FMA instruction where the level has it, and
    /// `f32::mul_add` (correctly rounded too) in the portable lanes, so the bits agree.
    unsafe fn mul_add(self, a: Self, b: Self) -> Self;
    /// self · a − b with one rounding, as [`F32x16::mul_add`].
    unsafe fn mul_sub(self, a: Self, b: Self) -> Self;
    /// `out[l] = self[l] + self[l + 8]` for l < 8: the first step of a horizontal sum, whose
    /// rest [`tree_sums8`] does for eight vectors at once.
    unsafe fn fold8(self, out: *mut f32);
    /// Lanes 2i and 2i + 1 exchanged.
    unsafe fn swap_pairs(self) -> Self;
    /// [x0, x0, x1, x1, …, x7, x7]: the low half, each lane twice.
    unsafe fn dup_lo(self) -> Self;
    /// [x8, x8, x9, x9, …, x15, x15]: the high half, each lane twice.
    unsafe fn dup_hi(self) -> Self;
}

/// ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)): the order a tree of horizontal adds
/// produces.
#[inline(always)]
pub fn tree_sum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// `out[i] = tree_sum8(rows[i])` for eight rows of eight: with AVX2 by [`hadd_tree8`], in
/// exactly [`tree_sum8`]'s order.
///
/// # Safety
/// With `avx2 = true` the CPU must have AVX2.
#[inline(always)]
pub unsafe fn tree_sums8(rows: &[[f32; 8]; 8], out: &mut [f32; 8], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        use std::arch::x86_64::*;
        let rows = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].as_ptr()));
        _mm256_storeu_ps(out.as_mut_ptr(), hadd_tree8(&rows));
        return;
    }
    let _ = avx2;
    for (o, r) in out.iter_mut().zip(rows) {
        *o = tree_sum8(r);
    }
}

/// Lane i = [`tree_sum8`] of `v[i]`: eight horizontal sums at once by one tree of horizontal
/// adds (9 instructions), in exactly that order — so kernels reducing several dot products at
/// once agree bit for bit with the scalar code.
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn hadd_tree8(v: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h45 = _mm256_hadd_ps(v[4], v[5]);
    let h67 = _mm256_hadd_ps(v[6], v[7]);
    let q0 = _mm256_hadd_ps(h01, h23);
    let q1 = _mm256_hadd_ps(h45, h67);
    _mm256_add_ps(
        _mm256_permute2f128_ps(q0, q1, 0x20),
        _mm256_permute2f128_ps(q0, q1, 0x31),
    )
}

/// The f32 of the f16 with bits `h`, exactly, without branches (so that a loop of them
/// vectorizes; `half` converts one value per call where the CPU lacks F16C). The magnitude's
/// bits shifted into an f32 and multiplied by 2^112 rebias the exponent — subnormal f16 values
/// included, which arrive as f32 subnormals — then infinities and NaNs get the f32 exponent.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let magnitude = ((h & 0x7fff) as u32) << 13;
    let value = f32::from_bits(magnitude) * f32::from_bits((127 + 112) << 23);
    let special = (h & 0x7c00) == 0x7c00;
    let bits = if special {
        magnitude | 0x7f80_0000
    } else {
        value.to_bits()
    };
    f32::from_bits(bits | (((h & 0x8000) as u32) << 16))
}

/// Plain Rust lanes: the reference the vector versions must equal.
#[derive(Clone, Copy)]
pub struct Portable([f32; 16]);

impl F32x16 for Portable {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self([0.0; 16])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self([x; 16])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(std::ptr::read_unaligned(p as *const [f32; 16]))
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const f16) -> Self {
        let h = std::ptr::read_unaligned(p as *const [u16; 16]);
        Self(h.map(f16_bits_to_f32))
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> Self {
        Self(std::ptr::read_unaligned(p as *const [i8; 16]).map(f32::from))
    }
    #[inline(always)]
    unsafe fn sum_i8_integers(
        words: impl Iterator<Item = (*const i8, *const i16)>,
    ) -> (Self, Self) {
        let mut acc = [0i16; 32];
        for (q, m) in words {
            let (q, m) = (
                std::slice::from_raw_parts(q, 32),
                std::slice::from_raw_parts(m, 32),
            );
            for ((a, &q), &m) in acc.iter_mut().zip(q).zip(m) {
                *a = a.wrapping_add(i16::from(q).wrapping_mul(m));
            }
        }
        let half = |h: usize| Self(std::array::from_fn(|l| f32::from(acc[h + l])));
        (half(0), half(16))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; 16], self.0)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] + o.0[l]))
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] - o.0[l]))
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] * o.0[l]))
    }
    #[inline(always)]
    unsafe fn mul_add(self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l].mul_add(a.0[l], b.0[l])))
    }
    #[inline(always)]
    unsafe fn mul_sub(self, a: Self, b: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l].mul_add(a.0[l], -b.0[l])))
    }
    #[inline(always)]
    unsafe fn fold8(self, out: *mut f32) {
        let h: [f32; 8] = std::array::from_fn(|l| self.0[l] + self.0[l + 8]);
        std::ptr::write_unaligned(out as *mut [f32; 8], h)
    }
    #[inline(always)]
    unsafe fn swap_pairs(self) -> Self {
        Self(std::array::from_fn(|l| self.0[l ^ 1]))
    }
    #[inline(always)]
    unsafe fn dup_lo(self) -> Self {
        Self(std::array::from_fn(|l| self.0[l / 2]))
    }
    #[inline(always)]
    unsafe fn dup_hi(self) -> Self {
        Self(std::array::from_fn(|l| self.0[8 + l / 2]))
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::F32x16;
    use half::f16;
    use std::arch::x86_64::*;

    /// Two AVX2 registers: lanes 0–7 and 8–15.
    #[derive(Clone, Copy)]
    pub struct Avx2(__m256, __m256);

    impl F32x16 for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm256_set1_ps(x), _mm256_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            let p = p as *const __m128i;
            Self(
                _mm256_cvtph_ps(_mm_loadu_si128(p)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(1))),
            )
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self {
            let b = _mm_loadu_si128(p as *const __m128i);
            Self(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(b))),
            )
        }
        #[inline(always)]
        unsafe fn sum_i8_integers(
            words: impl Iterator<Item = (*const i8, *const i16)>,
        ) -> (Self, Self) {
            // Lanes 0..16 in `lo`, 16..32 in `hi`.
            let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (q, m) in words {
                let (q, m) = (q as *const __m128i, m as *const __m256i);
                let q_lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(q));
                let q_hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(1)));
                lo = _mm256_add_epi16(lo, _mm256_mullo_epi16(q_lo, _mm256_loadu_si256(m)));
                hi = _mm256_add_epi16(hi, _mm256_mullo_epi16(q_hi, _mm256_loadu_si256(m.add(1))));
            }
            let eight = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(x));
            let sixteen = |x: __m256i| {
                Self(
                    eight(_mm256_castsi256_si128(x)),
                    eight(_mm256_extracti128_si256::<1>(x)),
                )
            };
            (sixteen(lo), sixteen(hi))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0);
            _mm256_storeu_ps(p.add(8), self.1);
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Self(_mm256_add_ps(self.0, o.0), _mm256_add_ps(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            Self(_mm256_sub_ps(self.0, o.0), _mm256_sub_ps(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Self(_mm256_mul_ps(self.0, o.0), _mm256_mul_ps(self.1, o.1))
        }
        #[inline(always)]
        unsafe fn mul_add(self, a: Self, b: Self) -> Self {
            Self(
                _mm256_fmadd_ps(self.0, a.0, b.0),
                _mm256_fmadd_ps(self.1, a.1, b.1),
            )
        }
        #[inline(always)]
        unsafe fn mul_sub(self, a: Self, b: Self) -> Self {
            Self(
                _mm256_fmsub_ps(self.0, a.0, b.0),
                _mm256_fmsub_ps(self.1, a.1, b.1),
            )
        }
        #[inline(always)]
        unsafe fn fold8(self, out: *mut f32) {
            _mm256_storeu_ps(out, _mm256_add_ps(self.0, self.1))
        }
        #[inline(always)]
        unsafe fn swap_pairs(self) -> Self {
            Self(
                _mm256_permute_ps::<0b10_11_00_01>(self.0),
                _mm256_permute_ps::<0b10_11_00_01>(self.1),
            )
        }
        #[inline(always)]
        unsafe fn dup_lo(self) -> Self {
            Self(dup4(self.0, 0), dup4(self.0, 4))
        }
        #[inline(always)]
        unsafe fn dup_hi(self) -> Self {
            Self(dup4(self.1, 0), dup4(self.1, 4))
        }
    }

    /// [x[f], x[f], x[f+1], x[f+1], …, x[f+3], x[f+3]] of eight lanes.
    #[inline(always)]
    unsafe fn dup4(x: __m256, f: i32) -> __m256 {
        let idx = _mm256_setr_epi32(f, f, f + 1, f + 1, f + 2, f + 2, f + 3, f + 3);
        _mm256_permutevar8x32_ps(x, idx)
    }

    /// One AVX-512 register.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl F32x16 for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Self(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const f16) -> Self {
            Self(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)))
        }
        #[inline(always)]
        unsafe fn load_i8(p: *const i8) -> Self {
            Self(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                p as *const __m128i,
            ))))
        }
        #[inline(always)]
        unsafe fn sum_i8_integers(
            words: impl Iterator<Item = (*const i8, *const i16)>,
        ) -> (Self, Self) {
            // All 32 lanes in one register.
            let mut acc = _mm512_setzero_si512();
            for (q, m) in words {
                let q = _mm512_cvtepi8_epi16(_mm256_loadu_si256(q as *const __m256i));
                let m = _mm512_loadu_si512(m as *const __m512i);
                acc = _mm512_add_epi16(acc, _mm512_mullo_epi16(q, m));
            }
            let sixteen = |x: __m256i| Self(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(x)));
            (
                sixteen(_mm512_castsi512_si256(acc)),
                sixteen(_mm512_extracti64x4_epi64::<1>(acc)),
            )
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            Self(_mm512_add_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            Self(_mm512_sub_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            Self(_mm512_mul_ps(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn mul_add(self, a: Self, b: Self) -> Self {
            Self(_mm512_fmadd_ps(self.0, a.0, b.0))
        }
        #[inline(always)]
        unsafe fn mul_sub(self, a: Self, b: Self) -> Self {
            Self(_mm512_fmsub_ps(self.0, a.0, b.0))
        }
        #[inline(always)]
        unsafe fn fold8(self, out: *mut f32) {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
            _mm256_storeu_ps(out, _mm256_add_ps(_mm512_castps512_ps256(self.0), hi))
        }
        #[inline(always)]
        unsafe fn swap_pairs(self) -> Self {
            Self(_mm512_permute_ps::<0b10_11_00_01>(self.0))
        }
        #[inline(always)]
        unsafe fn dup_lo(self) -> Self {
            let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            Self(_mm512_permutexvar_ps(idx, self.0))
        }
        #[inline(always)]
        unsafe fn dup_hi(self) -> Self {
            let idx = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
            Self(_mm512_permutexvar_ps(idx, self.0))
        }
    }
}

/// Defines `fn $name<generics>(args) -> ret` that runs `$body::<V, generics>(args)` — an
/// `#[inline(always)] unsafe fn` generic over `V: F32x16` — with `V` the lane type of
/// [`level()`](crate::level), compiled for that level. The body receives `avx2: bool`
/// as its first argument (whether [`tree_sums8`] may use AVX2).
///
/// The caller of the defined function vouches for what the body's `unsafe` needs besides the
/// instruction set (pointer validity, shapes); the defined function itself is safe to call
/// only if the body is safe for every valid input, which its definer must ensure.
#[macro_export]
macro_rules! dispatch16 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$($g:ident: $bound:path),*>)?
        ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body::<$crate::vector::Avx512 $($(, $g)*)?>(true, $($arg),*)
                }
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
                    $body::<$crate::vector::Avx2 $($(, $g)*)?>(true, $($arg),*)
                }
                match $crate::level() {
                    // SAFETY: `level()` never exceeds what the CPU reports.
                    $crate::Level::Avx512 => return unsafe { avx512 $(::<$($g),*>)? ($($arg),*) },
                    // SAFETY: as above.
                    $crate::Level::Avx2 => return unsafe { avx2 $(::<$($g),*>)? ($($arg),*) },
                    $crate::Level::Portable => {}
                }
            }
            // SAFETY: portable lanes need no instruction set beyond the baseline.
            unsafe { $body::<$crate::vector::Portable $($(, $g)*)?>(false, $($arg),*) }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Every operation of every lane type against plain scalar arithmetic.
    #[inline(always)]
    unsafe fn exercise<V: F32x16>(
        avx2: bool,
        a: &[f32],
        b: &[f32],
        h: &[f16],
        i: &[i8],
    ) -> Vec<f32> {
        let (x, y) = (V::load(a.as_ptr()), V::load(b.as_ptr()));
        let z = x
            .mul(y)
            .add(V::load_f16(h.as_ptr()))
            .add(V::load_i8(i.as_ptr()))
            .sub(V::splat(0.5))
            .add(V::zero());
        let mut out = vec![0f32; 16 + 8 * 9 + 48];
        z.store(out.as_mut_ptr());
        z.swap_pairs().store(out.as_mut_ptr().add(88));
        z.dup_lo().store(out.as_mut_ptr().add(104));
        z.dup_hi().store(out.as_mut_ptr().add(120));
        let mut rows = [[0f32; 8]; 8];
        for (i, r) in rows.iter_mut().enumerate() {
            z.mul(V::splat(i as f32 + 1.0)).fold8(r.as_mut_ptr());
        }
        out[16..80].copy_from_slice(rows.as_flattened());
        let mut sums = [0f32; 8];
        tree_sums8(&rows, &mut sums, avx2);
        out[80..88].copy_from_slice(&sums);
        out
    }

    crate::dispatch16! {
        fn exercise_at_level(a: &[f32], b: &[f32], h: &[f16], i: &[i8]) -> Vec<f32> = exercise;
    }

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        for h in 0..=u16::MAX {
            let (got, want) = (f16_bits_to_f32(h), f16::from_bits(h).to_f32());
            if want.is_nan() {
                assert!(
                    got.is_nan() && got.to_bits() >> 31 == want.to_bits() >> 31,
                    "{h:#x}"
                );
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
    }

    #[test]
    fn every_level_computes_the_scalar_definition() {
        let mut rng = StdRng::seed_from_u64(4);
        let mut value = || rng.random_range(-2.0f32..2.0);
        let a: Vec<f32> = (0..16).map(|_| value()).collect();
        let b: Vec<f32> = (0..16).map(|_| value()).collect();
        let h: Vec<f16> = (0..16).map(|_| f16::from_f32(value())).collect();
        // Both ends of i8's range, then random values.
        let i: Vec<i8> = (0..16)
            .map(|l| match l {
                0 => i8::MIN,
                1 => i8::MAX,
                _ => rng.random::<i8>(),
            })
            .collect();
        let z: Vec<f32> = (0..16)
            .map(|l| a[l] * b[l] + h[l].to_f32() + i[l] as f32 - 0.5 + 0.0)
            .collect();
        let mut want = z.clone();
        for i in 0..8 {
            let s = i as f32 + 1.0;
            let fold: [f32; 8] = std::array::from_fn(|l| z[l] * s + z[l + 8] * s);
            want.extend_from_slice(&fold);
        }
        for i in 0..8 {
            let row: [f32; 8] = want[16 + 8 * i..24 + 8 * i].try_into().unwrap();
            want.push(tree_sum8(&row));
        }
        want.extend((0..16).map(|l| z[l ^ 1]));
        want.extend((0..16).map(|l| z[l / 2]));
        want.extend((0..16).map(|l| z[8 + l / 2]));
        let each = crate::at_each_level(|_| exercise_at_level(&a, &b, &h, &i));
        for (level, got) in &each {
            assert_eq!(got, &want, "{level:?}");
        }
        assert_eq!(each.len(), crate::detected() as usize);
    }
}
