//! Reading a GGUF file: metadata by key, tensors dequantized to f32.

use crate::error::{LlmError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
    /// Tensors that replace the file's (finetuned weights), by name; taken when read.
    overrides: HashMap<String, Tensor>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| LlmError::Open {
            path: path.into(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| LlmError::NotGguf {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: path.into(),
            content,
            reader,
            overrides: HashMap::new(),
        })
    }

    /// Makes `tensor_f32` return these tensors instead of the file's. Each must name a tensor
    /// of the file; shapes are checked when read.
    pub fn set_overrides(&mut self, overrides: HashMap<String, Tensor>) -> Result<()> {
        if let Some(name) = overrides.keys().find(|n| !self.has_tensor(n)) {
            return Err(LlmError::Tensor {
                name: name.clone(),
                reason: "the weights delta replaces a tensor the model does not have".into(),
            });
        }
        self.overrides = overrides;
        Ok(())
    }

    pub fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| LlmError::Metadata(format!("missing key '{key}'")))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        let v = self.value(key)?;
        v.to_string()
            .cloned()
            .map_err(|_| LlmError::Metadata(format!("'{key}' is not a string")))
    }

    /// An unsigned integer of any GGUF width.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            _ => {
                return Err(LlmError::Metadata(format!(
                    "'{key}' is not an unsigned integer"
                )))
            }
        };
        Ok(n as usize)
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        match self.value(key)? {
            Value::F32(x) => Ok(*x),
            Value::F64(x) => Ok(*x as f32),
            _ => Err(LlmError::Metadata(format!("'{key}' is not a float"))),
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor dequantized to f32, checked against the expected shape (candle order: [out, in]).
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let err = |reason: String| LlmError::Tensor {
            name: name.to_string(),
            reason,
        };
        if let Some(t) = self.overrides.get(name) {
            if t.dims() != shape {
                return Err(err(format!(
                    "the weights delta's shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            return Ok(t.clone());
        }
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| err(e.to_string()))?;
        if q.shape().dims() != shape {
            return Err(err(format!(
                "shape {:?}, expected {shape:?}",
                q.shape().dims()
            )));
        }
        let t = q.dequantize(&Device::Cpu).map_err(|e| err(e.to_string()))?;
        Ok(t)
    }
}
