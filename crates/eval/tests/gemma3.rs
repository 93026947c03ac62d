//! Gemma 3 270M (architecture gemma3) through the same seams as the default model: tokenizer
//! against llama.cpp's ids, logits against candle-transformers, sliding-window layers that
//! forget, perplexity against llama.cpp, calibration and the RVQ cache.

mod common;
use common::{
    assert_decode_equals_full, assert_matches_candle, gemma3, gemma3_eval_tokens, gemma3_f32, home,
    model, small_calib_config,
};
use eval::calibrate::calibrate;
use eval::ppl::{perplexity, PplOptions, Protocol};

/// `llama-tokenize -m gemma-3-270m-q4_k_m.gguf --ids` (llama.cpp vendored in llama-cpp-python
/// 0.3.36) on this text printed these ids: a run of spaces and of newlines (user-defined
/// tokens), digits one by one, accents, CJK, an emoji (byte fallback), an HTML tag.
#[test]
fn tokenizer_matches_llama_cpp_ids_and_round_trips() {
    let t = &gemma3().tokenizer;
    let text = "Hello  world!\n\nThe year 1990: café, naïve — 東京 🙂 <b>bold</b>   end";
    let llama_cpp: [u32; 26] = [
        2, 9259, 138, 12392, 236888, 108, 818, 1051, 236743, 236770, 236819, 236819, 236771,
        236787, 33443, 236764, 120362, 2192, 86459, 57235, 236743, 200, 15640, 209, 139, 643,
    ];
    assert_eq!(t.encode(text, true).unwrap(), llama_cpp);
    for s in [
        text,
        " leading space",
        "tabs\tand\r\nCRLF",
        "ünïcödé 한국어 ∑∫",
    ] {
        let ids = t.encode(s, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), s);
    }
    // A BOS already written by a chat template is not doubled.
    let ids = t.encode("<bos>Hi", true).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 1, "{ids:?}");
}

#[test]
fn chat_template_is_gemmas_and_end_of_turn_stops() {
    let t = &gemma3().tokenizer;
    let p = t.chat_prompt("Hi there").unwrap();
    assert_eq!(
        p,
        "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    );
    let end_of_turn = t.encode("<end_of_turn>", false).unwrap();
    assert_eq!(end_of_turn.len(), 1);
    assert!(t.stop_tokens.contains(&end_of_turn[0]));
    assert!(t.stop_tokens.contains(&t.eos.unwrap()));
}

/// Our forward against candle-transformers' `quantized_gemma3` on a prompt shorter than the
/// sliding window (its one-token decoding does not mask the window and its chunked prefill
/// fails). Where it diverges: its feed-forward uses SiLU where Gemma (and llama.cpp)
/// use tanh-GELU, which moves the logits by up to 17% of their range. So the comparison runs on
/// a copy of our model with the activation switched to SiLU: every other piece (embedding
/// scale, q/k norms, per-layer RoPE bases, post-norms, tied output) must then agree. That our
/// GELU is the right one is checked against llama.cpp's perplexity below.
#[test]
fn logits_match_candle_transformers_quantized_gemma3_but_for_its_activation() {
    use candle_transformers::models::quantized_gemma3::ModelWeights;
    use llm::transformer::Activation;
    let mut m = llm::Model::load(&gemma3().path).unwrap();
    m.net.config.activation = Activation::Silu;
    assert_matches_candle(&m, ModelWeights::from_gguf, |w, input, pos| {
        w.forward(input, pos)
    });
}

/// Past the 512-token window: a long prefill then token-by-token decoding gives the logits of
/// one full forward, while the sliding-window layers keep only what the next query can see.
#[test]
fn sliding_window_layers_forget_and_decode_equals_full_forward() {
    // f32 weights: 8-bit activations would turn last-bit differences into rounding steps.
    let m = gemma3_f32();
    let (n, prefix) = (560, 540);
    let tokens = &gemma3_eval_tokens()[..n];
    let vocab = m.vocab();
    let mut full_cache = m.new_cache("f32").unwrap();
    let full = m
        .forward(tokens, 0, full_cache.as_mut(), Some(n - prefix))
        .unwrap();
    let mut cache = m.new_cache("f32").unwrap();
    m.forward(&tokens[..prefix], 0, cache.as_mut(), Some(1))
        .unwrap();
    let mut rows = Vec::new();
    for (i, &t) in tokens.iter().enumerate().skip(prefix) {
        rows.extend(m.forward(&[t], i, cache.as_mut(), Some(1)).unwrap());
    }
    assert_decode_equals_full(&rows, &full, vocab, prefix, "gemma3");
    // 15 sliding layers keep positions 49..560 (511 tokens), the 3 global ones all 560.
    let c = m.config();
    let per_token = (c.kv_heads * c.head_dim * 2) as u64;
    let want = (15 * 511 + 3 * 560) as u64 * per_token;
    assert_eq!(cache.memory().elements, want);
    assert_eq!(full_cache.memory().elements, want);
}

/// llama.cpp's `llama-perplexity -c 512 --chunks 16 -t 2` on sotu-eval with this file and its
/// f16 cache gives 19.8775 ± 0.87 on this machine (the number); ours must agree within
/// 2%. At ctx 512 no query reaches past the window; `-c 1024 --chunks 4 -fa on` does, and gave
/// 17.3529 ± 1.05 here: the same 2% bound.
#[test]
fn perplexity_matches_llama_cpp() {
    for (ctx, tokens, llama_cpp) in [(512, 8192, 19.8775), (1024, 4096, 17.3529)] {
        let opts = PplOptions {
            ctx,
            max_tokens: Some(tokens),
            protocol: Protocol::LlamaCpp,
            quiet: true,
        };
        let r = perplexity(gemma3(), gemma3_eval_tokens(), "f16", &opts).unwrap();
        let rel = (r.ppl / llama_cpp - 1.0).abs();
        assert!(
            rel < 0.02,
            "ctx {ctx}: PPL {} vs llama.cpp {llama_cpp} ({:.2}% off)",
            r.ppl,
            rel * 100.0
        );
    }
}

/// Calibration, the RVQ cache and its accounting work for head_dim 256 (8 groups of 32 per
/// head vector); the codebooks refuse a model of another architecture (the default llama).
#[test]
fn rvq_cache_calibrates_and_refuses_other_models() {
    let m = gemma3();
    let path = eval::assets::ensure_calib(&home(), "wiki.utf8").unwrap();
    let text = eval::text::read_text(&path).unwrap();
    let calib = m.tokenizer.encode(&text, true).unwrap();
    let config = small_calib_config(1024);
    let (books, _) = calibrate(m, &calib, &config, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gemma3.safetensors");
    books.save(&file).unwrap();
    let spec = format!("rvq:{}", file.display());

    let opts = PplOptions {
        ctx: 512,
        max_tokens: Some(1024),
        protocol: Protocol::Windows,
        quiet: true,
    };
    let f16 = perplexity(m, gemma3_eval_tokens(), "f16", &opts).unwrap();
    let rvq = perplexity(m, gemma3_eval_tokens(), &spec, &opts).unwrap();
    assert!(
        rvq.ppl.is_finite() && rvq.ppl > f16.ppl,
        "f16 {}, rvq {}",
        f16.ppl,
        rvq.ppl
    );
    // 2 stages x 6 bits per group of 32, 8 groups, plus a 16-bit scale, per 256 channels.
    let bits = (2.0 * 6.0 * 8.0 + 16.0) / 256.0;
    assert!((rvq.compression.bits_per_element - bits).abs() < 1e-9);

    let e = model().new_cache(&spec).err().unwrap().to_string();
    assert!(e.contains("not for this model"), "{e}");
}
