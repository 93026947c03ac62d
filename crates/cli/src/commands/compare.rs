use super::common::{print_json, ModelArgs, TextArgs};
use anyhow::{Context, Result};
use eval::compare::{compare, with_reference, CompareOptions, CompareReport};
use eval::ppl::Protocol;
use kvcache::spec::SCALAR_BASELINES;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    long_about = "Perplexity of many KV caches on the same tokens, with one model load: a markdown \
        table (PPL, Δ vs f16, bits/element, compression, cache bytes at the context) and an SVG \
        plot of Δ vs bits/element with each context's Pareto front.\n\n\
        Without --cache it runs f16 and the scalar baselines (q8_0, int8, fp8, q4_0, kivi4, kivi2) \
        plus every --rvq file. f16 is always run first: it is the reference of Δ.",
    after_help = "Examples:\n  \
        rvq-kv compare --rvq .rvq-kv/codebooks/smollm2-paper.safetensors --plot compare.svg\n  \
        rvq-kv compare --cache q8_0,rot,post-rope --cache q4_0,rot,post-rope --cache q4_0,post-rope \\\n    \
        --protocol llama.cpp --ctx 512 --max-tokens 32768   # as llama-perplexity -c 512 --chunks 64\n  \
        rvq-kv compare --rvq a.safetensors --rvq b.safetensors --ctx 512,2048 --json"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
    /// A cache spec to run (repeatable); replaces the default list of scalar baselines
    #[arg(long = "cache", value_name = "SPEC")]
    caches: Vec<String>,
    /// Codebooks from `rvq-kv calibrate` to run as `rvq:FILE` (repeatable); add options after a
    /// comma as in a spec, e.g. FILE,sinks=4
    #[arg(long = "rvq", value_name = "FILE[,OPTS]")]
    rvq: Vec<String>,
    /// Context lengths (window sizes), comma-separated, each 2 to the model's context length
    #[arg(long, default_value = "512", value_delimiter = ',')]
    ctx: Vec<usize>,
    /// Use only the first N tokens of the text (at least 2)
    #[arg(long, default_value_t = 32768)]
    max_tokens: usize,
    /// windows: score every token after the first of each window; llama.cpp: as llama-perplexity
    #[arg(long, default_value = "llama.cpp")]
    protocol: Protocol,
    /// Also score these multiple-choice tasks with every cache (repeatable; see `rvq-kv mc`)
    #[arg(long = "task", value_name = "NAME")]
    tasks: Vec<String>,
    /// Items per task (at least 1)
    #[arg(long)]
    task_limit: Option<usize>,
    /// Request variant of the tasks
    #[arg(long, default_value = "rc_0shot")]
    variant: String,
    /// Write the markdown table here (it is also printed)
    #[arg(long)]
    report: Option<PathBuf>,
    /// Also the KL divergence of each cache's next-token distribution from f16's on the same
    /// tokens (mean, 99th percentile, same top token), as `llama-perplexity --kl-divergence`;
    /// the same pass (f16, then each cache, per window) gives the perplexities
    #[arg(long)]
    kld: bool,
    /// Write the SVG plot of Δ PPL vs bits/element here
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print one JSON object on stdout instead of the markdown table
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut specs: Vec<String> = if a.caches.is_empty() {
        SCALAR_BASELINES.iter().map(|s| s.to_string()).collect()
    } else {
        a.caches.clone()
    };
    specs.extend(a.rvq.iter().map(|f| format!("rvq:{f}")));
    if let Some(p) = &a.report {
        super::common::check_writable(p, "--report")?;
    }
    if let Some(p) = &a.plot {
        super::common::check_writable(p, "--plot")?;
    }
    let model = a.model.load()?;
    let (text_name, tokens) = a.text.read(&model)?;
    let used = a.max_tokens.min(tokens.len());
    eprintln!(
        "rvq-kv: comparing {} caches at ctx {:?} on {used} tokens",
        with_reference(&specs).len(),
        a.ctx
    );
    let mut tasks = vec![];
    if !a.tasks.is_empty() {
        let home = eval::assets::home();
        eval::assets::ensure(&home, eval::assets::Asset::Bench)?;
        for t in &a.tasks {
            let file = eval::mc::task_file(&eval::assets::bench_dir(&home), t, &a.variant)?;
            tasks.push((t.clone(), file));
        }
    }
    let opts = CompareOptions {
        specs,
        contexts: a.ctx.clone(),
        max_tokens: Some(a.max_tokens),
        protocol: a.protocol,
        tasks,
        task_limit: a.task_limit,
        kld: a.kld,
        quiet: false,
    };
    let rows = compare(&model, &tokens, &opts, |r| {
        eprintln!(
            "  {:<40} ctx {:>5}  PPL {:>9.4}  {:+7.2}%  {:6.3} bits/element",
            r.spec, r.ctx, r.ppl, r.delta_pct, r.bits_per_element
        )
    })?;
    let report = CompareReport {
        model: a.model.path()?.display().to_string(),
        text: text_name,
        protocol: a.protocol,
        tokens: used,
        rows,
    };
    let markdown = report.markdown();
    if !a.json {
        print!("{markdown}");
    }
    if let Some(path) = &a.report {
        rvq::io::write_atomic(path, markdown.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("rvq-kv: wrote {}", path.display());
    }
    if let Some(path) = &a.plot {
        eval::plot::quality_vs_bits(&report, path)?;
        eprintln!("rvq-kv: wrote {}", path.display());
    }
    if a.json {
        print_json(&report)
    } else {
        Ok(())
    }
}
