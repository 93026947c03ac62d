//! A cache that stores every head vector in a [`ScalarFormat`] (`q8_0`, `q4_0`, `int8`, `fp8`).

use super::{ScalarFormat, StoredForm};
use crate::{
    check_append, check_read, CacheError, CacheShape, KvCache, LayerRopes, MemoryReport, Part, Rope,
};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone)]
pub struct BlockCache {
    shape: CacheShape,
    rope: Arc<LayerRopes>,
    format: ScalarFormat,
    form: StoredForm,
    row_bytes: usize,
    /// [layers × kv_heads] of [tokens, row_bytes], for keys and for values.
    rows: [Vec<Vec<u8>>; 2],
    lens: Vec<usize>,
}

impl BlockCache {
    pub fn new(
        shape: CacheShape,
        rope: Arc<LayerRopes>,
        format: ScalarFormat,
        form: StoredForm,
    ) -> Result<Self, String> {
        format.check(shape.head_dim)?;
        let slots = shape.layers * shape.kv_heads;
        Ok(Self {
            shape,
            rope,
            format,
            form,
            row_bytes: format.row_bytes(shape.head_dim),
            rows: [vec![Vec::new(); slots], vec![Vec::new(); slots]],
            lens: vec![0; shape.layers],
        })
    }

    fn slot(&self, layer: usize, head: usize) -> usize {
        layer * self.shape.kv_heads + head
    }
}

impl KvCache for BlockCache {
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn rope(&self, layer: usize) -> &Rope {
        self.rope.layer(layer)
    }
    fn spec(&self) -> String {
        let suffix = self.form.spec_suffix();
        // TurboQuant's rotation is part of the format, not an option.
        let suffix = match self.format.needs_rotation() {
            true => suffix.replace(",rot", ""),
            false => suffix,
        };
        format!("{}{suffix}", self.format.name())
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), CacheError> {
        let tokens = check_append(&self.shape, layer, k, v)?;
        let (heads, hd) = (self.shape.kv_heads, self.shape.head_dim);
        let first_pos = self.lens[layer];
        let mut row = vec![0f32; hd];
        let mut bytes = vec![0u8; self.row_bytes];
        for (part, x) in [(Part::Keys, k), (Part::Values, v)] {
            for t in 0..tokens {
                for h in 0..heads {
                    row.copy_from_slice(&x[(t * heads + h) * hd..][..hd]);
                    self.form
                        .to_stored(part, self.rope.layer(layer), first_pos + t, &mut row);
                    self.format.encode(&row, &mut bytes);
                    let slot = self.slot(layer, h);
                    self.rows[part as usize][slot].extend_from_slice(&bytes);
                }
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
        let hd = self.shape.head_dim;
        let stored = &self.rows[part as usize][self.slot(layer, head)];
        for (pos, o) in positions.zip(out.chunks_exact_mut(hd)) {
            self.format
                .decode(&stored[pos * self.row_bytes..][..self.row_bytes], o);
            self.form.from_stored(part, self.rope.layer(layer), pos, o);
        }
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        let rows: usize = self.rows.iter().flatten().map(Vec::len).sum::<usize>() / self.row_bytes;
        MemoryReport {
            elements: (rows * self.shape.head_dim) as u64,
            bytes: (rows * self.row_bytes) as u64,
            fixed_bytes: 0,
        }
    }

    fn bytes_at(&self, tokens: usize) -> u64 {
        (self.shape.layers * self.shape.kv_heads * 2 * tokens * self.row_bytes) as u64
    }

    fn truncate(&mut self, len: usize) {
        for run in self.rows.iter_mut().flatten() {
            run.truncate(len * self.row_bytes);
        }
        for l in &mut self.lens {
            *l = (*l).min(len);
        }
    }

    fn box_clone(&self) -> Box<dyn KvCache> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RopeLayout;
    use rvq::rng::SplitMix64;

    fn shape() -> CacheShape {
        CacheShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 64,
        }
    }

    #[test]
    fn reads_back_the_formats_round_trip_in_every_stored_form() {
        let s = shape();
        let rope = Arc::new(Rope::new(64, 10000.0, 32, RopeLayout::Interleaved));
        let mut rng = SplitMix64::new(5);
        let tokens = 7;
        let k: Vec<f32> = (0..tokens * 128).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..tokens * 128).map(|_| rng.normal()).collect();
        let (kr, vr) = StoredForm::llama_cpp_rotation(64).unwrap();
        for format in [ScalarFormat::Q4_0, ScalarFormat::Q8_0, ScalarFormat::Fp8] {
            for post_rope in [false, true] {
                for rotate in [false, true] {
                    let form = StoredForm {
                        key_rotation: rotate.then_some(kr),
                        value_rotation: rotate.then_some(vr),
                        post_rope,
                    };
                    let mut cache =
                        BlockCache::new(s, Arc::new((*rope).clone().into()), format, form).unwrap();
                    // Two appends: positions must continue across them.
                    cache.append(1, &k[..3 * 128], &v[..3 * 128]).unwrap();
                    cache.append(1, &k[3 * 128..], &v[3 * 128..]).unwrap();
                    for (part, x) in [(Part::Keys, &k), (Part::Values, &v)] {
                        let mut got = vec![0f32; tokens * 64];
                        cache.read(1, 1, part, 0..tokens, &mut got).unwrap();
                        for t in 0..tokens {
                            // The slow way: transform, quantize, dequantize, transform back.
                            let mut want = x[(t * 2 + 1) * 64..][..64].to_vec();
                            form.to_stored(part, &rope, t, &mut want);
                            let mut bytes = vec![0u8; format.row_bytes(64)];
                            format.encode(&want, &mut bytes);
                            format.decode(&bytes, &mut want);
                            form.from_stored(part, &rope, t, &mut want);
                            for (a, b) in got[t * 64..][..64].iter().zip(&want) {
                                assert!((a - b).abs() < 1e-6);
                            }
                        }
                    }
                    let m = cache.memory();
                    assert_eq!(m.elements, (tokens * 2 * 64 * 2) as u64);
                    assert_eq!(m.bytes, (tokens * 2 * 2 * format.row_bytes(64)) as u64);
                    assert!(cache.spec().starts_with(format.name()));
                }
            }
        }
    }

    #[test]
    fn rotation_shrinks_q4_0_error_on_outlier_channels() {
        let s = shape();
        let rope = Arc::new(Rope::new(64, 10000.0, 64, RopeLayout::Interleaved));
        let mut rng = SplitMix64::new(9);
        let tokens = 40;
        // Channel 5 of every head carries a large outlier, as real keys do.
        let k: Vec<f32> = (0..tokens * 128)
            .map(|i| rng.normal() * if i % 64 == 5 { 30.0 } else { 1.0 })
            .collect();
        let err = |form: StoredForm| {
            let mut cache = BlockCache::new(
                s,
                Arc::new((*rope).clone().into()),
                ScalarFormat::Q4_0,
                form,
            )
            .unwrap();
            cache.append(0, &k, &k).unwrap();
            let mut got = vec![0f32; tokens * 64];
            cache.read_keys(0, 0, 0..tokens, &mut got).unwrap();
            (0..tokens * 64)
                .map(|i| (got[i] - k[(i / 64 * 2) * 64 + i % 64]).powi(2))
                .sum::<f32>()
        };
        let (kr, vr) = StoredForm::llama_cpp_rotation(64).unwrap();
        let plain = err(StoredForm::default());
        let rotated = err(StoredForm {
            key_rotation: Some(kr),
            value_rotation: Some(vr),
            post_rope: false,
        });
        assert!(rotated < 0.5 * plain, "rotated {rotated} vs plain {plain}");
    }
}
