//! Decode-step attention cost of one layer at long context, RVQ vs dense caches, as ratios:
//! `cargo run --release -p kvcache --example attend_speed -- [context] [reps]`.
//! Random paper-shaped codebooks (d = 32, C = 2048, K = 8), SmolLM2's geometry (3 KV heads of 64,
//! 9 query heads). The model's own per-token work is not included: see `rvq-kv bench` for that.
use kvcache::dense::{F16Cache, F32Cache};
use kvcache::rvq::{BookPrecision, KernelPaths, RvqCache, RvqOptions, ValuePath};
use kvcache::testkit::codebooks_for;
use kvcache::{CacheShape, KvCache, ModelIdentity, Queries, Rope, RopeLayout};
use rvq::rng::SplitMix64;
use rvq::testkit::random_rvq;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let ctx: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(8192);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20);
    let shape = CacheShape {
        layers: 1,
        kv_heads: 3,
        head_dim: 64,
    };
    let rope: Arc<kvcache::LayerRopes> =
        Arc::new(Rope::new(64, 100000.0, ctx + 1, RopeLayout::Interleaved).into());
    let size: usize = std::env::var("SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2048);
    let mut rng = SplitMix64::new(1);
    let model = ModelIdentity {
        architecture: "llama".into(),
        layers: 1,
        kv_heads: 3,
        head_dim: 64,
        file_sha256: String::new(),
    };
    let books = codebooks_for(model, 32, || random_rvq(&mut rng, 32, size, 8));
    let books = Arc::new(books);
    let rvq_cache = |options| {
        let cache = RvqCache::new(shape, rope.clone(), books.clone(), options, "random".into());
        Box::new(cache.unwrap())
    };
    let mut caches: Vec<(&str, Box<dyn KvCache>)> = vec![
        ("f32", Box::new(F32Cache::new(shape, rope.clone()))),
        ("f16", Box::new(F16Cache::new(shape, rope.clone()))),
        ("rvq", rvq_cache(RvqOptions::default())),
        (
            "rvq, histogram values",
            rvq_cache(RvqOptions {
                paths: KernelPaths {
                    values: ValuePath::Histogram,
                    ..KernelPaths::default()
                },
                ..RvqOptions::default()
            }),
        ),
        (
            "rvq, fused values",
            rvq_cache(RvqOptions {
                paths: KernelPaths {
                    values: ValuePath::Fused,
                    ..KernelPaths::default()
                },
                ..RvqOptions::default()
            }),
        ),
        (
            "rvq,books=i8",
            rvq_cache(RvqOptions {
                books: BookPrecision::I8,
                ..RvqOptions::default()
            }),
        ),
        (
            "rvq,books=f32",
            rvq_cache(RvqOptions {
                books: BookPrecision::F32,
                ..RvqOptions::default()
            }),
        ),
    ];
    let mut rng = SplitMix64::new(2);
    let k: Vec<f32> = (0..ctx * 192).map(|_| rng.normal()).collect();
    let v: Vec<f32> = (0..ctx * 192).map(|_| rng.normal()).collect();
    let q: Vec<f32> = (0..9 * 64).map(|_| rng.normal()).collect();
    let mut base = 0.0;
    println!("| cache | attend ms (1 query, {ctx} keys; fastest of {reps}) | speed vs f16 |\n|---|---:|---:|");
    let mut rows = vec![];
    // `ONLY=rvq` times one cache (for profiling).
    let only = std::env::var("ONLY").ok();
    // `EVICT=1` overwrites 64 MB before every timed call, as a model's weights do between two
    // layers' attention: codebooks, codes and dense caches then come from memory, not L3.
    let mut evict = std::env::var("EVICT").is_ok().then(|| vec![0u8; 64 << 20]);
    for (name, cache) in caches.iter_mut() {
        if only
            .as_deref()
            .is_some_and(|o| o != *name && *name != "f16")
        {
            continue;
        }
        cache.append(0, &k, &v).unwrap();
        let queries = Queries {
            q: &q,
            tokens: 1,
            q_heads: 9,
            first_pos: ctx - 1,
            scale: 0.125,
            window: None,
        };
        let mut out = vec![0f32; 9 * 64];
        cache.attend(0, &queries, &mut out).unwrap();
        // The fastest of `reps` calls: the least disturbed by other work on the machine.
        let ms = (0..reps)
            .map(|_| {
                if let Some(junk) = &mut evict {
                    evict_caches(junk);
                }
                let t = Instant::now();
                cache.attend(0, &queries, &mut out).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min);
        if *name == "f16" {
            base = ms;
        }
        rows.push((name.to_string(), ms));
    }
    for (name, ms) in rows {
        println!("| {name} | {ms:.3} | {:.2}x |", base / ms);
    }
}

/// Writes every cache line of `junk` (larger than the last-level cache) so nothing of the
/// attention's data is left cached.
fn evict_caches(junk: &mut [u8]) {
    for line in junk.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    std::hint::black_box(junk);
}
