//! Time of one weight matrix's products at a decode step (1 row) and a prefill chunk, per type:
//! `cargo run --release -p quant --example matmul_speed [ROWS COLS]`.

use quant::{Bytes, QMatrix, WeightType};
use std::sync::Arc;
use std::time::Instant;

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
    ] {
        let n = ty.bytes_for(rows * cols).expect("whole blocks");
        // Small scales everywhere (the bytes' content does not change the speed).
        let bytes: Bytes = Arc::new(vec![0x11u8; n]);
        let m = QMatrix::new(ty, rows, cols, bytes, 0).expect("matrix");
        for batch in [1usize, 4, 8, 16, 64] {
            let x: Vec<f32> = (0..batch * cols).map(|i| (i as f32 * 0.01).sin()).collect();
            let reps = if batch < 64 { 400 } else { 40 };
            let _ = m.matmul(&x);
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(m.matmul(&x));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let gmacs = (rows * cols * batch) as f64 / s / 1e9;
            println!(
                "{ty:?} [{rows}, {cols}] x {batch:>2} rows: {:8.1} us  {gmacs:6.1} GMAC/s",
                s * 1e6
            );
        }
    }
}
