//! Stages per layer by measured sensitivity: at the same average bits, the layers whose keys or
//! values move the model's output most get more RVQ stages and the others fewer (the paper gives
//! every layer K = 8).
//!
//! Each layer's keys and its values are a part. A part's effect on the output is measured once:
//! the KL divergence from f16 with only that part quantized, at `probe_stages`. Its effect at k
//! stages is taken as that KLD scaled by the part's relative reconstruction error at k stages
//! over its error at the probe (in the small-error regime the KLD grows with the squared logit
//! error, which grows with the K/V error). The stages per part that minimise the predicted sum
//! within the bytes of the target are then found exactly, by dynamic programming over the parts
//! (a part's code row is whole bytes, so a stage does not always cost the same).

use crate::calibrate::{capture, weighted};
use crate::kld::kl_divergence_of;
use crate::ppl::PplOptions;
use anyhow::{bail, Result};
use kvcache::codebooks::{Codebooks, LayerBooks};
use kvcache::rvq::{RvqCache, RvqOptions};
use kvcache::KvCache;
use llm::Model;
use rvq::{Rvq, VectorLayout};
use serde::Serialize;
use std::sync::Arc;

/// Keys or values of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Part {
    #[serde(rename = "k")]
    Keys,
    #[serde(rename = "v")]
    Values,
}

/// What was measured for one part and the stages it gets.
#[derive(Clone, Debug, Serialize)]
pub struct PartReport {
    pub layer: usize,
    pub part: Part,
    /// KL divergence from f16 with only this part quantized, at the probe's stages.
    pub probe_kld: f64,
    /// Relative squared error ‖x − x̂‖² / ‖x‖² of the part's groups at 1..=K stages.
    pub relative_error: Vec<f64>,
    pub stages: usize,
}

impl PartReport {
    /// The predicted KLD contribution at `k` stages.
    pub fn predicted(&self, k: usize, probe: usize) -> f64 {
        self.probe_kld * self.relative_error[k - 1] / self.relative_error[probe - 1]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Allocation {
    /// Bits per element asked for, and reached (codes and per-vector scales, as the cache
    /// stores them).
    pub target_bits: f64,
    pub bits: f64,
    pub probe_stages: usize,
    /// Tokens the KLD and the errors were measured on.
    pub tokens: usize,
    pub parts: Vec<PartReport>,
    /// Sum of the parts' predicted KLDs with every part at the mean stages, and as allocated.
    pub predicted_uniform: f64,
    pub predicted: f64,
}

#[derive(Clone, Debug)]
pub struct AllocateConfig {
    /// Average bits per element to reach (at most).
    pub bits: f64,
    /// Stages each part is probed at (fewer than the mean makes its KLD stand out of the noise);
    /// `None`: [`PROBE_STAGES`], or all the codebooks' stages if they have fewer.
    pub probe_stages: Option<usize>,
    pub ppl: PplOptions,
}

/// The probe's stages unless asked otherwise.
pub const PROBE_STAGES: usize = 4;

impl Default for AllocateConfig {
    /// 3 bits (the paper's at head_dim 64), parts probed at [`PROBE_STAGES`], 2,048 tokens in
    /// windows of 512 scored as llama-perplexity scores them.
    fn default() -> Self {
        Self {
            bits: 3.0,
            probe_stages: None,
            ppl: PplOptions {
                ctx: 512,
                max_tokens: Some(2048),
                protocol: crate::ppl::Protocol::LlamaCpp,
                quiet: false,
            },
        }
    }
}

impl Allocation {
    /// One line: bits reached and the predicted gain.
    pub fn summary(&self) -> String {
        format!(
            "{:.3} bits/element (asked {}); predicted KLD sum {:.4} against {:.4} with the same \
             stages everywhere (measured on {} tokens, parts probed at {} stages)",
            self.bits,
            self.target_bits,
            self.predicted,
            self.predicted_uniform,
            self.tokens,
            self.probe_stages
        )
    }
}

/// Bytes the cache stores per vector of `head_dim` in groups of `group_dim` at `stages` codes
/// of `code_bits` each: the code row (whole bytes, as packed) and an f16 scale.
pub fn vector_bytes(head_dim: usize, group_dim: usize, code_bits: u32, stages: usize) -> usize {
    let groups = head_dim / group_dim.max(1);
    rvq::pack::row_bytes(groups * stages, code_bits) + 2
}

/// [`vector_bytes`] as bits per element.
pub fn bits_per_element(head_dim: usize, group_dim: usize, code_bits: u32, stages: usize) -> f64 {
    (8 * vector_bytes(head_dim, group_dim, code_bits, stages)) as f64 / head_dim as f64
}

/// A part's quantizer and layout, if it is quantized.
fn quantizer(books: &Codebooks, layer: usize, part: Part) -> Option<(&Arc<Rvq>, VectorLayout)> {
    let l = &books.layers[layer];
    match part {
        Part::Keys => l.keys.as_ref().zip(books.key_layout()),
        Part::Values => l.values.as_ref().zip(books.value_layout()),
    }
}

/// Relative squared error of `q`'s greedy codes after each of its stages, over `x`'s groups.
fn errors_by_stage(q: &Rvq, layout: &VectorLayout, x: &[f32]) -> Result<Vec<f64>> {
    let (groups, _) = layout.to_groups(x)?;
    let (d, k) = (q.dim(), q.stages());
    let n = groups.len() / d;
    let mut codes = vec![0u16; n * k];
    q.encode(&groups, 1, &mut codes)?;
    let mut err = vec![0f64; k];
    let mut residual = vec![0f32; d];
    for (g, c) in groups.chunks_exact(d).zip(codes.chunks_exact(k)) {
        residual.copy_from_slice(g);
        for (s, &code) in c.iter().enumerate() {
            let w = q.codeword(s, code as usize);
            residual.iter_mut().zip(w).for_each(|(r, w)| *r -= w);
            err[s] += residual.iter().map(|r| (*r as f64).powi(2)).sum::<f64>();
        }
    }
    let energy: f64 = groups.iter().map(|v| (*v as f64).powi(2)).sum();
    Ok(err
        .into_iter()
        .map(|e| e / energy.max(f64::MIN_POSITIVE))
        .collect())
}

/// Codebooks that quantize only `part` of `layer`, with `stages` of its stages.
fn only(books: &Codebooks, layer: usize, part: Part, stages: usize) -> Result<Codebooks> {
    let mut one = books.clone();
    one.layers = vec![LayerBooks::default(); books.layers.len()];
    let (q, _) = quantizer(books, layer, part).expect("a quantized part");
    let q = Some(Arc::new(q.truncated(stages)?));
    let weights = &books.layers[layer].weights;
    one.layers[layer] = match part {
        Part::Keys => LayerBooks {
            keys: q,
            values: None,
            weights: [weights[0].clone(), None],
        },
        Part::Values => LayerBooks {
            keys: None,
            values: q,
            weights: [None, weights[1].clone()],
        },
    };
    Ok(one)
}

/// The stages per part (1..=`most[p]`) that minimise `cost[p][k − 1]` summed over the parts
/// within `budget` bytes, `bytes[p][k − 1]` each; `None` if even 1 stage each does not fit.
fn cheapest(cost: &[Vec<f64>], bytes: &[Vec<usize>], budget: usize) -> Option<Vec<usize>> {
    const NONE: f64 = f64::INFINITY;
    // best[b]: the least sum of the parts so far within b bytes; choice[p][b]: part p's stages.
    let mut best = vec![0.0; budget + 1];
    let mut choice = vec![vec![0usize; budget + 1]; cost.len()];
    for (p, (c, w)) in cost.iter().zip(bytes).enumerate() {
        let mut next = vec![NONE; budget + 1];
        for b in 0..=budget {
            for (k, (&ck, &wk)) in c.iter().zip(w).enumerate() {
                if wk <= b && best[b - wk] + ck < next[b] {
                    next[b] = best[b - wk] + ck;
                    choice[p][b] = k + 1;
                }
            }
        }
        best = next;
    }
    if !best[budget].is_finite() {
        return None;
    }
    let mut stages = vec![0; cost.len()];
    let mut b = budget;
    for p in (0..cost.len()).rev() {
        stages[p] = choice[p][b];
        b -= bytes[p][stages[p] - 1];
    }
    Some(stages)
}

/// Measures every quantized part of `books` on `tokens` and returns the codebooks with each part
/// cut to its allocated stages (at most the file's), averaging at most `cfg.bits` bits.
pub fn allocate(
    model: &Model,
    books: &Codebooks,
    tokens: &[u32],
    cfg: &AllocateConfig,
) -> Result<(Codebooks, Allocation)> {
    let parts: Vec<(usize, Part)> = (0..books.layers.len())
        .flat_map(|l| [(l, Part::Keys), (l, Part::Values)])
        .filter(|&(l, p)| quantizer(books, l, p).is_some())
        .collect();
    if parts.is_empty() {
        bail!("the codebooks quantize nothing");
    }
    let most = parts
        .iter()
        .map(|&(l, p)| quantizer(books, l, p).unwrap().0.stages())
        .min()
        .unwrap_or(0);
    let probe = cfg.probe_stages.unwrap_or(PROBE_STAGES.min(most));
    if !(1..=most).contains(&probe) {
        bail!("--probe-stages {probe}: must be 1 to the codebooks' {most} stages");
    }
    // Bytes of each part's vector at 1..=K stages; bits per element over all parts.
    let bytes: Vec<Vec<usize>> = parts
        .iter()
        .map(|&(l, p)| {
            let (q, layout) = quantizer(books, l, p).unwrap();
            (1..=q.stages())
                .map(|k| vector_bytes(layout.vector_dim, layout.group_dim, q.code_bits(), k))
                .collect()
        })
        .collect();
    let dim = books.meta.model.head_dim;
    let bits_of = |total_bytes: usize| (8 * total_bytes) as f64 / (parts.len() * dim) as f64;
    let at = |k: usize| bits_of(bytes.iter().map(|b| b[k.min(b.len()) - 1]).sum());
    let budget = (cfg.bits * (parts.len() * dim) as f64 / 8.0 + 1e-9).floor() as usize;
    if !(cfg.bits.is_finite() && cfg.bits >= at(1) && cfg.bits <= at(most)) {
        bail!(
            "--bits {}: these codebooks give {:.3} bits at 1 stage per part and {:.3} at {most}",
            cfg.bits,
            at(1),
            at(most)
        );
    }

    // Errors by stage, on the K/V the tokens produce.
    let ctx = cfg.ppl.ctx.min(model.context_len());
    let error_tokens = &tokens[..tokens.len().min(cfg.ppl.max_tokens.unwrap_or(usize::MAX))];
    let captured = capture(model, error_tokens, ctx, cfg.ppl.quiet)?;
    let errors: Vec<Vec<f64>> = parts
        .iter()
        .map(|&(l, p)| {
            let (q, layout) = quantizer(books, l, p).unwrap();
            let x = match p {
                Part::Keys => &captured[l].keys,
                Part::Values => &captured[l].values,
            };
            let x = weighted(x, books.layers[l].weights[p as usize].as_deref());
            errors_by_stage(q, &layout, &x)
        })
        .collect::<Result<_>>()?;
    drop(captured);

    // One pass of f16 and of a cache per part, each quantizing only that part.
    let config = model.cache_config(false)?;
    let mut caches: Vec<Box<dyn KvCache>> = Vec::new();
    let mut names = Vec::new();
    for &(l, p) in &parts {
        let one = only(books, l, p, probe)?;
        let name = format!("layer {l} {p:?}");
        let cache = RvqCache::new(
            config.shape,
            config.rope.clone(),
            Arc::new(one),
            RvqOptions::default(),
            name.clone(),
        )?;
        caches.push(Box::new(cache));
        names.push(name);
    }
    let klds = kl_divergence_of(model, tokens, "f16", caches, &names, &cfg.ppl)?.klds();

    let mut reports: Vec<PartReport> = parts
        .iter()
        .zip(errors)
        .zip(&klds)
        .map(|((&(layer, part), relative_error), kld)| PartReport {
            layer,
            part,
            probe_kld: kld.mean,
            relative_error,
            stages: 1,
        })
        .collect();
    let predicted: Vec<Vec<f64>> = reports
        .iter()
        .map(|r| {
            (1..=r.relative_error.len())
                .map(|k| r.predicted(k, probe))
                .collect()
        })
        .collect();
    let stages = cheapest(&predicted, &bytes, budget).expect("1 stage per part fits: checked");
    for (r, k) in reports.iter_mut().zip(&stages) {
        r.stages = *k;
    }
    let bits = bits_of(stages.iter().zip(&bytes).map(|(&k, b)| b[k - 1]).sum());
    // The same stages everywhere within the same bytes, for the record.
    let uniform = (1..=most)
        .rev()
        .find(|&k| at(k) <= cfg.bits + 1e-9)
        .unwrap_or(1);
    let predicted_uniform = reports.iter().map(|r| r.predicted(uniform, probe)).sum();
    let predicted = reports.iter().map(|r| r.predicted(r.stages, probe)).sum();

    let mut out = books.clone();
    for r in &reports {
        let (q, _) = quantizer(books, r.layer, r.part).unwrap();
        let cut = Some(Arc::new(q.truncated(r.stages)?));
        let layer = &mut out.layers[r.layer];
        match r.part {
            Part::Keys => layer.keys = cut,
            Part::Values => layer.values = cut,
        }
    }
    let allocation = Allocation {
        target_bits: cfg.bits,
        bits,
        probe_stages: probe,
        tokens: klds.first().map_or(0, |k| k.tokens),
        parts: reports,
        predicted_uniform,
        predicted,
    };
    if let serde_json::Value::Object(m) = &mut out.meta.calibration {
        m.insert("allocation".into(), serde_json::to_value(&allocation)?);
    }
    Ok((out, allocation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rvq::rng::SplitMix64;
    use rvq::Grouping;

    #[test]
    fn the_cheapest_stages_are_those_an_exhaustive_search_finds() {
        let mut rng = SplitMix64::new(11);
        for _ in 0..50 {
            let parts = 1 + rng.below(4);
            let most = 1 + rng.below(4);
            let cost: Vec<Vec<f64>> = (0..parts)
                .map(|_| (0..most).map(|_| rng.unit()).collect())
                .collect();
            let bytes: Vec<Vec<usize>> = (0..parts)
                .map(|_| (1..=most).map(|k| 2 * k + rng.below(2)).collect())
                .collect();
            let budget = rng.below(4 * parts * most);
            // Every assignment of 1..=most stages to each part.
            let mut exhaustive: Option<(f64, Vec<usize>)> = None;
            for i in 0..most.pow(parts as u32) {
                let ks: Vec<usize> = (0..parts)
                    .map(|p| 1 + i / most.pow(p as u32) % most)
                    .collect();
                let used: usize = ks.iter().enumerate().map(|(p, &k)| bytes[p][k - 1]).sum();
                let sum: f64 = ks.iter().enumerate().map(|(p, &k)| cost[p][k - 1]).sum();
                if used <= budget && exhaustive.as_ref().is_none_or(|(best, _)| sum < *best) {
                    exhaustive = Some((sum, ks));
                }
            }
            let found = cheapest(&cost, &bytes, budget);
            match (&exhaustive, &found) {
                (None, None) => {}
                (Some((best, _)), Some(ks)) => {
                    let sum: f64 = ks.iter().enumerate().map(|(p, &k)| cost[p][k - 1]).sum();
                    assert!((sum - best).abs() < 1e-12, "{sum} vs {best}");
                    let used: usize = ks.iter().enumerate().map(|(p, &k)| bytes[p][k - 1]).sum();
                    assert!(used <= budget);
                }
                _ => panic!("exhaustive {exhaustive:?}, dynamic programming {found:?}"),
            }
        }
    }

    #[test]
    fn errors_by_stage_match_encoding_with_fewer_stages() {
        let mut rng = SplitMix64::new(5);
        let q = rvq::testkit::random_rvq(&mut rng, 8, 16, 4);
        let layout = VectorLayout::new(16, 8, Grouping::Contiguous, true).unwrap();
        let x: Vec<f32> = (0..16 * 40).map(|_| rng.unit() as f32 - 0.5).collect();
        let by_stage = errors_by_stage(&q, &layout, &x).unwrap();
        let (groups, _) = layout.to_groups(&x).unwrap();
        for k in 1..=4 {
            let (err, energy) = q.truncated(k).unwrap().squared_error(&groups, 1).unwrap();
            let expected = err / energy;
            // Both sum f32 codewords, in different orders.
            assert!(
                (by_stage[k - 1] - expected).abs() <= 1e-6 * expected,
                "{k}: {} vs {expected}",
                by_stage[k - 1]
            );
        }
    }
}
