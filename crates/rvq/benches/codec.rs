//! `cargo bench -p rvq`: encode (greedy and beam 5) and decode throughput of paper-shaped
//! quantizers (d = 32, K = 8, C = 2048 and 256) on Gaussian vectors. The faiss comparison on the
//! same data is `scripts/bench_codec.sh` (it needs faiss from PyPI).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rvq::rng::SplitMix64;
use rvq::train::SliceSource;
use rvq::{Rvq, TrainConfig};
use std::hint::black_box;

const D: usize = 32;
const K: usize = 8;

fn trained(size: usize, rng: &mut SplitMix64) -> Rvq {
    let train: Vec<f32> = (0..8 * size * D).map(|_| rng.normal()).collect();
    let cfg = TrainConfig {
        size,
        kmeans_iters: 2,
        ..TrainConfig::paper()
    };
    Rvq::train(
        &cfg,
        &SliceSource {
            data: &train,
            dim: D,
        },
    )
    .expect("training")
    .0
}

fn codec(c: &mut Criterion) {
    let mut rng = SplitMix64::new(7);
    let n = 4096;
    let x: Vec<f32> = (0..n * D).map(|_| rng.normal()).collect();
    let mut group = c.benchmark_group("rvq");
    group.sample_size(10);
    group.throughput(Throughput::Elements(n as u64));
    for size in [2048, 256] {
        let q = trained(size, &mut rng);
        let mut codes = vec![0u16; n * K];
        for beam in [1, 5] {
            group.bench_with_input(
                BenchmarkId::new(format!("encode beam {beam}"), size),
                &beam,
                |b, &beam| b.iter(|| q.encode(black_box(&x), beam, &mut codes).unwrap()),
            );
        }
        let mut out = vec![0f32; n * D];
        q.encode(&x, 1, &mut codes).unwrap();
        group.bench_with_input(BenchmarkId::new("decode", size), &size, |b, _| {
            b.iter(|| q.decode(black_box(&codes), &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
