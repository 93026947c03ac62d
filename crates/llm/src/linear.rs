//! A dense linear layer on candle's matmul.

use crate::error::Result;
use candle_core::Tensor;

pub struct Linear {
    /// [out, in]
    weight: Tensor,
    out_dim: usize,
    in_dim: usize,
}

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

    /// `x` [rows, in] → [rows, out]
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        debug_assert_eq!(x.len(), rows * self.in_dim);
        let x = Tensor::from_slice(x, (rows, self.in_dim), self.weight.device())?;
        let y = x.matmul(&self.weight.t()?)?; // [rows, out]
        Ok(y.flatten_all()?.to_vec1::<f32>()?)
    }
}
