use super::common::{print_json, ModelArgs, TextArgs};
use anyhow::Result;
use eval::ppl::{perplexity, PplOptions, Protocol};

#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  rvq-kv ppl --cache f16 --ctx 512 --max-tokens 32768\n  \
    rvq-kv ppl --protocol llama.cpp --ctx 512 --max-tokens 32768   # compare with llama-perplexity -c 512 --chunks 64"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
    /// KV cache spec (see `rvq-kv --help`): f16, q8_0, q4_0,rot, int8, fp8, kivi2, rvq:FILE, …
    #[arg(long, default_value = "f16")]
    cache: String,
    /// Window (chunk) length in tokens: 2 to the model's context length (llama.cpp's protocol
    /// scores a window's second half, so at least 4 there)
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Use only the first N tokens of the text (at least 2)
    #[arg(long)]
    max_tokens: Option<usize>,
    /// windows: score every token after the first of each window; llama.cpp: as llama-perplexity
    #[arg(long, default_value = "windows")]
    protocol: Protocol,
    /// Also the KL divergence of the cache's next-token distribution from this reference
    /// cache's on the same tokens (mean, median, 99th percentile, same top token), as
    /// `llama-perplexity --kl-divergence`
    #[arg(long, value_name = "REFERENCE", num_args = 0..=1, default_missing_value = "f16")]
    kld: Option<String>,
    /// Print one JSON object on stdout
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let model = a.model.load()?;
    // The spec is checked before the text is read and tokenized (a second or two).
    model.new_cache(&a.cache)?;
    if let Some(reference) = &a.kld {
        model.new_cache(reference)?;
    }
    let (_, tokens) = a.text.read(&model)?;
    let opts = PplOptions {
        ctx: a.ctx,
        max_tokens: a.max_tokens,
        protocol: a.protocol,
        quiet: false,
    };
    // With --kld the one pass against the reference also gives this cache's perplexity.
    let (r, kld) = match &a.kld {
        Some(reference) => {
            let specs = std::slice::from_ref(&a.cache);
            let (r, k) = eval::kld::kl_divergence(&model, &tokens, reference, specs, &opts)?
                .caches
                .remove(0);
            (r, Some(k))
        }
        None => (perplexity(&model, &tokens, &a.cache, &opts)?, None),
    };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some(k) = &kld {
            v["kld"] = serde_json::to_value(k)?;
        }
        return print_json(&v);
    }
    if let Some(k) = &kld {
        eprintln!(
            "{}: KL divergence from {} = {:.6} ± {:.6} nats/token (median {:.6}, p99 {:.5}, max {:.4}); same top token {:.2}%",
            k.cache, k.reference, k.mean, k.stderr, k.median, k.p99, k.max, 100.0 * k.same_top
        );
    }
    eprintln!(
        "{}: PPL = {:.4} ± {:.4} ({} tokens scored in {} windows of {}, protocol {:?}; {:.1} tokens/s)\n  cache: {}",
        r.cache, r.ppl, r.ppl_stderr, r.scored_tokens, r.windows, r.ctx, r.protocol, r.tokens_per_s, r.compression.summary()
    );
    println!("{:.4}", r.ppl);
    Ok(())
}
