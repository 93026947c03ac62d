//! The RVQ cache: per token and KV head, packed codes plus an f16 scale. Nothing dense is kept
//! for quantized tokens; optional full-precision (f16) windows keep the first `sinks` tokens
//! (attention sinks) and the last `recent` tokens, which are encoded when they leave the window.

use crate::codebooks::{CodebookMeta, Codebooks, ConvertedLayer};
use crate::rvq_attention;
use crate::{
    attention, check_append, check_read, CacheError, CacheShape, GroupRope, KvCache, LayerRopes,
    MemoryReport, Part, Queries, Rope,
};
use half::f16;
use rvq::few::FewVectorEncoder;
use rvq::pack::PackedRows;
use rvq::{HalfRvq, I8Rvq, Quantizer, Rvq, VectorLayout};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RvqOptions {
    /// First tokens kept in f16.
    pub sinks: usize,
    /// Last tokens kept in f16.
    pub recent: usize,
    /// Beam width of encoding (1 = greedy, the paper).
    pub beam: usize,
    pub quantize_keys: bool,
    pub quantize_values: bool,
    /// Use only the first K stages of the codebooks (`None`: all).
    pub stages: Option<usize>,
    /// How attention reduces coded values.
    pub values: ValuePath,
    /// How attention scores coded keys.
    pub keys: KeyPath,
    /// Encode a decode step's few vectors with an f16 lane-layout copy of the codebooks
    /// ([`rvq::few::FewVectorEncoder`], AVX2 only): ~2× faster encoding than searching the
    /// codebooks as held (`encode=books`, the default), for half the codebooks' bytes again —
    /// and attention, which gathers from the codebooks, then finds them cold.
    pub lane_encoder: bool,
    /// How the codebooks are held (`books=i8`, the default).
    pub books: BookPrecision,
}

/// How an RVQ cache holds its codebooks; fewer bytes held are also fewer bytes a decode step
/// reads from them (encoding searches every stage, attention gathers codewords).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BookPrecision {
    /// As trained.
    F32,
    /// Rounded to f16 ([`rvq::HalfRvq`]): half the bytes; codes and sums are those of the
    /// f16-rounded codewords (perplexity unchanged within noise).
    F16,
    /// i8 with a scale per stage and channel, whole multiples of one unit per channel so that a
    /// vector's codewords sum exactly in i16 ([`rvq::I8Rvq`]): a quarter of the bytes;
    /// sums are those of the dequantized codewords, and so are the codes but for near ties a
    /// decode step's search may break the other way (perplexity unchanged within noise).
    /// The default: the fewest bytes, the fastest attention and (with AVX-512 VNNI) the
    /// fastest decode-step encode.
    #[default]
    I8,
}

impl std::str::FromStr for BookPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let choices = [("f32", Self::F32), ("f16", Self::F16), ("i8", Self::I8)];
        one_of("books", s, &choices)
    }
}

/// How attention scores queries against coded keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyPath {
    /// Decode, rotate and multiply in the quantizer's group order, block by block (see
    /// [`rvq_attention::key_scores`]); falls back to `Decode` for layouts that mix channels.
    #[default]
    Fused,
    /// Decode into dense keys in channel order, rotate, multiply (the reference path).
    Decode,
}

impl std::str::FromStr for KeyPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        one_of(
            "keys",
            s,
            &[("fused", Self::Fused), ("decode", Self::Decode)],
        )
    }
}

/// The choice named `value` of option `option`, or an error listing the names.
pub(crate) fn one_of<T: Copy>(
    option: &str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, String> {
    if let Some(&(_, c)) = choices.iter().find(|(name, _)| *name == value) {
        return Ok(c);
    }
    let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
    let listed = match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(format!("{option}={value}: expected {listed}"))
}

/// How attention turns weights over coded values into outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ValuePath {
    /// `Fused` for a decode step's few rows (where it applies); otherwise histograms or
    /// decoding, whichever the cost model says is cheaper for this many rows and tokens.
    #[default]
    Auto,
    /// Decode values block by block, then multiply (the reference path).
    Decode,
    /// A few query rows (a decode step): each value's codewords summed in registers and added
    /// with each row's weight ([`rvq_attention::fused_value_sums`]; d = 32, else `Decode`).
    Fused,
    /// Per-stage histograms of the weights over the codes, times the codebooks.
    Histogram,
}

/// How [`PartStore::reduce_values`] reduces coded values, once the path is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueMethod {
    Dense,
    Fused,
    Histogram,
}

impl std::str::FromStr for ValuePath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let choices = [
            ("auto", Self::Auto),
            ("decode", Self::Decode),
            ("fused", Self::Fused),
            ("histogram", Self::Histogram),
        ];
        one_of("values", s, &choices)
    }
}

impl Default for RvqOptions {
    fn default() -> Self {
        Self {
            sinks: 0,
            recent: 0,
            beam: 1,
            quantize_keys: true,
            quantize_values: true,
            stages: None,
            values: ValuePath::Auto,
            keys: KeyPath::Fused,
            lane_encoder: false,
            books: BookPrecision::default(),
        }
    }
}

/// Storage of one head's keys or values.
#[derive(Clone, Debug)]
struct HeadStore {
    /// [sinks, head_dim] (all positions when the part is not quantized)
    sinks: Vec<f16>,
    /// One row of groups × stages codes per encoded position still stored.
    codes: PackedRows,
    /// One scale per encoded position still stored.
    scales: Vec<f16>,
    /// Encoded positions dropped from the front (sliding-window layers): `codes` row 0 is
    /// encoded position `dropped`.
    dropped: usize,
    /// [≤ recent, head_dim], oldest first
    recent: Vec<f16>,
}

impl HeadStore {
    /// Codes ([n, groups·stages]) and scales of stored code rows `first..first + n`.
    fn unpack(&self, first: usize, n: usize, codes: &mut Vec<u16>, scales: &mut Vec<f32>) {
        let row = self.codes.codes_per_row();
        codes.resize(n * row, 0);
        self.codes.get_rows(first, n, codes);
        scales.resize(n, 0.0);
        // F16C where the CPU has it (a per-value conversion showed at 0.6% of a decode step).
        rvq::codec::f16_to_f32(&self.scales[first..first + n], scales);
    }
}

fn book_error(e: rvq::RvqError) -> CacheError {
    CacheError::Codebooks(e.to_string())
}

/// A loaded quantizer as `options` want the cache to hold it: its first `stages` stages, in f16
/// or f32 (the same `Arc` when nothing changes, so caches share one copy).
pub fn prepare_quantizer(
    q: Arc<Rvq>,
    options: &RvqOptions,
) -> Result<Arc<dyn Quantizer>, CacheError> {
    let q = match options.stages {
        Some(k) => Arc::new(q.truncated(k).map_err(book_error)?),
        None => q,
    };
    Ok(match options.books {
        BookPrecision::F32 => q,
        BookPrecision::F16 => Arc::new(HalfRvq::from_rvq(&q).map_err(book_error)?),
        BookPrecision::I8 => Arc::new(I8Rvq::from_rvq(&q).map_err(book_error)?),
    })
}

/// Keys or values of one layer.
#[derive(Clone, Debug)]
struct PartStore {
    /// `None`: stored in f16 in full.
    /// Shared, so that copying a cache (one per choice in `mc`) does not copy codebooks.
    quant: Option<(Arc<dyn Quantizer>, VectorLayout)>,
    /// Keys whose layout only permutes channels: RoPE in the quantizer's group order.
    group_rope: Option<GroupRope>,
    /// The codebooks in lanes, when the options ask for the lane encoder (shared like `quant`).
    few: Option<Arc<FewVectorEncoder>>,
    heads: Vec<HeadStore>,
}

#[derive(Clone)]
pub struct RvqCache {
    shape: CacheShape,
    rope: Arc<LayerRopes>,
    options: RvqOptions,
    path: String,
    lens: Vec<usize>,
    /// [layers] of (keys, values)
    parts: Vec<[PartStore; 2]>,
}

impl RvqCache {
    /// A cache over loaded codebooks (shared with them where the options keep them as they are).
    pub fn new(
        shape: CacheShape,
        rope: Arc<LayerRopes>,
        books: Arc<Codebooks>,
        options: RvqOptions,
        path: String,
    ) -> Result<Self, CacheError> {
        let layers = books
            .layers
            .iter()
            .map(|b| {
                let prepare = |q: &Option<Arc<Rvq>>| {
                    q.clone()
                        .map(|q| prepare_quantizer(q, &options))
                        .transpose()
                };
                Ok((prepare(&b.keys)?, prepare(&b.values)?))
            })
            .collect::<Result<_, CacheError>>()?;
        Self::from_quantizers(shape, rope, &books.meta, layers, options, path)
    }

    /// A cache over quantizers already prepared by [`prepare_quantizer`] (as
    /// [`Codebooks::load_converted`] can, one layer at a time).
    pub fn from_quantizers(
        shape: CacheShape,
        rope: Arc<LayerRopes>,
        meta: &CodebookMeta,
        layers: Vec<ConvertedLayer<Arc<dyn Quantizer>>>,
        options: RvqOptions,
        path: String,
    ) -> Result<Self, CacheError> {
        let m = &meta.model;
        if (m.layers, m.kv_heads, m.head_dim) != (shape.layers, shape.kv_heads, shape.head_dim) {
            return Err(CacheError::Codebooks(format!(
                "codebooks are for {} layers x {} KV heads x {}, the model has {} x {} x {}",
                m.layers, m.kv_heads, m.head_dim, shape.layers, shape.kv_heads, shape.head_dim
            )));
        }
        if options.beam == 0 {
            return Err(CacheError::Codebooks(
                "beam width must be at least 1".into(),
            ));
        }
        if layers.len() != m.layers {
            return Err(CacheError::Codebooks(format!(
                "{} layers of quantizers for {} layers of settings",
                layers.len(),
                m.layers
            )));
        }
        // A beam keeps `beam` candidates of C codewords each: wider than C searches nothing more
        // and only allocates (a huge beam would abort on its allocation).
        let codewords = layers
            .iter()
            .flat_map(|(k, v)| k.iter().chain(v))
            .map(|q| q.size())
            .min();
        if let Some(c) = codewords.filter(|&c| options.beam > c) {
            return Err(CacheError::Codebooks(format!(
                "beam={} exceeds the {c} codewords per stage (1 ≤ beam ≤ {c})",
                options.beam
            )));
        }
        let part = |q: Option<Arc<dyn Quantizer>>, layout: Option<VectorLayout>, on: bool| {
            let quant = match (q, layout, on) {
                (Some(q), Some(l), true) => Some((q, l)),
                _ => None,
            };
            let rows = quant
                .as_ref()
                .map_or(0, |(q, l): &(Arc<dyn Quantizer>, VectorLayout)| {
                    l.groups() * q.stages()
                });
            let bits = quant.as_ref().map_or(1, |(q, _)| q.code_bits());
            let head = HeadStore {
                sinks: vec![],
                codes: PackedRows::new(rows, bits),
                scales: vec![],
                dropped: 0,
                recent: vec![],
            };
            let few = match (&quant, options.lane_encoder) {
                (Some((q, _)), true) => FewVectorEncoder::new(q.as_ref()).map(Arc::new),
                _ => None,
            };
            Ok(PartStore {
                quant,
                group_rope: None,
                few,
                heads: vec![head; shape.kv_heads],
            })
        };
        let parts = layers
            .into_iter()
            .enumerate()
            .map(|(l, (k, v))| {
                let mut keys = part(k, meta.key_layout(), options.quantize_keys)?;
                keys.group_rope = keys
                    .quant
                    .as_ref()
                    .and_then(|(_, layout)| GroupRope::new(rope.layer(l), layout));
                Ok([keys, part(v, meta.value_layout(), options.quantize_values)?])
            })
            .collect::<Result<_, CacheError>>()?;
        Ok(Self {
            shape,
            rope,
            options,
            path,
            lens: vec![0; shape.layers],
            parts,
        })
    }

    /// Switches how attention reduces coded values (to compare the paths on one cache state).
    pub fn set_value_path(&mut self, path: ValuePath) {
        self.options.values = path;
    }

    /// Switches how attention scores coded keys (to compare the paths on one cache state).
    pub fn set_key_path(&mut self, path: KeyPath) {
        self.options.keys = path;
    }
}

impl PartStore {
    /// Stores `x` ([tokens, kv_heads, hd]) for positions `first_pos..`.
    fn append(
        &mut self,
        x: &[f32],
        first_pos: usize,
        hd: usize,
        opt: &RvqOptions,
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
        // One batch for all heads: they share the layer's quantizer.
        let counts: Vec<usize> = to_encode.iter().map(|v| v.len() / hd).collect();
        let all: Vec<f32> = to_encode.concat();
        if all.is_empty() {
            return Ok(());
        }
        let (scales, codes) = layout
            .encode_with(q.as_ref(), &all, opt.beam, self.few.as_deref())
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
    fn spans(&self, head: usize, hd: usize) -> (usize, usize) {
        let store = &self.heads[head];
        let a = store.sinks.len() / hd;
        (a, a + store.dropped + store.scales.len())
    }

    /// Hints the CPU to read the packed codes of `head` at `positions` into its caches (the
    /// coded ones among them), ahead of the scoring or reducing that will unpack them.
    fn prefetch_codes(&self, head: usize, positions: Range<usize>, hd: usize) {
        let (kept, b) = (self.first_kept_code(head, hd), self.spans(head, hd).1);
        let (start, end) = (positions.start.max(kept), positions.end.min(b));
        if self.quant.is_some() && start < end {
            self.heads[head]
                .codes
                .prefetch_rows(start - kept, end - start);
        }
    }

    /// The first position still readable after the sinks (codes dropped before it).
    fn first_kept_code(&self, head: usize, hd: usize) -> usize {
        self.heads[head].sinks.len() / hd + self.heads[head].dropped
    }

    /// Drops the codes of positions before `pos` (sinks and the recent window stay; a part
    /// stored in f16 keeps everything).
    fn forget_before(&mut self, pos: usize, hd: usize) {
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

    fn read(&self, head: usize, positions: Range<usize>, hd: usize, out: &mut [f32]) {
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
            // Callers check that no dropped position is asked for.
            let first = coded.start - self.first_kept_code(head, hd);
            let (mut codes, mut scales) = (vec![], vec![]);
            store.unpack(first, coded.len(), &mut codes, &mut scales);
            layout.decode_rows(q.as_ref(), &scales, &codes, &mut out[dst(&coded)]);
        }
        let recent = clip(b, usize::MAX);
        if !recent.is_empty() {
            rvq::codec::f16_to_f32(
                &store.recent[(recent.start - b) * hd..(recent.end - b) * hd],
                &mut out[dst(&recent)],
            );
        }
    }

    /// Scores of `q` ([rows, hd], rotated, channel order) against the keys of `span` (see
    /// [`attention::KeyScorer`]): coded positions through the fused kernel when the layout
    /// allows it; windows (and everything otherwise) through `dense`, which scores a sub-span by
    /// dense reads into [rows, sub.len()].
    #[allow(clippy::too_many_arguments)]
    fn score_keys(
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
        let store = &self.heads[head];
        let (mut codes, mut scales) = (vec![], vec![]);
        store.unpack(
            coded.start - self.first_kept_code(head, hd),
            coded.len(),
            &mut codes,
            &mut scales,
        );
        let mut q_groups = vec![0f32; q.len()];
        for (qg, qr) in q_groups.chunks_exact_mut(hd).zip(q.chunks_exact(hd)) {
            group_rope.to_group_order(qr, qg);
        }
        let at = coded.start - span.start;
        rvq_attention::key_scores(
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
    fn reduce_values(
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
        let store = &self.heads[head];
        let (groups, d) = (layout.groups(), layout.group_dim);
        let (mut codes, mut scales) = (vec![], vec![]);
        store.unpack(
            coded.start - self.first_kept_code(head, hd),
            coded.len(),
            &mut codes,
            &mut scales,
        );
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
            rvq_attention::fused_value_sums(q.as_ref(), groups, &codes, &weights, &mut sums);
        } else {
            // [coded, lanes]: p[r, t] · s_t, rows padded with zeros.
            let lanes = rows.next_multiple_of(rvq_attention::HIST_LANES);
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
            let mut hist = vec![0f32; rvq_attention::histogram_len(q.as_ref(), groups, rows)];
            rvq_attention::value_histograms(q.as_ref(), groups, &codes, &weights, &mut hist);
            rvq_attention::histograms_times_codebooks(q.as_ref(), groups, &hist, rows, &mut sums);
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
            for (a, b) in o.iter_mut().zip(x.iter()) {
                *a += b;
            }
        }
    }

    fn bytes(&self) -> u64 {
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
    fn bytes_at(&self, tokens: usize, hd: usize, opt: &RvqOptions) -> u64 {
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

    /// Bytes held whatever the context: the codebooks and any lane copy of them.
    fn fixed_bytes(&self) -> u64 {
        let books = self.quant.as_ref().map_or(0, |(q, _)| q.bytes());
        books + self.few.as_ref().map_or(0, |f| f.bytes())
    }

    fn truncate(&mut self, len: usize, hd: usize) {
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

/// Whether [`rvq_attention::fused_value_sums`] takes values of `q` for `rows` query rows.
fn fused_values(rows: usize, q: &dyn Quantizer) -> bool {
    q.dim() == 32 && rows <= rvq_attention::FUSED_ROWS
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

impl KvCache for RvqCache {
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn rope(&self, layer: usize) -> &Rope {
        self.rope.layer(layer)
    }
    fn spec(&self) -> String {
        let o = &self.options;
        let mut s = format!("rvq:{}", self.path);
        if o.sinks > 0 {
            s += &format!(",sinks={}", o.sinks);
        }
        if o.recent > 0 {
            s += &format!(",recent={}", o.recent);
        }
        if o.beam > 1 {
            s += &format!(",beam={}", o.beam);
        }
        if let Some(k) = o.stages {
            s += &format!(",stages={k}");
        }
        match o.values {
            ValuePath::Auto => {}
            ValuePath::Decode => s += ",values=decode",
            ValuePath::Fused => s += ",values=fused",
            ValuePath::Histogram => s += ",values=histogram",
        }
        if o.keys == KeyPath::Decode {
            s += ",keys=decode";
        }
        if o.lane_encoder {
            s += ",encode=lanes";
        }
        match o.books {
            BookPrecision::F32 => s += ",books=f32",
            BookPrecision::F16 => s += ",books=f16",
            BookPrecision::I8 => {}
        }
        match (o.quantize_keys, o.quantize_values) {
            (true, false) => s += ",only=k",
            (false, true) => s += ",only=v",
            _ => {}
        }
        s
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), CacheError> {
        let tokens = check_append(&self.shape, layer, k, v)?;
        let hd = self.shape.head_dim;
        let first = self.lens[layer];
        let options = &self.options;
        let [pk, pv] = &mut self.parts[layer];
        // Keys and values have their own quantizers: encode them on two cores at once (a decode
        // step's encode streams every stage's codebook and is bound by memory, per core).
        let (rk, rv) = rayon::join(
            || pk.append(k, first, hd, options),
            || pv.append(v, first, hd, options),
        );
        rk?;
        rv?;
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
        let store = &self.parts[layer][part as usize];
        let hd = self.shape.head_dim;
        let (a, first_kept) = (store.spans(head, hd).0, store.first_kept_code(head, hd));
        if first_kept > a && positions.start < first_kept && positions.end > a {
            return Err(CacheError::Shape(format!(
                "positions {positions:?} of layer {layer} were dropped (sliding window: coded \
                 positions {a}..{first_kept} are gone)"
            )));
        }
        store.read(head, positions, hd, out);
        Ok(())
    }

    fn attend(&self, layer: usize, queries: &Queries, out: &mut [f32]) -> Result<(), CacheError> {
        let hd = self.shape.head_dim;
        let [keys, values] = &self.parts[layer];
        let rope = self.rope.layer(layer);
        let dense = |h: usize, q: &[f32], span: Range<usize>, scores: &mut [f32]| {
            attention::dense_key_scores(self, layer, h, q, span, scores)
        };
        let score = |h: usize, q: &[f32], span: Range<usize>, scores: &mut [f32]| {
            // Attention scores a head's keys block after block and then reduces their values:
            // the next block's key codes and this block's value codes load while it scores.
            let next = span.end..span.end + span.len();
            keys.prefetch_codes(h, next, hd);
            values.prefetch_codes(h, span.clone(), hd);
            keys.score_keys(self.options.keys, h, q, span, rope, &dense, scores)
        };
        let reduce = |h: usize, probs: &[f32], first_key: usize, n: usize, o: &mut [f32]| {
            values.reduce_values(self.options.values, h, probs, first_key, n, hd, o);
            Ok(())
        };
        attention::attention_with(self, layer, queries, out, &score, &reduce)
    }

    fn memory(&self) -> MemoryReport {
        let hd = self.shape.head_dim as u64;
        // Positions a sliding window dropped are no longer represented.
        let held: u64 = self
            .parts
            .iter()
            .zip(&self.lens)
            .flat_map(|(p, &len)| {
                p.iter()
                    .flat_map(move |s| s.heads.iter().map(move |h| (len - h.dropped) as u64))
            })
            .sum();
        MemoryReport {
            elements: held * hd,
            bytes: self
                .parts
                .iter()
                .flat_map(|p| p.iter().map(PartStore::bytes))
                .sum(),
            fixed_bytes: self
                .parts
                .iter()
                .flatten()
                .map(PartStore::fixed_bytes)
                .sum(),
        }
    }

    fn bytes_at(&self, tokens: usize) -> u64 {
        let hd = self.shape.head_dim;
        self.parts
            .iter()
            .flatten()
            .map(|p| p.bytes_at(tokens, hd, &self.options) * p.heads.len() as u64)
            .sum()
    }

    fn truncate(&mut self, len: usize) {
        let hd = self.shape.head_dim;
        for (l, parts) in self.parts.iter_mut().enumerate() {
            let keep = self.lens[l].min(len);
            parts.iter_mut().for_each(|p| p.truncate(keep, hd));
            self.lens[l] = keep;
        }
    }

    fn forget_before(&mut self, layer: usize, pos: usize) {
        let hd = self.shape.head_dim;
        if let Some(parts) = self.parts.get_mut(layer) {
            parts.iter_mut().for_each(|p| p.forget_before(pos, hd));
        }
    }

    fn box_clone(&self) -> Box<dyn KvCache> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codebooks::{CodebookMeta, LayerBooks, PartSettings};
    use crate::{ModelIdentity, RopeLayout};
    use rvq::rng::SplitMix64;
    use rvq::Grouping;

    const SHAPE: CacheShape = CacheShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 8,
    };

    fn identity() -> ModelIdentity {
        ModelIdentity {
            architecture: "llama".into(),
            layers: 2,
            kv_heads: 2,
            head_dim: 8,
            file_sha256: "ab".repeat(32),
        }
    }

    /// Random codebooks whose values f16 holds exactly, so the default f16 cache and the f32
    /// references built from them agree (f16 rounding is tested on its own).
    fn random_rvq(rng: &mut SplitMix64, d: usize, c: usize, k: usize) -> Rvq {
        HalfRvq::from_rvq(&unrounded_rvq(rng, d, c, k))
            .unwrap()
            .to_rvq()
    }

    fn unrounded_rvq(rng: &mut SplitMix64, d: usize, c: usize, k: usize) -> Rvq {
        let cbs = (0..k)
            .map(|s| {
                (0..c * d)
                    .map(|_| (rng.unit() as f32 - 0.5) / (s + 1) as f32)
                    .collect()
            })
            .collect();
        Rvq::from_codebooks(d, c, cbs).unwrap()
    }

    fn books(seed: u64) -> Codebooks {
        let mut rng = SplitMix64::new(seed);
        let layers = (0..2)
            .map(|_| LayerBooks {
                keys: Some(random_rvq(&mut rng, 4, 5, 3).into()),
                values: Some(random_rvq(&mut rng, 4, 5, 3).into()),
            })
            .collect();
        let meta = CodebookMeta {
            model: identity(),
            keys: Some(PartSettings {
                group_dim: 4,
                grouping: Grouping::Strided,
                scaled: true,
                rotation: None,
            }),
            values: Some(PartSettings {
                group_dim: 4,
                grouping: Grouping::Contiguous,
                scaled: true,
                rotation: None,
            }),
            skipped_layers: vec![],
            calibration: serde_json::Value::Null,
            reports: vec![(None, None), (None, None)],
        };
        Codebooks { meta, layers }
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n).map(|_| (rng.unit() as f32 - 0.5) * 3.0).collect()
    }

    /// Query rows `first..first + rows` of `q` for [`SHAPE`]: 4 query heads of 8.
    fn small_queries(q: &[f32], first: usize, rows: usize, window: Option<usize>) -> Queries<'_> {
        Queries {
            q: &q[first * 32..(first + rows) * 32],
            tokens: rows,
            q_heads: 4,
            first_pos: first,
            scale: 0.3,
            window,
        }
    }

    /// Query rows `first..first + rows` of `q` for [`paper_shaped`] caches: 6 query heads of 64.
    fn paper_queries(q: &[f32], first: usize, rows: usize, window: Option<usize>) -> Queries<'_> {
        Queries {
            q: &q[first * 384..(first + rows) * 384],
            tokens: rows,
            q_heads: 6,
            first_pos: first,
            scale: 0.125,
            window,
        }
    }

    fn rope() -> Arc<LayerRopes> {
        Arc::new(Rope::new(8, 10000.0, 64, RopeLayout::Interleaved).into())
    }

    /// Slow reference of one stored head vector: scale = f16(std), strided/contiguous split,
    /// greedy codes, decode, merge, times the scale.
    fn reference(q: &Rvq, layout: &VectorLayout, v: &[f32]) -> Vec<f32> {
        let (scales, codes) = layout.encode(q, v, 1).unwrap();
        let mut out = vec![0f32; 8];
        let mut scratch = vec![0f32; 8];
        layout.decode_one(q, scales[0], &codes, &mut scratch, &mut out);
        out
    }

    #[test]
    fn reads_return_decode_of_encode_and_memory_is_exact() {
        for rotation in [None, rvq::hadamard::Hadamard::largest_block(8)] {
            let mut b = books(1);
            for p in [&mut b.meta.keys, &mut b.meta.values] {
                p.as_mut().unwrap().rotation = rotation;
            }
            reads_return_decode_of_encode(Arc::new(b));
        }
    }

    /// The default options but f16 books: [`books`]' codewords are f16 values, so the cache
    /// computes with exactly the reference's codewords (i8 books are tested on their own).
    fn exact_books() -> RvqOptions {
        RvqOptions {
            books: BookPrecision::F16,
            ..RvqOptions::default()
        }
    }

    fn reads_return_decode_of_encode(b: Arc<Codebooks>) {
        let mut cache = RvqCache::new(SHAPE, rope(), b.clone(), exact_books(), "x".into()).unwrap();
        let tokens = 7;
        let k = data(tokens * 16, 2);
        let v = data(tokens * 16, 3);
        // Append in two pieces (prefill then decode) to exercise both paths.
        cache.append(1, &k[..5 * 16], &v[..5 * 16]).unwrap();
        cache.append(1, &k[5 * 16..], &v[5 * 16..]).unwrap();
        let (kl, vl) = (b.key_layout().unwrap(), b.value_layout().unwrap());
        for h in 0..2 {
            let mut keys = vec![0f32; tokens * 8];
            let mut values = vec![0f32; tokens * 8];
            cache.read_keys(1, h, 0..tokens, &mut keys).unwrap();
            cache.read_values(1, h, 0..tokens, &mut values).unwrap();
            for t in 0..tokens {
                let src = (t * 2 + h) * 8;
                let want_k = reference(b.layers[1].keys.as_ref().unwrap(), &kl, &k[src..src + 8]);
                let want_v = reference(b.layers[1].values.as_ref().unwrap(), &vl, &v[src..src + 8]);
                // Equal up to float rounding (the fast decoder scales before rotating back).
                for (got, want) in [(&keys, &want_k), (&values, &want_v)] {
                    for (a, b) in got[t * 8..(t + 1) * 8].iter().zip(want) {
                        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
            }
        }
        // Memory: per vector ceil(2 groups × 3 stages × 3 bits / 8) = 3 bytes of codes + 2 of scale.
        let m = cache.memory();
        assert_eq!(m.elements, (tokens * 2 * 8 * 2) as u64);
        assert_eq!(m.bytes, (tokens * 2 * 2 * (3 + 2)) as u64);
        // Codebooks: 2 layers × K and V × 3 stages × 5 codewords × (4 values in f16, an f32 norm).
        assert_eq!(m.fixed_bytes, 2 * 2 * 3 * 5 * (4 * 2 + 4));
    }

    #[test]
    fn histogram_and_decode_value_paths_give_the_same_attention() {
        let b = Arc::new(books(6));
        let tokens = 40;
        let k = data(tokens * 16, 11);
        let v = data(tokens * 16, 12);
        let q = data(tokens * 4 * 8, 13);
        let cache_with = |values| {
            let o = RvqOptions {
                sinks: 2,
                recent: 5,
                values,
                ..RvqOptions::default()
            };
            let mut c = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
            c.append(0, &k, &v).unwrap();
            c
        };
        for (first, rows) in [(0, tokens), (tokens - 1, 1), (tokens - 3, 3)] {
            let queries = small_queries(&q, first, rows, None);
            let mut reference = vec![0f32; rows * 32];
            let decode = cache_with(ValuePath::Decode);
            // The generic path reads dense values through `read`: an independent reference.
            attention::dense_attention(&decode, 0, &queries, &mut reference).unwrap();
            for path in [ValuePath::Decode, ValuePath::Histogram, ValuePath::Auto] {
                let mut out = vec![0f32; rows * 32];
                cache_with(path).attend(0, &queries, &mut out).unwrap();
                for (a, r) in out.iter().zip(&reference) {
                    assert!((a - r).abs() < 1e-5, "{path:?} rows {rows}: {a} vs {r}");
                }
            }
        }
    }

    /// Paper-shaped groups (d = 32 of a 64-channel head, so the d = 32 fast paths run) with
    /// small codebooks, one layer.
    fn paper_shaped(keys: Grouping, seed: u64) -> (CacheShape, Codebooks) {
        let mut rng = SplitMix64::new(seed);
        let shape = CacheShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 64,
        };
        let part = |grouping| {
            Some(PartSettings {
                group_dim: 32,
                grouping,
                scaled: true,
                rotation: None,
            })
        };
        let meta = CodebookMeta {
            model: ModelIdentity {
                layers: 1,
                head_dim: 64,
                ..identity()
            },
            keys: part(keys),
            values: part(Grouping::Contiguous),
            skipped_layers: vec![],
            calibration: serde_json::Value::Null,
            reports: vec![(None, None)],
        };
        let layers = vec![LayerBooks {
            keys: Some(unrounded_rvq(&mut rng, 32, 37, 3).into()),
            values: Some(unrounded_rvq(&mut rng, 32, 37, 3).into()),
        }];
        (shape, Codebooks { meta, layers })
    }

    /// A cache over `books` with (sinks, recent) windows and (keys, values) paths, holding
    /// `k` and `v` in layer 0.
    fn filled(
        shape: CacheShape,
        rope: &Arc<LayerRopes>,
        books: &Arc<Codebooks>,
        (sinks, recent): (usize, usize),
        (keys, values): (KeyPath, ValuePath),
        k: &[f32],
        v: &[f32],
    ) -> RvqCache {
        let o = RvqOptions {
            sinks,
            recent,
            keys,
            values,
            ..RvqOptions::default()
        };
        let mut c = RvqCache::new(shape, rope.clone(), books.clone(), o, "x".into()).unwrap();
        c.append(0, k, v).unwrap();
        c
    }

    #[test]
    fn fused_keys_and_fused_or_histogram_values_equal_dense_attention_at_every_level() {
        let tokens = 300; // crosses the 64- and 256-position blocks
        let (k, v) = (data(tokens * 128, 21), data(tokens * 128, 22));
        let q = data(tokens * 6 * 64, 23);
        for (grouping, rope_layout) in [
            (Grouping::Strided, RopeLayout::Interleaved),
            (Grouping::Strided, RopeLayout::HalfSplit),
            (Grouping::Contiguous, RopeLayout::Interleaved),
        ] {
            let (shape, b) = paper_shaped(grouping, 5);
            let b = Arc::new(b);
            let rope: Arc<LayerRopes> = Arc::new(Rope::new(64, 500.0, 400, rope_layout).into());
            for (sinks, recent) in [(0, 0), (3, 20)] {
                let cache_with = |keys, values| {
                    filled(shape, &rope, &b, (sinks, recent), (keys, values), &k, &v)
                };
                let reference_cache = cache_with(KeyPath::Decode, ValuePath::Decode);
                for values in [ValuePath::Histogram, ValuePath::Fused] {
                    let fast = cache_with(KeyPath::Fused, values);
                    let group_rope = fast.parts[0][0].group_rope.as_ref();
                    assert!(group_rope.is_some(), "{grouping:?} {rope_layout:?}");
                    // A decode step's rows take the fused kernel where the head shape allows it.
                    let (q0, _) = fast.parts[0][0].quant.as_ref().unwrap();
                    assert_eq!(
                        rvq_attention::fuses(q0.as_ref(), group_rope.unwrap()),
                        grouping == Grouping::Strided && rope_layout == RopeLayout::Interleaved
                    );
                    for (first, rows, window) in [
                        (tokens - 1, 1, None),
                        (tokens - 3, 3, Some(100)),
                        (0, tokens, None),
                    ] {
                        let queries = paper_queries(&q, first, rows, window);
                        // Dense reads (`read` → RoPE → products): an independent reference.
                        let mut want = vec![0f32; rows * 384];
                        attention::dense_attention(&reference_cache, 0, &queries, &mut want)
                            .unwrap();
                        let each = rvq::simd::at_each_level(|_| {
                            let mut out = vec![0f32; rows * 384];
                            fast.attend(0, &queries, &mut out).unwrap();
                            out
                        });
                        for (level, out) in &each {
                            for (a, r) in out.iter().zip(&want) {
                                let what = format!("{grouping:?} {rope_layout:?} {values:?} sinks {sinks} recent {recent} rows {rows} {level:?}");
                                assert!(
                                    (a - r).abs() < 1e-4 * (1.0 + r.abs()),
                                    "{what}: {a} vs {r}"
                                );
                            }
                        }
                        // Every compiled version gives the same bits.
                        assert!(each.iter().all(|(_, o)| *o == each[0].1));
                    }
                }
            }
        }
    }

    #[test]
    fn a_decode_step_over_key_parts_equals_dense_attention() {
        // 2,200 keys: a decode step scores and reduces them in two parts, each a task.
        let tokens = 2200;
        let (k, v) = (data(tokens * 128, 51), data(tokens * 128, 52));
        let q = data(tokens * 384, 53);
        let (shape, b) = paper_shaped(Grouping::Strided, 7);
        let b = Arc::new(b);
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(64, 500.0, tokens + 1, RopeLayout::Interleaved).into());
        for (sinks, recent, window) in [(0, 0, None), (4, 50, None), (0, 0, Some(2100))] {
            let cache_with =
                |keys, values| filled(shape, &rope, &b, (sinks, recent), (keys, values), &k, &v);
            let queries = paper_queries(&q, tokens - 1, 1, window);
            // The f64 reference on the cache's own decoded keys and values ([tokens, 2, 64]).
            let reference = cache_with(KeyPath::Decode, ValuePath::Decode);
            let (mut dk, mut dv) = (vec![0f32; tokens * 128], vec![0f32; tokens * 128]);
            for h in 0..2 {
                let mut rows = vec![0f32; tokens * 64];
                for (part, dense) in [(Part::Keys, &mut dk), (Part::Values, &mut dv)] {
                    reference.read(0, h, part, 0..tokens, &mut rows).unwrap();
                    for (t, r) in rows.chunks_exact(64).enumerate() {
                        dense[(t * 2 + h) * 64..(t * 2 + h + 1) * 64].copy_from_slice(r);
                    }
                }
            }
            let want = attention::reference_attention_from(
                &dk,
                &dv,
                queries.q,
                tokens - 1,
                rope.layer(0),
                shape,
                6,
                window,
            );
            let mut got = vec![0f32; 384];
            cache_with(KeyPath::Fused, ValuePath::Auto)
                .attend(0, &queries, &mut got)
                .unwrap();
            for (a, r) in got.iter().zip(&want) {
                assert!(
                    (a - r).abs() < 1e-4 * (1.0 + r.abs()),
                    "{sinks} {recent} {window:?}: {a} vs {r}"
                );
            }
        }
    }

    /// Every codeword rounded to f16 (kept in f32).
    fn round_to_f16(b: &mut Codebooks) {
        let round = |q: &Arc<Rvq>| Arc::new(HalfRvq::from_rvq(q).unwrap().to_rvq());
        for layer in &mut b.layers {
            layer.keys = layer.keys.as_ref().map(round);
            layer.values = layer.values.as_ref().map(round);
        }
    }

    #[test]
    fn f16_books_are_the_f32_books_rounded_to_f16_at_half_the_bytes() {
        let tokens = 300;
        let (k, v) = (data(tokens * 128, 41), data(tokens * 128, 42));
        let q = data(tokens * 6 * 64, 43);
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(64, 500.0, 400, RopeLayout::Interleaved).into());
        let cache_with = |half_books: bool| {
            let (shape, mut b) = paper_shaped(Grouping::Strided, 9);
            if !half_books {
                round_to_f16(&mut b);
            }
            let o = RvqOptions {
                books: match half_books {
                    true => BookPrecision::F16,
                    false => BookPrecision::F32,
                },
                ..RvqOptions::default()
            };
            let mut c = RvqCache::new(shape, rope.clone(), Arc::new(b), o, "x".into()).unwrap();
            // A prefill (the batch encoder), then decode steps (the few-vector one).
            c.append(0, &k[..290 * 128], &v[..290 * 128]).unwrap();
            for t in 290..tokens {
                let at = t * 128..(t + 1) * 128;
                c.append(0, &k[at.clone()], &v[at]).unwrap();
            }
            c
        };
        let (mut half, mut full) = (cache_with(true), cache_with(false));
        assert!(full.spec().ends_with(",books=f32"));
        for (h, part) in [(0, Part::Keys), (1, Part::Values)] {
            let (mut a, mut b) = (vec![0f32; tokens * 64], vec![0f32; tokens * 64]);
            half.read(0, h, part, 0..tokens, &mut a).unwrap();
            full.read(0, h, part, 0..tokens, &mut b).unwrap();
            assert_eq!(a, b, "{part:?}");
        }
        for values in [ValuePath::Histogram, ValuePath::Decode] {
            half.set_value_path(values);
            full.set_value_path(values);
            for (first, rows) in [(tokens - 1, 1), (0, tokens)] {
                let queries = paper_queries(&q, first, rows, None);
                let (mut a, mut b) = (vec![0f32; rows * 384], vec![0f32; rows * 384]);
                half.attend(0, &queries, &mut a).unwrap();
                full.attend(0, &queries, &mut b).unwrap();
                assert_eq!(a, b, "{values:?}, {rows} rows");
            }
        }
        let (mh, mf) = (half.memory(), full.memory());
        assert_eq!(mh.bytes, mf.bytes);
        // Two parts × 3 stages × 37 codewords × (32 values in 2 bytes instead of 4, an f32 norm).
        assert_eq!(
            (mh.fixed_bytes, mf.fixed_bytes),
            (2 * 3 * 37 * (32 * 2 + 4), 2 * 3 * 37 * (32 * 4 + 4))
        );
    }

    #[test]
    fn i8_books_attend_as_the_f32_books_of_their_dequantized_codewords() {
        let tokens = 300;
        let (k, v) = (data(tokens * 128, 44), data(tokens * 128, 45));
        let q = data(tokens * 6 * 64, 46);
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(64, 500.0, 400, RopeLayout::Interleaved).into());
        let (shape, b) = paper_shaped(Grouping::Strided, 9);
        let mut dequantized = b.clone();
        let back = |q: &Arc<Rvq>| Arc::new(I8Rvq::from_rvq(q).unwrap().to_rvq());
        for layer in &mut dequantized.layers {
            layer.keys = layer.keys.as_ref().map(back);
            layer.values = layer.values.as_ref().map(back);
        }
        let cache_with = |b: Codebooks, books| {
            let o = RvqOptions {
                books,
                ..RvqOptions::default()
            };
            let mut c = RvqCache::new(shape, rope.clone(), Arc::new(b), o, "x".into()).unwrap();
            // A prefill (the batch encoder), then decode steps (the few-vector search on i8).
            c.append(0, &k[..290 * 128], &v[..290 * 128]).unwrap();
            for t in 290..tokens {
                let at = t * 128..(t + 1) * 128;
                c.append(0, &k[at.clone()], &v[at]).unwrap();
            }
            c
        };
        let mut int8 = cache_with(b, BookPrecision::I8);
        let mut full = cache_with(dequantized, BookPrecision::F32);
        assert!(!int8.spec().contains(",books="), "i8 is the default");
        assert!(full.spec().ends_with(",books=f32"));
        assert!("i8".parse::<BookPrecision>() == Ok(BookPrecision::I8));
        let close = |a: &[f32], b: &[f32], what: &str| {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{what}: differs by {worst}");
        };
        // Random codebooks leave no near ties in these few decode steps: the same codes.
        for (h, part) in [(0, Part::Keys), (1, Part::Values)] {
            let (mut a, mut b) = (vec![0f32; tokens * 64], vec![0f32; tokens * 64]);
            int8.read(0, h, part, 0..tokens, &mut a).unwrap();
            full.read(0, h, part, 0..tokens, &mut b).unwrap();
            close(&a, &b, &format!("{part:?}"));
        }
        for values in [ValuePath::Fused, ValuePath::Histogram, ValuePath::Decode] {
            int8.set_value_path(values);
            full.set_value_path(values);
            for (first, rows) in [(tokens - 1, 1), (0, tokens)] {
                let queries = paper_queries(&q, first, rows, None);
                let (mut a, mut b) = (vec![0f32; rows * 384], vec![0f32; rows * 384]);
                int8.attend(0, &queries, &mut a).unwrap();
                full.attend(0, &queries, &mut b).unwrap();
                close(&a, &b, &format!("{values:?}, {rows} rows"));
            }
        }
        // Two parts × (3 stages × (37 codewords × (32 bytes + an f32 norm) + 32 f32 scales +
        // 32 i16 multipliers + a bound of two f32) + 32 f32 units).
        assert_eq!(
            int8.memory().fixed_bytes,
            2 * (3 * (37 * (32 + 4) + 32 * 4 + 32 * 2 + 8) + 32 * 4)
        );
    }

    #[test]
    fn lane_encoder_stores_the_codes_of_the_default_encoder_for_its_bytes() {
        let (shape, mut b) = paper_shaped(Grouping::Strided, 8);
        // Codewords that f16 holds exactly, so the lane encoder's f16 search sees the very
        // codewords the default encoder does (its rounding is tested in `rvq::few`).
        round_to_f16(&mut b);
        let b = Arc::new(b);
        let rope: Arc<LayerRopes> =
            Arc::new(Rope::new(64, 500.0, 64, RopeLayout::Interleaved).into());
        let cache_with = |lane_encoder| {
            let o = RvqOptions {
                lane_encoder,
                ..RvqOptions::default()
            };
            RvqCache::new(shape, rope.clone(), b.clone(), o, "x".into()).unwrap()
        };
        let (mut plain, mut lanes) = (cache_with(false), cache_with(true));
        assert!(lanes.spec().ends_with(",encode=lanes"));
        let (k, v) = (data(20 * 128, 31), data(20 * 128, 32));
        // A 12-token prefill, then decode steps of one token.
        for (t0, t1) in [(0, 12), (12, 13), (13, 14), (14, 20)] {
            let (kt, vt) = (&k[t0 * 128..t1 * 128], &v[t0 * 128..t1 * 128]);
            plain.append(0, kt, vt).unwrap();
            lanes.append(0, kt, vt).unwrap();
        }
        for (h, part) in [(0, Part::Keys), (1, Part::Values)] {
            let (mut a, mut c) = (vec![0f32; 20 * 64], vec![0f32; 20 * 64]);
            plain.read(0, h, part, 0..20, &mut a).unwrap();
            lanes.read(0, h, part, 0..20, &mut c).unwrap();
            assert_eq!(a, c, "{part:?}");
        }
        let (mp, ml) = (plain.memory(), lanes.memory());
        assert_eq!(mp.bytes, ml.bytes);
        // Two parts × 3 stages × 48 padded codewords × 32 × 2 bytes (f16).
        let copy = if rvq::lanes::available(32) {
            2 * 3 * 48 * 32 * 2
        } else {
            0
        };
        assert_eq!(ml.fixed_bytes - mp.fixed_bytes, copy);
    }

    #[test]
    fn path_options_parse_and_name_their_choices() {
        assert_eq!("decode".parse::<KeyPath>(), Ok(KeyPath::Decode));
        assert_eq!("histogram".parse::<ValuePath>(), Ok(ValuePath::Histogram));
        assert_eq!("fused".parse::<ValuePath>(), Ok(ValuePath::Fused));
        assert_eq!(
            "x".parse::<KeyPath>().unwrap_err(),
            "keys=x: expected fused or decode"
        );
        assert_eq!(
            "x".parse::<ValuePath>().unwrap_err(),
            "values=x: expected auto, decode, fused or histogram"
        );
        assert_eq!(
            one_of("encode", "lanes", &[("books", 0), ("lanes", 1)]),
            Ok(1)
        );
    }

    #[test]
    fn stages_option_uses_the_first_stages_only() {
        let b = Arc::new(books(2));
        let o = RvqOptions {
            stages: Some(2),
            ..exact_books()
        };
        let mut cache = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
        let v = data(16, 7);
        cache.append(0, &v, &v).unwrap();
        let q = b.layers[0].values.as_ref().unwrap().truncated(2).unwrap();
        let mut got = vec![0f32; 8];
        cache.read_values(0, 0, 0..1, &mut got).unwrap();
        assert_eq!(got, reference(&q, &b.value_layout().unwrap(), &v[..8]));
        // 2 groups × 2 stages × 3 bits = 12 bits → 2 bytes of codes + 2 of scale per vector.
        assert_eq!(cache.memory().bytes, 2 * 2 * (2 + 2));
        let too_deep = RvqOptions {
            stages: Some(4),
            ..RvqOptions::default()
        };
        let e = RvqCache::new(SHAPE, rope(), b, too_deep, "x".into())
            .err()
            .unwrap();
        assert!(e.to_string().contains("stages=4"), "{e}");
    }

    #[test]
    fn sinks_and_recent_window_stay_f16() {
        let b = Arc::new(books(4));
        let o = RvqOptions {
            sinks: 2,
            recent: 3,
            ..exact_books()
        };
        let mut cache = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
        let tokens = 9;
        let k = data(tokens * 16, 5);
        let v = data(tokens * 16, 6);
        for t in 0..tokens {
            cache
                .append(0, &k[t * 16..(t + 1) * 16], &v[t * 16..(t + 1) * 16])
                .unwrap();
        }
        let mut keys = vec![0f32; tokens * 8];
        cache.read_keys(0, 1, 0..tokens, &mut keys).unwrap();
        let kl = b.key_layout().unwrap();
        for t in 0..tokens {
            let src = &k[(t * 2 + 1) * 8..(t * 2 + 2) * 8];
            let want: Vec<f32> = if t < 2 || t >= tokens - 3 {
                src.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
            } else {
                let f16_src: Vec<f32> = src.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
                reference(b.layers[0].keys.as_ref().unwrap(), &kl, &f16_src)
            };
            assert_eq!(&keys[t * 8..(t + 1) * 8], want.as_slice(), "position {t}");
        }
        // 5 positions in f16 (16 bytes per vector), 4 encoded (5 bytes), 2 heads, K and V.
        assert_eq!(cache.memory().bytes, 2 * 2 * (5 * 16 + 4 * 5));
    }

    #[test]
    fn sliding_window_forgets_codes_and_attends_as_a_cache_that_keeps_them() {
        let b = Arc::new(books(5));
        let (tokens, window) = (12, 4);
        let (k, v, q) = (
            data(tokens * 16, 21),
            data(tokens * 16, 22),
            data(tokens * 32, 23),
        );
        for values in [ValuePath::Decode, ValuePath::Histogram] {
            let o = RvqOptions {
                sinks: 1,
                values,
                ..RvqOptions::default()
            };
            let mut keeps = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
            let mut forgets = keeps.clone();
            for t in 0..tokens {
                let queries = small_queries(&q, t, 1, Some(window));
                let (mut want, mut got) = (vec![0f32; 32], vec![0f32; 32]);
                for (cache, out) in [(&mut keeps, &mut want), (&mut forgets, &mut got)] {
                    let (kt, vt) = (&k[t * 16..(t + 1) * 16], &v[t * 16..(t + 1) * 16]);
                    cache.append(0, kt, vt).unwrap();
                    cache.attend(0, &queries, out).unwrap();
                }
                forgets.forget_before(0, (t + 2).saturating_sub(window));
                assert_eq!(got, want, "{values:?} position {t}");
            }
            // Kept: the sink and positions 9..12 (3 coded); gone: coded positions 1..9.
            let per_code = 3 + 2; // bytes of codes (2 groups x 3 stages x 3 bits) and scale
            let kept = 2 * 2 * (16 + 3 * per_code);
            assert_eq!(forgets.memory().bytes, kept as u64);
            // 4 positions held per head and part (the sink and 9..12) of 8 channels.
            assert_eq!(forgets.memory().elements, 2 * 2 * 4 * 8);
            assert_eq!(keeps.memory().bytes, (2 * 2 * (16 + 11 * per_code)) as u64);
            let mut buf = vec![0f32; 8];
            let e = forgets.read_keys(0, 0, 8..9, &mut buf).unwrap_err();
            assert!(e.to_string().contains("dropped"), "{e}");
            let mut same = vec![0f32; 8];
            forgets.read_values(0, 1, 10..11, &mut buf).unwrap();
            keeps.read_values(0, 1, 10..11, &mut same).unwrap();
            assert_eq!(buf, same);
            // The sink stays; truncating into the dropped codes leaves sink-only storage.
            forgets.read_keys(0, 1, 0..1, &mut buf).unwrap();
            forgets.truncate(5);
            assert_eq!(forgets.memory().bytes, 2 * 2 * 16);
            forgets.truncate(0);
            assert_eq!(forgets.memory().bytes, 0);
        }
    }

    #[test]
    fn bytes_at_predicts_the_memory_of_every_length() {
        let b = Arc::new(books(2));
        for (sinks, recent, quantize_values) in [(0, 0, true), (1, 2, true), (3, 0, false)] {
            let o = RvqOptions {
                sinks,
                recent,
                quantize_values,
                ..RvqOptions::default()
            };
            let mut c = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
            assert_eq!(c.bytes_at(0), 0);
            let mut len = 0;
            for (i, step) in [1, 2, 1, 3, 5, 1].into_iter().enumerate() {
                for layer in 0..SHAPE.layers {
                    let seed = (i * 2 + layer) as u64;
                    c.append(layer, &data(step * 16, seed), &data(step * 16, seed + 50))
                        .unwrap();
                }
                len += step;
                assert_eq!(
                    c.bytes_at(len),
                    c.memory().bytes,
                    "{sinks} {recent} at {len}"
                );
            }
        }
    }

    #[test]
    fn truncate_to_zero_is_a_fresh_cache() {
        let b = Arc::new(books(2));
        let o = RvqOptions {
            sinks: 1,
            recent: 2,
            ..RvqOptions::default()
        };
        let mut fresh = RvqCache::new(SHAPE, rope(), b.clone(), o, "x".into()).unwrap();
        let mut reused = fresh.clone();
        reused
            .append(0, &data(6 * 16, 8), &data(6 * 16, 9))
            .unwrap();
        reused.truncate(0);
        assert_eq!(reused.memory().bytes, 0);
        let (k, v) = (data(5 * 16, 10), data(5 * 16, 11));
        fresh.append(0, &k, &v).unwrap();
        reused.append(0, &k, &v).unwrap();
        let (mut a, mut c) = (vec![0f32; 5 * 8], vec![0f32; 5 * 8]);
        fresh.read_values(0, 1, 0..5, &mut a).unwrap();
        reused.read_values(0, 1, 0..5, &mut c).unwrap();
        assert_eq!(a, c);
        assert_eq!(fresh.memory(), reused.memory());
    }

    #[test]
    fn rvq_specs_round_trip_and_bad_choices_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cb.safetensors");
        books(7).save(&path).unwrap();
        let config = crate::CacheConfig {
            shape: SHAPE,
            rope: rope(),
            model_id: Some(identity()),
        };
        let file = format!("rvq:{}", path.display());
        for opts in [
            "",
            ",keys=decode",
            ",encode=lanes,books=f32",
            ",books=f32,only=k",
            ",books=f16",
        ] {
            let spec = format!("{file}{opts}");
            assert_eq!(crate::spec::build(&spec, &config).unwrap().spec(), spec);
        }
        let e = crate::spec::build(&format!("{file},books=f8"), &config)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("books=f8: expected f32, f16 or i8"),
            "{e}"
        );
    }

    #[test]
    fn codebook_files_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cb.safetensors");
        books(7).save(&path).unwrap();
        let back = Codebooks::load(&path).unwrap();
        assert_eq!(back.layers[1].values, books(7).layers[1].values);
        back.check_model(&identity()).unwrap();
        let other = ModelIdentity {
            file_sha256: "cd".repeat(32),
            ..identity()
        };
        assert!(back
            .check_model(&other)
            .unwrap_err()
            .to_string()
            .contains("not for this model"));
        let mut bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
        assert!(Codebooks::load(&cut)
            .unwrap_err()
            .to_string()
            .contains("truncated or corrupted"));
        // Flip bytes inside the JSON header: no longer parses.
        bytes[20] = b'{';
        bytes[21] = b'}';
        let bad = dir.path().join("bad.safetensors");
        std::fs::write(&bad, &bytes).unwrap();
        assert!(Codebooks::load(&bad).is_err());
        // A model of another shape is refused by the cache.
        let shape = CacheShape { layers: 3, ..SHAPE };
        assert!(RvqCache::new(
            shape,
            rope(),
            Arc::new(books(7)),
            RvqOptions::default(),
            "x".into()
        )
        .is_err());
    }
}
