//! `rvq-kv synth`: a GGUF of a real architecture's shapes with random weights.

use anyhow::{Context, Result};
use eval::assets;
use llm::synth::{self, Arch, Preset};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_help = "Examples:
  rvq-kv synth --preset 8b --type q4_k            # Llama-3.1-8B shapes, 4.6 GB
  rvq-kv bench --model .rvq-kv/models/synth-llama-8b-q4_k.gguf --cache f16 --ctx 32768 --fill random
  rvq-kv synth --arch qwen2 --preset 0.5b         # Qwen2.5-0.5B shapes

Presets, llama: tiny (2 layers, hidden 256), tiny128 (the same at head_dim 128), 1b (Llama 3.2
1B: 16 layers, hidden 2048, 32 heads, 8 KV heads x 64, ffn 8192, vocab 128256, tied), 3b (Llama
3.2 3B: 28 layers, hidden 3072, 24 heads, 8 KV heads x 128, ffn 8192, tied), 8b (Llama 3.1 8B: 32
layers, hidden 4096, 32 heads, 8 KV heads x 128, ffn 14336, vocab 128256). qwen2 (q/k/v biases,
half-split RoPE): tiny, 0.5b (Qwen2.5 0.5B: 24 layers, hidden 896, 14 heads, 2 KV heads x 64, ffn
4864, vocab 151936, tied), 1.5b (Qwen2.5 1.5B: 28 layers, hidden 1536, 12 heads, 2 KV heads x
128, ffn 8960, tied). The tokenizer is SmolLM2's, padded with control tokens to the vocabulary
size. Quality is meaningless; speed and bytes are real.")]
pub struct Args {
    /// Architecture: llama or qwen2
    #[arg(long, default_value = "llama")]
    arch: String,
    /// Shapes, per architecture: llama tiny, tiny128, 1b, 3b or 8b; qwen2 tiny, 0.5b or 1.5b
    #[arg(long, default_value = "1b")]
    preset: String,
    /// Weight block type: q4_0, q4_1, q8_0, q4_k or q6_k
    #[arg(long = "type", default_value = "q4_k")]
    weight_type: String,
    /// Output file (default: .rvq-kv/models/synth-ARCH-PRESET-TYPE.gguf)
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of the random weights (any u64)
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let preset = Preset::by_name(Arch::by_name(&a.arch)?, &a.preset)?;
    synth::weight_type(&a.weight_type)?;
    let home = assets::home();
    let out = match a.out {
        Some(p) => p,
        None => home.join("models").join(format!(
            "synth-{}-{}-{}.gguf",
            preset.arch.name(),
            preset.name,
            a.weight_type
        )),
    };
    // Checked before the work: the folder exists (or is made) and takes a file.
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let probe = out.with_extension("gguf.tmp");
    std::fs::File::create(&probe).with_context(|| format!("cannot write {}", out.display()))?;
    std::fs::remove_file(&probe)?;
    let tokenizer = assets::ensure_model(&home)?;
    let bar = eval::progress::bar((preset.layers + 2) as u64, "tensor groups", false);
    bar.set_message(format!(
        "synth {} ({:.2}B parameters)",
        preset.name,
        preset.parameters() as f64 / 1e9
    ));
    synth::write(
        &preset,
        &a.weight_type,
        &tokenizer,
        &out,
        a.seed,
        |done, _| bar.set_position(done as u64),
    )
    .with_context(|| format!("writing {}", out.display()))?;
    bar.finish_and_clear();
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "rvq-kv: wrote {} ({} preset, {}, {:.2} GB)",
        out.display(),
        preset.name,
        a.weight_type,
        size as f64 / 1e9
    );
    Ok(())
}
