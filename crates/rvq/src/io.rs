//! Saving and loading quantizers as safetensors: tensors `{prefix}stage.{k}` ([C, d], f32) and
//! JSON metadata in the header. Writes go through a temporary file and a rename.

use crate::{Result, Rvq, RvqError};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

/// f32 values as the little-endian bytes safetensors stores.
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian f32 bytes (a safetensors F32 view's data) back to values.
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Tensors of one quantizer under `prefix`, as (name, little-endian f32 bytes, shape).
pub fn tensors(rvq: &Rvq, prefix: &str) -> Vec<(String, Vec<u8>, Vec<usize>)> {
    (0..rvq.stages())
        .map(|k| {
            let bytes = f32_to_le_bytes(rvq.codebook(k));
            (
                format!("{prefix}stage.{k}"),
                bytes,
                vec![rvq.size(), rvq.dim()],
            )
        })
        .collect()
}

/// Reads the quantizer with `stages` stages stored under `prefix`, validating every tensor.
pub fn from_safetensors(st: &SafeTensors, prefix: &str, stages: usize, path: &str) -> Result<Rvq> {
    let err = |reason: String| RvqError::File {
        path: path.to_string(),
        reason,
    };
    let mut codebooks = Vec::with_capacity(stages);
    let mut shape: Option<(usize, usize)> = None;
    for k in 0..stages {
        let name = format!("{prefix}stage.{k}");
        let t = st
            .tensor(&name)
            .map_err(|e| err(format!("tensor {name}: {e}")))?;
        if t.dtype() != Dtype::F32 || t.shape().len() != 2 {
            return Err(err(format!(
                "tensor {name}: expected a 2-D f32 tensor, got {:?} {:?}",
                t.dtype(),
                t.shape()
            )));
        }
        let s = (t.shape()[0], t.shape()[1]);
        if shape.is_some_and(|p| p != s) {
            return Err(err(format!(
                "tensor {name}: shape {s:?} differs from stage 0's {shape:?}"
            )));
        }
        shape = Some(s);
        codebooks.push(f32_from_le_bytes(t.data()));
    }
    let (size, dim) = shape.ok_or_else(|| err("no stages".into()))?;
    Rvq::from_codebooks(dim, size, codebooks).map_err(|e| err(format!("{prefix}*: {e}")))
}

/// Serializes named tensors with `metadata` and writes them atomically to `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<u8>, Vec<usize>)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let perr = |reason: String| RvqError::File {
        path: path.display().to_string(),
        reason,
    };
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, bytes, shape)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| perr(e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| perr(e.to_string()))?;
    write_atomic(path, &bytes).map_err(|e| perr(e.to_string()))
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", unique_suffix()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The JSON metadata of a safetensors file, after checking its `format` and `format_version`.
pub fn checked_metadata(
    bytes: &[u8],
    format: &str,
    version: u32,
) -> std::result::Result<HashMap<String, String>, String> {
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a valid safetensors file (truncated or corrupted?): {e}"))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(format) {
        return Err(format!("not an {format} file"));
    }
    if meta.get("format_version").map(String::as_str) != Some(&version.to_string()) {
        return Err(format!(
            "format version {:?}; this build reads {version}",
            meta.get("format_version")
        ));
    }
    Ok(meta)
}

/// A suffix no other writer (process or thread) uses at the same time.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub const FORMAT: &str = "rvq-codebooks";
pub const VERSION: u32 = 1;

impl Rvq {
    /// Saves this quantizer alone (plus caller metadata such as a training report).
    pub fn save(&self, path: &Path, extra: HashMap<String, String>) -> Result<()> {
        let mut meta = extra;
        meta.insert("format".into(), FORMAT.into());
        meta.insert("format_version".into(), VERSION.to_string());
        meta.insert("stages".into(), self.stages().to_string());
        write_safetensors(path, &tensors(self, ""), meta)
    }

    /// Loads a quantizer written by [`Rvq::save`]; returns it with the file's metadata.
    pub fn load(path: &Path) -> Result<(Rvq, HashMap<String, String>)> {
        let p = path.display().to_string();
        let err = |reason: String| RvqError::File {
            path: p.clone(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let meta = checked_metadata(&bytes, FORMAT, VERSION).map_err(err)?;
        let stages: usize = meta
            .get("stages")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err("metadata lacks a stage count".into()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("truncated or corrupted: {e}")))?;
        if st.len() != stages {
            return Err(err(format!("{} tensors for {stages} stages", st.len())));
        }
        Ok((from_safetensors(&st, "", stages, &p)?, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantizer() -> Rvq {
        Rvq::from_codebooks(2, 3, vec![vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], vec![0.5; 6]]).unwrap()
    }

    #[test]
    fn save_load_round_trip_and_rejections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.safetensors");
        let q = quantizer();
        q.save(
            &path,
            HashMap::from([("note".to_string(), "x".to_string())]),
        )
        .unwrap();
        let (back, meta) = Rvq::load(&path).unwrap();
        assert_eq!(back, q);
        assert_eq!(meta["note"], "x");
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let bytes = std::fs::read(&path).unwrap();
        let truncated = dir.path().join("t.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 5]).unwrap();
        assert!(Rvq::load(&truncated)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated or corrupted"));
        let junk = dir.path().join("j.safetensors");
        std::fs::write(&junk, b"hello").unwrap();
        assert!(Rvq::load(&junk)
            .err()
            .unwrap()
            .to_string()
            .contains("not a valid safetensors"));
        // A NaN codeword is rejected on load.
        let mut bad = quantizer();
        bad.codebook_mut(1)[0] = f32::NAN;
        let nan = dir.path().join("n.safetensors");
        let mut meta = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("format_version".into(), VERSION.to_string());
        meta.insert("stages".into(), "2".into());
        write_safetensors(&nan, &tensors(&bad, ""), meta).unwrap();
        assert!(Rvq::load(&nan)
            .err()
            .unwrap()
            .to_string()
            .contains("non-finite"));
    }
}
