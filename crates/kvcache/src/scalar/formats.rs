//! Scalar formats for one head vector at a time: llama.cpp's `q8_0`/`q4_0` blocks, per-vector
//! absmax `int8`, `fp8` (E4M3 with a per-vector scale, like vLLM's fp8 cache), and TurboQuant's
//! norm plus Lloyd-Max coordinates (`tq:B`, [`super::turbo`]).

use float8::F8E4M3;
use half::f16;

/// llama.cpp's block length for `q8_0` and `q4_0`.
pub const QK: usize = 32;
/// Bytes of one f16 scale.
const SCALE_BYTES: usize = 2;
/// Largest finite E4M3 value.
const FP8_MAX: f32 = 448.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScalarFormat {
    /// Blocks of 32: f16 scale d = absmax/127, int8 q = round(x/d). 8.5 bits/element.
    Q8_0,
    /// Blocks of 32: f16 scale d = (value of largest magnitude)/−8, 4-bit q = x/d + 8. 4.5 bits.
    Q4_0,
    /// One f16 scale per head vector, int8 q = round(x/d), d = absmax/127.
    Int8,
    /// One f16 scale per head vector, E4M3 of x/d with d = absmax/448.
    Fp8,
    /// TurboQuant: an f16 norm per (rotated) head vector and each coordinate by the Lloyd-Max
    /// quantizer of a sphere coordinate, at this many half bits (4 = 2 bits … 8 = 4 bits).
    Turbo(u8),
}

impl ScalarFormat {
    pub fn name(self) -> &'static str {
        match self {
            ScalarFormat::Q8_0 => "q8_0",
            ScalarFormat::Q4_0 => "q4_0",
            ScalarFormat::Int8 => "int8",
            ScalarFormat::Fp8 => "fp8",
            ScalarFormat::Turbo(4) => "tq:2",
            ScalarFormat::Turbo(5) => "tq:2.5",
            ScalarFormat::Turbo(6) => "tq:3",
            ScalarFormat::Turbo(7) => "tq:3.5",
            ScalarFormat::Turbo(_) => "tq:4",
        }
    }

    /// Every format, for parsing and listing.
    pub fn all() -> impl Iterator<Item = Self> {
        [Self::Q8_0, Self::Q4_0, Self::Int8, Self::Fp8]
            .into_iter()
            .chain(super::turbo::HALF_BITS.map(Self::Turbo))
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::all().find(|f| f.name() == name)
    }

    /// Whether the format assumes its vectors rotated (TurboQuant's coordinates follow a known
    /// distribution only after a rotation).
    pub fn needs_rotation(self) -> bool {
        matches!(self, ScalarFormat::Turbo(_))
    }

    /// Why this format cannot store head vectors of length `hd`, if it cannot.
    pub fn check(self, hd: usize) -> Result<(), String> {
        match self {
            ScalarFormat::Q8_0 | ScalarFormat::Q4_0 if !hd.is_multiple_of(QK) => Err(format!(
                "{} needs head_dim to be a multiple of {QK}, got {hd}",
                self.name()
            )),
            _ if hd == 0 => Err("head_dim is 0".into()),
            ScalarFormat::Turbo(_) if !hd.is_power_of_two() => Err(format!(
                "{} rotates whole head vectors by a Walsh-Hadamard transform: head_dim must be a power of two, got {hd}",
                self.name()
            )),
            _ => Ok(()),
        }
    }

    /// Bytes one head vector of `hd` values takes.
    pub fn row_bytes(self, hd: usize) -> usize {
        match self {
            ScalarFormat::Q8_0 => hd / QK * (SCALE_BYTES + QK),
            ScalarFormat::Q4_0 => hd / QK * (SCALE_BYTES + QK / 2),
            ScalarFormat::Int8 | ScalarFormat::Fp8 => SCALE_BYTES + hd,
            ScalarFormat::Turbo(half_bits) => super::turbo::row_bytes_of(hd, half_bits),
        }
    }

    /// Quantizes `x` into `out` (`row_bytes(x.len())` bytes).
    pub fn encode(self, x: &[f32], out: &mut [u8]) {
        match self {
            ScalarFormat::Q8_0 => {
                for (x, out) in x
                    .chunks_exact(QK)
                    .zip(out.chunks_exact_mut(SCALE_BYTES + QK))
                {
                    encode_q8_0_block(x, out);
                }
            }
            ScalarFormat::Q4_0 => {
                for (x, out) in x
                    .chunks_exact(QK)
                    .zip(out.chunks_exact_mut(SCALE_BYTES + QK / 2))
                {
                    encode_q4_0_block(x, out);
                }
            }
            ScalarFormat::Int8 => encode_int8(x, out),
            ScalarFormat::Fp8 => encode_fp8(x, out),
            ScalarFormat::Turbo(half_bits) => super::turbo::encode(x, half_bits, out),
        }
    }

    /// Dequantizes `bytes` into `out`.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        let (block, payload) = match self {
            ScalarFormat::Q8_0 => (QK, QK),
            ScalarFormat::Q4_0 => (QK, QK / 2),
            ScalarFormat::Int8 | ScalarFormat::Fp8 => (out.len(), out.len()),
            ScalarFormat::Turbo(half_bits) => return super::turbo::decode(bytes, half_bits, out),
        };
        for (b, out) in bytes
            .chunks_exact(SCALE_BYTES + payload)
            .zip(out.chunks_exact_mut(block))
        {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let q = &b[SCALE_BYTES..];
            match self {
                ScalarFormat::Q8_0 | ScalarFormat::Int8 => {
                    for (o, &q) in out.iter_mut().zip(q) {
                        *o = q as i8 as f32 * d;
                    }
                }
                ScalarFormat::Q4_0 => {
                    for (j, &q) in q.iter().enumerate() {
                        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
                        out[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
                    }
                }
                ScalarFormat::Fp8 => {
                    for (o, &q) in out.iter_mut().zip(q) {
                        *o = F8E4M3::from_bits(q).to_f32() * d;
                    }
                }
                ScalarFormat::Turbo(_) => unreachable!("decoded above"),
            }
        }
    }
}

fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn put_scale(d: f32, out: &mut [u8]) {
    out[..SCALE_BYTES].copy_from_slice(&f16::from_f32(d).to_le_bytes());
}

/// `quantize_row_q8_0_ref` of ggml: the scale is rounded to f16 for storage only.
fn encode_q8_0_block(x: &[f32], out: &mut [u8]) {
    let d = absmax(x) / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_scale(d, out);
    for (o, v) in out[SCALE_BYTES..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// `quantize_row_q4_0_ref` of ggml: the signed value of largest magnitude maps to −8, so that
/// extreme is exact; low nibbles hold elements 0..16, high nibbles 16..32.
fn encode_q4_0_block(x: &[f32], out: &mut [u8]) {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_scale(d, out);
    let nibble = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..QK / 2 {
        out[SCALE_BYTES + j] = nibble(x[j]) | (nibble(x[j + QK / 2]) << 4);
    }
}

/// Per-vector absmax int8. Quantizes with the stored (f16) scale so that decode is q · scale.
fn encode_int8(x: &[f32], out: &mut [u8]) {
    let d = f16::from_f32(absmax(x) / 127.0).to_f32();
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_scale(d, out);
    for (o, v) in out[SCALE_BYTES..].iter_mut().zip(x) {
        *o = (v * id).round().clamp(-127.0, 127.0) as i8 as u8;
    }
}

/// E4M3 with a per-vector scale mapping the absmax to 448 (round to nearest even, saturating).
fn encode_fp8(x: &[f32], out: &mut [u8]) {
    let d = f16::from_f32(absmax(x) / FP8_MAX).to_f32();
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_scale(d, out);
    for (o, v) in out[SCALE_BYTES..].iter_mut().zip(x) {
        *o = F8E4M3::from_f32((v * id).clamp(-FP8_MAX, FP8_MAX)).to_bits();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvq::rng::SplitMix64;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n)
            .map(|i| rng.normal() * if i % 17 == 3 { 8.0 } else { 1.0 })
            .collect()
    }

    /// E4M3 by its definition: bias 7, 3 mantissa bits, subnormals below 2^-6, 0x7F/0xFF NaN.
    fn e4m3_value(bits: u8) -> Option<f64> {
        let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = ((bits >> 3) & 0x0f) as i32;
        let man = (bits & 0x07) as f64;
        if exp == 15 && man == 7.0 {
            return None;
        }
        Some(
            sign * if exp == 0 {
                man / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + man / 8.0) * 2f64.powi(exp - 7)
            },
        )
    }

    /// Slow references written from each format's definition.
    fn reference(format: ScalarFormat, x: &[f32]) -> Vec<f64> {
        let h = |d: f64| f16::from_f64(d).to_f64();
        let block = match format {
            ScalarFormat::Q8_0 | ScalarFormat::Q4_0 => QK,
            _ => x.len(),
        };
        let mut out = vec![];
        for b in x.chunks(block) {
            let amax = b.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
            match format {
                ScalarFormat::Q8_0 => {
                    let d = amax / 127.0;
                    out.extend(b.iter().map(|&v| {
                        let q = if d == 0.0 {
                            0.0
                        } else {
                            (v as f64 / d).round()
                        };
                        q * h(d)
                    }));
                }
                ScalarFormat::Q4_0 => {
                    let max = *b
                        .iter()
                        .reduce(|m, v| if v.abs() > m.abs() { v } else { m })
                        .unwrap() as f64;
                    let d = max / -8.0;
                    out.extend(b.iter().map(|&v| {
                        let q = if d == 0.0 {
                            8.0
                        } else {
                            (v as f64 / d + 8.5).floor()
                        };
                        (q.min(15.0) - 8.0) * h(d)
                    }));
                }
                ScalarFormat::Int8 => {
                    let d = h(amax / 127.0);
                    out.extend(b.iter().map(|&v| {
                        let q = if d == 0.0 {
                            0.0
                        } else {
                            (v as f64 / d).round()
                        };
                        q.clamp(-127.0, 127.0) * d
                    }));
                }
                ScalarFormat::Fp8 => {
                    let d = h(amax / 448.0);
                    let grid: Vec<f64> = (0..=255u8).filter_map(e4m3_value).collect();
                    out.extend(b.iter().map(|&v| {
                        let t = if d == 0.0 { 0.0 } else { v as f64 / d };
                        let nearest = grid
                            .iter()
                            .copied()
                            .min_by(|a, b| (a - t).abs().total_cmp(&(b - t).abs()))
                            .unwrap();
                        nearest * d
                    }));
                }
                // Checked against its own slow reference in `turbo.rs`.
                ScalarFormat::Turbo(_) => unreachable!("not a format this reference covers"),
            }
        }
        out
    }

    #[test]
    fn every_format_matches_its_slow_reference() {
        for format in [
            ScalarFormat::Q8_0,
            ScalarFormat::Q4_0,
            ScalarFormat::Int8,
            ScalarFormat::Fp8,
        ] {
            for seed in 0..20 {
                let x = data(64, seed);
                let mut bytes = vec![0u8; format.row_bytes(64)];
                format.encode(&x, &mut bytes);
                let mut y = vec![0f32; 64];
                format.decode(&bytes, &mut y);
                let want = reference(format, &x);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    // Equal up to f32-vs-f64 rounding of the same code (ties are measure-zero).
                    let tol = 1e-6 * (1.0 + b.abs());
                    assert!(
                        (*a as f64 - b).abs() <= tol,
                        "{} seed {seed} [{i}]: {a} vs {b}",
                        format.name()
                    );
                }
            }
        }
    }

    #[test]
    fn bits_per_element_by_hand() {
        // q8_0: (2 + 32) bytes per 32 values = 8.5 bits; q4_0: (2 + 16)/32 = 4.5 bits;
        // int8/fp8 at head_dim 64: (2 + 64) bytes per 64 values = 8.25 bits.
        let bits = |f: ScalarFormat, hd: usize| f.row_bytes(hd) as f64 * 8.0 / hd as f64;
        assert_eq!(bits(ScalarFormat::Q8_0, 64), 8.5);
        assert_eq!(bits(ScalarFormat::Q4_0, 128), 4.5);
        assert_eq!(bits(ScalarFormat::Int8, 64), 8.25);
        assert_eq!(bits(ScalarFormat::Fp8, 128), 8.125);
    }

    #[test]
    fn zero_vectors_and_bad_widths() {
        for format in [
            ScalarFormat::Q8_0,
            ScalarFormat::Q4_0,
            ScalarFormat::Int8,
            ScalarFormat::Fp8,
        ] {
            let mut bytes = vec![0xAAu8; format.row_bytes(32)];
            format.encode(&[0.0; 32], &mut bytes);
            let mut y = vec![1f32; 32];
            format.decode(&bytes, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{}", format.name());
        }
        assert!(ScalarFormat::Q4_0.check(48).is_err());
        assert!(ScalarFormat::Int8.check(48).is_ok());
        assert!(ScalarFormat::Fp8.check(0).is_err());
    }
}
