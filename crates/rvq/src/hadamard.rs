//! Orthonormal Walsh–Hadamard rotation of vectors, block by block, as llama.cpp applies it to
//! quantized KV caches: the rotation spreads outlier channels over the whole block, so a
//! quantizer that shares one scale (or one codebook) across channels loses less on the others.

/// Rotation by the Sylvester Hadamard matrix H_n / sqrt(n) (H_1 = [1], H_2s = [[H, H], [H, −H]])
/// on consecutive blocks of n channels. H_n / sqrt(n) is symmetric and orthonormal: its own inverse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Hadamard {
    block: usize,
}

/// llama.cpp rotates only head vectors whose length is a multiple of this.
const LLAMA_CPP_MIN_BLOCK: usize = 64;

impl Hadamard {
    /// A rotation on blocks of `block` channels; `block` must be a power of two.
    pub fn new(block: usize) -> Result<Self, String> {
        if block == 0 || !block.is_power_of_two() {
            return Err(format!("Hadamard block {block} is not a power of two"));
        }
        Ok(Self { block })
    }

    /// llama.cpp's rotation of keys: blocks of the largest power of two dividing `head_dim`.
    /// `None` when `head_dim` is not a multiple of 64 (llama.cpp does not rotate then).
    pub fn llama_cpp_keys(head_dim: usize) -> Option<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(LLAMA_CPP_MIN_BLOCK) {
            return None;
        }
        Some(Self {
            block: 1 << head_dim.trailing_zeros(),
        })
    }

    /// llama.cpp's rotation of values: blocks of 64 (smaller blocks measured better for V there).
    pub fn llama_cpp_values(head_dim: usize) -> Option<Self> {
        (head_dim > 0 && head_dim.is_multiple_of(LLAMA_CPP_MIN_BLOCK)).then_some(Self {
            block: LLAMA_CPP_MIN_BLOCK,
        })
    }

    /// One rotation over the largest power-of-two block dividing `dim` (the whole vector when
    /// `dim` is a power of two).
    pub fn largest_block(dim: usize) -> Option<Self> {
        (dim > 0).then(|| Self {
            block: 1 << dim.trailing_zeros(),
        })
    }

    pub fn block(&self) -> usize {
        self.block
    }

    /// Rotates `x` in place; `x.len()` must be a multiple of the block. Applying it twice restores
    /// `x` (up to rounding).
    pub fn apply(&self, x: &mut [f32]) {
        debug_assert!(x.len().is_multiple_of(self.block));
        let norm = 1.0 / (self.block as f32).sqrt();
        for chunk in x.chunks_exact_mut(self.block) {
            // Fast Walsh–Hadamard transform: log2(n) butterfly passes give H_n · chunk.
            let mut h = 1;
            while h < self.block {
                for start in (0..self.block).step_by(2 * h) {
                    for j in start..start + h {
                        let (a, b) = (chunk[j], chunk[j + h]);
                        chunk[j] = a + b;
                        chunk[j + h] = a - b;
                    }
                }
                h *= 2;
            }
            for v in chunk.iter_mut() {
                *v *= norm;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H_n / sqrt(n) built the way llama.cpp's `ggml_gen_hadamard` builds it (row-major).
    fn reference_matrix(n: usize) -> Vec<f64> {
        let mut m = vec![0f64; n * n];
        m[0] = 1.0 / (n as f64).sqrt();
        let mut s = 1;
        while s < n {
            for i in 0..s {
                for j in 0..s {
                    let val = m[i * n + j];
                    m[(i + s) * n + j] = val;
                    m[i * n + j + s] = val;
                    m[(i + s) * n + j + s] = -val;
                }
            }
            s *= 2;
        }
        m
    }

    #[test]
    fn fast_transform_equals_the_matrix_product_and_is_its_own_inverse() {
        for n in [1, 2, 8, 64, 128] {
            let h = Hadamard::new(n).unwrap();
            let m = reference_matrix(n);
            let x: Vec<f32> = (0..2 * n)
                .map(|i| ((i * 7 + 3) as f32 * 0.41).sin())
                .collect();
            let mut y = x.clone();
            h.apply(&mut y);
            for b in 0..2 {
                for i in 0..n {
                    let want: f64 = (0..n).map(|j| m[i * n + j] * x[b * n + j] as f64).sum();
                    assert!((y[b * n + i] as f64 - want).abs() < 1e-5, "n {n} row {i}");
                }
            }
            h.apply(&mut y);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn llama_cpp_blocks() {
        assert_eq!(Hadamard::llama_cpp_keys(64).unwrap().block(), 64);
        assert_eq!(Hadamard::llama_cpp_keys(128).unwrap().block(), 128);
        assert_eq!(Hadamard::llama_cpp_keys(192).unwrap().block(), 64);
        assert_eq!(Hadamard::llama_cpp_keys(256).unwrap().block(), 256);
        assert_eq!(Hadamard::llama_cpp_values(256).unwrap().block(), 64);
        assert!(Hadamard::llama_cpp_keys(96).is_none());
        assert!(Hadamard::llama_cpp_values(80).is_none());
        assert!(Hadamard::new(48).is_err());
    }
}
