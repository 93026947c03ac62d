use super::common::{print_json, ModelArgs};
use anyhow::{bail, Result};
use eval::codec_bench::{self, CodecBenchOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    rvq-kv bench --cache f16 --cache rvq:paper.safetensors --ctx 512,2048,8192\n  \
    rvq-kv bench codec                  # the RVQ codec alone (Gaussian, correlated, real K/V)\n  \
    scripts/bench_codec.sh              # the same against faiss (installs faiss-cpu into a venv)")]
pub struct Args {
    /// What to measure: model (prefill/decode with each cache) or codec (RVQ train/encode/MSE)
    #[arg(default_value = "model")]
    what: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Cache specs to compare (repeat the flag)
    #[arg(long = "cache", default_values = ["f32", "f16"])]
    caches: Vec<String>,
    /// Context lengths, comma-separated
    #[arg(long = "ctx", default_values_t = [512, 2048, 8192], value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Decode steps timed after each prefill
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// codec: codebook sizes C, comma-separated
    #[arg(long, default_values_t = [2048, 256], value_delimiter = ',')]
    sizes: Vec<usize>,
    /// codec: beam widths, comma-separated (1 = greedy)
    #[arg(long, default_values_t = [1, 5], value_delimiter = ',')]
    beams: Vec<usize>,
    /// codec: training vectors per synthetic dataset (test vectors: a quarter of this)
    #[arg(long, default_value_t = 65536)]
    train_vectors: usize,
    /// codec: calibration tokens whose layer-15 K/V form the real datasets (0: skip them)
    #[arg(long, default_value_t = 8192)]
    real_tokens: usize,
    /// codec: a Python with faiss-cpu and numpy, to run faiss's ResidualQuantizer on the same data
    #[arg(long)]
    faiss_python: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    match a.what.as_str() {
        "model" => run_model(a),
        "codec" => run_codec(a),
        other => bail!("bench {other}: expected model or codec"),
    }
}

fn run_model(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let report = eval::bench::run(&model, &a.caches, &a.contexts, a.decode_steps)?;
    if a.json {
        return print_json(&report);
    }
    eprintln!("{}", report.table());
    Ok(())
}

fn run_codec(a: Args) -> Result<()> {
    const DIM: usize = 32;
    const REAL_LAYER: usize = 15;
    let test = (a.train_vectors / 4).max(1);
    let mut datasets = vec![
        codec_bench::gaussian(DIM, a.train_vectors, test, 1),
        codec_bench::correlated(DIM, a.train_vectors, test, 2),
    ];
    if a.real_tokens > 0 {
        let model = a.model.load()?;
        let text = eval::text::read_text(&eval::assets::ensure_calib(
            &eval::assets::home(),
            "wiki.utf8",
        )?)?;
        let tokens = model.tokenizer.encode(&text, true)?;
        let tokens = &tokens[..a.real_tokens.min(tokens.len())];
        eprintln!(
            "rvq-kv: capturing layer {REAL_LAYER} K/V over {} calibration tokens",
            tokens.len()
        );
        datasets.extend(codec_bench::real_kv(&model, tokens, REAL_LAYER, DIM, 0.2)?);
    }
    let opts = CodecBenchOptions {
        dim: DIM,
        stages: 8,
        sizes: a.sizes,
        beams: a.beams,
        faiss_script: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/faiss_codec.py"
        )),
        faiss_python: a.faiss_python,
    };
    let report = codec_bench::run(&datasets, &opts, |r| {
        eprintln!(
            "  {:<24} {:<7} C={:<5} beam={}  train {:6.2}s  encode {:>9.0} vectors/s  rel. MSE {:.4}",
            r.dataset, r.implementation, r.size, r.beam, r.train_s, r.encode_vectors_per_s, r.relative_mse
        )
    })?;
    if a.json {
        return print_json(&report);
    }
    print!("{}", report.table());
    Ok(())
}
