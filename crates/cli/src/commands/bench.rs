use super::common::{print_json, ModelArgs};
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Cache specs to compare (comma-free list, repeat the flag)
    #[arg(long = "cache", default_values = ["f32", "f16"])]
    caches: Vec<String>,
    /// Context lengths
    #[arg(long = "ctx", default_values_t = [512, 2048, 8192])]
    contexts: Vec<usize>,
    /// Decode steps timed after each prefill
    #[arg(long, default_value_t = 16)]
    decode_steps: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let report = eval::bench::run(&model, &a.caches, &a.contexts, a.decode_steps)?;
    if a.json {
        return print_json(&report);
    }
    eprintln!("{}", report.table());
    Ok(())
}
