//! How far a cache moves the model's next-token distribution from a reference cache's, on the
//! same tokens, as `llama-perplexity --kl-divergence` measures it: per scored token the KL
//! divergence KL(P_ref ‖ P_cache) and whether the top token is the same. Perplexity alone ranks
//! caches unreliably (errors that raise some tokens' likelihood and lower others' cancel in it).

use crate::ppl::{checked_plan, timed_forward, window_tokens, PplOptions, PplResult, PplTally};
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

/// One pass over the windows with a reference cache and the caches compared with it: each
/// cache's divergence, and every cache's perplexity from the same logits (a separate perplexity
/// pass would repeat the same forward passes).
#[derive(Clone, Debug)]
pub struct KldPass {
    pub reference: PplResult,
    /// Per compared cache, in the order given.
    pub caches: Vec<(PplResult, Kld)>,
}

impl KldPass {
    /// The divergences alone.
    pub fn klds(&self) -> Vec<Kld> {
        self.caches.iter().map(|(_, k)| k.clone()).collect()
    }
}

/// KL divergence of each cache of `specs` from `reference` (e.g. `f16`) on the windows `opts`
/// cuts from `tokens`: every window runs through the reference and then each cache.
pub fn kl_divergence(
    model: &Model,
    tokens: &[u32],
    reference: &str,
    specs: &[String],
    opts: &PplOptions,
) -> Result<KldPass> {
    let caches = specs
        .iter()
        .map(|s| model.new_cache(s))
        .collect::<llm::Result<Vec<_>>>()?;
    kl_divergence_of(model, tokens, reference, caches, specs, opts)
}

/// Per compared cache: each token's KL and how many top tokens matched.
#[derive(Clone, Default)]
struct Divergences {
    kls: Vec<f64>,
    same_top: usize,
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
) -> Result<KldPass> {
    if caches.len() != names.len() {
        bail!("{} caches for {} names", caches.len(), names.len());
    }
    let (tokens, plan) = checked_plan(model, tokens, opts)?;
    let mut reference_cache = model.new_cache(reference)?;
    let vocab = model.vocab();
    let mut reference_tally = PplTally::default();
    let mut tallies: Vec<PplTally> = names.iter().map(|_| PplTally::default()).collect();
    let mut divergences = vec![Divergences::default(); names.len()];
    let total: usize = plan.iter().map(|w| w.1).sum();
    let pb = progress::bar((total * (names.len() + 1)) as u64, "tok", opts.quiet);
    pb.set_message(format!("KL divergence from {reference}"));
    for &(start, len, first) in &plan {
        let window = window_tokens(model, tokens, (start, len), opts.protocol);
        let rows = len - first;
        let scored = rows - 1;
        let (logits, seconds) = timed_forward(model, &window, rows, reference_cache.as_mut())?;
        reference_tally.add_window(
            &window,
            first,
            &logits,
            vocab,
            reference_cache.as_ref(),
            seconds,
        );
        let reference_rows: Vec<Vec<f64>> = logits
            .chunks_exact(vocab)
            .take(scored)
            .map(log_softmax)
            .collect();
        pb.inc(len as u64);
        for ((cache, tally), div) in caches.iter_mut().zip(&mut tallies).zip(&mut divergences) {
            let (logits, seconds) = timed_forward(model, &window, rows, cache.as_mut())?;
            tally.add_window(&window, first, &logits, vocab, cache.as_ref(), seconds);
            for (row, lp) in logits.chunks_exact(vocab).zip(&reference_rows) {
                let lq = log_softmax(row);
                div.kls.push(kl(lp, &lq));
                div.same_top += usize::from(argmax(lp) == argmax(&lq));
            }
            pb.inc(len as u64);
        }
    }
    pb.finish_and_clear();
    let reference_result = reference_tally.finish(reference, opts, plan.len())?;
    let caches = names
        .iter()
        .zip(tallies.into_iter().zip(divergences))
        .map(|(spec, (tally, div))| {
            let ppl = tally.finish(spec, opts, plan.len())?;
            let kld = summarize(spec, reference, div, &ppl, &reference_result)?;
            Ok((ppl, kld))
        })
        .collect::<Result<_>>()?;
    Ok(KldPass {
        reference: reference_result,
        caches,
    })
}

fn summarize(
    spec: &str,
    reference: &str,
    div: Divergences,
    ppl: &PplResult,
    reference_ppl: &PplResult,
) -> Result<Kld> {
    let mut kls = div.kls;
    if kls.iter().any(|k| !k.is_finite()) {
        bail!("{spec}: non-finite logits, so no KL divergence");
    }
    let count = kls.len() as f64;
    let mean = kls.iter().sum::<f64>() / count;
    let var = kls.iter().map(|k| (k - mean).powi(2)).sum::<f64>() / (count - 1.0).max(1.0);
    kls.sort_by(f64::total_cmp);
    Ok(Kld {
        cache: spec.to_string(),
        reference: reference.to_string(),
        mean,
        stderr: (var / count).sqrt(),
        median: percentile(&kls, 0.5),
        p99: percentile(&kls, 0.99),
        max: *kls.last().unwrap_or(&0.0),
        same_top: div.same_top as f64 / count,
        ppl: ppl.ppl,
        reference_ppl: reference_ppl.ppl,
        tokens: kls.len(),
    })
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
