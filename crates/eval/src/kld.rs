//! How far a cache moves the model's next-token distribution from a reference cache's, on the
//! same tokens, as `llama-perplexity --kl-divergence` measures it: per scored token the KL
//! divergence KL(P_ref ‖ P_cache) and whether the top token is the same. Perplexity alone ranks
//! caches unreliably (errors that raise some tokens' likelihood and lower others' cancel in it).

use crate::ppl::{checked_plan, window_tokens, PplOptions};
use crate::progress;
use anyhow::{bail, Result};
use kvcache::KvCache;
use llm::Model;
use serde::Serialize;

/// The divergence of one cache from the reference over the scored tokens.
#[derive(Clone, Debug, Serialize)]
pub struct Kld {
    pub cache: String,
    pub reference: String,
    /// Mean KL(P_ref ‖ P_cache), nats per token, and its standard error.
    pub mean: f64,
    pub stderr: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    /// Fraction of tokens whose most likely next token is the reference's.
    pub same_top: f64,
    /// Perplexity of this cache on the same tokens (from the same logits).
    pub ppl: f64,
    pub reference_ppl: f64,
    pub tokens: usize,
}

/// Log-probabilities of a row of logits, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln();
    logits.iter().map(|&l| l as f64 - max - log_sum).collect()
}

/// KL(P ‖ Q) from log-probabilities.
fn kl(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&lp, &lq)| lp.exp() * (lp - lq))
        .sum::<f64>()
        .max(0.0)
}

fn argmax(xs: &[f64]) -> usize {
    xs.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// KL divergence of each cache of `specs` from `reference` (e.g. `f16`) on the windows `opts`
/// cuts from `tokens`: every window runs through the reference and then each cache.
pub fn kl_divergence(
    model: &Model,
    tokens: &[u32],
    reference: &str,
    specs: &[String],
    opts: &PplOptions,
) -> Result<Vec<Kld>> {
    let caches = specs
        .iter()
        .map(|s| model.new_cache(s))
        .collect::<llm::Result<Vec<_>>>()?;
    kl_divergence_of(model, tokens, reference, caches, specs, opts)
}

/// [`kl_divergence`] of caches already built (e.g. over codebooks held in memory), each
/// reported under its name in `names`.
pub fn kl_divergence_of(
    model: &Model,
    tokens: &[u32],
    reference: &str,
    mut caches: Vec<Box<dyn KvCache>>,
    names: &[String],
    opts: &PplOptions,
) -> Result<Vec<Kld>> {
    if caches.len() != names.len() {
        bail!("{} caches for {} names", caches.len(), names.len());
    }
    let (tokens, plan) = checked_plan(model, tokens, opts)?;
    let mut reference_cache = model.new_cache(reference)?;
    let vocab = model.vocab();
    // Per cache: each token's KL, whether its top token matched, and its NLL.
    let mut per_token: Vec<(Vec<f64>, usize, f64)> = vec![(Vec::new(), 0, 0.0); names.len()];
    let mut reference_nll = 0.0;
    let total: usize = plan.iter().map(|w| w.1).sum();
    let pb = progress::bar((total * (names.len() + 1)) as u64, "tok", opts.quiet);
    pb.set_message(format!("KL divergence from {reference}"));
    for &(start, len, first) in &plan {
        let window = window_tokens(model, tokens, (start, len), opts.protocol);
        let rows = len - first;
        let scored = rows - 1;
        reference_cache.truncate(0);
        let logits = model.forward(&window, 0, reference_cache.as_mut(), Some(rows))?;
        let reference_rows: Vec<Vec<f64>> = logits
            .chunks_exact(vocab)
            .take(scored)
            .map(log_softmax)
            .collect();
        for (r, lp) in reference_rows.iter().enumerate() {
            reference_nll -= lp[window[first + r + 1] as usize];
        }
        pb.inc(len as u64);
        for (cache, acc) in caches.iter_mut().zip(&mut per_token) {
            cache.truncate(0);
            let logits = model.forward(&window, 0, cache.as_mut(), Some(rows))?;
            for (r, (row, lp)) in logits.chunks_exact(vocab).zip(&reference_rows).enumerate() {
                let lq = log_softmax(row);
                acc.0.push(kl(lp, &lq));
                acc.1 += usize::from(argmax(lp) == argmax(&lq));
                acc.2 -= lq[window[first + r + 1] as usize];
            }
            pb.inc(len as u64);
        }
    }
    pb.finish_and_clear();
    let n = per_token.first().map_or(0, |p| p.0.len());
    if !reference_nll.is_finite() {
        bail!("the reference cache {reference} scored non-finite log-likelihoods");
    }
    names
        .iter()
        .zip(per_token)
        .map(|(spec, (mut kls, same, nll))| {
            if kls.iter().any(|k| !k.is_finite()) || !nll.is_finite() {
                bail!("{spec}: non-finite logits, so no KL divergence");
            }
            let count = kls.len() as f64;
            let mean = kls.iter().sum::<f64>() / count;
            let var = kls.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / (count - 1.0).max(1.0);
            kls.sort_by(f64::total_cmp);
            Ok(Kld {
                cache: spec.clone(),
                reference: reference.to_string(),
                mean,
                stderr: (var / count).sqrt(),
                median: percentile(&kls, 0.5),
                p99: percentile(&kls, 0.99),
                max: *kls.last().unwrap_or(&0.0),
                same_top: same as f64 / count,
                ppl: (nll / count).exp(),
                reference_ppl: (reference_nll / n as f64).exp(),
                tokens: n,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_closed_forms() {
        // Two outcomes: P = (3/4, 1/4), Q = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2).
        let p = log_softmax(&[3f32.ln(), 0.0]);
        let q = log_softmax(&[0.0, 0.0]);
        let expected = 0.75 * 1.5f64.ln() + 0.25 * 0.5f64.ln();
        assert!((kl(&p, &q) - expected).abs() < 1e-7, "{}", kl(&p, &q));
        assert_eq!(kl(&p, &p), 0.0);
        // Shifting logits changes nothing.
        let shifted = log_softmax(&[3f32.ln() + 5.0, 5.0]);
        assert!(kl(&p, &shifted) < 1e-12);
        assert_eq!(argmax(&p), 0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
    }
}
