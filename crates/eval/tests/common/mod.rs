//! Shared by the real-model tests: the asset folder and one loaded model per test binary.
#![allow(dead_code)]

use llm::Model;
use std::path::PathBuf;
use std::sync::OnceLock;

/// `$RVQ_KV_HOME`, else the workspace's `.rvq-kv` (assets are fetched there on first use).
pub fn home() -> PathBuf {
    match std::env::var_os("RVQ_KV_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.rvq-kv")),
    }
}

pub fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = eval::assets::ensure_model(&home()).expect("fetching the default model");
        Model::load(&path).expect("loading the default model")
    })
}

pub fn eval_tokens() -> &'static [u32] {
    static TOKENS: OnceLock<Vec<u32>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let path = eval::assets::ensure_eval_text(&home()).expect("fetching sotu-eval");
        let text = eval::text::read_text(&path).expect("reading sotu-eval");
        model()
            .tokenizer
            .encode(&text, true)
            .expect("tokenizing sotu-eval")
    })
}

/// Gemma 3 270M (fetched on first use), loaded once per test binary.
pub fn gemma3() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = eval::assets::ensure_gemma3(&home()).expect("fetching gemma3-270m");
        Model::load(&path).expect("loading gemma3-270m")
    })
}

/// The default model with its weights dequantized to f32 (`--weights f32`): the reference path,
/// whose products are plain f32 sums, for tests whose bounds follow f32 rounding alone.
pub fn model_f32() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = eval::assets::ensure_model(&home()).expect("fetching the default model");
        Model::load_with(&path, None, llm::gguf::WeightsMode::F32).expect("loading f32 weights")
    })
}

/// Gemma 3 270M with f32 weights, as [`model_f32`].
pub fn gemma3_f32() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = eval::assets::ensure_gemma3(&home()).expect("fetching gemma3-270m");
        Model::load_with(&path, None, llm::gguf::WeightsMode::F32).expect("loading f32 weights")
    })
}

/// sotu-eval in gemma3's tokens.
pub fn gemma3_eval_tokens() -> &'static [u32] {
    static TOKENS: OnceLock<Vec<u32>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let path = eval::assets::ensure_eval_text(&home()).expect("fetching sotu-eval");
        let text = eval::text::read_text(&path).expect("reading sotu-eval");
        gemma3()
            .tokenizer
            .encode(&text, true)
            .expect("tokenizing sotu-eval")
    })
}

/// Our logits against a reference implementation that multiplies with quantized weights and
/// quantized activations (as ggml does) while we dequantize the weights to f32: they differ by
/// quantization noise, so we require the same argmax, max |Δlogit| below `range_fraction` of the
/// logits' range, and correlation above `min_corr`.
pub fn assert_logits_close(ours: &[f32], theirs: &[f32], range_fraction: f32, min_corr: f64) {
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(
        eval::generate::argmax(ours),
        eval::generate::argmax(theirs),
        "argmax differs"
    );
    let range = theirs.iter().cloned().fold(f32::MIN, f32::max)
        - theirs.iter().cloned().fold(f32::MAX, f32::min);
    let max_diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff < range_fraction * range,
        "max |Δ| {max_diff} vs range {range}"
    );
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let (ma, mb) = (mean(ours), mean(theirs));
    let cov: f64 = ours
        .iter()
        .zip(theirs)
        .map(|(&a, &b)| (a as f64 - ma) * (b as f64 - mb))
        .sum();
    let va: f64 = ours.iter().map(|&a| (a as f64 - ma).powi(2)).sum();
    let vb: f64 = theirs.iter().map(|&b| (b as f64 - mb).powi(2)).sum();
    let corr = cov / (va * vb).sqrt();
    assert!(corr > min_corr, "correlation {corr}");
}

/// A calibration small enough for tests: `tokens` tokens, 2 stages of 64 codewords.
pub fn small_calib_config(tokens: usize) -> eval::calibrate::CalibConfig {
    eval::calibrate::CalibConfig {
        tokens,
        train: rvq::TrainConfig {
            size: 64,
            stages: 2,
            kmeans_sample: 4096,
            kmeans_iters: 3,
            batch: 256,
            ..rvq::TrainConfig::paper()
        },
        ..eval::calibrate::CalibConfig::paper("wiki.utf8")
    }
}

/// Logits of token-by-token decoding (`rows`, from position `first`) against those of one full
/// forward over the same positions (`full`): only the summation order differs (matmul blocking
/// for 1 row against many, attention split by keys or by rows), measured up to 5.3e-3 on
/// logits up to ~27 depending on the CPU; the bound is 1e-3 of each row's largest |logit|, far
/// below the ~1 a wrong cache read gives.
pub fn assert_decode_equals_full(
    rows: &[f32],
    full: &[f32],
    vocab: usize,
    first: usize,
    what: &str,
) {
    assert_eq!(rows.len(), full.len(), "{what}");
    for (pos, (a, b)) in rows.chunks(vocab).zip(full.chunks(vocab)).enumerate() {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let top = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            d <= 1e-3 * top,
            "{what} position {}: max |Δlogit| {d} of logits up to {top}",
            first + pos
        );
    }
}

/// A candle-transformers model read from a GGUF file.
pub type CandleLoad<W> = fn(
    candle_core::quantized::gguf_file::Content,
    &mut std::fs::File,
    &candle_core::Device,
) -> candle_core::Result<W>;

/// Our last-position logits on a short prompt (f32 cache) against those of candle-transformers'
/// model of the same GGUF (`load`, then `forward(model, [1, n] input, 0)`): the same argmax,
/// max |Δlogit| below 4% of the logits' range and correlation above 0.999.
pub fn assert_matches_candle<W>(
    m: &Model,
    load: CandleLoad<W>,
    forward: impl FnOnce(
        &mut W,
        &candle_core::Tensor,
        usize,
    ) -> candle_core::Result<candle_core::Tensor>,
) {
    let prompt = "The capital of France is Paris. The capital of Italy is";
    let tokens = m.tokenizer.encode(prompt, true).unwrap();
    let mut cache = m.new_cache("f32").unwrap();
    let ours = m.forward(&tokens, 0, cache.as_mut(), Some(1)).unwrap();

    let mut f = std::fs::File::open(&m.path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = load(content, &mut f, &candle_core::Device::Cpu).unwrap();
    let input = candle_core::Tensor::new(tokens.as_slice(), &candle_core::Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .unwrap();
    let theirs: Vec<f32> = forward(&mut reference, &input, 0)
        .and_then(|l| l.flatten_all())
        .and_then(|l| l.to_vec1())
        .expect("reference forward");
    // Ours and candle's quantize the activations to 8 bits each their own way (per 32 values;
    // Q8_1 / Q8_K blocks), and a last-bit difference between SIMD levels flips some of those
    // roundings: max |Δ| measured 2.0–2.3% of the range on SmolLM2 and 2.2–2.7% on Gemma 3
    // across AVX-512, AVX2 and portable. A wrong layer moves it by tens of percent.
    assert_logits_close(&ours, &theirs, 0.04, 0.999);
}
