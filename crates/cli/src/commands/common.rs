//! Options and helpers shared by the commands.

use anyhow::{bail, Context, Result};
use eval::assets;
use llm::Model;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// GGUF file, or the name of a model fetched on first use: smollm2 (SmolLM2-135M-Instruct,
    /// llama) or gemma3-270m (Gemma 3 270M, gemma3)
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// Finetuned weights (from `rvq-kv finetune`) to use in place of the GGUF's
    #[arg(long, value_name = "FILE")]
    pub weights_delta: Option<PathBuf>,
    /// How weight matrices are held: native keeps the GGUF's block format (Q4_0 … Q6_K) and
    /// multiplies it by integer kernels against 8-bit activations (about a quarter of f32's
    /// memory and bytes read per token); f32 dequantizes them at load (the reference path)
    #[arg(long, default_value = "native", value_name = "native|f32")]
    pub weights: llm::gguf::WeightsMode,
}

impl ModelArgs {
    pub fn path(&self) -> Result<PathBuf> {
        match self.model.as_str() {
            "smollm2" => assets::ensure_model(&assets::home()),
            "gemma3-270m" | "gemma3" => assets::ensure_gemma3(&assets::home()),
            path => Ok(PathBuf::from(path)),
        }
    }

    /// The model's short name: `smollm2`, `gemma3-270m`, or a GGUF's file stem.
    pub fn name(&self) -> String {
        match self.model.as_str() {
            "smollm2" => "smollm2".to_string(),
            "gemma3-270m" | "gemma3" => "gemma3-270m".to_string(),
            path => std::path::Path::new(path)
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
        }
    }

    /// Where the demo keeps this model's paper-config codebooks: named after the model, so
    /// that models never share (or overwrite) each other's.
    pub fn paper_codebooks(&self) -> PathBuf {
        assets::home()
            .join("codebooks")
            .join(format!("{}-paper.safetensors", self.name()))
    }

    pub fn load(&self) -> Result<Model> {
        let path = self.path()?;
        let t = std::time::Instant::now();
        let delta = match &self.weights_delta {
            Some(p) => Some(llm::delta::WeightsDelta::load(p)?),
            None => None,
        };
        let model = Model::load_with(&path, delta.as_ref(), self.weights)
            .with_context(|| format!("loading model {}", path.display()))?;
        for (name, ty) in &model.dequantized {
            eprintln!(
                "rvq-kv: warning: {name} is {ty:?}, which has no integer kernel: held as f32"
            );
        }
        if let Some(p) = &self.weights_delta {
            eprintln!(
                "rvq-kv: {} finetuned tensors from {}",
                delta.as_ref().map_or(0, |d| d.tensors.len()),
                p.display()
            );
        }
        eprintln!(
            "rvq-kv: loaded {} ({} layers, {} KV heads x {}; {:?} weights, {:.0} MB) in {:.1}s",
            path.display(),
            model.config().layers,
            model.config().kv_heads,
            model.config().head_dim,
            self.weights,
            model.net.weight_bytes() as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        Ok(model)
    }
}

/// Prints `value` as the one JSON object on stdout.
/// Fails unless a file can be written at `path` (named by `flag` in the message): checked
/// before long work, so that a typo costs seconds, not the minutes of a calibration. Makes the
/// missing folders on the way.
pub fn check_writable(path: &Path, flag: &str) -> Result<()> {
    let shown = path.display();
    if path.is_dir() {
        bail!("{flag} {shown} is a folder; give a file path");
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
        bail!("{flag} {shown}: {} is a file, not a folder", file.display());
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{flag} {shown}: cannot create its folder"))?;
    let probe = dir.join(format!(".rvq-kv-write-probe-{}", std::process::id()));
    std::fs::File::create(&probe).with_context(|| format!("{flag} {shown}: cannot write there"))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A byte count: a whole number with an optional unit (`1GiB`, `512MiB`, `2GB`, `800M`, `4096`).
/// Binary units are powers of 1024, decimal ones of 1000.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 1GiB, 512MiB, 2GB, 4096)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "'{other}' is not a size unit (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = number * scale as f64;
    if !(bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(format!("'{text}': a size must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The text a measuring command reads, and where in it to start.
#[derive(clap::Args)]
pub struct TextArgs {
    /// Text to measure (default: sotu-eval, fetched on first use)
    #[arg(long)]
    text: Option<PathBuf>,
    /// Start this many tokens into the text, e.g. to measure a calibration text on the part
    /// that calibration did not read (0 or more, leaving at least 2 tokens)
    #[arg(long, default_value_t = 0)]
    skip_tokens: usize,
}

impl TextArgs {
    fn path(&self) -> Result<PathBuf> {
        match &self.text {
            Some(p) => Ok(p.clone()),
            None => assets::ensure_eval_text(&assets::home()),
        }
    }

    /// The text's name as reports give it (its path, and where measuring started if not at
    /// the start) and its tokens from `--skip-tokens` on.
    pub fn read(&self, model: &Model) -> Result<(String, Vec<u32>)> {
        let path = self.path()?;
        let mut tokens = eval::text::read_tokens(model, &path)?;
        if self.skip_tokens >= tokens.len() {
            bail!(
                "--skip-tokens {}: {} has only {} tokens",
                self.skip_tokens,
                path.display(),
                tokens.len()
            );
        }
        tokens.drain(..self.skip_tokens);
        let name = match self.skip_tokens {
            0 => path.display().to_string(),
            n => format!("{} from token {n}", path.display()),
        };
        Ok((name, tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units_and_bad_ones_are_named() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("1.5 GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").unwrap_err().contains("at least 1 byte"));
        assert!(parse_bytes("1TiB")
            .unwrap_err()
            .contains("'tib' is not a size unit"));
        assert!(parse_bytes("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn each_model_has_its_own_paper_codebooks() {
        let path = |model: &str| {
            let args = ModelArgs {
                model: model.into(),
                weights_delta: None,
                weights: llm::gguf::WeightsMode::Native,
            };
            args.paper_codebooks()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(path("smollm2"), "smollm2-paper.safetensors");
        assert_eq!(path("gemma3-270m"), "gemma3-270m-paper.safetensors");
        assert_eq!(
            path("/models/qwen2-0.5b.gguf"),
            "qwen2-0.5b-paper.safetensors"
        );
    }
}
