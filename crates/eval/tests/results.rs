//! docs/RESULTS.md is what its template and tables give, and the tables hold the numbers the
//! commands wrote (the `--json` outputs kept under docs/data/).

use eval::report::{regenerate, Table};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn json(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn table(name: &str) -> Table {
    serde_json::from_value(json(&format!("docs/data/tables/{name}.json"))).unwrap()
}

#[test]
fn results_md_is_what_its_template_and_tables_give() {
    regenerate(&root(), true).unwrap();
}

/// Every perplexity of a `compare --json` file, rounded to `decimals`, stands in the table (a
/// row or, for the reference, the header).
fn holds_every_perplexity(data: &str, name: &str, decimals: usize) {
    let t = table(name);
    let cells: Vec<String> = [t.header, t.rows.concat()].concat();
    let rows = json(data)["rows"].as_array().unwrap().clone();
    assert!(!rows.is_empty(), "{data} has no rows");
    for row in rows {
        let ppl = format!("{:.decimals$}", row["ppl"].as_f64().unwrap());
        assert!(
            cells.iter().any(|c| c.contains(&ppl)),
            "table {name} lacks {ppl} ({}) of {data}",
            row["spec"]
        );
    }
}

#[test]
fn tables_hold_the_perplexities_their_commands_wrote() {
    holds_every_perplexity("docs/data/baselines-512.json", "caches-compared", 4);
    holds_every_perplexity(
        "docs/data/baselines-2048.json",
        "caches-vs-llama-cpp-2048",
        4,
    );
    holds_every_perplexity("docs/data/ablation.json", "ablations", 2);
    holds_every_perplexity("docs/data/gemma3-kld.json", "gemma-3-270m-caches", 4);
    holds_every_perplexity(
        "docs/data/gemma3-query-aware.json",
        "gemma-3-270m-caches",
        4,
    );
    holds_every_perplexity("docs/data/beam-layers.json", "beam-layers", 4);
    holds_every_perplexity("docs/data/allocation.json", "allocation", 4);
    holds_every_perplexity("docs/data/kld-frontier-32k.json", "kl-divergence", 4);
    for run in ["plus1-8k", "plus1-32k", "plus1-39-32k"] {
        holds_every_perplexity(&format!("docs/data/{run}.json"), "plus-one", 4);
    }
    for run in [
        "query-aware",
        "query-aware-alloc",
        "query-aware-beam4",
        "alloc-beam2",
    ] {
        holds_every_perplexity(&format!("docs/data/{run}.json"), "query-aware", 4);
    }
    for text in ["wiki-heldout", "c4-heldout", "sotu", "tiny"] {
        let data = format!("docs/data/travel-{text}.json");
        holds_every_perplexity(&data, "calibration-domains", 4);
    }
}

#[test]
fn the_multiple_choice_table_holds_every_mc_run() {
    let t = table("multiple-choice");
    let dir = root().join("docs/data/mc");
    let mut runs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let run: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let task = run["task"].as_str().unwrap();
        let items = run["items"].as_u64().unwrap().to_string();
        // A row per task and item count ("hellaswag, every 5th" | "2,009").
        let row = t
            .rows
            .iter()
            .find(|r| r[0].starts_with(task) && r[1].replace(',', "") == items)
            .unwrap_or_else(|| panic!("no {task} row of {items} items"));
        let cache = if run["cache"] == "f16" { "f16" } else { "rvq" };
        for metric in ["acc", "acc_norm"] {
            let column = t
                .header
                .iter()
                .position(|h| *h == format!("{cache} {metric}"))
                .unwrap();
            let value = format!("{:.3}", run[metric]["value"].as_f64().unwrap());
            assert!(
                row[column].starts_with(&value),
                "{}: {cache} {metric} {value}, the table says {}",
                path.display(),
                row[column]
            );
        }
        runs += 1;
    }
    // Every filled-in pair of columns is one of the runs.
    let filled: usize = t
        .rows
        .iter()
        .map(|r| r.iter().filter(|c| c.contains('±')).count() / 2)
        .sum();
    assert_eq!(runs, filled);
}

#[test]
fn the_needle_table_holds_every_cache_of_its_run() {
    let t = table("needle");
    let reports = json("docs/data/needle.json");
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), t.rows.len());
    for (report, row) in reports.iter().zip(&t.rows) {
        let all = format!("{:.0}%", 100.0 * report["accuracy"].as_f64().unwrap());
        assert_eq!(row[row.len() - 2], all, "{}", report["cache"]);
        let right: u64 = report["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["correct"].as_u64().unwrap())
            .sum();
        let in_columns: u64 = row[1..row.len() - 2]
            .iter()
            .map(|c| c.split('/').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(right, in_columns, "{}", report["cache"]);
    }
}
