//! Bit-packed codes: each code takes exactly ceil(log2 C) bits, LSB first, and each row (one
//! vector's codes) starts on a byte boundary, so any row is found by multiplication.

/// Bytes of a row of `n` codes of `bits` bits.
pub fn row_bytes(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(8)
}

/// Packs `codes` (each < 2^bits) into `out` (exactly `row_bytes(codes.len(), bits)` bytes).
pub fn pack_row(codes: &[u16], bits: u32, out: &mut [u8]) {
    debug_assert_eq!(out.len(), row_bytes(codes.len(), bits));
    out.fill(0);
    let mut bitpos = 0usize;
    for &c in codes {
        let mut v = c as u32;
        let mut left = bits as usize;
        while left > 0 {
            let byte = bitpos / 8;
            let off = bitpos % 8;
            let take = left.min(8 - off);
            out[byte] |= ((v & ((1 << take) - 1)) as u8) << off;
            v >>= take;
            left -= take;
            bitpos += take;
        }
    }
}

/// Unpacks `out.len()` codes of `bits` bits from `bytes`.
pub fn unpack_row(bytes: &[u8], bits: u32, out: &mut [u16]) {
    // Fast path: each code lies within the 8 bytes starting at its first byte, so one
    // unaligned 64-bit load, a shift and a mask extract it; codes too close to the end of the
    // row for an 8-byte load take the bit-by-bit path.
    let bits = bits as usize;
    let mask = (1u64 << bits) - 1;
    let mut done = 0;
    for (i, o) in out.iter_mut().enumerate() {
        let bitpos = i * bits;
        let byte = bitpos / 8;
        let Some(window) = bytes.get(byte..byte + 8) else {
            break;
        };
        let word = u64::from_le_bytes(window.try_into().expect("8 bytes"));
        *o = ((word >> (bitpos % 8)) & mask) as u16;
        done = i + 1;
    }
    unpack_bits(bytes, bits as u32, done, &mut out[done..]);
}

/// Unpacks `out.len()` codes of `bits` bits from a stream of them (`bytes`, code 0 at bit 0;
/// bytes past the last code may follow and speed it up). With AVX2 and `bits` ≤ 16, eight codes
/// at a time: eight codes span `bits` whole bytes, so every group of eight starts on a byte and
/// the same byte shuffle and per-lane shifts extract any of them.
pub fn unpack_stream(bytes: &[u8], bits: u32, out: &mut [u16]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if bits <= 16 {
        let level = simd::level();
        if level == simd::Level::Avx512 && std::is_x86_feature_detected!("avx512vbmi") {
            // SAFETY: AVX-512 F/BW (the level never exceeds what the CPU has) and VBMI are
            // present; the kernel reads only within `bytes` and writes only within `out`.
            done = unsafe { unpack_sixteens_vbmi(bytes, bits, out) };
        }
        if level >= simd::Level::Avx2 {
            // Whole groups of sixteen start on a byte, so the rest is a stream of its own.
            let at = done * bits as usize / 8;
            // SAFETY: AVX2 is present; as above.
            done += unsafe { unpack_eights_avx2(&bytes[at..], bits, &mut out[done..]) };
        }
    }
    let at = done * bits as usize / 8;
    unpack_row(&bytes[at..], bits, &mut out[done..]);
}

/// Unpacks whole groups of sixteen codes (2·`bits` whole bytes each, `bits` ≤ 16) while the
/// bytes a group reads lie within `bytes`; returns how many codes it wrote (a multiple of 16). One
/// byte permutation puts the 4 bytes from each code's first into its own 32-bit lane, then one
/// shift per lane and a mask: 16 codes in five instructions, twice the AVX2 kernel's eight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn unpack_sixteens_vbmi(bytes: &[u8], bits: u32, out: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let b = bits as usize;
    let (mut index, mut shifts) = ([0u8; 64], [0u32; 16]);
    for i in 0..16 {
        let bit = i * b;
        for j in 0..4 {
            index[4 * i + j] = (bit / 8 + j) as u8;
        }
        shifts[i] = (bit % 8) as u32;
    }
    // Bytes a group reads: up to the last code's fourth (≤ 34, so a masked 64-byte load whose
    // masked-off bytes are never touched).
    let need = 15 * b / 8 + 4;
    let load_mask: u64 = (1 << need) - 1;
    let index = _mm512_loadu_si512(index.as_ptr() as *const __m512i);
    let shifts = _mm512_loadu_si512(shifts.as_ptr() as *const __m512i);
    let mask = _mm512_set1_epi32((1 << b) - 1);
    let groups = (out.len() / 16).min(match bytes.len().checked_sub(need) {
        // Group g reads bytes 2b·g .. 2b·g + need.
        Some(room) => room / (2 * b) + 1,
        None => 0,
    });
    let p = bytes.as_ptr();
    for g in 0..groups {
        let v = _mm512_maskz_loadu_epi8(load_mask, p.add(g * 2 * b) as *const i8);
        let lanes = _mm512_permutexvar_epi8(index, v);
        let codes = _mm512_and_si512(_mm512_srlv_epi32(lanes, shifts), mask);
        _mm256_storeu_si256(
            out.as_mut_ptr().add(16 * g) as *mut __m256i,
            _mm512_cvtepi32_epi16(codes),
        );
    }
    16 * groups
}

/// Unpacks whole groups of eight codes while both 16-byte loads of a group stay within
/// `bytes`; returns how many codes it wrote (a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn unpack_eights_avx2(bytes: &[u8], bits: u32, out: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    let b = bits as usize;
    // Code 4 of a group starts in byte `half` of it: the upper lane loads from there.
    let half = 4 * b / 8;
    let (mut shuffle, mut shifts) = ([0i8; 32], [0i32; 8]);
    for i in 0..8 {
        let bit = i * b;
        let base = if i < 4 { 0 } else { half };
        for j in 0..4 {
            // Four bytes from the code's first: ≤ 16 bits shifted by ≤ 7 fit in 32.
            shuffle[(i / 4) * 16 + (i % 4) * 4 + j] = (bit / 8 - base + j) as i8;
        }
        shifts[i] = (bit % 8) as i32;
    }
    let shuffle = _mm256_loadu_si256(shuffle.as_ptr() as *const __m256i);
    let shifts = _mm256_loadu_si256(shifts.as_ptr() as *const __m256i);
    let mask = _mm256_set1_epi32((1 << b) - 1);
    let groups = (out.len() / 8).min(match bytes.len().checked_sub(half + 16) {
        // Group g loads bytes g·b .. g·b + half + 16.
        Some(room) => room / b + 1,
        None => 0,
    });
    let p = bytes.as_ptr();
    for g in 0..groups {
        let at = p.add(g * b);
        let v = _mm256_loadu2_m128i(at.add(half) as *const __m128i, at as *const __m128i);
        let codes = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_shuffle_epi8(v, shuffle), shifts),
            mask,
        );
        // 8 × u32 → 8 × u16: pack within lanes, then bring lane 1's four next to lane 0's.
        let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(codes, codes), 0b1000);
        _mm_storeu_si128(
            out.as_mut_ptr().add(8 * g) as *mut __m128i,
            _mm256_castsi256_si128(packed),
        );
    }
    8 * groups
}

/// The obvious bit-by-bit unpacking of codes `first..first + out.len()`.
fn unpack_bits(bytes: &[u8], bits: u32, first: usize, out: &mut [u16]) {
    let mut bitpos = first * bits as usize;
    for o in out.iter_mut() {
        let mut v = 0u32;
        let mut got = 0usize;
        while got < bits as usize {
            let byte = bitpos / 8;
            let off = bitpos % 8;
            let take = (bits as usize - got).min(8 - off);
            let piece = (bytes[byte] >> off) as u32 & ((1 << take) - 1);
            v |= piece << got;
            got += take;
            bitpos += take;
        }
        *o = v as u16;
    }
}

/// Rows of packed codes with random access.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedRows {
    codes_per_row: usize,
    bits: u32,
    row_bytes: usize,
    bytes: Vec<u8>,
}

impl PackedRows {
    pub fn new(codes_per_row: usize, bits: u32) -> Self {
        Self {
            codes_per_row,
            bits,
            row_bytes: row_bytes(codes_per_row, bits),
            bytes: Vec::new(),
        }
    }
    pub fn len(&self) -> usize {
        self.bytes.len() / self.row_bytes.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    pub fn codes_per_row(&self) -> usize {
        self.codes_per_row
    }
    /// Bytes held (exactly rows × row_bytes).
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }
    pub fn push(&mut self, codes: &[u16]) {
        assert_eq!(codes.len(), self.codes_per_row);
        let start = self.bytes.len();
        self.bytes.resize(start + self.row_bytes, 0);
        pack_row(codes, self.bits, &mut self.bytes[start..]);
    }
    pub fn get(&self, row: usize, out: &mut [u16]) {
        // Up to 7 bytes past the row go along (bits outside a code are masked off), so the
        // 64-bit fast path of `unpack_row` reaches the row's last codes too.
        let start = row * self.row_bytes;
        assert!(
            start + self.row_bytes <= self.bytes.len(),
            "row {row} out of range"
        );
        let end = (start + self.row_bytes + 7).min(self.bytes.len());
        unpack_row(&self.bytes[start..end], self.bits, out);
    }
    /// Hints the CPU to start reading rows `first..first + n` (clipped to the rows held) into
    /// its caches, for a reader that unpacks them after its current work: the unpacking then
    /// finds them there instead of waiting on memory in a pass of its own.
    pub fn prefetch_rows(&self, first: usize, n: usize) {
        let byte = |row: usize| row.saturating_mul(self.row_bytes).min(self.bytes.len());
        let (start, end) = (byte(first), byte(first.saturating_add(n)));
        if start == end {
            return;
        }
        // One hint per cache line, the line of the last byte included.
        let lines = (start..end).step_by(64).chain([end - 1]);
        lines.for_each(|at| crate::codec::prefetch_line(&self.bytes[at]));
    }
    /// The codes of rows `first..first + n`, one row after another ([n, codes_per_row]).
    pub fn get_rows(&self, first: usize, n: usize, out: &mut [u16]) {
        let cpr = self.codes_per_row;
        assert!(
            first + n <= self.len(),
            "rows {first}..{} out of range",
            first + n
        );
        assert_eq!(out.len(), n * cpr);
        let bits = self.bits as usize;
        if (cpr * bits).is_multiple_of(8) {
            // Rows end on whole bytes with no padding: the range is one stream of codes.
            let start = first * self.row_bytes;
            unpack_stream(&self.bytes[start..], self.bits, out);
        } else {
            for (i, row) in out.chunks_exact_mut(cpr).enumerate() {
                self.get(first + i, row);
            }
        }
    }
    pub fn truncate(&mut self, rows: usize) {
        self.bytes.truncate(rows * self.row_bytes);
    }
    /// Removes the first `rows` rows (rows are whole bytes, so the rest moves as is).
    pub fn drop_front(&mut self, rows: usize) {
        let n = (rows * self.row_bytes).min(self.bytes.len());
        self.bytes.drain(..n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bits_for;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_unpack_round_trips(size in 2usize..=65536, seed in any::<u64>(), n in 1usize..40) {
            let bits = bits_for(size);
            let mut rng = crate::rng::SplitMix64::new(seed);
            let mut codes: Vec<u16> = (0..n).map(|_| rng.below(size) as u16).collect();
            codes[0] = (size - 1) as u16; // the largest code always appears
            let mut packed = vec![0u8; row_bytes(n, bits)];
            pack_row(&codes, bits, &mut packed);
            let mut back = vec![0u16; n];
            unpack_row(&packed, bits, &mut back);
            prop_assert_eq!(back, codes);
        }
    }

    proptest! {
        /// Any range of rows, by the eight-at-a-time kernel and portably, equals the rows one
        /// by one through the bit-by-bit reference.
        #[test]
        fn row_ranges_unpack_like_the_bit_by_bit_reference(
            bits in 1u32..=16, cpr in 1usize..20, rows in 1usize..40, seed in any::<u64>()
        ) {
            let mut rng = crate::rng::SplitMix64::new(seed);
            let mut packed = PackedRows::new(cpr, bits);
            let all: Vec<u16> = (0..rows * cpr).map(|_| rng.below(1 << bits) as u16).collect();
            for row in all.chunks_exact(cpr) {
                packed.push(row);
            }
            let first = rng.below(rows);
            let n = rng.below(rows - first + 1);
            let mut want = vec![0u16; n * cpr];
            for (i, w) in want.chunks_exact_mut(cpr).enumerate() {
                let r = first + i;
                let rb = packed.row_bytes();
                unpack_bits(&packed.bytes[r * rb..(r + 1) * rb], bits, 0, w);
            }
            prop_assert_eq!(&want[..], &all[first * cpr..(first + n) * cpr]);
            for (level, got) in simd::at_each_level(|_| {
                let mut got = vec![0u16; n * cpr];
                packed.get_rows(first, n, &mut got);
                got
            }) {
                prop_assert_eq!(&got, &want, "{:?}", level);
            }
        }
    }

    #[test]
    fn rows_are_random_access_and_tight() {
        let mut rows = PackedRows::new(16, 11);
        assert_eq!(rows.row_bytes(), 22); // 16 × 11 bits = 176 bits, no padding
        for r in 0..5u16 {
            rows.push(
                &(0..16)
                    .map(|i| (r * 100 + i * 97) % 2048)
                    .collect::<Vec<_>>(),
            );
        }
        let mut out = vec![0u16; 16];
        rows.get(3, &mut out);
        assert_eq!(
            out,
            (0..16).map(|i| (300 + i * 97) % 2048).collect::<Vec<_>>()
        );
        assert_eq!(rows.bytes(), 5 * 22);
        // Dropping the first rows keeps the others intact, now numbered from 0.
        rows.drop_front(2);
        rows.get(1, &mut out);
        assert_eq!(
            out,
            (0..16).map(|i| (300 + i * 97) % 2048).collect::<Vec<_>>()
        );
        assert_eq!((rows.len(), rows.bytes()), (3, 3 * 22));
    }

    #[test]
    fn prefetch_hints_clip_to_the_rows_held_and_change_nothing() {
        let mut rows = PackedRows::new(16, 11);
        rows.prefetch_rows(0, 4); // nothing held
        for r in 0..7u16 {
            rows.push(&(0..16).map(|i| (r * 300 + i) % 2048).collect::<Vec<_>>());
        }
        let before = rows.clone();
        // Inside, past the end, straddling it, empty, and far beyond the rows held.
        for (first, n) in [
            (0, 7),
            (2, 3),
            (5, 10),
            (7, 1),
            (3, 0),
            (1000, 5),
            (usize::MAX / 64, 1),
        ] {
            rows.prefetch_rows(first, n);
        }
        assert_eq!(rows, before);
    }
}
