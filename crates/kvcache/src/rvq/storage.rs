//! Storage of one layer's keys or values: per KV head, f16 windows (sinks, recent) around packed
//! codes with an f16 scale per position; appending encodes what leaves the windows.

use super::RvqOptions;
use crate::CacheError;
use crate::GroupRope;
use half::f16;
use rvq::few::FewVectorEncoder;
use rvq::pack::PackedRows;
use rvq::{Quantizer, VectorLayout};
use std::ops::Range;
use std::sync::Arc;

/// One KV head's keys or values.
#[derive(Clone, Debug)]
pub(super) struct HeadStore {
    /// [sinks, head_dim] (all positions when the part is not quantized)
    pub(super) sinks: Vec<f16>,
    /// One row of groups × stages codes per encoded position still stored.
    pub(super) codes: PackedRows,
    /// One scale per encoded position still stored.
    pub(super) scales: Vec<f16>,
    /// Encoded positions dropped from the front (sliding-window layers): `codes` row 0 is
    /// encoded position `dropped`.
    pub(super) dropped: usize,
    /// [≤ recent, head_dim], oldest first
    pub(super) recent: Vec<f16>,
}

impl HeadStore {
    /// Codes ([n, groups·stages]) and scales of stored code rows `first..first + n`.
    pub(super) fn unpack(
        &self,
        first: usize,
        n: usize,
        codes: &mut Vec<u16>,
        scales: &mut Vec<f32>,
    ) {
        let row = self.codes.codes_per_row();
        codes.resize(n * row, 0);
        self.codes.get_rows(first, n, codes);
        scales.resize(n, 0.0);
        // F16C where the CPU has it (a per-value conversion showed at 0.6% of a decode step).
        rvq::codec::f16_to_f32(&self.scales[first..first + n], scales);
    }
}

/// Keys or values of one layer.
#[derive(Clone, Debug)]
pub(super) struct PartStore {
    /// `None`: stored in f16 in full.
    /// Shared, so that copying a cache (one per choice in `mc`) does not copy codebooks.
    pub(super) quant: Option<(Arc<dyn Quantizer>, VectorLayout)>,
    /// [kv_heads, hd]: coded vectors are x ⊙ w (see [`crate::codebooks::ChannelWeights`]).
    pub(super) weights: Option<Arc<[f32]>>,
    /// Keys whose layout only permutes channels: RoPE in the quantizer's group order.
    pub(super) group_rope: Option<GroupRope>,
    /// The codebooks in lanes, when the options ask for the lane encoder (shared like `quant`).
    pub(super) few: Option<Arc<FewVectorEncoder>>,
    pub(super) heads: Vec<HeadStore>,
}

impl PartStore {
    /// Stores `x` ([tokens, kv_heads, hd]) for positions `first_pos..`, encoding with `beam`.
    pub(super) fn append(
        &mut self,
        x: &[f32],
        first_pos: usize,
        hd: usize,
        opt: &RvqOptions,
        beam: usize,
    ) -> Result<(), CacheError> {
        let heads = self.heads.len();
        let tokens = x.len() / (heads * hd);
        let sinks = if self.quant.is_some() {
            opt.sinks
        } else {
            usize::MAX
        };
        // Vectors that leave the f16 windows now, per head, oldest first.
        let mut to_encode: Vec<Vec<f32>> = vec![Vec::new(); heads];
        for t in 0..tokens {
            for (h, store) in self.heads.iter_mut().enumerate() {
                let v = &x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                if first_pos + t < sinks {
                    store.sinks.extend(v.iter().map(|&a| f16::from_f32(a)));
                    continue;
                }
                if opt.recent == 0 {
                    to_encode[h].extend_from_slice(v); // straight from f32, as the paper
                    continue;
                }
                store.recent.extend(v.iter().map(|&a| f16::from_f32(a)));
                if store.recent.len() > opt.recent * hd {
                    let out: Vec<f16> = store.recent.drain(..hd).collect();
                    to_encode[h].extend(out.iter().map(|a| a.to_f32()));
                }
            }
        }
        let Some((q, layout)) = &self.quant else {
            return Ok(());
        };
        if let Some(w) = &self.weights {
            for (x, w) in to_encode.iter_mut().zip(w.chunks_exact(hd)) {
                x.chunks_exact_mut(hd).for_each(|v| multiply(v, w));
            }
        }
        // One batch for all heads: they share the layer's quantizer.
        let counts: Vec<usize> = to_encode.iter().map(|v| v.len() / hd).collect();
        let all: Vec<f32> = to_encode.concat();
        if all.is_empty() {
            return Ok(());
        }
        let (scales, codes) = layout
            .encode_with(q.as_ref(), &all, beam, self.few.as_deref())
            .map_err(|e| CacheError::Codebooks(e.to_string()))?;
        let row = layout.groups() * q.stages();
        let mut i = 0;
        for (store, n) in self.heads.iter_mut().zip(counts) {
            for _ in 0..n {
                store.codes.push(&codes[i * row..(i + 1) * row]);
                store.scales.push(f16::from_f32(scales[i]));
                i += 1;
            }
        }
        Ok(())
    }

    /// Where positions live: sinks `[0, a)`, codes `[a, b)`, recent window `[b, len)`; of the
    /// codes, the first `dropped` are gone (see [`PartStore::forget_before`]).
    pub(super) fn spans(&self, head: usize, hd: usize) -> (usize, usize) {
        let store = &self.heads[head];
        let a = store.sinks.len() / hd;
        (a, a + store.dropped + store.scales.len())
    }

    /// Hints the CPU to read the packed codes of `head` at `positions` into its caches (the
    /// coded ones among them), ahead of the scoring or reducing that will unpack them.
    pub(super) fn prefetch_codes(&self, head: usize, positions: Range<usize>, hd: usize) {
        let (kept, b) = (self.first_kept_code(head, hd), self.spans(head, hd).1);
        let (start, end) = (positions.start.max(kept), positions.end.min(b));
        if self.quant.is_some() && start < end {
            self.heads[head]
                .codes
                .prefetch_rows(start - kept, end - start);
        }
    }

    /// The first position still readable after the sinks (codes dropped before it).
    pub(super) fn first_kept_code(&self, head: usize, hd: usize) -> usize {
        self.heads[head].sinks.len() / hd + self.heads[head].dropped
    }

    /// Codes ([n, groups·stages]) and scales of the coded `positions` of `head` (callers check
    /// that no dropped position is asked for).
    pub(super) fn codes_at(
        &self,
        head: usize,
        positions: Range<usize>,
        hd: usize,
    ) -> (Vec<u16>, Vec<f32>) {
        let (mut codes, mut scales) = (vec![], vec![]);
        let first = positions.start - self.first_kept_code(head, hd);
        self.heads[head].unpack(first, positions.len(), &mut codes, &mut scales);
        (codes, scales)
    }

    /// Drops the codes of positions before `pos` (sinks and the recent window stay; a part
    /// stored in f16 keeps everything).
    pub(super) fn forget_before(&mut self, pos: usize, hd: usize) {
        if self.quant.is_none() {
            return;
        }
        for store in &mut self.heads {
            let a = store.sinks.len() / hd;
            let drop = pos
                .saturating_sub(a + store.dropped)
                .min(store.scales.len());
            if drop > 0 {
                store.codes.drop_front(drop);
                store.scales.drain(..drop);
                store.dropped += drop;
            }
        }
    }

    pub(super) fn read(&self, head: usize, positions: Range<usize>, hd: usize, out: &mut [f32]) {
        let store = &self.heads[head];
        let (a, b) = self.spans(head, hd);
        let clip = |lo: usize, hi: usize| {
            let start = positions.start.max(lo);
            start..positions.end.min(hi).max(start)
        };
        let dst =
            |r: &Range<usize>| (r.start - positions.start) * hd..(r.end - positions.start) * hd;
        let sinks = clip(0, a);
        if !sinks.is_empty() {
            rvq::codec::f16_to_f32(
                &store.sinks[sinks.start * hd..sinks.end * hd],
                &mut out[dst(&sinks)],
            );
        }
        let coded = clip(a, b);
        if !coded.is_empty() {
            let (q, layout) = self.quant.as_ref().expect("codes imply a quantizer");
            let (codes, scales) = self.codes_at(head, coded.clone(), hd);
            let out = &mut out[dst(&coded)];
            layout.decode_rows(q.as_ref(), &scales, &codes, out);
            self.unweight(head, hd, out);
        }
        let recent = clip(b, usize::MAX);
        if !recent.is_empty() {
            rvq::codec::f16_to_f32(
                &store.recent[(recent.start - b) * hd..(recent.end - b) * hd],
                &mut out[dst(&recent)],
            );
        }
    }

    /// Undoes the channel weights of `head` on coded vectors `x` ([n, hd]) read back.
    pub(super) fn unweight(&self, head: usize, hd: usize, x: &mut [f32]) {
        if let Some(w) = &self.weights {
            let w = &w[head * hd..(head + 1) * hd];
            x.chunks_exact_mut(hd)
                .for_each(|v| v.iter_mut().zip(w).for_each(|(a, w)| *a /= w));
        }
    }

    pub(super) fn bytes(&self) -> u64 {
        self.heads
            .iter()
            .map(|s| {
                (s.sinks.len() * 2 + s.codes.bytes() + s.scales.len() * 2 + s.recent.len() * 2)
                    as u64
            })
            .sum()
    }

    /// [`Self::bytes`] of one head holding `tokens` positions: f16 sinks, codes and a scale per
    /// encoded position, the f16 recent window.
    pub(super) fn bytes_at(&self, tokens: usize, hd: usize, opt: &RvqOptions) -> u64 {
        let f16_bytes = std::mem::size_of::<f16>();
        if self.quant.is_none() {
            return (tokens * hd * f16_bytes) as u64;
        }
        let sinks = tokens.min(opt.sinks);
        let recent = (tokens - sinks).min(opt.recent);
        let coded = tokens - sinks - recent;
        let code_row = self.heads.first().map_or(0, |h| h.codes.row_bytes());
        ((sinks + recent) * hd * f16_bytes + coded * (code_row + f16_bytes)) as u64
    }

    /// Bytes held whatever the context: the codebooks, channel weights and any lane copy.
    pub(super) fn fixed_bytes(&self) -> u64 {
        let books = self.quant.as_ref().map_or(0, |(q, _)| q.bytes());
        let weights = self
            .weights
            .as_ref()
            .map_or(0, |w| std::mem::size_of_val(&w[..]) as u64);
        books + weights + self.few.as_ref().map_or(0, |f| f.bytes())
    }

    pub(super) fn truncate(&mut self, len: usize, hd: usize) {
        for s in &mut self.heads {
            let n_sinks = (s.sinks.len() / hd).min(len);
            s.sinks.truncate(n_sinks * hd);
            let n_codes = (s.dropped + s.scales.len()).min(len - n_sinks);
            let stored = n_codes.saturating_sub(s.dropped);
            s.dropped = s.dropped.min(n_codes);
            s.codes.truncate(stored);
            s.scales.truncate(stored);
            s.recent.truncate((len - n_sinks - n_codes) * hd);
        }
    }
}

fn multiply(x: &mut [f32], w: &[f32]) {
    x.iter_mut().zip(w).for_each(|(a, w)| *a *= w);
}
