//! Element-wise pieces of the forward pass, on plain slices (cheap next to the matmuls).

/// RMSNorm of each row of `x` ([rows, weight.len()]) times `weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * inv * w));
    }
    out
}

/// In place: RMSNorm of each `weight.len()`-long row of `x` times `weight` (per-head q/k norms).
pub fn rms_norm_rows(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for row in x.chunks_exact_mut(d) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        row.iter_mut().zip(weight).for_each(|(v, w)| *v *= inv * w);
    }
}

/// In place: adds `bias` to every row of `x` ([rows, bias.len()]).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// SwiGLU: rows of `gate_up` are [gate (ffn) | up (ffn)]; returns silu(gate) * up, [rows, ffn].
pub fn silu_mul(gate_up: &[f32], ffn: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * ffn) {
        let (gate, up) = row.split_at(ffn);
        out.extend(gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u));
    }
    out
}

/// GELU, tanh approximation (as ggml and PyTorch's `gelu(approximate="tanh")`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// GeGLU: rows of `gate_up` are [gate (ffn) | up (ffn)]; returns gelu(gate) * up, [rows, ffn].
pub fn gelu_tanh_mul(gate_up: &[f32], ffn: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks_exact(2 * ffn) {
        let (gate, up) = row.split_at(ffn);
        out.extend(gate.iter().zip(up).map(|(&g, u)| gelu_tanh(g) * u));
    }
    out
}

/// log-softmax of one row of logits at `target`: the token's log-probability.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_closed_form() {
        // Row [3, 4]: mean square 12.5 → each value / sqrt(12.5).
        let y = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let s = 12.5f32.sqrt();
        assert!((y[0] - 3.0 / s).abs() < 1e-6 && (y[1] - 8.0 / s).abs() < 1e-6);
    }

    #[test]
    fn silu_mul_closed_form() {
        let y = silu_mul(&[0.0, 1.0, 5.0, 2.0], 2);
        assert_eq!(y[0], 0.0);
        assert!((y[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_rows_matches_rms_norm() {
        let x: Vec<f32> = (0..12).map(|i| i as f32 - 5.0).collect();
        let w = [0.5f32, 1.0, 2.0];
        let mut y = x.clone();
        rms_norm_rows(&mut y, &w, 1e-6);
        assert_eq!(y, rms_norm(&x, &w, 1e-6));
    }

    #[test]
    fn gelu_tanh_closed_form() {
        assert_eq!(gelu_tanh(0.0), 0.0);
        // Reference values of PyTorch's gelu(approximate="tanh").
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_tanh(-2.0) - (-0.045_402_3)).abs() < 1e-5);
        let y = gelu_tanh_mul(&[1.0, 3.0], 1);
        assert!((y[0] - 3.0 * 0.841_192).abs() < 1e-5);
    }

    #[test]
    fn log_prob_is_normalised() {
        let l = [1.0f32, 2.0, 3.0];
        let total: f64 = (0..3).map(|t| log_prob(&l, t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((log_prob(&[0.0, 0.0], 1) - 0.5f64.ln()).abs() < 1e-12);
    }
}
