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
}
