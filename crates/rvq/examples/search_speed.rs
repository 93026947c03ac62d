//! One stage's nearest-codeword search for a decode step's six vectors, single thread: the f32
//! row-search kernel against the integer (VNNI) kernel on the same i8 codebook, µs per search
//! and their ratio. `cargo run --release -p rvq --example search_speed -- [C] [reps] [books]`:
//! with `books` > 1 the searches cycle through that many codebooks (480 = SmolLM2's 30 layers
//! × K and V × 8 stages, 31 MB at C = 2048: what a decode step streams from memory), so each
//! search finds its codebook cold, as in the model (each search prefetches the next, as the
//! encoder does). An optional fourth argument searches that many vectors per call instead of
//! six (a prompt's batch: `-- 2048 200 480 384`).
use rvq::rng::SplitMix64;
use rvq::row_search;
use rvq::vnni_search::{self, StageBound};
use std::time::Instant;

/// One search: (codebook, the codebook to prefetch, codes out).
type Search<'a> = dyn FnMut(&[i8], &[i8], &mut [u32]) + 'a;

fn main() {
    let mut args = std::env::args().skip(1);
    let c: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2048);
    let reps: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let count: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1).max(1);
    let vectors: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(6).max(1);
    if !row_search::available(32) {
        eprintln!("the row-search kernel does not run here (needs AVX2, FMA, F16C)");
        return;
    }
    let mut rng = SplitMix64::new(1);
    let scale: Vec<f32> = (0..32).map(|j| 0.01 + 0.002 * j as f32).collect();
    let one: Vec<i8> = (0..c * 32)
        .map(|_| (rng.normal() * 45.0).round().clamp(-127.0, 127.0) as i8)
        .collect();
    // Copies with one byte changed each, so that no two share memory.
    let books: Vec<Vec<i8>> = (0..count)
        .map(|i| {
            let mut b = one.clone();
            let at = i % b.len();
            b[at] = b[at].wrapping_add(1).max(-127);
            b
        })
        .collect();
    let words: Vec<f32> = one
        .iter()
        .zip(scale.iter().cycle())
        .map(|(&q, s)| f32::from(q) * s)
        .collect();
    let norms = rvq::kernels::row_norms(&words, 32);
    let bound = StageBound::of(&one, &norms);
    // Residual-like vectors (times the scales, as the encoder passes them).
    let x: Vec<f32> = (0..vectors * 32)
        .map(|i| rng.normal() * 45.0 * scale[i % 32] * scale[i % 32])
        .collect();
    let mut best = vec![0u32; vectors];
    let mut time = |f: &mut Search| {
        let t = Instant::now();
        for i in 0..reps {
            f(&books[i % count], &books[(i + 1) % count], &mut best);
        }
        t.elapsed().as_secs_f64() * 1e6 / reps as f64
    };
    let f32_kernel =
        time(&mut |book, next, b| row_search::nearest_prefetching(book, &norms, &x, b, next));
    let int_kernel = time(&mut |book, next, b| {
        vnni_search::nearest_prefetching(book, &norms, bound, &x, b, next)
    });
    let f32_again =
        time(&mut |book, next, b| row_search::nearest_prefetching(book, &norms, &x, b, next));
    println!(
        "C = {c}, {vectors} vectors, {count} codebook(s): f32 kernel {:.2} µs, integer kernel {int_kernel:.2} µs ({}), \
         f32/integer {:.2}×",
        f32_kernel.min(f32_again),
        if vnni_search::available() { "VNNI" } else { "not available: the f32 kernel ran" },
        f32_kernel.min(f32_again) / int_kernel
    );
}
