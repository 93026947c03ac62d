//! Cache spec strings (`f32`, `f16`, …) → cache backends.

use crate::codebooks::Codebooks;
use crate::dense::{F16Cache, F32Cache};
use crate::rvq::{options, prepare_quantizer, RvqCache, RvqOptions};
use crate::scalar::{BlockCache, KiviCache, KiviOptions, ScalarFormat, StoredForm};
use crate::{CacheConfig, CacheError, KvCache};
use std::path::Path;
use std::sync::Arc;

/// The spec forms of the scalar caches, for help texts and errors.
const SCALAR_FORMS: &str = "f32, f16, q8_0|q4_0|int8|fp8[,rot][,post-rope], \
     tq:2|2.5|3|3.5|4[,post-rope], kivi2|kivi4[,group=G][,residual=R][,post-rope]";

/// What each scalar cache is, for `--help` (the RVQ options come from their declaration).
const SCALAR_HELP: &str = "  f32, f16                      dense (f16 = llama.cpp's default cache)
  q8_0, q4_0[,rot][,post-rope]  llama.cpp's block formats (8.5 / 4.5 bits); rot = its Hadamard
                                rotation, post-rope = keys stored after RoPE
  int8, fp8[,rot][,post-rope]   per-head-vector absmax int8 / E4M3 with an f16 scale
  tq:2|2.5|3|3.5|4[,post-rope]  TurboQuant: Hadamard-rotated head vector, f16 norm, each
                                coordinate by the sphere's Lloyd-Max quantizer (B bits)
  kivi2, kivi4[,group=G][,residual=R][,post-rope]
                                KIVI: keys per channel, values per token, the last R tokens in
                                f16 (defaults G=32, R=32)
";

/// Every spec form this build understands, for help texts and errors.
pub fn known_specs() -> String {
    format!("{SCALAR_FORMS}, {}", options::spec_form())
}

/// The cache specs explained, for `--help`.
pub fn help() -> String {
    format!(
        "{SCALAR_HELP}  {}\n                                codes from `rvq-kv calibrate`; options:\n{}",
        options::spec_form(),
        options::help(4, 96)
    )
}

/// Every scalar form in its canonical spelling, with each option at least once: the specs the
/// backend conformance suite (`tests/conformance.rs`) and the round trip below run through.
pub const SCALAR_EXAMPLES: [&str; 16] = [
    "f32",
    "f16",
    "q8_0",
    "q4_0,rot",
    "q4_0,rot,post-rope",
    "int8,post-rope",
    "fp8",
    "tq:2",
    "tq:2.5",
    "tq:3",
    "tq:3.5,post-rope",
    "tq:4",
    "kivi2,group=32,residual=32",
    "kivi4,group=32,residual=64",
    "kivi4,group=16,residual=64,post-rope",
    "q8_0,post-rope",
];

/// The scalar baselines `compare` runs by default, best quality first.
pub const SCALAR_BASELINES: [&str; 6] = ["q8_0", "int8", "fp8", "q4_0", "kivi4", "kivi2"];

/// Builds the cache a spec names for a model of the given geometry.
pub fn build(spec: &str, config: &CacheConfig) -> Result<Box<dyn KvCache>, CacheError> {
    let (kind, options) = spec.split_once(',').unwrap_or((spec, ""));
    let err = |reason: String| CacheError::Spec {
        spec: spec.to_string(),
        reason,
    };
    if let Some(path) = kind.strip_prefix("rvq:") {
        if path.trim().is_empty() {
            return Err(err(
                "rvq: needs its codebook file, as rvq:FILE.safetensors (from `rvq-kv calibrate`)"
                    .into(),
            ));
        }
        return build_rvq(path, options, config).map_err(|e| match e {
            CacheError::Spec { reason, .. } => err(reason),
            other => other,
        });
    }
    let (shape, rope) = (config.shape, config.rope.clone());
    let kind = kind.trim();
    let cache: Box<dyn KvCache> = match kind {
        "f32" | "f16" if !options.trim().is_empty() => {
            return Err(err(format!("{kind} takes no options")))
        }
        "f32" => Box::new(F32Cache::new(shape, rope)),
        "f16" => Box::new(F16Cache::new(shape, rope)),
        "kivi2" | "kivi4" => {
            let mut o = KiviOptions::new(if kind == "kivi2" { 2 } else { 4 });
            let form = parse_scalar_options(options, shape.head_dim, |key, value| match key {
                "group" => whole_number(key, value).map(|n| o.group = n),
                "residual" => whole_number(key, value).map(|n| o.residual = n),
                _ => Err(format!(
                    "unknown kivi option '{key}' (known: group=G, residual=R, rot, post-rope)"
                )),
            })
            .map_err(err)?;
            Box::new(KiviCache::new(shape, rope, o, form).map_err(err)?)
        }
        other => match ScalarFormat::parse(other) {
            Some(format) => {
                let known = if format.needs_rotation() {
                    "post-rope"
                } else {
                    "rot, post-rope"
                };
                let mut form = parse_scalar_options(options, shape.head_dim, |key, _| {
                    Err(format!("unknown {other} option '{key}' (known: {known})"))
                })
                .map_err(err)?;
                if format.needs_rotation() {
                    // The whole head vector, one Walsh-Hadamard transform (`check` wants a
                    // power of two).
                    format.check(shape.head_dim).map_err(err)?;
                    let whole = crate::hadamard::Hadamard::largest_block(shape.head_dim);
                    form.key_rotation = whole;
                    form.value_rotation = whole;
                }
                Box::new(BlockCache::new(shape, rope, format, form).map_err(err)?)
            }
            None => {
                return Err(err(format!(
                    "unknown cache type '{other}' (known: {})",
                    known_specs()
                )))
            }
        },
    };
    Ok(cache)
}

fn whole_number(key: &str, value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .map_err(|_| format!("{key}={value}: not a whole number"))
}

/// Parses the options of a scalar cache: the flags `rot` and `post-rope`, and `key=value` pairs
/// handed to `other`.
fn parse_scalar_options(
    options: &str,
    head_dim: usize,
    mut other: impl FnMut(&str, &str) -> Result<(), String>,
) -> Result<StoredForm, String> {
    let mut form = StoredForm::default();
    for opt in options.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match opt {
            "rot" => {
                let (k, v) = StoredForm::llama_cpp_rotation(head_dim)?;
                form.key_rotation = Some(k);
                form.value_rotation = Some(v);
            }
            "post-rope" => form.post_rope = true,
            _ => {
                let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
                other(key, value)?
            }
        }
    }
    Ok(form)
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
    let o = RvqOptions::parse(options).map_err(err)?;
    let id = config
        .model_id
        .as_ref()
        .ok_or_else(|| err("the rvq cache needs the model's identity".into()))?;
    // Each quantizer is prepared (truncated, put in f16) as it is read, so the f32 codebooks
    // are never all held next to their prepared form.
    let prepare = |q| prepare_quantizer(Arc::new(q), &o);
    let (meta, layers) = Codebooks::load_converted(Path::new(path), prepare)?;
    meta.check_model(id)?;
    let (shape, rope) = (config.shape, config.rope.clone());
    let cache = RvqCache::from_quantizers(shape, rope, &meta, layers, o, path.to_string())?;
    Ok(Box::new(cache))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CacheShape, Rope, RopeLayout};
    use std::sync::Arc;

    #[test]
    fn the_readme_lists_the_spec_forms_this_build_parses() {
        let readme = include_str!("../../../README.md");
        for form in known_specs().split(", ") {
            assert!(
                readme.contains(&format!("`{form}`")),
                "README.md does not list `{form}`"
            );
        }
    }

    #[test]
    fn builds_known_and_rejects_unknown() {
        let config = CacheConfig {
            shape: CacheShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 4,
            },
            rope: Arc::new(Rope::new(4, 10000.0, 8, RopeLayout::Interleaved).into()),
            model_id: None,
        };
        assert_eq!(build("f16", &config).unwrap().spec(), "f16");
        assert_eq!(build("f32", &config).unwrap().spec(), "f32");
        let e = build("q3_z", &config).err().unwrap().to_string();
        assert!(e.contains("unknown cache type 'q3_z'"), "{e}");
    }

    #[test]
    fn scalar_specs_round_trip_and_bad_options_are_named() {
        let config = CacheConfig {
            shape: CacheShape {
                layers: 1,
                kv_heads: 1,
                head_dim: 64,
            },
            rope: Arc::new(Rope::new(64, 10000.0, 8, RopeLayout::Interleaved).into()),
            model_id: None,
        };
        for spec in SCALAR_EXAMPLES {
            assert_eq!(build(spec, &config).unwrap().spec(), spec);
        }
        assert_eq!(build("tq:3,rot", &config).unwrap().spec(), "tq:3");
        assert_eq!(
            build("kivi2", &config).unwrap().spec(),
            "kivi2,group=32,residual=32"
        );
        for (spec, needle) in [
            ("q4_0,fast", "unknown q4_0 option 'fast'"),
            ("kivi2,group=0", "group=0"),
            ("kivi2,residual=-1", "residual=-1: not a whole number"),
            ("kivi4,residual=40", "multiple of group"),
            ("f16,rot", "f16 takes no options"),
            ("tq:5", "unknown cache type 'tq:5'"),
            ("tq:3,qjl", "unknown tq:3 option 'qjl' (known: post-rope)"),
        ] {
            let e = build(spec, &config).err().unwrap().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        let odd = CacheConfig {
            shape: CacheShape {
                head_dim: 48,
                ..config.shape
            },
            rope: Arc::new(Rope::new(48, 10000.0, 8, RopeLayout::Interleaved).into()),
            model_id: None,
        };
        let e = build("q8_0", &odd).err().unwrap().to_string();
        assert!(e.contains("multiple of 32"), "{e}");
        let e = build("int8,rot", &odd).err().unwrap().to_string();
        assert!(e.contains("multiple of 64"), "{e}");
    }
}
