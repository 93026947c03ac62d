//! Uncompressed caches: `f32` (exact) and `f16` (llama.cpp's default cache type).

use crate::attention::{self, Queries};
use crate::{
    check_append, check_read, dense_fused, CacheError, CacheShape, KvCache, LayerRopes,
    MemoryReport, Part, Rope,
};
use half::f16;
use std::ops::Range;
use std::sync::Arc;

/// An element type a dense cache can store: a [`LaneWord`](rvq::lanes::LaneWord) (f32, f16),
/// so the fused kernels load it, with a name and a fast slice conversion.
pub trait DenseElement: rvq::lanes::LaneWord {
    const NAME: &'static str;
    /// `dst[i] = src[i].to_f32()`, vectorized where the type allows.
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

impl DenseElement for f32 {
    const NAME: &'static str = "f32";
}

impl DenseElement for f16 {
    const NAME: &'static str = "f16";
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        // F16C, 8 values per instruction, where the CPU has it (`half`'s slice conversion calls
        // a function per 8 values: the f16 cache's reads spent a fifth of attention in it).
        rvq::codec::f16_to_f32(src, dst);
    }
}

/// Keys and values stored as they come, one contiguous [tokens, head_dim] run per layer and head.
#[derive(Clone)]
pub struct DenseCache<E: DenseElement> {
    shape: CacheShape,
    rope: Arc<LayerRopes>,
    // [layers * kv_heads] of [tokens, head_dim]
    keys: Vec<Vec<E>>,
    values: Vec<Vec<E>>,
    lens: Vec<usize>,
    /// [layers]: positions dropped from the front (sliding-window layers); the runs hold
    /// positions `forgotten[l]..lens[l]`.
    forgotten: Vec<usize>,
}

pub type F32Cache = DenseCache<f32>;
pub type F16Cache = DenseCache<f16>;

impl<E: DenseElement> DenseCache<E> {
    pub fn new(shape: CacheShape, rope: Arc<LayerRopes>) -> Self {
        let slots = shape.layers * shape.kv_heads;
        Self {
            shape,
            rope,
            keys: vec![Vec::new(); slots],
            values: vec![Vec::new(); slots],
            lens: vec![0; shape.layers],
            forgotten: vec![0; shape.layers],
        }
    }

    fn slot(&self, layer: usize, head: usize) -> usize {
        layer * self.shape.kv_heads + head
    }
}

fn read_rows<E: DenseElement>(src: &[E], hd: usize, positions: Range<usize>, out: &mut [f32]) {
    E::to_f32_slice(&src[positions.start * hd..positions.end * hd], out);
}

impl<E: DenseElement> KvCache for DenseCache<E> {
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn rope(&self, layer: usize) -> &Rope {
        self.rope.layer(layer)
    }
    fn spec(&self) -> String {
        E::NAME.to_string()
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), CacheError> {
        let tokens = check_append(&self.shape, layer, k, v)?;
        let (heads, hd) = (self.shape.kv_heads, self.shape.head_dim);
        for t in 0..tokens {
            for h in 0..heads {
                let src = (t * heads + h) * hd;
                let slot = self.slot(layer, h);
                self.keys[slot].extend(k[src..src + hd].iter().map(|&x| E::from_f32(x)));
                self.values[slot].extend(v[src..src + hd].iter().map(|&x| E::from_f32(x)));
            }
        }
        self.lens[layer] += tokens;
        Ok(())
    }

    fn len(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }

    fn read(
        &self,
        layer: usize,
        head: usize,
        part: Part,
        positions: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        check_read(&self.shape, self.len(layer), layer, head, &positions, out)?;
        let first = self.forgotten[layer];
        if positions.start < first {
            return Err(CacheError::Shape(format!(
                "positions {positions:?} of layer {layer} were dropped (sliding window: \
                 positions before {first} are gone)"
            )));
        }
        let positions = positions.start - first..positions.end - first;
        let runs = match part {
            Part::Keys => &self.keys,
            Part::Values => &self.values,
        };
        read_rows(
            &runs[self.slot(layer, head)],
            self.shape.head_dim,
            positions,
            out,
        );
        Ok(())
    }

    /// A decode step's few rows through [`dense_fused`] (keys rotated and dotted, values
    /// weighed, in registers); more rows, and heads it does not take, through the generic path.
    fn attend(&self, layer: usize, queries: &Queries, out: &mut [f32]) -> Result<(), CacheError> {
        let hd = self.shape.head_dim;
        let rope = self.rope.layer(layer);
        if !dense_fused::fuses(rope) || layer >= self.shape.layers {
            return attention::dense_attention(self, layer, queries, out);
        }
        // Run `h` of `part` over `positions` (checked against what the layer still holds).
        let run = |part: Part, h: usize, positions: &std::ops::Range<usize>| {
            let first = self.forgotten[layer];
            if positions.start < first || positions.end > self.lens[layer] {
                return Err(CacheError::Shape(format!(
                    "positions {positions:?} of layer {layer} are not held (held: {first}..{})",
                    self.lens[layer]
                )));
            }
            let runs = match part {
                Part::Keys => &self.keys,
                Part::Values => &self.values,
            };
            let run = &runs[self.slot(layer, h)];
            Ok(&run[(positions.start - first) * hd..(positions.end - first) * hd])
        };
        let score = |h: usize, q: &[f32], span: std::ops::Range<usize>, scores: &mut [f32]| {
            if q.len() / hd > dense_fused::FUSED_ROWS {
                return attention::dense_key_scores(self, layer, h, q, span, scores);
            }
            let keys = run(Part::Keys, h, &span)?;
            dense_fused::key_scores(keys, rope, span.start, q, scores, span.len());
            Ok(())
        };
        let reduce = |h: usize, probs: &[f32], first_key: usize, n: usize, o: &mut [f32]| {
            if o.len() / hd > dense_fused::FUSED_ROWS {
                return attention::dense_values(self, layer, h, probs, first_key, n, hd, o);
            }
            let values = run(Part::Values, h, &(first_key..first_key + n))?;
            dense_fused::weighted_values(values, hd, probs, o);
            Ok(())
        };
        attention::attention_with(self, layer, queries, out, &score, &reduce)
    }

    fn memory(&self) -> MemoryReport {
        let stored: usize = self.keys.iter().chain(&self.values).map(Vec::len).sum();
        MemoryReport {
            elements: stored as u64,
            bytes: (stored * std::mem::size_of::<E>()) as u64,
            fixed_bytes: 0,
        }
    }

    fn bytes_at(&self, tokens: usize) -> u64 {
        let s = &self.shape;
        (s.layers * s.kv_heads * s.head_dim * 2 * tokens * std::mem::size_of::<E>()) as u64
    }

    fn truncate(&mut self, len: usize) {
        let (heads, hd) = (self.shape.kv_heads, self.shape.head_dim);
        for layer in 0..self.shape.layers {
            let first = self.forgotten[layer].min(len);
            self.forgotten[layer] = first;
            self.lens[layer] = self.lens[layer].min(len);
            for h in 0..heads {
                let slot = self.slot(layer, h);
                self.keys[slot].truncate((len - first) * hd);
                self.values[slot].truncate((len - first) * hd);
            }
        }
    }

    fn forget_before(&mut self, layer: usize, pos: usize) {
        let Some(&first) = self.forgotten.get(layer) else {
            return;
        };
        let pos = pos.min(self.lens[layer]);
        if pos <= first {
            return;
        }
        let drop = (pos - first) * self.shape.head_dim;
        for h in 0..self.shape.kv_heads {
            let slot = self.slot(layer, h);
            self.keys[slot].drain(..drop);
            self.values[slot].drain(..drop);
        }
        self.forgotten[layer] = pos;
    }

    fn box_clone(&self) -> Box<dyn KvCache> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::reference_attention_from;
    use crate::{attention, Queries, RopeLayout};

    fn shape() -> CacheShape {
        CacheShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 8,
        }
    }

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + seed) * 0.731).sin()).collect()
    }

    /// Slow reference: attention of queries at positions 0.. with explicit loops in f64.
    fn reference_attention(
        k: &[f32],
        v: &[f32],
        q: &[f32],
        rope: &Rope,
        s: CacheShape,
        q_heads: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        reference_attention_from(k, v, q, 0, rope, s, q_heads, window)
    }

    #[test]
    fn sliding_window_layers_forget_what_no_query_sees() {
        let (s, window, tokens, q_heads) = (shape(), 3, 8, 4);
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(8, 10000.0, 64, RopeLayout::HalfSplit).into());
        let row = s.kv_heads * s.head_dim;
        let (k, v) = (data(tokens * row, 1.0), data(tokens * row, 4.0));
        let q = data(tokens * q_heads * 8, 9.0);
        let want = reference_attention(&k, &v, &q, rope.layer(1), s, q_heads, Some(window));
        // Prefill 2 tokens, then decode one at a time, forgetting as the model does.
        let mut cache = F16Cache::new(s, rope.clone());
        let mut pos = 0;
        for n in [2, 1, 1, 1, 1, 1, 1] {
            cache
                .append(
                    1,
                    &k[pos * row..(pos + n) * row],
                    &v[pos * row..(pos + n) * row],
                )
                .unwrap();
            let qs = &q[pos * q_heads * 8..(pos + n) * q_heads * 8];
            let mut out = vec![0f32; qs.len()];
            let queries = Queries {
                q: qs,
                tokens: n,
                q_heads,
                first_pos: pos,
                scale: 1.0 / 8f32.sqrt(),
                window: Some(window),
            };
            cache.attend(1, &queries, &mut out).unwrap();
            cache.forget_before(1, (pos + n + 1).saturating_sub(window));
            for (a, b) in out.iter().zip(&want[pos * q_heads * 8..]) {
                assert!((a - b).abs() < 2e-3, "pos {pos}: {a} vs {b}");
            }
            pos += n;
        }
        assert_eq!(cache.len(1), tokens);
        // Positions 6 and 7 are all the next query needs; 0..6 are gone and reported so.
        assert_eq!(cache.memory().elements, (2 * row * 2) as u64);
        let mut buf = vec![0f32; 8];
        let e = cache.read(1, 0, Part::Keys, 5..6, &mut buf).unwrap_err();
        assert!(e.to_string().contains("dropped"), "{e}");
        cache.read(1, 1, Part::Values, 7..8, &mut buf).unwrap();
        assert_eq!(
            buf,
            v[7 * row + 8..8 * row]
                .iter()
                .map(|&x| f16::from_f32(x).to_f32())
                .collect::<Vec<_>>()
        );
        // Truncating below the forgotten part leaves an empty, consistent layer.
        cache.truncate(4);
        assert_eq!((cache.len(1), cache.memory().elements), (4, 0));
    }

    #[test]
    fn f32_cache_attention_matches_reference_in_prefill_and_decode() {
        let s = shape();
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(8, 10000.0, 64, RopeLayout::Interleaved).into());
        let tokens = 5;
        let k = data(tokens * 16, 0.0);
        let v = data(tokens * 16, 3.0);
        let q_heads = 4;
        let q = data(tokens * q_heads * 8, 7.0);
        // Prefill all 5 at once.
        let mut cache = F32Cache::new(s, rope.clone());
        cache.append(1, &k, &v).unwrap();
        let mut out = vec![0f32; q.len()];
        let queries = Queries {
            q: &q,
            tokens,
            q_heads,
            first_pos: 0,
            scale: 1.0 / 8f32.sqrt(),
            window: None,
        };
        cache.attend(1, &queries, &mut out).unwrap();
        let want = reference_attention(&k, &v, &q, rope.layer(1), s, q_heads, None);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Decode the same tokens one at a time: same outputs.
        let mut inc = F32Cache::new(s, rope.clone());
        for t in 0..tokens {
            inc.append(1, &k[t * 16..(t + 1) * 16], &v[t * 16..(t + 1) * 16])
                .unwrap();
            let qt = &q[t * q_heads * 8..(t + 1) * q_heads * 8];
            let mut o = vec![0f32; qt.len()];
            let queries = Queries {
                q: qt,
                tokens: 1,
                q_heads,
                first_pos: t,
                scale: 1.0 / 8f32.sqrt(),
                window: None,
            };
            attention::dense_attention(&inc, 1, &queries, &mut o).unwrap();
            for (a, b) in o.iter().zip(&want[t * q_heads * 8..]) {
                assert!((a - b).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn attention_across_several_key_and_query_blocks_matches_reference() {
        let s = shape();
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(8, 10000.0, 1024, RopeLayout::HalfSplit).into());
        let tokens = 2 * attention::KEY_BLOCK + 37;
        let round =
            |x: Vec<f32>| -> Vec<f32> { x.iter().map(|&a| f16::from_f32(a).to_f32()).collect() };
        let (k, v) = (round(data(tokens * 16, 0.5)), round(data(tokens * 16, 2.5)));
        let q = data(tokens * 4 * 8, 4.0);
        let want = reference_attention(&k, &v, &q, rope.layer(1), s, 4, None);
        for mut cache in [
            Box::new(F32Cache::new(s, rope.clone())) as Box<dyn KvCache>,
            Box::new(F16Cache::new(s, rope.clone())),
        ] {
            cache.append(0, &k, &v).unwrap();
            let queries = Queries {
                q: &q,
                tokens,
                q_heads: 4,
                first_pos: 0,
                scale: 1.0 / 8f32.sqrt(),
                window: None,
            };
            let mut out = vec![0f32; q.len()];
            cache.attend(0, &queries, &mut out).unwrap();
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "{}: {a} vs {b}", cache.spec());
            }
        }
    }

    /// A decode step over thousands of keys scores them in two parts on two threads; joined,
    /// they give the one softmax over all keys (windowed or not, one query or a few).
    #[test]
    fn decode_over_long_context_in_key_parts_matches_reference() {
        let s = shape();
        let tokens = 2348; // two parts of ≥ 1024 keys, the second not a whole key block
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(8, 10000.0, tokens, RopeLayout::HalfSplit).into());
        let row = s.kv_heads * s.head_dim;
        let (k, v) = (data(tokens * row, 0.5), data(tokens * row, 2.5));
        let mut cache = F32Cache::new(s, rope.clone());
        cache.append(0, &k, &v).unwrap();
        for (n, window) in [(1, None), (3, None), (1, Some(2100)), (3, Some(2200))] {
            // Peaked scores: a misplaced part would move the output far from the reference.
            let q: Vec<f32> = data(n * 4 * 8, 4.0).iter().map(|x| 6.0 * x).collect();
            let first_pos = tokens - n;
            let queries = Queries {
                q: &q,
                tokens: n,
                q_heads: 4,
                first_pos,
                scale: 1.0 / 8f32.sqrt(),
                window,
            };
            let mut out = vec![0f32; q.len()];
            cache.attend(0, &queries, &mut out).unwrap();
            let want = reference_attention_from(&k, &v, &q, first_pos, rope.layer(0), s, 4, window);
            for (a, b) in out.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "{n} queries, window {window:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn zero_queries_attend_to_nothing() {
        let s = shape();
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(8, 10000.0, 64, RopeLayout::Interleaved).into());
        let mut cache = F32Cache::new(s, rope);
        cache
            .append(0, &data(3 * 16, 1.0), &data(3 * 16, 2.0))
            .unwrap();
        let queries = Queries {
            q: &[],
            tokens: 0,
            q_heads: 4,
            first_pos: 3,
            scale: 1.0,
            window: None,
        };
        cache.attend(0, &queries, &mut []).unwrap();
    }

    #[test]
    fn f16_cache_rounds_and_counts_bytes() {
        let s = shape();
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(8, 10000.0, 64, RopeLayout::Interleaved).into());
        let mut cache = F16Cache::new(s, rope);
        let k = data(3 * 16, 1.0);
        let v = data(3 * 16, 2.0);
        cache.append(0, &k, &v).unwrap();
        let mut out = vec![0f32; 3 * 8];
        cache.read_keys(0, 1, 0..3, &mut out).unwrap();
        for t in 0..3 {
            for c in 0..8 {
                let want = f16::from_f32(k[(t * 2 + 1) * 8 + c]).to_f32();
                assert_eq!(out[t * 8 + c], want);
            }
        }
        let m = cache.memory();
        assert_eq!(m.elements, 3 * 2 * 8 * 2);
        assert_eq!(m.bytes, m.elements * 2);
        assert_eq!(m.bits_per_element(), 16.0);
    }

    #[test]
    fn bad_appends_and_reads_are_errors() {
        let s = shape();
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(8, 10000.0, 64, RopeLayout::Interleaved).into());
        let mut cache = F32Cache::new(s, rope);
        assert!(matches!(
            cache.append(0, &[0.0; 15], &[0.0; 15]),
            Err(CacheError::Shape(_))
        ));
        assert!(matches!(
            cache.append(2, &[0.0; 16], &[0.0; 16]),
            Err(CacheError::Shape(_))
        ));
        let mut bad = vec![0.0; 16];
        bad[3] = f32::NAN;
        assert!(matches!(
            cache.append(0, &bad, &[0.0; 16]),
            Err(CacheError::NonFinite("keys", 0))
        ));
        cache.append(0, &[0.0; 16], &[0.0; 16]).unwrap();
        let mut out = vec![0.0; 16];
        assert!(cache.read_keys(0, 0, 0..2, &mut out).is_err());
    }
}
