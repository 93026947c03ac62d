//! The training loop: sequences of calibration text, gradient accumulation, AdamW with warmup
//! and cosine decay, codebooks following by EMA, checkpoints that resume bit for bit, and the
//! outputs (changed weights as a delta, updated codebooks).

use crate::adamw::{learning_rate, AdamW, AdamWConfig};
use crate::net::{TrainNet, Trainable};
use crate::ste::PartQuantizer;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use kvcache::codebooks::Codebooks;
use llm::delta::WeightsDelta;
use rvq::{EmaCodebooks, Rvq, VectorLayout};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FinetuneConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    /// Sequences per optimizer step (gradient accumulation).
    pub accum: usize,
    /// Peak learning rate (the paper: 1e-5).
    pub lr: f64,
    /// Linear warmup steps before the cosine decay.
    pub warmup: usize,
    pub adamw: AdamWConfig,
    pub trainable: Trainable,
    /// Weight of the commitment loss (the paper: 0.25).
    pub commitment_weight: f64,
    /// EMA decay of the codebooks (the paper: 0.99).
    pub ema_decay: f32,
    /// Keep codebooks learning by EMA while the model trains.
    pub update_codebooks: bool,
}

impl FinetuneConfig {
    pub fn paper(trainable: Trainable) -> Self {
        Self {
            steps: 100,
            seq_len: 256,
            accum: 4,
            lr: 1e-5,
            warmup: 10,
            adamw: AdamWConfig::default(),
            trainable,
            commitment_weight: 0.25,
            ema_decay: 0.99,
            update_codebooks: true,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.accum == 0 || self.seq_len < 2 {
            bail!("steps and accum must be ≥ 1 and seq_len ≥ 2");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!(
                "the learning rate must be a positive number, got {}",
                self.lr
            );
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            bail!("the EMA decay must be in [0, 1), got {}", self.ema_decay);
        }
        if !(self.commitment_weight.is_finite() && self.commitment_weight >= 0.0) {
            bail!("the commitment weight must be ≥ 0");
        }
        let wd = self.adamw.weight_decay;
        if !(wd.is_finite() && wd >= 0.0) {
            bail!("--weight-decay {wd}: must be a finite number ≥ 0");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepReport {
    /// The step just taken (1-based).
    pub step: usize,
    /// Mean next-token cross-entropy over the step's sequences (nats per token).
    pub loss: f64,
    /// Mean commitment loss (summed over layers, parts and stages).
    pub commitment: f64,
    pub lr: f64,
    pub tokens: usize,
}

type Quantizers = Vec<(Option<PartQuantizer>, Option<PartQuantizer>)>;

pub struct Trainer {
    pub config: FinetuneConfig,
    net: TrainNet,
    quantizers: Quantizers,
    books: Codebooks,
    opt: AdamW,
    tokens: Vec<u32>,
    /// Optimizer steps taken.
    pub step: usize,
    model_path: PathBuf,
    model_sha256: String,
}

fn part_quantizer(
    rvq: Option<&Rvq>,
    layout: Option<VectorLayout>,
    ema: Option<EmaCodebooks>,
    config: &FinetuneConfig,
) -> Result<Option<PartQuantizer>> {
    let (Some(rvq), Some(layout)) = (rvq, layout) else {
        return Ok(None);
    };
    // A fresh EMA state weighs each codeword like one training step's share of vectors.
    let per_step = (config.seq_len * layout.groups()) as f32 / rvq.size() as f32;
    let ema = ema.unwrap_or_else(|| EmaCodebooks::new(rvq, per_step.max(1e-3)));
    Ok(Some(PartQuantizer::new(
        rvq.clone(),
        layout,
        ema,
        config.ema_decay,
    )?))
}

impl Trainer {
    /// Starts finetuning the GGUF at `model_path` (sha256 `model_sha256`) with `books`, on
    /// `tokens` of calibration text.
    pub fn new(
        model_path: &Path,
        model_sha256: String,
        books: Codebooks,
        tokens: Vec<u32>,
        config: FinetuneConfig,
    ) -> Result<Self> {
        Self::build(model_path, model_sha256, books, tokens, config, None)
    }

    fn build(
        model_path: &Path,
        model_sha256: String,
        books: Codebooks,
        tokens: Vec<u32>,
        config: FinetuneConfig,
        ema: Option<Vec<(Option<EmaCodebooks>, Option<EmaCodebooks>)>>,
    ) -> Result<Self> {
        config.validate()?;
        if books.meta.model.file_sha256 != model_sha256 {
            bail!("the codebooks were calibrated on another model file");
        }
        if books
            .layers
            .iter()
            .any(|l| l.weights.iter().any(Option::is_some))
        {
            bail!(
                "these codebooks weight their channels (calibrate --query-aware); finetuning \
                 trains through unweighted quantizers: calibrate without --query-aware to finetune"
            );
        }
        if tokens.len() <= config.seq_len {
            bail!(
                "{} tokens of training text, fewer than one sequence of {}",
                tokens.len(),
                config.seq_len
            );
        }
        let net = TrainNet::load(model_path, None, config.trainable)?;
        if net.vars.is_empty() {
            bail!("no trainable weights selected");
        }
        let mut ema = ema.unwrap_or_else(|| vec![(None, None); books.layers.len()]);
        let quantizers = books
            .layers
            .iter()
            .zip(ema.iter_mut())
            .map(|(layer, (ek, ev))| {
                Ok((
                    part_quantizer(
                        layer.keys.as_deref(),
                        books.key_layout(),
                        ek.take(),
                        &config,
                    )?,
                    part_quantizer(
                        layer.values.as_deref(),
                        books.value_layout(),
                        ev.take(),
                        &config,
                    )?,
                ))
            })
            .collect::<Result<Quantizers>>()?;
        let opt = AdamW::new(config.adamw, &net.vars)?;
        Ok(Self {
            config,
            net,
            quantizers,
            books,
            opt,
            tokens,
            step: 0,
            model_path: model_path.into(),
            model_sha256,
        })
    }

    /// The `index`-th training sequence: consecutive windows of the text, wrapping around.
    fn sequence(&self, index: usize) -> &[u32] {
        let len = self.config.seq_len;
        let windows = self.tokens.len() / len;
        let start = (index % windows) * len;
        &self.tokens[start..start + len]
    }

    /// Cross-entropy and commitment on `tokens`, without changing anything.
    pub fn evaluate(&mut self, tokens: &[u32]) -> Result<(f64, f64)> {
        let (ce, com) = self.net.forward(tokens, &mut self.quantizers, false)?;
        Ok((
            ce.to_scalar::<f32>()? as f64,
            com.to_scalar::<f32>()? as f64,
        ))
    }

    /// One optimizer step over `accum` sequences.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let c = self.config.clone();
        let mut grads: Vec<Option<Tensor>> = vec![None; self.net.vars.len()];
        let (mut ce_sum, mut com_sum) = (0.0, 0.0);
        for a in 0..c.accum {
            let seq = self.sequence(self.step * c.accum + a).to_vec();
            let (ce, com) = self
                .net
                .forward(&seq, &mut self.quantizers, c.update_codebooks)?;
            ce_sum += ce.to_scalar::<f32>()? as f64;
            com_sum += com.to_scalar::<f32>()? as f64;
            let loss = ((ce + (com * c.commitment_weight)?)? / c.accum as f64)?;
            let store = loss.backward()?;
            for ((_, var), acc) in self.net.vars.iter().zip(grads.iter_mut()) {
                let g = match store.get(var.as_tensor()) {
                    Some(g) => g.clone(),
                    None => var.as_tensor().zeros_like()?,
                };
                *acc = Some(match acc.take() {
                    Some(prev) => (prev + g)?,
                    None => g,
                });
            }
        }
        let grads: Vec<Tensor> = grads.into_iter().map(|g| g.expect("filled")).collect();
        if let Some(bad) = grads.iter().position(|g| {
            g.sqr()
                .and_then(|s| s.sum_all())
                .and_then(|s| s.to_scalar::<f32>())
                .map_or(true, |v| !v.is_finite())
        }) {
            bail!(
                "non-finite gradient for {} at step {}: lower the learning rate",
                self.net.vars[bad].0,
                self.step + 1
            );
        }
        let lr = learning_rate(self.step, c.steps, c.warmup, c.lr);
        self.opt.update(&self.net.vars, &grads, lr)?;
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss: ce_sum / c.accum as f64,
            commitment: com_sum / c.accum as f64,
            lr,
            tokens: c.accum * c.seq_len,
        })
    }

    /// The trained weights, by GGUF name.
    pub fn delta(&self) -> Result<WeightsDelta> {
        let tensors = self
            .net
            .vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(WeightsDelta {
            tensors,
            model_sha256: self.model_sha256.clone(),
        })
    }

    /// The codebooks as they are now (after EMA updates).
    pub fn codebooks(&self) -> Codebooks {
        let mut books = self.books.clone();
        for (layer, (qk, qv)) in books.layers.iter_mut().zip(&self.quantizers) {
            if let Some(q) = qk {
                layer.keys = Some(Arc::new(q.rvq.clone()));
            }
            if let Some(q) = qv {
                layer.values = Some(Arc::new(q.rvq.clone()));
            }
        }
        books.meta.calibration["finetuned_steps"] = serde_json::json!(self.step);
        books
    }

    /// Writes a checkpoint into `dir`: weights, optimizer moments, EMA state, codebooks.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let books_name = format!("codebooks-{}.safetensors", self.step);
        self.codebooks().save(&dir.join(&books_name))?;
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        let mut push = |name: String, t: &Tensor| -> Result<()> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            tensors.push((name, rvq::io::f32_to_le_bytes(&v), t.dims().to_vec()));
            Ok(())
        };
        for (i, (name, var)) in self.net.vars.iter().enumerate() {
            push(format!("param.{name}"), var.as_tensor())?;
            push(format!("adam_m.{name}"), &self.opt.m[i])?;
            push(format!("adam_v.{name}"), &self.opt.v[i])?;
        }
        let dev = Device::Cpu;
        for (l, (qk, qv)) in self.quantizers.iter().enumerate() {
            for (part, q) in [("k", qk), ("v", qv)] {
                let Some(q) = q else { continue };
                for (s, (counts, sums)) in q.ema.state().into_iter().enumerate() {
                    push(
                        format!("ema.{l}.{part}.{s}.counts"),
                        &Tensor::new(counts, &dev)?,
                    )?;
                    push(
                        format!("ema.{l}.{part}.{s}.sums"),
                        &Tensor::new(sums, &dev)?,
                    )?;
                }
            }
        }
        let metadata = HashMap::from([
            (
                "format".to_string(),
                "rvq-kv finetune checkpoint".to_string(),
            ),
            ("step".to_string(), self.step.to_string()),
            ("adam_step".to_string(), self.opt.step.to_string()),
            ("config".to_string(), serde_json::to_string(&self.config)?),
            ("model_sha256".to_string(), self.model_sha256.clone()),
            ("codebooks".to_string(), books_name.clone()),
        ]);
        rvq::io::write_safetensors(&dir.join("state.safetensors"), &tensors, metadata)?;
        // Older codebook files are no longer referenced.
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("codebooks-") && name != books_name {
                let _ = std::fs::remove_file(&p);
            }
        }
        Ok(())
    }

    /// Continues from a checkpoint written by [`Trainer::save_checkpoint`]: the next step is the
    /// one an uninterrupted run would have taken. `steps`, if given, replaces the total.
    pub fn resume(
        model_path: &Path,
        model_sha256: String,
        tokens: Vec<u32>,
        dir: &Path,
        steps: Option<usize>,
    ) -> Result<Self> {
        let path = dir.join("state.safetensors");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a checkpoint", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .with_context(|| format!("{}: no '{k}' in the metadata", path.display()))
        };
        if get("format")? != "rvq-kv finetune checkpoint" {
            bail!("{} is not an rvq-kv finetune checkpoint", path.display());
        }
        if get("model_sha256")? != model_sha256 {
            bail!("the checkpoint was trained from another model file");
        }
        let mut config: FinetuneConfig = serde_json::from_str(&get("config")?)?;
        if let Some(s) = steps {
            config.steps = s;
        }
        let books = Codebooks::load(&dir.join(get("codebooks")?))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: truncated or corrupted", path.display()))?;
        let read = |name: &str| -> Result<(Vec<f32>, Vec<usize>)> {
            let v: TensorView = st
                .tensor(name)
                .with_context(|| format!("{}: no tensor {name}", path.display()))?;
            if v.dtype() != Dtype::F32 {
                bail!("{name} is not f32");
            }
            Ok((rvq::io::f32_from_le_bytes(v.data()), v.shape().to_vec()))
        };
        let mut ema = vec![(None, None); books.layers.len()];
        for (l, layer) in books.layers.iter().enumerate() {
            for (part, rvq) in [(0, &layer.keys), (1, &layer.values)] {
                let Some(rvq) = rvq else { continue };
                let name = if part == 0 { "k" } else { "v" };
                let stages = (0..rvq.stages())
                    .map(|s| {
                        Ok((
                            read(&format!("ema.{l}.{name}.{s}.counts"))?.0,
                            read(&format!("ema.{l}.{name}.{s}.sums"))?.0,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let state = EmaCodebooks::from_state(rvq.dim(), stages)?;
                if part == 0 {
                    ema[l].0 = Some(state);
                } else {
                    ema[l].1 = Some(state);
                }
            }
        }
        let mut t = Self::build(model_path, model_sha256, books, tokens, config, Some(ema))?;
        let dev = Device::Cpu;
        for (i, (name, var)) in t.net.vars.iter().enumerate() {
            let (p, shape) = read(&format!("param.{name}"))?;
            var.set(&Tensor::from_vec(p, shape.as_slice(), &dev)?)?;
            let (m, _) = read(&format!("adam_m.{name}"))?;
            let (v, _) = read(&format!("adam_v.{name}"))?;
            t.opt.m[i] = Tensor::from_vec(m, shape.as_slice(), &dev)?;
            t.opt.v[i] = Tensor::from_vec(v, shape.as_slice(), &dev)?;
        }
        t.step = get("step")?.parse()?;
        t.opt.step = get("adam_step")?.parse()?;
        Ok(t)
    }

    pub fn model_path(&self) -> &Path {
        &self.model_path
    }
}
