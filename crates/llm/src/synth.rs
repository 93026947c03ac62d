//! GGUF files with a real architecture's shapes and random weights: load time, memory and speed
//! at sizes no package ships (the outputs are meaningless). The tokenizer is the default model's,
//! its vocabulary padded with control tokens to the preset's size.

use crate::error::{LlmError, Result};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::Device;
use quant::WeightType;
use rvq::rng::SplitMix64;
use std::path::Path;

/// The architectures `synth` writes: llama's block, and qwen2's (llama's with q/k/v biases and
/// half-split RoPE pairs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            _ => Err(LlmError::Input(format!(
                "architecture '{name}': expected llama or qwen2"
            ))),
        }
    }

    /// The GGUF's `general.architecture`, the prefix of its keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    fn rope_base(self) -> f32 {
        match self {
            Self::Llama => 500_000.0,
            Self::Qwen2 => 1_000_000.0,
        }
    }

    fn epsilon(self) -> f32 {
        match self {
            Self::Llama => 1e-5,
            Self::Qwen2 => 1e-6,
        }
    }
}

/// The shapes of a model of one architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Preset {
    pub arch: Arch,
    pub name: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub tied: bool,
}

/// Llama 3.2 1B and 3B, Llama 3.1 8B, Qwen2.5 0.5B and 1.5B, and tiny models for tests (llama at
/// head_dim 64 and 128, qwen2 with grouped queries).
pub const PRESETS: [Preset; 8] = [
    Preset {
        arch: Arch::Llama,
        name: "tiny",
        layers: 2,
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        ffn: 512,
        vocab: 49152,
        tied: true,
    },
    Preset {
        arch: Arch::Llama,
        name: "tiny128",
        layers: 2,
        hidden: 256,
        heads: 2,
        kv_heads: 1,
        head_dim: 128,
        ffn: 512,
        vocab: 49152,
        tied: false,
    },
    Preset {
        arch: Arch::Llama,
        name: "1b",
        layers: 16,
        hidden: 2048,
        heads: 32,
        kv_heads: 8,
        head_dim: 64,
        ffn: 8192,
        vocab: 128256,
        tied: true,
    },
    Preset {
        arch: Arch::Llama,
        name: "3b",
        layers: 28,
        hidden: 3072,
        heads: 24,
        kv_heads: 8,
        head_dim: 128,
        ffn: 8192,
        vocab: 128256,
        tied: true,
    },
    Preset {
        arch: Arch::Llama,
        name: "8b",
        layers: 32,
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ffn: 14336,
        vocab: 128256,
        tied: false,
    },
    Preset {
        arch: Arch::Qwen2,
        name: "tiny",
        layers: 2,
        hidden: 256,
        heads: 6,
        kv_heads: 2,
        head_dim: 64,
        ffn: 512,
        vocab: 49152,
        tied: true,
    },
    Preset {
        arch: Arch::Qwen2,
        name: "0.5b",
        layers: 24,
        hidden: 896,
        heads: 14,
        kv_heads: 2,
        head_dim: 64,
        ffn: 4864,
        vocab: 151936,
        tied: true,
    },
    Preset {
        arch: Arch::Qwen2,
        name: "1.5b",
        layers: 28,
        hidden: 1536,
        heads: 12,
        kv_heads: 2,
        head_dim: 128,
        ffn: 8960,
        vocab: 151936,
        tied: true,
    },
];

impl Preset {
    pub fn by_name(arch: Arch, name: &str) -> Result<Self> {
        let of_arch = || PRESETS.iter().filter(move |p| p.arch == arch);
        of_arch().find(|p| p.name == name).copied().ok_or_else(|| {
            let names: Vec<_> = of_arch().map(|p| p.name).collect();
            LlmError::Input(format!(
                "preset '{name}' of {}: expected one of {}",
                arch.name(),
                names.join(", ")
            ))
        })
    }

    /// Parameters in the weight matrices and embeddings (the ones in the block type; norms and
    /// qwen2's biases stay f32).
    pub fn parameters(&self) -> usize {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn;
        let head = if self.tied {
            0
        } else {
            self.vocab * self.hidden
        };
        self.layers * layer + self.vocab * self.hidden + head
    }
}

/// The block types `synth` writes.
pub fn weight_type(name: &str) -> Result<(WeightType, GgmlDType)> {
    Ok(match name {
        "q4_0" => (WeightType::Q4_0, GgmlDType::Q4_0),
        "q4_1" => (WeightType::Q4_1, GgmlDType::Q4_1),
        "q8_0" => (WeightType::Q8_0, GgmlDType::Q8_0),
        "q4_k" => (WeightType::Q4K, GgmlDType::Q4K),
        "q6_k" => (WeightType::Q6K, GgmlDType::Q6K),
        _ => {
            return Err(LlmError::Input(format!(
                "weight type '{name}': expected q4_0, q4_1, q8_0, q4_k or q6_k"
            )))
        }
    })
}

/// The type a row of `cols` weights is written in: `ty`, or where its 256-weight blocks do not
/// fit the row (Qwen2.5 0.5B's 896 columns), the 32-weight type llama.cpp's quantizer falls back
/// to (Q4_K → Q5_0, Q6_K → Q8_0).
pub fn row_type(ty: (WeightType, GgmlDType), cols: usize) -> (WeightType, GgmlDType) {
    if cols.is_multiple_of(ty.0.block().0) {
        return ty;
    }
    match ty.0 {
        WeightType::Q4K => (WeightType::Q5_0, GgmlDType::Q5_0),
        WeightType::Q6K => (WeightType::Q8_0, GgmlDType::Q8_0),
        _ => ty,
    }
}

/// `out` filled with seeded random bytes (the same on every machine).
fn fill_random(rng: &mut SplitMix64, out: &mut [u8]) {
    for chunk in out.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Sets a random block's scales so that its weights lie within about ±`scale`.
fn tame(ty: WeightType, block: &mut [u8], scale: f32) {
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    match ty {
        // w = d·(q − 8), q < 16.
        WeightType::Q4_0 => block[..2].copy_from_slice(&f16(scale / 8.0)),
        // w = d·q + m.
        WeightType::Q4_1 => {
            block[..2].copy_from_slice(&f16(scale / 8.0));
            block[2..4].copy_from_slice(&f16(-scale));
        }
        // w = d·(q − 16), q < 32.
        WeightType::Q5_0 => block[..2].copy_from_slice(&f16(scale / 16.0)),
        // w = d·q, |q| ≤ 127.
        WeightType::Q8_0 => block[..2].copy_from_slice(&f16(scale / 128.0)),
        // w = d·8·q − dmin·8 with every sub-block's scale and minimum 8.
        WeightType::Q4K => {
            block[..2].copy_from_slice(&f16(scale / 64.0));
            block[2..4].copy_from_slice(&f16(scale * 15.0 / 128.0));
            block[4..12].fill(8);
            block[12..16].fill(0x88);
        }
        // w = d·sc·(q − 32) with every scale 1.
        WeightType::Q6K => {
            block[192..208].fill(1);
            block[208..210].copy_from_slice(&f16(scale / 32.0));
        }
        _ => unreachable!("synth writes only the types of `weight_type` and `row_type`"),
    }
}

/// A [rows, cols] tensor of random blocks whose weights are of order `scale`.
fn random_tensor(
    ty: (WeightType, GgmlDType),
    rows: usize,
    cols: usize,
    scale: f32,
    rng: &mut SplitMix64,
) -> Result<QTensor> {
    let (wt, dt) = row_type(ty, cols);
    let (elems, bytes) = wt.block();
    let n = wt.bytes_for(rows * cols).ok_or_else(|| {
        LlmError::Input(format!(
            "a [{rows}, {cols}] matrix is not whole {wt:?} blocks of {elems}"
        ))
    })?;
    let mut data = vec![0u8; n];
    fill_random(rng, &mut data);
    for block in data.chunks_exact_mut(bytes) {
        tame(wt, block, scale);
    }
    Ok(qtensor_from_ggml(
        dt,
        &data,
        vec![rows, cols],
        &Device::Cpu,
    )?)
}

fn f32_tensor(values: &[f32]) -> Result<QTensor> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(qtensor_from_ggml(
        GgmlDType::F32,
        &data,
        vec![values.len()],
        &Device::Cpu,
    )?)
}

fn ones(n: usize) -> Result<QTensor> {
    f32_tensor(&vec![1.0; n])
}

/// `n` seeded values uniform in [−amplitude, amplitude).
fn random_f32(n: usize, amplitude: f32, rng: &mut SplitMix64) -> Vec<f32> {
    (0..n)
        .map(|_| amplitude * (2.0 * rng.unit() as f32 - 1.0))
        .collect()
}

/// Writes a GGUF of `preset`'s architecture and shapes with random `ty` weights to `out`,
/// with `tokenizer_from`'s tokenizer (a GGUF with a byte-level BPE vocabulary no larger than the
/// preset's). Written to a temporary file and renamed into place.
pub fn write(
    preset: &Preset,
    ty: &str,
    tokenizer_from: &Path,
    out: &Path,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<()> {
    let ty = weight_type(ty)?;
    let p = preset;
    let mut f = std::fs::File::open(tokenizer_from).map_err(|source| LlmError::Open {
        path: tokenizer_from.into(),
        source,
    })?;
    let source = Content::read(&mut f).map_err(|e| LlmError::NotGguf {
        path: tokenizer_from.into(),
        reason: e.to_string(),
    })?;
    let mut metadata: Vec<(String, Value)> = source
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in metadata.iter_mut() {
        let pad = |v: &mut Value, item: &dyn Fn(usize) -> Value| -> Result<()> {
            if let Value::Array(items) = v {
                if items.len() > p.vocab {
                    return Err(LlmError::Input(format!(
                        "the tokenizer has {} tokens, more than the preset's {}",
                        items.len(),
                        p.vocab
                    )));
                }
                let start = items.len();
                items.extend((start..p.vocab).map(item));
            }
            Ok(())
        };
        match key.as_str() {
            "tokenizer.ggml.tokens" => pad(value, &|i| Value::String(format!("<|synth_{i}|>")))?,
            // Control tokens: never produced by the pre-tokenizer's splits.
            "tokenizer.ggml.token_type" => pad(value, &|_| Value::I32(3))?,
            "tokenizer.ggml.scores" => pad(value, &|_| Value::F32(0.0))?,
            _ => {}
        }
    }
    let name = p.arch.name();
    let arch = |k: &str| format!("{name}.{k}");
    let u32v = |v: usize| Value::U32(v as u32);
    metadata.extend([
        ("general.architecture".into(), Value::String(name.into())),
        (
            "general.name".into(),
            Value::String(format!("synthetic {name} {}", p.name)),
        ),
        (arch("context_length"), u32v(131072)),
        (arch("embedding_length"), u32v(p.hidden)),
        (arch("block_count"), u32v(p.layers)),
        (arch("feed_forward_length"), u32v(p.ffn)),
        (arch("attention.head_count"), u32v(p.heads)),
        (arch("attention.head_count_kv"), u32v(p.kv_heads)),
        (arch("attention.key_length"), u32v(p.head_dim)),
        (arch("attention.value_length"), u32v(p.head_dim)),
        (arch("rope.dimension_count"), u32v(p.head_dim)),
        (arch("rope.freq_base"), Value::F32(p.arch.rope_base())),
        (
            arch("attention.layer_norm_rms_epsilon"),
            Value::F32(p.arch.epsilon()),
        ),
        (arch("vocab_size"), u32v(p.vocab)),
    ]);

    let mut rng = SplitMix64::new(seed);
    let (q, kv) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let total = p.layers + 2;
    tensors.push((
        "token_embd.weight".into(),
        random_tensor(ty, p.vocab, p.hidden, 0.05, &mut rng)?,
    ));
    progress(1, total);
    // Weights of order 1/√fan-in keep each layer's output of the order of its input.
    let w = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    for l in 0..p.layers {
        let name = |n: &str| format!("blk.{l}.{n}");
        for (n, rows, cols) in [
            ("attn_q.weight", q, p.hidden),
            ("attn_k.weight", kv, p.hidden),
            ("attn_v.weight", kv, p.hidden),
            ("attn_output.weight", p.hidden, q),
            ("ffn_gate.weight", p.ffn, p.hidden),
            ("ffn_up.weight", p.ffn, p.hidden),
            ("ffn_down.weight", p.hidden, p.ffn),
        ] {
            tensors.push((name(n), random_tensor(ty, rows, cols, w(cols), &mut rng)?));
        }
        if p.arch == Arch::Qwen2 {
            for (n, len) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                tensors.push((name(n), f32_tensor(&random_f32(len, 0.1, &mut rng))?));
            }
        }
        tensors.push((name("attn_norm.weight"), ones(p.hidden)?));
        tensors.push((name("ffn_norm.weight"), ones(p.hidden)?));
        progress(l + 2, total);
    }
    tensors.push(("output_norm.weight".into(), ones(p.hidden)?));
    if !p.tied {
        tensors.push((
            "output.weight".into(),
            random_tensor(ty, p.vocab, p.hidden, w(p.hidden), &mut rng)?,
        ));
    }
    progress(total, total);

    let tmp = out.with_extension("gguf.tmp");
    let write_err = |e: std::io::Error| LlmError::Input(format!("writing {}: {e}", out.display()));
    let file = std::fs::File::create(&tmp).map_err(write_err)?;
    let mut w = std::io::BufWriter::new(file);
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let written = gguf_file::write(&mut w, &md, &ts)
        .map_err(LlmError::from)
        .and_then(|()| {
            use std::io::Write;
            w.flush().map_err(write_err)
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out).map_err(write_err)
}
