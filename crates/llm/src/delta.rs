//! Finetuned weights stored apart from the GGUF they change (`--weights-delta FILE`): f32
//! tensors under their GGUF names in a safetensors file whose metadata names the model file
//! (sha256) they were trained from.

use crate::error::{LlmError, Result};
use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

const FORMAT: &str = "rvq-kv weights delta";
const VERSION: &str = "1";

/// Replacement tensors by GGUF name ([out, in] like the GGUF's, f32).
#[derive(Clone, Debug)]
pub struct WeightsDelta {
    pub tensors: HashMap<String, Tensor>,
    /// sha256 of the GGUF file the weights were trained from.
    pub model_sha256: String,
}

impl WeightsDelta {
    /// Writes the delta atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |reason: String| LlmError::Delta {
            path: path.display().to_string(),
            reason,
        };
        let mut tensors = Vec::with_capacity(self.tensors.len());
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &self.tensors[name];
            let values = t.flatten_all()?.to_vec1::<f32>()?;
            tensors.push((
                name.clone(),
                rvq::io::f32_to_le_bytes(&values),
                t.dims().to_vec(),
            ));
        }
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("model_sha256".to_string(), self.model_sha256.clone()),
        ]);
        rvq::io::write_safetensors(path, &tensors, metadata).map_err(|e| err(e.to_string()))
    }

    /// Reads and validates a delta file (format, version, f32 tensors).
    pub fn load(path: &Path) -> Result<Self> {
        let err = |reason: String| LlmError::Delta {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(err("not an rvq-kv weights delta".into()));
        }
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(err(format!(
                "format version {:?}, this build reads {VERSION}",
                meta.get("version")
            )));
        }
        let model_sha256 = meta
            .get("model_sha256")
            .cloned()
            .ok_or_else(|| err("no model_sha256 in the metadata".into()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(format!("truncated or corrupted: {e}")))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(err(format!("tensor {name} is {:?}, not f32", view.dtype())));
            }
            let values = rvq::io::f32_from_le_bytes(view.data());
            if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
                return Err(err(format!(
                    "tensor {name} holds a non-finite value at {bad}"
                )));
            }
            let t = Tensor::from_vec(values, view.shape(), &Device::Cpu)?;
            tensors.insert(name, t);
        }
        if tensors.is_empty() {
            return Err(err("holds no tensors".into()));
        }
        Ok(Self {
            tensors,
            model_sha256,
        })
    }
}
