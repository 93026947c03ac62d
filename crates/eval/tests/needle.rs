//! `needle` on the real model: haystacks hold the key where asked, and the f16 cache finds it.

mod common;

use eval::needle::{haystack, run, NeedleConfig};

#[test]
fn the_key_sits_at_its_depth_and_the_prompt_at_its_length() {
    let model = common::model();
    let tok = &model.tokenizer;
    let mut places = Vec::new();
    for depth in [0.0, 0.5, 1.0] {
        let hay = haystack(model, 1024, depth, 48213).unwrap();
        assert!(hay.tokens.len() <= 1024, "{}", hay.tokens.len());
        assert!(hay.tokens.len() > 1024 - 40, "{}", hay.tokens.len());
        let text = tok.decode(&hay.tokens[hay.needle_at..]).unwrap();
        assert!(
            text.trim_start().starts_with("The pass key is 48213."),
            "{text:.60}"
        );
        let whole = tok.decode(&hay.tokens).unwrap();
        assert_eq!(
            whole.matches("48213").count(),
            2,
            "the needle names it twice"
        );
        assert!(whole.ends_with("What is the pass key? The pass key is"));
        places.push(hay.needle_at as f64 / hay.tokens.len() as f64);
    }
    // First after the intro, near the middle, last before the question.
    assert!(places[0] < 0.1, "{places:?}");
    assert!((places[1] - 0.5).abs() < 0.05, "{places:?}");
    assert!(places[2] > 0.9, "{places:?}");
}

#[test]
fn the_f16_cache_finds_the_key_at_every_depth_and_a_wrong_key_is_not_found() {
    let model = common::model();
    let cfg = NeedleConfig {
        lengths: vec![512],
        depths: vec![0.0, 0.5, 1.0],
        trials: 2,
        seed: 3,
    };
    let r = run(model, "f16", &cfg, true).unwrap();
    assert_eq!(r.cells.len(), 3);
    assert_eq!(r.accuracy, 1.0, "{:?}", r.cells);
    // The same answers scored against other keys are wrong: the check reads the number.
    for cell in &r.cells {
        for answer in &cell.answers {
            assert!(!eval::needle::answered(answer, 10_000), "{answer}");
        }
    }
}

#[test]
fn out_of_range_settings_are_named() {
    let model = common::model();
    let bad = |lengths: Vec<usize>, depths: Vec<f64>, trials| {
        let cfg = NeedleConfig {
            lengths,
            depths,
            trials,
            seed: 0,
        };
        run(model, "f16", &cfg, true).unwrap_err().to_string()
    };
    assert!(bad(vec![512], vec![1.5], 1).contains("--depths 1.5"));
    assert!(bad(vec![100_000], vec![0.5], 1).contains("--lengths 100000"));
    assert!(bad(vec![512], vec![0.5], 0).contains("one trial"));
    assert!(bad(vec![20], vec![0.5], 1).contains("holds no filler"));
}
