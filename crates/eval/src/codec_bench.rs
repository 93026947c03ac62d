//! `bench codec`: this crate's residual quantizer against faiss's `ResidualQuantizer`, on the same
//! vectors in the same run: training time, encode throughput, relative MSE ‖x − x̂‖²/‖x‖² on
//! held-out vectors, per codebook size and beam width.
//!
//! faiss runs as a Python subprocess (`scripts/faiss_codec.py`, from a virtual environment that
//! `scripts/bench_codec.sh` creates); the data goes to it as raw f32 files.

use crate::calibrate::capture;
use anyhow::{bail, Context, Result};
use llm::Model;
use rvq::rng::SplitMix64;
use rvq::train::SliceSource;
use rvq::{Grouping, Rvq, TrainConfig, VectorLayout};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Vectors of one kind, split into training and held-out test sets ([n, dim] each).
pub struct Dataset {
    pub name: String,
    pub dim: usize,
    pub train: Vec<f32>,
    pub test: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct CodecBenchOptions {
    pub dim: usize,
    pub stages: usize,
    pub sizes: Vec<usize>,
    pub beams: Vec<usize>,
    /// Python with faiss and numpy; `None`: this crate only.
    pub faiss_python: Option<PathBuf>,
    /// `scripts/faiss_codec.py`.
    pub faiss_script: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct CodecRow {
    pub dataset: String,
    pub implementation: String,
    pub size: usize,
    pub beam: usize,
    pub train_s: f64,
    pub encode_vectors_per_s: f64,
    pub relative_mse: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CodecRatio {
    pub dataset: String,
    pub size: usize,
    pub beam: usize,
    /// Our encode vectors/s over faiss's.
    pub encode_speedup: f64,
    /// Our relative MSE over faiss's (below 1: lower error).
    pub mse_ratio: f64,
    /// Our training time over faiss's (below 1: faster).
    pub train_time_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct CodecReport {
    pub rows: Vec<CodecRow>,
    pub ratios: Vec<CodecRatio>,
}

/// i.i.d. standard normal vectors.
pub fn gaussian(dim: usize, train: usize, test: usize, seed: u64) -> Dataset {
    let mut rng = SplitMix64::new(seed);
    let mut draw = |n: usize| (0..n * dim).map(|_| rng.normal()).collect::<Vec<f32>>();
    Dataset {
        name: "gaussian".into(),
        dim,
        train: draw(train),
        test: draw(test),
    }
}

/// Correlated vectors x = A·z with z standard normal and A a random mixing matrix whose column
/// scales decay as 1/sqrt(i+1), so a few directions carry most of the energy (like real K/V).
pub fn correlated(dim: usize, train: usize, test: usize, seed: u64) -> Dataset {
    let mut rng = SplitMix64::new(seed);
    let mix: Vec<f32> = (0..dim * dim)
        .map(|i| rng.normal() / ((i % dim + 1) as f32).sqrt())
        .collect();
    let mut draw = |n: usize| {
        let mut out = vec![0f32; n * dim];
        let mut z = vec![0f32; dim];
        for row in out.chunks_exact_mut(dim) {
            z.iter_mut().for_each(|v| *v = rng.normal());
            for (r, o) in row.iter_mut().enumerate() {
                *o = (0..dim).map(|c| mix[r * dim + c] * z[c]).sum();
            }
        }
        out
    };
    Dataset {
        name: "correlated".into(),
        dim,
        train: draw(train),
        test: draw(test),
    }
}

/// Real pre-RoPE keys and values of `layer`, scaled and grouped exactly as the RVQ cache sees
/// them (keys strided, values contiguous, groups of `dim`), from `tokens` of calibration text.
/// The last `test_fraction` of the groups is held out.
pub fn real_kv(
    model: &Model,
    tokens: &[u32],
    layer: usize,
    dim: usize,
    test_fraction: f64,
) -> Result<[Dataset; 2]> {
    let shape = model.cache_shape();
    if layer >= shape.layers {
        bail!("layer {layer}: the model has {} layers", shape.layers);
    }
    let captured = capture(model, tokens, 512, true)?;
    let (k, v) = (&captured[layer].keys, &captured[layer].values);
    let part = |x: &[f32], grouping: Grouping, name: &str| -> Result<Dataset> {
        let layout = VectorLayout::new(shape.head_dim, dim, grouping, true)?;
        let (groups, _) = layout.to_groups(x)?;
        let n = groups.len() / dim;
        let n_test = ((n as f64 * test_fraction) as usize).max(1);
        let split = (n - n_test) * dim;
        Ok(Dataset {
            name: format!("{name} (layer {layer})"),
            dim,
            train: groups[..split].to_vec(),
            test: groups[split..].to_vec(),
        })
    };
    Ok([
        part(k, Grouping::Strided, "real keys")?,
        part(v, Grouping::Contiguous, "real values")?,
    ])
}

/// Trains ours with the paper's recipe at codebook size `size`, then encodes the test set with
/// every beam width.
fn run_ours(ds: &Dataset, opts: &CodecBenchOptions, size: usize) -> Result<Vec<CodecRow>> {
    let cfg = TrainConfig {
        dim: ds.dim,
        size,
        stages: opts.stages,
        ..TrainConfig::paper()
    };
    let t = Instant::now();
    let (q, _) = Rvq::train(
        &cfg,
        &SliceSource {
            data: &ds.train,
            dim: ds.dim,
        },
    )?;
    let train_s = t.elapsed().as_secs_f64();
    let n = ds.test.len() / ds.dim;
    let mut rows = vec![];
    for &beam in &opts.beams {
        let mut codes = vec![0u16; n * q.stages()];
        let t = Instant::now();
        q.encode(&ds.test, beam, &mut codes)?;
        let secs = t.elapsed().as_secs_f64();
        let mut decoded = vec![0f32; ds.test.len()];
        q.decode(&codes, &mut decoded)?;
        rows.push(CodecRow {
            dataset: ds.name.clone(),
            implementation: "rvq-kv".into(),
            size,
            beam,
            train_s,
            encode_vectors_per_s: n as f64 / secs,
            relative_mse: relative_mse(&ds.test, &decoded),
        });
    }
    Ok(rows)
}

fn relative_mse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x.iter().zip(y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let energy: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum();
    err / energy
}

#[derive(Deserialize)]
struct FaissOut {
    train_s: f64,
    results: Vec<FaissResult>,
}

#[derive(Deserialize)]
struct FaissResult {
    beam: usize,
    encode_vectors_per_s: f64,
    relative_mse: f64,
}

fn write_f32(path: &Path, x: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// faiss on the same data, trained the same way (k-means on a sample of the same size, the same
/// iterations, greedy assignment).
fn run_faiss(
    python: &Path,
    ds: &Dataset,
    opts: &CodecBenchOptions,
    size: usize,
) -> Result<Vec<CodecRow>> {
    let dir = tempfile::tempdir()?;
    let (train, test) = (dir.path().join("train.f32"), dir.path().join("test.f32"));
    write_f32(&train, &ds.train)?;
    write_f32(&test, &ds.test)?;
    let paper = TrainConfig::paper();
    let beams: Vec<String> = opts.beams.iter().map(|b| b.to_string()).collect();
    let out = std::process::Command::new(python)
        .arg(&opts.faiss_script)
        .args(["--train", &train.to_string_lossy()])
        .args(["--test", &test.to_string_lossy()])
        .args(["--dim", &ds.dim.to_string()])
        .args(["--stages", &opts.stages.to_string()])
        .args(["--size", &size.to_string()])
        .args(["--beams", &beams.join(",")])
        .args(["--niter", &paper.kmeans_iters.to_string()])
        .args(["--sample", &paper.kmeans_sample.to_string()])
        .output()
        .with_context(|| format!("running {} (faiss)", python.display()))?;
    if !out.status.success() {
        bail!(
            "faiss script failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let parsed: FaissOut = serde_json::from_slice(&out.stdout)
        .with_context(|| "reading the faiss script's JSON output")?;
    Ok(parsed
        .results
        .into_iter()
        .map(|r| CodecRow {
            dataset: ds.name.clone(),
            implementation: "faiss".into(),
            size,
            beam: r.beam,
            train_s: parsed.train_s,
            encode_vectors_per_s: r.encode_vectors_per_s,
            relative_mse: r.relative_mse,
        })
        .collect())
}

/// Runs every dataset × size × beam through this crate (and faiss when given).
pub fn run(
    datasets: &[Dataset],
    opts: &CodecBenchOptions,
    mut on_row: impl FnMut(&CodecRow),
) -> Result<CodecReport> {
    if opts.sizes.is_empty() || opts.beams.is_empty() {
        bail!("no codebook size or beam width to measure");
    }
    if let Some(&b) = opts.beams.iter().find(|&&b| b == 0) {
        bail!("beam width {b}: must be at least 1");
    }
    let mut rows = vec![];
    for ds in datasets {
        for &size in &opts.sizes {
            let mut batch = run_ours(ds, opts, size)?;
            if let Some(py) = &opts.faiss_python {
                batch.extend(run_faiss(py, ds, opts, size)?);
            }
            batch.iter().for_each(&mut on_row);
            rows.extend(batch);
        }
    }
    let ratios = ratios(&rows);
    Ok(CodecReport { rows, ratios })
}

fn ratios(rows: &[CodecRow]) -> Vec<CodecRatio> {
    rows.iter()
        .filter(|r| r.implementation == "rvq-kv")
        .filter_map(|ours| {
            let theirs = rows.iter().find(|r| {
                r.implementation == "faiss"
                    && r.dataset == ours.dataset
                    && r.size == ours.size
                    && r.beam == ours.beam
            })?;
            Some(CodecRatio {
                dataset: ours.dataset.clone(),
                size: ours.size,
                beam: ours.beam,
                encode_speedup: ours.encode_vectors_per_s / theirs.encode_vectors_per_s,
                mse_ratio: ours.relative_mse / theirs.relative_mse,
                train_time_ratio: ours.train_s / theirs.train_s,
            })
        })
        .collect()
}

impl CodecReport {
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| data | impl | C | beam | train s | encode vectors/s | relative MSE |\n|---|---|---:|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            s += &format!(
                "| {} | {} | {} | {} | {:.2} | {:.0} | {:.4} |\n",
                r.dataset,
                r.implementation,
                r.size,
                r.beam,
                r.train_s,
                r.encode_vectors_per_s,
                r.relative_mse
            );
        }
        if !self.ratios.is_empty() {
            s += "\n| data | C | beam | encode speed vs faiss | MSE vs faiss | train time vs faiss |\n|---|---:|---:|---:|---:|---:|\n";
            for r in &self.ratios {
                s += &format!(
                    "| {} | {} | {} | {:.2}x | {:.3} | {:.2} |\n",
                    r.dataset, r.size, r.beam, r.encode_speedup, r.mse_ratio, r.train_time_ratio
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ours_alone_measures_every_size_and_beam() {
        let ds = correlated(4, 600, 100, 1);
        let opts = CodecBenchOptions {
            dim: 4,
            stages: 3,
            sizes: vec![16, 8],
            beams: vec![1, 3],
            faiss_python: None,
            faiss_script: PathBuf::new(),
        };
        let report = run(&[ds], &opts, |_| {}).unwrap();
        assert_eq!(report.rows.len(), 4);
        assert!(report.ratios.is_empty());
        for r in &report.rows {
            assert!(r.relative_mse > 0.0 && r.relative_mse < 1.0, "{r:?}");
        }
        // A bigger codebook and a wider beam never do worse on the same data.
        let mse = |size, beam| {
            report
                .rows
                .iter()
                .find(|r| r.size == size && r.beam == beam)
                .unwrap()
                .relative_mse
        };
        assert!(mse(16, 1) < mse(8, 1));
        assert!(mse(16, 3) <= mse(16, 1) + 1e-9);
        let bad = CodecBenchOptions {
            beams: vec![0],
            ..opts
        };
        assert!(run(&[], &bad, |_| {}).is_err());
    }
}
