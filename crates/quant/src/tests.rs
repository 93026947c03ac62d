//! Every format against independent references: candle's dequantization of the same bytes, and
//! each product against f64 sums of dequantized weights times the quantized activations, at
//! every SIMD level this CPU has.

use super::*;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::Device;
use proptest::prelude::*;

const INTEGER_TYPES: [(WeightType, GgmlDType); 11] = [
    (WeightType::Q4_0, GgmlDType::Q4_0),
    (WeightType::Q4_1, GgmlDType::Q4_1),
    (WeightType::Q5_0, GgmlDType::Q5_0),
    (WeightType::Q5_1, GgmlDType::Q5_1),
    (WeightType::Q8_0, GgmlDType::Q8_0),
    (WeightType::Q2K, GgmlDType::Q2K),
    (WeightType::Q3K, GgmlDType::Q3K),
    (WeightType::Q4K, GgmlDType::Q4K),
    (WeightType::Q5K, GgmlDType::Q5K),
    (WeightType::Q6K, GgmlDType::Q6K),
    (WeightType::Q8K, GgmlDType::Q8K),
];

/// Where each type keeps its f16 (or f32) scales, by byte offset in the block.
fn scale_fields(ty: WeightType) -> &'static [usize] {
    match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_1 | WeightType::Q5_1 => &[0, 2],
        WeightType::Q2K => &[80, 82],
        WeightType::Q3K => &[108],
        WeightType::Q4K | WeightType::Q5K => &[0, 2],
        WeightType::Q6K => &[208],
        _ => &[],
    }
}

/// Random blocks of `ty` for a [rows, cols] matrix, with finite scales of a realistic size.
fn random_blocks(ty: WeightType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let (_, bytes) = ty.block();
    let n = ty.bytes_for(rows * cols).unwrap();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut data: Vec<u8> = (0..n).map(|_| next() as u8).collect();
    for block in data.chunks_exact_mut(bytes) {
        for &at in scale_fields(ty) {
            let v = ((next() % 2000) as f32 - 1000.0) * 1e-5;
            block[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
        if ty == WeightType::Q8K {
            let v = ((next() % 2000) as f32 - 1000.0) * 1e-5;
            block[..4].copy_from_slice(&v.to_le_bytes());
        }
    }
    data
}

fn matrix(ty: WeightType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let bytes: Bytes = Arc::new(random_blocks(ty, rows, cols, seed));
    QMatrix::new(ty, rows, cols, bytes, 0).unwrap()
}

#[test]
fn dequantization_matches_candle_for_every_type() {
    for (ty, candle_ty) in INTEGER_TYPES {
        let (rows, cols) = (3, 512);
        let data = random_blocks(ty, rows, cols, 7);
        let m = QMatrix::new(ty, rows, cols, Arc::new(data.clone()), 0).unwrap();
        // Every level gives the same values (the AVX2 build converts the scales with F16C).
        let levels = simd::at_each_level(|_| m.dequantize());
        for (level, values) in &levels[1..] {
            assert_eq!(values, &levels[0].1, "{ty:?} at {level:?}");
        }
        let ours = levels[0].1.clone();
        let theirs = if ty == WeightType::Q8K {
            // candle cannot dequantize Q8_K: its closed form, d·q per 256 weights.
            data.chunks_exact(292)
                .flat_map(|b| {
                    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    b[4..260].iter().map(move |&q| d * q as i8 as f32)
                })
                .collect()
        } else {
            qtensor_from_ggml(candle_ty, &data, vec![rows, cols], &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            // Same values up to the rounding of d·(q − c) against d·q − d·c.
            assert!(
                (a - b).abs() <= 1e-6 * scale,
                "{ty:?} weight {i}: ours {a}, candle {b}"
            );
        }
        let mut row = vec![0f32; cols];
        m.dequantize_row(2, &mut row);
        assert_eq!(row, ours[2 * cols..]);
    }
}

/// x·Wᵀ in f64 from the dequantized weights and the activations the kernel multiplies, and
/// Σ|w·x| of each product: the size its f32 rounding scales with.
fn reference(m: &QMatrix, x: &Q8Rows) -> (Vec<f64>, Vec<f64>) {
    let w = m.dequantize();
    let xs = x.dequantize();
    let (rows, cols) = m.shape();
    let (mut exact, mut size) = (vec![0f64; x.rows * rows], vec![0f64; x.rows * rows]);
    for r in 0..x.rows {
        for j in 0..rows {
            for i in 0..cols {
                let p = w[j * cols + i] as f64 * xs[r * cols + i] as f64;
                exact[r * rows + j] += p;
                size[r * rows + j] += p.abs();
            }
        }
    }
    (exact, size)
}

fn check_products(ty: WeightType, rows: usize, cols: usize, n: usize, seed: u64) {
    let m = matrix(ty, rows, cols, seed);
    let x: Vec<f32> = (0..n * cols)
        .map(|i| ((i as u64 * 2654435761 + seed) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let xq = Q8Rows::quantize(&x, cols);
    let (exact, size) = reference(&m, &xq);
    for (level, y) in simd::at_each_level(|_| m.matmul(&x)) {
        for (i, ((&y, e), s)) in y.iter().zip(&exact).zip(&size).enumerate() {
            // f32 sums of a few hundred terms of mixed sign: relative error ≤ ~n·2⁻²⁴ of Σ|w·x|.
            assert!(
                (y as f64 - e).abs() <= 2e-6 * (cols as f64).sqrt() * s + 1e-30,
                "{ty:?} at {level:?}, product {i}: {y} vs {e} (Σ|wx| {s})"
            );
        }
    }
}

#[test]
fn products_match_the_f64_reference_at_every_level() {
    for (ty, _) in INTEGER_TYPES {
        for n in [1, 3, 4, 6] {
            check_products(ty, 37, 512, n, n as u64);
        }
    }
}

#[test]
fn every_level_gives_the_same_bits_except_the_portable_order() {
    // AVX2 and VNNI sum the same exact integers in the same float order.
    let m = matrix(WeightType::Q4K, 64, 256, 3);
    // One row takes the one-row kernel, 9 the batched one (2 weight rows a step on AVX2, 4 with
    // VNNI: the same order per row).
    let x: Vec<f32> = (0..10 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    let results = simd::at_each_level(|_| (m.matmul(&x[..256]), m.matmul(&x[256..])));
    let simd: Vec<_> = results
        .iter()
        .filter(|(l, _)| *l != simd::Level::Portable)
        .collect();
    for pair in simd.windows(2) {
        assert_eq!(pair[0].1, pair[1].1, "{:?} vs {:?}", pair[0].0, pair[1].0);
    }
}

#[test]
fn a_product_row_does_not_depend_on_the_batch_it_is_in() {
    // Decode (one row: 8 weight rows per register) and batches (8 activation rows per register,
    // a partial last group) sum in the same order: the same bits for the same token, whatever
    // rows share the call, in every format; 37 weight rows leave partial groups of weight rows.
    let (rows, cols, n) = (37, 512, 17);
    let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.11).cos()).collect();
    let part = |from: usize, to: usize| &x[from * cols..to * cols];
    for (ty, _) in INTEGER_TYPES {
        let m = matrix(ty, rows, cols, 5);
        // Inside `at_each_level`, so no other test changes the level meanwhile.
        simd::at_each_level(|level| {
            let all = m.matmul(&x);
            for (from, to) in [(0, 2), (0, LANES_FROM), (0, 8), (0, 9), (5, 14)] {
                let some = m.matmul(part(from, to));
                let expected = &all[from * rows..to * rows];
                assert_eq!(some, expected, "{ty:?}, rows {from}..{to} at {level:?}");
            }
            for r in 0..n {
                let one = m.matmul(part(r, r + 1));
                assert_eq!(
                    one,
                    all[r * rows..(r + 1) * rows],
                    "{ty:?}, row {r} at {level:?}"
                );
            }
        });
    }
}

#[test]
fn a_nan_activation_makes_its_row_s_products_nan_at_every_level() {
    let m = matrix(WeightType::Q4_1, 8, 64, 2);
    // One row alone, and the same rows in a batch (other rows in the same registers).
    for n in [2, LANES_FROM + 2] {
        let mut x = vec![0.25f32; n * 64];
        x[64 + 5] = f32::NAN;
        for (level, y) in simd::at_each_level(|_| m.matmul(&x)) {
            for (r, y) in y.chunks_exact(8).enumerate() {
                let nan = r == 1;
                assert!(
                    y.iter().all(|v| v.is_nan() == nan),
                    "row {r} of {n} at {level:?}"
                );
            }
        }
    }
}

#[test]
fn bad_shapes_and_short_data_are_errors() {
    let data: Bytes = Arc::new(vec![0u8; 100]);
    assert!(matches!(
        QMatrix::new(WeightType::Q4K, 1, 100, data.clone(), 0),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(matches!(
        QMatrix::new(WeightType::Q4_0, 2, 64, data.clone(), 40),
        Err(QuantError::OutOfData { .. })
    ));
    assert!(matches!(
        QMatrix::new(WeightType::Q4_0, usize::MAX / 2, 64, data.clone(), 0),
        Err(QuantError::OutOfData { .. })
    ));
    assert!(matches!(
        QMatrix::new(WeightType::F16, 1, 32, data, 0),
        Err(QuantError::NoKernel(WeightType::F16))
    ));
    assert_eq!(WeightType::Q4K.bytes_for(255), None);
    assert_eq!(WeightType::Q4K.bytes_for(512), Some(288));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_shapes_match_the_reference(
        type_index in 0usize..11,
        rows in 1usize..40,
        blocks in 1usize..4,
        n in 1usize..6,
        seed in 0u64..1000,
    ) {
        let ty = INTEGER_TYPES[type_index].0;
        let cols = blocks * ty.block().0.max(32);
        check_products(ty, rows, cols, n, seed);
    }
}
