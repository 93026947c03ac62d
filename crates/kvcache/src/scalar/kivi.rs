//! KIVI (Liu et al., 2024): asymmetric 2- or 4-bit quantization, keys per channel and values per
//! token, with the newest tokens in f16.
//!
//! Keys: each channel of each block of `group` consecutive tokens gets its own min and scale, so
//! outlier channels do not spoil the others. Keys wait in f16 until `residual` of them have
//! gathered, then all are quantized (KIVI's key residual). Values: each token's channels are split
//! in groups of `group`, each with its own min and scale; the last `residual` tokens stay in f16
//! and the oldest is quantized when a new one arrives. Mins and scales are f16. Quantization:
//! q = round((x − min)/scale) clamped to 0..2^bits−1, read back as q·scale + min.

use super::StoredForm;
use crate::{
    check_append, check_read, CacheError, CacheShape, KvCache, LayerRopes, MemoryReport, Part, Rope,
};
use half::f16;
use rvq::pack::PackedRows;
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KiviOptions {
    /// 2 or 4.
    pub bits: u32,
    /// Tokens per key group (along tokens) and channels per value group.
    pub group: usize,
    /// f16 tokens: keys are quantized `residual` at a time, values once older than the last
    /// `residual`. A multiple of `group`.
    pub residual: usize,
}

impl KiviOptions {
    pub fn new(bits: u32) -> Self {
        Self {
            bits,
            group: 32,
            residual: 32,
        }
    }

    pub fn check(&self, head_dim: usize) -> Result<(), String> {
        if self.bits != 2 && self.bits != 4 {
            return Err(format!("KIVI has 2 or 4 bits, not {}", self.bits));
        }
        if self.group == 0 || !head_dim.is_multiple_of(self.group) {
            return Err(format!(
                "group={} must be at least 1 and divide head_dim {head_dim}",
                self.group
            ));
        }
        if self.residual == 0 || !self.residual.is_multiple_of(self.group) {
            return Err(format!(
                "residual={} must be a positive multiple of group={}",
                self.residual, self.group
            ));
        }
        Ok(())
    }
}

/// One head's keys or values: quantized tokens first, then the f16 tail.
#[derive(Clone, Debug)]
struct Store {
    /// [quantized tokens] rows of head_dim codes.
    codes: PackedRows,
    /// (scale, min) pairs: keys [blocks of `group` tokens, head_dim]; values [tokens, head_dim/group].
    params: Vec<f16>,
    /// [tail tokens, head_dim], oldest first.
    tail: Vec<f16>,
}

#[derive(Clone)]
pub struct KiviCache {
    shape: CacheShape,
    rope: Arc<LayerRopes>,
    options: KiviOptions,
    form: StoredForm,
    /// [layers × kv_heads] of [keys, values].
    stores: Vec<[Store; 2]>,
    lens: Vec<usize>,
}

/// Asymmetric quantization of `xs` to `bits`: returns the f16 (scale, min) and writes the codes.
fn quantize(xs: &[f32], bits: u32, codes: &mut [u16]) -> (f16, f16) {
    let (lo, hi) = xs
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let top = ((1u32 << bits) - 1) as f32;
    let (scale, min) = (f16::from_f32((hi - lo) / top), f16::from_f32(lo));
    let (s, m) = (scale.to_f32(), min.to_f32());
    for (c, &x) in codes.iter_mut().zip(xs) {
        *c = if s > 0.0 {
            ((x - m) / s).clamp(0.0, top).round() as u16
        } else {
            0
        };
    }
    (scale, min)
}

impl KiviCache {
    pub fn new(
        shape: CacheShape,
        rope: Arc<LayerRopes>,
        options: KiviOptions,
        form: StoredForm,
    ) -> Result<Self, String> {
        options.check(shape.head_dim)?;
        let store = Store {
            codes: PackedRows::new(shape.head_dim, options.bits),
            params: vec![],
            tail: vec![],
        };
        Ok(Self {
            shape,
            rope,
            options,
            form,
            stores: vec![[store.clone(), store]; shape.layers * shape.kv_heads],
            lens: vec![0; shape.layers],
        })
    }

    fn slot(&self, layer: usize, head: usize) -> usize {
        layer * self.shape.kv_heads + head
    }
}

impl Store {
    fn quantized(&self) -> usize {
        self.codes.len()
    }

    fn tail_tokens(&self, hd: usize) -> usize {
        self.tail.len() / hd
    }

    /// Quantizes the oldest `residual` tail tokens of keys, channel by channel in token blocks.
    fn flush_keys(&mut self, hd: usize, o: &KiviOptions) {
        while self.tail_tokens(hd) >= o.residual {
            let block: Vec<f32> = self
                .tail
                .drain(..o.residual * hd)
                .map(f16::to_f32)
                .collect();
            for tokens in block.chunks_exact(o.group * hd) {
                // [group, hd] → per channel over the group's tokens.
                let mut codes = vec![0u16; o.group * hd];
                let mut column = vec![0f32; o.group];
                let mut column_codes = vec![0u16; o.group];
                for c in 0..hd {
                    for (t, x) in column.iter_mut().enumerate() {
                        *x = tokens[t * hd + c];
                    }
                    let (scale, min) = quantize(&column, o.bits, &mut column_codes);
                    self.params.extend([scale, min]);
                    for (t, &q) in column_codes.iter().enumerate() {
                        codes[t * hd + c] = q;
                    }
                }
                for row in codes.chunks_exact(hd) {
                    self.codes.push(row);
                }
            }
        }
    }

    /// Quantizes values older than the last `residual`, one token at a time, per channel group.
    fn flush_values(&mut self, hd: usize, o: &KiviOptions) {
        let mut codes = vec![0u16; hd];
        while self.tail_tokens(hd) > o.residual {
            let token: Vec<f32> = self.tail.drain(..hd).map(f16::to_f32).collect();
            for (xs, cs) in token
                .chunks_exact(o.group)
                .zip(codes.chunks_exact_mut(o.group))
            {
                let (scale, min) = quantize(xs, o.bits, cs);
                self.params.extend([scale, min]);
            }
            self.codes.push(&codes);
        }
    }

    /// Quantized token `t` (stored form) into `out`.
    fn dequantize(&self, part: Part, t: usize, hd: usize, o: &KiviOptions, out: &mut [f32]) {
        let mut codes = vec![0u16; hd];
        self.codes.get(t, &mut codes);
        for (c, (x, &q)) in out.iter_mut().zip(&codes).enumerate() {
            let p = match part {
                Part::Keys => (t / o.group) * hd + c,
                Part::Values => t * (hd / o.group) + c / o.group,
            };
            *x = q as f32 * self.params[2 * p].to_f32() + self.params[2 * p + 1].to_f32();
        }
    }

    /// Keeps the first `len` tokens; tokens that must return to the f16 tail (so the layout is
    /// what appending `len` tokens gives) come back as their quantized values.
    fn truncate(&mut self, part: Part, len: usize, hd: usize, o: &KiviOptions) {
        let keep_quantized = match part {
            Part::Keys => (len / o.residual) * o.residual,
            Part::Values => len.saturating_sub(o.residual),
        }
        .min(self.quantized());
        let tail_len = self.quantized() + self.tail_tokens(hd);
        let mut restored = vec![0f32; hd];
        let mut new_tail = Vec::new();
        for t in keep_quantized..self.quantized().min(len) {
            self.dequantize(part, t, hd, o, &mut restored);
            new_tail.extend(restored.iter().map(|&x| f16::from_f32(x)));
        }
        let old_tail_kept = len.min(tail_len).saturating_sub(self.quantized());
        new_tail.extend_from_slice(&self.tail[..old_tail_kept * hd]);
        self.codes.truncate(keep_quantized);
        self.params.truncate(match part {
            Part::Keys => keep_quantized / o.group * hd * 2,
            Part::Values => keep_quantized * (hd / o.group) * 2,
        });
        self.tail = new_tail;
    }

    fn bytes(&self) -> usize {
        self.codes.bytes() + (self.params.len() + self.tail.len()) * std::mem::size_of::<f16>()
    }
}

impl KvCache for KiviCache {
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn rope(&self, layer: usize) -> &Rope {
        self.rope.layer(layer)
    }
    fn spec(&self) -> String {
        let o = &self.options;
        format!(
            "kivi{},group={},residual={}{}",
            o.bits,
            o.group,
            o.residual,
            self.form.spec_suffix()
        )
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), CacheError> {
        let tokens = check_append(&self.shape, layer, k, v)?;
        let (heads, hd) = (self.shape.kv_heads, self.shape.head_dim);
        let first_pos = self.lens[layer];
        let mut row = vec![0f32; hd];
        for h in 0..heads {
            let slot = self.slot(layer, h);
            for (part, x) in [(Part::Keys, k), (Part::Values, v)] {
                let store = &mut self.stores[slot][part as usize];
                for t in 0..tokens {
                    row.copy_from_slice(&x[(t * heads + h) * hd..][..hd]);
                    self.form
                        .to_stored(part, self.rope.layer(layer), first_pos + t, &mut row);
                    store.tail.extend(row.iter().map(|&a| f16::from_f32(a)));
                }
                match part {
                    Part::Keys => store.flush_keys(hd, &self.options),
                    Part::Values => store.flush_values(hd, &self.options),
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
        let store = &self.stores[self.slot(layer, head)][part as usize];
        let quantized = store.quantized();
        for (pos, o) in positions.zip(out.chunks_exact_mut(hd)) {
            if pos < quantized {
                store.dequantize(part, pos, hd, &self.options, o);
            } else {
                let tail = &store.tail[(pos - quantized) * hd..][..hd];
                for (x, y) in o.iter_mut().zip(tail) {
                    *x = y.to_f32();
                }
            }
            self.form.from_stored(part, self.rope.layer(layer), pos, o);
        }
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        let tokens: usize = self.lens.iter().sum();
        MemoryReport {
            elements: (tokens * self.shape.kv_heads * self.shape.head_dim * 2) as u64,
            bytes: self
                .stores
                .iter()
                .flatten()
                .map(Store::bytes)
                .sum::<usize>() as u64,
            fixed_bytes: 0,
        }
    }

    fn bytes_at(&self, tokens: usize) -> u64 {
        let (o, hd) = (&self.options, self.shape.head_dim);
        // Keys leave the f16 tail `residual` tokens at a time, values one by one.
        let keys_coded = tokens / o.residual * o.residual;
        let values_coded = tokens.saturating_sub(o.residual);
        let codes = (keys_coded + values_coded) * rvq::pack::row_bytes(hd, o.bits);
        let params = (keys_coded / o.group * hd + values_coded * (hd / o.group)) * 2;
        let tail = (tokens - keys_coded) * hd + tokens.min(o.residual) * hd;
        let per_head = codes + (params + tail) * std::mem::size_of::<f16>();
        (self.shape.layers * self.shape.kv_heads * per_head) as u64
    }

    fn truncate(&mut self, len: usize) {
        let hd = self.shape.head_dim;
        for (layer, l) in self.lens.iter_mut().enumerate() {
            if *l <= len {
                continue;
            }
            *l = len;
            for h in 0..self.shape.kv_heads {
                let [keys, values] = &mut self.stores[layer * self.shape.kv_heads + h];
                keys.truncate(Part::Keys, len, hd, &self.options);
                values.truncate(Part::Values, len, hd, &self.options);
            }
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

    const HD: usize = 64;

    fn cache(options: KiviOptions) -> KiviCache {
        let shape = CacheShape {
            layers: 1,
            kv_heads: 2,
            head_dim: HD,
        };
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(HD, 10000.0, 256, RopeLayout::Interleaved).into());
        KiviCache::new(shape, rope, options, StoredForm::default()).unwrap()
    }

    /// Slow reference: asymmetric quantization of one group, from the paper's formula, in f64.
    fn reference_group(xs: &[f32], bits: u32) -> Vec<f32> {
        let lo = xs.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let top = ((1 << bits) - 1) as f64;
        let scale = f16::from_f64((hi as f64 - lo as f64) / top).to_f64();
        let min = f16::from_f32(lo).to_f64();
        xs.iter()
            .map(|&x| {
                let q = if scale > 0.0 {
                    ((x as f64 - min) / scale).clamp(0.0, top).round()
                } else {
                    0.0
                };
                (q * scale + min) as f32
            })
            .collect()
    }

    /// What KIVI should hold for one head after `n` tokens: keys quantized per channel in
    /// blocks, values per token group, f16 tails.
    fn reference(x_keys: &[Vec<f32>], x_values: &[Vec<f32>], o: &KiviOptions) -> [Vec<f32>; 2] {
        let n = x_keys.len();
        let h = |x: f32| f16::from_f32(x).to_f32();
        let mut keys: Vec<f32> = x_keys.iter().flatten().map(|&x| h(x)).collect();
        let kq = n / o.residual * o.residual;
        for b in 0..kq / o.group {
            for c in 0..HD {
                let col: Vec<f32> = (0..o.group)
                    .map(|t| keys[(b * o.group + t) * HD + c])
                    .collect();
                for (t, y) in reference_group(&col, o.bits).into_iter().enumerate() {
                    keys[(b * o.group + t) * HD + c] = y;
                }
            }
        }
        let mut values: Vec<f32> = x_values.iter().flatten().map(|&x| h(x)).collect();
        for t in 0..n.saturating_sub(o.residual) {
            for g in 0..HD / o.group {
                let range = t * HD + g * o.group..t * HD + (g + 1) * o.group;
                let q = reference_group(&values[range.clone()], o.bits);
                values[range].copy_from_slice(&q);
            }
        }
        [keys, values]
    }

    fn tokens(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n * 2 * HD)
            .map(|i| rng.normal() + (i % HD) as f32 * 0.05)
            .collect()
    }

    #[test]
    fn matches_the_reference_whether_appended_at_once_or_token_by_token() {
        for (bits, group, residual) in [(2, 32, 32), (4, 16, 48), (2, 8, 8)] {
            let o = KiviOptions {
                bits,
                group,
                residual,
            };
            let n = 101;
            let (k, v) = (tokens(n, 1), tokens(n, 2));
            let mut at_once = cache(o);
            at_once.append(0, &k, &v).unwrap();
            let mut one_by_one = cache(o);
            for t in 0..n {
                let r = t * 2 * HD..(t + 1) * 2 * HD;
                one_by_one.append(0, &k[r.clone()], &v[r]).unwrap();
            }
            let head = |x: &[f32]| -> Vec<Vec<f32>> {
                (0..n)
                    .map(|t| x[(t * 2 + 1) * HD..][..HD].to_vec())
                    .collect()
            };
            let want = reference(&head(&k), &head(&v), &o);
            for c in [&at_once, &one_by_one] {
                for part in [Part::Keys, Part::Values] {
                    let mut got = vec![0f32; n * HD];
                    c.read(0, 1, part, 0..n, &mut got).unwrap();
                    for (i, (a, b)) in got.iter().zip(&want[part as usize]).enumerate() {
                        assert!((a - b).abs() < 1e-5, "{part:?} {i}: {a} vs {b}");
                    }
                }
            }
            // Bytes by hand: quantized keys hold bits per element plus 2 f16 per channel and
            // block; values 2 f16 per group; tails 16 bits.
            let kq = n / residual * residual;
            let vq = n - residual;
            let per_head = kq * HD * bits as usize / 8
                + kq / group * HD * 4
                + (n - kq) * HD * 2
                + vq * HD * bits as usize / 8
                + vq * (HD / group) * 4
                + residual * HD * 2;
            assert_eq!(at_once.memory().bytes, (per_head * 2) as u64);
            assert_eq!(at_once.memory().elements, (n * 2 * HD * 2) as u64);
        }
    }

    #[test]
    fn kivi2_stores_three_bits_per_quantized_element() {
        // 2 bits + (16 + 16) / 32 bits of scale and min = 3 bits, once the tails are negligible.
        let o = KiviOptions::new(2);
        let n = 32 * 64;
        let mut c = cache(o);
        c.append(0, &tokens(n, 3), &tokens(n, 4)).unwrap();
        let bits = c.memory().bits_per_element();
        // Keys are all quantized (n is a multiple of 32); values keep their last 32 in f16.
        let values = (3.0 * (n - 32) as f64 + 16.0 * 32.0) / n as f64;
        assert!((bits - (3.0 + values) / 2.0).abs() < 1e-9, "{bits}");
    }

    #[test]
    fn truncate_gives_the_layout_of_a_shorter_append() {
        let o = KiviOptions::new(4);
        let n = 90;
        let (k, v) = (tokens(n, 5), tokens(n, 6));
        let mut c = cache(o);
        c.append(0, &k, &v).unwrap();
        for len in [70, 64, 40, 0] {
            c.truncate(len);
            assert_eq!(c.len(0), len);
            let mut fresh = cache(o);
            fresh
                .append(0, &k[..len * 2 * HD], &v[..len * 2 * HD])
                .unwrap();
            assert_eq!(c.memory(), fresh.memory(), "len {len}");
            c.append(0, &k[len * 2 * HD..], &v[len * 2 * HD..]).unwrap();
            assert_eq!(c.len(0), n);
        }
        c.truncate(0);
        assert_eq!(c.memory().bytes, 0);
    }

    #[test]
    fn bad_options_are_errors() {
        for (bits, group, residual) in [
            (3, 32, 32),
            (2, 0, 32),
            (2, 32, 0),
            (2, 32, 48),
            (2, 48, 48),
        ] {
            let o = KiviOptions {
                bits,
                group,
                residual,
            };
            assert!(o.check(HD).is_err(), "{o:?}");
        }
    }
}
