//! Cache spec strings (`f32`, `f16`, …) → cache backends.

use crate::codebooks::Codebooks;
use crate::dense::{F16Cache, F32Cache};
use crate::rvq_cache::{RvqCache, RvqOptions};
use crate::{CacheConfig, CacheError, KvCache};
use std::path::Path;
use std::sync::Arc;

/// Every spec form this build understands, for help texts and errors.
pub const KNOWN_SPECS: &str =
    "f32, f16, rvq:FILE.safetensors[,sinks=S][,recent=W][,beam=B][,only=k|v]";

/// Builds the cache a spec names for a model of the given geometry.
pub fn build(spec: &str, config: &CacheConfig) -> Result<Box<dyn KvCache>, CacheError> {
    let (kind, options) = spec.split_once(',').unwrap_or((spec, ""));
    let err = |reason: String| CacheError::Spec {
        spec: spec.to_string(),
        reason,
    };
    if let Some(path) = kind.strip_prefix("rvq:") {
        return build_rvq(path, options, config).map_err(|e| match e {
            CacheError::Spec { reason, .. } => err(reason),
            other => other,
        });
    }
    match kind.trim() {
        "f32" => Ok(Box::new(F32Cache::new(config.shape, config.rope.clone()))),
        "f16" => Ok(Box::new(F16Cache::new(config.shape, config.rope.clone()))),
        other => Err(err(format!(
            "unknown cache type '{other}' (known: {KNOWN_SPECS})"
        ))),
    }
}

fn build_rvq(
    path: &str,
    options: &str,
    config: &CacheConfig,
) -> Result<Box<dyn KvCache>, CacheError> {
    let err = |reason: String| CacheError::Spec {
        spec: String::new(),
        reason,
    };
    let mut o = RvqOptions::default();
    for opt in options.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = opt
            .split_once('=')
            .ok_or_else(|| err(format!("option '{opt}' is not key=value")))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| err(format!("{key}={value}: not a whole number")))
        };
        match key {
            "sinks" => o.sinks = number()?,
            "recent" => o.recent = number()?,
            "beam" => {
                o.beam = number()?;
                if o.beam == 0 {
                    return Err(err("beam must be at least 1".into()));
                }
            }
            "only" => match value {
                "k" => o.quantize_values = false,
                "v" => o.quantize_keys = false,
                _ => return Err(err(format!("only={value}: expected k or v"))),
            },
            _ => {
                return Err(err(format!(
                    "unknown rvq option '{key}' (known: sinks, recent, beam, only)"
                )))
            }
        }
    }
    let books = Codebooks::load(Path::new(path))?;
    let id = config
        .model_id
        .as_ref()
        .ok_or_else(|| err("the rvq cache needs the model's identity".into()))?;
    books.check_model(id)?;
    Ok(Box::new(RvqCache::new(
        config.shape,
        config.rope.clone(),
        Arc::new(books),
        o,
        path.to_string(),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CacheShape, Rope, RopeLayout};
    use std::sync::Arc;

    #[test]
    fn builds_known_and_rejects_unknown() {
        let config = CacheConfig {
            shape: CacheShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 4,
            },
            rope: Arc::new(Rope::new(4, 10000.0, 8, RopeLayout::Interleaved)),
            model_id: None,
        };
        assert_eq!(build("f16", &config).unwrap().spec(), "f16");
        assert_eq!(build("f32", &config).unwrap().spec(), "f32");
        let e = build("q3_z", &config).err().unwrap().to_string();
        assert!(e.contains("unknown cache type 'q3_z'"), "{e}");
    }
}
