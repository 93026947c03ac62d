//! `bench` on the real model: the interleaved and the one-cache-after-another measurements
//! fill the same caches to the same lengths.
mod common;

use eval::bench::{run, BenchOptions};

#[test]
fn interleaved_bench_fills_each_cache_as_a_sequential_one_does() {
    let model = common::model();
    let caches = ["f16".to_string(), "q8_0".to_string(), "f16".to_string()];
    let (ctx, decode_steps) = (300, 5);
    let options = |interleave| BenchOptions {
        decode_steps,
        trained_context: model.context_len(),
        interleave,
        fill_random: false,
    };
    let together = run(model, &caches, &[ctx], options(true)).unwrap();
    let apart = run(model, &caches, &[ctx], options(false)).unwrap();
    assert!(together.interleaved && !apart.interleaved);
    assert!(together.table().contains("measured in turn"));
    let shape = model.cache_shape();
    // f16: K and V, 2 bytes per element, every position of every layer and KV head.
    let f16_bytes = (shape.layers * shape.kv_heads * shape.head_dim * ctx * 2 * 2) as u64;
    for report in [&together, &apart] {
        let rows = &report.rows;
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].cache, "f16");
        assert_eq!(rows[1].cache, "q8_0");
        assert_eq!(rows[0].cache_bytes, f16_bytes);
        assert_eq!(rows[2].cache_bytes, f16_bytes);
        assert_eq!(rows[0].decode_ratio, 1.0);
        for r in rows {
            assert!(r.decode_tokens_per_s > 0.0 && r.prefill_tokens_per_s > 0.0);
            assert!(r.decode_attention_ms > 0.0 && r.decode_model_ms > 0.0);
            assert!(r.peak_rss_bytes.is_none(), "three caches share the process");
        }
    }
    for (a, b) in together.rows.iter().zip(&apart.rows) {
        assert_eq!(a.cache_bytes, b.cache_bytes, "{}", a.cache);
    }
}

#[test]
fn bench_rejects_contexts_the_decode_steps_do_not_fit() {
    let model = common::model();
    let options = BenchOptions {
        decode_steps: 16,
        trained_context: model.context_len(),
        interleave: true,
        fill_random: false,
    };
    let err = run(model, &["f16".into()], &[16], options).unwrap_err();
    assert!(
        err.to_string().contains("must exceed the 16 decode steps"),
        "{err}"
    );
    let err = run(model, &[], &[64], options).unwrap_err();
    assert!(err.to_string().contains("at least one cache"), "{err}");
}

/// A context filled with random K/V holds the bytes a prefill of the same length leaves, and
/// decoding after it runs; the rows say they were filled.
#[test]
fn random_fill_holds_what_a_prefill_holds() {
    let model = common::model();
    let caches: Vec<String> = vec!["f16".into(), "q4_0".into()];
    let options = |fill_random| BenchOptions {
        decode_steps: 4,
        trained_context: model.context_len(),
        interleave: true,
        fill_random,
    };
    let filled = run(model, &caches, &[300], options(true)).unwrap();
    let prefilled = run(model, &caches, &[300], options(false)).unwrap();
    for (a, b) in filled.rows.iter().zip(&prefilled.rows) {
        assert!(a.filled_random && !b.filled_random);
        assert_eq!(a.cache_bytes, b.cache_bytes, "{}", a.cache);
        assert!(a.decode_tokens_per_s.is_finite() && a.decode_tokens_per_s > 0.0);
    }
    assert!(filled.table().contains("--fill random"));
}
