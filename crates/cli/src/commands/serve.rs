use super::common::{parse_bytes, ModelArgs};
use anyhow::{Context, Result};
use serve::{AppState, Engine, EngineConfig};
use std::sync::Arc;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    rvq-kv serve --cache f16 --kv-budget 1GiB\n  \
    rvq-kv serve --cache rvq:.rvq-kv/codebooks/smollm2-paper.safetensors --kv-budget 1GiB\n  \
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\\n    \
    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}], \"max_tokens\": 64}'")]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// KV cache spec every sequence gets (see `rvq-kv --help`)
    #[arg(long, default_value = "f16")]
    cache: String,
    /// Bytes the caches may hold together (1GiB, 512MiB, 2GB…): the shared codebooks, counted
    /// once, plus every admitted sequence's cache at prompt + max_tokens. A request waits until
    /// its cache fits beside the admitted ones. At least 1 byte, below 1 TiB
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    kv_budget: u64,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0..=65535; 0 picks a free port (printed)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The name clients pass as `model` (default: the model's short name)
    #[arg(long)]
    name: Option<String>,
    /// Requests that may wait for memory (0 or more); past that, new ones get 503 with
    /// Retry-After
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Prompt tokens prefilled per step, between decode steps: smaller keeps running streams
    /// smoother while long prompts arrive, larger prefills faster (at least 1)
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    prefill_chunk: u64,
    /// Most sequences decoding at once, whatever the budget (at least 1)
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_sequences: u64,
}

pub fn run(a: Args) -> Result<()> {
    let addr = format!("{}:{}", a.host, a.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Bind before loading, so a taken port fails at once.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let model = Arc::new(a.model.load()?);
    let config = EngineConfig {
        cache: a.cache.clone(),
        kv_budget: a.kv_budget,
        max_queue: a.max_queue,
        prefill_chunk: a.prefill_chunk as usize,
        max_sequences: a.max_sequences as usize,
    };
    let engine = Engine::start(model.clone(), config)?;
    let per_4k = engine.bytes_for(4096);
    let name = a.name.unwrap_or_else(|| a.model.name());
    eprintln!(
        "rvq-kv: serving '{name}' with the {} cache on http://{}; KV budget {:.1} MiB: {} sequences \
         of 4,096 tokens ({:.1} MiB each){}",
        a.cache,
        listener.local_addr()?,
        a.kv_budget as f64 / (1 << 20) as f64,
        engine.sequence_budget() / per_4k.max(1),
        per_4k as f64 / (1 << 20) as f64,
        match engine.metrics().codebook_bytes.load(std::sync::atomic::Ordering::Relaxed) {
            0 => String::new(),
            b => format!(" beside {:.1} MiB of shared codebooks", b as f64 / (1 << 20) as f64),
        }
    );
    let state = Arc::new(AppState::new(engine, model, name));
    runtime.block_on(serve::serve(listener, state, shutdown_signal()))?;
    eprintln!("rvq-kv: stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("rvq-kv: shutting down: no new requests; finishing the ones in flight");
}
