//! `mc` on the real model: the shared-prefix scorer against an independent computation.

mod common;

use eval::assets::{self, Asset};
use eval::mc::{load_items, task_file, Choice, ModelScorer, Scorer};
use llm::ops::log_prob;

/// Log-likelihood of a continuation the slow, independent way: one forward pass over the whole
/// context + continuation string from an empty cache, summing the continuation tokens' log-probs.
/// It shares nothing with the scorer: no prefix reuse, no cache copies, no context/continuation
/// token split other than counting the context's own tokens.
fn full_forward_ll(choice: &Choice) -> f64 {
    let model = common::model_f32();
    let tok = &model.tokenizer;
    let ctx = tok.encode(choice.context.trim_end(), tok.add_bos).unwrap();
    let whole = tok
        .encode(
            &format!("{}{}", choice.context, choice.continuation),
            tok.add_bos,
        )
        .unwrap();
    let mut cache = model.new_cache("f32").unwrap();
    let logits = model.forward(&whole, 0, cache.as_mut(), None).unwrap();
    let vocab = model.vocab();
    (ctx.len()..whole.len())
        .map(|t| log_prob(&logits[(t - 1) * vocab..t * vocab], whole[t] as usize))
        .sum()
}

#[test]
fn shared_prefix_scores_equal_full_forward_scores() {
    let home = common::home();
    assets::ensure(&home, Asset::Bench).unwrap();
    let bench = assets::bench_dir(&home);
    // f32 weights: the two paths differ in the last bits, which 8-bit activations (native
    // weights) would turn into rounding steps.
    let mut scorer = ModelScorer::new(common::model_f32(), "f32").unwrap();
    // arc_easy: one context, varying continuations; winogrande: varying contexts, one continuation.
    for (task, count, take) in [("arc_easy", 570, 4), ("winogrande", 1267, 2)] {
        let items = load_items(&task_file(&bench, task, "rc_0shot").unwrap()).unwrap();
        assert_eq!(items.len(), count, "{task} rc_0shot items");
        for item in &items[..take] {
            let fast = scorer.score(&item.choices).unwrap();
            for (c, ll) in item.choices.iter().zip(&fast) {
                let slow = full_forward_ll(c);
                assert!(ll.is_finite() && *ll < 0.0);
                assert!(
                    (ll - slow).abs() < 2e-3 * slow.abs().max(1.0),
                    "{task}: {ll} vs {slow}: {c:?}"
                );
            }
        }
    }
}
