//! What every cache backend must do, checked the same way for each: every form in
//! `kvcache::spec::SCALAR_EXAMPLES` runs through it, and a backend with learned state joins with
//! a test like `the_rvq_backend_conforms`.
//!
//! - its spec parses back to itself;
//! - after appends of uneven sizes, `len`, `memory()` (bytes and elements) and `bytes_at` agree;
//! - reads outside what is stored are errors, not panics or garbage;
//! - `attend` equals ordinary attention over the K/V the cache reads back (its own error is the
//!   format's business; attending on the compressed form must add none), for decode-step and
//!   prefill-shaped queries;
//! - `truncate(n)` keeps positions `..n` as they read (to f16 rounding), within `bytes_at(n)`,
//!   and takes appends again; `truncate(0)` is a fresh cache;
//! - `forget_before` changes no position it keeps and never grows the cache.

use kvcache::attention::dense_attention;
use kvcache::spec::{build, SCALAR_EXAMPLES};
use kvcache::{CacheConfig, CacheShape, KvCache, ModelIdentity, Part, Queries, Rope, RopeLayout};
use rvq::rng::SplitMix64;
use std::sync::Arc;

const SHAPE: CacheShape = CacheShape {
    layers: 2,
    kv_heads: 2,
    head_dim: 64,
};
const Q_HEADS: usize = 4;
/// Appended in these steps: single tokens (decode), odd and block-sized chunks (prefill).
const STEPS: [usize; 7] = [1, 7, 30, 1, 33, 64, 5];

fn identity() -> ModelIdentity {
    ModelIdentity {
        architecture: "llama".into(),
        layers: SHAPE.layers,
        kv_heads: SHAPE.kv_heads,
        head_dim: SHAPE.head_dim,
        file_sha256: "ab".repeat(32),
    }
}

fn config() -> CacheConfig {
    let rope = Rope::new(SHAPE.head_dim, 10_000.0, 512, RopeLayout::Interleaved);
    CacheConfig {
        shape: SHAPE,
        rope: Arc::new(rope.into()),
        model_id: Some(identity()),
    }
}

/// Keys and values per layer: [positions, kv_heads, head_dim] each.
struct Stored {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl Stored {
    fn random(positions: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let n = positions * SHAPE.kv_heads * SHAPE.head_dim;
        let mut part = || -> Vec<Vec<f32>> {
            (0..SHAPE.layers)
                .map(|_| (0..n).map(|_| rng.normal()).collect())
                .collect()
        };
        Self {
            keys: part(),
            values: part(),
        }
    }

    /// Appends positions `range` of every layer.
    fn append_to(&self, cache: &mut dyn KvCache, range: std::ops::Range<usize>) {
        let row = SHAPE.kv_heads * SHAPE.head_dim;
        let span = range.start * row..range.end * row;
        for layer in 0..SHAPE.layers {
            let (k, v) = (
                &self.keys[layer][span.clone()],
                &self.values[layer][span.clone()],
            );
            cache.append(layer, k, v).unwrap();
        }
    }
}

/// Everything a cache reads back for `positions`: per layer, part and head.
fn read_all(cache: &dyn KvCache, positions: std::ops::Range<usize>) -> Vec<f32> {
    let mut all = Vec::new();
    let mut out = vec![0f32; positions.len() * SHAPE.head_dim];
    for layer in 0..SHAPE.layers {
        for part in [Part::Keys, Part::Values] {
            for head in 0..SHAPE.kv_heads {
                cache
                    .read(layer, head, part, positions.clone(), &mut out)
                    .unwrap();
                all.extend_from_slice(&out);
            }
        }
    }
    all
}

fn conforms(spec: &str) {
    let config = config();
    let fresh = || build(spec, &config).unwrap();
    let mut cache = fresh();
    assert_eq!(
        build(&cache.spec(), &config).unwrap().spec(),
        cache.spec(),
        "{spec}"
    );
    assert_eq!(cache.bytes_at(0), 0, "{spec}");

    let total: usize = STEPS.iter().sum();
    let stored = Stored::random(total, 5);
    let mut len = 0;
    for step in STEPS {
        stored.append_to(cache.as_mut(), len..len + step);
        len += step;
        let memory = cache.memory();
        assert_eq!(cache.len(1), len, "{spec}");
        assert_eq!(cache.bytes_at(len), memory.bytes, "{spec} at {len}");
        let elements = (len * SHAPE.layers * SHAPE.kv_heads * SHAPE.head_dim * 2) as u64;
        assert_eq!(memory.elements, elements, "{spec} at {len}");
    }

    let mut out = vec![0f32; SHAPE.head_dim];
    for (layer, head, positions, why) in [
        (0, 0, len..len + 1, "past the end"),
        (SHAPE.layers, 0, 0..1, "no such layer"),
        (0, SHAPE.kv_heads, 0..1, "no such head"),
    ] {
        let r = cache.read(layer, head, Part::Keys, positions, &mut out);
        assert!(r.is_err(), "{spec}: a read {why} succeeded");
    }
    let r = cache.read(0, 0, Part::Values, 0..2, &mut out);
    assert!(
        r.is_err(),
        "{spec}: a read into a too-short buffer succeeded"
    );

    attends_as_it_reads(spec, cache.as_ref(), len);

    for keep in [0, 1, 40, len - 3] {
        let mut cut = cache.box_clone();
        cut.truncate(keep);
        assert_eq!(cut.len(0), keep, "{spec}");
        // Exactly, but for KIVI, whose partial groups go back to its f16 tail: f16 rounding of
        // each head vector (post-RoPE keys are rounded rotated, so relative to the vector).
        let (now, then) = (
            read_all(cut.as_ref(), 0..keep),
            read_all(cache.as_ref(), 0..keep),
        );
        let hd = SHAPE.head_dim;
        for (a, b) in now.chunks(hd).zip(then.chunks(hd)) {
            let top = b.iter().fold(0f32, |m, x| m.max(x.abs()));
            let moved = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                moved <= top / 1024.0,
                "{spec}: truncating to {keep} moved a kept vector by {moved} (largest {top})"
            );
        }
        // A window that had already encoded a position cannot give back its f16 form, so a
        // truncated cache may hold fewer bytes than a fresh one of the same length; never more.
        assert!(
            cut.memory().bytes <= cut.bytes_at(keep),
            "{spec} truncated to {keep}"
        );
        stored.append_to(cut.as_mut(), keep..len);
        assert_eq!(
            cut.len(1),
            len,
            "{spec}: appending after truncating to {keep}"
        );
    }
    let mut emptied = cache.box_clone();
    emptied.truncate(0);
    assert_eq!(
        emptied.memory(),
        fresh().memory(),
        "{spec}: truncate(0) is not a fresh cache"
    );
    stored.append_to(emptied.as_mut(), 0..len);
    assert!(
        read_all(emptied.as_ref(), 0..len) == read_all(cache.as_ref(), 0..len),
        "{spec}: refilled after truncate(0), it reads otherwise than the first time"
    );
    let before = read_all(cache.as_ref(), 100..len);
    let bytes = cache.memory().bytes;
    for layer in 0..SHAPE.layers {
        cache.forget_before(layer, 100);
    }
    assert!(
        read_all(cache.as_ref(), 100..len) == before,
        "{spec}: forgetting changed kept positions"
    );
    assert!(
        cache.memory().bytes <= bytes,
        "{spec}: forgetting grew the cache"
    );
}

/// `attend` against dense attention over what `cache` reads back, for the last 3 positions (a
/// decode step of a few tokens) and for every position (a prefill), with and without a window.
fn attends_as_it_reads(spec: &str, cache: &dyn KvCache, len: usize) {
    let mut rng = SplitMix64::new(9);
    let row = Q_HEADS * SHAPE.head_dim;
    let q: Vec<f32> = (0..len * row).map(|_| rng.normal()).collect();
    for (first, window) in [(len - 3, None), (0, None), (0, Some(40))] {
        let queries = Queries {
            q: &q[first * row..],
            tokens: len - first,
            q_heads: Q_HEADS,
            first_pos: first,
            scale: 1.0 / (SHAPE.head_dim as f32).sqrt(),
            window,
        };
        for layer in 0..SHAPE.layers {
            let mut got = vec![0f32; queries.tokens * row];
            let mut want = got.clone();
            cache.attend(layer, &queries, &mut got).unwrap();
            dense_attention(cache, layer, &queries, &mut want).unwrap();
            let top = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Outputs are weighted means of values of magnitude ~1: sums in another order,
            // f16 windows and i8 codebook sums stay far below this.
            assert!(
                worst <= 1e-3 * top.max(1.0),
                "{spec} layer {layer}, queries from {first}, window {window:?}: attend is \
                 {worst} from dense attention over its reads"
            );
        }
    }
}

#[test]
fn every_scalar_backend_conforms() {
    for spec in SCALAR_EXAMPLES {
        conforms(spec);
    }
}

#[test]
fn the_rvq_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("books.safetensors");
    let mut rng = SplitMix64::new(3);
    let books = kvcache::testkit::codebooks_for(identity(), 32, || {
        rvq::testkit::random_rvq(&mut rng, 32, 64, 3)
    });
    books.save(&path).unwrap();
    let file = path.display();
    for options in [
        "",
        ",sinks=4,recent=16",
        ",books=f32,beam=2",
        ",beam=2,beam-layers=1",
        ",only=k",
        ",stages=2",
    ] {
        conforms(&format!("rvq:{file}{options}"));
    }
}
