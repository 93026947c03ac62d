//! A loaded model: architecture, tokenizer and identity, ready to build caches for.

use crate::delta::WeightsDelta;
use crate::error::{LlmError, Result};
use crate::gguf::{GgufFile, WeightsMode};
use crate::tokenizer::Tokenizer;
use crate::transformer::{ModelConfig, Transformer};
use crate::{gemma3, llama, qwen2};
use kvcache::{CacheConfig, CacheShape, KvCache, ModelIdentity};
use quant::WeightType;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn file_sha256(path: &Path) -> Result<String> {
    let open_err = |source| LlmError::Open {
        path: path.into(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(open_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(open_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub struct Model {
    pub path: PathBuf,
    pub architecture: String,
    pub net: Transformer,
    pub tokenizer: Tokenizer,
    pub weights_mode: WeightsMode,
    /// Weight matrices held as f32 in native mode, their types having no integer kernel.
    pub dequantized: Vec<(String, WeightType)>,
    sha256: OnceLock<String>,
}

impl Model {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with_delta(path, None)
    }

    /// Loads the model with finetuned tensors from a weights delta in place of the file's.
    pub fn load_with_delta(path: &Path, delta: Option<&WeightsDelta>) -> Result<Self> {
        Self::load_with(path, delta, WeightsMode::default())
    }

    /// Loads the model with its weight matrices held as `weights` says, and finetuned tensors
    /// from a weights delta (always f32) in place of the file's.
    pub fn load_with(
        path: &Path,
        delta: Option<&WeightsDelta>,
        weights: WeightsMode,
    ) -> Result<Self> {
        let mut gguf = GgufFile::open(path)?;
        gguf.set_weights_mode(weights);
        let sha256 = OnceLock::new();
        if let Some(d) = delta {
            let hash = file_sha256(path)?;
            if hash != d.model_sha256 {
                return Err(LlmError::Input(format!(
                    "the weights delta was trained from the model file with sha256 {}, not {} \
                     ({hash})",
                    d.model_sha256,
                    path.display()
                )));
            }
            let _ = sha256.set(hash);
            gguf.set_overrides(d.tensors.clone())?;
        }
        let architecture = gguf.string("general.architecture")?;
        let load_net = match architecture.as_str() {
            "llama" => llama::load,
            "qwen2" => qwen2::load,
            "gemma3" => gemma3::load,
            _ => return Err(LlmError::UnsupportedArchitecture(architecture)),
        };
        // The tokenizer before the weights, and its metadata (Gemma's 262,144 tokens and scores
        // as candle's values) dropped once it is built: held while the weights are paged in,
        // they and the tokenizer's construction made the peak of a load.
        let mut tokenizer = Tokenizer::from_gguf(&gguf)?;
        gguf.drop_tokenizer_metadata();
        let net = load_net(&mut gguf)?;
        if architecture == "gemma3" && tokenizer.chat_template.is_none() {
            tokenizer.chat_template = Some(gemma3::CHAT_TEMPLATE.to_string());
        }
        Ok(Self {
            path: path.into(),
            architecture,
            net,
            tokenizer,
            weights_mode: weights,
            dequantized: gguf.dequantized,
            sha256,
        })
    }

    pub fn cache_shape(&self) -> CacheShape {
        let c = &self.net.config;
        CacheShape {
            layers: c.layers,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        }
    }

    pub fn context_len(&self) -> usize {
        self.net.config.context_len
    }

    /// See [`Transformer::extend_context`]: positions past the trained context, for speed and
    /// memory measurements only.
    pub fn extend_context(&mut self, positions: usize) {
        self.net.extend_context(positions);
    }

    /// sha256 of the model file (computed once, on first use).
    pub fn file_sha256(&self) -> Result<String> {
        if let Some(s) = self.sha256.get() {
            return Ok(s.clone());
        }
        let hex = file_sha256(&self.path)?;
        Ok(self.sha256.get_or_init(|| hex).clone())
    }

    pub fn identity(&self) -> Result<ModelIdentity> {
        let s = self.cache_shape();
        Ok(ModelIdentity {
            architecture: self.architecture.clone(),
            layers: s.layers,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            file_sha256: self.file_sha256()?,
        })
    }

    /// What a cache backend needs; `with_identity` hashes the model file (for calibrated caches).
    pub fn cache_config(&self, with_identity: bool) -> Result<CacheConfig> {
        Ok(CacheConfig {
            shape: self.cache_shape(),
            rope: self.net.ropes().clone(),
            model_id: if with_identity {
                Some(self.identity()?)
            } else {
                None
            },
        })
    }

    /// Builds the cache a spec names for this model.
    pub fn new_cache(&self, spec: &str) -> Result<Box<dyn KvCache>> {
        let needs_identity = spec.starts_with("rvq");
        Ok(kvcache::spec::build(
            spec,
            &self.cache_config(needs_identity)?,
        )?)
    }

    pub fn forward(
        &self,
        tokens: &[u32],
        first_pos: usize,
        cache: &mut dyn KvCache,
        logit_rows: Option<usize>,
    ) -> Result<Vec<f32>> {
        self.net.forward(tokens, first_pos, cache, logit_rows)
    }

    /// See [`Transformer::forward_batch`]: one step of several sequences, the logits of each
    /// one's last token.
    pub fn forward_batch(&self, batch: &mut [crate::Sequence<'_>]) -> Result<Vec<Vec<f32>>> {
        self.net.forward_batch(batch)
    }

    /// See [`Transformer::forward_many`]: several sequences of any lengths in one pass, the
    /// logits of the last `logit_rows[i]` tokens of each.
    pub fn forward_many(
        &self,
        batch: &mut [crate::Sequence<'_>],
        logit_rows: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        self.net.forward_many(batch, logit_rows)
    }

    pub fn vocab(&self) -> usize {
        self.net.config.vocab
    }

    pub fn config(&self) -> &ModelConfig {
        &self.net.config
    }
}
