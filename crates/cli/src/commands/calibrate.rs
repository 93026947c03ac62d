use super::common::{print_json, ModelArgs};
use anyhow::{bail, Result};
use eval::assets;
use eval::calibrate::{calibrate, CalibConfig};
use rvq::train::Init;
use rvq::{Grouping, TrainConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(
    after_help = "The defaults are the paper's configuration: per-vector scaling, keys strided,\n\
    values contiguous, k-means then one EMA pass.\n\nExample:\n  \
    rvq-kv calibrate --out paper.safetensors && rvq-kv ppl --cache rvq:paper.safetensors"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Calibration text (default: exllamav2's wiki.utf8, fetched on first use); repeat it to
    /// calibrate on a mix, with an equal share of --tokens from the start of each. Never the
    /// eval text.
    #[arg(long)]
    text: Vec<PathBuf>,
    /// Output codebooks file
    #[arg(long, short = 'o')]
    out: PathBuf,
    /// Calibration tokens (enough for C training vectors per quantizer: at least C / (kv heads ×
    /// head_dim / d))
    #[arg(long, default_value_t = paper().tokens)]
    tokens: usize,
    /// Window length of the capture passes (1 to the model's context length)
    #[arg(long, default_value_t = paper().ctx)]
    ctx: usize,
    /// Group (sub-vector) dimension d: divides head_dim (32 for head_dim 64 or 128)
    #[arg(long, short = 'd', default_value_t = paper().train.dim)]
    group_dim: usize,
    /// Codewords per stage, C (2..=65536)
    #[arg(long, short = 'C', default_value_t = paper().train.size)]
    codebook_size: usize,
    /// Stages (depth), K (at least 1)
    #[arg(long, short = 'K', default_value_t = paper().train.stages)]
    stages: usize,
    /// Key grouping: strided (paper) or contiguous
    #[arg(long, default_value_t = paper().key_grouping)]
    key_grouping: Grouping,
    /// Value grouping: contiguous (paper) or strided
    #[arg(long, default_value_t = paper().value_grouping)]
    value_grouping: Grouping,
    /// What to quantize: kv, k or v
    #[arg(long, default_value = "kv")]
    quantize: String,
    /// Do not divide head vectors by their standard deviation
    #[arg(long)]
    no_scale: bool,
    /// Hadamard-rotate each head vector before grouping, and back after decoding (beyond the
    /// paper; llama.cpp does this for its q4_0/q8_0 caches)
    #[arg(long)]
    rotate: bool,
    /// Weight each key channel pair by the calibration queries' energy on it, so the codebooks
    /// spend their precision where attention looks (q · k), not on ‖k‖ alone (beyond the
    /// paper; stored with the codebooks, read by every cache that loads them)
    #[arg(long)]
    query_aware: bool,
    /// Vectors sampled for k-means (at least C)
    #[arg(long, default_value_t = paper().train.kmeans_sample)]
    kmeans_sample: usize,
    /// Lloyd iterations per stage, 0 or more (6 keeps the default calibration under 10 minutes on 2 cores)
    #[arg(long, default_value_t = paper().train.kmeans_iters)]
    kmeans_iters: usize,
    /// k-means initialisation: random-points or kmeans-plus-plus
    #[arg(long, default_value_t = paper().train.init)]
    init: Init,
    /// EMA refinement passes over all calibration vectors (0 or more; 0 = k-means only)
    #[arg(long, default_value_t = paper().train.ema_passes)]
    ema_passes: usize,
    /// Vectors per EMA step (at least 1)
    #[arg(long, default_value_t = paper().train.batch)]
    batch: usize,
    /// EMA decay of the codebooks' running sums, in (0, 1)
    #[arg(long, default_value_t = paper().train.decay)]
    decay: f32,
    /// Re-seed codewords whose EMA count falls below this count, a finite number ≥ 0 (off by
    /// default, as in the paper)
    #[arg(long)]
    dead_code_threshold: Option<f32>,
    /// Seed of k-means sampling and initialisation (any u64)
    #[arg(long, default_value_t = paper().train.seed)]
    seed: u64,
    /// After training, cut each layer's keys and values to the stages that minimise the
    /// predicted KLD at this average of bits per element, measured on the calibration text (as
    /// `rvq-kv allocate`; train more stages than the mean, e.g. -K 10 --bits 3.0). At most the
    /// bits of all K stages
    #[arg(long)]
    bits: Option<f64>,
    /// Layers to leave in full precision (0 to layers − 1), e.g. 0,29
    #[arg(long, value_delimiter = ',')]
    skip_layers: Vec<usize>,
    #[arg(long)]
    json: bool,
}

/// The paper's configuration, where every default of this command comes from.
fn paper() -> CalibConfig {
    CalibConfig::paper("")
}

pub fn run(a: Args) -> Result<()> {
    let (quantize_keys, quantize_values) = match a.quantize.as_str() {
        "kv" => (true, true),
        "k" => (true, false),
        "v" => (false, true),
        o => bail!("--quantize {o}: expected kv, k or v"),
    };
    let text_paths = match a.text.as_slice() {
        [] => vec![assets::ensure_calib(&assets::home(), "wiki.utf8")?],
        paths => paths.to_vec(),
    };
    let train = TrainConfig {
        dim: a.group_dim,
        size: a.codebook_size,
        stages: a.stages,
        kmeans_sample: a.kmeans_sample,
        kmeans_iters: a.kmeans_iters,
        init: a.init,
        ema_passes: a.ema_passes,
        batch: a.batch,
        decay: a.decay,
        dead_code_threshold: a.dead_code_threshold,
        seed: a.seed,
        ..paper().train
    };
    train.validate()?;
    super::common::check_writable(&a.out, "--out")?;
    let model = a.model.load()?;
    if let Some(bits) = a.bits {
        // Before minutes of training: the range these settings can reach.
        let (hd, code_bits) = (model.cache_shape().head_dim, rvq::bits_for(train.size));
        let at = |k| eval::allocate::bits_per_element(hd, train.dim, code_bits, k);
        if !(bits.is_finite() && bits >= at(1) && bits <= at(train.stages)) {
            bail!(
                "--bits {bits}: {} stages of {} codewords give {:.3} to {:.3} bits per element",
                train.stages,
                train.size,
                at(1),
                at(train.stages)
            );
        }
    }
    let tokens = mixed_tokens(&model, &text_paths, a.tokens)?;
    let cfg = CalibConfig {
        tokens: a.tokens,
        ctx: a.ctx.min(model.context_len()),
        train,
        key_grouping: a.key_grouping,
        value_grouping: a.value_grouping,
        quantize_keys,
        quantize_values,
        scaled: !a.no_scale,
        rotate: a.rotate,
        query_aware: a.query_aware,
        skip_layers: a.skip_layers,
        text: text_paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + "),
    };
    let (mut books, times) = calibrate(&model, &tokens, &cfg, false)?;
    if let Some(bits) = a.bits {
        let allocation = eval::allocate::AllocateConfig {
            bits,
            ..eval::allocate::AllocateConfig::default()
        };
        let (cut, report) = eval::allocate::allocate(&model, &books, &tokens, &allocation)?;
        eprintln!("rvq-kv: {}", report.summary());
        books = cut;
    }
    books.save(&a.out)?;
    let summary = serde_json::json!({
        "out": a.out.display().to_string(),
        "timings": times,
        "codebook_bytes": books.bytes(),
        "reports": books.meta.reports,
    });
    if a.json {
        return print_json(&summary);
    }
    let last_mse: Vec<String> = books
        .meta
        .reports
        .iter()
        .map(|(k, v)| {
            let f = |r: &Option<rvq::TrainReport>| {
                r.as_ref()
                    .and_then(|r| r.stages.last())
                    .map_or("-".into(), |s| format!("{:.3}", s.relative_mse))
            };
            format!("{}/{}", f(k), f(v))
        })
        .collect();
    eprintln!(
        "rvq-kv: wrote {} ({} KB of codebooks); captured {} tokens in {:.1}s, trained in {:.1}s\n\
         final relative MSE per layer (keys/values): {}",
        a.out.display(),
        books.bytes() / 1024,
        times.captured_tokens,
        times.capture_s,
        times.train_s,
        last_mse.join(" ")
    );
    Ok(())
}

/// The first `tokens / n` tokens of each of the `n` texts, one after the other (all of one text
/// when it is shorter than its share).
fn mixed_tokens(model: &llm::Model, paths: &[PathBuf], tokens: usize) -> Result<Vec<u32>> {
    let share = tokens.div_ceil(paths.len());
    let mut mixed = Vec::with_capacity(tokens);
    for path in paths {
        let ids = eval::text::read_tokens(model, path)?;
        mixed.extend_from_slice(&ids[..share.min(ids.len())]);
    }
    Ok(mixed)
}
