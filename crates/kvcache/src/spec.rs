//! Cache spec strings (`f32`, `f16`, …) → cache backends.

use crate::dense::{F16Cache, F32Cache};
use crate::{CacheConfig, CacheError, KvCache};

/// Every spec form this build understands, for help texts and errors.
pub const KNOWN_SPECS: &str = "f32, f16";

/// Builds the cache a spec names for a model of the given geometry.
pub fn build(spec: &str, config: &CacheConfig) -> Result<Box<dyn KvCache>, CacheError> {
    let (kind, _options) = spec.split_once(',').unwrap_or((spec, ""));
    let err = |reason: String| CacheError::Spec {
        spec: spec.to_string(),
        reason,
    };
    match kind.trim() {
        "f32" => Ok(Box::new(F32Cache::new(config.shape, config.rope.clone()))),
        "f16" => Ok(Box::new(F16Cache::new(config.shape, config.rope.clone()))),
        other => Err(err(format!(
            "unknown cache type '{other}' (known: {KNOWN_SPECS})"
        ))),
    }
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
