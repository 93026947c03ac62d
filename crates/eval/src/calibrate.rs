//! Calibration: run the model over calibration text, capture every layer's pre-RoPE K and V,
//! and train one RVQ per layer for keys and one for values (shared by all groups and heads).

use crate::progress;
use anyhow::{bail, Context, Result};
use kvcache::codebooks::{CodebookMeta, Codebooks, LayerBooks, PartSettings};
use kvcache::dense::F32Cache;
use kvcache::hooked::{Hooked, Hooks};
use kvcache::{CacheError, KvCache};
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

/// Captured pre-RoPE keys and values, per layer: ([tokens, kv_heads, hd], [tokens, kv_heads, hd]).
pub type Captured = Vec<(Vec<f32>, Vec<f32>)>;

/// Records every appended K/V (per layer: [tokens, kv_heads, hd]) into a shared [`Captured`].
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
        c[layer].0.extend_from_slice(k);
        c[layer].1.extend_from_slice(v);
        Ok(())
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
    let captured = Arc::new(Mutex::new(vec![(Vec::new(), Vec::new()); shape.layers]));
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
    for (l, (k, v)) in captured.iter().enumerate() {
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
        let (kq, kr) = train(cfg.quantize_keys, k, &key_layout, 0, "keys")?;
        let (vq, vr) = train(cfg.quantize_values, v, &value_layout, 1, "values")?;
        layers.push(LayerBooks {
            keys: kq.map(Arc::new),
            values: vq.map(Arc::new),
        });
        reports.push((kr, vr));
    }
    pb.finish_and_clear();
    let train_s = t1.elapsed().as_secs_f64();
    let settings = |on: bool, grouping| {
        on.then_some(PartSettings {
            group_dim: d,
            grouping,
            scaled: cfg.scaled,
            rotation,
        })
    };
    let meta = CodebookMeta {
        model: model.identity()?,
        keys: settings(cfg.quantize_keys, cfg.key_grouping),
        values: settings(cfg.quantize_values, cfg.value_grouping),
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
