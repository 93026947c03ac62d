//! `rvq-kv bench serve`: each cache behind a fresh in-process server on a free port, driven by
//! concurrent streaming clients over HTTP.

use super::common::{parse_bytes, print_json, ModelArgs};
use anyhow::{bail, Result};
use serde::Serialize;
use serve::load::{LoadOptions, LoadReport};
use serve::{AppState, Engine, EngineConfig};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Clone)]
#[command(next_help_heading = "bench serve")]
pub struct ServeArgs {
    /// serve: concurrent clients, comma-separated (each at least 1; one run per value and cache)
    #[arg(long, default_values_t = [1, 8], value_delimiter = ',')]
    pub clients: Vec<usize>,
    /// serve: prompt tokens per request, cut from sotu-eval (at least 1; prompt + max tokens at
    /// most the model's context)
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// serve: tokens generated per request, end-of-sequence ignored (at least 1)
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// serve: seconds each run lasts (a finite number > 0)
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// serve: the server's KV budget (at least 1 byte, below 1 TiB)
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    pub kv_budget: u64,
    /// serve: also time the first token of this many prompt tokens, sent one at a time beside
    /// the clients, and alone on an idle server first (the ratio is the cost of the load; at
    /// least 1)
    #[arg(long)]
    pub probe_prompt_tokens: Option<usize>,
    /// serve: prompt tokens prefilled per scheduler step (at least 1)
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
}

#[derive(Serialize)]
struct Row {
    cache: String,
    /// Bytes one sequence of prompt + max tokens takes in this cache.
    sequence_bytes: u64,
    /// The budget's room for such sequences, beside the shared codebooks.
    fits: u64,
    #[serde(flatten)]
    load: LoadReport,
    /// The probe's time to first token on the idle server.
    idle_probe_p99_ms: Option<f64>,
    /// Output tokens/s against the first row's.
    throughput_ratio: f64,
}

pub fn run(model_args: &ModelArgs, caches: &[String], a: &ServeArgs, json: bool) -> Result<()> {
    if a.clients.is_empty() || a.clients.contains(&0) && a.probe_prompt_tokens.is_none() {
        bail!("--clients: give at least one client per run (0 only with --probe-prompt-tokens)");
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        bail!(
            "--duration {}: must be a positive number of seconds",
            a.duration
        );
    }
    if a.prompt_tokens == 0 || a.max_tokens == 0 || a.prefill_chunk == 0 {
        bail!("--prompt-tokens, --max-tokens and --prefill-chunk must be at least 1");
    }
    let model = Arc::new(model_args.load()?);
    if a.prompt_tokens + a.max_tokens > model.context_len() {
        bail!(
            "--prompt-tokens + --max-tokens = {} exceeds the model's context ({})",
            a.prompt_tokens + a.max_tokens,
            model.context_len()
        );
    }
    let text_path = eval::assets::ensure_eval_text(&eval::assets::home())?;
    let text = Arc::new(
        model
            .tokenizer
            .encode(&eval::text::read_text(&text_path)?, false)?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows: Vec<Row> = Vec::new();
    for cache in caches {
        for &clients in &a.clients {
            let options = LoadOptions {
                clients,
                prompt_tokens: a.prompt_tokens,
                max_tokens: a.max_tokens,
                duration: Duration::from_secs_f64(a.duration),
                text: text.clone(),
                probe_prompt_tokens: a.probe_prompt_tokens,
            };
            let engine = || {
                Engine::start(
                    model.clone(),
                    EngineConfig {
                        cache: cache.clone(),
                        kv_budget: a.kv_budget,
                        max_queue: 4096,
                        prefill_chunk: a.prefill_chunk,
                        max_sequences: 4096,
                    },
                )
            };
            let idle_probe = match a.probe_prompt_tokens {
                Some(_) if clients > 0 => {
                    eprintln!("rvq-kv: {cache}: probe alone on an idle server");
                    let idle = LoadOptions {
                        clients: 0,
                        duration: Duration::from_secs_f64(a.duration.min(10.0)),
                        ..options.clone()
                    };
                    let report = runtime.block_on(one_run(engine()?, &model, &idle))?;
                    report.probe_time_to_first_token.map(|p| p.p99_ms)
                }
                _ => None,
            };
            eprintln!("rvq-kv: {cache}: {clients} clients for {:.0} s", a.duration);
            let engine = engine()?;
            let sequence_bytes = engine.bytes_for(a.prompt_tokens + a.max_tokens);
            let fits = engine.sequence_budget() / sequence_bytes.max(1);
            let load = runtime.block_on(one_run(engine, &model, &options))?;
            let first = rows
                .first()
                .map_or(load.output_tokens_per_s, |r| r.load.output_tokens_per_s);
            rows.push(Row {
                cache: cache.clone(),
                sequence_bytes,
                fits,
                throughput_ratio: load.output_tokens_per_s / first,
                load,
                idle_probe_p99_ms: idle_probe,
            });
        }
    }
    if json {
        return print_json(&serde_json::json!({
            "kv_budget": a.kv_budget,
            "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "rows": rows,
        }));
    }
    println!("{}", table(&rows, a));
    Ok(())
}

/// Serves `engine` on a free port for one load run.
async fn one_run(
    engine: Engine,
    model: &Arc<llm::Model>,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let state = Arc::new(AppState::new(engine, model.clone(), "bench".into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve::serve(listener, state, async {
        let _ = stopped.await;
    }));
    let report = serve::load::run(&url, options).await;
    let _ = stop.send(());
    server.await??;
    report
}

fn table(rows: &[Row], a: &ServeArgs) -> String {
    let mut s = format!(
        "{} prompt + {} generated tokens per request, KV budget {:.0} MiB, {:.0} s per run\n\n\
         | cache | clients | fit in budget | peak admitted | peak KV MiB | done | failed | output tok/s | ratio | steady tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
        a.prompt_tokens,
        a.max_tokens,
        a.kv_budget as f64 / (1 << 20) as f64,
        a.duration
    );
    if a.probe_prompt_tokens.is_some() {
        s += " probe TTFT p99 ms: idle / loaded |";
    }
    s += "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";
    if a.probe_prompt_tokens.is_some() {
        s += "---:|";
    }
    for r in rows {
        let l = &r.load;
        s += &format!(
            "\n| {} | {} | {} | {:.0} | {:.1} | {} | {} | {:.1} | {:.2}x | {} | {:.0} / {:.0} | {:.1} / {:.1} |",
            r.cache,
            l.clients,
            r.fits,
            l.peak_sequences,
            l.peak_kv_bytes / (1 << 20) as f64,
            l.requests_completed,
            l.requests_failed,
            l.output_tokens_per_s,
            r.throughput_ratio,
            l.steady_output_tokens_per_s
                .map_or("-".into(), |v| format!("{v:.1}")),
            l.time_to_first_token.p50_ms,
            l.time_to_first_token.p99_ms,
            l.inter_token_latency.p50_ms,
            l.inter_token_latency.p99_ms,
        );
        if let Some(p) = &l.probe_time_to_first_token {
            s += &format!(
                " {} / {:.0} ({} probes) |",
                r.idle_probe_p99_ms
                    .map_or("-".into(), |v| format!("{v:.0}")),
                p.p99_ms,
                p.samples
            );
        }
    }
    s += &format!(
        "\n\nsteady tok/s: output tokens/s from the last request's first token to the end (every \
         admitted sequence decoding, no prompt being prefilled; - if under {} s).",
        serve::load::STEADY_MIN.as_secs()
    );
    s
}
