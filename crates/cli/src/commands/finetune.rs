use super::common::{print_json, ModelArgs};
use anyhow::{bail, Context, Result};
use eval::assets;
use finetune::{FinetuneConfig, Trainable, Trainer};
use kvcache::codebooks::Codebooks;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
#[command(
    after_help = "Trains on calibration text only (never the eval text). Writes \
    OUT.weights.safetensors (the changed tensors) and OUT.codebooks.safetensors (the codebooks \
    after their EMA updates); use them as\n  rvq-kv ppl --weights-delta OUT.weights.safetensors \
    --cache rvq:OUT.codebooks.safetensors\n\nExample (about 25 minutes on 2 cores):\n  \
    rvq-kv finetune --codebooks paper.safetensors --out tuned --steps 60"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Codebooks from `rvq-kv calibrate` for this model
    #[arg(long)]
    codebooks: PathBuf,
    /// Output prefix: writes PREFIX.weights.safetensors and PREFIX.codebooks.safetensors
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Training text (default: exllamav2's wiki.utf8, fetched on first use). Never the eval text.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Which weights train: kv (k/v projections), attn (q/k/v/o), all
    #[arg(long, default_value = "kv")]
    train: String,
    /// Optimizer steps (at least 1)
    #[arg(long, default_value_t = 60)]
    steps: usize,
    /// Tokens per training sequence (at least 2, at most the model's context)
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per step, gradient accumulation (at least 1)
    #[arg(long, default_value_t = 4)]
    accum: usize,
    /// Peak learning rate of AdamW (a finite number > 0)
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Linear warmup steps (0 or more), then cosine decay to zero
    #[arg(long, default_value_t = 6)]
    warmup: usize,
    /// AdamW's decoupled weight decay (a finite number ≥ 0)
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Weight of the commitment loss (a finite number ≥ 0)
    #[arg(long, default_value_t = 0.25)]
    commitment: f64,
    /// EMA decay of the codebooks, in [0, 1)
    #[arg(long, default_value_t = 0.99)]
    ema_decay: f32,
    /// Keep the codebooks fixed (no EMA updates while training)
    #[arg(long)]
    freeze_codebooks: bool,
    /// Write a checkpoint (into PREFIX.checkpoint/) every N steps (0 or more; 0 = only at the end)
    #[arg(long, default_value_t = 20)]
    checkpoint_every: usize,
    /// Continue from a checkpoint folder (its settings are used; --steps may extend the run)
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes the finetuned weights and codebooks so that both appear or neither: each to a
/// temporary name, then both renamed.
fn save_together(trainer: &Trainer, weights: &Path, books: &Path) -> Result<()> {
    let (weights_tmp, books_tmp) = (
        with_suffix(weights, ".partial"),
        with_suffix(books, ".partial"),
    );
    let written = trainer
        .delta()
        .and_then(|d| Ok(d.save(&weights_tmp)?))
        .and_then(|_| Ok(trainer.codebooks().save(&books_tmp)?))
        .and_then(|_| Ok(std::fs::rename(&weights_tmp, weights)?))
        .and_then(|_| {
            std::fs::rename(&books_tmp, books).inspect_err(|_| {
                let _ = std::fs::remove_file(weights);
            })?;
            Ok(())
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&weights_tmp);
        let _ = std::fs::remove_file(&books_tmp);
    }
    written.with_context(|| format!("writing {} and {}", weights.display(), books.display()))
}

pub fn run(a: Args) -> Result<()> {
    if a.model.weights_delta.is_some() {
        bail!("finetune starts from the GGUF's own weights; --weights-delta is not supported here");
    }
    // Options first: a typo should not cost a model load.
    let trainable = Trainable::parse(&a.train)?;
    let mut config = FinetuneConfig {
        steps: a.steps,
        seq_len: a.seq_len,
        accum: a.accum,
        lr: a.lr,
        warmup: a.warmup,
        adamw: finetune::adamw::AdamWConfig {
            weight_decay: a.weight_decay,
            ..Default::default()
        },
        trainable,
        commitment_weight: a.commitment,
        ema_decay: a.ema_decay,
        update_codebooks: !a.freeze_codebooks,
    };
    config.validate()?;
    let (weights, books) = (
        with_suffix(&a.out, ".weights.safetensors"),
        with_suffix(&a.out, ".codebooks.safetensors"),
    );
    for path in [&weights, &books] {
        super::common::check_writable(path, "--out")?;
    }
    let text_path = match &a.text {
        Some(p) => p.clone(),
        None => assets::ensure_calib(&assets::home(), "wiki.utf8")?,
    };
    let eval_path = assets::eval_text_path(&assets::home());
    if text_path
        .canonicalize()
        .ok()
        .is_some_and(|p| Some(p) == eval_path.canonicalize().ok())
    {
        bail!(
            "{} is the evaluation text: train on calibration text",
            text_path.display()
        );
    }
    let model = a.model.load()?;
    let sha = model.file_sha256()?;
    let tokens = eval::text::read_tokens(&model, &text_path)?;
    let checkpoints = with_suffix(&a.out, ".checkpoint");
    let mut trainer = match &a.resume {
        Some(dir) => Trainer::resume(&model.path, sha, tokens, dir, Some(a.steps))?,
        None => {
            let books = Codebooks::load(&a.codebooks)
                .with_context(|| format!("loading {}", a.codebooks.display()))?;
            books.check_model(&model.identity()?)?;
            config.seq_len = config.seq_len.min(model.context_len());
            Trainer::new(&model.path, sha, books, tokens, config)?
        }
    };
    drop(model);
    let c = trainer.config.clone();
    eprintln!(
        "rvq-kv: finetuning {:?} weights for {} steps of {} x {} tokens (lr {:e}, commitment {})",
        c.trainable, c.steps, c.accum, c.seq_len, c.lr, c.commitment_weight
    );
    let bar = eval::progress::bar(c.steps as u64, "steps", a.json);
    bar.set_position(trainer.step as u64);
    let t0 = Instant::now();
    let (mut tokens_seen, mut reports) = (0usize, Vec::new());
    while trainer.step < c.steps {
        let r = trainer.train_step()?;
        tokens_seen += r.tokens;
        bar.set_message(format!(
            "loss {:.4} commit {:.4} lr {:.2e} {:.1} tok/s",
            r.loss,
            r.commitment,
            r.lr,
            tokens_seen as f64 / t0.elapsed().as_secs_f64()
        ));
        bar.inc(1);
        reports.push(r);
        if a.checkpoint_every > 0 && r.step % a.checkpoint_every == 0 && r.step < c.steps {
            trainer.save_checkpoint(&checkpoints)?;
        }
    }
    bar.finish_and_clear();
    trainer.save_checkpoint(&checkpoints)?;
    save_together(&trainer, &weights, &books)?;
    let seconds = t0.elapsed().as_secs_f64();
    let summary = serde_json::json!({
        "weights": weights.display().to_string(),
        "codebooks": books.display().to_string(),
        "checkpoint": checkpoints.display().to_string(),
        "config": c,
        "seconds": seconds,
        "tokens_per_s": tokens_seen as f64 / seconds,
        "steps": reports,
    });
    if a.json {
        return print_json(&summary);
    }
    let first = reports.first().map_or(f64::NAN, |r| r.loss);
    let last = reports.last().map_or(f64::NAN, |r| r.loss);
    eprintln!(
        "rvq-kv: {} steps in {:.0}s ({:.1} tokens/s); training loss {first:.4} → {last:.4}\n  \
         wrote {} and {}",
        reports.len(),
        seconds,
        tokens_seen as f64 / seconds,
        weights.display(),
        books.display()
    );
    Ok(())
}
