use super::common::ModelArgs;
use anyhow::Result;
use eval::assets;
use eval::generate::{generate, Sampling};
use eval::ppl::{perplexity, PplOptions, Protocol};
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens of sotu-eval to measure
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
}

pub fn run(a: Args) -> Result<()> {
    let home = assets::home();
    let model = a.model.load()?;
    let text = eval::text::read_text(&assets::ensure_eval_text(&home)?)?;
    let tokens = model.tokenizer.encode(&text, true)?;
    eprintln!(
        "rvq-kv demo: perplexity on the first {} tokens of sotu-eval (ctx 512)",
        a.max_tokens
    );
    println!("| cache | PPL | ΔPPL | bits/element | tokens/s |");
    println!("|---|---|---|---|---|");
    let mut base = None;
    for spec in ["f32", "f16"] {
        let opts = PplOptions {
            ctx: 512,
            max_tokens: Some(a.max_tokens),
            protocol: Protocol::Windows,
            quiet: false,
        };
        let r = perplexity(&model, &tokens, spec, &opts)?;
        let b = *base.get_or_insert(r.ppl);
        println!(
            "| {} | {:.4} | {:+.2}% | {:.2} | {:.1} |",
            spec,
            r.ppl,
            (r.ppl / b - 1.0) * 100.0,
            r.bits_per_element,
            r.tokens_per_s
        );
    }
    let prompt = model
        .tokenizer
        .chat_prompt("What is the capital of France? Answer in one sentence.")?;
    let ids = model.tokenizer.encode(&prompt, true)?;
    eprintln!("\nrvq-kv demo: chat generation with the f16 cache");
    let sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    print!("> ");
    generate(&model, &ids, "f16", 48, &sampling, |p| {
        print!("{p}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    Ok(())
}
