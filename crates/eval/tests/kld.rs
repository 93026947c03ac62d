//! KL divergence between caches on the real model, against a direct computation.

mod common;

use common::{eval_tokens, model_f32};
use eval::kld::kl_divergence;
use eval::ppl::{perplexity, PplOptions, Protocol};

fn opts(tokens: usize) -> PplOptions {
    PplOptions {
        ctx: 256,
        max_tokens: Some(tokens),
        protocol: Protocol::Windows,
        quiet: true,
    }
}

/// Softmax, then Σ p·ln(p/q) per row, averaged: the obvious way.
fn direct_mean_kl(reference: &[f32], other: &[f32], vocab: usize) -> f64 {
    let probs = |row: &[f32]| {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let e: Vec<f64> = row.iter().map(|&l| (l as f64 - max).exp()).collect();
        let z: f64 = e.iter().sum();
        e.into_iter().map(|x| x / z).collect::<Vec<f64>>()
    };
    let rows: Vec<f64> = reference
        .chunks_exact(vocab)
        .zip(other.chunks_exact(vocab))
        .map(|(a, b)| {
            let (p, q) = (probs(a), probs(b));
            p.iter()
                .zip(&q)
                .map(|(&p, &q)| if p > 0.0 { p * (p / q).ln() } else { 0.0 })
                .sum()
        })
        .collect();
    rows.iter().sum::<f64>() / rows.len() as f64
}

#[test]
fn kl_divergence_matches_the_direct_formula_and_perplexity() {
    let model = model_f32();
    let tokens = eval_tokens();
    let specs = vec!["f16".to_string(), "q4_0,rot".to_string()];
    let pass = kl_divergence(model, tokens, "f16", &specs, &opts(256)).unwrap();
    let k = pass.klds();
    // A cache against itself: nothing moves.
    assert_eq!((k[0].mean, k[0].max, k[0].same_top), (0.0, 0.0, 1.0));
    assert_eq!(k[0].tokens, 255);
    // One window by hand: logits of rows 0..254 (they predict tokens 1..255).
    let window = &tokens[..256];
    let logits = |spec: &str| {
        let mut cache = model.new_cache(spec).unwrap();
        let all = model.forward(window, 0, cache.as_mut(), None).unwrap();
        all[..255 * model.vocab()].to_vec()
    };
    let direct = direct_mean_kl(&logits("f16"), &logits("q4_0,rot"), model.vocab());
    assert!(
        (k[1].mean - direct).abs() <= 1e-9 + 1e-6 * direct,
        "{} vs {direct}",
        k[1].mean
    );
    assert!(k[1].mean > 1e-3 && k[1].p99 >= k[1].median && k[1].max >= k[1].p99);
    assert!(k[1].same_top > 0.5 && k[1].same_top < 1.0);
    // The perplexities come from the same logits as `ppl`'s.
    let ppl = perplexity(model, tokens, "q4_0,rot", &opts(256))
        .unwrap()
        .ppl;
    assert!((k[1].ppl / ppl - 1.0).abs() < 1e-9, "{} vs {ppl}", k[1].ppl);
    // The pass's perplexity rows are `perplexity`'s: value, error bar, tokens and cache bytes.
    for (spec, r) in specs.iter().zip(pass.caches.iter().map(|c| &c.0)) {
        let alone = perplexity(model, tokens, spec, &opts(256)).unwrap();
        assert_eq!(
            (r.ppl, r.ppl_stderr, r.scored_tokens, r.tokens_processed),
            (
                alone.ppl,
                alone.ppl_stderr,
                alone.scored_tokens,
                alone.tokens_processed
            ),
            "{spec}"
        );
        assert_eq!(r.memory.bytes, alone.memory.bytes, "{spec}");
    }
    assert_eq!(pass.reference.ppl, pass.caches[0].0.ppl);
}
