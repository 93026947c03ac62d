//! Activations quantized per 32 values to signed bytes, as the integer kernels read them.

use crate::format::{CHUNK, HALF};

/// Rows of activations [rows, cols], each 32 values x ≈ d·q with |q| ≤ 127 (never −128, so the
/// kernels' sign trick cannot overflow), and per 16 values d·Σq, which the kernels multiply by the
/// weights' offsets.
pub struct Q8Rows {
    pub rows: usize,
    pub cols: usize,
    /// [rows, cols]
    q: Vec<i8>,
    /// [rows, cols / 32]
    d: Vec<f32>,
    /// [rows, cols / 16]: d·Σq over each 16 values.
    dsums: Vec<f32>,
}

/// Activation rows that share each load of the batched kernel: one i32 lane each of a 256-bit
/// register.
pub(crate) const LANES: usize = 8;

/// [`Q8Rows`] with each group of [`LANES`] rows interleaved by 4 values, so that one 256-bit load
/// holds values 4k..4k + 4 of 8 rows: the batched kernel multiplies them by 4 codes of one weight
/// row broadcast to every lane. The last group's missing rows are zeros.
pub(crate) struct Q8Lanes {
    pub rows: usize,
    pub cols: usize,
    /// [groups, cols / 4, LANES, 4]
    pub q: Vec<i8>,
    /// [groups, cols / 32, LANES]
    pub d: Vec<f32>,
    /// [groups, cols / 16, LANES]
    pub dsums: Vec<f32>,
}

impl Q8Lanes {
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(LANES)
    }
}

/// One row of [`Q8Rows`].
#[derive(Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub dsums: &'a [f32],
}

/// `t.round().clamp(-127.0, 127.0) as i8` for finite `t`, in operations that vectorize (`round`,
/// half away from zero, is a library call per value, and `as` a checked conversion): adding 0.5
/// less half an ulp of 1 and truncating rounds the same for |t| < 2²², and a code never needs
/// more. A NaN gives a bound (its block's scale is NaN, which the products carry).
#[inline(always)]
// `clamp` keeps a NaN, which the unchecked conversion must not see.
#[allow(clippy::manual_clamp)]
fn round_to_code(t: f32) -> i8 {
    const JUST_BELOW_HALF: f32 = 0.5 - f32::EPSILON / 4.0;
    let r = (t + JUST_BELOW_HALF.copysign(t))
        .trunc()
        .max(-127.0)
        .min(127.0);
    // SAFETY: `max` and `min` return a bound for NaN, so r is an integer in [-127, 127].
    unsafe { r.to_int_unchecked::<i32>() as i8 }
}

#[inline(always)]
fn quantize_body(x: &[f32], q: &mut [i8], d: &mut [f32], dsums: &mut [f32]) {
    for (((x, q), d), dsums) in x
        .chunks_exact(CHUNK)
        .zip(q.chunks_exact_mut(CHUNK))
        .zip(d.iter_mut())
        .zip(dsums.chunks_exact_mut(2))
    {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = round_to_code(v * inv);
        }
        // A NaN or infinity would vanish in the bytes (`max` skips NaN, the cast saturates):
        // a NaN scale carries it into every product of the block instead.
        let scale = if x.iter().all(|v| v.is_finite()) {
            scale
        } else {
            f32::NAN
        };
        *d = scale;
        for (s, half) in dsums.iter_mut().zip(q.chunks_exact(HALF)) {
            *s = scale * half.iter().map(|&v| v as i32).sum::<i32>() as f32;
        }
    }
}

simd::multiversion! {
    fn quantize_rows(x: &[f32], q: &mut [i8], d: &mut [f32], dsums: &mut [f32]) = quantize_body;
}

impl Q8Rows {
    /// Quantizes `x` ([rows, cols], cols a multiple of 32).
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        assert!(
            cols > 0 && cols.is_multiple_of(CHUNK) && x.len().is_multiple_of(cols),
            "activations of {} values in rows of {cols}",
            x.len()
        );
        let rows = x.len() / cols;
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / CHUNK];
        let mut dsums = vec![0f32; x.len() / HALF];
        quantize_rows(x, &mut q, &mut d, &mut dsums);
        Self {
            rows,
            cols,
            q,
            d,
            dsums,
        }
    }

    pub(crate) fn row(&self, r: usize) -> Q8Row<'_> {
        let n = self.cols;
        Q8Row {
            q: &self.q[r * n..(r + 1) * n],
            d: &self.d[r * n / CHUNK..(r + 1) * n / CHUNK],
            dsums: &self.dsums[r * n / HALF..(r + 1) * n / HALF],
        }
    }

    /// The same rows in groups of [`LANES`], for the batched kernel.
    pub(crate) fn lanes(&self) -> Q8Lanes {
        let groups = self.rows.div_ceil(LANES);
        let (dwords, chunks, halves) = (self.cols / 4, self.cols / CHUNK, self.cols / HALF);
        let mut q = vec![0i8; groups * LANES * self.cols];
        let mut d = vec![0f32; groups * LANES * chunks];
        let mut dsums = vec![0f32; groups * LANES * halves];
        for r in 0..self.rows {
            let (g, lane) = (r / LANES, r % LANES);
            let row = self.row(r);
            for (k, four) in row.q.chunks_exact(4).enumerate() {
                let at = ((g * dwords + k) * LANES + lane) * 4;
                q[at..at + 4].copy_from_slice(four);
            }
            for (c, &v) in row.d.iter().enumerate() {
                d[(g * chunks + c) * LANES + lane] = v;
            }
            for (h, &v) in row.dsums.iter().enumerate() {
                dsums[(g * halves + h) * LANES + lane] = v;
            }
        }
        Q8Lanes {
            rows: self.rows,
            cols: self.cols,
            q,
            d,
            dsums,
        }
    }

    /// The values the kernels multiply by: d·q ([rows, cols]).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| self.d[i / CHUNK] * q as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_value_is_within_half_a_step_and_sums_match() {
        let x: Vec<f32> = (0..128)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let a = Q8Rows::quantize(&x, 64);
        assert_eq!((a.rows, a.cols), (2, 64));
        let back = a.dequantize();
        for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
            let step = a.d[i / CHUNK];
            assert!(
                (v - b).abs() <= 0.5 * step * (1.0 + 1e-6),
                "value {i}: {v} vs {b}"
            );
        }
        assert!(a.q.iter().all(|&q| q != -128));
        for (k, &s) in a.dsums.iter().enumerate() {
            let exact: f32 = back[k * HALF..(k + 1) * HALF].iter().sum();
            assert!((s - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
        }
    }

    #[test]
    fn a_non_finite_value_makes_its_block_s_scale_nan() {
        let mut x = vec![0.5f32; 64];
        x[40] = f32::NAN;
        let a = Q8Rows::quantize(&x, 64);
        assert!(a.d[0].is_finite() && a.d[1].is_nan());
        x[40] = f32::INFINITY;
        assert!(Q8Rows::quantize(&x, 64).d[1].is_nan());
    }

    #[test]
    fn codes_round_as_round_does() {
        // Every tie k + ½ and its neighbours a few ulps either side, then a sweep of the range.
        let mut values: Vec<f32> = (-260..=260)
            .flat_map(|k| {
                let tie = k as f32 * 0.5;
                (-3i32..=3).map(move |u| f32::from_bits((tie.to_bits() as i32 + u) as u32))
            })
            .collect();
        values.extend((0..2_000_000).map(|i| (i as f32 - 1e6) * 1.3e-4));
        values.extend([0.0, -0.0, 127.4, -127.6, 1e-30, -1e-30, 1e30, -1e30]);
        for t in values.into_iter().filter(|t| !t.is_nan()) {
            let expected = t.round().clamp(-127.0, 127.0) as i8;
            assert_eq!(round_to_code(t), expected, "{t} ({:#x})", t.to_bits());
        }
    }

    #[test]
    fn a_zero_block_has_zero_scale_and_codes() {
        let a = Q8Rows::quantize(&[0.0; 32], 32);
        assert_eq!(a.d, vec![0.0]);
        assert!(a.q.iter().all(|&q| q == 0));
    }
}
