use super::common::{check_writable, print_json, ModelArgs};
use anyhow::Result;
use eval::allocate::{allocate, AllocateConfig, Part};
use eval::assets;
use eval::ppl::PplOptions;
use kvcache::codebooks::Codebooks;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    long_about = "Stages per layer by measured sensitivity, at a fixed average of bits per element \
        (beyond the paper, which gives every layer the same K). Each layer's keys and values are \
        measured once: the KL divergence from f16 with only that part quantized (at \
        --probe-stages), and its reconstruction error at every stage count. A part's KLD at k \
        stages is predicted as its probe KLD scaled by its error at k over its error at the \
        probe; stages go where they lower the predicted sum most. Writes the codebooks with each \
        part cut to its stages (calibrate with more stages than the mean, e.g. -K 10, to let \
        sensitive layers have more).",
    after_help = "Example:\n  rvq-kv calibrate -K 10 --out k10.safetensors\n  \
        rvq-kv allocate --codebooks k10.safetensors --bits 3.0 --out alloc.safetensors\n  \
        rvq-kv compare --rvq k10.safetensors,stages=8 --rvq alloc.safetensors --kld"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Codebooks from `rvq-kv calibrate` for this model
    #[arg(long)]
    codebooks: PathBuf,
    /// Average bits per element to reach, at most (codes and scales as the cache stores them;
    /// between the codebooks' bits at 1 stage and at all stages)
    #[arg(long, default_value_t = defaults().bits)]
    bits: f64,
    /// Output codebooks file
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Text to measure on (default: exllamav2's wiki.utf8, the calibration text). Never the
    /// eval text
    #[arg(long)]
    text: Option<PathBuf>,
    /// Tokens of the text to measure on (at least 2 windows' worth gives a steadier KLD)
    #[arg(long, default_value_t = defaults().ppl.max_tokens.unwrap_or(2048))]
    tokens: usize,
    /// Window length (2 to the model's context length)
    #[arg(long, default_value_t = defaults().ppl.ctx)]
    ctx: usize,
    /// Stages each part is probed at, at least 1 and at most the codebooks' stages (default: 4,
    /// or all the codebooks' stages if fewer; fewer than the mean lifts a part's KLD out of the
    /// noise)
    #[arg(long)]
    probe_stages: Option<usize>,
    #[arg(long)]
    json: bool,
}

fn defaults() -> AllocateConfig {
    AllocateConfig::default()
}

pub fn run(a: Args) -> Result<()> {
    check_writable(&a.out, "--out")?;
    let model = a.model.load()?;
    let books = Codebooks::load(&a.codebooks)?;
    books.check_model(&model.identity()?)?;
    let text = match &a.text {
        Some(p) => p.clone(),
        None => assets::ensure_calib(&assets::home(), "wiki.utf8")?,
    };
    let tokens = eval::text::read_tokens(&model, &text)?;
    let cfg = AllocateConfig {
        bits: a.bits,
        probe_stages: a.probe_stages,
        ppl: PplOptions {
            ctx: a.ctx,
            max_tokens: Some(a.tokens),
            quiet: a.json,
            ..defaults().ppl
        },
    };
    let (out, allocation) = allocate(&model, &books, &tokens, &cfg)?;
    out.save(&a.out)?;
    if a.json {
        return print_json(&allocation);
    }
    println!("| layer | key stages | value stages | key probe KLD | value probe KLD |");
    println!("|---:|---:|---:|---:|---:|");
    for layer in 0..books.layers.len() {
        let find = |p: Part| {
            allocation
                .parts
                .iter()
                .find(|r| r.layer == layer && r.part == p)
        };
        let (k, v) = (find(Part::Keys), find(Part::Values));
        let stages =
            |r: Option<&eval::allocate::PartReport>| r.map_or("-".into(), |r| r.stages.to_string());
        let kld = |r: Option<&eval::allocate::PartReport>| {
            r.map_or("-".into(), |r| format!("{:.5}", r.probe_kld))
        };
        println!(
            "| {layer} | {} | {} | {} | {} |",
            stages(k),
            stages(v),
            kld(k),
            kld(v)
        );
    }
    eprintln!(
        "rvq-kv: wrote {}: {}",
        a.out.display(),
        allocation.summary()
    );
    Ok(())
}
