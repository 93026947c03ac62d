//! Training: stage-by-stage k-means on a sample, then EMA refinement over the whole data.
//!
//! The EMA step is the paper's (vector-quantize-pytorch's `EuclideanCodebook`): per code, counts
//! and sums decay by `decay` and take in the batch's; counts are Laplace-smoothed,
//! (count_i + eps) / (n + C·eps) · n, and each codeword is sum / smoothed count. Training streams
//! the data in batches: beyond the k-means sample and one batch, memory does not grow with it.

use crate::kernels::{nearest, row_norms};
use crate::quantizer::validate_shape;
use crate::rng::SplitMix64;
use crate::{check_finite, Result, Rvq, RvqError};
use serde::{Deserialize, Serialize};

/// How k-means picks its first centroids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// C distinct random sample points (faiss's default).
    RandomPoints,
    /// k-means++ (D² sampling).
    KmeansPlusPlus,
}

impl std::fmt::Display for Init {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Init::RandomPoints => "random-points",
            Init::KmeansPlusPlus => "kmeans-plus-plus",
        })
    }
}

impl std::str::FromStr for Init {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "random-points" => Ok(Init::RandomPoints),
            "kmeans-plus-plus" | "kmeans++" => Ok(Init::KmeansPlusPlus),
            o => Err(format!(
                "unknown init '{o}' (known: random-points, kmeans-plus-plus)"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Dimension d of the vectors.
    pub dim: usize,
    /// Codewords per stage, C (2..=65536).
    pub size: usize,
    /// Stages, K.
    pub stages: usize,
    /// Vectors sampled for k-means (and, up to max(8192, 8·C) of them, the training report).
    pub kmeans_sample: usize,
    pub kmeans_iters: usize,
    pub init: Init,
    /// Passes of EMA refinement over all the data (0 = k-means only).
    pub ema_passes: usize,
    /// Vectors per EMA step.
    pub batch: usize,
    pub decay: f32,
    pub eps: f32,
    /// Codewords whose EMA count falls below this are re-seeded from the batch's residuals
    /// (SoundStream / vector-quantize-pytorch). `None` = off, as in the paper.
    pub dead_code_threshold: Option<f32>,
    pub seed: u64,
}

impl TrainConfig {
    /// The paper's configuration (d = 32, C = 2048, K = 8, decay 0.99, eps 1e-5).
    pub fn paper() -> Self {
        Self {
            dim: 32,
            size: 2048,
            stages: 8,
            kmeans_sample: 32_768,
            kmeans_iters: 6,
            init: Init::RandomPoints,
            ema_passes: 1,
            batch: 1024,
            decay: 0.99,
            eps: 1e-5,
            dead_code_threshold: None,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_shape(self.dim, self.size, self.stages)?;
        if self.batch == 0 || self.kmeans_sample == 0 {
            return Err(RvqError::Config(
                "batch and k-means sample must be at least 1".into(),
            ));
        }
        if !(self.decay > 0.0 && self.decay < 1.0) {
            return Err(RvqError::Config(format!(
                "decay {} must be in (0, 1)",
                self.decay
            )));
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(RvqError::Config(format!(
                "eps {} must be positive",
                self.eps
            )));
        }
        if let Some(t) = self.dead_code_threshold {
            if !(t >= 0.0 && t.is_finite()) {
                return Err(RvqError::Config(format!(
                    "dead-code threshold {t} must be a finite count ≥ 0"
                )));
            }
        }
        if self.kmeans_sample < self.size {
            return Err(RvqError::Config(format!(
                "the k-means sample ({}) must hold at least C = {} vectors",
                self.kmeans_sample, self.size
            )));
        }
        Ok(())
    }
}

/// Training vectors, read in order by ranges (so a caller can stream them from anywhere).
pub trait VectorSource: Sync {
    fn dim(&self) -> usize;
    fn len(&self) -> usize;
    /// Copies vectors `start..start + out.len() / dim` into `out`.
    fn read(&self, start: usize, out: &mut [f32]);
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Vectors held in one slice ([n, dim]).
pub struct SliceSource<'a> {
    pub data: &'a [f32],
    pub dim: usize,
}

impl VectorSource for SliceSource<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.data.len() / self.dim
    }
    fn read(&self, start: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.data[start * self.dim..start * self.dim + out.len()]);
    }
}

/// Per-stage quality on the report sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// ‖x − x̂‖² / ‖x‖² after this stage (greedy).
    pub relative_mse: f64,
    /// exp(entropy of code usage): the number of codewords effectively in use.
    pub usage_perplexity: f64,
    /// Codewords never chosen on the report sample.
    pub unused_codes: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    pub vectors: usize,
    pub report_vectors: usize,
    pub stages: Vec<StageStats>,
    /// Codewords re-seeded by dead-code replacement, over all stages and passes.
    pub dead_codes_replaced: usize,
}

impl Rvq {
    /// Learns a quantizer from `data`. Deterministic given `config.seed`, whatever the threads.
    pub fn train(config: &TrainConfig, data: &dyn VectorSource) -> Result<(Rvq, TrainReport)> {
        config.validate()?;
        let d = config.dim;
        if data.dim() != d {
            return Err(RvqError::Input(format!(
                "training vectors have dim {}, config says {d}",
                data.dim()
            )));
        }
        let n = data.len();
        if n == 0 {
            return Err(RvqError::Input("the training set is empty".into()));
        }
        if n < config.size {
            return Err(RvqError::Input(format!(
                "{n} training vectors are fewer than the C = {} codewords to learn",
                config.size
            )));
        }
        let mut rng = SplitMix64::new(config.seed);
        let sample = draw_sample(data, config.kmeans_sample.min(n), config.batch, &mut rng)?;

        // Stage-by-stage k-means on the sample's residuals.
        let s = sample.len() / d;
        let mut residual = sample.clone();
        let mut codebooks = Vec::with_capacity(config.stages);
        let mut init_counts = Vec::with_capacity(config.stages);
        for _ in 0..config.stages {
            let (cb, counts, idx) = kmeans(
                &residual,
                d,
                config.size,
                config.kmeans_iters,
                config.init,
                &mut rng,
            );
            subtract_assigned(&mut residual, d, &cb, &idx);
            codebooks.push(cb);
            init_counts.push(counts);
        }
        let mut rvq = Rvq::from_codebooks(d, config.size, codebooks)?;

        // EMA refinement over all the data. Counts start from k-means', rescaled to one batch.
        let mut dead_codes_replaced = 0;
        if config.ema_passes > 0 {
            let scale = config.batch.min(n) as f32 / s as f32;
            let mut ema = EmaCodebooks {
                stages: init_counts
                    .iter()
                    .enumerate()
                    .map(|(k, counts)| EmaState::new(rvq.codebook(k), counts, scale, d))
                    .collect(),
            };
            let mut buf = vec![0f32; config.batch * d];
            for _ in 0..config.ema_passes {
                let mut start = 0;
                while start < n {
                    let m = config.batch.min(n - start);
                    let batch = &mut buf[..m * d];
                    data.read(start, batch);
                    check_finite(batch, &format!("training vectors {start}..{}", start + m))?;
                    dead_codes_replaced += ema.step(&mut rvq, batch, config, &mut rng);
                    start += m;
                }
            }
        }
        let report = report_sample(&sample, d, config.size);
        let stages = stage_stats(&rvq, &report);
        Ok((
            rvq,
            TrainReport {
                vectors: n,
                report_vectors: report.len() / d,
                stages,
                dead_codes_replaced,
            },
        ))
    }
}

/// The vectors the training report measures: an evenly spaced subset of the k-means sample, at
/// most max(8192, 8·C) vectors — plenty for a relative MSE and for the usage of C codes, while a
/// report over the whole sample cost a tenth of training at C = 256 (one more search per stage).
fn report_sample(sample: &[f32], d: usize, size: usize) -> Vec<f32> {
    let s = sample.len() / d;
    let m = s.min(8192.max(8 * size));
    (0..m)
        .flat_map(|i| {
            let v = i * s / m;
            sample[v * d..(v + 1) * d].iter().copied()
        })
        .collect()
}

/// Uniform sample of `count` vectors without replacement (selection sampling, in data order).
fn draw_sample(
    data: &dyn VectorSource,
    count: usize,
    batch: usize,
    rng: &mut SplitMix64,
) -> Result<Vec<f32>> {
    let (n, d) = (data.len(), data.dim());
    let mut out = Vec::with_capacity(count * d);
    let mut buf = vec![0f32; batch * d];
    let mut needed = count;
    let mut start = 0;
    while start < n && needed > 0 {
        let m = batch.min(n - start);
        data.read(start, &mut buf[..m * d]);
        check_finite(
            &buf[..m * d],
            &format!("training vectors {start}..{}", start + m),
        )?;
        for i in 0..m {
            let remaining = n - (start + i);
            if rng.below(remaining) < needed {
                out.extend_from_slice(&buf[i * d..(i + 1) * d]);
                needed -= 1;
            }
        }
        start += m;
    }
    Ok(out)
}

fn subtract_assigned(x: &mut [f32], d: usize, codebook: &[f32], idx: &[u32]) {
    for (row, &j) in x.chunks_exact_mut(d).zip(idx) {
        let cw = &codebook[j as usize * d..(j as usize + 1) * d];
        for (a, c) in row.iter_mut().zip(cw) {
            *a -= c;
        }
    }
}

/// Lloyd's k-means; returns the centroids ([c, d]), the final cluster sizes and each point's
/// nearest final centroid.
pub fn kmeans(
    x: &[f32],
    d: usize,
    c: usize,
    iters: usize,
    init: Init,
    rng: &mut SplitMix64,
) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
    let n = x.len() / d;
    let mut centroids = match init {
        Init::RandomPoints => random_points(x, d, c, rng),
        Init::KmeansPlusPlus => kmeans_plus_plus(x, d, c, rng),
    };
    let mut counts = vec![0f32; c];
    for it in 0..=iters {
        let (idx, _) = nearest(x, d, &centroids, &row_norms(&centroids, d));
        let mut sums = vec![0f64; c * d];
        counts.iter_mut().for_each(|v| *v = 0.0);
        for (i, &j) in idx.iter().enumerate() {
            counts[j as usize] += 1.0;
            for (s, v) in sums[j as usize * d..(j as usize + 1) * d]
                .iter_mut()
                .zip(&x[i * d..(i + 1) * d])
            {
                *s += *v as f64;
            }
        }
        if it == iters {
            // The last pass only measures the final centroids' clusters.
            return (centroids, counts, idx);
        }
        for j in 0..c {
            let cw = &mut centroids[j * d..(j + 1) * d];
            if counts[j] > 0.0 {
                for (w, s) in cw.iter_mut().zip(&sums[j * d..(j + 1) * d]) {
                    *w = (*s / counts[j] as f64) as f32;
                }
            } else {
                // Empty cluster: restart it at a random point.
                let p = rng.below(n);
                cw.copy_from_slice(&x[p * d..(p + 1) * d]);
            }
        }
    }
    unreachable!("the loop returns on its last pass")
}

fn random_points(x: &[f32], d: usize, c: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let n = x.len() / d;
    // Partial Fisher–Yates over indices: c distinct points.
    let mut idx: Vec<usize> = (0..n).collect();
    let mut out = Vec::with_capacity(c * d);
    for i in 0..c {
        let j = i + rng.below(n - i);
        idx.swap(i, j);
        out.extend_from_slice(&x[idx[i] * d..(idx[i] + 1) * d]);
    }
    out
}

fn kmeans_plus_plus(x: &[f32], d: usize, c: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let n = x.len() / d;
    let dist2 = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f32>();
    let first = rng.below(n);
    let mut out = x[first * d..(first + 1) * d].to_vec();
    let mut best: Vec<f32> = (0..n)
        .map(|i| dist2(&x[i * d..(i + 1) * d], &out[..d]))
        .collect();
    while out.len() < c * d {
        let total: f64 = best.iter().map(|&v| v as f64).sum();
        let pick = if total > 0.0 {
            let mut u = rng.unit() * total;
            let mut p = n - 1;
            for (i, &v) in best.iter().enumerate() {
                if u < v as f64 {
                    p = i;
                    break;
                }
                u -= v as f64;
            }
            p
        } else {
            rng.below(n)
        };
        let new = x[pick * d..(pick + 1) * d].to_vec();
        for (i, b) in best.iter_mut().enumerate() {
            *b = b.min(dist2(&x[i * d..(i + 1) * d], &new));
        }
        out.extend_from_slice(&new);
    }
    out
}

/// EMA statistics of one stage.
/// The EMA state of every stage of one quantizer: per-code counts and sums, decayed each step.
/// Calibration uses it after k-means; finetuning keeps updating codebooks with it while the
/// model trains.
#[derive(Clone, Debug, PartialEq)]
pub struct EmaCodebooks {
    stages: Vec<EmaState>,
}

impl EmaCodebooks {
    /// Starts from `rvq`'s codebooks as if every code had been seen `count` times.
    pub fn new(rvq: &Rvq, count: f32) -> Self {
        let counts = vec![count; rvq.size()];
        Self {
            stages: (0..rvq.stages())
                .map(|k| EmaState::new(rvq.codebook(k), &counts, 1.0, rvq.dim()))
                .collect(),
        }
    }

    /// One EMA step on `batch` ([m, d], overwritten with the last residuals): stage by stage,
    /// assign to the nearest codeword, decay counts and sums, optionally re-seed dead codes,
    /// rewrite the codebook. Returns how many dead codes were re-seeded.
    pub fn step(
        &mut self,
        rvq: &mut Rvq,
        batch: &mut [f32],
        config: &TrainConfig,
        rng: &mut SplitMix64,
    ) -> usize {
        self.step_with(rvq, batch, config, rng, None)
    }

    /// [`EmaCodebooks::step`] with the assignments already known: `codes` ([m, stages]) from a
    /// greedy encode of `batch` with these codebooks, which is what the step would compute.
    pub fn step_with_codes(
        &mut self,
        rvq: &mut Rvq,
        batch: &mut [f32],
        codes: &[u16],
        config: &TrainConfig,
        rng: &mut SplitMix64,
    ) -> usize {
        self.step_with(rvq, batch, config, rng, Some(codes))
    }

    fn step_with(
        &mut self,
        rvq: &mut Rvq,
        batch: &mut [f32],
        config: &TrainConfig,
        rng: &mut SplitMix64,
        codes: Option<&[u16]>,
    ) -> usize {
        let d = rvq.dim();
        let stages = self.stages.len();
        let mut replaced = 0;
        for (k, state) in self.stages.iter_mut().enumerate() {
            let idx: Vec<u32> = match codes {
                Some(c) => c
                    .iter()
                    .skip(k)
                    .step_by(stages)
                    .map(|&x| x as u32)
                    .collect(),
                None => nearest(batch, d, rvq.codebook(k), rvq.norms(k)).0,
            };
            // The next stage sees the residual of the codebook before this update.
            let before = rvq.codebook(k).to_vec();
            state.update(batch, &idx, config);
            if let Some(threshold) = config.dead_code_threshold {
                replaced += state.replace_dead(threshold, batch, rng);
            }
            subtract_assigned(batch, d, &before, &idx);
            state.write_codebook(rvq.codebook_mut(k), config);
            rvq.refresh_norms(k);
        }
        replaced
    }

    /// The state as (counts [C], sums [C, d]) per stage, to checkpoint it.
    pub fn state(&self) -> Vec<(&[f32], &[f32])> {
        self.stages
            .iter()
            .map(|s| (s.counts.as_slice(), s.sums.as_slice()))
            .collect()
    }

    /// Rebuilds a state saved by [`EmaCodebooks::state`].
    pub fn from_state(d: usize, stages: Vec<(Vec<f32>, Vec<f32>)>) -> Result<Self> {
        let stages = stages
            .into_iter()
            .map(|(counts, sums)| {
                if sums.len() != counts.len() * d {
                    return Err(RvqError::Input(format!(
                        "EMA state: {} sums for {} codes of dim {d}",
                        sums.len(),
                        counts.len()
                    )));
                }
                Ok(EmaState { d, counts, sums })
            })
            .collect::<Result<_>>()?;
        Ok(Self { stages })
    }
}

#[derive(Clone, Debug, PartialEq)]
struct EmaState {
    d: usize,
    counts: Vec<f32>,
    /// [C, d]
    sums: Vec<f32>,
}

impl EmaState {
    fn new(codebook: &[f32], kmeans_counts: &[f32], scale: f32, d: usize) -> Self {
        let counts: Vec<f32> = kmeans_counts.iter().map(|c| c * scale).collect();
        let sums = codebook
            .chunks_exact(d)
            .zip(&counts)
            .flat_map(|(cw, &n)| cw.iter().map(move |w| w * n))
            .collect();
        Self { d, counts, sums }
    }

    fn update(&mut self, x: &[f32], idx: &[u32], cfg: &TrainConfig) {
        let d = self.d;
        let c = self.counts.len();
        let mut batch_counts = vec![0f32; c];
        let mut batch_sums = vec![0f32; c * d];
        for (row, &j) in x.chunks_exact(d).zip(idx) {
            let j = j as usize;
            batch_counts[j] += 1.0;
            for (s, v) in batch_sums[j * d..(j + 1) * d].iter_mut().zip(row) {
                *s += v;
            }
        }
        let (decay, keep) = (cfg.decay, 1.0 - cfg.decay);
        for (a, b) in self.counts.iter_mut().zip(&batch_counts) {
            *a = *a * decay + b * keep;
        }
        for (a, b) in self.sums.iter_mut().zip(&batch_sums) {
            *a = *a * decay + b * keep;
        }
    }

    /// Codewords = sums / Laplace-smoothed counts.
    fn write_codebook(&self, codebook: &mut [f32], cfg: &TrainConfig) {
        let c = self.counts.len() as f32;
        let n: f32 = self.counts.iter().sum();
        for (j, cw) in codebook.chunks_exact_mut(self.d).enumerate() {
            let smoothed = (self.counts[j] + cfg.eps) / (n + c * cfg.eps) * n;
            for (w, s) in cw.iter_mut().zip(&self.sums[j * self.d..(j + 1) * self.d]) {
                *w = s / smoothed;
            }
        }
    }

    /// Re-seeds codewords whose count fell below `threshold` with random vectors of `input`,
    /// this stage's input in the current batch (as vector-quantize-pytorch does).
    fn replace_dead(&mut self, threshold: f32, input: &[f32], rng: &mut SplitMix64) -> usize {
        let d = self.d;
        let m = input.len() / d;
        let mut replaced = 0;
        for j in 0..self.counts.len() {
            if self.counts[j] < threshold {
                let p = rng.below(m);
                self.counts[j] = threshold;
                for (s, v) in self.sums[j * d..(j + 1) * d]
                    .iter_mut()
                    .zip(&input[p * d..(p + 1) * d])
                {
                    *s = v * threshold;
                }
                replaced += 1;
            }
        }
        replaced
    }
}

/// Relative MSE and code usage per stage, greedy, on `x`.
pub fn stage_stats(rvq: &Rvq, x: &[f32]) -> Vec<StageStats> {
    let d = rvq.dim();
    let energy: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
    let mut residual = x.to_vec();
    let mut out = Vec::with_capacity(rvq.stages());
    for k in 0..rvq.stages() {
        let (idx, _) = nearest(&residual, d, rvq.codebook(k), rvq.norms(k));
        subtract_assigned(&mut residual, d, rvq.codebook(k), &idx);
        let err: f64 = residual.iter().map(|v| (*v as f64).powi(2)).sum();
        let mut usage = vec![0usize; rvq.size()];
        idx.iter().for_each(|&j| usage[j as usize] += 1);
        let total = idx.len() as f64;
        let entropy: f64 = usage
            .iter()
            .filter(|&&u| u > 0)
            .map(|&u| {
                let p = u as f64 / total;
                -p * p.ln()
            })
            .sum();
        out.push(StageStats {
            relative_mse: if energy > 0.0 { err / energy } else { 0.0 },
            usage_perplexity: entropy.exp(),
            unused_codes: usage.iter().filter(|&&u| u == 0).count(),
        });
    }
    out
}

#[cfg(test)]
mod tests;
