//! Speed of greedy encoding through the lane kernel against the matrix-product path, as ratios
//! measured in this process (absolute timings on a shared VM are noise).
//!
//! `cargo run --release -p rvq --example lanes_speed`
//!
//! 1. A decode step: 6 vectors of d = 32 per quantizer, K = 8, C = 2048, over 60 quantizers
//!    (SmolLM2's 30 layers × K and V; 126 MB of f32 codebooks, so they come from memory as in
//!    the model), with the ordinary encoder (the row search of `rvq::row_search` where AVX2
//!    runs, else the matrix product) over f32 and over f16 codebooks (`HalfRvq`), and with
//!    `FewVectorEncoder` (a second copy of the codebooks, in f16 lanes).
//! 2. A batch: 16,384 vectors through one quantizer, C = 256 and 2048, on all threads
//!    (`RVQ_KV_SIMD=portable` gives the matrix-product path for comparison: run both).

use rvq::few::FewVectorEncoder;
use rvq::rng::SplitMix64;
use rvq::{HalfRvq, Quantizer, Rvq};
use std::time::Instant;

fn quantizer(rng: &mut SplitMix64, c: usize) -> Rvq {
    let books = (0..8)
        .map(|s| (0..c * 32).map(|_| rng.normal() / (s + 1) as f32).collect())
        .collect();
    Rvq::from_codebooks(32, c, books).unwrap()
}

/// Fastest of `reps` runs of `f`, in seconds.
fn fastest(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let mut rng = SplitMix64::new(1);
    println!("SIMD level: {:?}", simd::level());
    let qs: Vec<Rvq> = (0..60).map(|_| quantizer(&mut rng, 2048)).collect();
    let x: Vec<f32> = (0..6 * 32).map(|_| rng.normal()).collect();
    let mut codes = vec![0u16; 6 * 8];
    let plain = fastest(5, || {
        for q in &qs {
            q.encode(&x, 1, &mut codes).unwrap();
        }
    });
    println!(
        "decode step, 60 quantizers x 6 vectors: f32 codebooks {:.2} ms",
        plain * 1e3
    );
    let halves: Vec<HalfRvq> = qs.iter().map(|q| HalfRvq::from_rvq(q).unwrap()).collect();
    let half = fastest(5, || {
        for q in &halves {
            Quantizer::encode(q, &x, 1, &mut codes).unwrap();
        }
    });
    println!(
        "  f16 codebooks {:.2} ms ({:.2}x)",
        half * 1e3,
        plain / half
    );
    // The same from cache: one quantizer's 1 MB of f16 codebooks searched 60 times (the
    // arithmetic alone, without the memory traffic of 60 distinct quantizers).
    let warm = fastest(5, || {
        for _ in 0..60 {
            Quantizer::encode(&halves[0], &x, 1, &mut codes).unwrap();
        }
    });
    println!(
        "  f16 codebooks, one quantizer 60 times (from cache) {:.2} ms",
        warm * 1e3
    );
    let few: Option<Vec<FewVectorEncoder>> = qs.iter().map(|q| FewVectorEncoder::new(q)).collect();
    match few {
        Some(few) => {
            let lanes = fastest(5, || {
                for (q, f) in qs.iter().zip(&few) {
                    assert!(f.encode(q, &x, &mut codes).unwrap());
                }
            });
            println!(
                "  f16 lanes {:.2} ms ({:.2}x faster; {} MB of lanes)",
                lanes * 1e3,
                plain / lanes,
                few.iter().map(FewVectorEncoder::bytes).sum::<u64>() >> 20
            );
        }
        None => println!("  no lane encoder at this SIMD level"),
    }
    drop(qs);
    for c in [256, 2048] {
        let q = quantizer(&mut rng, c);
        let n = 16384;
        let x: Vec<f32> = (0..n * 32).map(|_| rng.normal()).collect();
        let mut codes = vec![0u16; n * 8];
        let t = fastest(3, || q.encode(&x, 1, &mut codes).unwrap());
        println!("batch greedy, C = {c}: {:.0} vectors/s", n as f64 / t);
    }
}
