//! Tiny random GGUF models (a few layers, f32 weights, a byte-level BPE vocabulary) for tests
//! and examples: the real forward pass, tokenizer and loaders run on them in milliseconds.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

/// Shape of a tiny model.
#[derive(Clone, Copy, Debug)]
pub struct TinySpec {
    /// `llama` or `qwen2` (qwen2 adds q/k/v biases).
    pub architecture: &'static str,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub layers: usize,
    pub context_len: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl TinySpec {
    pub fn new(architecture: &'static str) -> Self {
        Self {
            architecture,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 96,
            layers: 2,
            context_len: 256,
            seed: 0,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// Merges of the tiny vocabulary (after the 256 byte characters).
pub const MERGES: [&str; 5] = ["h e", "l l", "he ll", "Ġ w", "1 2"];

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
            char::from_u32(c).expect("valid char").to_string()
        })
        .collect()
}

/// The 256 byte characters, one token per merge, and `<|endoftext|>` (control, BOS and EOS).
pub fn vocab() -> Vec<String> {
    let mut tokens = byte_chars();
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    tokens.push("<|endoftext|>".into());
    tokens
}

/// Deterministic weights in [-scale, scale) (xorshift).
fn weights(shape: &[usize], seed: u64, scale: f32) -> candle_core::Result<QTensor> {
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
    let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
    QTensor::quantize(&t, GgmlDType::F32)
}

/// Writes a tiny random model of `spec` to `path`.
pub fn write(spec: &TinySpec, path: &Path) -> candle_core::Result<()> {
    let arch = spec.architecture;
    let tokens = vocab();
    let vocab_size = tokens.len();
    let mut types = vec![Value::I32(1); vocab_size];
    types[vocab_size - 1] = Value::I32(3);
    let u32v = |x: usize| Value::U32(x as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let pre = if arch == "qwen2" { "qwen2" } else { "gpt2" };
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("embedding_length"), u32v(spec.hidden)),
        (key("block_count"), u32v(spec.layers)),
        (key("feed_forward_length"), u32v(spec.ffn)),
        (key("attention.head_count"), u32v(spec.heads)),
        (key("attention.head_count_kv"), u32v(spec.kv_heads)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.freq_base"), Value::F32(10_000.0)),
        (key("context_length"), u32v(spec.context_len)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                MERGES
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.eos_token_id".into(), u32v(vocab_size - 1)),
        ("tokenizer.ggml.bos_token_id".into(), u32v(vocab_size - 1)),
    ];
    let (h, hd, seed) = (spec.hidden, spec.head_dim(), spec.seed * 1000);
    let (q, kv) = (spec.heads * hd, spec.kv_heads * hd);
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            weights(&[vocab_size, h], seed + 1, 1.0)?,
        ),
        ("output_norm.weight".into(), weights(&[h], seed + 2, 1.0)?),
        (
            "output.weight".into(),
            weights(&[vocab_size, h], seed + 3, 0.5)?,
        ),
    ];
    for l in 0..spec.layers {
        let s = seed + 100 * (l as u64 + 1);
        let p = |n: &str| format!("blk.{l}.{n}");
        tensors.extend([
            (p("attn_norm.weight"), weights(&[h], s, 1.0)?),
            (p("attn_q.weight"), weights(&[q, h], s + 1, 0.3)?),
            (p("attn_k.weight"), weights(&[kv, h], s + 2, 0.3)?),
            (p("attn_v.weight"), weights(&[kv, h], s + 3, 0.3)?),
            (p("attn_output.weight"), weights(&[h, q], s + 7, 0.2)?),
            (p("ffn_norm.weight"), weights(&[h], s + 8, 1.0)?),
            (p("ffn_gate.weight"), weights(&[spec.ffn, h], s + 9, 0.2)?),
            (p("ffn_up.weight"), weights(&[spec.ffn, h], s + 10, 0.2)?),
            (p("ffn_down.weight"), weights(&[h, spec.ffn], s + 11, 0.2)?),
        ]);
        if arch == "qwen2" {
            tensors.extend([
                (p("attn_q.bias"), weights(&[q], s + 4, 0.5)?),
                (p("attn_k.bias"), weights(&[kv], s + 5, 0.5)?),
                (p("attn_v.bias"), weights(&[kv], s + 6, 0.5)?),
            ]);
        }
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &md, &ts)
}
