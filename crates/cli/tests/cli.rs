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

fn fails_with(args: &[&str], needle: &str) {
    let (ok, _, err) = rvq_kv(args);
    assert!(!ok, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "   \n").unwrap();
    let short = dir.path().join("short.txt");
    std::fs::write(&short, "Hi").unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    let e = empty.to_str().unwrap();
    fails_with(
        &["ppl", "--model", "/nonexistent/model.gguf"],
        "cannot open model file",
    );
    fails_with(
        &["ppl", "--model", junk.to_str().unwrap()],
        "not a readable GGUF",
    );
    fails_with(
        &["ppl", "--cache", "q3_z", "--max-tokens", "64"],
        "unknown cache type 'q3_z'",
    );
    // Used to print "PPL = NaN (0 tokens scored)" and exit 0.
    fails_with(
        &[
            "ppl",
            "--protocol",
            "llama.cpp",
            "--ctx",
            "2",
            "--max-tokens",
            "64",
        ],
        "no token scored",
    );
    // Used to panic ("chunk size must be non-zero").
    let out = dir.path().join("books.safetensors");
    fails_with(
        &[
            "calibrate",
            "--ctx",
            "0",
            "--tokens",
            "2048",
            "-C",
            "256",
            "--out",
            out.to_str().unwrap(),
        ],
        "--ctx 0",
    );
    assert!(!out.exists());
    // Used to print NaN columns.
    fails_with(
        &[
            "bench",
            "--cache",
            "f16",
            "--ctx",
            "64",
            "--decode-steps",
            "0",
            "--in-process",
        ],
        "--decode-steps must be at least 1",
    );
    fails_with(&["synth", "--preset", "70b"], "preset '70b'");
    fails_with(
        &["ppl", "--ctx", "100000"],
        "exceeds the model's context length 8192",
    );
    fails_with(&["ppl", "--ctx", "1"], "too small");
    fails_with(&["ppl", "--text", e], "is empty");
    fails_with(&["ppl", "--text", short.to_str().unwrap()], "at least 2");
    fails_with(
        &["ppl", "--cache", "rvq:/nonexistent.safetensors"],
        "cannot read",
    );
    fails_with(
        &["ppl", "--cache", "rvq:x.safetensors,sinks=-1"],
        "not a whole number",
    );
    fails_with(
        &["generate", "--prompt", "hi", "--top-p", "1.5"],
        "--top-p 1.5",
    );
    fails_with(&["generate"], "--prompt");
    fails_with(
        &["calibrate", "--out", "/tmp/never.safetensors", "-C", "1"],
        "C = 1",
    );
    fails_with(
        &["calibrate", "--out", "/tmp/never.safetensors", "-d", "48"],
        "must divide",
    );
    fails_with(&["fetch", "everything"], "unknown asset");
    fails_with(
        &["compare", "--cache", "q4_0", "--cache", "kivi2,group=0"],
        "group=0",
    );
    fails_with(
        &["ppl", "--cache", "kivi2,residual=-1"],
        "not a whole number",
    );
    let never = [
        "finetune",
        "--codebooks",
        "/nonexistent.safetensors",
        "--out",
        "/tmp/never",
    ];
    fails_with(
        &[&never[..], &["--train", "everything"]].concat(),
        "unknown parameter set",
    );
    fails_with(&[&never[..], &["--lr", "0"]].concat(), "learning rate");
    assert!(rvq_kv(&["fetch", "eval"]).0, "fetching the eval text");
    let eval_text = home().join("text").join("sotu-eval.txt");
    fails_with(
        &[&never[..], &["--text", eval_text.to_str().unwrap()]].concat(),
        "is the evaluation text",
    );
    fails_with(&never, "nonexistent.safetensors");
    fails_with(
        &["ppl", "--weights-delta", e, "--max-tokens", "64"],
        "weights delta",
    );
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
