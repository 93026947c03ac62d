//! A linear layer: one or more weight matrices stacked on the output axis (q, k and v; gate and
//! up), each in its GGUF block format ([`quant::QMatrix`]) or in f32 on candle's matmul.

use crate::error::Result;
use candle_core::Tensor;
use quant::{Q8Rows, QMatrix};

/// One weight matrix [out, in].
#[derive(Clone)]
pub enum Weight {
    /// In its stored block format: integer dot products against 8-bit activations.
    Quant(QMatrix),
    /// f32 (the reference path, types without an integer kernel, finetuned tensors).
    Dense(Tensor),
}

impl Weight {
    /// [out, in]
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::Quant(m) => m.shape(),
            Self::Dense(t) => t.dims2().expect("dense weights are 2-D"),
        }
    }

    /// Bytes the weights take in memory.
    pub fn size_bytes(&self) -> usize {
        match self {
            Self::Quant(m) => m.size_bytes(),
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// Row `r` as f32: an embedding lookup.
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Quant(m) => m.dequantize_row(r, out),
            Self::Dense(t) => out.copy_from_slice(&t.get(r)?.to_vec1::<f32>()?),
        }
        Ok(())
    }
}

pub struct Linear {
    /// Stacked on the output axis, each [out_i, in].
    parts: Vec<Weight>,
    out_dim: usize,
    in_dim: usize,
}

/// Output features below which a single row is not split between two threads (the hand-over
/// would cost more than the half it saves).
const MIN_SPLIT_OUT: usize = 128;

impl Linear {
    /// Stacks `parts` (all with the same input width; an f32 reference stacks them into one
    /// tensor, so it runs as one product).
    pub fn new(parts: Vec<Weight>) -> Result<Self> {
        let in_dim = parts.first().map_or(0, |p| p.shape().1);
        assert!(
            parts.iter().all(|p| p.shape().1 == in_dim),
            "stacked weights share their input width"
        );
        let out_dim = parts.iter().map(|p| p.shape().0).sum();
        let parts = if parts.len() > 1 && parts.iter().all(|p| matches!(p, Weight::Dense(_))) {
            let tensors: Vec<Tensor> = parts
                .into_iter()
                .map(|p| match p {
                    Weight::Dense(t) => t,
                    Weight::Quant(_) => unreachable!("all parts are dense"),
                })
                .collect();
            vec![Weight::Dense(Tensor::cat(&tensors, 0)?)]
        } else {
            parts
        };
        Ok(Self {
            parts,
            out_dim,
            in_dim,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Bytes the weights take in memory.
    pub fn size_bytes(&self) -> usize {
        self.parts.iter().map(Weight::size_bytes).sum()
    }

    /// `x` [rows, in] → [rows, out].
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), rows * self.in_dim);
        let quantized = self.parts.iter().any(|p| matches!(p, Weight::Quant(_)));
        if quantized && rows >= DEQUANTIZED_ROWS {
            return self.dequantized_forward(x, rows);
        }
        // Quantized once for every block-format part.
        let mut q8: Option<Q8Rows> = None;
        let mut outputs = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            outputs.push(match part {
                Weight::Quant(m) => {
                    m.matmul_q8(q8.get_or_insert_with(|| Q8Rows::quantize(x, self.in_dim)))
                }
                Weight::Dense(w) => dense_forward(w, x, rows, self.in_dim)?,
            });
        }
        if outputs.len() == 1 {
            return Ok(outputs.pop().expect("one part"));
        }
        // [rows, out]: each row the parts' outputs side by side.
        let mut y = Vec::with_capacity(rows * self.out_dim);
        for r in 0..rows {
            for (part, out) in self.parts.iter().zip(&outputs) {
                let n = part.shape().0;
                y.extend_from_slice(&out[r * n..(r + 1) * n]);
            }
        }
        Ok(y)
    }

    /// Output features `range` of the stacked weights as f32, into `w` ([range.len(), in]).
    fn f32_rows_into(&self, range: std::ops::Range<usize>, w: &mut [f32]) -> Result<()> {
        let mut first = 0;
        for part in &self.parts {
            let n = part.shape().0;
            let (a, b) = (range.start.max(first), range.end.min(first + n));
            if a < b {
                let dst = &mut w[(a - range.start) * self.in_dim..(b - range.start) * self.in_dim];
                match part {
                    Weight::Quant(m) => m.dequantize_rows_into(a - first..b - first, dst),
                    Weight::Dense(t) => dst.copy_from_slice(
                        &t.narrow(0, a - first, b - a)?
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    ),
                }
            }
            first += n;
        }
        Ok(())
    }

    /// `x` [rows, in] → [rows, out] by an f32 matrix product (`gemm`, as candle's matmul) on the
    /// stacked weights dequantized tile by tile into a buffer this thread reuses: many rows
    /// amortise the dequantization, and the f32 product is faster there than the integer
    /// kernels. Each tile's products go straight to their columns of the output.
    fn dequantized_forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        thread_local! {
            static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (out_dim, in_dim) = (self.out_dim, self.in_dim);
        let mut y = vec![0f32; rows * out_dim]; // [rows, out]
        let threads = rayon::current_num_threads();
        TILE.with(|tile| -> Result<()> {
            let mut tile = tile.borrow_mut();
            for first in (0..out_dim).step_by(TILE_ROWS) {
                let n = TILE_ROWS.min(out_dim - first);
                if tile.len() < n * in_dim {
                    tile.resize(n * in_dim, 0.0);
                }
                let w = &mut tile[..n * in_dim]; // [n, in]
                self.f32_rows_into(first..first + n, w)?;
                // SAFETY: y is [rows, out_dim] and the tile's n columns start at `first`; x is
                // [rows, in]; w is [n, in], read as its transpose [in, n].
                unsafe {
                    gemm::gemm(
                        rows,
                        n,
                        in_dim,
                        y.as_mut_ptr().add(first),
                        1,
                        out_dim as isize,
                        false,
                        x.as_ptr(),
                        1,
                        in_dim as isize,
                        w.as_ptr(),
                        in_dim as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    );
                }
            }
            Ok(())
        })?;
        Ok(y)
    }
}

/// Activation rows from which block-format weights are dequantized to f32 tiles and multiplied
/// by `gemm` in f32: below it the batched integer kernels are faster (measured with `ppl`
/// windows of 128 / 256 / 512 tokens: 1.2–1.3× / 1.06–1.09× / even), so a perplexity window of
/// 512 tokens or more gives the f32 weights' bits, and shorter passes (multiple-choice
/// continuations, server chunks) every row the same bits whatever rows are beside it.
pub const DEQUANTIZED_ROWS: usize = 512;
/// Output features dequantized at a time: bounds the f32 copy (8192 × 576 × 4 B ≈ 19 MB for
/// SmolLM2's tied head) while each layer's stacked matrices stay one product.
const TILE_ROWS: usize = 8192;

/// `x` [rows, in] times f32 weights `w` [out, in]ᵀ. A single row (a decode step) is a
/// matrix-vector product, which candle runs on one thread: the two halves of the output features
/// run as two products on rayon's threads instead (a split fixed by the shapes; outputs may
/// differ from one pass in the last bits, as the kernel's blocking follows the rows it is given).
fn dense_forward(w: &Tensor, x: &[f32], rows: usize, in_dim: usize) -> Result<Vec<f32>> {
    let x = Tensor::from_slice(x, (rows, in_dim), w.device())?;
    let out_dim = w.dims2()?.0;
    if rows == 1 && out_dim >= MIN_SPLIT_OUT {
        let half = out_dim / 2;
        // Row ranges of [out, in] are views, not copies.
        let product = |first: usize, len: usize| -> Result<Vec<f32>> {
            let w = w.narrow(0, first, len)?;
            Ok(x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (a, b) = rayon::join(|| product(0, half), || product(half, out_dim - half));
        let mut y = a?;
        y.extend(b?);
        return Ok(y);
    }
    let y = x.matmul(&w.t()?)?; // [rows, out]
    Ok(y.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use quant::WeightType;
    use std::sync::Arc;

    #[test]
    fn a_split_row_is_the_product_within_rounding_and_the_same_every_call() {
        let (out, inp) = (301, 96); // odd: unequal halves
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let x: Vec<f32> = (0..inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let weight = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
        let linear = Linear::new(vec![Weight::Dense(weight)]).unwrap();
        let split = linear.forward(&x, 1).unwrap();
        assert_eq!(split.len(), out);
        for (j, &y) in split.iter().enumerate() {
            let row = &w[j * inp..(j + 1) * inp];
            let exact: f64 = row.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let size: f64 = row
                .iter()
                .zip(&x)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            assert!(
                (y as f64 - exact).abs() <= 1e-5 * size,
                "output {j}: {y} vs {exact}"
            );
        }
        // The split depends on the shapes only: the same bits every call.
        let again = linear.forward(&x, 1).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&split), bits(&again));
    }

    #[test]
    fn stacked_parts_of_mixed_kinds_give_each_part_s_own_product() {
        // Q8_0 blocks: d = 1/64 (f16 0x2400), codes i - 16.
        let (rows_q, rows_d, inp) = (3, 2, 64);
        let mut blocks = Vec::new();
        for b in 0..rows_q * inp / 32 {
            blocks.extend_from_slice(&0x2400u16.to_le_bytes());
            blocks.extend((0..32).map(|i| ((i + b) as i8 - 16) as u8));
        }
        let bytes: quant::Bytes = Arc::new(blocks);
        let q = QMatrix::new(WeightType::Q8_0, rows_q, inp, bytes, 0).unwrap();
        let dense: Vec<f32> = (0..rows_d * inp).map(|i| (i as f32 * 0.1).sin()).collect();
        let d = Tensor::from_vec(dense.clone(), (rows_d, inp), &Device::Cpu).unwrap();
        let linear = Linear::new(vec![Weight::Quant(q.clone()), Weight::Dense(d.clone())]).unwrap();
        assert_eq!(linear.out_dim(), rows_q + rows_d);
        let x: Vec<f32> = (0..2 * inp).map(|i| (i as f32 * 0.05).cos()).collect();
        let y = linear.forward(&x, 2).unwrap();
        let yq = q.matmul(&x);
        let yd = dense_forward(&d, &x, 2, inp).unwrap();
        for r in 0..2 {
            let row = &y[r * 5..(r + 1) * 5];
            assert_eq!(row[..3], yq[r * 3..(r + 1) * 3]);
            assert_eq!(row[3..], yd[r * 2..(r + 1) * 2]);
        }
    }

    #[test]
    fn many_rows_multiply_the_dequantized_stack_in_f32() {
        // Rows at and past DEQUANTIZED_ROWS: the product of the f32 weights, parts side by side.
        let (rows_q, rows_d, inp, n) = (3, 2, 64, DEQUANTIZED_ROWS + 3);
        let mut blocks = Vec::new();
        for b in 0..rows_q * inp / 32 {
            blocks.extend_from_slice(&0x2400u16.to_le_bytes());
            blocks.extend((0..32).map(|i| ((i * 3 + b) as i8 - 40) as u8));
        }
        let q = QMatrix::new(WeightType::Q8_0, rows_q, inp, Arc::new(blocks), 0).unwrap();
        let dense: Vec<f32> = (0..rows_d * inp).map(|i| (i as f32 * 0.1).sin()).collect();
        let d = Tensor::from_vec(dense.clone(), (rows_d, inp), &Device::Cpu).unwrap();
        let linear = Linear::new(vec![Weight::Quant(q.clone()), Weight::Dense(d)]).unwrap();
        let x: Vec<f32> = (0..n * inp).map(|i| (i as f32 * 0.05).cos()).collect();
        let y = linear.forward(&x, n).unwrap();
        let mut w = q.dequantize();
        w.extend(&dense);
        for r in 0..n {
            for j in 0..rows_q + rows_d {
                let terms = (0..inp).map(|i| w[j * inp + i] as f64 * x[r * inp + i] as f64);
                let exact: f64 = terms.clone().sum();
                let size: f64 = terms.map(f64::abs).sum();
                let got = y[r * (rows_q + rows_d) + j] as f64;
                assert!((got - exact).abs() <= 1e-5 * size, "row {r}, output {j}");
            }
        }
    }
}
