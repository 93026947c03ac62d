use anyhow::Result;
use eval::assets::{self, Asset};

#[derive(clap::Args)]
pub struct Args {
    /// What to fetch: model (smollm2), calib, eval, bench, gemma3 (Gemma 3 270M), or all
    #[arg(default_value = "all")]
    what: String,
}

pub fn run(a: Args) -> Result<()> {
    let home = assets::home();
    for asset in Asset::parse(&a.what)? {
        if !assets::ensure(&home, asset)? {
            eprintln!("rvq-kv: {asset:?} already present in {}", home.display());
        }
    }
    Ok(())
}
