use super::*;

fn small_config() -> TrainConfig {
    TrainConfig {
        dim: 4,
        size: 16,
        stages: 3,
        kmeans_sample: 2000,
        kmeans_iters: 5,
        batch: 128,
        ..TrainConfig::paper()
    }
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| {
            // Box–Muller
            let (u, v) = (rng.unit().max(1e-12), rng.unit());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

#[test]
fn the_report_measures_an_evenly_spaced_capped_subset_of_the_sample() {
    let d = 2;
    // Vector v of the sample is (v, −v).
    let sample = |s: usize| -> Vec<f32> { (0..s).flat_map(|v| [v as f32, -(v as f32)]).collect() };
    let small = sample(100);
    assert_eq!(
        report_sample(&small, d, 16),
        small,
        "a small sample is reported whole"
    );
    let big = sample(40_000);
    for (size, want) in [(256, 8192), (2048, 16_384)] {
        let sub = report_sample(&big, d, size);
        assert_eq!(sub.len(), want * d, "C = {size}");
        let picked: Vec<usize> = sub.chunks_exact(d).map(|v| v[0] as usize).collect();
        assert!(sub.chunks_exact(d).all(|v| v[1] == -v[0]), "whole vectors");
        assert_eq!(picked[0], 0);
        let gaps: Vec<usize> = picked.windows(2).map(|w| w[1] - w[0]).collect();
        let (lo, hi) = (40_000 / want, 40_000_usize.div_ceil(want));
        assert!(
            gaps.iter().all(|&g| g == lo || g == hi),
            "evenly spaced: {lo}..={hi}"
        );
    }
}

/// One EMA step against a slow, explicit transcription of the paper's formulas.
#[test]
fn ema_step_matches_reference() {
    let cfg = TrainConfig {
        dim: 2,
        size: 3,
        decay: 0.9,
        eps: 1e-5,
        ..TrainConfig::paper()
    };
    let codebook = [0.0, 0.0, 1.0, 1.0, -1.0, 2.0];
    let mut state = EmaState::new(&codebook, &[4.0, 2.0, 0.0], 0.5, 2);
    let x = [0.1, -0.1, 0.9, 1.2, 1.1, 0.8];
    let idx = [0u32, 1, 1];
    state.update(&x, &idx, &cfg);
    let mut cb = codebook;
    state.write_codebook(&mut cb, &cfg);
    // Reference: counts0 = [2, 1, 0]; sums0 = cw * counts0.
    let counts = [2.0 * 0.9 + 1.0 * 0.1, 1.0 * 0.9 + 2.0 * 0.1, 0.0f64];
    let sums = [
        [0.0 * 0.9 + 0.1 * 0.1, 0.0 * 0.9 + -0.1 * 0.1],
        [1.0 * 0.9 + (0.9 + 1.1) * 0.1, 1.0 * 0.9 + (1.2 + 0.8) * 0.1],
        [0.0, 0.0],
    ];
    let n: f64 = counts.iter().sum();
    for j in 0..3 {
        let smoothed = (counts[j] + 1e-5) / (n + 3.0 * 1e-5) * n;
        for c in 0..2 {
            let want = sums[j][c] / smoothed;
            assert!(
                (cb[j * 2 + c] as f64 - want).abs() < 1e-5,
                "code {j}: {} vs {want}",
                cb[j * 2 + c]
            );
        }
    }
}

#[test]
fn training_is_deterministic_and_reduces_error_per_stage() {
    let data = gaussian(4 * 3000, 1);
    let src = SliceSource {
        data: &data,
        dim: 4,
    };
    let cfg = small_config();
    let (a, report) = Rvq::train(&cfg, &src).unwrap();
    let (b, _) = Rvq::train(&cfg, &src).unwrap();
    assert_eq!(a, b);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (c, _) = pool.install(|| Rvq::train(&cfg, &src).unwrap());
    assert_eq!(a, c, "thread count changed the codebooks");
    let mses: Vec<f64> = report.stages.iter().map(|s| s.relative_mse).collect();
    assert!(mses.windows(2).all(|w| w[1] <= w[0]), "{mses:?}");
    assert!(mses[2] < 0.5, "{mses:?}");
}

#[test]
fn ema_step_with_known_codes_equals_the_step_that_finds_them() {
    let (d, n) = (4, 300);
    let mut rng = SplitMix64::new(3);
    let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
    let config = TrainConfig {
        dim: d,
        size: 16,
        stages: 3,
        kmeans_sample: n,
        batch: 100,
        ..TrainConfig::paper()
    };
    let (rvq, _) = Rvq::train(&config, &SliceSource { data: &x, dim: d }).unwrap();
    let (mut a, mut b) = (rvq.clone(), rvq.clone());
    let mut ema_a = EmaCodebooks::new(&rvq, 2.0);
    let mut ema_b = ema_a.clone();
    let mut codes = vec![0u16; n * 3];
    rvq.encode(&x, 1, &mut codes).unwrap();
    let (mut xa, mut xb) = (x.clone(), x.clone());
    let mut r = SplitMix64::new(0);
    ema_a.step(&mut a, &mut xa, &config, &mut r);
    ema_b.step_with_codes(&mut b, &mut xb, &codes, &config, &mut r);
    assert_eq!(ema_a, ema_b);
    for k in 0..3 {
        assert_eq!(a.codebook(k), b.codebook(k));
    }
}

#[test]
fn fewer_stages_learn_the_first_stages_of_more() {
    // What makes `stages=K` on a deeper quantizer an honest depth ablation.
    let data = gaussian(4 * 3000, 2);
    let src = SliceSource {
        data: &data,
        dim: 4,
    };
    let deep = TrainConfig {
        stages: 4,
        ..small_config()
    };
    let (a, _) = Rvq::train(&deep, &src).unwrap();
    let (b, _) = Rvq::train(&TrainConfig { stages: 2, ..deep }, &src).unwrap();
    assert_eq!(a.truncated(2).unwrap(), b);
}

proptest::proptest! {
    /// With k-means alone, each stage's centroids are means of the residuals they serve
    /// (or unused), so on the training data the error cannot grow from stage to stage.
    /// (EMA refinement keeps this in practice but does not guarantee it.)
    #[test]
    fn error_never_increases_with_stages(seed in proptest::prelude::any::<u64>(), dim in 1usize..6, size in 2usize..20, stages in 1usize..5) {
        let n = 300;
        let data = gaussian(n * dim, seed);
        let cfg = TrainConfig { dim, size, stages, kmeans_sample: n, kmeans_iters: 4, ema_passes: 0, seed, ..TrainConfig::paper() };
        let (_, report) = Rvq::train(&cfg, &SliceSource { data: &data, dim }).unwrap();
        let mut previous = 1.0;
        for s in &report.stages {
            proptest::prop_assert!(s.relative_mse <= previous * (1.0 + 1e-6), "{:?}", report.stages);
            previous = s.relative_mse;
        }
    }
}

#[test]
fn bad_training_inputs_are_errors() {
    let cfg = small_config();
    let empty: Vec<f32> = vec![];
    assert!(Rvq::train(
        &cfg,
        &SliceSource {
            data: &empty,
            dim: 4
        }
    )
    .is_err());
    let few = gaussian(4 * 10, 2);
    let e = Rvq::train(&cfg, &SliceSource { data: &few, dim: 4 })
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fewer than the C = 16"), "{e}");
    let mut nan = gaussian(4 * 500, 3);
    nan[77] = f32::NAN;
    assert!(matches!(
        Rvq::train(&cfg, &SliceSource { data: &nan, dim: 4 }),
        Err(RvqError::NonFinite(_))
    ));
    let ok = gaussian(4 * 500, 3);
    assert!(Rvq::train(
        &TrainConfig {
            stages: 0,
            ..cfg.clone()
        },
        &SliceSource { data: &ok, dim: 4 }
    )
    .is_err());
    assert!(Rvq::train(
        &TrainConfig {
            size: 1,
            ..cfg.clone()
        },
        &SliceSource { data: &ok, dim: 4 }
    )
    .is_err());
    assert!(Rvq::train(&cfg, &SliceSource { data: &ok, dim: 2 }).is_err());
}

#[test]
fn dead_code_replacement_revives_codes() {
    // Data on 4 tight clusters, 64 codes: many codes starve; replacement re-seeds them.
    let mut rng = SplitMix64::new(9);
    let data: Vec<f32> = (0..4000 * 2)
        .map(|i| ((i / 2) % 4) as f32 * 10.0 + rng.unit() as f32 * 0.01)
        .collect();
    let src = SliceSource {
        data: &data,
        dim: 2,
    };
    let cfg = TrainConfig {
        dim: 2,
        size: 64,
        stages: 1,
        kmeans_sample: 2000,
        kmeans_iters: 3,
        batch: 200,
        ema_passes: 2,
        ..TrainConfig::paper()
    };
    let (_, off) = Rvq::train(&cfg, &src).unwrap();
    let (_, on) = Rvq::train(
        &TrainConfig {
            dead_code_threshold: Some(0.5),
            ..cfg
        },
        &src,
    )
    .unwrap();
    assert_eq!(off.dead_codes_replaced, 0);
    assert!(on.dead_codes_replaced > 0);
}
