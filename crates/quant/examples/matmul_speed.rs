//! Time of one weight matrix's products at a decode step (1 row) and batches of rows, per type,
//! with the weights read from memory as in a model's forward pass (copies of the matrix, together
//! larger than the caches, are multiplied in turn):
//! `cargo run --release -p quant --example matmul_speed [ROWS COLS]`.

use quant::{Bytes, QMatrix, WeightType};
use std::sync::Arc;
use std::time::Instant;

/// Bytes of weight copies cycled through, beyond any last-level cache.
const COLD_BYTES: usize = 256 << 20;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (rows, cols) = (*args.first().unwrap_or(&3072), *args.get(1).unwrap_or(&768));
    for ty in [
        WeightType::Q4_1,
        WeightType::Q8_0,
        WeightType::Q4K,
        WeightType::Q6K,
    ]
    .into_iter()
    .filter(|ty| cols % ty.block().0 == 0)
    {
        let n = ty.bytes_for(rows * cols).expect("whole blocks");
        let cold = std::env::var("WARM").is_err();
        let copies: Vec<QMatrix> = (0..if cold { COLD_BYTES.div_ceil(n) } else { 1 })
            .map(|_| {
                // Small scales everywhere (the bytes' content does not change the speed).
                let bytes: Bytes = Arc::new(vec![0x11u8; n]);
                QMatrix::new(ty, rows, cols, bytes, 0).expect("matrix")
            })
            .collect();
        for batch in [1usize, 4, 8, 16, 64] {
            let x: Vec<f32> = (0..batch * cols).map(|i| (i as f32 * 0.01).sin()).collect();
            let reps = copies.len().max(if batch < 64 { 100 } else { 10 });
            // The fastest of several rounds: this machine's noise only ever adds time.
            let s = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for m in copies.iter().cycle().take(reps) {
                        std::hint::black_box(m.matmul(&x));
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min);
            let gmacs = (rows * cols * batch) as f64 / s / 1e9;
            println!(
                "{ty:?} [{rows}, {cols}] x {batch:>2} rows: {:8.1} us  {gmacs:6.1} GMAC/s",
                s * 1e6
            );
        }
    }
}
