//! The RVQ cache: per token and KV head, packed codes plus an f16 scale. Nothing dense is kept
//! for quantized tokens; optional full-precision (f16) windows keep the first `sinks` tokens
//! (attention sinks) and the last `recent` tokens, which are encoded when they leave the window.
//!
//! - [`options`]: what a spec asks for, declared once (parser, printer, help);
//! - `storage`: one layer's keys or values, windows and packed codes;
//! - `attention`: scoring and reducing over the stored form;
//! - [`kernels`]: the fused kernels that attend on codes without decoding them.

mod attention;
pub mod kernels;
pub mod options;
mod storage;
#[cfg(test)]
mod tests;

pub use options::{BookPrecision, KernelPaths, KeyPath, RvqOptions, ValuePath};

use crate::codebooks::{ChannelWeights, CodebookMeta, Codebooks, LayerBooks};
use crate::{
    attention as dense, check_append, check_read, CacheError, CacheShape, GroupRope, KvCache,
    LayerRopes, MemoryReport, Part, Queries, Rope,
};
use rvq::few::FewVectorEncoder;
use rvq::pack::PackedRows;
use rvq::{HalfRvq, I8Rvq, Quantizer, Rvq, VectorLayout};
use std::ops::Range;
use std::sync::Arc;
use storage::{HeadStore, PartStore};

fn book_error(e: rvq::RvqError) -> CacheError {
    CacheError::Codebooks(e.to_string())
}

/// A loaded quantizer as `options` want the cache to hold it: its first `stages` stages, in f16
/// or f32 (the same `Arc` when nothing changes, so caches share one copy).
pub fn prepare_quantizer(
    q: Arc<Rvq>,
    options: &RvqOptions,
) -> Result<Arc<dyn Quantizer>, CacheError> {
    let q = match options.stages {
        Some(k) => Arc::new(q.truncated(k).map_err(book_error)?),
        None => q,
    };
    Ok(match options.books {
        BookPrecision::F32 => q,
        BookPrecision::F16 => Arc::new(HalfRvq::from_rvq(&q).map_err(book_error)?),
        BookPrecision::I8 => Arc::new(I8Rvq::from_rvq(&q).map_err(book_error)?),
    })
}

/// Keys or values of one layer.

#[derive(Clone)]
pub struct RvqCache {
    shape: CacheShape,
    rope: Arc<LayerRopes>,
    options: RvqOptions,
    path: String,
    lens: Vec<usize>,
    /// [layers] of (keys, values)
    parts: Vec<[PartStore; 2]>,
}

impl RvqCache {
    /// A cache over loaded codebooks (shared with them where the options keep them as they are).
    pub fn new(
        shape: CacheShape,
        rope: Arc<LayerRopes>,
        books: Arc<Codebooks>,
        options: RvqOptions,
        path: String,
    ) -> Result<Self, CacheError> {
        let layers = books
            .layers
            .iter()
            .map(|b| {
                let prepare = |q: &Option<Arc<Rvq>>| {
                    q.clone()
                        .map(|q| prepare_quantizer(q, &options))
                        .transpose()
                };
                Ok(LayerBooks {
                    keys: prepare(&b.keys)?,
                    values: prepare(&b.values)?,
                    weights: b.weights.clone(),
                })
            })
            .collect::<Result<_, CacheError>>()?;
        Self::from_quantizers(shape, rope, &books.meta, layers, options, path)
    }

    /// A cache over quantizers already prepared by [`prepare_quantizer`] (as
    /// [`Codebooks::load_converted`] can, one layer at a time).
    pub fn from_quantizers(
        shape: CacheShape,
        rope: Arc<LayerRopes>,
        meta: &CodebookMeta,
        layers: Vec<LayerBooks<Arc<dyn Quantizer>>>,
        options: RvqOptions,
        path: String,
    ) -> Result<Self, CacheError> {
        let m = &meta.model;
        if (m.layers, m.kv_heads, m.head_dim) != (shape.layers, shape.kv_heads, shape.head_dim) {
            return Err(CacheError::Codebooks(format!(
                "codebooks are for {} layers x {} KV heads x {}, the model has {} x {} x {}",
                m.layers, m.kv_heads, m.head_dim, shape.layers, shape.kv_heads, shape.head_dim
            )));
        }
        if options.beam == 0 {
            return Err(CacheError::Codebooks(
                "beam width must be at least 1".into(),
            ));
        }
        if layers.len() != m.layers {
            return Err(CacheError::Codebooks(format!(
                "{} layers of quantizers for {} layers of settings",
                layers.len(),
                m.layers
            )));
        }
        // A beam keeps `beam` candidates of C codewords each: wider than C searches nothing more
        // and only allocates (a huge beam would abort on its allocation).
        let codewords = layers
            .iter()
            .flat_map(|b| b.keys.iter().chain(&b.values))
            .map(|q| q.size())
            .min();
        if let Some(c) = codewords.filter(|&c| options.beam > c) {
            return Err(CacheError::Codebooks(format!(
                "beam={} exceeds the {c} codewords per stage (1 ≤ beam ≤ {c})",
                options.beam
            )));
        }
        let part = |q: Option<Arc<dyn Quantizer>>,
                    layout: Option<VectorLayout>,
                    weights: Option<ChannelWeights>,
                    on: bool| {
            let quant = match (q, layout, on) {
                (Some(q), Some(l), true) => Some((q, l)),
                _ => None,
            };
            let rows = quant
                .as_ref()
                .map_or(0, |(q, l): &(Arc<dyn Quantizer>, VectorLayout)| {
                    l.groups() * q.stages()
                });
            let bits = quant.as_ref().map_or(1, |(q, _)| q.code_bits());
            let head = HeadStore {
                sinks: vec![],
                codes: PackedRows::new(rows, bits),
                scales: vec![],
                dropped: 0,
                recent: vec![],
            };
            let few = match (&quant, options.paths.lane_encoder) {
                (Some((q, _)), true) => FewVectorEncoder::new(q.as_ref()).map(Arc::new),
                _ => None,
            };
            let weights = quant.as_ref().and(weights);
            Ok(PartStore {
                quant,
                weights,
                group_rope: None,
                few,
                heads: vec![head; shape.kv_heads],
            })
        };
        let parts = layers
            .into_iter()
            .enumerate()
            .map(|(l, b)| {
                let [wk, wv] = b.weights;
                check_weights(&wk, rope.layer(l), shape, l)?;
                let mut keys = part(b.keys, meta.key_layout(), wk, options.quantize_keys)?;
                keys.group_rope = keys
                    .quant
                    .as_ref()
                    .and_then(|(_, layout)| GroupRope::new(rope.layer(l), layout));
                let values = part(b.values, meta.value_layout(), wv, options.quantize_values)?;
                Ok([keys, values])
            })
            .collect::<Result<_, CacheError>>()?;
        Ok(Self {
            shape,
            rope,
            options,
            path,
            lens: vec![0; shape.layers],
            parts,
        })
    }

    /// Switches how attention reduces coded values (to compare the paths on one cache state).
    pub fn set_value_path(&mut self, path: ValuePath) {
        self.options.paths.values = path;
    }

    /// Switches how attention scores coded keys (to compare the paths on one cache state).
    pub fn set_key_path(&mut self, path: KeyPath) {
        self.options.paths.keys = path;
    }
}

/// Key weights must have the cache's shape and be equal within each RoPE pair: only then does
/// dividing the query by them score the coded keys exactly (see [`ChannelWeights`]).
fn check_weights(
    weights: &Option<ChannelWeights>,
    rope: &Rope,
    shape: CacheShape,
    layer: usize,
) -> Result<(), CacheError> {
    let Some(w) = weights else {
        return Ok(());
    };
    let hd = shape.head_dim;
    if w.len() != shape.kv_heads * hd {
        return Err(CacheError::Codebooks(format!(
            "layer {layer}: {} key channel weights for {} KV heads x {hd}",
            w.len(),
            shape.kv_heads
        )));
    }
    for (h, w) in w.chunks_exact(hd).enumerate() {
        if let Some((a, b, _)) = rope.pairs().into_iter().find(|&(a, b, _)| w[a] != w[b]) {
            return Err(CacheError::Codebooks(format!(
                "layer {layer} KV head {h}: key channel weights differ within the RoPE pair \
                 ({a}, {b}): {} vs {}",
                w[a], w[b]
            )));
        }
    }
    Ok(())
}

impl KvCache for RvqCache {
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn rope(&self, layer: usize) -> &Rope {
        self.rope.layer(layer)
    }
    fn spec(&self) -> String {
        format!("rvq:{}{}", self.path, self.options.spec_suffix())
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), CacheError> {
        let tokens = check_append(&self.shape, layer, k, v)?;
        let hd = self.shape.head_dim;
        let first = self.lens[layer];
        let options = &self.options;
        let [pk, pv] = &mut self.parts[layer];
        // Keys and values have their own quantizers: encode them on two cores at once (a decode
        // step's encode streams every stage's codebook and is bound by memory, per core).
        let beam = options.beam_of(layer);
        let (rk, rv) = rayon::join(
            || pk.append(k, first, hd, options, beam),
            || pv.append(v, first, hd, options, beam),
        );
        rk?;
        rv?;
        self.lens[layer] += tokens;
        Ok(())
    }

    fn len(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }

    fn read(
        &self,
        layer: usize,
        head: usize,
        part: Part,
        positions: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        check_read(&self.shape, self.len(layer), layer, head, &positions, out)?;
        let store = &self.parts[layer][part as usize];
        let hd = self.shape.head_dim;
        let (a, first_kept) = (store.spans(head, hd).0, store.first_kept_code(head, hd));
        if first_kept > a && positions.start < first_kept && positions.end > a {
            return Err(CacheError::Shape(format!(
                "positions {positions:?} of layer {layer} were dropped (sliding window: coded \
                 positions {a}..{first_kept} are gone)"
            )));
        }
        store.read(head, positions, hd, out);
        Ok(())
    }

    fn attend(&self, layer: usize, queries: &Queries, out: &mut [f32]) -> Result<(), CacheError> {
        let hd = self.shape.head_dim;
        let [keys, values] = &self.parts[layer];
        let rope = self.rope.layer(layer);
        let dense = |h: usize, q: &[f32], span: Range<usize>, scores: &mut [f32]| {
            dense::dense_key_scores(self, layer, h, q, span, scores)
        };
        let score = |h: usize, q: &[f32], span: Range<usize>, scores: &mut [f32]| {
            // Attention scores a head's keys block after block and then reduces their values:
            // the next block's key codes and this block's value codes load while it scores.
            let next = span.end..span.end + span.len();
            keys.prefetch_codes(h, next, hd);
            values.prefetch_codes(h, span.clone(), hd);
            keys.score_keys(self.options.paths.keys, h, q, span, rope, &dense, scores)
        };
        let reduce = |h: usize, probs: &[f32], first_key: usize, n: usize, o: &mut [f32]| {
            values.reduce_values(self.options.paths.values, h, probs, first_key, n, hd, o);
            Ok(())
        };
        dense::attention_with(self, layer, queries, out, &score, &reduce)
    }

    fn memory(&self) -> MemoryReport {
        let hd = self.shape.head_dim as u64;
        // Positions a sliding window dropped are no longer represented.
        let held: u64 = self
            .parts
            .iter()
            .zip(&self.lens)
            .flat_map(|(p, &len)| {
                p.iter()
                    .flat_map(move |s| s.heads.iter().map(move |h| (len - h.dropped) as u64))
            })
            .sum();
        MemoryReport {
            elements: held * hd,
            bytes: self
                .parts
                .iter()
                .flat_map(|p| p.iter().map(PartStore::bytes))
                .sum(),
            fixed_bytes: self
                .parts
                .iter()
                .flatten()
                .map(PartStore::fixed_bytes)
                .sum(),
        }
    }

    fn bytes_at(&self, tokens: usize) -> u64 {
        let hd = self.shape.head_dim;
        self.parts
            .iter()
            .flatten()
            .map(|p| p.bytes_at(tokens, hd, &self.options) * p.heads.len() as u64)
            .sum()
    }

    fn truncate(&mut self, len: usize) {
        let hd = self.shape.head_dim;
        for (l, parts) in self.parts.iter_mut().enumerate() {
            let keep = self.lens[l].min(len);
            parts.iter_mut().for_each(|p| p.truncate(keep, hd));
            self.lens[l] = keep;
        }
    }

    fn forget_before(&mut self, layer: usize, pos: usize) {
        let hd = self.shape.head_dim;
        if let Some(parts) = self.parts.get_mut(layer) {
            parts.iter_mut().for_each(|p| p.forget_before(pos, hd));
        }
    }

    fn box_clone(&self) -> Box<dyn KvCache> {
        Box::new(self.clone())
    }
}
