//! The catalogue of hostile inputs: one row per input, the exit status it must give and a phrase
//! its message must contain. Every row also runs with `RUST_BACKTRACE=1` and must neither panic
//! nor print a backtrace (a user's mistake is not a crash), and rows that name an output must not
//! leave it behind.

use kvcache::codebooks::Codebooks;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn home() -> PathBuf {
    match std::env::var_os("RVQ_KV_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.rvq-kv")),
    }
}

fn rvq_kv(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rvq-kv"));
    cmd.args(args)
        .env("RVQ_KV_HOME", home())
        .env("RUST_BACKTRACE", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running rvq-kv");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

/// Bad files made once: models, codebooks, texts, folders.
struct Fixtures {
    dir: tempfile::TempDir,
}

impl Fixtures {
    fn get() -> &'static Fixtures {
        static F: OnceLock<Fixtures> = OnceLock::new();
        F.get_or_init(Self::make)
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn make() -> Self {
        let f = Fixtures {
            dir: tempfile::tempdir().unwrap(),
        };
        let write = |name: &str, bytes: &[u8]| std::fs::write(f.path(name), bytes).unwrap();
        write("empty.txt", b"   \n");
        write("short.txt", b"Hi");
        write("binary.txt", &[0xff, 0xfe, 0x00, 0x80, 0x81]);
        write("junk.gguf", b"GGUF but not really");
        write("afile", b"a file, not a folder");
        std::fs::create_dir(f.path("adir")).unwrap();

        let (code, err) = rvq_kv(&["fetch", "eval"], &[]);
        assert_eq!(code, 0, "fetch eval: {err}");
        // A tiny valid model, then copies with one field made hostile.
        let tiny = f.path("tiny.gguf");
        let (code, err) = rvq_kv(
            &[
                "synth", "--preset", "tiny", "--type", "q8_0", "--out", &tiny,
            ],
            &[],
        );
        assert_eq!(code, 0, "synth: {err}");
        let bytes = std::fs::read(&tiny).unwrap();
        let patched = |name: &str, key: &str, skip: usize, value: &[u8]| {
            let mut b = bytes.clone();
            let at = find(&b, key.as_bytes()) + key.len() + skip;
            b[at..at + value.len()].copy_from_slice(value);
            write(name, &b);
        };
        // Metadata values follow their key and a u32 type tag.
        patched(
            "bos.gguf",
            "tokenizer.ggml.bos_token_id",
            4,
            &999_999u32.to_le_bytes(),
        );
        patched(
            "heads.gguf",
            "llama.attention.head_count",
            4,
            &3u32.to_le_bytes(),
        );
        patched("layers0.gguf", "llama.block_count", 4, &0u32.to_le_bytes());
        // A tensor's dims follow its name and a u32 count: the embedding's second, 2^62.
        patched(
            "huge.gguf",
            "token_embd.weight",
            4 + 8,
            &(1u64 << 62).to_le_bytes(),
        );
        write("trunc.gguf", &bytes[..bytes.len() / 2]);
        // NaN in a weight: the final norm's first element (an f32 tensor).
        let content = candle_core::quantized::gguf_file::Content::read(
            &mut std::fs::File::open(&tiny).unwrap(),
        )
        .unwrap();
        let norm = content.tensor_infos["output_norm.weight"].offset as usize
            + content.tensor_data_offset as usize;
        let mut nan = bytes.clone();
        nan[norm..norm + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        write("nanweights.gguf", &nan);

        // Small codebooks for the default model, then copies with one field made hostile.
        let books = f.path("books.safetensors");
        let (code, err) = rvq_kv(
            &[
                "calibrate",
                "--tokens",
                "512",
                "-C",
                "16",
                "-K",
                "2",
                "--kmeans-iters",
                "1",
                "--out",
                &books,
            ],
            &[],
        );
        assert_eq!(code, 0, "calibrate: {err}");
        let good = Codebooks::load(Path::new(&books)).unwrap();
        let variant = |name: &str, change: &dyn Fn(&mut Codebooks)| {
            let mut b = good.clone();
            change(&mut b);
            b.save(Path::new(&f.path(name))).unwrap();
        };
        variant("skip999.safetensors", &|b| {
            b.meta.skipped_layers = vec![999]
        });
        variant("nokeys3.safetensors", &|b| b.layers[3].keys = None);
        variant("d48.safetensors", &|b| {
            b.meta.keys.as_mut().unwrap().group_dim = 48;
        });
        variant("othermodel.safetensors", &|b| {
            b.meta.model.file_sha256 = "0".repeat(64);
        });
        let raw = std::fs::read(&books).unwrap();
        write("trunc.safetensors", &raw[..raw.len() / 2]);
        // A NaN codeword, as a file written by something else than rvq-kv could hold.
        write("nan.safetensors", &with_nan(&raw, "layer.5.v.stage.1", 7));
        f
    }
}

/// `safetensors` with element `at` of f32 tensor `name` set to NaN.
fn with_nan(safetensors: &[u8], name: &str, at: usize) -> Vec<u8> {
    let header_len = u64::from_le_bytes(safetensors[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&safetensors[8..8 + header_len]).unwrap();
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    let mut out = safetensors.to_vec();
    let byte = 8 + header_len + start + 4 * at;
    out[byte..byte + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{} not in the file", String::from_utf8_lossy(needle)))
}

/// One input: the arguments (`{name}` is a fixture's path), the exit status, a phrase of the
/// message, and an output that must not exist afterwards.
struct Row {
    args: &'static str,
    code: i32,
    needle: &'static str,
    env: &'static [(&'static str, &'static str)],
    absent: Option<&'static str>,
}

const fn row(args: &'static str, code: i32, needle: &'static str) -> Row {
    Row {
        args,
        code,
        needle,
        env: &[],
        absent: None,
    }
}

const fn leaves_nothing(args: &'static str, needle: &'static str, absent: &'static str) -> Row {
    Row {
        args,
        code: 1,
        needle,
        env: &[],
        absent: Some(absent),
    }
}

const CATALOGUE: &[Row] = &[
    // Model files.
    row(
        "ppl --model /nonexistent/model.gguf",
        1,
        "cannot open model file",
    ),
    row("ppl --model {junk.gguf}", 1, "not a readable GGUF"),
    row("ppl --model {empty.txt}", 1, "not a readable GGUF"),
    row("ppl --model {adir}", 1, "not a readable GGUF"),
    row("ppl --model {trunc.gguf} --max-tokens 64", 1, "cut short"),
    row(
        "ppl --model {huge.gguf} --max-tokens 64",
        1,
        "token_embd.weight",
    ),
    row(
        "ppl --model {bos.gguf} --max-tokens 64",
        1,
        "bos_token_id is 999999, outside the vocabulary",
    ),
    row(
        "ppl --model {heads.gguf} --max-tokens 64",
        1,
        "head_count 3 is not a multiple of head_count_kv 2",
    ),
    row(
        "ppl --model {layers0.gguf} --max-tokens 64",
        1,
        "block_count is 0",
    ),
    row("ppl --model gemma4 --max-tokens 64", 1, "gemma4"),
    row(
        "ppl --model {nanweights.gguf} --max-tokens 64",
        1,
        "non-finite log-likelihood",
    ),
    row(
        "generate --model {nanweights.gguf} --prompt hello -n 4",
        1,
        "logits hold NaN",
    ),
    // Codebook files.
    row(
        "ppl --max-tokens 64 --cache rvq:",
        1,
        "needs its codebook file",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{adir}",
        1,
        "is a folder, not a codebook file",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:/nonexistent.safetensors",
        1,
        "cannot read",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{junk.gguf}",
        1,
        "junk.gguf",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{trunc.safetensors}",
        1,
        "trunc.safetensors",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{nan.safetensors}",
        1,
        "layer.5.v.*",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{skip999.safetensors}",
        1,
        "skipped layer 999 does not exist",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{nokeys3.safetensors}",
        1,
        "layer 3 has 0 key stages",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{d48.safetensors}",
        1,
        "k group dim 48 does not divide head_dim 64",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{othermodel.safetensors}",
        1,
        "not for this model",
    ),
    row(
        "ppl --model {tiny.gguf} --max-tokens 64 --cache rvq:{books.safetensors}",
        1,
        "not for this model",
    ),
    // Cache specs.
    row(
        "ppl --max-tokens 64 --cache q3_z",
        1,
        "unknown cache type 'q3_z'",
    ),
    row(
        "ppl --max-tokens 64 --cache f16,rot",
        1,
        "f16 takes no options",
    ),
    row(
        "ppl --max-tokens 64 --cache q4_0,foo",
        1,
        "unknown q4_0 option 'foo'",
    ),
    row(
        "ppl --max-tokens 64 --cache kivi2,residual=-1",
        1,
        "not a whole number",
    ),
    row(
        "compare --max-tokens 512 --cache q4_0 --cache kivi2,group=0",
        1,
        "group=0",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},beam=0",
        1,
        "beam must be at least 1",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},beam=18446744073709551615",
        1,
        "exceeds the 16 codewords",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},beam=100000",
        1,
        "exceeds the 16 codewords",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},stages=0",
        1,
        "stages=0",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},stages=99",
        1,
        "stages=99",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},sinks=-1",
        1,
        "not a whole number",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},sinks",
        1,
        "is not key=value",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},only=x",
        1,
        "only=x",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},books=f8",
        1,
        "books",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},values=fused",
        1,
        "unknown rvq option 'values'",
    ),
    row(
        "ppl --max-tokens 64 --cache rvq:{books.safetensors},colour=red",
        1,
        "unknown rvq option 'colour'",
    ),
    // Texts and prompts.
    row("ppl --text {empty.txt}", 1, "is empty"),
    row("ppl --text {short.txt}", 1, "at least 2"),
    row("ppl --text /nonexistent.txt", 1, "reading text"),
    row("ppl --text {binary.txt}", 1, "is not UTF-8"),
    row("ppl --text {adir}", 1, "is a folder, not a text file"),
    row(
        "ppl --text {short.txt} --skip-tokens 1000",
        1,
        "--skip-tokens 1000",
    ),
    row(
        "compare --text {short.txt} --skip-tokens 1000 --cache f16",
        1,
        "has only",
    ),
    row(
        "calibrate --text {short.txt} --text {empty.txt} --out {new.safetensors}",
        1,
        "is empty",
    ),
    row(
        "generate --prompt-file /dev/zero -n 2",
        1,
        "more than 256 MiB",
    ),
    row("generate --prompt-file {adir} -n 2", 1, "is a folder"),
    row("generate --prompt-file {binary.txt} -n 2", 1, "not UTF-8"),
    row(
        "generate --prompt x --chat --model {tiny.gguf} -n 2 --prompt-file {short.txt}",
        2,
        "cannot be used with",
    ),
    row("generate", 1, "--prompt"),
    // Tasks.
    row(
        "allocate --codebooks {books.safetensors} --bits 9 --out {new.safetensors}",
        1,
        "--bits 9: these codebooks give",
    ),
    row(
        "allocate --codebooks {books.safetensors} --probe-stages 0 --out {new.safetensors}",
        1,
        "--probe-stages 0",
    ),
    row(
        "allocate --codebooks /nonexistent.safetensors --out {new.safetensors}",
        1,
        "cannot read",
    ),
    row(
        "allocate --codebooks {books.safetensors} --out {afile}/x.safetensors",
        1,
        "is a file, not a folder",
    ),
    row(
        "needle --depths 1.5",
        1,
        "--depths 1.5: a depth is a fraction",
    ),
    row(
        "needle --lengths 100000",
        1,
        "--lengths 100000: longer than",
    ),
    row(
        "needle --trials 0",
        1,
        "at least one length, one depth and one trial",
    ),
    row("needle --cache q3_z", 1, "unknown cache type 'q3_z'"),
    row("mc --task nonexistent", 1, "unknown task 'nonexistent'"),
    row("mc --task arc_easy --variant nonsense", 1, "nonsense"),
    // Options out of range.
    row(
        "ppl --ctx 100000",
        1,
        "exceeds the model's context length 8192",
    ),
    row("ppl --ctx 1", 1, "too small"),
    row(
        "ppl --protocol llama.cpp --ctx 2 --max-tokens 64",
        1,
        "no token scored",
    ),
    row("ppl --protocol nonsense", 2, "nonsense"),
    row("ppl --weights bf8", 2, "bf8"),
    leaves_nothing(
        "calibrate --ctx 0 --tokens 2048 -C 256 --out {new.safetensors}",
        "--ctx 0",
        "new.safetensors",
    ),
    row("calibrate -C 1 --out {new.safetensors}", 1, "C = 1"),
    row("calibrate -d 48 --out {new.safetensors}", 1, "must divide"),
    row(
        "calibrate --dead-code-threshold NaN --out {new.safetensors}",
        1,
        "dead-code threshold NaN must be a finite count",
    ),
    row(
        "calibrate --decay 1.5 --out {new.safetensors}",
        1,
        "decay 1.5 must be in (0, 1)",
    ),
    row(
        "calibrate --batch 0 --out {new.safetensors}",
        1,
        "at least 1",
    ),
    row("calibrate -K 0 --out {new.safetensors}", 1, "K >= 1"),
    row(
        "calibrate --bits 9 --out {new.safetensors}",
        1,
        "--bits 9: 8 stages of 2048 codewords give 0.625 to 3.000 bits",
    ),
    row(
        "calibrate --quantize kvq --out {new.safetensors}",
        1,
        "--quantize kvq",
    ),
    row(
        "bench --cache f16 --ctx 64 --decode-steps 0 --in-process",
        1,
        "--decode-steps must be at least 1",
    ),
    row("bench nonsense", 1, "expected model, codec or serve"),
    row("bench serve --duration 0", 1, "--duration 0"),
    row("bench serve --clients 0", 1, "at least one client"),
    row("generate --prompt hi --top-p 1.5", 1, "--top-p 1.5"),
    row(
        "generate --prompt hi --temperature NaN",
        1,
        "--temperature NaN",
    ),
    row(
        "generate --prompt hi --temperature=-1",
        1,
        "--temperature -1",
    ),
    row(
        "finetune --weight-decay NaN --codebooks {books.safetensors} --out {tuned}",
        1,
        "--weight-decay NaN",
    ),
    row(
        "finetune --lr 0 --codebooks {books.safetensors} --out {tuned}",
        1,
        "learning rate",
    ),
    row(
        "finetune --weights-delta x --codebooks {books.safetensors} --out {tuned}",
        1,
        "--weights-delta is not supported",
    ),
    row("demo --max-tokens 0", 1, "--max-tokens 0"),
    row("synth --preset 70b", 1, "preset '70b'"),
    row("synth --type q3_z --out {new.gguf}", 1, "q3_z"),
    row("fetch everything", 1, "unknown asset"),
    row("serve --kv-budget 0", 2, "at least 1 byte"),
    row("serve --kv-budget lots", 2, "not a size"),
    row("serve --kv-budget 1TiB", 2, "not a size unit"),
    row("serve --port 70000", 2, "70000"),
    row("serve --prefill-chunk 0", 2, "0"),
    row("nonsense-command", 2, "unrecognized subcommand"),
    // Output paths, checked before the work.
    leaves_nothing(
        "calibrate --out {afile}/x.safetensors",
        "is a file, not a folder",
        "afile/x.safetensors",
    ),
    leaves_nothing(
        "calibrate --out {adir}",
        "is a folder; give a file path",
        "adir/.rvq-kv-write-probe",
    ),
    row(
        "compare --max-tokens 512 --cache f16 --plot /proc/rvq-kv.svg",
        1,
        "--plot /proc/rvq-kv.svg",
    ),
    leaves_nothing(
        "compare --max-tokens 512 --cache f16 --report {afile}/r.md",
        "is a file, not a folder",
        "afile/r.md",
    ),
    leaves_nothing(
        "finetune --codebooks {books.safetensors} --out {afile}/tuned",
        "is a file, not a folder",
        "afile/tuned.weights.safetensors",
    ),
    Row {
        args: "ppl --max-tokens 64",
        code: 1,
        needle: "is a file, not a folder",
        env: &[("RVQ_KV_HOME", "{afile}")],
        absent: None,
    },
];

/// `{name}` → the fixture's path.
fn expand(text: &str, f: &Fixtures) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let close = open + rest[open..].find('}').expect("a closing brace");
        out += &rest[..open];
        out += &match &rest[open + 1..close] {
            "@eval" => home()
                .join("text")
                .join("sotu-eval.txt")
                .to_string_lossy()
                .into_owned(),
            name => f.path(name),
        };
        rest = &rest[close + 1..];
    }
    out + rest
}

#[test]
fn every_bad_input_gets_a_clear_error_and_never_a_panic() {
    assert!(CATALOGUE.len() >= 60, "{} rows", CATALOGUE.len());
    let f = Fixtures::get();
    let mut failures = Vec::new();
    for row in CATALOGUE {
        let expanded = expand(row.args, f);
        let args: Vec<&str> = expanded.split(' ').collect();
        let env: Vec<(String, String)> = row
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), expand(v, f)))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, err) = rvq_kv(&args, &env);
        let mut problems = Vec::new();
        if code != row.code {
            problems.push(format!("exit {code}, expected {}", row.code));
        }
        if !err.contains(row.needle) {
            problems.push(format!("no '{}' in the message", row.needle));
        }
        if err.contains("panicked") || err.contains("stack backtrace") {
            problems.push("panicked or printed a backtrace".into());
        }
        if let Some(absent) = row.absent {
            if f.dir.path().join(absent).exists() || Path::new(absent).exists() {
                problems.push(format!("left {absent} behind"));
            }
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n{err}", row.args, problems.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
