use super::common::{print_json, ModelArgs};
use anyhow::{bail, Result};
use eval::codec_bench::{self, CodecBenchOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    rvq-kv bench --cache f16 --cache rvq:paper.safetensors --ctx 512,2048,8192\n  \
    rvq-kv bench --cache f16 --cache rvq:paper.safetensors --ctx 16384 --beyond-context\n  \
    rvq-kv bench --cache f16 --cache rvq:paper.safetensors --ctx 8192 --interleave --decode-steps 64\n  \
    rvq-kv bench codec                  # the RVQ codec alone (Gaussian, correlated, real K/V)\n  \
    scripts/bench_codec.sh              # the same against faiss (installs faiss-cpu into a venv)")]
pub struct Args {
    /// What to measure: model (prefill/decode with each cache), codec (RVQ train/encode/MSE) or
    /// serve (each cache behind the HTTP server, under concurrent streaming clients)
    #[arg(default_value = "model")]
    what: String,
    #[command(flatten)]
    model: ModelArgs,
    /// Cache specs to compare (repeat the flag); the first is the reference of the ratios.
    /// Default: f16, q8_0, q4_0, kivi2 and the demo's paper-config RVQ codebooks (held in i8, the default, and in f16) if calibrated
    #[arg(long = "cache")]
    caches: Vec<String>,
    /// Context lengths, comma-separated (at most the model's context length, 8192 for SmolLM2,
    /// unless --beyond-context)
    #[arg(long = "ctx", default_values_t = [1024, 4096, 8192], value_delimiter = ',')]
    contexts: Vec<usize>,
    /// Allow contexts past the model's trained length, RoPE extended by the same formula: the
    /// speeds and bytes there are real, the model's outputs are not (rows marked *)
    #[arg(long)]
    beyond_context: bool,
    /// Measure every cache and context in this process, instead of one child process each (a
    /// child per row is what makes its peak RSS that row's own)
    #[arg(long)]
    in_process: bool,
    /// Take the caches' prefill chunks and decode steps in turn, one of each cache, in this
    /// process: the ratios then share the machine's state (on a shared VM, speeds drift by tens
    /// of percent between runs a minute apart); peak RSS is then no row's own
    #[arg(long)]
    interleave: bool,
    /// How each context is filled before the timed decode steps: prefill (the model runs the
    /// tokens) or random (random K/V of unit variance appended straight to the caches, for models
    /// too large to prefill 32K tokens on a CPU; decode speed and bytes stay real)
    #[arg(long, value_enum, default_value = "prefill")]
    fill: Fill,
    /// Decode steps timed after each prefill (at least 1)
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    /// codec: codebook sizes C, comma-separated (each 2..=65536)
    #[arg(long, default_values_t = [2048, 256], value_delimiter = ',')]
    sizes: Vec<usize>,
    /// codec: beam widths, comma-separated (each 1..=C; 1 = greedy)
    #[arg(long, default_values_t = [1, 5], value_delimiter = ',')]
    beams: Vec<usize>,
    /// codec: training vectors per synthetic dataset, at least the largest C (test vectors: a
    /// quarter of this)
    #[arg(long, default_value_t = 65536)]
    train_vectors: usize,
    /// codec: calibration tokens whose layer-15 K/V form the real datasets (0 or more; 0: skip
    /// them)
    #[arg(long, default_value_t = 8192)]
    real_tokens: usize,
    /// codec: a Python with faiss-cpu and numpy, to run faiss's ResidualQuantizer on the same data
    #[arg(long)]
    faiss_python: Option<PathBuf>,
    #[command(flatten)]
    serve: super::bench_serve::ServeArgs,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    match a.what.as_str() {
        "model" => run_model(a),
        "codec" => run_codec(a),
        "serve" => {
            let caches = if a.caches.is_empty() {
                vec!["f16".to_string()]
            } else {
                a.caches.clone()
            };
            super::bench_serve::run(&a.model, &caches, &a.serve, a.json)
        }
        other => bail!("bench {other}: expected model, codec or serve"),
    }
}

fn run_model(a: Args) -> Result<()> {
    let caches = if a.caches.is_empty() {
        default_caches(&a.model)
    } else {
        a.caches.clone()
    };
    let report = if a.in_process || a.interleave || caches.len() * a.contexts.len() == 1 {
        let mut model = a.model.load()?;
        let trained = model.context_len();
        if a.beyond_context {
            model.extend_context(a.contexts.iter().copied().max().unwrap_or(0));
        }
        let options = eval::bench::BenchOptions {
            decode_steps: a.decode_steps,
            trained_context: trained,
            interleave: a.interleave,
            fill_random: a.fill == Fill::Random,
        };
        eval::bench::run(&model, &caches, &a.contexts, options)?
    } else {
        isolated(&a, &caches)?
    };
    if a.json {
        return print_json(&report);
    }
    println!("{}", report.table());
    Ok(())
}

/// f16, the scalar formats llama.cpp and KIVI users know, and the paper-config RVQ cache (its
/// codebooks held in i8, the default, and in f16) when `rvq-kv demo` has written this model's
/// codebooks.
fn default_caches(model: &super::common::ModelArgs) -> Vec<String> {
    let mut caches: Vec<String> = ["f16", "q8_0", "q4_0", "kivi2"].map(String::from).into();
    let books = model.paper_codebooks();
    if books.is_file() {
        caches.push(format!("rvq:{}", books.display()));
        caches.push(format!("rvq:{},books=f16", books.display()));
    } else {
        eprintln!(
            "rvq-kv: no {} yet (run `rvq-kv demo`): benchmarking without an RVQ cache",
            books.display()
        );
    }
    caches
}

/// Threads the children run with (they inherit the environment, so the same pool size).
fn rows_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One child process per (context, cache), so each row's peak RSS is its own.
fn isolated(a: &Args, caches: &[String]) -> Result<eval::bench::BenchReport> {
    let exe = std::env::current_exe()?;
    let mut rows = vec![];
    for &ctx in &a.contexts {
        for spec in caches {
            let out = std::process::Command::new(&exe)
                .args(["bench", "model", "--model", &a.model.model, "--cache", spec])
                .args(["--weights", a.model.weights.name()])
                .args(
                    a.model
                        .weights_delta
                        .iter()
                        .flat_map(|d| [std::ffi::OsStr::new("--weights-delta"), d.as_os_str()]),
                )
                .args(["--ctx", &ctx.to_string()])
                .args(["--decode-steps", &a.decode_steps.to_string(), "--json"])
                .args(["--fill", a.fill.name()])
                .args(a.beyond_context.then_some("--beyond-context"))
                .stderr(std::process::Stdio::inherit())
                .output()?;
            if !out.status.success() {
                bail!("benchmarking {spec} at ctx {ctx} failed (see above)");
            }
            let r: eval::bench::BenchReport = serde_json::from_slice(&out.stdout)?;
            rows.extend(r.rows);
        }
    }
    let mut report = eval::bench::BenchReport {
        threads: rows_threads(),
        interleaved: false,
        rows,
    };
    report.rebase();
    Ok(report)
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
        let calib = eval::assets::ensure_calib(&eval::assets::home(), "wiki.utf8")?;
        let tokens = eval::text::read_tokens(&model, &calib)?;
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

/// How `bench` fills a context before its decode steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Fill {
    Prefill,
    Random,
}

impl Fill {
    fn name(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Random => "random",
        }
    }
}
