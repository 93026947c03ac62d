//! Reading a GGUF file: metadata by key, weight matrices in their stored block format (memory
//! mapped) or dequantized to f32, other tensors dequantized to f32.

use crate::error::{LlmError, Result};
use crate::linear::Weight;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use quant::{QMatrix, WeightType};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How weight matrices are held in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsMode {
    /// In the file's block format, multiplied by integer kernels (types without one: f32).
    #[default]
    Native,
    /// Dequantized to f32 at load, multiplied by candle's f32 matmul: the reference.
    F32,
}

impl WeightsMode {
    /// The name `--weights` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::F32 => "f32",
        }
    }
}

impl std::str::FromStr for WeightsMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "native" => Ok(Self::Native),
            "f32" => Ok(Self::F32),
            _ => Err(format!("weights '{s}': expected native or f32")),
        }
    }
}

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
    /// The whole file, mapped when the first native weight matrix is read (f32 weights never
    /// map it): native matrices read their blocks from it.
    map: Option<Arc<memmap2::Mmap>>,
    mode: WeightsMode,
    /// Tensors that replace the file's (finetuned weights), by name; taken when read.
    overrides: HashMap<String, Tensor>,
    /// Weight matrices held as f32 in native mode (no integer kernel for their type).
    pub dequantized: Vec<(String, WeightType)>,
}

/// The weight type of a GGUF tensor, `None` for types we only dequantize (Q8_1).
fn weight_type(t: GgmlDType) -> Option<WeightType> {
    Some(match t {
        GgmlDType::F32 => WeightType::F32,
        GgmlDType::F16 => WeightType::F16,
        GgmlDType::BF16 => WeightType::BF16,
        GgmlDType::Q4_0 => WeightType::Q4_0,
        GgmlDType::Q4_1 => WeightType::Q4_1,
        GgmlDType::Q5_0 => WeightType::Q5_0,
        GgmlDType::Q5_1 => WeightType::Q5_1,
        GgmlDType::Q8_0 => WeightType::Q8_0,
        GgmlDType::Q8_1 => return None,
        GgmlDType::Q2K => WeightType::Q2K,
        GgmlDType::Q3K => WeightType::Q3K,
        GgmlDType::Q4K => WeightType::Q4K,
        GgmlDType::Q5K => WeightType::Q5K,
        GgmlDType::Q6K => WeightType::Q6K,
        GgmlDType::Q8K => WeightType::Q8K,
    })
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
            map: None,
            mode: WeightsMode::default(),
            overrides: HashMap::new(),
            dequantized: Vec::new(),
        })
    }

    /// The file mapped, populated at once: otherwise the first decode steps fault the weights
    /// in page by page (seconds for an 8B model).
    fn map(&mut self) -> Result<Arc<memmap2::Mmap>> {
        if let Some(map) = &self.map {
            return Ok(map.clone());
        }
        // SAFETY: the map is only read; a file truncated while mapped would fault (as in
        // llama.cpp, which maps model files the same way).
        let map = unsafe {
            memmap2::MmapOptions::new()
                .populate()
                .map(self.reader.get_ref())
        }
        .map_err(|source| LlmError::Open {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.map.insert(Arc::new(map)).clone())
    }

    /// How [`weight`](Self::weight) holds matrices from now on.
    pub fn set_weights_mode(&mut self, mode: WeightsMode) {
        self.mode = mode;
    }

    pub fn weights_mode(&self) -> WeightsMode {
        self.mode
    }

    /// A weight matrix [rows, cols] (candle order: [out, in]): in its stored block format in
    /// native mode when its type has an integer kernel, else dequantized to f32 (a weights
    /// delta's tensors are f32).
    pub fn weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        if self.mode == WeightsMode::F32 || self.overrides.contains_key(name) {
            return Ok(Weight::Dense(self.tensor_f32(name, &[rows, cols])?));
        }
        let err = |reason: String| LlmError::Tensor {
            name: name.to_string(),
            reason,
        };
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| err("not in the file".into()))?;
        if info.shape.dims() != [rows, cols] {
            return Err(err(format!(
                "shape {:?}, expected {:?}",
                info.shape.dims(),
                [rows, cols]
            )));
        }
        let ty = match weight_type(info.ggml_dtype) {
            Some(t) if t.has_kernel() => t,
            other => {
                if other != Some(WeightType::F32) {
                    let ty = other.unwrap_or(WeightType::F32);
                    self.dequantized.push((name.to_string(), ty));
                }
                return Ok(Weight::Dense(self.tensor_f32(name, &[rows, cols])?));
            }
        };
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| err("data offset out of range".into()))?;
        let bytes: quant::Bytes = self.map()?;
        let m = QMatrix::new(ty, rows, cols, bytes, start).map_err(|e| err(e.to_string()))?;
        Ok(Weight::Quant(m))
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

    /// Frees the tokenizer's metadata (`tokenizer.ggml.*`) once the tokenizer is built.
    pub fn drop_tokenizer_metadata(&mut self) {
        self.content
            .metadata
            .retain(|key, _| !key.starts_with("tokenizer.ggml."));
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
