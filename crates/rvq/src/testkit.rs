//! Random quantizers for tests, benchmarks and fuzzing, one definition for the workspace.

use crate::rng::SplitMix64;
use crate::Rvq;

/// K stages of C random codewords of dimension d, stage s drawn from N(0, 1/(s+1)²): each stage
/// finer than the one before, as a trained RVQ's residual stages are.
pub fn random_rvq(rng: &mut SplitMix64, d: usize, c: usize, k: usize) -> Rvq {
    random_rvq_with(rng, d, c, k, |_| 1.0)
}

/// [`random_rvq`] with channel `i`'s codeword coordinates scaled by `channel_scale(i)` (channels
/// of different spreads, as keys have).
pub fn random_rvq_with(
    rng: &mut SplitMix64,
    d: usize,
    c: usize,
    k: usize,
    channel_scale: impl Fn(usize) -> f32,
) -> Rvq {
    let books = (0..k)
        .map(|s| {
            (0..c * d)
                .map(|i| rng.normal() * channel_scale(i % d) / (s + 1) as f32)
                .collect()
        })
        .collect();
    Rvq::from_codebooks(d, c, books).expect("random codebooks are well formed")
}
