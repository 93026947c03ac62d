//! TurboQuant's scalar stage (Zandieh et al., 2025, arXiv 2504.19874): a head vector is rotated
//! (by the caller, [`super::StoredForm`]), divided by its norm (kept in f16), and every
//! coordinate — after a rotation, distributed as a coordinate of a uniform point on the sphere —
//! is quantized by the Lloyd-Max quantizer of exactly that distribution. No calibration.
//!
//! In d dimensions the coordinate u·√d of a uniform unit vector u has the density
//! ∝ (1 − t²/d)^((d−3)/2) on |t| < √d (→ N(0, 1) as d grows). Fractional rates take two coordinate
//! classes, as in the paper: for B.5 bits the first half of the coordinates get B + 1 bits, the
//! second half B.

use rvq::pack::{pack_row, row_bytes, unpack_row};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Bits per coordinate in half-bit steps: 2, 2.5, 3, 3.5 and 4.
pub const HALF_BITS: [u8; 5] = [4, 5, 6, 7, 8];

/// Lloyd-Max reconstruction levels (ascending) for `bits` bits and dimension `dim`, on the
/// scaled coordinate t = u·√d; computed once per (dim, bits).
pub fn levels(dim: usize, bits: u32) -> &'static [f64] {
    type Levels = HashMap<(usize, u32), &'static [f64]>;
    static CACHE: OnceLock<Mutex<Levels>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry((dim, bits))
        .or_insert_with(|| Box::leak(lloyd_max(dim, bits).into_boxed_slice()))
}

/// Points of the density's grid per unit of t (the integrals are sums over it).
const GRID_PER_UNIT: f64 = 2000.0;

/// The density of t = u·√d on a grid: (t, weight) with weights summing to 1.
fn density(dim: usize) -> Vec<(f64, f64)> {
    let (lo, step, n) = grid(dim);
    let d = dim as f64;
    let exponent = (d - 3.0) / 2.0;
    let mut points: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let t = lo + (i as f64 + 0.5) * step;
            (t, (1.0 - t * t / d).max(0.0).powf(exponent))
        })
        .collect();
    let total: f64 = points.iter().map(|p| p.1).sum();
    points.iter_mut().for_each(|p| p.1 /= total);
    points
}

/// The grid's left end, step and number of cells.
fn grid(dim: usize) -> (f64, f64, usize) {
    // Beyond 9 standard deviations the mass is below 1e-18 whatever d.
    let limit = (dim as f64).sqrt().min(9.0);
    let n = (2.0 * limit * GRID_PER_UNIT) as usize;
    (-limit, 2.0 * limit / n as f64, n)
}

/// Lloyd's algorithm on the density: levels at the centroids of their cells, boundaries halfway.
/// The density is taken as constant within each grid cell and the cells' mass and first moment
/// are split exactly at the boundaries, so the iteration moves continuously to its fixed point
/// (counting whole grid cells stalls it a few cells short).
fn lloyd_max(dim: usize, bits: u32) -> Vec<f64> {
    let k = 1usize << bits;
    let points = density(dim);
    let (lo, step, n) = grid(dim);
    // Mass and first moment left of grid edge i.
    let mut mass = vec![0.0; n + 1];
    let mut moment = vec![0.0; n + 1];
    for (i, &(t, w)) in points.iter().enumerate() {
        mass[i + 1] = mass[i] + w;
        moment[i + 1] = moment[i] + w * t;
    }
    // Mass and first moment left of x.
    let left_of = |x: f64| -> (f64, f64) {
        let at = ((x - lo) / step).clamp(0.0, n as f64);
        let i = (at as usize).min(n - 1);
        let frac = at - i as f64;
        let w = points[i].1;
        let cell_left = lo + i as f64 * step;
        (
            mass[i] + w * frac,
            moment[i] + w * frac * (cell_left + frac * step / 2.0),
        )
    };
    // Start at the density's quantiles (levels where no mass lies would never move).
    let mut levels: Vec<f64> = (0..k)
        .map(|i| {
            let q = (i as f64 + 0.5) / k as f64;
            let cell = mass.partition_point(|&m| m < q).clamp(1, n);
            points[cell - 1].0
        })
        .collect();
    for _ in 0..100_000 {
        let mut bounds = vec![lo];
        bounds.extend(levels.windows(2).map(|p| (p[0] + p[1]) / 2.0));
        bounds.push(lo + n as f64 * step);
        let next: Vec<f64> = bounds
            .windows(2)
            .zip(&levels)
            .map(|(b, &old)| {
                let ((m0, x0), (m1, x1)) = (left_of(b[0]), left_of(b[1]));
                if m1 > m0 {
                    (x1 - x0) / (m1 - m0)
                } else {
                    old
                }
            })
            .collect();
        let moved = next
            .iter()
            .zip(&levels)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        levels = next;
        if moved < 1e-13 {
            break;
        }
    }
    levels
}

/// Mean squared error of the quantizer with `levels` on the density of dimension `dim` (per
/// coordinate of t; the distortion the paper tabulates).
pub fn distortion(dim: usize, levels: &[f64]) -> f64 {
    density(dim)
        .iter()
        .map(|&(t, w)| w * (t - levels[nearest(levels, t)]).powi(2))
        .sum()
}

/// Index of the level nearest `t` (levels ascending).
fn nearest(levels: &[f64], t: f64) -> usize {
    let above = levels.partition_point(|&l| l < t);
    match above {
        0 => 0,
        n if n == levels.len() => n - 1,
        n if t - levels[n - 1] <= levels[n] - t => n - 1,
        n => n,
    }
}

/// The two coordinate classes of `half_bits`: (coordinates, bits) of each.
fn classes(dim: usize, half_bits: u8) -> [(usize, u32); 2] {
    let low = (half_bits / 2) as u32;
    if half_bits.is_multiple_of(2) {
        [(dim, low), (0, low)]
    } else {
        [(dim / 2, low + 1), (dim - dim / 2, low)]
    }
}

/// Bytes one head vector of `dim` values takes: an f16 norm, then each class's packed codes.
pub fn row_bytes_of(dim: usize, half_bits: u8) -> usize {
    2 + classes(dim, half_bits)
        .iter()
        .map(|&(n, bits)| row_bytes(n, bits))
        .sum::<usize>()
}

/// Quantizes the (rotated) head vector `x` into `out`.
pub fn encode(x: &[f32], half_bits: u8, out: &mut [u8]) {
    let dim = x.len();
    let norm = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    let stored = half::f16::from_f64(norm);
    out[..2].copy_from_slice(&stored.to_le_bytes());
    let scale = if stored.to_f64() > 0.0 {
        (dim as f64).sqrt() / stored.to_f64()
    } else {
        0.0
    };
    let mut at = 2;
    let mut first = 0;
    for (n, bits) in classes(dim, half_bits) {
        if n == 0 {
            continue;
        }
        let levels = levels(dim, bits);
        let codes: Vec<u16> = x[first..first + n]
            .iter()
            .map(|&v| nearest(levels, v as f64 * scale) as u16)
            .collect();
        let len = row_bytes(n, bits);
        pack_row(&codes, bits, &mut out[at..at + len]);
        at += len;
        first += n;
    }
}

/// Dequantizes `bytes` into `out` (the rotated head vector).
pub fn decode(bytes: &[u8], half_bits: u8, out: &mut [f32]) {
    let dim = out.len();
    let norm = half::f16::from_le_bytes([bytes[0], bytes[1]]).to_f64();
    let scale = norm / (dim as f64).sqrt();
    let mut at = 2;
    let mut first = 0;
    for (n, bits) in classes(dim, half_bits) {
        if n == 0 {
            continue;
        }
        let levels = levels(dim, bits);
        let mut codes = vec![0u16; n];
        let len = row_bytes(n, bits);
        unpack_row(&bytes[at..at + len], bits, &mut codes);
        for (o, &c) in out[first..first + n].iter_mut().zip(&codes) {
            *o = (levels[c as usize] * scale) as f32;
        }
        at += len;
        first += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvq::rng::SplitMix64;

    #[test]
    fn in_high_dimensions_the_levels_are_max_s_gaussian_quantizers() {
        // Max (1960), the Lloyd-Max quantizers of N(0, 1): distortion per coordinate and the
        // largest level, for 1 to 4 bits.
        let known = [
            (1, 0.3634, 0.7979),
            (2, 0.1175, 1.5104),
            (3, 0.03454, 2.1519),
            (4, 0.009501, 2.7326),
        ];
        for (bits, mse, top) in known {
            let levels = levels(1 << 20, bits);
            let d = distortion(1 << 20, levels);
            assert!(
                (d / mse - 1.0).abs() < 0.002,
                "{bits} bits: distortion {d} vs {mse}"
            );
            let last = *levels.last().unwrap();
            assert!(
                (last - top).abs() < 2e-3,
                "{bits} bits: top level {last} vs {top}"
            );
            // Symmetric about 0.
            assert!((levels[0] + last).abs() < 1e-9);
        }
    }

    #[test]
    fn at_head_dim_64_the_sphere_s_lighter_tails_lower_the_distortion() {
        for bits in 1..=4 {
            let sphere = distortion(64, levels(64, bits));
            let gauss = distortion(1 << 20, levels(1 << 20, bits));
            assert!(
                sphere < gauss && sphere > 0.9 * gauss,
                "{bits}: {sphere} vs {gauss}"
            );
        }
    }

    #[test]
    fn round_trip_matches_a_slow_reference() {
        let mut rng = SplitMix64::new(3);
        for half_bits in HALF_BITS {
            for dim in [64, 128] {
                let x: Vec<f32> = (0..dim).map(|_| rng.normal() * 0.3).collect();
                let mut bytes = vec![0u8; row_bytes_of(dim, half_bits)];
                encode(&x, half_bits, &mut bytes);
                let mut y = vec![0f32; dim];
                decode(&bytes, half_bits, &mut y);
                // Reference: nearest level by a linear scan, coordinate by coordinate.
                let norm =
                    half::f16::from_f64(x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt())
                        .to_f64();
                for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
                    let bits = if !half_bits.is_multiple_of(2) && i < dim / 2 {
                        half_bits as u32 / 2 + 1
                    } else {
                        half_bits as u32 / 2
                    };
                    let t = xi as f64 * (dim as f64).sqrt() / norm;
                    let best = levels(dim, bits)
                        .iter()
                        .copied()
                        .min_by(|a, b| (a - t).abs().total_cmp(&(b - t).abs()))
                        .unwrap();
                    let expect = (best * norm / (dim as f64).sqrt()) as f32;
                    assert_eq!(
                        yi, expect,
                        "{half_bits} half bits, dim {dim}, coordinate {i}"
                    );
                }
            }
        }
        let mut zero = vec![0u8; row_bytes_of(64, 6)];
        encode(&[0.0; 64], 6, &mut zero);
        let mut y = vec![1f32; 64];
        decode(&zero, 6, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bytes_per_vector() {
        assert_eq!(row_bytes_of(64, 6), 2 + 24); // 3 bits: 3.25 bits/element
        assert_eq!(row_bytes_of(64, 5), 2 + 12 + 8); // 2.5 bits: 32 × 3 + 32 × 2
        assert_eq!(row_bytes_of(128, 8), 2 + 64);
    }
}
