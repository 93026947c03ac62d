//! `compare`: many caches on the same tokens, one model load, one table and one plot.
//!
//! Every row is perplexity with one cache spec at one context length; the reference is the f16
//! cache at the same context (added when missing), so Δ% is measured on exactly the same tokens.

use crate::kld::{kl_divergence, Kld};
use crate::ppl::{perplexity, PplOptions, PplResult, Protocol};
use anyhow::{bail, Result};
use llm::Model;
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub specs: Vec<String>,
    pub contexts: Vec<usize>,
    pub max_tokens: Option<usize>,
    pub protocol: Protocol,
    /// Multiple-choice tasks scored with every cache: (name, request file).
    pub tasks: Vec<(String, std::path::PathBuf)>,
    /// Items per task (all when `None`).
    pub task_limit: Option<usize>,
    /// Also the KL divergence of each cache's next-token distribution from f16's.
    pub kld: bool,
    pub quiet: bool,
}

/// Accuracy of one cache on one task.
#[derive(Clone, Debug, Serialize)]
pub struct TaskScore {
    pub task: String,
    pub items: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

/// The reference every row is compared with.
pub const REFERENCE: &str = "f16";

#[derive(Clone, Debug, Serialize)]
pub struct CompareRow {
    pub spec: String,
    pub ctx: usize,
    pub ppl: f64,
    pub ppl_stderr: f64,
    /// (PPL / PPL of f16 at this ctx − 1) × 100.
    pub delta_pct: f64,
    pub bits_per_element: f64,
    pub compression_vs_f16: f64,
    /// Bytes of the cache holding one full window of `ctx` tokens.
    pub cache_bytes: u64,
    /// Codebooks and other bytes that do not grow with context.
    pub fixed_bytes: u64,
    pub tokens_per_s: f64,
    /// Multiple-choice accuracy per task (measured once per cache, on the first context's row).
    pub tasks: Vec<TaskScore>,
    /// KL divergence from f16 on the same tokens (`--kld`; none for f16 itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kld: Option<Kld>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    pub model: String,
    pub text: String,
    pub protocol: Protocol,
    pub tokens: usize,
    pub rows: Vec<CompareRow>,
}

/// Specs with the reference first and duplicates removed.
pub fn with_reference(specs: &[String]) -> Vec<String> {
    let mut out = vec![REFERENCE.to_string()];
    for s in specs {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// Runs every spec at every context on the same tokens.
pub fn compare(
    model: &Model,
    tokens: &[u32],
    opts: &CompareOptions,
    mut on_row: impl FnMut(&CompareRow),
) -> Result<Vec<CompareRow>> {
    if opts.contexts.is_empty() {
        bail!("no context length given");
    }
    let specs = with_reference(&opts.specs);
    // Build every cache once before the long runs: a bad spec fails in a second, not an hour in.
    for spec in &specs {
        model.new_cache(spec)?;
    }
    // Each task's first `task_limit` items.
    let items = crate::mc::Selection::first(opts.task_limit);
    let mut rows = vec![];
    for &ctx in &opts.contexts {
        let ppl_opts = PplOptions {
            ctx,
            max_tokens: opts.max_tokens,
            protocol: opts.protocol,
            quiet: opts.quiet,
        };
        // With --kld one pass yields every row: the perplexities come from the same logits.
        let scored: Vec<(PplResult, Option<Kld>)> = if opts.kld {
            let pass = kl_divergence(model, tokens, REFERENCE, &specs[1..], &ppl_opts)?;
            std::iter::once((pass.reference, None))
                .chain(pass.caches.into_iter().map(|(r, k)| (r, Some(k))))
                .collect()
        } else {
            specs
                .iter()
                .map(|spec| Ok((perplexity(model, tokens, spec, &ppl_opts)?, None)))
                .collect::<Result<_>>()?
        };
        let base = scored[0].0.ppl;
        for (spec, (r, kld)) in specs.iter().zip(scored) {
            let mut row = row_of(&r, base);
            row.kld = kld;
            if ctx == opts.contexts[0] {
                for (task, file) in &opts.tasks {
                    let m = crate::mc::run(model, file, task, "", spec, items, opts.quiet)?;
                    row.tasks.push(TaskScore {
                        task: task.clone(),
                        items: m.items,
                        acc: m.acc.value,
                        acc_norm: m.acc_norm.value,
                    });
                }
            }
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

fn row_of(r: &PplResult, reference_ppl: f64) -> CompareRow {
    CompareRow {
        spec: r.cache.clone(),
        ctx: r.ctx,
        ppl: r.ppl,
        ppl_stderr: r.ppl_stderr,
        delta_pct: (r.ppl / reference_ppl - 1.0) * 100.0,
        bits_per_element: r.compression.bits_per_element,
        compression_vs_f16: r.compression.compression_vs_f16,
        cache_bytes: r.memory.bytes,
        fixed_bytes: r.memory.fixed_bytes,
        tokens_per_s: r.tokens_per_s,
        tasks: vec![],
        kld: None,
    }
}

/// A short label for plots and tables: `rvq:dir/paper.safetensors,sinks=4` → `rvq:paper,sinks=4`.
pub fn short_label(spec: &str) -> String {
    match spec.strip_prefix("rvq:") {
        Some(rest) => {
            let (path, opts) = rest.split_once(',').map_or((rest, ""), |(p, o)| (p, o));
            let stem = std::path::Path::new(path)
                .file_stem()
                .map_or(path.into(), |s| s.to_string_lossy().into_owned());
            if opts.is_empty() {
                format!("rvq:{stem}")
            } else {
                format!("rvq:{stem},{opts}")
            }
        }
        None => spec.to_string(),
    }
}

impl CompareReport {
    /// The markdown table, one row per cache and context.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Model `{}`, text `{}`, {} tokens, protocol {:?}. Δ is against f16 at the same context.\n\n",
            self.model, self.text, self.tokens, self.protocol
        );
        let tasks: Vec<String> = self
            .rows
            .iter()
            .flat_map(|r| {
                r.tasks
                    .iter()
                    .map(|t| format!("{} ({} items)", t.task, t.items))
            })
            .fold(vec![], |mut v, t| {
                if !v.contains(&t) {
                    v.push(t);
                }
                v
            });
        let kld = self.rows.iter().any(|r| r.kld.is_some());
        s += "| cache | ctx | PPL | Δ vs f16 | bits/element | × vs f16 | cache bytes at ctx | fixed bytes |";
        if kld {
            s += " KLD vs f16: mean / p99 | same top token |";
        }
        for t in &tasks {
            s += &format!(" {t} acc / acc_norm |");
        }
        s += "\n|---|---:|---:|---:|---:|---:|---:|---:|";
        s += &"---:|".repeat(tasks.len() + 2 * usize::from(kld));
        s += "\n";
        for r in &self.rows {
            s += &format!(
                "| `{}` | {} | {:.4} ± {:.4} | {:+.2}% | {:.3} | {:.2} | {} | {} |",
                short_label(&r.spec),
                r.ctx,
                r.ppl,
                r.ppl_stderr,
                r.delta_pct,
                r.bits_per_element,
                r.compression_vs_f16,
                r.cache_bytes,
                r.fixed_bytes
            );
            match (&r.kld, kld) {
                (Some(k), _) => {
                    s += &format!(
                        " {:.5} / {:.4} | {:.2}% |",
                        k.mean,
                        k.p99,
                        100.0 * k.same_top
                    )
                }
                (None, true) => s += " — | — |",
                (None, false) => {}
            }
            for i in 0..tasks.len() {
                match r.tasks.get(i) {
                    Some(t) => s += &format!(" {:.4} / {:.4} |", t.acc, t.acc_norm),
                    None => s += " |",
                }
            }
            s += "\n";
        }
        s
    }
}

/// Indices of the rows on the Pareto front (no other row has both fewer bits and lower Δ),
/// sorted by bits.
pub fn pareto_front(rows: &[&CompareRow]) -> Vec<usize> {
    let mut front: Vec<usize> = (0..rows.len())
        .filter(|&i| {
            !rows.iter().enumerate().any(|(j, o)| {
                j != i
                    && o.bits_per_element <= rows[i].bits_per_element
                    && o.delta_pct <= rows[i].delta_pct
                    && (o.bits_per_element < rows[i].bits_per_element
                        || o.delta_pct < rows[i].delta_pct)
            })
        })
        .collect();
    front.sort_by(|&a, &b| {
        rows[a]
            .bits_per_element
            .total_cmp(&rows[b].bits_per_element)
    });
    front
}

/// A row with only what plots and fronts look at, for tests.
#[cfg(test)]
pub(crate) fn test_row(spec: &str, ctx: usize, bits: f64, delta: f64) -> CompareRow {
    CompareRow {
        spec: spec.into(),
        ctx,
        ppl: 1.0,
        ppl_stderr: 0.0,
        delta_pct: delta,
        bits_per_element: bits,
        compression_vs_f16: 16.0 / bits,
        cache_bytes: 0,
        fixed_bytes: 0,
        tokens_per_s: 0.0,
        tasks: vec![],
        kld: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(spec: &str, bits: f64, delta: f64) -> CompareRow {
        test_row(spec, 512, bits, delta)
    }

    #[test]
    fn pareto_front_keeps_only_undominated_points() {
        let rows = [
            row("f16", 16.0, 0.0),
            row("q8_0", 8.5, 0.01),
            row("int8", 8.25, 0.5),
            row("q4_0", 4.5, 14.0),
            row("rvq", 3.0, 4.3),
            row("kivi2", 3.0, 9.0),
        ];
        let refs: Vec<&CompareRow> = rows.iter().collect();
        let front: Vec<&str> = pareto_front(&refs)
            .into_iter()
            .map(|i| rows[i].spec.as_str())
            .collect();
        assert_eq!(front, ["rvq", "int8", "q8_0", "f16"]);
    }

    #[test]
    fn labels_and_reference() {
        assert_eq!(
            short_label("rvq:/a/b/paper.safetensors,sinks=4"),
            "rvq:paper,sinks=4"
        );
        assert_eq!(short_label("q4_0,rot"), "q4_0,rot");
        let specs = with_reference(&["q4_0".into(), "f16".into(), "q4_0".into()]);
        assert_eq!(specs, ["f16", "q4_0"]);
    }
}
