//! Times training and encoding of one paper-config quantizer on Gaussian data
//! (`cargo run --release -p rvq --example train_speed`).
use rvq::rng::SplitMix64;
use rvq::train::SliceSource;
use rvq::{Rvq, TrainConfig};
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(98_304);
    let mut rng = SplitMix64::new(1);
    let data: Vec<f32> = (0..n * 32).map(|_| rng.unit() as f32 - 0.5).collect();
    let iters = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(TrainConfig::paper().kmeans_iters);
    let cfg = TrainConfig {
        kmeans_iters: iters,
        ..TrainConfig::paper()
    };
    let t = Instant::now();
    let (q, report) = Rvq::train(
        &cfg,
        &SliceSource {
            data: &data,
            dim: 32,
        },
    )
    .unwrap();
    let train_s = t.elapsed().as_secs_f64();
    let mut codes = vec![0u16; n * 8];
    let t = Instant::now();
    q.encode(&data, 1, &mut codes).unwrap();
    let enc = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "train {n} vectors: {train_s:.2}s; encode {enc:.0} vectors/s; final relative MSE {:.4}",
        report.stages.last().unwrap().relative_mse
    );
}
