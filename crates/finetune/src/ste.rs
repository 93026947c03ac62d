//! The RVQ quantizer inside the training graph. Forward: each head vector becomes its RVQ
//! reconstruction (scale × decoded codes, exactly what the cache will return). Backward: the
//! straight-through estimator passes the gradient to the unquantized vector unchanged. The
//! commitment loss Σ_k mean((x/s − sg(x̂_≤k))²) over stages k pulls each vector towards its
//! reconstruction after k stages (in the quantizer's own space: rotated, grouped, scaled by the
//! vector's stored scale s, which is held constant). Codebooks have no gradient: they follow
//! the vectors by EMA, as in calibration.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rvq::rng::SplitMix64;
use rvq::{EmaCodebooks, Rvq, TrainConfig, VectorLayout};

pub struct PartQuantizer {
    pub rvq: Rvq,
    pub layout: VectorLayout,
    pub ema: EmaCodebooks,
    /// [hd, hd]: x ↦ the quantizer's grouped (and rotated) layout, as a matrix so the
    /// commitment loss stays differentiable in x.
    to_groups: Tensor,
    ema_config: TrainConfig,
    rng: SplitMix64,
}

impl PartQuantizer {
    /// `ema` starts from calibration's codebooks as if each code had been seen `initial_count`
    /// times (a fresh state unless resuming).
    pub fn new(rvq: Rvq, layout: VectorLayout, ema: EmaCodebooks, decay: f32) -> Result<Self> {
        let hd = layout.vector_dim;
        if rvq.dim() != layout.group_dim {
            bail!(
                "quantizer of dim {} for groups of {}",
                rvq.dim(),
                layout.group_dim
            );
        }
        // Row i = where unit vector e_i lands: rotation (if any), then the split into groups.
        let mut m = vec![0f32; hd * hd];
        let mut e = vec![0f32; hd];
        for i in 0..hd {
            e.fill(0.0);
            e[i] = 1.0;
            if let Some(h) = layout.rotation {
                h.apply(&mut e);
            }
            layout.split(&e, &mut m[i * hd..(i + 1) * hd]);
        }
        let ema_config = TrainConfig {
            dim: rvq.dim(),
            size: rvq.size(),
            stages: rvq.stages(),
            decay,
            ..TrainConfig::paper()
        };
        Ok(Self {
            to_groups: Tensor::from_vec(m, (hd, hd), &Device::Cpu)?,
            rvq,
            layout,
            ema,
            ema_config,
            rng: SplitMix64::new(0),
        })
    }

    /// `x` [n, hd] (in the graph) → (x̂ with the straight-through gradient [n, hd], the
    /// commitment loss summed over stages).
    pub fn quantize(&mut self, x: &Tensor, update_codebooks: bool) -> Result<(Tensor, Tensor)> {
        let (n, hd) = x.dims2()?;
        let (d, stages) = (self.layout.group_dim, self.rvq.stages());
        let groups_per_vector = self.layout.groups();
        let values = x.flatten_all()?.to_vec1::<f32>()?;
        let (mut groups, scales) = self.layout.to_groups(&values)?; // [n·G, d], [n]
        let mut codes = vec![0u16; n * groups_per_vector * stages];
        self.rvq.encode(&groups, 1, &mut codes)?;
        // What the cache returns, and the straight-through estimate x + sg(x̂ − x).
        let mut decoded = vec![0f32; n * hd];
        self.layout
            .decode_rows(&self.rvq, &scales, &codes, &mut decoded);
        let shift: Vec<f32> = decoded.iter().zip(&values).map(|(a, b)| a - b).collect();
        let quantized = (x + Tensor::from_vec(shift, (n, hd), &Device::Cpu)?)?;

        // Commitment: the grouped, scaled input against each stage's running reconstruction.
        let inv_scale: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
        let inv_scale = Tensor::from_vec(inv_scale, (n, 1), &Device::Cpu)?;
        let grouped = x.matmul(&self.to_groups)?.broadcast_mul(&inv_scale)?; // [n, hd]
        let mut partial = vec![0f32; n * hd];
        let mut commitment = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?;
        for st in 0..stages {
            let book = self.rvq.codebook(st);
            for (j, p) in partial.chunks_exact_mut(d).enumerate() {
                let code = codes[j * stages + st] as usize;
                for (a, w) in p.iter_mut().zip(&book[code * d..(code + 1) * d]) {
                    *a += w;
                }
            }
            let target = Tensor::from_vec(partial.clone(), (n, hd), &Device::Cpu)?;
            commitment = (commitment + (&grouped - target)?.sqr()?.mean_all()?)?;
        }
        if update_codebooks {
            // The greedy codes above are the EMA step's assignments: reuse them.
            self.ema.step_with_codes(
                &mut self.rvq,
                &mut groups,
                &codes,
                &self.ema_config,
                &mut self.rng,
            );
        }
        Ok((quantized, commitment))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rvq::Grouping;

    fn quantizer(grouping: Grouping, seed: u64) -> PartQuantizer {
        let (d, c, k, hd) = (4, 8, 3, 8);
        let mut rng = SplitMix64::new(seed);
        let books = (0..k)
            .map(|s| (0..c * d).map(|_| rng.normal() * 0.5f32.powi(s)).collect())
            .collect();
        let rvq = Rvq::from_codebooks(d, c, books).unwrap();
        let layout = VectorLayout::new(hd, d, grouping, true).unwrap();
        let ema = EmaCodebooks::new(&rvq, 4.0);
        PartQuantizer::new(rvq, layout, ema, 0.99).unwrap()
    }

    /// The forward value is exactly the decoded reconstruction (what the cache stores).
    #[test]
    fn forward_is_the_reconstruction() {
        let mut q = quantizer(Grouping::Strided, 1);
        let x: Vec<f32> = (0..24).map(|i| ((i * 7) as f32).sin()).collect();
        let t = Tensor::from_vec(x.clone(), (3, 8), &Device::Cpu).unwrap();
        let (xq, _) = q.quantize(&t, false).unwrap();
        let (scales, codes) = q.layout.encode(&q.rvq, &x, 1).unwrap();
        let mut want = vec![0f32; 24];
        q.layout.decode_rows(&q.rvq, &scales, &codes, &mut want);
        let got = xq.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// Gradient check of the straight-through path: with the codes fixed (they are piecewise
    /// constant in x), loss(x) = Σ w·(x + c) + β·Σ_k mean((x·M/s − P_k)²) is smooth, and
    /// autograd must match central finite differences of it computed here by hand.
    #[test]
    fn straight_through_gradient_matches_finite_differences() {
        for grouping in [Grouping::Strided, Grouping::Contiguous] {
            let mut q = quantizer(grouping, 2);
            let (n, hd) = (2, 8);
            let x0: Vec<f32> = (0..n * hd).map(|i| ((i * 5 + 1) as f32).cos()).collect();
            let w: Vec<f32> = (0..n * hd).map(|i| (i as f32 * 0.3).sin()).collect();
            let beta = 0.25;
            let dev = Device::Cpu;
            let var = Var::from_vec(x0.clone(), (n, hd), &dev).unwrap();
            let (xq, com) = q.quantize(var.as_tensor(), false).unwrap();
            let wt = Tensor::from_vec(w.clone(), (n, hd), &dev).unwrap();
            let loss = ((xq * &wt).unwrap().sum_all().unwrap() + (com * beta).unwrap()).unwrap();
            let grad = loss.backward().unwrap();
            let grad = grad.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let grad = grad.to_vec1::<f32>().unwrap();

            // The same surrogate in f64, codes and scales frozen at x0.
            let (groups0, scales) = q.layout.to_groups(&x0).unwrap();
            let stages = q.rvq.stages();
            let mut codes = vec![0u16; groups0.len() / 4 * stages];
            q.rvq.encode(&groups0, 1, &mut codes).unwrap();
            let surrogate = |x: &[f64]| -> f64 {
                let linear: f64 = x.iter().zip(&w).map(|(a, b)| a * *b as f64).sum();
                let mut com = 0.0;
                let mut partial = vec![0f64; n * hd];
                for st in 0..stages {
                    for (j, p) in partial.chunks_exact_mut(4).enumerate() {
                        let cw = q.rvq.codeword(st, codes[j * stages + st] as usize);
                        p.iter_mut().zip(cw).for_each(|(a, c)| *a += *c as f64);
                    }
                    let mut sum = 0.0;
                    for v in 0..n {
                        for g in 0..hd / 4 {
                            for jj in 0..4 {
                                let xi = x[v * hd + q.layout.channel(g, jj)] / scales[v] as f64;
                                sum += (xi - partial[v * hd + g * 4 + jj]).powi(2);
                            }
                        }
                    }
                    com += sum / (n * hd) as f64;
                }
                linear + beta * com
            };
            let h = 1e-3;
            for i in 0..n * hd {
                let mut up: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
                let mut down = up.clone();
                up[i] += h;
                down[i] -= h;
                let fd = (surrogate(&up) - surrogate(&down)) / (2.0 * h);
                assert!(
                    (grad[i] as f64 - fd).abs() < 1e-3 * (1.0 + fd.abs()),
                    "{grouping:?} x[{i}]: autograd {} vs finite differences {fd}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn ema_updates_move_codebooks_only_when_asked() {
        let mut q = quantizer(Grouping::Contiguous, 3);
        let x = Tensor::from_vec(
            (0..64).map(|i| (i as f32 * 0.9).sin()).collect::<Vec<_>>(),
            (8, 8),
            &Device::Cpu,
        )
        .unwrap();
        let before = q.rvq.codebook(0).to_vec();
        q.quantize(&x, false).unwrap();
        assert_eq!(q.rvq.codebook(0), before.as_slice());
        q.quantize(&x, true).unwrap();
        assert_ne!(q.rvq.codebook(0), before.as_slice());
    }
}
