use super::common::{print_json, ModelArgs};
use anyhow::{bail, Result};
use eval::generate::{generate, Sampling};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from a file
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template (from the GGUF metadata; built in for gemma3)
    #[arg(long)]
    chat: bool,
    /// KV cache spec (see `rvq-kv --help`): f16, q8_0, q4_0,rot, int8, fp8, kivi2, rvq:FILE, …
    #[arg(long, default_value = "f16")]
    cache: String,
    /// Maximum new tokens (at least 1; generation also stops at the model's context length)
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature, a finite number ≥ 0; 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1]
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of sampling (any u64; unused when greedy)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object (text and speeds) instead of streaming
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => eval::text::read_utf8(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompt-file PATH"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let model = a.model.load()?;
    let text = if a.chat {
        model.tokenizer.chat_prompt(&prompt)?
    } else {
        prompt
    };
    let ids = model.tokenizer.encode(&text, true)?;
    let sampling = Sampling {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
    };
    let json = a.json;
    let g = generate(&model, &ids, &a.cache, a.max_tokens, &sampling, |piece| {
        if !json {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
    })?;
    if json {
        return print_json(&g);
    }
    println!();
    eprintln!(
        "rvq-kv: {} prompt + {} new tokens{}; prefill {:.1} tok/s, decode {:.1} tok/s, cache {} bytes ({})",
        g.prompt_tokens,
        g.generated_tokens,
        match g.finish_reason {
            "eos" => " (EOS)",
            "context" => " (stopped: the model's context is full)",
            _ => "",
        },
        g.prefill_tokens_per_s,
        g.decode_tokens_per_s,
        g.cache_bytes,
        g.cache
    );
    Ok(())
}
