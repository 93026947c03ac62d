use super::common::ModelArgs;
use anyhow::{bail, Result};
use eval::assets;
use eval::calibrate::{calibrate, CalibConfig};
use eval::generate::{generate, Sampling};
use eval::ppl::{perplexity, PplOptions, Protocol};
use kvcache::codebooks::Codebooks;
use std::io::Write;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens of sotu-eval to measure (at least 2)
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
}

pub fn run(a: Args) -> Result<()> {
    // Checked before the minutes of calibration.
    if a.max_tokens < 2 {
        bail!(
            "--max-tokens {}: at least 2 tokens are needed to score one",
            a.max_tokens
        );
    }
    let home = assets::home();
    let model = a.model.load()?;
    let tokens = eval::text::read_tokens(&model, &assets::ensure_eval_text(&home)?)?;

    // Paper-config codebooks, calibrated once and cached beside the assets.
    let books_path = a.model.paper_codebooks();
    let identity = model.identity()?;
    let cached = Codebooks::load(&books_path).is_ok_and(|b| b.check_model(&identity).is_ok());
    if !cached {
        let calib = assets::ensure_calib(&home, "wiki.utf8")?;
        eprintln!(
            "rvq-kv demo: calibrating paper-config codebooks (d=32, C=2048, K=8) on {} — about 8 minutes on 2 cores, once",
            calib.display()
        );
        let calib_tokens = eval::text::read_tokens(&model, &calib)?;
        let (books, t) = calibrate(
            &model,
            &calib_tokens,
            &CalibConfig::paper(&calib.display().to_string()),
            false,
        )?;
        books.save(&books_path)?;
        eprintln!(
            "rvq-kv demo: calibrated in {:.0}s (capture {:.0}s)",
            t.capture_s + t.train_s,
            t.capture_s
        );
    }
    let rvq_spec = format!("rvq:{}", books_path.display());

    eprintln!(
        "rvq-kv demo: perplexity on the first {} tokens of sotu-eval (windows of 512)",
        a.max_tokens
    );
    println!("| cache | PPL | ΔPPL vs f16 | bits/element | compression vs f16 |");
    println!("|---|---|---|---|---|");
    let mut base = None;
    for spec in ["f16", "f32", rvq_spec.as_str()] {
        let opts = PplOptions {
            ctx: 512,
            max_tokens: Some(a.max_tokens),
            protocol: Protocol::Windows,
            quiet: false,
        };
        let r = perplexity(&model, &tokens, spec, &opts)?;
        let b = *base.get_or_insert(r.ppl);
        let name = if spec.starts_with("rvq:") {
            "rvq (paper config)"
        } else {
            spec
        };
        println!(
            "| {} | {:.4} | {:+.2}% | {:.2} | {:.2}x |",
            name,
            r.ppl,
            (r.ppl / b - 1.0) * 100.0,
            r.compression.bits_per_element,
            r.compression.compression_vs_f16
        );
    }
    let prompt = model
        .tokenizer
        .chat_prompt("What is the capital of France? Answer in one sentence.")?;
    let ids = model.tokenizer.encode(&prompt, true)?;
    let sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
    for spec in ["f16", rvq_spec.as_str()] {
        let name = if spec.starts_with("rvq:") {
            "rvq"
        } else {
            spec
        };
        print!("\n[{name} cache] > ");
        generate(&model, &ids, spec, 48, &sampling, |p| {
            print!("{p}");
            let _ = std::io::stdout().flush();
        })?;
        println!();
    }
    Ok(())
}
