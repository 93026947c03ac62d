//! A dense linear layer on candle's matmul.

use crate::error::Result;
use candle_core::Tensor;

pub struct Linear {
    /// [out, in]
    weight: Tensor,
    out_dim: usize,
    in_dim: usize,
}

/// Output features below which a single row is not split between two threads (the hand-over
/// would cost more than the half it saves).
const MIN_SPLIT_OUT: usize = 128;

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        let (out_dim, in_dim) = weight.dims2().expect("linear weights are 2-D");
        Self {
            weight,
            out_dim,
            in_dim,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x` [rows, in] → [rows, out]. A single row (a decode step) is a matrix-vector product,
    /// which candle runs on one thread: the two halves of the output features run as two
    /// products on rayon's threads instead (a split fixed by the shapes; outputs may differ from
    /// one pass in the last bits, as the kernel's blocking follows the rows it is given).
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), rows * self.in_dim);
        let x = Tensor::from_slice(x, (rows, self.in_dim), self.weight.device())?;
        if rows == 1 && self.out_dim >= MIN_SPLIT_OUT {
            let half = self.out_dim / 2;
            // Row ranges of [out, in] are views, not copies.
            let product = |first: usize, len: usize| -> Result<Vec<f32>> {
                let w = self.weight.narrow(0, first, len)?;
                Ok(x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?)
            };
            let (a, b) = rayon::join(|| product(0, half), || product(half, self.out_dim - half));
            let mut y = a?;
            y.extend(b?);
            return Ok(y);
        }
        let y = x.matmul(&self.weight.t()?)?; // [rows, out]
        Ok(y.flatten_all()?.to_vec1::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_split_row_is_the_product_within_rounding_and_the_same_every_call() {
        let (out, inp) = (301, 96); // odd: unequal halves
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let x: Vec<f32> = (0..inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let weight = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
        let linear = Linear::new(weight);
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
}
