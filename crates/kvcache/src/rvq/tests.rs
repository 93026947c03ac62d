use super::*;
use crate::attention;
use crate::{ModelIdentity, RopeLayout};
use half::f16;
use rvq::rng::SplitMix64;
use rvq::Grouping;

const SHAPE: CacheShape = CacheShape {
    layers: 2,
    kv_heads: 2,
    head_dim: 8,
};

fn identity() -> ModelIdentity {
    ModelIdentity {
        architecture: "llama".into(),
        layers: 2,
        kv_heads: 2,
        head_dim: 8,
        file_sha256: "ab".repeat(32),
    }
}

/// Random codebooks whose values f16 holds exactly, so the default f16 cache and the f32
/// references built from them agree (f16 rounding is tested on its own).
fn random_rvq(rng: &mut SplitMix64, d: usize, c: usize, k: usize) -> Rvq {
    HalfRvq::from_rvq(&rvq::testkit::random_rvq(rng, d, c, k))
        .unwrap()
        .to_rvq()
}

fn books(seed: u64) -> Codebooks {
    let mut rng = SplitMix64::new(seed);
    crate::testkit::codebooks_for(identity(), 4, || random_rvq(&mut rng, 4, 5, 3))
}

/// `cache` holding layer 0's `k` and `v` ([tokens, 128] each): the first `prefill` positions in
/// one append (the batch encoder), then one position per append (a decode step's encoder).
fn prefilled_then_decoded(mut cache: RvqCache, k: &[f32], v: &[f32], prefill: usize) -> RvqCache {
    let row = 128;
    cache
        .append(0, &k[..prefill * row], &v[..prefill * row])
        .unwrap();
    for t in prefill..k.len() / row {
        let at = t * row..(t + 1) * row;
        cache.append(0, &k[at.clone()], &v[at]).unwrap();
    }
    cache
}

/// The default kernels but for the value path.
fn values_by(values: ValuePath) -> KernelPaths {
    KernelPaths {
        values,
        ..KernelPaths::default()
    }
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| (rng.unit() as f32 - 0.5) * 3.0).collect()
}

/// Query rows `first..first + rows` of `q` for [`SHAPE`]: 4 query heads of 8.
fn small_queries(q: &[f32], first: usize, rows: usize, window: Option<usize>) -> Queries<'_> {
    Queries {
        q: &q[first * 32..(first + rows) * 32],
        tokens: rows,
        q_heads: 4,
        first_pos: first,
        scale: 0.3,
        window,
    }
}

/// Query rows `first..first + rows` of `q` for [`paper_shaped`] caches: 6 query heads of 64.
fn paper_queries(q: &[f32], first: usize, rows: usize, window: Option<usize>) -> Queries<'_> {
    Queries {
        q: &q[first * 384..(first + rows) * 384],
        tokens: rows,
        q_heads: 6,
        first_pos: first,
        scale: 0.125,
        window,
    }
}

fn rope() -> Arc<LayerRopes> {
    Arc::new(Rope::new(8, 10000.0, 64, RopeLayout::Interleaved).into())
}

/// Slow reference of one stored head vector: scale = f16(std), strided/contiguous split,
/// greedy codes, decode, merge, times the scale.
fn reference(q: &Rvq, layout: &VectorLayout, v: &[f32]) -> Vec<f32> {
    let (scales, codes) = layout.encode(q, v, 1).unwrap();
    let mut out = vec![0f32; 8];
    let mut scratch = vec![0f32; 8];
    layout.decode_one(q, scales[0], &codes, &mut scratch, &mut out);
    out
}

#[test]
fn reads_return_decode_of_encode_and_memory_is_exact() {
    for rotation in [None, rvq::hadamard::Hadamard::largest_block(8)] {
        let mut b = books(1);
        for p in [&mut b.meta.keys, &mut b.meta.values] {
            p.as_mut().unwrap().rotation = rotation;
        }
        reads_return_decode_of_encode(Arc::new(b));
    }
}

/// The default options but f16 books: [`books`]' codewords are f16 values, so the cache
/// computes with exactly the reference's codewords (i8 books are tested on their own).
fn exact_books() -> RvqOptions {
    RvqOptions {
        books: BookPrecision::F16,
        ..RvqOptions::default()
    }
}

fn reads_return_decode_of_encode(b: Arc<Codebooks>) {
    let mut cache = RvqCache::new(SHAPE, rope(), b.clone(), exact_books(), "x".into()).unwrap();
    let tokens = 7;
    let k = data(tokens * 16, 2);
    let v = data(tokens * 16, 3);
    // Append in two pieces (prefill then decode) to exercise both paths.
    cache.append(1, &k[..5 * 16], &v[..5 * 16]).unwrap();
    cache.append(1, &k[5 * 16..], &v[5 * 16..]).unwrap();
    let (kl, vl) = (b.key_layout().unwrap(), b.value_layout().unwrap());
    for h in 0..2 {
        let mut keys = vec![0f32; tokens * 8];
        let mut values = vec![0f32; tokens * 8];
        cache.read_keys(1, h, 0..tokens, &mut keys).unwrap();
        cache.read_values(1, h, 0..tokens, &mut values).unwrap();
        for t in 0..tokens {
            let src = (t * 2 + h) * 8;
            let want_k = reference(b.layers[1].keys.as_ref().unwrap(), &kl, &k[src..src + 8]);
            let want_v = reference(b.layers[1].values.as_ref().unwrap(), &vl, &v[src..src + 8]);
            // Equal up to float rounding (the fast decoder scales before rotating back).
            for (got, want) in [(&keys, &want_k), (&values, &want_v)] {
                for (a, b) in got[t * 8..(t + 1) * 8].iter().zip(want) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                }
            }
        }
    }
    // Memory: per vector ceil(2 groups × 3 stages × 3 bits / 8) = 3 bytes of codes + 2 of scale.
    let m = cache.memory();
    assert_eq!(m.elements, (tokens * 2 * 8 * 2) as u64);
    assert_eq!(m.bytes, (tokens * 2 * 2 * (3 + 2)) as u64);
    // Codebooks: 2 layers × K and V × 3 stages × 5 codewords × (4 values in f16, an f32 norm).
    assert_eq!(m.fixed_bytes, 2 * 2 * 3 * 5 * (4 * 2 + 4));
}

#[test]
fn histogram_and_decode_value_paths_give_the_same_attention() {
    let b = Arc::new(books(6));
    let tokens = 40;
    let k = data(tokens * 16, 11);
    let v = data(tokens * 16, 12);
    let q = data(tokens * 4 * 8, 13);
    let cache_with = |values| {
        let o = RvqOptions {
            sinks: 2,
            recent: 5,
            paths: values_by(values),
            ..RvqOptions::default()
        };
        let mut c = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
        c.append(0, &k, &v).unwrap();
        c
    };
    for (first, rows) in [(0, tokens), (tokens - 1, 1), (tokens - 3, 3)] {
        let queries = small_queries(&q, first, rows, None);
        let mut reference = vec![0f32; rows * 32];
        let decode = cache_with(ValuePath::Decode);
        // The generic path reads dense values through `read`: an independent reference.
        attention::dense_attention(&decode, 0, &queries, &mut reference).unwrap();
        for path in [ValuePath::Decode, ValuePath::Histogram, ValuePath::Auto] {
            let mut out = vec![0f32; rows * 32];
            cache_with(path).attend(0, &queries, &mut out).unwrap();
            for (a, r) in out.iter().zip(&reference) {
                assert!((a - r).abs() < 1e-5, "{path:?} rows {rows}: {a} vs {r}");
            }
        }
    }
}

/// Paper-shaped groups (d = 32 of a 64-channel head, so the d = 32 fast paths run) with
/// small codebooks, one layer.
fn paper_shaped(keys: Grouping, seed: u64) -> (CacheShape, Codebooks) {
    let mut rng = SplitMix64::new(seed);
    let shape = CacheShape {
        layers: 1,
        kv_heads: 2,
        head_dim: 64,
    };
    let model = ModelIdentity {
        layers: 1,
        head_dim: 64,
        ..identity()
    };
    let mut books =
        crate::testkit::codebooks_for(model, 32, || rvq::testkit::random_rvq(&mut rng, 32, 37, 3));
    books.meta.keys.as_mut().unwrap().grouping = keys;
    (shape, books)
}

/// A cache over `books` with (sinks, recent) windows and (keys, values) paths, holding
/// `k` and `v` in layer 0.
fn filled(
    shape: CacheShape,
    rope: &Arc<LayerRopes>,
    books: &Arc<Codebooks>,
    (sinks, recent): (usize, usize),
    (keys, values): (KeyPath, ValuePath),
    k: &[f32],
    v: &[f32],
) -> RvqCache {
    let o = RvqOptions {
        sinks,
        recent,
        paths: KernelPaths {
            keys,
            values,
            ..KernelPaths::default()
        },
        ..RvqOptions::default()
    };
    let mut c = RvqCache::new(shape, rope.clone(), books.clone(), o, "x".into()).unwrap();
    c.append(0, k, v).unwrap();
    c
}

#[test]
fn fused_keys_and_fused_or_histogram_values_equal_dense_attention_at_every_level() {
    let tokens = 300; // crosses the 64- and 256-position blocks
    let (k, v) = (data(tokens * 128, 21), data(tokens * 128, 22));
    let q = data(tokens * 6 * 64, 23);
    for (grouping, rope_layout) in [
        (Grouping::Strided, RopeLayout::Interleaved),
        (Grouping::Strided, RopeLayout::HalfSplit),
        (Grouping::Contiguous, RopeLayout::Interleaved),
    ] {
        let (shape, b) = paper_shaped(grouping, 5);
        let b = Arc::new(b);
        let rope: Arc<LayerRopes> = Arc::new(Rope::new(64, 500.0, 400, rope_layout).into());
        for (sinks, recent) in [(0, 0), (3, 20)] {
            let cache_with =
                |keys, values| filled(shape, &rope, &b, (sinks, recent), (keys, values), &k, &v);
            let reference_cache = cache_with(KeyPath::Decode, ValuePath::Decode);
            for values in [ValuePath::Histogram, ValuePath::Fused] {
                let fast = cache_with(KeyPath::Fused, values);
                let group_rope = fast.parts[0][0].group_rope.as_ref();
                assert!(group_rope.is_some(), "{grouping:?} {rope_layout:?}");
                // A decode step's rows take the fused kernel where the head shape allows it.
                let (q0, _) = fast.parts[0][0].quant.as_ref().unwrap();
                assert_eq!(
                    kernels::fuses(q0.as_ref(), group_rope.unwrap()),
                    grouping == Grouping::Strided && rope_layout == RopeLayout::Interleaved
                );
                for (first, rows, window) in [
                    (tokens - 1, 1, None),
                    (tokens - 3, 3, Some(100)),
                    (0, tokens, None),
                ] {
                    let queries = paper_queries(&q, first, rows, window);
                    // Dense reads (`read` → RoPE → products): an independent reference.
                    let mut want = vec![0f32; rows * 384];
                    attention::dense_attention(&reference_cache, 0, &queries, &mut want).unwrap();
                    let each = simd::at_each_level(|_| {
                        let mut out = vec![0f32; rows * 384];
                        fast.attend(0, &queries, &mut out).unwrap();
                        out
                    });
                    for (level, out) in &each {
                        for (a, r) in out.iter().zip(&want) {
                            let what = format!("{grouping:?} {rope_layout:?} {values:?} sinks {sinks} recent {recent} rows {rows} {level:?}");
                            assert!((a - r).abs() < 1e-4 * (1.0 + r.abs()), "{what}: {a} vs {r}");
                        }
                    }
                    // Every compiled version gives the same bits.
                    assert!(each.iter().all(|(_, o)| *o == each[0].1));
                }
            }
        }
    }
}

#[test]
fn a_decode_step_over_key_parts_equals_dense_attention() {
    // 2,200 keys: a decode step scores and reduces them in two parts, each a task.
    let tokens = 2200;
    let (k, v) = (data(tokens * 128, 51), data(tokens * 128, 52));
    let q = data(tokens * 384, 53);
    let (shape, b) = paper_shaped(Grouping::Strided, 7);
    let b = Arc::new(b);
    let rope: Arc<LayerRopes> =
        Arc::new(Rope::new(64, 500.0, tokens + 1, RopeLayout::Interleaved).into());
    for (sinks, recent, window) in [(0, 0, None), (4, 50, None), (0, 0, Some(2100))] {
        let cache_with =
            |keys, values| filled(shape, &rope, &b, (sinks, recent), (keys, values), &k, &v);
        let queries = paper_queries(&q, tokens - 1, 1, window);
        // The f64 reference on the cache's own decoded keys and values ([tokens, 2, 64]).
        let reference = cache_with(KeyPath::Decode, ValuePath::Decode);
        let (mut dk, mut dv) = (vec![0f32; tokens * 128], vec![0f32; tokens * 128]);
        for h in 0..2 {
            let mut rows = vec![0f32; tokens * 64];
            for (part, dense) in [(Part::Keys, &mut dk), (Part::Values, &mut dv)] {
                reference.read(0, h, part, 0..tokens, &mut rows).unwrap();
                for (t, r) in rows.chunks_exact(64).enumerate() {
                    dense[(t * 2 + h) * 64..(t * 2 + h + 1) * 64].copy_from_slice(r);
                }
            }
        }
        let want = attention::reference_attention_from(
            &dk,
            &dv,
            queries.q,
            tokens - 1,
            rope.layer(0),
            shape,
            6,
            window,
        );
        let mut got = vec![0f32; 384];
        cache_with(KeyPath::Fused, ValuePath::Auto)
            .attend(0, &queries, &mut got)
            .unwrap();
        for (a, r) in got.iter().zip(&want) {
            assert!(
                (a - r).abs() < 1e-4 * (1.0 + r.abs()),
                "{sinks} {recent} {window:?}: {a} vs {r}"
            );
        }
    }
}

/// Every codeword rounded to f16 (kept in f32).
fn round_to_f16(b: &mut Codebooks) {
    let round = |q: &Arc<Rvq>| Arc::new(HalfRvq::from_rvq(q).unwrap().to_rvq());
    for layer in &mut b.layers {
        layer.keys = layer.keys.as_ref().map(round);
        layer.values = layer.values.as_ref().map(round);
    }
}

#[test]
fn f16_books_are_the_f32_books_rounded_to_f16_at_half_the_bytes() {
    let tokens = 300;
    let (k, v) = (data(tokens * 128, 41), data(tokens * 128, 42));
    let q = data(tokens * 6 * 64, 43);
    let rope: Arc<LayerRopes> = Arc::new(Rope::new(64, 500.0, 400, RopeLayout::Interleaved).into());
    let cache_with = |half_books: bool| {
        let (shape, mut b) = paper_shaped(Grouping::Strided, 9);
        if !half_books {
            round_to_f16(&mut b);
        }
        let o = RvqOptions {
            books: match half_books {
                true => BookPrecision::F16,
                false => BookPrecision::F32,
            },
            ..RvqOptions::default()
        };
        let c = RvqCache::new(shape, rope.clone(), Arc::new(b), o, "x".into()).unwrap();
        prefilled_then_decoded(c, &k, &v, 290)
    };
    let (mut half, mut full) = (cache_with(true), cache_with(false));
    assert!(full.spec().ends_with(",books=f32"));
    for (h, part) in [(0, Part::Keys), (1, Part::Values)] {
        let (mut a, mut b) = (vec![0f32; tokens * 64], vec![0f32; tokens * 64]);
        half.read(0, h, part, 0..tokens, &mut a).unwrap();
        full.read(0, h, part, 0..tokens, &mut b).unwrap();
        assert_eq!(a, b, "{part:?}");
    }
    for values in [ValuePath::Histogram, ValuePath::Decode] {
        half.set_value_path(values);
        full.set_value_path(values);
        for (first, rows) in [(tokens - 1, 1), (0, tokens)] {
            let queries = paper_queries(&q, first, rows, None);
            let (mut a, mut b) = (vec![0f32; rows * 384], vec![0f32; rows * 384]);
            half.attend(0, &queries, &mut a).unwrap();
            full.attend(0, &queries, &mut b).unwrap();
            assert_eq!(a, b, "{values:?}, {rows} rows");
        }
    }
    let (mh, mf) = (half.memory(), full.memory());
    assert_eq!(mh.bytes, mf.bytes);
    // Two parts × 3 stages × 37 codewords × (32 values in 2 bytes instead of 4, an f32 norm).
    assert_eq!(
        (mh.fixed_bytes, mf.fixed_bytes),
        (2 * 3 * 37 * (32 * 2 + 4), 2 * 3 * 37 * (32 * 4 + 4))
    );
}

#[test]
fn i8_books_attend_as_the_f32_books_of_their_dequantized_codewords() {
    let tokens = 300;
    let (k, v) = (data(tokens * 128, 44), data(tokens * 128, 45));
    let q = data(tokens * 6 * 64, 46);
    let rope: Arc<LayerRopes> = Arc::new(Rope::new(64, 500.0, 400, RopeLayout::Interleaved).into());
    let (shape, b) = paper_shaped(Grouping::Strided, 9);
    let mut dequantized = b.clone();
    let back = |q: &Arc<Rvq>| Arc::new(I8Rvq::from_rvq(q).unwrap().to_rvq());
    for layer in &mut dequantized.layers {
        layer.keys = layer.keys.as_ref().map(back);
        layer.values = layer.values.as_ref().map(back);
    }
    let cache_with = |b: Codebooks, books| {
        let o = RvqOptions {
            books,
            ..RvqOptions::default()
        };
        let c = RvqCache::new(shape, rope.clone(), Arc::new(b), o, "x".into()).unwrap();
        prefilled_then_decoded(c, &k, &v, 290)
    };
    let mut int8 = cache_with(b, BookPrecision::I8);
    let mut full = cache_with(dequantized, BookPrecision::F32);
    assert!(!int8.spec().contains(",books="), "i8 is the default");
    assert!(full.spec().ends_with(",books=f32"));
    assert_eq!(
        RvqOptions::parse("books=i8").unwrap().books,
        BookPrecision::I8
    );
    let close = |a: &[f32], b: &[f32], what: &str| {
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{what}: differs by {worst}");
    };
    // Random codebooks leave no near ties in these few decode steps: the same codes.
    for (h, part) in [(0, Part::Keys), (1, Part::Values)] {
        let (mut a, mut b) = (vec![0f32; tokens * 64], vec![0f32; tokens * 64]);
        int8.read(0, h, part, 0..tokens, &mut a).unwrap();
        full.read(0, h, part, 0..tokens, &mut b).unwrap();
        close(&a, &b, &format!("{part:?}"));
    }
    for values in [ValuePath::Fused, ValuePath::Histogram, ValuePath::Decode] {
        int8.set_value_path(values);
        full.set_value_path(values);
        for (first, rows) in [(tokens - 1, 1), (0, tokens)] {
            let queries = paper_queries(&q, first, rows, None);
            let (mut a, mut b) = (vec![0f32; rows * 384], vec![0f32; rows * 384]);
            int8.attend(0, &queries, &mut a).unwrap();
            full.attend(0, &queries, &mut b).unwrap();
            close(&a, &b, &format!("{values:?}, {rows} rows"));
        }
    }
    // Two parts × (3 stages × (37 codewords × (32 bytes + an f32 norm) + 32 f32 scales +
    // 32 i16 multipliers + a bound of two f32) + 32 f32 units).
    assert_eq!(
        int8.memory().fixed_bytes,
        2 * (3 * (37 * (32 + 4) + 32 * 4 + 32 * 2 + 8) + 32 * 4)
    );
}

#[test]
fn lane_encoder_stores_the_codes_of_the_default_encoder_for_its_bytes() {
    let (shape, mut b) = paper_shaped(Grouping::Strided, 8);
    // Codewords that f16 holds exactly, so the lane encoder's f16 search sees the very
    // codewords the default encoder does (its rounding is tested in `rvq::few`).
    round_to_f16(&mut b);
    let b = Arc::new(b);
    let rope: Arc<LayerRopes> = Arc::new(Rope::new(64, 500.0, 64, RopeLayout::Interleaved).into());
    let cache_with = |lane_encoder| {
        let o = RvqOptions {
            paths: KernelPaths {
                lane_encoder,
                ..KernelPaths::default()
            },
            ..RvqOptions::default()
        };
        RvqCache::new(shape, rope.clone(), b.clone(), o, "x".into()).unwrap()
    };
    let (mut plain, mut lanes) = (cache_with(false), cache_with(true));
    let (k, v) = (data(20 * 128, 31), data(20 * 128, 32));
    // A 12-token prefill, then decode steps of one token.
    for (t0, t1) in [(0, 12), (12, 13), (13, 14), (14, 20)] {
        let (kt, vt) = (&k[t0 * 128..t1 * 128], &v[t0 * 128..t1 * 128]);
        plain.append(0, kt, vt).unwrap();
        lanes.append(0, kt, vt).unwrap();
    }
    for (h, part) in [(0, Part::Keys), (1, Part::Values)] {
        let (mut a, mut c) = (vec![0f32; 20 * 64], vec![0f32; 20 * 64]);
        plain.read(0, h, part, 0..20, &mut a).unwrap();
        lanes.read(0, h, part, 0..20, &mut c).unwrap();
        assert_eq!(a, c, "{part:?}");
    }
    let (mp, ml) = (plain.memory(), lanes.memory());
    assert_eq!(mp.bytes, ml.bytes);
    // Two parts × 3 stages × 48 padded codewords × 32 × 2 bytes (f16).
    let copy = if rvq::lanes::available(32) {
        2 * 3 * 48 * 32 * 2
    } else {
        0
    };
    assert_eq!(ml.fixed_bytes - mp.fixed_bytes, copy);
}

#[test]
fn stages_option_uses_the_first_stages_only() {
    let b = Arc::new(books(2));
    let o = RvqOptions {
        stages: Some(2),
        ..exact_books()
    };
    let mut cache = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
    let v = data(16, 7);
    cache.append(0, &v, &v).unwrap();
    let q = b.layers[0].values.as_ref().unwrap().truncated(2).unwrap();
    let mut got = vec![0f32; 8];
    cache.read_values(0, 0, 0..1, &mut got).unwrap();
    assert_eq!(got, reference(&q, &b.value_layout().unwrap(), &v[..8]));
    // 2 groups × 2 stages × 3 bits = 12 bits → 2 bytes of codes + 2 of scale per vector.
    assert_eq!(cache.memory().bytes, 2 * 2 * (2 + 2));
    let too_deep = RvqOptions {
        stages: Some(4),
        ..RvqOptions::default()
    };
    let e = RvqCache::new(SHAPE, rope(), b, too_deep, "x".into())
        .err()
        .unwrap();
    assert!(e.to_string().contains("stages=4"), "{e}");
}

#[test]
fn sinks_and_recent_window_stay_f16() {
    let b = Arc::new(books(4));
    let o = RvqOptions {
        sinks: 2,
        recent: 3,
        ..exact_books()
    };
    let mut cache = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
    let tokens = 9;
    let k = data(tokens * 16, 5);
    let v = data(tokens * 16, 6);
    for t in 0..tokens {
        cache
            .append(0, &k[t * 16..(t + 1) * 16], &v[t * 16..(t + 1) * 16])
            .unwrap();
    }
    let mut keys = vec![0f32; tokens * 8];
    cache.read_keys(0, 1, 0..tokens, &mut keys).unwrap();
    let kl = b.key_layout().unwrap();
    for t in 0..tokens {
        let src = &k[(t * 2 + 1) * 8..(t * 2 + 2) * 8];
        let want: Vec<f32> = if t < 2 || t >= tokens - 3 {
            src.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
        } else {
            let f16_src: Vec<f32> = src.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            reference(b.layers[0].keys.as_ref().unwrap(), &kl, &f16_src)
        };
        assert_eq!(&keys[t * 8..(t + 1) * 8], want.as_slice(), "position {t}");
    }
    // 5 positions in f16 (16 bytes per vector), 4 encoded (5 bytes), 2 heads, K and V.
    assert_eq!(cache.memory().bytes, 2 * 2 * (5 * 16 + 4 * 5));
}

#[test]
fn sliding_window_forgets_codes_and_attends_as_a_cache_that_keeps_them() {
    let b = Arc::new(books(5));
    let (tokens, window) = (12, 4);
    let (k, v, q) = (
        data(tokens * 16, 21),
        data(tokens * 16, 22),
        data(tokens * 32, 23),
    );
    for values in [ValuePath::Decode, ValuePath::Histogram] {
        let o = RvqOptions {
            sinks: 1,
            paths: values_by(values),
            ..RvqOptions::default()
        };
        let mut keeps = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
        let mut forgets = keeps.clone();
        for t in 0..tokens {
            let queries = small_queries(&q, t, 1, Some(window));
            let (mut want, mut got) = (vec![0f32; 32], vec![0f32; 32]);
            for (cache, out) in [(&mut keeps, &mut want), (&mut forgets, &mut got)] {
                let (kt, vt) = (&k[t * 16..(t + 1) * 16], &v[t * 16..(t + 1) * 16]);
                cache.append(0, kt, vt).unwrap();
                cache.attend(0, &queries, out).unwrap();
            }
            forgets.forget_before(0, (t + 2).saturating_sub(window));
            assert_eq!(got, want, "{values:?} position {t}");
        }
        // Kept: the sink and positions 9..12 (3 coded); gone: coded positions 1..9.
        let per_code = 3 + 2; // bytes of codes (2 groups x 3 stages x 3 bits) and scale
        let kept = 2 * 2 * (16 + 3 * per_code);
        assert_eq!(forgets.memory().bytes, kept as u64);
        // 4 positions held per head and part (the sink and 9..12) of 8 channels.
        assert_eq!(forgets.memory().elements, 2 * 2 * 4 * 8);
        assert_eq!(keeps.memory().bytes, (2 * 2 * (16 + 11 * per_code)) as u64);
        let mut buf = vec![0f32; 8];
        let e = forgets.read_keys(0, 0, 8..9, &mut buf).unwrap_err();
        assert!(e.to_string().contains("dropped"), "{e}");
        let mut same = vec![0f32; 8];
        forgets.read_values(0, 1, 10..11, &mut buf).unwrap();
        keeps.read_values(0, 1, 10..11, &mut same).unwrap();
        assert_eq!(buf, same);
        // The sink stays; truncating into the dropped codes leaves sink-only storage.
        forgets.read_keys(0, 1, 0..1, &mut buf).unwrap();
        forgets.truncate(5);
        assert_eq!(forgets.memory().bytes, 2 * 2 * 16);
        forgets.truncate(0);
        assert_eq!(forgets.memory().bytes, 0);
    }
}

#[test]
fn rvq_specs_round_trip_and_bad_choices_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cb.safetensors");
    books(7).save(&path).unwrap();
    let config = crate::CacheConfig {
        shape: SHAPE,
        rope: rope(),
        model_id: Some(identity()),
    };
    let file = format!("rvq:{}", path.display());
    for opts in [
        "",
        ",sinks=2,recent=3,beam=2,stages=2",
        ",books=f32,only=k",
        ",books=f16",
    ] {
        let spec = format!("{file}{opts}");
        assert_eq!(crate::spec::build(&spec, &config).unwrap().spec(), spec);
    }
    let e = crate::spec::build(&format!("{file},books=f8"), &config)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("books=f8: expected i8, f16 or f32"),
        "{e}"
    );
}

#[test]
fn codebook_files_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cb.safetensors");
    books(7).save(&path).unwrap();
    let back = Codebooks::load(&path).unwrap();
    assert_eq!(back.layers[1].values, books(7).layers[1].values);
    back.check_model(&identity()).unwrap();
    let other = ModelIdentity {
        file_sha256: "cd".repeat(32),
        ..identity()
    };
    assert!(back
        .check_model(&other)
        .unwrap_err()
        .to_string()
        .contains("not for this model"));
    let mut bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    assert!(Codebooks::load(&cut)
        .unwrap_err()
        .to_string()
        .contains("truncated or corrupted"));
    // Flip bytes inside the JSON header: no longer parses.
    bytes[20] = b'{';
    bytes[21] = b'}';
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(Codebooks::load(&bad).is_err());
    // A model of another shape is refused by the cache.
    let shape = CacheShape { layers: 3, ..SHAPE };
    assert!(RvqCache::new(
        shape,
        rope(),
        Arc::new(books(7)),
        RvqOptions::default(),
        "x".into()
    )
    .is_err());
}

#[test]
fn beam_layers_encodes_the_first_layers_with_the_beam_and_the_rest_greedily() {
    let b = Arc::new(books(4));
    let (k, v) = (data(30 * 16, 31), data(30 * 16, 32));
    let cache = |beam, beam_layers| {
        let o = RvqOptions {
            beam,
            beam_layers,
            ..exact_books()
        };
        let mut c = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
        for layer in 0..SHAPE.layers {
            c.append(layer, &k, &v).unwrap();
        }
        c
    };
    let (greedy, beam, first) = (cache(1, None), cache(3, None), cache(3, Some(1)));
    let read = |c: &RvqCache, layer| {
        let mut out = vec![0f32; 30 * 8];
        c.read_keys(layer, 1, 0..30, &mut out).unwrap();
        out
    };
    assert_ne!(
        read(&greedy, 0),
        read(&beam, 0),
        "the beam must change some code"
    );
    assert_eq!(read(&first, 0), read(&beam, 0));
    assert_eq!(read(&first, 1), read(&greedy, 1));
    assert_eq!(first.spec(), "rvq:x,beam=3,beam-layers=1,books=f16");
}

/// Channel weights for `shape` equal within each of `rope`'s pairs, drawn from [0.2, 3).
fn pair_weights(shape: CacheShape, rope: &Rope, seed: u64) -> ChannelWeights {
    let mut rng = SplitMix64::new(seed);
    let hd = shape.head_dim;
    let mut w = vec![0f32; shape.kv_heads * hd];
    for head in w.chunks_exact_mut(hd) {
        for (a, b, _) in rope.pairs() {
            let x = 0.2 + 2.8 * rng.unit() as f32;
            (head[a], head[b]) = (x, x);
        }
    }
    w.into()
}

/// `books` with channel weights on both parts of every layer.
fn weighted(mut books: Codebooks, shape: CacheShape, rope: &Rope, seed: u64) -> Codebooks {
    for p in [&mut books.meta.keys, &mut books.meta.values] {
        p.as_mut().unwrap().weighted = true;
    }
    for (l, layer) in books.layers.iter_mut().enumerate() {
        let s = seed + 2 * l as u64;
        layer.weights = [
            Some(pair_weights(shape, rope, s)),
            Some(pair_weights(shape, rope, s + 1)),
        ];
    }
    books
}

#[test]
fn weighted_parts_read_back_the_weighted_code_unweighted() {
    let b = Arc::new(weighted(books(8), SHAPE, rope().layer(0), 40));
    let mut cache = RvqCache::new(SHAPE, rope(), b.clone(), exact_books(), "x".into()).unwrap();
    let tokens = 6;
    let (k, v) = (data(tokens * 16, 41), data(tokens * 16, 42));
    cache.append(1, &k[..4 * 16], &v[..4 * 16]).unwrap();
    cache.append(1, &k[4 * 16..], &v[4 * 16..]).unwrap();
    let layouts = [b.key_layout().unwrap(), b.value_layout().unwrap()];
    let quantizers = [&b.layers[1].keys, &b.layers[1].values];
    for (p, part) in [Part::Keys, Part::Values].into_iter().enumerate() {
        let w = b.layers[1].weights[p].as_ref().unwrap();
        for h in 0..2 {
            let w = &w[h * 8..(h + 1) * 8];
            let mut got = vec![0f32; tokens * 8];
            cache.read(1, h, part, 0..tokens, &mut got).unwrap();
            for t in 0..tokens {
                let src = [&k, &v][p][(t * 2 + h) * 8..][..8].to_vec();
                // Slow reference: encode x ⊙ w, decode, divide by w.
                let x: Vec<f32> = src.iter().zip(w).map(|(a, w)| a * w).collect();
                let q = quantizers[p].as_ref().unwrap();
                let want: Vec<f32> = reference(q, &layouts[p], &x)
                    .iter()
                    .zip(w)
                    .map(|(a, w)| a / w)
                    .collect();
                for (a, r) in got[t * 8..(t + 1) * 8].iter().zip(&want) {
                    assert!(
                        (a - r).abs() <= 1e-6 * (1.0 + r.abs()),
                        "{part:?} {a} vs {r}"
                    );
                }
            }
        }
    }
    // The weights are held beside the codebooks: 2 layers × 2 parts × [2 heads, 8] f32.
    let unweighted = RvqCache::new(SHAPE, rope(), Arc::new(books(8)), exact_books(), "x".into());
    assert_eq!(
        cache.memory().fixed_bytes - unweighted.unwrap().memory().fixed_bytes,
        2 * 2 * 16 * 4
    );
}

#[test]
fn weighted_keys_and_values_attend_through_the_fused_kernels_as_densely() {
    let tokens = 300;
    let (k, v) = (data(tokens * 128, 61), data(tokens * 128, 62));
    let q = data(tokens * 6 * 64, 63);
    for rope_layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
        let rope: Arc<LayerRopes> = Arc::new(Rope::new(64, 500.0, 400, rope_layout).into());
        let (shape, b) = paper_shaped(Grouping::Strided, 9);
        let b = Arc::new(weighted(b, shape, rope.layer(0), 64));
        let cache_with = |keys, values| filled(shape, &rope, &b, (2, 10), (keys, values), &k, &v);
        let reference_cache = cache_with(KeyPath::Decode, ValuePath::Decode);
        for values in [ValuePath::Histogram, ValuePath::Fused] {
            let fast = cache_with(KeyPath::Fused, values);
            for (first, rows) in [(tokens - 1, 1), (tokens - 3, 3), (0, tokens)] {
                let queries = paper_queries(&q, first, rows, None);
                let mut want = vec![0f32; rows * 384];
                attention::dense_attention(&reference_cache, 0, &queries, &mut want).unwrap();
                let mut got = vec![0f32; rows * 384];
                fast.attend(0, &queries, &mut got).unwrap();
                for (a, r) in got.iter().zip(&want) {
                    let what = format!("{rope_layout:?} {values:?} rows {rows}");
                    assert!((a - r).abs() < 1e-4 * (1.0 + r.abs()), "{what}: {a} vs {r}");
                }
            }
        }
    }
}

#[test]
fn channel_weights_are_saved_loaded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let rope = rope();
    let b = weighted(books(9), SHAPE, rope.layer(0), 70);
    b.save(&path).unwrap();
    let back = Codebooks::load(&path).unwrap();
    assert_eq!(back.layers[1].weights, b.layers[1].weights);
    assert_eq!(
        back.bytes() - books(9).bytes(),
        2 * 2 * 16 * 4,
        "weights are counted"
    );
    let refused = |b: Codebooks, want: &str| {
        let p = dir.path().join("bad.safetensors");
        b.save(&p).unwrap();
        let e = Codebooks::load(&p)
            .map(Arc::new)
            .and_then(|b| RvqCache::new(SHAPE, rope.clone(), b, exact_books(), "x".into()))
            .err()
            .unwrap_or_else(|| panic!("accepted, wanted an error with '{want}'"))
            .to_string();
        assert!(e.contains(want), "{e}");
    };
    // Settings that promise weights the file lacks.
    let mut missing = b.clone();
    missing.layers[0].weights[0] = None;
    refused(missing, "layer.0.k.weights");
    let mut zero = b.clone();
    let mut w = zero.layers[1].weights[1].as_deref().unwrap().to_vec();
    w[3] = 0.0;
    zero.layers[1].weights[1] = Some(w.into());
    refused(zero, "finite and positive");
    // Keys whose two channels of a RoPE pair differ cannot be scored by dividing the query.
    let mut unpaired = b.clone();
    let mut w = unpaired.layers[0].weights[0].as_deref().unwrap().to_vec();
    w[0] *= 1.5;
    unpaired.layers[0].weights[0] = Some(w.into());
    refused(unpaired, "differ within the RoPE pair (0, 1)");
}
