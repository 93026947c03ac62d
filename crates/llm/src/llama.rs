//! The llama architecture (SmolLM2, Llama 2/3, …) on candle matmuls, with attention through a
//! [`KvCache`]. Reads top to bottom like `quantized_llama.rs`, with two differences that matter
//! here: keys go into the cache *before* RoPE, and every position (prefill included) attends to
//! keys and values read back from the cache.

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::linear::Linear;
use crate::ops::{rms_norm, silu_mul};
use candle_core::Tensor;
use kvcache::{KvCache, Queries, Rope, RopeLayout};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_len: usize,
}

impl LlamaConfig {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let hidden = g.usize("llama.embedding_length")?;
        let heads = g.usize("llama.attention.head_count")?;
        let kv_heads = if g.has("llama.attention.head_count_kv") {
            g.usize("llama.attention.head_count_kv")?
        } else {
            heads
        };
        let head_dim = if g.has("llama.rope.dimension_count") {
            g.usize("llama.rope.dimension_count")?
        } else {
            hidden / heads.max(1)
        };
        let vocab = match g.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(LlmError::Metadata("no token_embd.weight tensor".into())),
        };
        let cfg = Self {
            vocab,
            hidden,
            layers: g.usize("llama.block_count")?,
            heads,
            kv_heads,
            head_dim,
            ffn: g.usize("llama.feed_forward_length")?,
            rope_theta: if g.has("llama.rope.freq_base") {
                g.f32("llama.rope.freq_base")?
            } else {
                10000.0
            },
            rms_eps: g.f32("llama.attention.layer_norm_rms_epsilon")?,
            context_len: g.usize("llama.context_length")?,
        };
        if cfg.heads == 0
            || cfg.kv_heads == 0
            || !cfg.heads.is_multiple_of(cfg.kv_heads)
            || !cfg.head_dim.is_multiple_of(2)
            || cfg.layers == 0
        {
            return Err(LlmError::Metadata(format!(
                "inconsistent llama shape: {cfg:?}"
            )));
        }
        Ok(cfg)
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections stacked: [heads*hd + 2*kv_heads*hd, hidden]
    qkv: Linear,
    /// [hidden, heads*hd]
    attn_out: Linear,
    ffn_norm: Vec<f32>,
    /// gate and up stacked: [2*ffn, hidden]
    gate_up: Linear,
    /// [hidden, ffn]
    down: Linear,
}

pub struct Llama {
    pub config: LlamaConfig,
    /// [vocab, hidden]
    embeddings: Tensor,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// [vocab, hidden]; the embeddings when tied.
    output: Linear,
    rope: Arc<Rope>,
}

fn vec1(t: Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Llama {
    pub fn load(g: &mut GgufFile) -> Result<Self> {
        let c = LlamaConfig::from_gguf(g)?;
        let (h, hd) = (c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let embeddings = g.tensor_f32("token_embd.weight", &[c.vocab, h])?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            let q = g.tensor_f32(&p("attn_q"), &[q_dim, h])?;
            let k = g.tensor_f32(&p("attn_k"), &[kv_dim, h])?;
            let v = g.tensor_f32(&p("attn_v"), &[kv_dim, h])?;
            let gate = g.tensor_f32(&p("ffn_gate"), &[c.ffn, h])?;
            let up = g.tensor_f32(&p("ffn_up"), &[c.ffn, h])?;
            layers.push(Layer {
                attn_norm: vec1(g.tensor_f32(&p("attn_norm"), &[h])?)?,
                qkv: Linear::new(Tensor::cat(&[q, k, v], 0)?),
                attn_out: Linear::new(g.tensor_f32(&p("attn_output"), &[h, q_dim])?),
                ffn_norm: vec1(g.tensor_f32(&p("ffn_norm"), &[h])?)?,
                gate_up: Linear::new(Tensor::cat(&[gate, up], 0)?),
                down: Linear::new(g.tensor_f32(&p("ffn_down"), &[h, c.ffn])?),
            });
        }
        let output_norm = vec1(g.tensor_f32("output_norm.weight", &[h])?)?;
        let output = if g.has_tensor("output.weight") {
            Linear::new(g.tensor_f32("output.weight", &[c.vocab, h])?)
        } else {
            Linear::new(embeddings.clone())
        };
        let rope = Arc::new(Rope::new(
            hd,
            c.rope_theta,
            c.context_len,
            RopeLayout::Interleaved,
        ));
        Ok(Self {
            config: c,
            embeddings,
            layers,
            output_norm,
            output,
            rope,
        })
    }

    pub fn rope(&self) -> &Arc<Rope> {
        &self.rope
    }

    /// Runs `tokens` at positions `first_pos..` through the model, appending their K/V to `cache`.
    /// Returns logits [rows, vocab] for the last `logit_rows` tokens (all when `None`).
    pub fn forward(
        &self,
        tokens: &[u32],
        first_pos: usize,
        cache: &mut dyn KvCache,
        logit_rows: Option<usize>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(LlmError::Input("forward needs at least one token".into()));
        }
        if first_pos + n > c.context_len {
            return Err(LlmError::Input(format!(
                "positions up to {} exceed the model's context length {}",
                first_pos + n,
                c.context_len
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(LlmError::Input(format!(
                "token id {bad} outside the vocabulary ({})",
                c.vocab
            )));
        }
        for l in 0..c.layers {
            if cache.len(l) != first_pos {
                return Err(LlmError::Input(format!(
                    "cache layer {l} holds {} positions, forward starts at {first_pos}",
                    cache.len(l)
                )));
            }
        }
        let (h, hd) = (c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let ids = Tensor::new(tokens, self.embeddings.device())?;
        let mut x = vec1(self.embeddings.index_select(&ids, 0)?)?; // [n, hidden]
        let mut attn = vec![0f32; n * q_dim]; // [n, heads, hd]
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&x, &layer.attn_norm, c.rms_eps); // [n, hidden]
            let qkv = layer.qkv.forward(&normed, n)?; // [n, q_dim + 2*kv_dim]
            let row = q_dim + 2 * kv_dim;
            let mut q = Vec::with_capacity(n * q_dim); // [n, heads, hd]
            let mut k = Vec::with_capacity(n * kv_dim); // [n, kv_heads, hd], pre-RoPE
            let mut v = Vec::with_capacity(n * kv_dim); // [n, kv_heads, hd]
            for r in qkv.chunks_exact(row) {
                q.extend_from_slice(&r[..q_dim]);
                k.extend_from_slice(&r[q_dim..q_dim + kv_dim]);
                v.extend_from_slice(&r[q_dim + kv_dim..]);
            }
            // Queries are rotated now; keys only when attention reads them from the cache.
            for (i, qi) in q.chunks_exact_mut(q_dim).enumerate() {
                for head in qi.chunks_exact_mut(hd) {
                    self.rope.rotate(head, first_pos + i);
                }
            }
            cache.append(l, &k, &v)?;
            let queries = Queries {
                q: &q,
                tokens: n,
                q_heads: c.heads,
                first_pos,
                scale: 1.0 / (hd as f32).sqrt(),
                window: None,
            };
            cache.attend(l, &queries, &mut attn)?;
            let o = layer.attn_out.forward(&attn, n)?; // [n, hidden]
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
            let normed = rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            let gu = layer.gate_up.forward(&normed, n)?; // [n, 2*ffn]
            let act = silu_mul(&gu, c.ffn); // [n, ffn]
            let d = layer.down.forward(&act, n)?; // [n, hidden]
            for (xi, di) in x.iter_mut().zip(&d) {
                *xi += di;
            }
        }
        let rows = logit_rows.unwrap_or(n).min(n);
        let last = &x[(n - rows) * h..];
        let normed = rms_norm(last, &self.output_norm, c.rms_eps);
        self.output.forward(&normed, rows)
    }
}
