//! The llama forward pass as a candle autograd graph, for training: weights dequantized to f32,
//! the chosen ones as `Var`s, each layer's pre-RoPE keys and values passed through the RVQ
//! quantizer with a straight-through estimator ([`crate::ste`]). Its shapes and RoPE table come
//! from the same reader as inference (`llm::llama::read`); it mirrors
//! `llm::transformer::Transformer::forward` (which runs inference on plain slices).

use crate::ste::PartQuantizer;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use llm::gguf::GgufFile;
use llm::transformer::{Activation, ModelConfig};

/// Which weights train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Trainable {
    /// Every weight: embeddings (tied output), norms, projections.
    All,
    /// The attention projections q, k, v, o of every layer.
    Attention,
    /// The key and value projections only: the weights that produce what the cache stores.
    KeyValue,
}

impl Trainable {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "all" => Self::All,
            "attn" | "attention" => Self::Attention,
            "kv" => Self::KeyValue,
            other => bail!("unknown parameter set '{other}' (known: all, attn, kv)"),
        })
    }

    fn includes(self, name: &str) -> bool {
        let kv = name.ends_with("attn_k.weight") || name.ends_with("attn_v.weight");
        match self {
            Self::All => true,
            Self::Attention => {
                kv || name.ends_with("attn_q.weight") || name.ends_with("attn_output.weight")
            }
            Self::KeyValue => kv,
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A llama model whose forward pass can be differentiated.
pub struct TrainNet {
    pub config: ModelConfig,
    embeddings: Tensor,
    /// `None` when tied to the embeddings.
    output: Option<Tensor>,
    output_norm: Tensor,
    layers: Vec<Layer>,
    /// [context, head_dim / 2]
    cos: Tensor,
    sin: Tensor,
    /// The trained weights, by GGUF name.
    pub vars: Vec<(String, Var)>,
}

impl TrainNet {
    /// Loads a llama GGUF (with `delta`'s tensors in place, if given; the caller validated it).
    pub fn load(
        path: &std::path::Path,
        delta: Option<&llm::delta::WeightsDelta>,
        trainable: Trainable,
    ) -> Result<Self> {
        let mut g = GgufFile::open(path)?;
        let arch = g.string("general.architecture")?;
        if arch != "llama" {
            bail!(
                "finetuning supports the llama architecture; {} is {arch}",
                path.display()
            );
        }
        if let Some(d) = delta {
            g.set_overrides(d.tensors.clone())?;
        }
        let (config, rope) = llm::llama::read(&g)?;
        let c = &config;
        let (h, hd) = (c.hidden, c.head_dim);
        let (q_dim, kv_dim) = (c.heads * hd, c.kv_heads * hd);
        let mut vars = Vec::new();
        let mut load = |g: &mut GgufFile, name: String, shape: &[usize]| -> Result<Tensor> {
            let t = g.tensor_f32(&name, shape)?;
            if trainable.includes(&name) {
                let v = Var::from_tensor(&t)?;
                let t = v.as_tensor().clone();
                vars.push((name, v));
                Ok(t)
            } else {
                Ok(t)
            }
        };
        let embeddings = load(&mut g, "token_embd.weight".into(), &[c.vocab, h])?;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: load(&mut g, p("attn_norm"), &[h])?,
                q: load(&mut g, p("attn_q"), &[q_dim, h])?,
                k: load(&mut g, p("attn_k"), &[kv_dim, h])?,
                v: load(&mut g, p("attn_v"), &[kv_dim, h])?,
                o: load(&mut g, p("attn_output"), &[h, q_dim])?,
                ffn_norm: load(&mut g, p("ffn_norm"), &[h])?,
                gate: load(&mut g, p("ffn_gate"), &[c.ffn, h])?,
                up: load(&mut g, p("ffn_up"), &[c.ffn, h])?,
                down: load(&mut g, p("ffn_down"), &[h, c.ffn])?,
            });
        }
        let output_norm = load(&mut g, "output_norm.weight".into(), &[h])?;
        let output = if g.has_tensor("output.weight") {
            Some(load(&mut g, "output.weight".into(), &[c.vocab, h])?)
        } else {
            None
        };
        let (cos, sin) = rope_tables(&rope)?;
        Ok(Self {
            cos,
            sin,
            config,
            embeddings,
            output,
            output_norm,
            layers,
            vars,
        })
    }

    /// Next-token cross-entropy on `tokens` (one sequence from position 0) and the commitment
    /// loss of every layer's K and V quantizers (summed). `quantizers[l]` = (keys, values) of
    /// layer l, `None` where a part stays in full precision. Codebooks are updated by EMA on the
    /// way when `update_codebooks`.
    pub fn forward(
        &self,
        tokens: &[u32],
        quantizers: &mut [(Option<PartQuantizer>, Option<PartQuantizer>)],
        update_codebooks: bool,
    ) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let t = tokens.len();
        if t < 2 || t > c.context_len {
            bail!(
                "a training sequence needs 2..={} tokens, got {t}",
                c.context_len
            );
        }
        if c.activation != Activation::Silu {
            bail!("finetuning runs SwiGLU (llama) models only");
        }
        let (hd, heads, kv_heads) = (c.head_dim, c.heads, c.kv_heads);
        let dev = Device::Cpu;
        let ids = Tensor::new(tokens, &dev)?;
        let mut x = self.embeddings.index_select(&ids, 0)?; // [t, hidden]
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mask = causal_mask(t)?; // [t, t]
        let mut commitment = Tensor::zeros((), DType::F32, &dev)?;
        for (layer, (qk, qv)) in self.layers.iter().zip(quantizers.iter_mut()) {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let q = h.matmul(&layer.q.t()?)?; // [t, heads*hd]
            let mut k = h.matmul(&layer.k.t()?)?.reshape((t * kv_heads, hd))?; // pre-RoPE
            let mut v = h.matmul(&layer.v.t()?)?.reshape((t * kv_heads, hd))?;
            if let Some(qk) = qk {
                let (kq, com) = qk.quantize(&k, update_codebooks)?;
                k = kq;
                commitment = (commitment + com)?;
            }
            if let Some(qv) = qv {
                let (vq, com) = qv.quantize(&v, update_codebooks)?;
                v = vq;
                commitment = (commitment + com)?;
            }
            let q = rope_interleaved(&q.reshape((t, heads, hd))?, &cos, &sin)?;
            let k = rope_interleaved(&k.reshape((t, kv_heads, hd))?, &cos, &sin)?;
            let v = v.reshape((t, kv_heads, hd))?;
            let group = heads / kv_heads;
            // [heads, t, hd], each KV head repeated for its query heads.
            let q = q.transpose(0, 1)?.contiguous()?;
            let repeat = |x: &Tensor| -> Result<Tensor> {
                Ok(x.transpose(0, 1)?
                    .unsqueeze(1)?
                    .expand((kv_heads, group, t, hd))?
                    .reshape((heads, t, hd))?)
            };
            let (k, v) = (repeat(&k)?, repeat(&v)?);
            let scores = (q.matmul(&k.t()?)? * c.attention_scale as f64)?; // [heads, t, t]
            let probs = softmax_last(&scores.broadcast_add(&mask)?)?;
            let attn = probs
                .matmul(&v)? // [heads, t, hd]
                .transpose(0, 1)?
                .reshape((t, heads * hd))?;
            x = (x + attn.matmul(&layer.o.t()?)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let act = (h.matmul(&layer.gate.t()?)?.silu()? * h.matmul(&layer.up.t()?)?)?;
            x = (x + act.matmul(&layer.down.t()?)?)?;
        }
        let h = rms_norm(&x, &self.output_norm, c.rms_eps)?;
        let out = self.output.as_ref().unwrap_or(&self.embeddings);
        let logits = h.narrow(0, 0, t - 1)?.matmul(&out.t()?)?; // [t-1, vocab]
        let targets = ids.narrow(0, 1, t - 1)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &targets)?;
        Ok((ce, commitment))
    }
}

/// RMSNorm of each row times `weight`, from differentiable primitives.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
}

/// The inference RoPE table as tensors: cos and sin, each [positions, head_dim / 2].
fn rope_tables(rope: &kvcache::Rope) -> Result<(Tensor, Tensor)> {
    let (positions, half) = (rope.max_positions(), rope.head_dim() / 2);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for pos in 0..positions {
        let (c, s) = rope.angles(pos);
        cos.extend_from_slice(c);
        sin.extend_from_slice(s);
    }
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(cos, (positions, half), &dev)?,
        Tensor::from_vec(sin, (positions, half), &dev)?,
    ))
}

/// RoPE on interleaved pairs (2i, 2i+1) of `x` [t, heads, hd]; `cos`, `sin` [t, hd/2].
fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (t, heads, hd) = x.dims3()?;
    let pairs = x.reshape((t, heads, hd / 2, 2))?;
    let a = pairs.narrow(3, 0, 1)?;
    let b = pairs.narrow(3, 1, 1)?;
    let cos = cos.reshape((t, 1, hd / 2, 1))?;
    let sin = sin.reshape((t, 1, hd / 2, 1))?;
    let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
    let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
    Ok(Tensor::cat(&[ra, rb], 3)?.reshape((t, heads, hd))?)
}

/// Softmax over the last dimension, from differentiable primitives.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// [t, t]: 0 where a query may look (key ≤ query), a large negative number elsewhere.
fn causal_mask(t: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t)
        .map(|i| if i % t > i / t { -1e30 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(m, (t, t), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_sets() {
        let k = "blk.0.attn_k.weight";
        let q = "blk.0.attn_q.weight";
        let up = "blk.0.ffn_up.weight";
        assert!(Trainable::KeyValue.includes(k) && !Trainable::KeyValue.includes(q));
        assert!(Trainable::Attention.includes(q) && !Trainable::Attention.includes(up));
        assert!(Trainable::All.includes(up));
        assert!(Trainable::parse("everything").is_err());
    }

    #[test]
    fn rope_on_the_graph_rotates_as_inference_does() {
        let (t, hd) = (5, 8);
        let rope = kvcache::Rope::new(hd, 10_000.0, t, kvcache::RopeLayout::Interleaved);
        let x: Vec<f32> = (0..t * hd).map(|i| (i as f32 * 0.37).sin()).collect();
        let (cos, sin) = rope_tables(&rope).unwrap();
        let got = rope_interleaved(
            &Tensor::from_vec(x.clone(), (t, 1, hd), &Device::Cpu).unwrap(),
            &cos,
            &sin,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        for pos in 0..t {
            let mut want = x[pos * hd..(pos + 1) * hd].to_vec();
            rope.rotate(&mut want, pos);
            for (a, b) in got[pos * hd..(pos + 1) * hd].iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
    }
}
