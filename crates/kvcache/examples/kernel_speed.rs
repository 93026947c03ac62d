//! One KV head's decode-step kernels on codes alone (fused keys, fused values, and the two
//! steps of the histogram value path), single thread, ns per key:
//! `cargo run --release -p kvcache --example kernel_speed -- [context] [reps]` (`SIZE=` codebook size).
use kvcache::rope::{Rope, RopeLayout};
use kvcache::rvq::kernels::{
    fused_key_scores, fused_value_sums, histogram_len, histograms_times_codebooks, value_histograms,
};
use rvq::rng::SplitMix64;
use rvq::{I8Rvq, Quantizer, Rvq};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(8192);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let size: usize = std::env::var("SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    let mut rng = SplitMix64::new(1);
    let books = (0..8)
        .map(|s| {
            (0..size * 32)
                .map(|_| rng.normal() / (s + 1) as f32)
                .collect()
        })
        .collect();
    let q8 = I8Rvq::from_rvq(&Rvq::from_codebooks(32, size, books).unwrap()).unwrap();
    let rope = Rope::new(64, 100000.0, n + 1, RopeLayout::Interleaved);
    let codes: Vec<u16> = (0..n * 16).map(|_| rng.below(size) as u16).collect();
    let scales = vec![1f32; n];
    let q: Vec<f32> = (0..3 * 64).map(|_| rng.normal()).collect();
    let mut scores = vec![0f32; 3 * n];
    let time = |f: &mut dyn FnMut()| {
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e9 / n as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    let keys = time(&mut || {
        fused_key_scores(&q8, &rope, &codes, &scales, 0, &q, &mut scores, n);
    });
    let weights: Vec<f32> = (0..n * 4).map(|_| rng.unit() as f32).collect();
    let mut sums = vec![0f32; 3 * 64];
    let values = time(&mut || {
        // [3, n] of the same weights.
        fused_value_sums(
            &q8 as &dyn Quantizer,
            2,
            &codes,
            &weights[..3 * n],
            &mut sums,
        );
    });
    let hist_len = histogram_len(&q8, 2, 3);
    let mut hist = vec![0f32; hist_len];
    let scatter = time(&mut || {
        hist.fill(0.0);
        value_histograms(&q8, 2, &codes, &weights, &mut hist);
    });
    let product = time(&mut || {
        histograms_times_codebooks(&q8, 2, &hist, 3, &mut sums);
    });
    println!("{n} keys, C = {size}: keys {keys:.1} ns/key, values {values:.1} ns/value (3 rows, 1 thread)");
    println!(
        "  values by histograms: {scatter:.1} ns/value to fill them, {product:.1} ns/value for their product with the codebooks"
    );
    std::hint::black_box((&scores, &sums));
}
