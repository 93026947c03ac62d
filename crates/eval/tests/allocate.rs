//! `allocate` on the real model: it spends exactly the bits asked for, no single move of a stage
//! between two parts lowers its predicted KLD sum (the dynamic program's
//! optimum),, and the cut codebooks run.

mod common;
use common::{home, model, small_calib_config};
use eval::allocate::{allocate, AllocateConfig, Part};
use eval::calibrate::calibrate;
use eval::ppl::{perplexity, PplOptions, Protocol};

#[test]
fn allocation_spends_the_budget_optimally_and_the_cut_codebooks_run() {
    let model = model();
    let path = eval::assets::ensure_calib(&home(), "wiki.utf8").unwrap();
    let tokens = eval::text::read_tokens(model, &path).unwrap();
    let mut config = small_calib_config(1024);
    // 256 codewords: a stage of 2 groups is 2 bytes, so any stage costs the same.
    config.train.size = 256;
    config.train.stages = 4;
    let (books, _) = calibrate(model, &tokens, &config, true).unwrap();
    // 2 groups × 2 stages × 8-bit codes + a 16-bit scale per 64-dim vector: mean 2 stages.
    let bits = (2.0 * 2.0 * 8.0 + 16.0) / 64.0;
    let cfg = AllocateConfig {
        bits,
        probe_stages: Some(2),
        ppl: PplOptions {
            ctx: 256,
            max_tokens: Some(256),
            protocol: Protocol::LlamaCpp,
            quiet: true,
        },
    };
    let (cut, a) = allocate(model, &books, &tokens, &cfg).unwrap();

    assert_eq!(a.parts.len(), 2 * books.layers.len());
    let total: usize = a.parts.iter().map(|r| r.stages).sum();
    assert_eq!(
        total,
        2 * a.parts.len(),
        "every stage of the budget is spent"
    );
    assert!((a.bits - bits).abs() < 1e-9, "{}", a.bits);
    assert!(a.parts.iter().any(|r| r.stages != 2), "the layers differ");
    assert!(a.predicted <= a.predicted_uniform + 1e-12);
    for r in &a.parts {
        assert!(r.probe_kld.is_finite() && r.probe_kld >= 0.0, "{r:?}");
        assert!(
            r.relative_error.windows(2).all(|w| w[1] <= w[0] + 1e-9),
            "{r:?}"
        );
    }
    // Optimal for the predicted sum: moving one stage from any part to any other never lowers it.
    let f = |r: &eval::allocate::PartReport, k: usize| r.predicted(k, a.probe_stages);
    for from in a.parts.iter().filter(|r| r.stages > 1) {
        for to in a.parts.iter().filter(|r| r.stages < 4) {
            if (from.layer, from.part) == (to.layer, to.part) {
                continue;
            }
            let before = f(from, from.stages) + f(to, to.stages);
            let after = f(from, from.stages - 1) + f(to, to.stages + 1);
            assert!(after >= before - 1e-12, "{from:?} → {to:?}");
        }
    }
    // The cut codebooks hold each part's stages, and a cache runs on them.
    for r in &a.parts {
        let layer = &cut.layers[r.layer];
        let q = match r.part {
            Part::Keys => layer.keys.as_ref(),
            Part::Values => layer.values.as_ref(),
        };
        assert_eq!(q.unwrap().stages(), r.stages);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cut.safetensors");
    cut.save(&file).unwrap();
    let opts = PplOptions {
        ctx: 256,
        max_tokens: Some(512),
        protocol: Protocol::Windows,
        quiet: true,
    };
    let spec = format!("rvq:{}", file.display());
    let r = perplexity(model, common::eval_tokens(), &spec, &opts).unwrap();
    assert!(r.ppl.is_finite());
    let expected_bits = a.bits;
    assert!(
        (r.compression.bits_per_element - expected_bits).abs() < 0.01,
        "the cache stores {} bits/element, the allocation says {expected_bits}",
        r.compression.bits_per_element
    );
}
