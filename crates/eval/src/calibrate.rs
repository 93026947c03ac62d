//! Calibration: run the model over calibration text, capture every layer's pre-RoPE K and V
//! (and its queries' energy per channel), and train one RVQ per layer for keys and one for
//! values (shared by all groups and heads).

use crate::progress;
use anyhow::{bail, Context, Result};
use kvcache::codebooks::{ChannelWeights, CodebookMeta, Codebooks, LayerBooks, PartSettings};
use kvcache::dense::F32Cache;
use kvcache::hooked::{Hooked, Hooks};
use kvcache::{CacheError, KvCache, Queries, Rope};
use llm::Model;
use rvq::hadamard::Hadamard;
use rvq::train::SliceSource;
use rvq::{Grouping, Rvq, TrainConfig, VectorLayout};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct CalibConfig {
    /// Calibration tokens (taken from the start of the text).
    pub tokens: usize,
    /// Window length for the capture forward passes.
    pub ctx: usize,
    pub train: TrainConfig,
    pub key_grouping: Grouping,
    pub value_grouping: Grouping,
    pub quantize_keys: bool,
    pub quantize_values: bool,
    /// Divide each head vector by its standard deviation (the paper).
    pub scaled: bool,
    /// Hadamard-rotate each head vector before grouping (beyond the paper).
    pub rotate: bool,
    /// Weight key channels by the calibration queries' energy (beyond the paper).
    pub query_aware: bool,
    pub skip_layers: Vec<usize>,
    /// Where the text came from (for the record).
    pub text: String,
}

impl CalibConfig {
    /// The paper's configuration (what `rvq-kv calibrate` does by default) on text `text`.
    pub fn paper(text: &str) -> Self {
        Self {
            tokens: 16384,
            ctx: 512,
            train: TrainConfig::paper(),
            key_grouping: Grouping::Strided,
            value_grouping: Grouping::Contiguous,
            quantize_keys: true,
            quantize_values: true,
            scaled: true,
            rotate: false,
            query_aware: false,
            skip_layers: vec![],
            text: text.to_string(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CalibTimings {
    pub capture_s: f64,
    pub train_s: f64,
    pub captured_tokens: usize,
}

/// What a capture pass saw in one layer.
#[derive(Clone, Debug, Default)]
pub struct LayerCapture {
    /// Pre-RoPE keys, [tokens, kv_heads, hd].
    pub keys: Vec<f32>,
    /// [tokens, kv_heads, hd]
    pub values: Vec<f32>,
    /// Σ q_c² over every (post-RoPE) query of each KV head's group, [kv_heads, hd].
    pub query_energy: Vec<f64>,
}

/// Every layer's [`LayerCapture`].
pub type Captured = Vec<LayerCapture>;

/// Records every appended K/V and every query's energy into a shared [`Captured`].
#[derive(Clone)]
pub struct Capture(pub Arc<Mutex<Captured>>);

impl Hooks for Capture {
    fn append(
        &self,
        inner: &mut dyn KvCache,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), CacheError> {
        inner.append(layer, k, v)?;
        let mut c = self.0.lock().expect("capture lock");
        c[layer].keys.extend_from_slice(k);
        c[layer].values.extend_from_slice(v);
        Ok(())
    }
    fn attend(
        &self,
        inner: &dyn KvCache,
        layer: usize,
        queries: &Queries,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        let shape = inner.shape();
        let hd = shape.head_dim;
        let group = queries.q_heads / shape.kv_heads.max(1);
        let mut c = self.0.lock().expect("capture lock");
        let energy = &mut c[layer].query_energy;
        energy.resize(shape.kv_heads * hd, 0.0);
        for (i, q) in queries.q.chunks_exact(hd).enumerate() {
            let kv_head = (i % queries.q_heads) / group.max(1);
            for (e, &x) in energy[kv_head * hd..].iter_mut().zip(q) {
                *e += (x as f64) * (x as f64);
            }
        }
        drop(c);
        inner.attend(layer, queries, out)
    }
    fn for_copy(&self) -> Self {
        self.clone()
    }
}

/// Pre-RoPE K and V of every layer over `tokens`, run in windows of `ctx`.
pub fn capture(model: &Model, tokens: &[u32], ctx: usize, quiet: bool) -> Result<Captured> {
    if ctx == 0 || ctx > model.context_len() {
        bail!(
            "--ctx {ctx}: capture windows take 1 to {} tokens (the model's context)",
            model.context_len()
        );
    }
    let shape = model.cache_shape();
    let captured = Arc::new(Mutex::new(vec![LayerCapture::default(); shape.layers]));
    let pb = progress::bar(tokens.len() as u64, "tok", quiet);
    pb.set_message("capturing K/V");
    for window in tokens.chunks(ctx) {
        let f32_cache = F32Cache::new(shape, model.net.ropes().clone());
        let mut cache = Hooked::new(Box::new(f32_cache), Capture(captured.clone()));
        model.forward(window, 0, &mut cache, Some(1))?;
        pb.inc(window.len() as u64);
    }
    pb.finish_and_clear();
    let out = std::mem::take(&mut *captured.lock().expect("capture lock"));
    Ok(out)
}

/// Exponent of the key channel weights on the queries' relative energy per pair: w = e^P.
/// Minimising E[(q · (k − k̂))²] would ask for P = 1/2; held-out attention-logit error on
/// SmolLM2 (4 layers) fell most at 1/4 (−31%, against −27% at 1/2 and −22% at 1/8).
const QUERY_WEIGHT_POWER: f64 = 0.25;

/// Relative energies below this floor count as the floor: a channel pair the calibration
/// queries never used still keeps w = floor^P = 0.1 of the mean weight.
const QUERY_ENERGY_FLOOR: f64 = 1e-4;

/// Key channel weights from the queries' energy ([kv_heads, hd], see [`LayerCapture`]): per KV
/// head, each RoPE pair's mean energy relative to the head's mean channel energy, to the power
/// [`QUERY_WEIGHT_POWER`]; the two channels of a pair get the same weight (so that it commutes
/// with RoPE).
pub fn query_weights(energy: &[f64], rope: &Rope) -> Result<ChannelWeights> {
    let hd = rope.head_dim();
    if hd == 0 || energy.is_empty() || !energy.len().is_multiple_of(hd) {
        bail!("no query energy was captured (did the model attend?)");
    }
    let mut w = vec![0f32; energy.len()];
    for (e, w) in energy.chunks_exact(hd).zip(w.chunks_exact_mut(hd)) {
        let mean = e.iter().sum::<f64>() / hd as f64;
        if !(mean.is_finite() && mean > 0.0) {
            bail!("the captured queries have no finite energy");
        }
        for (a, b, _) in rope.pairs() {
            let relative = ((e[a] + e[b]) / 2.0 / mean).max(QUERY_ENERGY_FLOOR);
            let x = relative.powf(QUERY_WEIGHT_POWER) as f32;
            (w[a], w[b]) = (x, x);
        }
    }
    Ok(w.into())
}

/// `x` ([n, kv_heads·hd]) times channel weights `w` ([kv_heads·hd]), or `x` itself.
pub fn weighted<'a>(x: &'a [f32], w: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    match w {
        Some(w) => x
            .chunks_exact(w.len())
            .flat_map(|v| v.iter().zip(w).map(|(a, w)| a * w))
            .collect(),
        None => x.into(),
    }
}

/// Trains one quantizer on head vectors `x` ([n, head_dim]) under `layout`.
fn train_part(
    x: &[f32],
    layout: &VectorLayout,
    cfg: &TrainConfig,
) -> Result<(Rvq, rvq::TrainReport)> {
    let (groups, _scales) = layout.to_groups(x)?;
    let src = SliceSource {
        data: &groups,
        dim: layout.group_dim,
    };
    Ok(Rvq::train(cfg, &src)?)
}

pub fn calibrate(
    model: &Model,
    tokens: &[u32],
    cfg: &CalibConfig,
    quiet: bool,
) -> Result<(Codebooks, CalibTimings)> {
    let shape = model.cache_shape();
    if tokens.len() < 2 {
        bail!("the calibration text has {} token(s)", tokens.len());
    }
    if let Some(&l) = cfg.skip_layers.iter().find(|&&l| l >= shape.layers) {
        bail!("--skip-layers {l}: the model has {} layers", shape.layers);
    }
    if !cfg.quantize_keys && !cfg.quantize_values {
        bail!("nothing to quantize: choose keys, values or both");
    }
    let d = cfg.train.dim;
    let rotation = if cfg.rotate {
        Some(Hadamard::largest_block(shape.head_dim).context("head_dim is 0")?)
    } else {
        None
    };
    let key_layout = VectorLayout::new(shape.head_dim, d, cfg.key_grouping, cfg.scaled)?
        .with_rotation(rotation)?;
    let value_layout = VectorLayout::new(shape.head_dim, d, cfg.value_grouping, cfg.scaled)?
        .with_rotation(rotation)?;
    let tokens = &tokens[..cfg.tokens.min(tokens.len())];
    let vectors = tokens.len() * shape.kv_heads * key_layout.groups();
    if vectors < cfg.train.size {
        bail!(
            "{} calibration tokens give {vectors} training vectors per quantizer, fewer than C = {}: use more --tokens",
            tokens.len(),
            cfg.train.size
        );
    }
    let t0 = Instant::now();
    let captured = capture(model, tokens, cfg.ctx, quiet)?;
    let capture_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let parts = shape.layers * (cfg.quantize_keys as usize + cfg.quantize_values as usize);
    let pb = progress::bar(parts as u64, "quantizers", quiet);
    let mut layers = Vec::with_capacity(shape.layers);
    let mut reports = Vec::with_capacity(shape.layers);
    for (l, c) in captured.iter().enumerate() {
        if cfg.skip_layers.contains(&l) {
            layers.push(LayerBooks::default());
            reports.push((None, None));
            continue;
        }
        // Each quantizer gets its own seed stream, derived from the base seed and its position.
        let seeded = |part: u64| TrainConfig {
            seed: cfg.train.seed ^ ((l as u64) << 8 | part),
            ..cfg.train.clone()
        };
        let train =
            |on: bool, x: &[f32], layout: &VectorLayout, part: u64, name: &str| -> Result<_> {
                if !on {
                    return Ok((None, None));
                }
                pb.set_message(format!("layer {l} {name}"));
                let (q, r) = train_part(x, layout, &seeded(part))
                    .with_context(|| format!("layer {l} {name}"))?;
                pb.inc(1);
                Ok((Some(q), Some(r)))
            };
        let key_weights = match cfg.quantize_keys && cfg.query_aware {
            true => Some(query_weights(&c.query_energy, model.net.ropes().layer(l))?),
            false => None,
        };
        let keys = weighted(&c.keys, key_weights.as_deref());
        let (kq, kr) = train(cfg.quantize_keys, &keys, &key_layout, 0, "keys")?;
        let (vq, vr) = train(cfg.quantize_values, &c.values, &value_layout, 1, "values")?;
        layers.push(LayerBooks {
            keys: kq.map(Arc::new),
            values: vq.map(Arc::new),
            weights: [key_weights, None],
        });
        reports.push((kr, vr));
    }
    pb.finish_and_clear();
    let train_s = t1.elapsed().as_secs_f64();
    let settings = |on: bool, grouping, weighted| {
        on.then_some(PartSettings {
            group_dim: d,
            grouping,
            scaled: cfg.scaled,
            rotation,
            weighted,
        })
    };
    let meta = CodebookMeta {
        model: model.identity()?,
        keys: settings(cfg.quantize_keys, cfg.key_grouping, cfg.query_aware),
        values: settings(cfg.quantize_values, cfg.value_grouping, false),
        skipped_layers: cfg.skip_layers.clone(),
        calibration: serde_json::to_value(cfg)?,
        reports,
    };
    Ok((
        Codebooks { meta, layers },
        CalibTimings {
            capture_s,
            train_s,
            captured_tokens: tokens.len(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcache::RopeLayout;

    #[test]
    fn query_weights_are_the_pairs_relative_energy_to_the_power() {
        // Two KV heads of 4 channels; interleaved pairs (0, 1) and (2, 3).
        let rope = Rope::new(4, 10000.0, 8, RopeLayout::Interleaved);
        let energy = [1.0, 3.0, 8.0, 0.0, 0.0, 0.0, 5.0, 3.0];
        let w = query_weights(&energy, &rope).unwrap();
        // Head 0: mean 3, pairs 2 and 4 → (2/3)^¼, (4/3)^¼. Head 1: mean 2, pairs 0 (floored)
        // and 4 → (1e-4)^¼ = 0.1, 2^¼.
        let want = [
            (2.0f64 / 3.0).powf(0.25),
            (2.0f64 / 3.0).powf(0.25),
            (4.0f64 / 3.0).powf(0.25),
            (4.0f64 / 3.0).powf(0.25),
            0.1,
            0.1,
            2f64.powf(0.25),
            2f64.powf(0.25),
        ];
        for (a, b) in w.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{w:?}");
        }
        // Half-split pairs (0, 2) and (1, 3).
        let rope = Rope::new(4, 10000.0, 8, RopeLayout::HalfSplit);
        let w = query_weights(&energy[..4], &rope).unwrap();
        assert_eq!((w[0], w[1]), (w[2], w[3]));
        assert!(query_weights(&[], &rope).is_err());
        assert!(query_weights(&[0.0; 4], &rope).is_err());
        assert!(query_weights(&[f64::NAN; 4], &rope).is_err());
    }

    #[test]
    fn weighted_multiplies_each_vector_by_the_weights() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(&*weighted(&x, Some(&[2.0, 0.5])), &[2.0, 1.0, 6.0, 2.0]);
        assert_eq!(&*weighted(&x, None), &x);
    }
}
