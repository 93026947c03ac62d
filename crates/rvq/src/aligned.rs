//! Codebooks stored from the start of a cache line.
//!
//! A `Vec`'s buffer is aligned only to its element (glibc hands out 16-byte aligned blocks), so
//! a 32-byte i8 codeword, or a 64-byte f16 one, straddles two cache lines whenever the buffer
//! starts off a line boundary: a gather then touches twice the lines, and a prefetch of the first
//! line leaves the second to miss. [`LineAligned`] starts its elements on a 64-byte boundary.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

/// Bytes of a cache line.
pub const LINE: usize = 64;

#[repr(C, align(64))]
#[derive(Clone, Copy, PartialEq)]
struct Line([u8; LINE]);

/// Element types any bit pattern of which is a valid value (zero bytes included).
///
/// # Safety
/// Implemented only for plain number types with no padding and no invalid bit patterns.
pub unsafe trait Plain: Copy + 'static {}
// SAFETY: integers and IEEE floats: every bit pattern is a value, no padding.
unsafe impl Plain for i8 {}
unsafe impl Plain for i16 {}
unsafe impl Plain for half::f16 {}
unsafe impl Plain for f32 {}

/// An immutable buffer of `T` whose first element starts a cache line; derefs to `[T]`.
#[derive(Clone)]
pub struct LineAligned<T: Plain> {
    lines: Vec<Line>,
    len: usize,
    _elements: PhantomData<T>,
}

impl<T: Plain> LineAligned<T> {
    /// A line-aligned copy of `values`.
    pub fn from_slice(values: &[T]) -> Self {
        let bytes = std::mem::size_of_val(values);
        let mut lines = vec![Line([0; LINE]); bytes.div_ceil(LINE)];
        // SAFETY: `lines` holds at least `bytes` bytes; the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr() as *const u8,
                lines.as_mut_ptr() as *mut u8,
                bytes,
            )
        };
        Self {
            lines,
            len: values.len(),
            _elements: PhantomData,
        }
    }
}

impl<T: Plain> Deref for LineAligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `lines` holds `len` values of T written by `from_slice` (64-byte alignment
        // satisfies T's); T is `Plain`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Plain + PartialEq> PartialEq for LineAligned<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Plain + fmt::Debug> fmt::Debug for LineAligned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl<T: Plain> FromIterator<T> for LineAligned<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self::from_slice(&iter.into_iter().collect::<Vec<T>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_the_values_from_a_line_boundary() {
        for n in [0, 1, 31, 32, 33, 2048 * 32 + 5] {
            let values: Vec<i8> = (0..n).map(|i| (i % 251) as i8 - 125).collect();
            let a = LineAligned::from_slice(&values);
            assert_eq!(&a[..], &values[..]);
            assert_eq!(a.as_ptr() as usize % LINE, 0);
            let f: LineAligned<f32> = values.iter().map(|&v| v as f32 * 0.5).collect();
            assert!(f.iter().zip(&values).all(|(&x, &v)| x == v as f32 * 0.5));
            assert_eq!(f.as_ptr() as usize % LINE, 0);
            assert_eq!(a.clone(), a);
        }
    }
}
