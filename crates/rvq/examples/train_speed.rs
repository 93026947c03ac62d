//! Times training and encoding of one paper-config quantizer on Gaussian data, and reports the
//! relative MSE of beam search widths on held-out vectors:
//! `cargo run --release -p rvq --example train_speed -- [vectors] [kmeans_iters] [codebook_size]`.
use rvq::rng::SplitMix64;
use rvq::train::SliceSource;
use rvq::{Rvq, TrainConfig};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(98_304);
    let iters = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(TrainConfig::paper().kmeans_iters);
    let size = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(TrainConfig::paper().size);
    let mut rng = SplitMix64::new(1);
    let data: Vec<f32> = (0..n * 32).map(|_| rng.unit() as f32 - 0.5).collect();
    let held_out: Vec<f32> = (0..4096 * 32).map(|_| rng.unit() as f32 - 0.5).collect();
    let cfg = TrainConfig {
        kmeans_iters: iters,
        size,
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
        "train {n} vectors (C = {size}, k-means iterations {iters}): {train_s:.2}s; greedy encode {enc:.0} vectors/s; \
         final relative MSE on the sample {:.4}",
        report.stages.last().unwrap().relative_mse
    );
    println!(
        "| beam | relative MSE (held out) | vs greedy | encode vectors/s |\n|---|---|---|---|"
    );
    let mut greedy = 0.0;
    for beam in [1, 2, 4, 8] {
        let t = Instant::now();
        let (err, energy) = q.squared_error(&held_out, beam).unwrap();
        let speed = 4096.0 / t.elapsed().as_secs_f64();
        let mse = err / energy;
        if beam == 1 {
            greedy = mse;
        }
        println!(
            "| {beam} | {mse:.4} | {:+.1}% | {speed:.0} |",
            (mse / greedy - 1.0) * 100.0
        );
    }
}
