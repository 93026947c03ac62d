//! Scalar-quantized KV caches, the baselines RVQ is measured against: llama.cpp's `q8_0`/`q4_0`
//! (optionally Hadamard-rotated and post-RoPE, to reproduce llama.cpp exactly), per-vector
//! `int8` and `fp8`, and KIVI's 2/4-bit asymmetric scheme.

pub mod block_cache;
pub mod formats;
pub mod kivi;
pub mod turbo;

pub use block_cache::BlockCache;
pub use formats::ScalarFormat;
pub use kivi::{KiviCache, KiviOptions};

use crate::hadamard::Hadamard;
use crate::{Part, Rope};

/// What a scalar cache does to a head vector before quantizing it (and undoes after reading):
/// llama.cpp stores keys after RoPE and, by default, Hadamard-rotates keys and values first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredForm {
    pub key_rotation: Option<Hadamard>,
    pub value_rotation: Option<Hadamard>,
    /// Keys are stored rotated to their position (RoPE applied), as llama.cpp stores them.
    pub post_rope: bool,
}

impl StoredForm {
    /// llama.cpp's rotations for this head size; an error when it would not rotate.
    pub fn llama_cpp_rotation(head_dim: usize) -> Result<(Hadamard, Hadamard), String> {
        match (
            Hadamard::llama_cpp_keys(head_dim),
            Hadamard::llama_cpp_values(head_dim),
        ) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(format!(
                "rot needs head_dim to be a multiple of 64 (as llama.cpp), got {head_dim}"
            )),
        }
    }

    /// The suffix of the spec string that names this form, e.g. `,rot,post-rope`.
    pub fn spec_suffix(&self) -> String {
        let mut s = String::new();
        if self.key_rotation.is_some() {
            s += ",rot";
        }
        if self.post_rope {
            s += ",post-rope";
        }
        s
    }

    /// Brings a head vector at position `pos` into its stored form.
    pub fn to_stored(&self, part: Part, rope: &Rope, pos: usize, x: &mut [f32]) {
        if part == Part::Keys && self.post_rope {
            rope.rotate(x, pos);
        }
        if let Some(h) = self.rotation(part) {
            h.apply(x);
        }
    }

    /// Inverse of [`StoredForm::to_stored`]: back to the pre-RoPE head vector.
    pub fn from_stored(&self, part: Part, rope: &Rope, pos: usize, x: &mut [f32]) {
        if let Some(h) = self.rotation(part) {
            h.apply(x);
        }
        if part == Part::Keys && self.post_rope {
            rope.unrotate(x, pos);
        }
    }

    fn rotation(&self, part: Part) -> Option<Hadamard> {
        match part {
            Part::Keys => self.key_rotation,
            Part::Values => self.value_rotation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RopeLayout;

    #[test]
    fn stored_form_round_trips() {
        let rope = Rope::new(64, 10000.0, 16, RopeLayout::HalfSplit);
        let (k, v) = StoredForm::llama_cpp_rotation(64).unwrap();
        let form = StoredForm {
            key_rotation: Some(k),
            value_rotation: Some(v),
            post_rope: true,
        };
        assert_eq!(form.spec_suffix(), ",rot,post-rope");
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).cos()).collect();
        for part in [Part::Keys, Part::Values] {
            let mut y = x.clone();
            form.to_stored(part, &rope, 11, &mut y);
            assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3));
            form.from_stored(part, &rope, 11, &mut y);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5);
            }
        }
        assert!(StoredForm::llama_cpp_rotation(80).is_err());
    }
}
