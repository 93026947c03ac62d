//! AdamW with its moments in the open (candle-nn's keeps them private), so a checkpoint can
//! save them and a resumed run takes exactly the step an uninterrupted one would; and the
//! learning-rate schedule: linear warmup, then cosine decay to zero.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's AdamW defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: usize,
    /// First and second moments, one per parameter, in the parameters' order.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[(String, Var)]) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(Self {
            config,
            step: 0,
            m: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<Result<_, _>>()?,
            v: params
                .iter()
                .map(|(_, p)| zeros(p))
                .collect::<Result<_, _>>()?,
        })
    }

    /// θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε), with bias-corrected moments.
    pub fn update(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != params.len() {
            bail!("{} gradients for {} parameters", grads.len(), params.len());
        }
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let (fix1, fix2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, ((_, p), g)) in params.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&self.m[i] / fix1)?;
            let v_hat = (&self.v[i] / fix2)?;
            let step = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * c.weight_decay))?;
            p.set(&(decayed - (step * lr)?)?)?;
        }
        Ok(())
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup over `warmup` steps to `peak`,
/// then cosine decay to 0 at `total`.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let lr = |s| learning_rate(s, 100, 10, 1e-3);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(55) - 0.5e-3).abs() < 1e-9);
        assert!(lr(100).abs() < 1e-12);
    }

    /// One step against the update written out by hand for a scalar parameter.
    #[test]
    fn first_step_matches_the_formula() {
        let p = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let params = vec![("p".to_string(), p.clone())];
        let mut opt = AdamW::new(AdamWConfig::default(), &params).unwrap();
        let g = Tensor::new(&[0.5f32, -0.1], &Device::Cpu).unwrap();
        opt.update(&params, &[g], 0.1).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        // Step 1: m̂ = g, v̂ = g², so the step is lr·g/(|g| + ε) = ±lr; decay θ·(1 − lr·0.01).
        let want = [1.0 * (1.0 - 0.001) - 0.1, -2.0 * (1.0 - 0.001) + 0.1];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
