//! The calibrated codebooks of an RVQ cache: one quantizer per layer for keys and one for
//! values, with the model identity they were learned on, the settings, and the training report.
//! Stored as one safetensors file (tensors `layer.{l}.{k|v}.stage.{s}`, for weighted parts
//! `layer.{l}.{k|v}.weights`, JSON metadata).

use crate::{CacheError, ModelIdentity};
use rvq::hadamard::Hadamard;
use rvq::{io, Grouping, Rvq, TrainReport, VectorLayout};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub const FORMAT: &str = "rvq-kv-codebooks";
pub const VERSION: u32 = 1;

/// How one of K or V is quantized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartSettings {
    pub group_dim: usize,
    pub grouping: Grouping,
    pub scaled: bool,
    /// Hadamard rotation of each head vector before grouping (beyond the paper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Hadamard>,
    /// Each layer has [`ChannelWeights`] for this part (beyond the paper).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub weighted: bool,
}

/// Per-channel weights of one layer's keys or values, [kv_heads, head_dim], all finite and
/// positive, equal within each RoPE pair: vectors are quantized as x ⊙ w and read back as
/// x̂ ⊘ w, so the codebooks' squared error counts channel c w_c² times. Query-aware keys
/// (`calibrate --query-aware`) take w from the calibration queries' energy per channel pair: the
/// error attention sees is q · (k − k̂), not ‖k − k̂‖. A pair-constant w commutes with RoPE, so
/// scoring coded keys needs only the query divided by w.
pub type ChannelWeights = Arc<[f32]>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CodebookMeta {
    pub model: ModelIdentity,
    /// `None`: keys are not quantized.
    pub keys: Option<PartSettings>,
    pub values: Option<PartSettings>,
    /// Layers left in full precision.
    pub skipped_layers: Vec<usize>,
    /// Calibration settings and data description (free-form, for the record).
    pub calibration: serde_json::Value,
    /// Training reports: `reports[layer]` = (keys, values).
    pub reports: Vec<(Option<TrainReport>, Option<TrainReport>)>,
}

/// Quantizers of one layer (as trained, or as `convert` made them on loading).
#[derive(Clone, Debug)]
pub struct LayerBooks<T = Arc<Rvq>> {
    pub keys: Option<T>,
    pub values: Option<T>,
    /// [keys, values]: the part's channel weights when its settings say `weighted`.
    pub weights: [Option<ChannelWeights>; 2],
}

impl<T> Default for LayerBooks<T> {
    fn default() -> Self {
        Self {
            keys: None,
            values: None,
            weights: [None, None],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Codebooks {
    pub meta: CodebookMeta,
    pub layers: Vec<LayerBooks>,
}

impl CodebookMeta {
    pub fn key_layout(&self) -> Option<VectorLayout> {
        self.keys.as_ref().map(|p| self.layout(p))
    }
    pub fn value_layout(&self) -> Option<VectorLayout> {
        self.values.as_ref().map(|p| self.layout(p))
    }
    fn layout(&self, p: &PartSettings) -> VectorLayout {
        VectorLayout {
            vector_dim: self.model.head_dim,
            group_dim: p.group_dim,
            grouping: p.grouping,
            scaled: p.scaled,
            rotation: p.rotation,
        }
    }

    /// Fails unless these codebooks were learned on `model`.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<(), CacheError> {
        let m = &self.model;
        if m != model {
            return Err(CacheError::Codebooks(format!(
                "codebooks were calibrated for {} ({} layers, {} KV heads x {}, sha256 {}…), \
                 not for this model: {} ({} layers, {} KV heads x {}, sha256 {}…)",
                m.architecture,
                m.layers,
                m.kv_heads,
                m.head_dim,
                &m.file_sha256[..m.file_sha256.len().min(12)],
                model.architecture,
                model.layers,
                model.kv_heads,
                model.head_dim,
                &model.file_sha256[..model.file_sha256.len().min(12)],
            )));
        }
        Ok(())
    }
}

impl Codebooks {
    pub fn key_layout(&self) -> Option<VectorLayout> {
        self.meta.key_layout()
    }
    pub fn value_layout(&self) -> Option<VectorLayout> {
        self.meta.value_layout()
    }

    /// Bytes of all codebooks (fixed overhead of the cache).
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| [&l.keys, &l.values])
            .flatten()
            .map(|q| q.codebook_bytes())
            .sum::<u64>()
            + self
                .layers
                .iter()
                .flat_map(|l| l.weights.iter().flatten())
                .map(|w| std::mem::size_of_val(&w[..]) as u64)
                .sum::<u64>()
    }

    pub fn save(&self, path: &Path) -> Result<(), CacheError> {
        let mut tensors = Vec::new();
        for (l, books) in self.layers.iter().enumerate() {
            if let Some(q) = &books.keys {
                tensors.extend(io::tensors(q, &format!("layer.{l}.k.")));
            }
            if let Some(q) = &books.values {
                tensors.extend(io::tensors(q, &format!("layer.{l}.v.")));
            }
            for (part, w) in ["k", "v"].iter().zip(&books.weights) {
                if let Some(w) = w {
                    let shape = vec![self.meta.model.kv_heads, self.meta.model.head_dim];
                    tensors.push((
                        format!("layer.{l}.{part}.weights"),
                        io::f32_to_le_bytes(w),
                        shape,
                    ));
                }
            }
        }
        let stages: Vec<(usize, usize)> = self
            .layers
            .iter()
            .map(|b| {
                (
                    b.keys.as_ref().map_or(0, |q| q.stages()),
                    b.values.as_ref().map_or(0, |q| q.stages()),
                )
            })
            .collect();
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), VERSION.to_string()),
            ("meta".to_string(), to_json(&self.meta)?),
            ("stages".to_string(), to_json(&stages)?),
        ]);
        io::write_safetensors(path, &tensors, meta).map_err(|e| CacheError::Write(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<Self, CacheError> {
        let (meta, layers) = Self::load_converted(path, |q| Ok(Arc::new(q)))?;
        Ok(Self { meta, layers })
    }

    /// [`load`](Self::load), each quantizer passed through `convert` as it is read (and its
    /// file pages released), so a compact form of the codebooks never coexists with all the
    /// f32 ones.
    pub fn load_converted<T>(
        path: &Path,
        mut convert: impl FnMut(Rvq) -> Result<T, CacheError>,
    ) -> Result<(CodebookMeta, Vec<LayerBooks<T>>), CacheError> {
        let p = path.display().to_string();
        let err = |reason: String| CacheError::Codebooks(format!("{p}: {reason}"));
        let file = std::fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(err("is a folder, not a codebook file".into()));
        }
        // Mapped instead of read: the f32 codebooks are built from the file's pages one layer at
        // a time and the pages are released as we go, so loading never holds the file's bytes
        // and the codebooks at once (126 MB more at peak for the paper config on SmolLM2).
        // SAFETY: codebook files are only ever replaced by a rename (`io::write_atomic`), never
        // changed in place, so the mapped bytes stay as they are.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(format!("cannot map: {e}")))?;
        let bytes: &[u8] = &map;
        let md = io::checked_metadata(bytes, FORMAT, VERSION).map_err(err)?;
        let field = |k: &str| {
            md.get(k)
                .ok_or_else(|| err(format!("metadata lacks '{k}'")))
        };
        let meta: CodebookMeta =
            serde_json::from_str(field("meta")?).map_err(|e| err(format!("bad 'meta': {e}")))?;
        let stages: Vec<(usize, usize)> = serde_json::from_str(field("stages")?)
            .map_err(|e| err(format!("bad 'stages': {e}")))?;
        if stages.len() != meta.model.layers {
            return Err(err(format!(
                "{} layer entries for a {}-layer model",
                stages.len(),
                meta.model.layers
            )));
        }
        if let Some(&bad) = meta
            .skipped_layers
            .iter()
            .find(|&&l| l >= meta.model.layers)
        {
            return Err(err(format!(
                "skipped layer {bad} does not exist in a {}-layer model",
                meta.model.layers
            )));
        }
        for (l, &(ks, vs)) in stages.iter().enumerate() {
            let skipped = meta.skipped_layers.contains(&l);
            for (part, n, settings) in [("key", ks, &meta.keys), ("value", vs, &meta.values)] {
                if skipped && n > 0 {
                    return Err(err(format!(
                        "layer {l} is listed as skipped but has {n} {part} stages"
                    )));
                }
                if !skipped && settings.is_some() && n == 0 {
                    return Err(err(format!(
                        "layer {l} has 0 {part} stages but is not listed as skipped"
                    )));
                }
            }
        }
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("truncated or corrupted: {e}")))?;
        let mut layers = Vec::with_capacity(stages.len());
        for (l, &(ks, vs)) in stages.iter().enumerate() {
            let mut read = |part: &str,
                            n: usize,
                            settings: &Option<PartSettings>|
             -> Result<Option<T>, CacheError> {
                if n == 0 {
                    return Ok(None);
                }
                let q = io::from_safetensors(&st, &format!("layer.{l}.{part}."), n, &p)
                    .map_err(|e| CacheError::Codebooks(e.to_string()))?;
                let s = settings.as_ref().ok_or_else(|| {
                    err(format!(
                        "layer {l} has {part} codebooks but no {part} settings"
                    ))
                })?;
                if let Some(h) = s.rotation {
                    if !meta.model.head_dim.is_multiple_of(h.block()) {
                        return Err(err(format!(
                            "{part} rotation block {} does not divide head_dim {}",
                            h.block(),
                            meta.model.head_dim
                        )));
                    }
                }
                if s.group_dim == 0 || !meta.model.head_dim.is_multiple_of(s.group_dim) {
                    return Err(err(format!(
                        "{part} group dim {} does not divide head_dim {}",
                        s.group_dim, meta.model.head_dim
                    )));
                }
                if q.dim() != s.group_dim {
                    return Err(err(format!(
                        "layer {l} {part}: codewords of {} channels, groups of {}",
                        q.dim(),
                        s.group_dim
                    )));
                }
                convert(q).map(Some)
            };
            let keys = read("k", ks, &meta.keys)?;
            let values = read("v", vs, &meta.values)?;
            let weights = |part: &str, coded: bool, settings: &Option<PartSettings>| match (
                coded, settings,
            ) {
                (true, Some(s)) if s.weighted => {
                    read_weights(&st, &format!("layer.{l}.{part}.weights"), &meta.model)
                        .map(Some)
                        .map_err(&err)
                }
                _ => Ok(None),
            };
            let weights = [
                weights("k", ks > 0, &meta.keys)?,
                weights("v", vs > 0, &meta.values)?,
            ];
            layers.push(LayerBooks {
                keys,
                values,
                weights,
            });
            release_pages(&map);
        }
        Ok((meta, layers))
    }

    /// Fails unless these codebooks were learned on `model`.
    pub fn check_model(&self, model: &ModelIdentity) -> Result<(), CacheError> {
        self.meta.check_model(model)
    }
}

/// Tensor `name` as [`ChannelWeights`] of `model`, checked.
fn read_weights(
    st: &SafeTensors,
    name: &str,
    model: &ModelIdentity,
) -> Result<ChannelWeights, String> {
    let t = st.tensor(name).map_err(|e| format!("tensor {name}: {e}"))?;
    let shape = [model.kv_heads, model.head_dim];
    if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
        return Err(format!(
            "tensor {name}: expected f32 {shape:?}, got {:?} {:?}",
            t.dtype(),
            t.shape()
        ));
    }
    let w = io::f32_from_le_bytes(t.data());
    if let Some(bad) = w.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        return Err(format!(
            "tensor {name}: channel weights must be finite and positive, found {bad}"
        ));
    }
    Ok(w.into())
}

/// Drops the pages of `map` from this process (they are read again from the file if touched).
fn release_pages(map: &memmap2::Mmap) {
    #[cfg(unix)]
    // SAFETY: a private read-only file mapping: released pages read back the file's bytes.
    unsafe {
        // Only memory accounting depends on it; a refusal is harmless.
        let _ = map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed);
    }
    #[cfg(not(unix))]
    let _ = map;
}

fn to_json<T: Serialize>(v: &T) -> Result<String, CacheError> {
    serde_json::to_string(v).map_err(|e| CacheError::Codebooks(e.to_string()))
}
