//! The decoder-only transformer that llama, qwen2 and gemma3 share, on candle matmuls, with
//! attention through a [`KvCache`]. Each architecture file reads its GGUF metadata and weights
//! into this one structure; the optional weights (q/k/v biases, q/k norms, post-norms) are what
//! tell the architectures apart at run time. Two differences from `quantized_llama.rs` matter
//! here: keys go into the cache *before* RoPE, and every position (prefill included) attends to
//! keys and values read back from the cache.

use crate::error::{LlmError, Result};
use crate::gguf::GgufFile;
use crate::linear::{Linear, Weight};
use crate::ops::{add_bias, gelu_tanh_mul, rms_norm, rms_norm_rows, silu_mul};
use candle_core::Tensor;
use kvcache::{KvCache, LayerRopes, Queries};
use rayon::prelude::*;
use std::sync::Arc;

/// Shape and hyper-parameters, as read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rms_eps: f32,
    pub context_len: usize,
    /// Multiplies the scores q·k (1/sqrt(head_dim) unless the architecture says otherwise).
    pub attention_scale: f32,
    /// Multiplies the token embeddings (gemma3: sqrt(hidden)).
    pub embedding_scale: f32,
    pub activation: Activation,
    /// [layers]: the sliding window of each layer (a query at p sees keys > p - window), or
    /// `None` for global attention.
    pub windows: Vec<Option<usize>>,
}

/// The gated feed-forward's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Activation {
    /// SwiGLU (llama, qwen2).
    Silu,
    /// GeGLU with the tanh approximation of GELU (gemma).
    GeluTanh,
}

impl ModelConfig {
    /// The hyper-parameters every architecture stores under `{arch}.…`.
    pub fn read_common(g: &GgufFile, arch: &str) -> Result<Self> {
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = g.usize(&key("embedding_length"))?;
        let heads = g.usize(&key("attention.head_count"))?;
        let kv_heads = if g.has(&key("attention.head_count_kv")) {
            g.usize(&key("attention.head_count_kv"))?
        } else {
            heads
        };
        let head_dim = if g.has(&key("attention.key_length")) {
            g.usize(&key("attention.key_length"))?
        } else if g.has(&key("rope.dimension_count")) {
            g.usize(&key("rope.dimension_count"))?
        } else {
            hidden / heads.max(1)
        };
        let vocab = match g.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => return Err(LlmError::Metadata("no token_embd.weight tensor".into())),
        };
        let layers = g.usize(&key("block_count"))?;
        let cfg = Self {
            vocab,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            ffn: g.usize(&key("feed_forward_length"))?,
            rms_eps: g.f32(&key("attention.layer_norm_rms_epsilon"))?,
            context_len: g.usize(&key("context_length"))?,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            embedding_scale: 1.0,
            activation: Activation::Silu,
            windows: vec![None; layers],
        };
        let problem = if cfg.layers == 0 {
            Some(format!("{arch}.block_count is 0"))
        } else if cfg.hidden == 0 {
            Some(format!("{arch}.embedding_length is 0"))
        } else if cfg.heads == 0 || cfg.kv_heads == 0 {
            Some(format!(
                "{arch}.attention.head_count {} / head_count_kv {}: both must be at least 1",
                cfg.heads, cfg.kv_heads
            ))
        } else if !cfg.heads.is_multiple_of(cfg.kv_heads) {
            Some(format!(
                "{arch}.attention.head_count {} is not a multiple of head_count_kv {}",
                cfg.heads, cfg.kv_heads
            ))
        } else if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
            Some(format!(
                "head dimension {} (key_length, or embedding_length / head_count) must be even and positive",
                cfg.head_dim
            ))
        } else if cfg.ffn == 0 || cfg.context_len == 0 {
            Some(format!(
                "{arch}.feed_forward_length {} and context_length {} must be positive",
                cfg.ffn, cfg.context_len
            ))
        } else if !(cfg.rms_eps.is_finite() && cfg.rms_eps >= 0.0) {
            Some(format!(
                "{arch}.attention.layer_norm_rms_epsilon is {}",
                cfg.rms_eps
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(LlmError::Metadata(format!(
                "inconsistent {arch} shape: {problem}"
            )));
        }
        Ok(cfg)
    }

    /// RoPE base from `{arch}.rope.freq_base`, else `default`.
    pub fn rope_base(g: &GgufFile, arch: &str, default: f32) -> Result<f32> {
        let key = format!("{arch}.rope.freq_base");
        if g.has(&key) {
            g.f32(&key)
        } else {
            Ok(default)
        }
    }
}

/// Which optional weights a layer has: an architecture file says what to load.
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerWeights {
    /// q/k/v projection biases (qwen2).
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before RoPE (gemma3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and feed-forward outputs before the residual add (gemma3).
    pub post_norms: bool,
}

struct Layer {
    attn_norm: Vec<f32>,
    /// q, k and v projections stacked: [heads*hd + 2*kv_heads*hd, hidden]
    qkv: Linear,
    /// [heads*hd + 2*kv_heads*hd]
    qkv_bias: Option<Vec<f32>>,
    /// [head_dim] each
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// [hidden, heads*hd]
    attn_out: Linear,
    post_attn_norm: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    /// gate and up stacked: [2*ffn, hidden]
    gate_up: Linear,
    /// [hidden, ffn]
    down: Linear,
    post_ffn_norm: Option<Vec<f32>>,
}

pub struct Transformer {
    pub config: ModelConfig,
    /// [vocab, hidden], read row by row.
    embeddings: Weight,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    /// [vocab, hidden]; the embeddings when tied.
    output: Linear,
    tied: bool,
    ropes: Arc<LayerRopes>,
}

fn vec1(t: Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Transformer {
    /// Loads the weights GGUF names `blk.{i}.…` (llama.cpp's names) for `config`.
    pub fn load(
        g: &mut GgufFile,
        config: ModelConfig,
        weights: LayerWeights,
        ropes: LayerRopes,
    ) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let embeddings = g.weight("token_embd.weight", c.vocab, h)?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |n: &str| format!("blk.{i}.{n}");
            let norm = |g: &mut GgufFile, n: &str, len: usize| -> Result<Vec<f32>> {
                vec1(g.tensor_f32(&p(n), &[len])?)
            };
            let linear = |g: &mut GgufFile, parts: &[(&str, usize)], cols: usize| {
                let weights = parts
                    .iter()
                    .map(|&(n, rows)| g.weight(&p(n), rows, cols))
                    .collect::<Result<Vec<_>>>()?;
                Linear::new(weights)
            };
            let qkv = linear(
                g,
                &[
                    ("attn_q.weight", q_dim),
                    ("attn_k.weight", kv_dim),
                    ("attn_v.weight", kv_dim),
                ],
                h,
            )?;
            let attn_out = linear(g, &[("attn_output.weight", h)], q_dim)?;
            let gate_up = linear(
                g,
                &[("ffn_gate.weight", c.ffn), ("ffn_up.weight", c.ffn)],
                h,
            )?;
            let down = linear(g, &[("ffn_down.weight", h)], c.ffn)?;
            let qkv_bias = if weights.qkv_bias {
                let mut b = norm(g, "attn_q.bias", q_dim)?;
                b.extend(norm(g, "attn_k.bias", kv_dim)?);
                b.extend(norm(g, "attn_v.bias", kv_dim)?);
                Some(b)
            } else {
                None
            };
            let (q_norm, k_norm) = if weights.qk_norm {
                (
                    Some(norm(g, "attn_q_norm.weight", hd)?),
                    Some(norm(g, "attn_k_norm.weight", hd)?),
                )
            } else {
                (None, None)
            };
            let (post_attn_norm, post_ffn_norm) = if weights.post_norms {
                (
                    Some(norm(g, "post_attention_norm.weight", h)?),
                    Some(norm(g, "post_ffw_norm.weight", h)?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                attn_norm: norm(g, "attn_norm.weight", h)?,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                attn_out,
                post_attn_norm,
                ffn_norm: norm(g, "ffn_norm.weight", h)?,
                gate_up,
                down,
                post_ffn_norm,
            });
        }
        let output_norm = vec1(g.tensor_f32("output_norm.weight", &[h])?)?;
        // A tied head multiplies by the embedding table as stored (quantized in native mode).
        let tied = !g.has_tensor("output.weight");
        let output = if !tied {
            Linear::new(vec![g.weight("output.weight", c.vocab, h)?])?
        } else {
            Linear::new(vec![embeddings.clone()])?
        };
        Ok(Self {
            config,
            embeddings,
            layers,
            output_norm,
            output,
            tied,
            ropes: Arc::new(ropes),
        })
    }

    /// Bytes the weight matrices and embeddings take in memory (a tied head counted once).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.size_bytes()
                    + l.attn_out.size_bytes()
                    + l.gate_up.size_bytes()
                    + l.down.size_bytes()
            })
            .sum();
        let head = if self.tied {
            0
        } else {
            self.output.size_bytes()
        };
        layers + self.embeddings.size_bytes() + head
    }

    pub fn ropes(&self) -> &Arc<LayerRopes> {
        &self.ropes
    }

    /// Accepts positions up to `positions`, past the trained context if larger (RoPE tables
    /// extended by the same formula): for speed and memory measurements only — the model was
    /// never trained there. Caches made before keep their own tables.
    pub fn extend_context(&mut self, positions: usize) {
        if positions > self.config.context_len {
            self.ropes = Arc::new(self.ropes.with_positions(positions));
            self.config.context_len = positions;
        }
    }

    fn check_inputs(&self, tokens: &[u32], first_pos: usize, cache: &dyn KvCache) -> Result<()> {
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
        let shape = cache.shape();
        if (shape.layers, shape.kv_heads, shape.head_dim) != (c.layers, c.kv_heads, c.head_dim) {
            return Err(LlmError::Input(format!(
                "cache shape {shape:?} does not fit this model ({} layers, {} KV heads x {})",
                c.layers, c.kv_heads, c.head_dim
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
        Ok(())
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
        let rows = logit_rows.unwrap_or(tokens.len()).min(tokens.len());
        let mut item = [Sequence {
            tokens,
            first_pos,
            cache,
        }];
        let mut logits = self.forward_rows(&mut item, &[rows])?;
        Ok(logits.pop().unwrap_or_default())
    }

    /// One step of several sequences together (continuous batching): their rows are stacked for
    /// every weight product, so the weights are read once for all of them, while each attends
    /// through its own cache. Returns the logits of each sequence's last token ([vocab] each).
    /// With block-format weights, a row's products do not depend on the rows beside it below
    /// [`crate::linear::DEQUANTIZED_ROWS`] stacked rows, so a batch of decode steps gives each
    /// sequence the logits it would get alone, to the bit.
    pub fn forward_batch(&self, batch: &mut [Sequence<'_>]) -> Result<Vec<Vec<f32>>> {
        let rows = vec![1; batch.len()];
        self.forward_rows(batch, &rows)
    }

    /// Several sequences of any lengths in one pass, as [`Self::forward_batch`]: the logits
    /// [logit_rows[i], vocab] of the last `logit_rows[i]` tokens of each.
    pub fn forward_many(
        &self,
        batch: &mut [Sequence<'_>],
        logit_rows: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        if logit_rows.len() != batch.len() {
            return Err(LlmError::Input(format!(
                "{} logit row counts for {} sequences",
                logit_rows.len(),
                batch.len()
            )));
        }
        if let Some((s, &rows)) = batch
            .iter()
            .zip(logit_rows)
            .find(|(s, &r)| r > s.tokens.len())
        {
            return Err(LlmError::Input(format!(
                "{rows} logit rows asked of a sequence of {} tokens",
                s.tokens.len()
            )));
        }
        self.forward_rows(batch, logit_rows)
    }

    /// Logits [logit_rows[i], vocab] of the last `logit_rows[i]` tokens of each sequence.
    fn forward_rows(
        &self,
        batch: &mut [Sequence<'_>],
        logit_rows: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        for s in batch.iter() {
            self.check_inputs(s.tokens, s.first_pos, &*s.cache)?;
        }
        let c = &self.config;
        let n: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let (h, hd) = (c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let mut x = vec![0f32; n * h]; // [n, hidden], the sequences' rows one after another
        let all_tokens = batch.iter().flat_map(|s| s.tokens);
        for (row, &t) in x.chunks_exact_mut(h).zip(all_tokens) {
            self.embeddings.row(t as usize, row)?;
        }
        if c.embedding_scale != 1.0 {
            x.iter_mut().for_each(|v| *v *= c.embedding_scale);
        }
        let mut attn = vec![0f32; n * q_dim]; // [n, heads, hd]
        for (l, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&x, &layer.attn_norm, c.rms_eps); // [n, hidden]
            let mut qkv = layer.qkv.forward(&normed, n)?; // [n, q_dim + 2*kv_dim]
            if let Some(b) = &layer.qkv_bias {
                add_bias(&mut qkv, b);
            }
            // Each sequence's rows of qkv and attn; the sequences' attention (and cache
            // appends, an RVQ cache's encoding among them) run side by side.
            let row = q_dim + 2 * kv_dim;
            let (mut qkv_rest, mut attn_rest) = (&qkv[..], &mut attn[..]);
            let mut parts = Vec::with_capacity(batch.len());
            for s in batch.iter_mut() {
                let rows = s.tokens.len();
                let (qkv_s, q_next) = qkv_rest.split_at(rows * row);
                let (attn_s, a_next) = std::mem::take(&mut attn_rest).split_at_mut(rows * q_dim);
                parts.push((s, qkv_s, attn_s));
                (qkv_rest, attn_rest) = (q_next, a_next);
            }
            let attend = |(s, qkv, out)| self.attention(l, layer, qkv, s, out);
            if parts.len() == 1 {
                // Not through rayon's queue: one sequence's own kernels are parallel already.
                parts.into_iter().try_for_each(attend)?;
            } else {
                parts.into_par_iter().try_for_each(attend)?;
            }
            let mut o = layer.attn_out.forward(&attn, n)?; // [n, hidden]
            if let Some(w) = &layer.post_attn_norm {
                o = rms_norm(&o, w, c.rms_eps);
            }
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
            let normed = rms_norm(&x, &layer.ffn_norm, c.rms_eps);
            let gu = layer.gate_up.forward(&normed, n)?; // [n, 2*ffn]
            let act = match c.activation {
                Activation::Silu => silu_mul(&gu, c.ffn),
                Activation::GeluTanh => gelu_tanh_mul(&gu, c.ffn),
            }; // [n, ffn]
            let mut d = layer.down.forward(&act, n)?; // [n, hidden]
            if let Some(w) = &layer.post_ffn_norm {
                d = rms_norm(&d, w, c.rms_eps);
            }
            for (xi, di) in x.iter_mut().zip(&d) {
                *xi += di;
            }
        }
        // The rows whose logits are asked for, stacked: [sum of logit_rows, hidden].
        let mut last = Vec::with_capacity(logit_rows.iter().sum::<usize>() * h);
        let mut end = 0;
        for (s, &rows) in batch.iter().zip(logit_rows) {
            end += s.tokens.len();
            last.extend_from_slice(&x[(end - rows) * h..end * h]);
        }
        let normed = rms_norm(&last, &self.output_norm, c.rms_eps);
        let logits = self.output.forward(&normed, last.len() / h)?;
        let mut split = logit_rows.iter().scan(0, |at, &rows| {
            let part = logits[*at * c.vocab..(*at + rows) * c.vocab].to_vec();
            *at += rows;
            Some(part)
        });
        Ok(batch
            .iter()
            .map(|_| split.next().unwrap_or_default())
            .collect())
    }

    /// Attention of layer `l` for one sequence: splits its `qkv` rows ([rows, q_dim +
    /// 2*kv_dim]), stores the keys (before RoPE) and values, and writes [rows, heads, hd] to
    /// `out`.
    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        qkv: &[f32],
        s: &mut Sequence<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        let c = &self.config;
        let (n, hd) = (s.tokens.len(), c.head_dim);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let mut q = Vec::with_capacity(n * q_dim); // [n, heads, hd]
        let mut k = Vec::with_capacity(n * kv_dim); // [n, kv_heads, hd], pre-RoPE
        let mut v = Vec::with_capacity(n * kv_dim); // [n, kv_heads, hd]
        for r in qkv.chunks_exact(q_dim + 2 * kv_dim) {
            q.extend_from_slice(&r[..q_dim]);
            k.extend_from_slice(&r[q_dim..q_dim + kv_dim]);
            v.extend_from_slice(&r[q_dim + kv_dim..]);
        }
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            rms_norm_rows(&mut q, qn, c.rms_eps);
            rms_norm_rows(&mut k, kn, c.rms_eps);
        }
        // Queries are rotated now; keys only when attention reads them from the cache.
        let rope = self.ropes.layer(l);
        for (i, qi) in q.chunks_exact_mut(q_dim).enumerate() {
            for head in qi.chunks_exact_mut(hd) {
                rope.rotate(head, s.first_pos + i);
            }
        }
        s.cache.append(l, &k, &v)?;
        let window = c.windows[l];
        let queries = Queries {
            q: &q,
            tokens: n,
            q_heads: c.heads,
            first_pos: s.first_pos,
            scale: c.attention_scale,
            window,
        };
        s.cache.attend(l, &queries, out)?;
        if let Some(w) = window {
            // The next query (position first_pos + n) sees keys > first_pos + n - w.
            s.cache
                .forget_before(l, (s.first_pos + n + 1).saturating_sub(w));
        }
        Ok(())
    }
}

/// One sequence's part of a (batched) forward pass: its new tokens, the position of the first,
/// and the cache holding its earlier positions.
pub struct Sequence<'a> {
    pub tokens: &'a [u32],
    pub first_pos: usize,
    pub cache: &'a mut dyn KvCache,
}
