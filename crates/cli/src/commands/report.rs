use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    after_help = "Tables are JSON files in docs/data/tables/ ({\"header\", \"align\", \
    \"rows\"}); the prose is docs/data/RESULTS.template.md, where a line {{table NAME}} places \
    one. A test fails while docs/RESULTS.md is not what they give.\n\nExample:\n  \
    rvq-kv report && git diff docs/RESULTS.md"
)]
pub struct Args {
    /// Repository root
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Only check that docs/RESULTS.md is current (exit 1 if not)
    #[arg(long)]
    check: bool,
}

pub fn run(a: Args) -> Result<()> {
    let path = eval::report::regenerate(&a.root, a.check)?;
    let verb = if a.check { "is current" } else { "written" };
    eprintln!("{}: {verb}", path.display());
    Ok(())
}
