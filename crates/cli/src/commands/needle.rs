use super::common::{print_json, ModelArgs};
use anyhow::Result;
use eval::needle::{NeedleConfig, NeedleReport};

#[derive(clap::Args)]
#[command(
    long_about = "Passkey retrieval (Mohtashami & Jaggi, 2023): a five-digit number is hidden at \
        several depths of repeated filler sentences, 1K to 8K tokens long, and the model is asked \
        to repeat it (greedy). Each cache runs the same prompts; a cell is right when the first \
        number the model answers is the key. Perplexity at ctx 512 never asks for a key from \
        thousands of tokens back; this does.",
    after_help = "Examples:\n  rvq-kv needle --cache f16 --cache q4_0,rot,post-rope --cache rvq:paper.safetensors\n  \
        rvq-kv needle --lengths 2048 --depths 0,0.5,1 --trials 3 --json"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Caches to test (repeatable); each runs every prompt
    #[arg(long = "cache", default_value = "f16")]
    caches: Vec<String>,
    /// Prompt lengths in tokens, comma-separated (each at least 64; at most the model's context,
    /// less the 8 answer tokens)
    #[arg(long, default_values_t = [1024, 2048, 4096, 8192], value_delimiter = ',')]
    lengths: Vec<usize>,
    /// Depths of the key in the filler, comma-separated fractions in [0, 1] (0 = first)
    #[arg(long, default_values_t = [0.0, 0.25, 0.5, 0.75, 1.0], value_delimiter = ',')]
    depths: Vec<f64>,
    /// Keys tried per length and depth (at least 1)
    #[arg(long, default_value_t = 1)]
    trials: usize,
    /// Seed of the keys (any u64); every cache gets the same keys
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON array (a report per cache) on stdout
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let cfg = NeedleConfig {
        lengths: a.lengths,
        depths: a.depths,
        trials: a.trials,
        seed: a.seed,
    };
    for spec in &a.caches {
        model.new_cache(spec)?;
    }
    let mut reports = Vec::new();
    for spec in &a.caches {
        let r = eval::needle::run(&model, spec, &cfg, a.json)?;
        if !a.json {
            print_grid(&r);
        }
        reports.push(r);
    }
    if a.json {
        return print_json(&reports);
    }
    Ok(())
}

/// Depth rows by length columns, each cell `right/trials`.
fn print_grid(r: &NeedleReport) {
    let mut lengths: Vec<usize> = r.cells.iter().map(|c| c.length).collect();
    lengths.dedup();
    println!(
        "\n{}: {:.0}% right ({:.0} s)",
        r.cache,
        100.0 * r.accuracy,
        r.seconds
    );
    print!("| depth |");
    lengths.iter().for_each(|l| print!(" {l} |"));
    print!("\n|---:|");
    lengths.iter().for_each(|_| print!("---:|"));
    println!();
    // Every length has the same depths, in the order asked.
    let first = lengths.first().copied();
    let depths = r
        .cells
        .iter()
        .filter(|c| Some(c.length) == first)
        .map(|c| c.depth);
    for d in depths {
        print!("| {d} |");
        for &l in &lengths {
            if let Some(c) = r.cells.iter().find(|c| c.length == l && c.depth == d) {
                print!(" {}/{} |", c.correct, c.trials);
            }
        }
        println!();
    }
    print!("| all |");
    lengths
        .iter()
        .for_each(|&l| print!(" {:.0}% |", 100.0 * r.at_length(l)));
    println!();
}
