//! Nearest i8 codewords of a few d = 32 vectors by integer dot products (AVX-512 VNNI), giving
//! exactly the codes [`crate::row_search`] gives.
//!
//! A decode step's encoder scores every codeword of every stage against ~6 residuals. The f32
//! row-search kernel converts each codeword to f32 and multiplies lane by lane. Here each
//! vector x is rounded once to i8 steps, x = α·ρ + δ with |ρ| ≤ 127, and one `vpdpbusd` takes
//! the byte products of 16 codewords at once (a block of 16 codewords is transposed in
//! registers so that its lanes are codewords): four multiplies a lane per instruction instead of
//! one, no conversions and no horizontal sums.
//!
//! The rounded scores v_c = ‖c‖² − 2α·ρ·q_c differ from the f32 kernel's s_c = ‖c‖² − 2·x·q_c by
//! at most B = 2‖δ‖·max_c ‖q_c‖ plus rounding margins ([`StageBound`]), so the f32 kernel's
//! choice is among the codewords with v_c ≤ min v + 2B. Those few are rescored in the f32
//! kernel's own arithmetic ([`row_search::score`]) and the lowest score, ties to the lower index,
//! wins: the f32 kernel's answer, bit for bit. (How many are rescored on real residuals has not
//! been counted; the speed measured is `examples/search_speed`'s on synthetic ones.)

use crate::lanes::DIM;
use crate::row_search::{self, Prefetch};

/// Codewords per block: the 16 lanes of an AVX-512 register.
const BLOCK: usize = 16;

/// Vectors searched together: a decode step's six group vectors per quantizer for SmolLM2
/// (3 KV heads × 2 groups), whose accumulators, minima and the transposed block fit the 32
/// registers; their scores ([ROWS, C] f32, 48 KB at C = 2048) stay in L2 between the passes.
pub const ROWS: usize = 6;

/// Lane p of a transposed block holds codeword `ORDER[p]` of the block (see `transpose`).
const ORDER: [u32; BLOCK] = [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15];

/// What the candidate bound needs of one stage's codebook, computed once when it is built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StageBound {
    /// max over codewords of ‖q_c‖₂ (the stored i8 values), rounded up.
    pub q_norm_max: f32,
    /// max over codewords of the squared norm the scores use.
    pub norm_max: f32,
}

impl StageBound {
    /// The bound of codebook `book` ([C, 32] i8) with squared norms `norms` ([C]).
    pub fn of(book: &[i8], norms: &[f32]) -> Self {
        let q_norm_max = book
            .chunks_exact(DIM)
            .map(|w| w.iter().map(|&q| f64::from(q).powi(2)).sum::<f64>().sqrt())
            .fold(0f64, f64::max);
        Self {
            // f64 → f32 may round down; one part in 10⁶ up covers it.
            q_norm_max: (q_norm_max * (1.0 + 1e-6)) as f32,
            norm_max: norms.iter().copied().fold(0f32, f32::max),
        }
    }
}

/// Whether [`nearest_prefetching`] uses the integer kernel here: AVX-512 VNNI (with F, BW, VL), and the process configured for
/// AVX-512 (`RVQ_KV_SIMD`); decided once per process, like [`row_search::available`].
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            simd::configured() >= simd::Level::Avx512
                && has!("avx512vnni")
                && row_search::available(DIM)
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether [`nearest_prefetching`] takes a codebook of `size` codewords: whole blocks of 16.
pub fn takes(size: usize) -> bool {
    size > 0 && size.is_multiple_of(BLOCK)
}

/// [`row_search::nearest_prefetching`] for an i8 codebook: the same `best` (argmin over c of
/// `norms[c]` − 2·x_r·c, ties to the lower index, as that kernel rounds), by integer dot products
/// where [`available`] and [`takes`] allow, by the f32 kernel otherwise.
pub fn nearest_prefetching(
    book: &[i8],
    norms: &[f32],
    bound: StageBound,
    x: &[f32],
    best: &mut [u32],
    next: &[i8],
) {
    if !(available() && takes(norms.len())) {
        return row_search::nearest_prefetching(book, norms, x, best, next);
    }
    let c = norms.len();
    assert!(book.len() == c * DIM && x.len() == best.len() * DIM);
    thread_local! {
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCORES.with_borrow_mut(|scores| {
        scores.resize(ROWS * c, 0.0);
        let chunks = best.len().div_ceil(ROWS);
        let mut prefetch = Prefetch::new(next, chunks * (c / BLOCK));
        for (x, best) in x.chunks(ROWS * DIM).zip(best.chunks_mut(ROWS)) {
            let m = best.len();
            let args = (book, norms, bound, x, best, &mut scores[..], &mut prefetch);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available` found AVX-512 F/BW/VL and VNNI; shapes checked above, `scores`
            // holds [ROWS, C].
            unsafe {
                match m {
                    1 => nearest_rows::<1>(args),
                    2 => nearest_rows::<2>(args),
                    3 => nearest_rows::<3>(args),
                    4 => nearest_rows::<4>(args),
                    5 => nearest_rows::<5>(args),
                    _ => nearest_rows::<6>(args),
                }
            };
        }
    });
}

/// One vector's i8 steps: x = α·ρ + δ.
struct Rounded {
    /// ρ as 8 dwords of 4 bytes each, for `vpdpbusd`'s broadcast operand.
    dwords: [i32; 8],
    /// −128·Σρ: the codebook enters as unsigned q + 128, which adds 128·Σρ to every dot product.
    bias: i32,
    /// 2α, by which the integer dot products scale.
    two_alpha: f32,
    /// Bound on |s_c − v_c| for every codeword (see the module doc).
    slack: f32,
}

impl Rounded {
    /// Inlined into the kernel, so that its roundings compile to the kernel's instructions.
    #[inline(always)]
    fn new(x: &[f32], bound: StageBound) -> Self {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let alpha = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut rho = [0i8; DIM];
        let (mut delta2, mut x2) = (0f32, 0f32);
        for (r, &v) in rho.iter_mut().zip(x) {
            // NaN (inv infinite at a subnormal amax, v = 0) casts to 0: any ρ is valid, δ
            // follows from it.
            *r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
            let d = v - alpha * f32::from(*r);
            delta2 += d * d;
            x2 += v * v;
        }
        let (delta, norm) = (delta2.sqrt(), x2.sqrt());
        // ‖δ‖ up to the roundings of δ and of its norm; the f32 kernel's and v's own roundings
        // stay below 10⁻⁵ of the magnitudes they act on (32-term dot products, < 10 roundings
        // deep, 2⁻²⁴ each).
        let delta = delta * (1.0 + 1e-5) + 1e-5 * norm;
        let q = bound.q_norm_max;
        let slack = 2.0 * delta * q + 1e-5 * (bound.norm_max + 2.0 * (norm + delta) * q);
        let mut dwords = [0i32; 8];
        for (d, b) in dwords.iter_mut().zip(rho.chunks_exact(4)) {
            *d = i32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
        }
        let sum: i32 = rho.iter().map(|&r| i32::from(r)).sum();
        Self {
            dwords,
            bias: -128 * sum,
            two_alpha: 2.0 * alpha,
            slack,
        }
    }
}

/// What [`nearest_rows`] works on: the codebook, its norms and bound, R vectors ([R, 32]), their
/// codes, scores ([ROWS, C]) and the next codebook's prefetch.
type Rows<'a> = (
    &'a [i8],
    &'a [f32],
    StageBound,
    &'a [f32],
    &'a mut [u32],
    &'a mut [f32],
    &'a mut Prefetch,
);

/// R ≤ [`ROWS`] vectors: pass 1 scores every codeword in i8 steps into `scores` (the R
/// accumulators in registers, so R independent chains of products), pass 2 rescores exactly
/// those within twice the slack of each vector's minimum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn nearest_rows<const R: usize>((book, norms, bound, x, best, scores, prefetch): Rows) {
    use std::arch::x86_64::*;
    let c = norms.len();
    let rows: [Rounded; R] = std::array::from_fn(|r| Rounded::new(&x[r * DIM..][..DIM], bound));
    let order = _mm512_loadu_si512(ORDER.as_ptr() as *const __m512i);
    let two_alpha: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(rows[r].two_alpha));
    let mut min = [_mm512_set1_ps(f32::INFINITY); R];
    for c0 in (0..c).step_by(BLOCK) {
        prefetch.step();
        let t = transpose(book.as_ptr().add(c0 * DIM));
        let norm = _mm512_permutexvar_ps(order, _mm512_loadu_ps(norms.as_ptr().add(c0)));
        let mut acc: [__m512i; R] = std::array::from_fn(|r| _mm512_set1_epi32(rows[r].bias));
        for (k, &t) in t.iter().enumerate() {
            for (acc, row) in acc.iter_mut().zip(&rows) {
                *acc = _mm512_dpbusd_epi32(*acc, t, _mm512_set1_epi32(row.dwords[k]));
            }
        }
        for r in 0..R {
            // v = ‖c‖² − 2α·ρ·q, one rounding (the integer dot product is exact, < 2²⁴).
            let v = _mm512_fnmadd_ps(two_alpha[r], _mm512_cvtepi32_ps(acc[r]), norm);
            _mm512_storeu_ps(scores.as_mut_ptr().add(r * c + c0), v);
            min[r] = _mm512_min_ps(min[r], v);
        }
    }
    for (r, (row, best)) in rows.iter().zip(best.iter_mut()).enumerate() {
        let lowest = _mm512_reduce_min_ps(min[r]);
        let limit = lowest + 2.0 * row.slack * (1.0 + 1e-5) + 1e-5 * lowest.abs();
        let limit = _mm512_set1_ps(limit);
        let x = &x[r * DIM..(r + 1) * DIM];
        let (mut bv, mut bi) = (f32::INFINITY, 0u32);
        for c0 in (0..c).step_by(BLOCK) {
            let v = _mm512_loadu_ps(scores.as_ptr().add(r * c + c0));
            let mut near = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(v, limit);
            while near != 0 {
                let lane = near.trailing_zeros() as usize;
                near &= near - 1;
                let j = c0 + ORDER[lane] as usize;
                let s = row_search::score(x, &book[j * DIM..(j + 1) * DIM], norms[j]);
                if s < bv || (s == bv && (j as u32) < bi) {
                    (bv, bi) = (s, j as u32);
                }
            }
        }
        *best = bi;
    }
}

/// The 16 codewords at `p` ([16, 32] i8) as 8 registers of unsigned bytes q + 128: register k
/// holds bytes 4k..4k + 4 of every codeword, codeword `ORDER[lane]` in each lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose(p: *const i8) -> [std::arch::x86_64::__m512i; 8] {
    use std::arch::x86_64::*;
    let flip = _mm512_set1_epi8(-128);
    // r[i] = codewords 2i and 2i + 1; 128-bit lanes: (2i, bytes 0..16), (2i, 16..32), (2i+1, …).
    let r: [__m512i; 8] = std::array::from_fn(|i| {
        _mm512_xor_si512(_mm512_loadu_si512(p.add(64 * i) as *const __m512i), flip)
    });
    // Dwords of codeword pairs (2i, 2i + 2) interleaved, then quadruples (…, 2i + 4, 2i + 6).
    let lo: [__m512i; 4] = std::array::from_fn(|j| _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]));
    let hi: [__m512i; 4] = std::array::from_fn(|j| _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]));
    // b[g][k]: codewords 8g..8g + 8, dword k in 128-bit lanes 0 (even) and 2 (odd), k + 4 in 1, 3.
    let b: [[__m512i; 4]; 2] = std::array::from_fn(|g| {
        let (l0, l1, h0, h1) = (lo[2 * g], lo[2 * g + 1], hi[2 * g], hi[2 * g + 1]);
        [
            _mm512_unpacklo_epi64(l0, l1),
            _mm512_unpackhi_epi64(l0, l1),
            _mm512_unpacklo_epi64(h0, h1),
            _mm512_unpackhi_epi64(h0, h1),
        ]
    });
    std::array::from_fn(|k| match k {
        0..4 => _mm512_shuffle_i32x4::<0b10_00_10_00>(b[0][k], b[1][k]),
        _ => _mm512_shuffle_i32x4::<0b11_01_11_01>(b[0][k - 4], b[1][k - 4]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Whether the kernel runs here; says so when it does not (the f32 kernel then serves and
    /// there is nothing to compare).
    fn runs() -> bool {
        if !available() {
            eprintln!("no AVX-512 VNNI here: the integer kernel does not run, nor its test");
        }
        available()
    }

    /// A stage-like codebook: i8 values, per-channel scales, the dequantized norms.
    fn book(rng: &mut SplitMix64, c: usize) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
        let scale: Vec<f32> = (0..32).map(|j| 0.01 + 0.002 * j as f32).collect();
        let q: Vec<i8> = (0..c * 32)
            .map(|_| (rng.normal() * 50.0).round().clamp(-127.0, 127.0) as i8)
            .collect();
        let norms = norms_of(&q, &scale);
        (q, norms, scale)
    }

    /// Squared norms of the dequantized codewords q ⊙ scale, as `I8Rvq` holds them.
    fn norms_of(q: &[i8], scale: &[f32]) -> Vec<f32> {
        let words: Vec<f32> = q
            .iter()
            .zip(scale.iter().cycle())
            .map(|(&q, s)| f32::from(q) * s)
            .collect();
        crate::kernels::row_norms(&words, DIM)
    }

    /// The integer kernel's codes equal the f32 kernel's.
    fn check(book: &[i8], norms: &[f32], x: &[f32], what: &str) -> Vec<u32> {
        let m = x.len() / 32;
        let (mut want, mut got) = (vec![0u32; m], vec![0u32; m]);
        row_search::nearest(book, norms, x, &mut want);
        nearest_prefetching(book, norms, StageBound::of(book, norms), x, &mut got, &[]);
        assert_eq!(got, want, "{what}");
        got
    }

    #[test]
    fn transpose_puts_dword_k_of_codeword_order_lane_in_register_k() {
        if !runs() {
            return;
        }
        let words: Vec<i8> = (0..16 * 32).map(|i| (i % 251) as i8).collect();
        // SAFETY: `available` checked the instruction sets; 512 bytes at the pointer.
        let regs = unsafe { transpose(words.as_ptr()) };
        for (k, reg) in regs.iter().enumerate() {
            let mut lanes = [0u8; 64];
            // SAFETY: 64 bytes out.
            unsafe { std::arch::x86_64::_mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, *reg) };
            for (p, &cw) in ORDER.iter().enumerate() {
                for b in 0..4 {
                    let q = words[cw as usize * 32 + 4 * k + b];
                    assert_eq!(lanes[4 * p + b], (q as u8) ^ 0x80, "register {k} lane {p}");
                }
            }
        }
    }

    #[test]
    fn same_codes_as_the_f32_kernel_near_codewords() {
        if !runs() {
            return;
        }
        let mut rng = SplitMix64::new(7);
        for &(c, m) in &[(2048, 6), (64, 1), (256, 13), (16, 8)] {
            let (q, norms, scale) = book(&mut rng, c);
            for rep in 0..20 {
                // Residual-like vectors (times the stage's scales, as the encoder passes them)
                // near a codeword, where the nearest few are close.
                let x: Vec<f32> = (0..m * 32)
                    .map(|i| {
                        let j = i % 32;
                        let near = f32::from(q[(rep * 7 + i / 32) % c * 32 + j]) * scale[j];
                        (near + 0.3 * rng.normal() * scale[j]) * scale[j]
                    })
                    .collect();
                check(&q, &norms, &x, &format!("C = {c}, m = {m}, rep {rep}"));
            }
        }
    }

    #[test]
    fn midpoints_decided_by_rounding_match_the_f32_kernel() {
        if !runs() {
            return;
        }
        let mut rng = SplitMix64::new(3);
        let (c, m) = (2048, 1200);
        let (q, norms, scale) = book(&mut rng, c);
        let x: Vec<f32> = (0..m)
            .flat_map(|_| {
                let (a, b) = (rng.below(c), rng.below(c));
                (0..32)
                    .map(|j| {
                        let mid = (f32::from(q[a * 32 + j]) + f32::from(q[b * 32 + j])) * 0.5;
                        mid * scale[j] * scale[j]
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        check(&q, &norms, &x, "midpoints");
    }

    #[test]
    fn ties_and_degenerate_vectors_match_the_f32_kernel() {
        if !runs() {
            return;
        }
        let mut rng = SplitMix64::new(11);
        let (mut q, _, scale) = book(&mut rng, 256);
        // Codewords 40 and 200 equal 3: exact ties, which go to the lower index.
        let w3 = q[3 * 32..4 * 32].to_vec();
        q[200 * 32..201 * 32].copy_from_slice(&w3);
        q[40 * 32..41 * 32].copy_from_slice(&w3);
        let norms = norms_of(&q, &scale);
        let at = |cw: usize| -> Vec<f32> {
            (0..32)
                .map(|j| f32::from(q[cw * 32 + j]) * scale[j] * scale[j])
                .collect()
        };
        let mut x = at(200); // ties 3, 40 and 200
        x.extend([0f32; 32]); // every score is the norm
        x.extend((0..32).map(|j| if j == 5 { 1e-30 } else { 0.0 })); // far below the steps
        x.extend((0..32).map(|j| 1e6 * scale[j])); // far above
        x.extend(at(17).iter().map(|v| -v));
        let got = check(&q, &norms, &x, "ties and degenerate vectors");
        assert_eq!(got[0], 3);
    }

    #[test]
    fn every_row_count_up_to_two_chunks_matches() {
        if !runs() {
            return;
        }
        let mut rng = SplitMix64::new(5);
        let (q, norms, scale) = book(&mut rng, 512);
        for m in 1..=2 * ROWS + 1 {
            let x: Vec<f32> = (0..m * 32).map(|i| rng.normal() * scale[i % 32]).collect();
            check(&q, &norms, &x, &format!("m = {m}"));
        }
    }
}
