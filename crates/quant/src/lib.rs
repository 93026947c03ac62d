//! GGUF's block-quantized weights, kept as the file stores them, and their products with
//! activations.
//!
//! llama.cpp's formats (Q4_0 … Q8_0, Q2_K … Q8_K) each pack a block of 32 or 256 weights into
//! small integer codes with one or two levels of scales; [`legacy`] and [`kquants`] read them
//! (one [`format::Format`] per type). A [`QMatrix`] is a weight matrix in one of these formats;
//! [`QMatrix::matmul`] quantizes the activations per 32 values to bytes ([`Q8Rows`]) and takes
//! every product as an exact integer dot product per chunk of 32 weights, scaled once per chunk
//! ([`dot`]): AVX-512 VNNI, AVX2 or portable code, chosen at run time ([`simd`]). Decode steps
//! read 0.6–1.1 bytes per weight instead of an f32 copy's 4.
//!
//! Float types (F32, F16, BF16) have no integer kernel: callers keep them as f32.

mod activations;
mod dot;
mod format;
mod kquants;
mod legacy;

pub use activations::Q8Rows;
use format::Format;
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("{0:?} weights have no integer kernel")]
    NoKernel(WeightType),
    #[error("a row of {cols} weights is not a whole number of {ty:?} blocks of {block}")]
    PartialBlock {
        ty: WeightType,
        cols: usize,
        block: usize,
    },
    #[error("{ty:?} matrix [{rows}, {cols}] needs {needed} bytes at offset {start}, the data holds {len} (cut short?)")]
    OutOfData {
        ty: WeightType,
        rows: usize,
        cols: usize,
        start: usize,
        needed: usize,
        len: usize,
    },
}

/// The weight types of GGUF files (ggml's type ids in [`WeightType::from_ggml_id`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// What the kernels do for one integer type.
struct Kernel {
    elems: usize,
    bytes: usize,
    tile: dot::TileFn,
    lanes: dot::LanesFn,
    dequantize: fn(&[u8], &mut [f32]),
}

/// Weights `w = scale·code + offset` of whole blocks of `F`, into `out`: compiled for AVX2 (F16C
/// scales, vectorised codes) where the level allows, else portable.
fn dequantize<F: Format>(blocks: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= simd::Level::Avx2 {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2<F: Format>(blocks: &[u8], out: &mut [f32]) {
            dequantize_body::<F, true>(blocks, out)
        }
        // SAFETY: the level never exceeds what the CPU reports.
        return unsafe { avx2::<F>(blocks, out) };
    }
    dequantize_body::<F, false>(blocks, out)
}

#[inline(always)]
fn dequantize_body<F: Format, const F16C: bool>(blocks: &[u8], out: &mut [f32]) {
    let halves = F::ELEMS / format::HALF;
    let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
    for (block, out) in blocks
        .chunks_exact(F::BYTES)
        .zip(out.chunks_exact_mut(F::ELEMS))
    {
        F::params::<F16C>(block, &mut scale[..halves], &mut offset[..halves]);
        for (c, out) in out.chunks_exact_mut(format::CHUNK).enumerate() {
            let codes = F::codes(block, c);
            for (h, (out, codes)) in out
                .chunks_exact_mut(format::HALF)
                .zip(codes.chunks_exact(format::HALF))
                .enumerate()
            {
                let (s, o) = (scale[2 * c + h], offset[2 * c + h]);
                for (o_, &q) in out.iter_mut().zip(codes) {
                    *o_ = s * q as f32 + o;
                }
            }
        }
    }
}

const fn kernel<F: Format>() -> Kernel {
    Kernel {
        elems: F::ELEMS,
        bytes: F::BYTES,
        tile: dot::tile::<F>,
        lanes: dot::tile_lanes::<F>,
        dequantize: dequantize::<F>,
    }
}

impl WeightType {
    /// The type of ggml's type id `id`, or `None` for ids without weights we read.
    pub fn from_ggml_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    fn kernel(self) -> Option<&'static Kernel> {
        static Q4_0: Kernel = kernel::<legacy::Q4_0>();
        static Q4_1: Kernel = kernel::<legacy::Q4_1>();
        static Q5_0: Kernel = kernel::<legacy::Q5_0>();
        static Q5_1: Kernel = kernel::<legacy::Q5_1>();
        static Q8_0: Kernel = kernel::<legacy::Q8_0>();
        static Q2K: Kernel = kernel::<kquants::Q2K>();
        static Q3K: Kernel = kernel::<kquants::Q3K>();
        static Q4K: Kernel = kernel::<kquants::Q4K>();
        static Q5K: Kernel = kernel::<kquants::Q5K>();
        static Q6K: Kernel = kernel::<kquants::Q6K>();
        static Q8K: Kernel = kernel::<kquants::Q8K>();
        Some(match self {
            Self::Q4_0 => &Q4_0,
            Self::Q4_1 => &Q4_1,
            Self::Q5_0 => &Q5_0,
            Self::Q5_1 => &Q5_1,
            Self::Q8_0 => &Q8_0,
            Self::Q2K => &Q2K,
            Self::Q3K => &Q3K,
            Self::Q4K => &Q4K,
            Self::Q5K => &Q5K,
            Self::Q6K => &Q6K,
            Self::Q8K => &Q8K,
            Self::F32 | Self::F16 | Self::BF16 => return None,
        })
    }

    /// Whether [`QMatrix`] multiplies this type natively (every integer type does).
    pub fn has_kernel(self) -> bool {
        self.kernel().is_some()
    }

    /// Weights per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            t => {
                let k = t.kernel().expect("integer types have kernels");
                (k.elems, k.bytes)
            }
        }
    }

    /// Bytes of `elems` weights (a whole number of blocks), or `None` if not whole or too many.
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        let (e, b) = self.block();
        if !elems.is_multiple_of(e) {
            return None;
        }
        (elems / e).checked_mul(b)
    }
}

/// Bytes a [`QMatrix`] reads from: a memory-mapped file, or any owned buffer.
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A weight matrix [rows, cols] in an integer block format, stored row after row.
#[derive(Clone)]
pub struct QMatrix {
    ty: WeightType,
    rows: usize,
    cols: usize,
    bytes: Bytes,
    start: usize,
    kernel: &'static Kernel,
}

/// Weight rows per parallel task, at least: below this, handing a task over costs more than it
/// saves.
const MIN_TASK_ROWS: usize = 16;
/// The output of a product, shared by the tasks that each write their own weight rows' columns.
#[derive(Clone, Copy)]
struct Columns(*mut f32);

// SAFETY: the tasks write disjoint elements, and the buffer outlives them.
unsafe impl Send for Columns {}
unsafe impl Sync for Columns {}

impl Columns {
    /// A method, so that closures capture the whole wrapper and not its raw pointer.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Activation rows from which products take the batched kernel.
const LANES_FROM: usize = 3;

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, [{}, {}])", self.ty, self.rows, self.cols)
    }
}

impl QMatrix {
    /// The matrix whose blocks start at byte `start` of `bytes`.
    pub fn new(
        ty: WeightType,
        rows: usize,
        cols: usize,
        bytes: Bytes,
        start: usize,
    ) -> Result<Self, QuantError> {
        let kernel = ty.kernel().ok_or(QuantError::NoKernel(ty))?;
        if cols == 0 || !cols.is_multiple_of(kernel.elems) {
            return Err(QuantError::PartialBlock {
                ty,
                cols,
                block: kernel.elems,
            });
        }
        let len = (*bytes).as_ref().len();
        let needed = (cols / kernel.elems)
            .checked_mul(kernel.bytes)
            .and_then(|r| r.checked_mul(rows));
        match needed {
            Some(n) if start.checked_add(n).is_some_and(|end| end <= len) => {}
            _ => {
                return Err(QuantError::OutOfData {
                    ty,
                    rows,
                    cols,
                    start,
                    needed: needed.unwrap_or(usize::MAX),
                    len,
                })
            }
        }
        Ok(Self {
            ty,
            rows,
            cols,
            bytes,
            start,
            kernel,
        })
    }

    pub fn weight_type(&self) -> WeightType {
        self.ty
    }

    /// [rows, cols]
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.kernel.elems * self.kernel.bytes
    }

    /// Bytes the weights take.
    pub fn size_bytes(&self) -> usize {
        self.rows * self.row_bytes()
    }

    fn data(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.start..self.start + self.size_bytes()]
    }

    /// Row `r` as f32 ([cols]): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        (self.kernel.dequantize)(&self.data()[r * rb..(r + 1) * rb], out);
    }

    /// The whole matrix as f32 ([rows, cols]).
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0..self.rows)
    }

    /// Rows `rows` as f32 ([rows.len(), cols]), dequantized in parallel.
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * self.cols];
        self.dequantize_rows_into(rows, &mut out);
        out
    }

    /// [`dequantize_rows`](Self::dequantize_rows) into `out` ([rows.len(), cols]).
    pub fn dequantize_rows_into(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let rb = self.row_bytes();
        let data = &self.data()[rows.start * rb..rows.end * rb];
        out.par_chunks_mut(MIN_TASK_ROWS * self.cols)
            .zip(data.par_chunks(MIN_TASK_ROWS * rb))
            .for_each(|(out, blocks)| (self.kernel.dequantize)(blocks, out));
    }

    /// `x` [n, cols] → x·Wᵀ [n, rows], the activations quantized per 32 values to bytes.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        self.matmul_q8(&Q8Rows::quantize(x, self.cols))
    }

    /// As [`matmul`](Self::matmul) with activations quantized already (shared by the matrices
    /// that read the same input). Weight rows are split over rayon's threads.
    pub fn matmul_q8(&self, x: &Q8Rows) -> Vec<f32> {
        assert_eq!(x.cols, self.cols, "activation width");
        let n = x.rows;
        let level = simd::level();
        let rb = self.row_bytes();
        let tasks = 4 * rayon::current_num_threads();
        let per_task = self.rows.div_ceil(tasks).max(MIN_TASK_ROWS);
        // Both kernels give the same bits; the batched one is faster from a few rows on.
        let lanes = (dot::has_lanes(level) && n >= LANES_FROM).then(|| x.lanes());
        let width = lanes
            .as_ref()
            .map_or(n, |l| l.groups() * activations::LANES);
        // [rows, width]: each task writes the products of its weight rows, then moves them into
        // its columns of y ([n, rows]; one row alone needs no moving).
        let mut t = vec![0f32; self.rows * width];
        let mut y = if n == 1 {
            vec![]
        } else {
            vec![0f32; n * self.rows]
        };
        let columns = Columns(y.as_mut_ptr());
        let (rows, data) = (self.rows, self.data());
        t.par_chunks_mut(per_task * width)
            .enumerate()
            .for_each(|(i, out)| {
                let first = i * per_task;
                let w = &data[first * rb..(first + out.len() / width) * rb];
                match &lanes {
                    Some(lanes) => (self.kernel.lanes)(level, w, rb, lanes, out),
                    None => (self.kernel.tile)(level, w, rb, x, out),
                }
                if n > 1 {
                    for (j, products) in (first..).zip(out.chunks_exact(width)) {
                        for (r, &v) in products[..n].iter().enumerate() {
                            // SAFETY: y holds n·rows values, and column j is this task's alone.
                            unsafe { *columns.at(r * rows + j) = v };
                        }
                    }
                }
            });
        if n == 1 {
            t
        } else {
            y
        }
    }
}

#[cfg(test)]
mod tests;
