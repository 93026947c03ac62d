//! Nearest-codeword search: which kernel runs, decided here for every encoder and the trainer.
//!
//! - [`Kernel::Lanes`] ([`crate::lanes`]): a copy of the codebook laid out in lanes of 16
//!   codewords, up to 6 vectors × 16 codewords accumulated in registers. d = 32 with AVX2, and a
//!   batch of at least [`crate::lanes::MIN_BATCH`] vectors, which pays for the copy. Codebooks
//!   held in i8 search such batches with [`crate::vnni_search`] where AVX-512 VNNI runs (no
//!   copy, and the codes a decode step would give each vector).
//! - [`Kernel::Rows`] ([`crate::row_search`]): the codebook as it is held (f32 or f16), two
//!   vectors at a time — a decode step's few vectors, where no copy pays. Codebooks held in i8
//!   go through [`crate::vnni_search`] instead where AVX-512 VNNI runs, with the same codes.
//! - [`Kernel::Matmul`] ([`crate::kernels`]): one blocked matrix product per block of vectors,
//!   then an argmin; any d, any CPU.
//!
//! Each gives the codes of the matrix-product search (ties to the lower index); the tests of
//! each module check it at every SIMD level.

/// A nearest-codeword kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Matmul,
    Lanes,
    Rows,
}

/// The kernel that searches `n` vectors of dimension `d`.
pub fn kernel(d: usize, n: usize) -> Kernel {
    if !crate::lanes::available(d) {
        Kernel::Matmul
    } else if n >= crate::lanes::MIN_BATCH {
        Kernel::Lanes
    } else {
        Kernel::Rows
    }
}
