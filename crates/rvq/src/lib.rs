//! Residual vector quantization (RVQ), standalone.
//!
//! A codec in the manner of faiss's `ResidualQuantizer`: [`Rvq::train`] learns K codebooks of C
//! codewords of dimension d (k-means initialisation, then EMA refinement as in SoundStream and
//! vector-quantize-pytorch), [`Rvq::encode`] picks one codeword per stage for the residual left
//! by the stages before (greedy, or beam search), [`Rvq::decode`] sums them back, and
//! [`Rvq::code_bits`] is the size of one code. [`pack`] stores codes with ceil(log2 C) bits each,
//! [`layout`] splits longer vectors into groups of d (contiguous or strided) with an optional
//! per-vector scale, and [`io`] saves and loads codebooks as safetensors.
//!
//! Nothing here knows about language models.

pub mod aligned;
pub mod codec;
pub mod few;
pub mod hadamard;
pub mod int8;
pub mod io;
pub mod kernels;
pub mod lanes;
pub mod layout;
pub mod pack;
mod quantizer;
pub mod rng;
pub mod row_search;
pub mod search;
pub mod testkit;
pub mod train;

pub mod vnni_search;

pub use codec::{Codewords, GroupSum, HalfRvq, Quantizer, ScaledI8};
pub use int8::I8Rvq;
pub use layout::{Grouping, VectorLayout};
pub use quantizer::Rvq;
pub use train::{EmaCodebooks, TrainConfig, TrainReport, VectorSource};

#[derive(Debug, thiserror::Error)]
pub enum RvqError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("non-finite value (NaN or Inf) in {0}")]
    NonFinite(String),
    #[error("codebook file {path}: {reason}")]
    File { path: String, reason: String },
}

pub type Result<T> = std::result::Result<T, RvqError>;

/// Bits needed to store one code of a codebook with `size` entries: ceil(log2 size).
pub fn bits_for(size: usize) -> u32 {
    (usize::BITS - (size.max(2) - 1).leading_zeros()).max(1)
}

/// Fails with the position of the first NaN/Inf in `xs`.
pub fn check_finite(xs: &[f32], what: &str) -> Result<()> {
    match xs.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(RvqError::NonFinite(format!("{what} (element {i})"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bits_for_sizes() {
        assert_eq!(super::bits_for(2), 1);
        assert_eq!(super::bits_for(3), 2);
        assert_eq!(super::bits_for(256), 8);
        assert_eq!(super::bits_for(257), 9);
        assert_eq!(super::bits_for(2048), 11);
        assert_eq!(super::bits_for(65536), 16);
    }
}
