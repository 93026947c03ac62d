//! qwen2 on a tiny GGUF this test writes itself (random f32 weights, 2 layers, byte-level BPE
//! vocabulary with a few merges): logits against candle-transformers' `quantized_qwen2` on the
//! same file, incremental decoding against one full forward, and the qwen2 pre-tokenizer.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llm::Model;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 96;
const LAYERS: usize = 2;
const MERGES: [&str; 5] = ["h e", "l l", "he ll", "Ġ w", "1 2"];

/// GPT-2's byte-to-character map: printable bytes stand for themselves, the rest are shifted
/// past 255.
fn byte_chars() -> Vec<String> {
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
            let c = if printable {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

fn vocab() -> Vec<String> {
    let mut tokens = byte_chars();
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    tokens.push("<|endoftext|>".into());
    tokens
}

/// Deterministic weights in [-scale, scale).
fn weights(shape: &[usize], seed: u64, scale: f32) -> QTensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
    QTensor::quantize(&t, GgmlDType::F32).unwrap()
}

fn write_tiny_qwen2(path: &std::path::Path) {
    let tokens = vocab();
    let vocab_size = tokens.len();
    let mut types = vec![Value::I32(1); vocab_size];
    types[vocab_size - 1] = Value::I32(3);
    let u32v = |x: usize| Value::U32(x as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("qwen2".into())),
        ("qwen2.embedding_length", u32v(HIDDEN)),
        ("qwen2.block_count", u32v(LAYERS)),
        ("qwen2.feed_forward_length", u32v(FFN)),
        ("qwen2.attention.head_count", u32v(HEADS)),
        ("qwen2.attention.head_count_kv", u32v(KV_HEADS)),
        ("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("qwen2.rope.freq_base", Value::F32(10_000.0)),
        ("qwen2.context_length", u32v(256)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("qwen2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                MERGES
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.eos_token_id", u32v(vocab_size - 1)),
        ("tokenizer.ggml.bos_token_id", u32v(vocab_size - 1)),
    ];
    let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            weights(&[vocab_size, HIDDEN], 1, 1.0),
        ),
        ("output_norm.weight".into(), weights(&[HIDDEN], 2, 1.0)),
        (
            "output.weight".into(),
            weights(&[vocab_size, HIDDEN], 3, 0.5),
        ),
    ];
    for l in 0..LAYERS {
        let s = 100 * (l as u64 + 1);
        let p = |n: &str| format!("blk.{l}.{n}");
        tensors.extend([
            (p("attn_norm.weight"), weights(&[HIDDEN], s, 1.0)),
            (p("attn_q.weight"), weights(&[q, HIDDEN], s + 1, 0.3)),
            (p("attn_k.weight"), weights(&[kv, HIDDEN], s + 2, 0.3)),
            (p("attn_v.weight"), weights(&[kv, HIDDEN], s + 3, 0.3)),
            (p("attn_q.bias"), weights(&[q], s + 4, 0.5)),
            (p("attn_k.bias"), weights(&[kv], s + 5, 0.5)),
            (p("attn_v.bias"), weights(&[kv], s + 6, 0.5)),
            (p("attn_output.weight"), weights(&[HIDDEN, q], s + 7, 0.2)),
            (p("ffn_norm.weight"), weights(&[HIDDEN], s + 8, 1.0)),
            (p("ffn_gate.weight"), weights(&[FFN, HIDDEN], s + 9, 0.2)),
            (p("ffn_up.weight"), weights(&[FFN, HIDDEN], s + 10, 0.2)),
            (p("ffn_down.weight"), weights(&[HIDDEN, FFN], s + 11, 0.2)),
        ]);
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

fn tiny_model() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-qwen2.gguf");
    write_tiny_qwen2(&path);
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
