//! The KV cache seam between a model and every compression scheme.
//!
//! A model hands each layer's new keys (before RoPE) and values to [`KvCache::append`] and asks
//! [`KvCache::attend`] for the attention output; it never sees how the cache stores them. A cache
//! never knows which model feeds it. The default `attend` reads dense keys/values back and runs
//! ordinary attention ([`attention::dense_attention`]); a backend that can attend on its
//! compressed form overrides it.

pub mod attention;
pub mod codebooks;
pub mod dense;
pub mod dense_fused;
pub mod hooked;
pub mod rope;
pub mod rvq;
pub mod scalar;
pub mod spec;
pub mod testkit;

use std::ops::Range;
use std::sync::Arc;

pub use ::rvq::hadamard;
pub use attention::Queries;
pub use rope::{GroupRope, LayerRopes, Rope, RopeLayout};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("non-finite value (NaN or Inf) in the {0} of layer {1}")]
    NonFinite(&'static str, usize),
    #[error("bad cache spec '{spec}': {reason}")]
    Spec { spec: String, reason: String },
    #[error("cache codebooks: {0}")]
    Codebooks(String),
    #[error("writing {0}")]
    Write(String),
}

/// Geometry of a model's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What a cache needs from the model to be built.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub shape: CacheShape,
    pub rope: Arc<LayerRopes>,
    /// Identity of the model (architecture, file hash) for caches that carry learned state.
    pub model_id: Option<ModelIdentity>,
}

/// What identifies the model a calibrated cache was learned on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelIdentity {
    pub architecture: String,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// sha256 of the model file, hex.
    pub file_sha256: String,
}

/// Exact memory use of a cache's stored tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct MemoryReport {
    /// Scalar K and V elements represented (tokens x kv_heads x head_dim x 2, over all layers).
    pub elements: u64,
    /// Bytes holding those elements: codes, scales, zero points, full-precision windows.
    pub bytes: u64,
    /// Bytes that do not grow with context (codebooks, rotation tables).
    pub fixed_bytes: u64,
}

impl MemoryReport {
    /// Bits per cached element, fixed bytes excluded.
    pub fn bits_per_element(&self) -> f64 {
        if self.elements == 0 {
            return 0.0;
        }
        self.bytes as f64 * 8.0 / self.elements as f64
    }

    /// How many times smaller than an f16 cache of the same tokens (fixed bytes excluded).
    pub fn compression_vs_f16(&self) -> f64 {
        if self.bytes == 0 {
            return 0.0;
        }
        self.elements as f64 * 2.0 / self.bytes as f64
    }

    /// Context length (tokens) from which this cache plus its fixed bytes is smaller than an
    /// f16 cache, given that it currently holds `tokens` positions. `None` if it never is.
    pub fn break_even_tokens(&self, tokens: usize) -> Option<f64> {
        if tokens == 0 {
            return None;
        }
        let saved_per_token = (self.elements as f64 * 2.0 - self.bytes as f64) / tokens as f64;
        (saved_per_token > 0.0).then(|| self.fixed_bytes as f64 / saved_per_token)
    }
}

/// The numbers printed with every result: bits, compression, fixed bytes, break-even context.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Compression {
    pub bits_per_element: f64,
    pub compression_vs_f16: f64,
    pub fixed_bytes: u64,
    pub break_even_tokens: Option<f64>,
}

impl Compression {
    pub fn of(memory: &MemoryReport, tokens: usize) -> Self {
        Self {
            bits_per_element: memory.bits_per_element(),
            compression_vs_f16: memory.compression_vs_f16(),
            fixed_bytes: memory.fixed_bytes,
            break_even_tokens: memory.break_even_tokens(tokens),
        }
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:.2} bits/element, {:.2}x vs f16",
            self.bits_per_element, self.compression_vs_f16
        );
        if self.fixed_bytes > 0 {
            s += &format!(
                ", {:.1} MB fixed (codebooks)",
                self.fixed_bytes as f64 / 1e6
            );
            match self.break_even_tokens {
                Some(t) => s += &format!(", breaks even with f16 at {t:.0} tokens"),
                None => s += ", never smaller than f16",
            }
        }
        s
    }
}

/// Which half of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Keys = 0,
    Values = 1,
}

pub trait KvCache: Send + Sync {
    fn shape(&self) -> CacheShape;
    /// The rotation applied to the keys of `layer` when they are read.
    fn rope(&self, layer: usize) -> &Rope;
    /// The spec string that rebuilds this cache, e.g. `f16`.
    fn spec(&self) -> String;
    /// Appends new positions to `layer`. `k`, `v`: [tokens, kv_heads, head_dim]; keys before RoPE.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), CacheError>;
    /// Number of positions stored for `layer`.
    fn len(&self, layer: usize) -> usize;
    /// Keys (before RoPE) or values of KV head `head` at `positions`, as f32 into `out`
    /// ([positions, head_dim]).
    fn read(
        &self,
        layer: usize,
        head: usize,
        part: Part,
        positions: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError>;
    /// Keys before RoPE: `read(.., Part::Keys, ..)`.
    fn read_keys(
        &self,
        layer: usize,
        head: usize,
        positions: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        self.read(layer, head, Part::Keys, positions, out)
    }
    /// Values: `read(.., Part::Values, ..)`.
    fn read_values(
        &self,
        layer: usize,
        head: usize,
        positions: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        self.read(layer, head, Part::Values, positions, out)
    }
    /// Attention output for `queries` over everything stored for `layer`.
    /// `out`: [tokens, q_heads, head_dim].
    fn attend(&self, layer: usize, queries: &Queries, out: &mut [f32]) -> Result<(), CacheError> {
        attention::dense_attention(self, layer, queries, out)
    }
    fn memory(&self) -> MemoryReport;
    /// The bytes [`MemoryReport::bytes`] would report with `tokens` positions in every layer and
    /// none freed by a sliding window (an upper bound for windowed layers): what admitting a
    /// sequence of that length costs, known before any of it is computed.
    fn bytes_at(&self, tokens: usize) -> u64;
    /// Keeps the first `len` positions of every layer (used to score several continuations of
    /// one shared context).
    fn truncate(&mut self, len: usize);
    /// No query will read positions before `pos` of `layer` again (a sliding-window layer): the
    /// backend may free them, and reads of freed positions then fail. `len` is unchanged. The
    /// default keeps everything (correct, just not smaller).
    fn forget_before(&mut self, layer: usize, pos: usize) {
        let _ = (layer, pos);
    }
    fn box_clone(&self) -> Box<dyn KvCache>;

    fn is_empty(&self, layer: usize) -> bool {
        self.len(layer) == 0
    }
}

/// Validates an append's shape and values; returns the number of new tokens.
pub fn check_append(
    shape: &CacheShape,
    layer: usize,
    k: &[f32],
    v: &[f32],
) -> Result<usize, CacheError> {
    if layer >= shape.layers {
        return Err(CacheError::Shape(format!(
            "layer {layer} out of range ({} layers)",
            shape.layers
        )));
    }
    let row = shape.kv_heads * shape.head_dim;
    if k.len() != v.len() || !k.len().is_multiple_of(row) {
        return Err(CacheError::Shape(format!(
            "keys/values hold {}/{} values: not whole [tokens, {}, {}] rows",
            k.len(),
            v.len(),
            shape.kv_heads,
            shape.head_dim
        )));
    }
    if k.iter().any(|x| !x.is_finite()) {
        return Err(CacheError::NonFinite("keys", layer));
    }
    if v.iter().any(|x| !x.is_finite()) {
        return Err(CacheError::NonFinite("values", layer));
    }
    Ok(k.len() / row)
}

/// Validates a read request against what is stored.
pub fn check_read(
    shape: &CacheShape,
    stored: usize,
    layer: usize,
    head: usize,
    positions: &Range<usize>,
    out: &[f32],
) -> Result<(), CacheError> {
    if layer >= shape.layers || head >= shape.kv_heads {
        return Err(CacheError::Shape(format!(
            "layer {layer} / head {head} out of range"
        )));
    }
    if positions.start > positions.end || positions.end > stored {
        return Err(CacheError::Shape(format!(
            "positions {positions:?} outside the {stored} stored in layer {layer}"
        )));
    }
    if out.len() != positions.len() * shape.head_dim {
        return Err(CacheError::Shape(format!(
            "output holds {} values, expected {} x {}",
            out.len(),
            positions.len(),
            shape.head_dim
        )));
    }
    Ok(())
}
