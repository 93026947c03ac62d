//! Perplexity of a model on a token stream, with any cache.
//!
//! Two protocols: `windows` scores every token after the first of each
//! non-overlapping window of `ctx` tokens; `llama.cpp` reproduces `llama-perplexity` (chunks of
//! `ctx` tokens, BOS in front when the model adds one, only the second half of each chunk scored).

use crate::progress;
use anyhow::{bail, Result};
use kvcache::{Compression, MemoryReport};
use llm::ops::log_prob;
use llm::Model;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "windows")]
    Windows,
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
}

impl std::str::FromStr for Protocol {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "windows" | "default" => Ok(Protocol::Windows),
            "llama.cpp" | "llamacpp" => Ok(Protocol::LlamaCpp),
            other => bail!("unknown protocol '{other}' (known: windows, llama.cpp)"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PplOptions {
    pub ctx: usize,
    pub max_tokens: Option<usize>,
    pub protocol: Protocol,
    pub quiet: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct PplResult {
    pub cache: String,
    pub protocol: Protocol,
    pub ctx: usize,
    pub ppl: f64,
    /// Standard error of the perplexity (delta method over per-token NLL).
    pub ppl_stderr: f64,
    pub mean_nll: f64,
    pub scored_tokens: usize,
    pub windows: usize,
    pub tokens_processed: usize,
    /// Tokens through the model per second of its forward passes (scoring not counted).
    pub tokens_per_s: f64,
    /// Memory of the cache after the last window.
    pub memory: MemoryReport,
    pub compression: Compression,
}

/// A window of the text: (start, length, first scored row).
pub type Window = (usize, usize, usize);

/// The windows over `n` tokens.
pub fn windows(n: usize, ctx: usize, protocol: Protocol) -> Vec<Window> {
    match protocol {
        Protocol::Windows => (0..n)
            .step_by(ctx)
            .map(|s| (s, ctx.min(n - s), 0))
            .filter(|&(_, len, _)| len >= 2)
            .collect(),
        Protocol::LlamaCpp => (0..n / ctx).map(|c| (c * ctx, ctx, ctx / 2)).collect(),
    }
}

/// The windows `opts` cuts from `tokens`, checked: the tokens used, and each window's (start,
/// length, first scored row).
pub(crate) fn checked_plan<'a>(
    model: &Model,
    tokens: &'a [u32],
    opts: &PplOptions,
) -> Result<(&'a [u32], Vec<Window>)> {
    let ctx = opts.ctx;
    if ctx < 2 {
        bail!("--ctx {ctx} is too small: at least 2 tokens are needed to score one");
    }
    if ctx > model.context_len() {
        bail!(
            "--ctx {ctx} exceeds the model's context length {}",
            model.context_len()
        );
    }
    let n = opts
        .max_tokens
        .map_or(tokens.len(), |m| m.min(tokens.len()));
    let tokens = &tokens[..n];
    if tokens.len() < 2 {
        bail!(
            "the text has {} token(s): at least 2 are needed",
            tokens.len()
        );
    }
    let plan = windows(tokens.len(), ctx, opts.protocol);
    if plan.is_empty() {
        bail!("{} tokens do not fill one window of --ctx {ctx} (llama.cpp protocol needs whole chunks)", tokens.len());
    }
    if plan.iter().all(|&(_, len, first)| len - first < 2) {
        bail!("no token scored: --ctx {ctx} leaves no predicted token in a window under this protocol");
    }
    Ok((tokens, plan))
}

/// The tokens of window (`start`, `len`): under the llama.cpp protocol its first token is BOS
/// when the model adds one.
pub(crate) fn window_tokens(
    model: &Model,
    tokens: &[u32],
    (start, len): (usize, usize),
    protocol: Protocol,
) -> Vec<u32> {
    let mut window = tokens[start..start + len].to_vec();
    if protocol == Protocol::LlamaCpp {
        if let Some(b) = model.tokenizer.bos.filter(|_| model.tokenizer.add_bos) {
            window[0] = b;
        }
    }
    window
}

/// What one cache scored over a pass of windows, turned into a [`PplResult`] at the end; shared
/// by [`perplexity`] and the KL-divergence pass, which scores the same tokens.
#[derive(Debug, Default)]
pub(crate) struct PplTally {
    nlls: Vec<f64>,
    memory: MemoryReport,
    last_len: usize,
    tokens: usize,
    seconds: f64,
}

impl PplTally {
    /// Records one window: its tokens, the NLL of each scored row (rows `first..` of the window
    /// predict tokens `first + 1..`), the cache after it, and the seconds its forward pass took.
    pub(crate) fn add_window(
        &mut self,
        window: &[u32],
        first: usize,
        logits: &[f32],
        vocab: usize,
        cache: &dyn kvcache::KvCache,
        seconds: f64,
    ) {
        let scored = window.len() - first - 1;
        for (r, row) in logits.chunks_exact(vocab).enumerate().take(scored) {
            self.nlls
                .push(-log_prob(row, window[first + r + 1] as usize));
        }
        self.memory = cache.memory();
        self.last_len = window.len();
        self.tokens += window.len();
        self.seconds += seconds;
    }

    pub(crate) fn running_ppl(&self) -> f64 {
        (self.nlls.iter().sum::<f64>() / self.nlls.len() as f64).exp()
    }

    pub(crate) fn finish(self, spec: &str, opts: &PplOptions, windows: usize) -> Result<PplResult> {
        let ctx = opts.ctx;
        let nlls = self.nlls;
        if nlls.is_empty() {
            bail!("no token scored: --ctx {ctx} leaves no predicted token in a window under this protocol");
        }
        if let Some(bad) = nlls.iter().position(|x| !x.is_finite()) {
            bail!(
                "{spec}: token {bad} scored a non-finite log-likelihood (NaN or infinite logits)"
            );
        }
        let count = nlls.len() as f64;
        let mean = nlls.iter().sum::<f64>() / count;
        let var = nlls.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (count - 1.0).max(1.0);
        let ppl = mean.exp();
        Ok(PplResult {
            cache: spec.to_string(),
            protocol: opts.protocol,
            ctx,
            ppl,
            ppl_stderr: ppl * (var / count).sqrt(),
            mean_nll: mean,
            scored_tokens: nlls.len(),
            windows,
            tokens_processed: self.tokens,
            tokens_per_s: self.tokens as f64 / self.seconds.max(1e-9),
            compression: Compression::of(&self.memory, self.last_len),
            memory: self.memory,
        })
    }
}

/// The window's logits for its last `rows` rows from an emptied cache (every window starts from
/// an empty cache), and the seconds the forward pass took.
pub(crate) fn timed_forward(
    model: &Model,
    window: &[u32],
    rows: usize,
    cache: &mut dyn kvcache::KvCache,
) -> Result<(Vec<f32>, f64)> {
    cache.truncate(0);
    let start = Instant::now();
    let logits = model.forward(window, 0, cache, Some(rows))?;
    Ok((logits, start.elapsed().as_secs_f64()))
}

pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    spec: &str,
    opts: &PplOptions,
) -> Result<PplResult> {
    let (tokens, plan) = checked_plan(model, tokens, opts)?;
    let total: usize = plan.iter().map(|w| w.1).sum();
    let pb = progress::bar(total as u64, "tok", opts.quiet);
    pb.set_message(format!("ppl {spec}"));
    // One cache for all windows: codebooks are loaded once, buffers reused.
    let mut cache = model.new_cache(spec)?;
    let mut tally = PplTally::default();
    for &(s, len, first) in &plan {
        let window = window_tokens(model, tokens, (s, len), opts.protocol);
        let (logits, seconds) = timed_forward(model, &window, len - first, cache.as_mut())?;
        tally.add_window(
            &window,
            first,
            &logits,
            model.vocab(),
            cache.as_ref(),
            seconds,
        );
        pb.inc(len as u64);
        pb.set_message(format!("ppl {spec} = {:.4}", tally.running_ppl()));
    }
    pb.finish_and_clear();
    tally.finish(spec, opts, plan.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_plans() {
        assert_eq!(
            windows(10, 4, Protocol::Windows),
            vec![(0, 4, 0), (4, 4, 0), (8, 2, 0)]
        );
        assert_eq!(windows(9, 4, Protocol::Windows), vec![(0, 4, 0), (4, 4, 0)]);
        assert_eq!(
            windows(9, 4, Protocol::LlamaCpp),
            vec![(0, 4, 2), (4, 4, 2)]
        );
    }
}
