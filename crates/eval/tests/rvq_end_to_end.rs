//! The RVQ cache on the real model: calibration on a small slice of calibration text, then
//! perplexity on sotu-eval between the f16 cache and an untrained (random-codebook) cache.

mod common;
use common::{eval_tokens, home, model, small_calib_config};
use eval::calibrate::calibrate;
use eval::ppl::{perplexity, PplOptions, Protocol};
use kvcache::codebooks::Codebooks;
use kvcache::rvq::{BookPrecision, KeyPath, RvqCache, RvqOptions, ValuePath};
use rvq::rng::SplitMix64;
use rvq::Rvq;

fn calib_tokens() -> Vec<u32> {
    let path = eval::assets::ensure_calib(&home(), "wiki.utf8").unwrap();
    let text = eval::text::read_text(&path).unwrap();
    model().tokenizer.encode(&text, true).unwrap()
}

fn ppl(spec: &str) -> f64 {
    let opts = PplOptions {
        ctx: 512,
        max_tokens: Some(1024),
        protocol: Protocol::Windows,
        quiet: true,
    };
    let r = perplexity(model(), eval_tokens(), spec, &opts).unwrap();
    assert!(r.ppl.is_finite());
    r.ppl
}

#[test]
fn calibrated_cache_sits_between_f16_and_random_codebooks() {
    let dir = tempfile::tempdir().unwrap();
    let (books, _) = calibrate(model(), &calib_tokens(), &small_calib_config(1024), true).unwrap();
    let trained = dir.path().join("trained.safetensors");
    books.save(&trained).unwrap();

    // Same layout and sizes, codewords drawn at random: what training has to beat.
    let mut rng = SplitMix64::new(99);
    let mut random = books.clone();
    for layer in &mut random.layers {
        for q in [&mut layer.keys, &mut layer.values].into_iter().flatten() {
            let cbs = (0..q.stages())
                .map(|_| {
                    (0..q.size() * q.dim())
                        .map(|_| rng.unit() as f32 * 2.0 - 1.0)
                        .collect()
                })
                .collect();
            *q = Rvq::from_codebooks(q.dim(), q.size(), cbs).unwrap().into();
        }
    }
    let untrained = dir.path().join("random.safetensors");
    random.save(&untrained).unwrap();

    let f16 = ppl("f16");
    let rvq = ppl(&format!("rvq:{}", trained.display()));
    let rnd = ppl(&format!("rvq:{}", untrained.display()));
    assert!(
        f16 < rvq && rvq < rnd,
        "f16 {f16}, calibrated rvq {rvq}, random rvq {rnd}"
    );
    // Codebooks held in i8 (the default) against f16: the same codes' worth of quality, within
    // RVQ's float-level noise.
    let half = ppl(&format!("rvq:{},books=f16", trained.display()));
    assert!(
        f16 < half && (rvq / half - 1.0).abs() < 0.02,
        "f16 {f16}, rvq {rvq}, rvq with f16 books {half}"
    );

    // Accounting: 2 groups x 2 stages x 6 bits = 24 bits = 3 bytes + 2 bytes of scale per head
    // vector of 64 elements = 0.625 bits/element.
    let m = {
        let mut cache = model()
            .new_cache(&format!("rvq:{}", trained.display()))
            .unwrap();
        model()
            .forward(&eval_tokens()[..10], 0, cache.as_mut(), Some(1))
            .unwrap();
        cache.memory()
    };
    assert_eq!(m.bytes, 10 * 30 * 3 * 2 * 5);
    assert!((m.bits_per_element() - 0.625).abs() < 1e-12);
    // Codebooks held in i8 (the default), per layer and part: per stage 64 codewords of 32
    // bytes and an f32 norm each, per channel an f32 scale and an i16 multiplier of the part's
    // f32 unit, a search bound of two f32; in f16, 30 layers × K and V × 2 stages × 64
    // codewords × (32 × 2 bytes + an f32 norm).
    assert_eq!(
        m.fixed_bytes,
        30 * 2 * (2 * (64 * (32 + 4) + 32 * 4 + 32 * 2 + 8) + 32 * 4)
    );
    let spec = format!("rvq:{},books=f16", trained.display());
    let cache = model().new_cache(&spec).unwrap();
    assert_eq!(cache.memory().fixed_bytes, 30 * 2 * 2 * 64 * (32 * 2 + 4));

    // On one cache state, attention on codes (keys summed, rotated and dotted in registers;
    // values summed per token in registers, or through per-stage histograms) gives the logits
    // that decoding gives. (Two separate runs would not compare: a float-level difference in
    // one layer can flip a code of a later layer's key, and RVQ amplifies that — the recent
    // window keeps the new token out of the codes here.) With f32 weights: native weights
    // requantize activations to 8 bits, which turns last-bit differences into rounding steps.
    let tokens = &eval_tokens()[..41];
    let books = std::sync::Arc::new(Codebooks::load(&trained).unwrap());
    for precision in [BookPrecision::F16, BookPrecision::I8] {
        codes_give_the_logits_of_decoding(tokens, books.clone(), precision);
    }
}

/// See the end of [`calibrated_cache_sits_between_f16_and_random_codebooks`].
fn codes_give_the_logits_of_decoding(
    tokens: &[u32],
    books: std::sync::Arc<Codebooks>,
    precision: BookPrecision,
) {
    // f32 weights: 8-bit activations would turn the paths' last-bit differences into steps.
    let model = common::model_f32;
    let config = model().cache_config(false).unwrap();
    let options = RvqOptions {
        sinks: 2,
        recent: 4,
        books: precision,
        ..RvqOptions::default()
    };
    let mut decode =
        RvqCache::new(config.shape, config.rope, books, options, "trained".into()).unwrap();
    model()
        .forward(&tokens[..40], 0, &mut decode, Some(1))
        .unwrap();
    let on_codes = decode.clone();
    decode.set_key_path(KeyPath::Decode);
    decode.set_value_path(ValuePath::Decode);
    let a = model()
        .forward(&tokens[40..], 40, &mut decode, Some(1))
        .unwrap();
    for values in [ValuePath::Fused, ValuePath::Histogram] {
        let mut fast = on_codes.clone();
        fast.set_key_path(KeyPath::Fused);
        fast.set_value_path(values);
        let b = model()
            .forward(&tokens[40..], 40, &mut fast, Some(1))
            .unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 2e-3,
            "codes ({values:?}, {precision:?} books) vs decode logits differ by {worst}"
        );
    }
}

#[test]
fn calibration_is_deterministic_given_a_seed() {
    let tokens = calib_tokens();
    let (a, _) = calibrate(model(), &tokens, &small_calib_config(512), true).unwrap();
    let (b, _) = calibrate(model(), &tokens, &small_calib_config(512), true).unwrap();
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        assert_eq!(la.keys, lb.keys);
        assert_eq!(la.values, lb.values);
    }
    let mut other = small_calib_config(512);
    other.train.seed = 1;
    let (c, _) = calibrate(model(), &tokens, &other, true).unwrap();
    assert_ne!(
        a.layers[3].keys, c.layers[3].keys,
        "another seed, other codebooks"
    );
}

#[test]
fn codebooks_of_another_model_or_corrupted_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut books, _) =
        calibrate(model(), &calib_tokens(), &small_calib_config(512), true).unwrap();
    // A beam wider than the C = 64 codewords per stage is refused before it allocates (a beam
    // of 2⁶⁴ − 1 used to overflow a capacity, 10¹² to abort on a 24 TB allocation).
    let valid = dir.path().join("valid.safetensors");
    books.save(&valid).unwrap();
    assert!(model()
        .new_cache(&format!("rvq:{},beam=64", valid.display()))
        .is_ok());
    for beam in ["65", "1000000000000", "18446744073709551615"] {
        let e = model()
            .new_cache(&format!("rvq:{},beam={beam}", valid.display()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("exceeds the 64 codewords per stage"), "{e}");
    }
    books.meta.model.file_sha256 = "0".repeat(64);
    let path = dir.path().join("other.safetensors");
    books.save(&path).unwrap();
    let e = model()
        .new_cache(&format!("rvq:{}", path.display()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not for this model"), "{e}");

    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = model()
        .new_cache(&format!("rvq:{}", cut.display()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated or corrupted"), "{e}");
    assert!(Codebooks::load(&dir.path().join("missing.safetensors")).is_err());

    let e = model()
        .new_cache("rvq:x.safetensors,beam=0")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("beam must be at least 1"), "{e}");
}

#[test]
fn query_aware_keys_lose_less_of_what_attention_sees_on_held_out_text() {
    use kvcache::KvCache;
    let config = |query_aware| eval::calibrate::CalibConfig {
        query_aware,
        quantize_values: false,
        ..small_calib_config(1024)
    };
    let (plain, _) = calibrate(model(), &calib_tokens(), &config(false), true).unwrap();
    let (aware, _) = calibrate(model(), &calib_tokens(), &config(true), true).unwrap();
    assert!(aware.meta.keys.as_ref().unwrap().weighted);
    assert!(plain.layers.iter().all(|l| l.weights == [None, None]));

    // Held-out K/V and the queries' energy per channel, through an f32 cache.
    let shape = model().cache_shape();
    let hd = shape.head_dim;
    let held_out = eval::calibrate::capture(model(), &eval_tokens()[..512], 512, true).unwrap();
    // Σ over layers, heads, positions and channels of e_c (k_c − k̂_c)²: the expected squared
    // error of q · k for queries of energy e, and the plain squared error beside it.
    let errors = |books: &Codebooks| {
        let mut cache = RvqCache::new(
            shape,
            model().net.ropes().clone(),
            std::sync::Arc::new(books.clone()),
            RvqOptions::default(),
            "x".into(),
        )
        .unwrap();
        let (mut seen, mut plain) = (0f64, 0f64);
        for (l, c) in held_out.iter().enumerate() {
            cache.append(l, &c.keys, &c.values).unwrap();
            for h in 0..shape.kv_heads {
                let mut back = vec![0f32; 512 * hd];
                cache.read_keys(l, h, 0..512, &mut back).unwrap();
                let energy = &c.query_energy[h * hd..(h + 1) * hd];
                for (t, row) in back.chunks_exact(hd).enumerate() {
                    let k = &c.keys[(t * shape.kv_heads + h) * hd..][..hd];
                    for ((a, b), e) in row.iter().zip(k).zip(energy) {
                        let d2 = ((a - b) as f64).powi(2);
                        (seen, plain) = (seen + e * d2, plain + d2);
                    }
                }
            }
        }
        (seen, plain)
    };
    let ((seen_plain, mse_plain), (seen_aware, mse_aware)) = (errors(&plain), errors(&aware));
    // Measured 0.78 and 1.06 (64 codewords, 2 stages, 1,024 calibration tokens).
    assert!(
        seen_aware < 0.9 * seen_plain,
        "query-weighted error: aware {seen_aware}, plain {seen_plain}"
    );
    // The precision moved, it was not free: the unweighted error grows.
    assert!(mse_aware > mse_plain, "{mse_aware} vs {mse_plain}");

    // Stored with the codebooks and read by every cache that loads them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("aware.safetensors");
    aware.save(&path).unwrap();
    let loaded = Codebooks::load(&path).unwrap();
    assert_eq!(errors(&loaded), (seen_aware, mse_aware));
}
