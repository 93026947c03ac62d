//! qwen2 on a tiny GGUF this test writes itself (random f32 weights, 2 layers, byte-level BPE
//! vocabulary with a few merges): logits against candle-transformers' `quantized_qwen2` on the
//! same file, incremental decoding against one full forward, and the qwen2 pre-tokenizer.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use llm::tiny::TinySpec;
use llm::Model;

fn tiny_model() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-qwen2.gguf");
    llm::tiny::write(&TinySpec::new("qwen2"), &path).unwrap();
    let model = Model::load(&path).unwrap();
    (dir, model)
}

#[test]
fn qwen2_pre_tokenizer_splits_digits_and_merges_words() {
    let (_dir, m) = tiny_model();
    let t = &m.tokenizer;
    let ids = t.encode("hello world 12", false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| t.token_text(i).unwrap()).collect();
    // "1 2" is a merge, but qwen2's split isolates every digit first.
    assert_eq!(
        pieces,
        ["hell", "o", "Ġw", "o", "r", "l", "d", "Ġ", "1", "2"]
    );
    assert_eq!(t.decode(&ids).unwrap(), "hello world 12");
}

#[test]
fn logits_match_candle_transformers_quantized_qwen2() {
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    let (_dir, m) = tiny_model();
    assert_eq!(m.architecture, "qwen2");
    let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
    let mut cache = m.new_cache("f32").unwrap();
    let ours = m.forward(&tokens, 0, cache.as_mut(), Some(1)).unwrap();

    let mut f = std::fs::File::open(&m.path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let theirs: Vec<f32> = reference
        .forward(&input, 0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(ours.len(), theirs.len());
    // Both multiply f32 weights in f32: only summation order differs.
    let scale = theirs.iter().map(|x| x.abs()).fold(0f32, f32::max);
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() < 1e-4 * scale.max(1.0),
            "logit {i}: {a} vs {b}"
        );
    }
}

#[test]
fn qwen2_incremental_decode_equals_full_forward() {
    let (_dir, m) = tiny_model();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 11 + 3) % 256).collect();
    let vocab = m.vocab();
    let mut full_cache = m.new_cache("f32").unwrap();
    let full = m.forward(&tokens, 0, full_cache.as_mut(), None).unwrap();
    let mut cache = m.new_cache("f32").unwrap();
    let mut rows = m.forward(&tokens[..7], 0, cache.as_mut(), None).unwrap();
    for (i, &t) in tokens.iter().enumerate().skip(7) {
        rows.extend(m.forward(&[t], i, cache.as_mut(), Some(1)).unwrap());
    }
    for (pos, (a, b)) in rows.chunks(vocab).zip(full.chunks(vocab)).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "position {pos}: {x} vs {y}");
        }
    }
    assert_eq!(cache.memory(), full_cache.memory());
}
