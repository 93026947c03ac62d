//! Attention over one layer's stored keys or values: coded positions through the fused kernels
//! ([`super::kernels`]), the f16 windows (and layouts the kernels do not take) densely.

use super::kernels;
use super::options::{KeyPath, ValuePath};
use super::storage::PartStore;
use crate::{attention, CacheError, Rope};
use rvq::{Quantizer, VectorLayout};
use std::ops::Range;

/// How [`PartStore::reduce_values`] reduces coded values, once the path is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueMethod {
    Dense,
    Fused,
    Histogram,
}

impl PartStore {
    /// Scores of `q` ([rows, hd], rotated, channel order) against the keys of `span` (see
    /// [`attention::KeyScorer`]): coded positions through the fused kernel when the layout
    /// allows it; windows (and everything otherwise) through `dense`, which scores a sub-span by
    /// dense reads into [rows, sub.len()].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn score_keys(
        &self,
        path: KeyPath,
        head: usize,
        q: &[f32],
        span: Range<usize>,
        rope: &Rope,
        dense: &attention::KeyScorer,
        scores: &mut [f32],
    ) -> Result<(), CacheError> {
        let hd = rope.head_dim();
        let (rows, len) = (q.len() / hd, span.len());
        let (a, b) = self.spans(head, hd);
        let coded = span.start.max(a)..span.end.min(b).max(span.start.max(a));
        let fused = match (&self.quant, &self.group_rope, path) {
            (Some((rvq, _)), Some(group_rope), KeyPath::Fused) if !coded.is_empty() => {
                Some((rvq, group_rope))
            }
            _ => None,
        };
        let Some((rvq, group_rope)) = fused else {
            return dense(head, q, span, scores);
        };
        // The windows' dense scores into the columns they cover.
        for sub in [span.start..coded.start, coded.end..span.end] {
            if sub.is_empty() {
                continue;
            }
            let mut part = vec![0f32; rows * sub.len()];
            dense(head, q, sub.clone(), &mut part)?;
            let at = sub.start - span.start;
            for (r, p) in part.chunks_exact(sub.len()).enumerate() {
                scores[r * len + at..r * len + at + sub.len()].copy_from_slice(p);
            }
        }
        let (codes, scales) = self.codes_at(head, coded.clone(), hd);
        // Coded keys are k ⊙ w with w constant within RoPE pairs: q · R(k) = (q ⊘ w) · R(k ⊙ w).
        let q = match self.weights {
            Some(_) => {
                let mut q = q.to_vec();
                self.unweight(head, hd, &mut q);
                std::borrow::Cow::Owned(q)
            }
            None => std::borrow::Cow::Borrowed(q),
        };
        let mut q_groups = vec![0f32; q.len()];
        for (qg, qr) in q_groups.chunks_exact_mut(hd).zip(q.chunks_exact(hd)) {
            group_rope.to_group_order(qr, qg);
        }
        let at = coded.start - span.start;
        kernels::key_scores(
            rvq.as_ref(),
            group_rope,
            rope,
            &codes,
            &scales,
            coded.start,
            &q_groups,
            &mut scores[at..],
            len,
        );
        Ok(())
    }

    /// Σ_t probs[r, t] · v_t over `first_key..first_key + n` (see [`attention::ValueReducer`]).
    /// Windows are read densely; coded positions either are decoded block by block, or — when the
    /// cost model says it is cheaper — never decoded: each row's weights p_t·s_t are accumulated
    /// into one histogram per stage and group over the codes, and each histogram is multiplied by
    /// its codebook once.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reduce_values(
        &self,
        path: ValuePath,
        head: usize,
        probs: &[f32],
        first_key: usize,
        n: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        let rows = out.len() / hd;
        out.fill(0.0);
        let (a, b) = self.spans(head, hd);
        let end = first_key + n;
        let coded = first_key.max(a)..end.min(b).max(first_key.max(a));
        let method = match (&self.quant, path) {
            (None, _) | (_, ValuePath::Decode) => ValueMethod::Dense,
            (Some(_), ValuePath::Histogram) => ValueMethod::Histogram,
            (Some((q, _)), ValuePath::Fused) if fused_values(rows, q.as_ref()) => {
                ValueMethod::Fused
            }
            (Some(_), ValuePath::Fused) => ValueMethod::Dense,
            // Measured (attend_speed, 3 rows, AVX2 and AVX-512): the fused sums cost less per
            // token than the histograms' scattered adds, and nothing per codeword, at 512 to
            // 32K tokens alike.
            (Some((q, _)), ValuePath::Auto) if fused_values(rows, q.as_ref()) => ValueMethod::Fused,
            (Some((q, layout)), ValuePath::Auto) => {
                match histogram_is_cheaper(rows, coded.len(), q.as_ref(), layout) {
                    true => ValueMethod::Histogram,
                    false => ValueMethod::Dense,
                }
            }
        };
        // Windows (and everything, when decoding) are read densely.
        let dense_span = |span: Range<usize>, out: &mut [f32]| {
            let read = |r: Range<usize>, vals: &mut [f32]| {
                self.read(head, r, hd, vals);
                Ok(())
            };
            attention::accumulate_values(read, probs, first_key, n, span, hd, out)
                .expect("reading an in-range span of a part cannot fail");
        };
        if method == ValueMethod::Dense {
            dense_span(first_key..end, out);
            return;
        }
        dense_span(first_key..coded.start, out);
        dense_span(coded.end..end, out);
        if coded.is_empty() {
            return;
        }
        let (q, layout) = self.quant.as_ref().expect("codes imply a quantizer");
        let (groups, d) = (layout.groups(), layout.group_dim);
        let (codes, scales) = self.codes_at(head, coded.clone(), hd);
        // This span's columns of `probs` [rows, n].
        let probs_of = |r: usize| &probs[r * n + coded.start - first_key..][..coded.len()];
        // [rows, groups·d] in group order.
        let mut sums = vec![0f32; rows * groups * d];
        if method == ValueMethod::Fused {
            // [rows, coded]: p[r, t] · s_t, row after row (contiguous, so the loop vectorises).
            let mut weights = Vec::with_capacity(rows * coded.len());
            for r in 0..rows {
                weights.extend(probs_of(r).iter().zip(&scales).map(|(p, s)| p * s));
            }
            kernels::fused_value_sums(q.as_ref(), groups, &codes, &weights, &mut sums);
        } else {
            // [coded, lanes]: p[r, t] · s_t, rows padded with zeros.
            let lanes = rows.next_multiple_of(kernels::HIST_LANES);
            let mut weights = vec![0f32; coded.len() * lanes];
            for r in 0..rows {
                for ((w, p), s) in weights[r..]
                    .iter_mut()
                    .step_by(lanes)
                    .zip(probs_of(r))
                    .zip(&scales)
                {
                    *w = p * s;
                }
            }
            // hist[stage·groups + g][code][r] = Σ_t p[r, t] · s_t over tokens t with that code.
            let mut hist = vec![0f32; kernels::histogram_len(q.as_ref(), groups, rows)];
            kernels::value_histograms(q.as_ref(), groups, &codes, &weights, &mut hist);
            kernels::histograms_times_codebooks(q.as_ref(), groups, &hist, rows, &mut sums);
        }
        // → channel order.
        let mut coded_out = vec![0f32; rows * hd];
        for (o, s) in coded_out
            .chunks_exact_mut(hd)
            .zip(sums.chunks_exact(groups * d))
        {
            for (g, group) in s.chunks_exact(d).enumerate() {
                layout.write_group(g, group, 1.0, o);
            }
        }
        for (o, x) in out.chunks_exact_mut(hd).zip(coded_out.chunks_exact_mut(hd)) {
            // The rotation is linear: undo it once on the weighted sum, not per token.
            if let Some(h) = layout.rotation {
                h.apply(x);
            }
            self.unweight(head, hd, x);
            for (a, b) in o.iter_mut().zip(x.iter()) {
                *a += b;
            }
        }
    }
}

/// Whether [`kernels::fused_value_sums`] takes values of `q` for `rows` query rows.
fn fused_values(rows: usize, q: &dyn Quantizer) -> bool {
    q.dim() == 32 && rows <= kernels::FUSED_ROWS
}

/// Cost model of the value reduction over `n` coded tokens for `rows` query rows, in units of
/// one scalar add: decoding costs n·K·G·d gather-adds plus the n·rows·hd product; the histogram
/// costs n·K·G·rows scattered adds plus rows·K·G·C·d multiply-adds in matrix products, which run
/// about 4× faster per element than gathers.
fn histogram_is_cheaper(rows: usize, n: usize, q: &dyn Quantizer, layout: &VectorLayout) -> bool {
    let (k, g, c, d) = (q.stages(), layout.groups(), q.size(), layout.group_dim);
    let hd = layout.vector_dim;
    let decode = n * k * g * d + n * rows * hd / 4;
    let histogram = n * k * g * rows + rows * k * g * c * d / 4;
    histogram < decode
}
