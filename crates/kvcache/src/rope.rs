//! Rotary position embedding applied to keys when they are read from a cache.
//!
//! Caches store keys *before* RoPE (the paper quantizes pre-RoPE keys); attention rotates them
//! at their position on the way out. The cos/sin table is computed once per model, a block of
//! positions at a time as they are first reached.

use std::sync::OnceLock;

/// How channel pairs are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1): GGUF llama models (the convert script permutes q/k weights for this).
    Interleaved,
    /// Pairs (i, i + d/2): GPT-NeoX / HF layout (gemma3, qwen2 in GGUF).
    HalfSplit,
}

/// The RoPE table of every layer. Most models use one table for all layers; gemma3 uses one base
/// for its sliding-window layers and another for its global ones.
#[derive(Clone, Debug)]
pub struct LayerRopes {
    tables: Vec<Rope>,
    /// [layers]: index into `tables`; empty when one table serves every layer.
    table_of_layer: Vec<usize>,
}

impl LayerRopes {
    /// One table per layer kind: layer `l` uses `tables[table_of_layer[l]]`.
    pub fn per_layer(tables: Vec<Rope>, table_of_layer: Vec<usize>) -> Self {
        assert!(
            table_of_layer.iter().all(|&t| t < tables.len()),
            "a layer names a RoPE table that does not exist"
        );
        assert!(
            tables.windows(2).all(|w| w[0].head_dim == w[1].head_dim),
            "RoPE tables of one model share head_dim"
        );
        Self {
            tables,
            table_of_layer,
        }
    }

    /// The same tables computed for `positions` positions (to run past a model's trained
    /// context, where only speed and memory mean anything).
    pub fn with_positions(&self, positions: usize) -> Self {
        let tables = self
            .tables
            .iter()
            .map(|r| Rope::new(r.head_dim, r.theta, positions, r.layout))
            .collect();
        Self {
            tables,
            table_of_layer: self.table_of_layer.clone(),
        }
    }

    /// The table of `layer`.
    #[inline]
    pub fn layer(&self, layer: usize) -> &Rope {
        &self.tables[self.table_of_layer.get(layer).copied().unwrap_or(0)]
    }
}

/// One table for every layer.
impl From<Rope> for LayerRopes {
    fn from(rope: Rope) -> Self {
        Self {
            tables: vec![rope],
            table_of_layer: Vec::new(),
        }
    }
}

/// Positions per block of the rotation table.
const CHUNK: usize = 1024;

/// cos and sin of one block's positions, [CHUNK, head_dim / 2] each.
type Block = (Box<[f32]>, Box<[f32]>);

/// Rotation table for positions `0..max_positions`, computed a block of [`CHUNK`] positions at
/// a time on first use: a model trained to 32K positions holds no table for positions its
/// conversations never reach (Gemma 3's two 32K tables would be 67 MB).
#[derive(Clone, Debug)]
pub struct Rope {
    head_dim: usize,
    layout: RopeLayout,
    theta: f32,
    max_positions: usize,
    /// [head_dim / 2]: theta^(-2i/d)
    inv_freq: Vec<f32>,
    /// [ceil(max_positions / CHUNK)]
    chunks: Vec<OnceLock<Block>>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, max_positions: usize, layout: RopeLayout) -> Self {
        assert!(head_dim.is_multiple_of(2), "RoPE needs an even head_dim");
        let half = head_dim / 2;
        // Same arithmetic as llama.cpp / candle: freq_i = theta^(-2i/d), angle = pos * freq_i.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self {
            head_dim,
            layout,
            theta,
            max_positions,
            inv_freq,
            chunks: (0..max_positions.div_ceil(CHUNK))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// Block `chunk`, computed on first use.
    fn chunk(&self, chunk: usize) -> &Block {
        self.chunks[chunk].get_or_init(|| {
            let half = self.head_dim / 2;
            let mut cos = Vec::with_capacity(CHUNK * half);
            let mut sin = Vec::with_capacity(CHUNK * half);
            for pos in chunk * CHUNK..(chunk + 1) * CHUNK {
                for &f in &self.inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
            (cos.into(), sin.into())
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn layout(&self) -> RopeLayout {
        self.layout
    }
    pub fn theta(&self) -> f32 {
        self.theta
    }
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates one head vector `x` ([head_dim]) to position `pos` in place.
    #[inline]
    pub fn rotate(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (cos, sin) = self.angles(pos);
        match self.layout {
            RopeLayout::Interleaved => {
                for i in 0..half {
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * cos[i] - b * sin[i];
                    x[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
            RopeLayout::HalfSplit => {
                let (lo, hi) = x.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = a * sin[i] + b * cos[i];
                }
            }
        }
    }

    /// Undoes [`Rope::rotate`]: rotates `x` back from position `pos` to position 0.
    #[inline]
    pub fn unrotate(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (cos, sin) = self.angles(pos);
        let pair = |a: f32, b: f32, i: usize| (a * cos[i] + b * sin[i], b * cos[i] - a * sin[i]);
        match self.layout {
            RopeLayout::Interleaved => {
                for i in 0..half {
                    (x[2 * i], x[2 * i + 1]) = pair(x[2 * i], x[2 * i + 1], i);
                }
            }
            RopeLayout::HalfSplit => {
                let (lo, hi) = x.split_at_mut(half);
                for i in 0..half {
                    (lo[i], hi[i]) = pair(lo[i], hi[i], i);
                }
            }
        }
    }

    /// cos and sin of every pair's angle at `pos` ([head_dim / 2] each).
    #[inline]
    pub fn angles(&self, pos: usize) -> (&[f32], &[f32]) {
        assert!(
            pos < self.max_positions,
            "position {pos} past the RoPE table ({} positions)",
            self.max_positions
        );
        let half = self.head_dim / 2;
        let (cos, sin) = self.chunk(pos / CHUNK);
        let at = (pos % CHUNK) * half;
        (&cos[at..at + half], &sin[at..at + half])
    }

    /// The channel pairs `(a, b, angle)` this layout rotates: a' = a·cos − b·sin,
    /// b' = a·sin + b·cos.
    pub fn pairs(&self) -> Vec<(usize, usize, usize)> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| match self.layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1, i),
                RopeLayout::HalfSplit => (i, i + half, i),
            })
            .collect()
    }

    /// Rotates consecutive head vectors `xs` ([n, head_dim]) to positions `first_pos..first_pos + n`.
    pub fn rotate_rows(&self, xs: &mut [f32], first_pos: usize) {
        for (i, row) in xs.chunks_exact_mut(self.head_dim).enumerate() {
            self.rotate(row, first_pos + i);
        }
    }
}

/// RoPE for a key held in a quantizer's group order (group g's channels one after another, see
/// [`rvq::VectorLayout`]) instead of channel order, so that codes can be decoded, rotated and
/// dotted with a query without being scattered back into channel order: the query is put in
/// group order once instead.
///
/// Exists when the layout only permutes channels (no Hadamard rotation) and the permuted pairs
/// take the form (b·B + m, b·B + B/2 + m) for blocks of some size B — true of every grouping
/// the paper and this tool use (llama's interleaved pairs under strided groups of 32 of a
/// 64-channel head: B = 64; gemma3's half-split pairs under strided groups: B = 32).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRope {
    /// [head_dim]: group-order index → channel.
    channel_of: Vec<usize>,
    /// Pair block size B.
    block: usize,
    /// [head_dim / 2]: the angle of first-half element b·B/2 + m; `None` when it is that index.
    angle_of: Option<Vec<usize>>,
}

impl GroupRope {
    /// The group-order RoPE of keys laid out by `layout` under `rope`'s pairs, if there is one.
    pub fn new(rope: &Rope, layout: &rvq::VectorLayout) -> Option<Self> {
        let hd = rope.head_dim();
        if layout.vector_dim != hd || layout.rotation.is_some() {
            return None;
        }
        let d = layout.group_dim;
        let channel_of: Vec<usize> = (0..hd).map(|j| layout.channel(j / d, j % d)).collect();
        let mut index_of = vec![0; hd];
        for (j, &c) in channel_of.iter().enumerate() {
            index_of[c] = j;
        }
        let pairs = rope.pairs();
        let (a0, b0, _) = pairs[0];
        let block = 2 * index_of[b0].checked_sub(index_of[a0])?;
        if block == 0 || !hd.is_multiple_of(block) {
            return None;
        }
        let half = block / 2;
        let mut angle_of = vec![usize::MAX; hd / 2];
        for (a, b, angle) in pairs {
            let (ja, jb) = (index_of[a], index_of[b]);
            if ja % block >= half || jb != ja + half {
                return None;
            }
            angle_of[ja / block * half + ja % block] = angle;
        }
        let identity = angle_of.iter().enumerate().all(|(k, &a)| a == k);
        Some(Self {
            channel_of,
            block,
            angle_of: (!identity).then_some(angle_of),
        })
    }

    /// Channels of the head.
    pub fn head_dim(&self) -> usize {
        self.channel_of.len()
    }

    /// Whether the pairs in group order are (j, head_dim/2 + j) at angle j: the two halves of
    /// the head rotate against each other with the RoPE table's angles as stored.
    pub fn pairs_halves(&self) -> bool {
        self.block == self.channel_of.len() && self.angle_of.is_none()
    }

    /// `out[j] = q[channel_of[j]]`: a query (or any vector) put in group order.
    pub fn to_group_order(&self, q: &[f32], out: &mut [f32]) {
        for (o, &c) in out.iter_mut().zip(&self.channel_of) {
            *o = q[c];
        }
    }

    /// Rotates `x` ([head_dim], group order) to position `pos`; `scratch` holds [head_dim] when
    /// the angles need gathering.
    #[inline(always)]
    pub fn rotate(&self, rope: &Rope, x: &mut [f32], pos: usize, scratch: &mut [f32]) {
        let (cos, sin) = rope.angles(pos);
        let (cos, sin) = match &self.angle_of {
            None => (cos, sin),
            Some(angle_of) => {
                let (c, s) = scratch.split_at_mut(angle_of.len());
                for (&a, (ck, sk)) in angle_of.iter().zip(c.iter_mut().zip(s.iter_mut())) {
                    *ck = cos[a];
                    *sk = sin[a];
                }
                (&*c, &*s)
            }
        };
        let half = self.block / 2;
        for ((x, cos), sin) in x
            .chunks_exact_mut(self.block)
            .zip(cos.chunks_exact(half))
            .zip(sin.chunks_exact(half))
        {
            let (lo, hi) = x.split_at_mut(half);
            for m in 0..half {
                let (a, b) = (lo[m], hi[m]);
                lo[m] = a * cos[m] - b * sin[m];
                hi[m] = a * sin[m] + b * cos[m];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slow reference: rotate each pair by angle pos * theta^(-2i/d), in f64.
    fn reference(x: &[f32], pos: usize, theta: f64, layout: RopeLayout) -> Vec<f32> {
        let d = x.len();
        let mut out = x.to_vec();
        for i in 0..d / 2 {
            let angle = pos as f64 * theta.powf(-((2 * i) as f64) / d as f64);
            let (ia, ib) = match layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::HalfSplit => (i, i + d / 2),
            };
            let (a, b) = (x[ia] as f64, x[ib] as f64);
            out[ia] = (a * angle.cos() - b * angle.sin()) as f32;
            out[ib] = (a * angle.sin() + b * angle.cos()) as f32;
        }
        out
    }

    #[test]
    fn matches_reference_and_preserves_norm() {
        for layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
            let rope = Rope::new(8, 10000.0, 64, layout);
            let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin()).collect();
            for pos in [0, 1, 7, 63] {
                let mut y = x.clone();
                rope.rotate(&mut y, pos);
                let r = reference(&x, pos, 10000.0, layout);
                for (a, b) in y.iter().zip(&r) {
                    assert!((a - b).abs() < 1e-4, "{layout:?} pos {pos}: {a} vs {b}");
                }
                let mut back = y.clone();
                rope.unrotate(&mut back, pos);
                for (a, b) in back.iter().zip(&x) {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "unrotate {layout:?} pos {pos}: {a} vs {b}"
                    );
                }
                let n0: f32 = x.iter().map(|v| v * v).sum();
                let n1: f32 = y.iter().map(|v| v * v).sum();
                assert!((n0 - n1).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn group_order_rope_equals_channel_rope_put_in_group_order() {
        use rvq::{Grouping, VectorLayout};
        let mut seen = 0;
        for (hd, d) in [
            (64, 32),
            (256, 32),
            (128, 32),
            (64, 16),
            (8, 2),
            (6, 3),
            (8, 4),
        ] {
            for grouping in [Grouping::Strided, Grouping::Contiguous] {
                for rope_layout in [RopeLayout::Interleaved, RopeLayout::HalfSplit] {
                    let rope = Rope::new(hd, 10000.0, 40, rope_layout);
                    let layout = VectorLayout::new(hd, d, grouping, true).unwrap();
                    let Some(gr) = GroupRope::new(&rope, &layout) else {
                        continue;
                    };
                    seen += 1;
                    let x: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.71).sin()).collect();
                    let mut scratch = vec![0f32; hd];
                    for pos in [0, 3, 39] {
                        let mut want = x.clone();
                        rope.rotate(&mut want, pos);
                        let mut want_g = vec![0f32; hd];
                        gr.to_group_order(&want, &mut want_g);
                        let mut got = vec![0f32; hd];
                        gr.to_group_order(&x, &mut got);
                        gr.rotate(&rope, &mut got, pos, &mut scratch);
                        let what = format!("{hd}/{d} {grouping:?} {rope_layout:?} pos {pos}");
                        assert_eq!(got, want_g, "{what}");
                    }
                }
            }
        }
        // All but one (6 channels in strided groups of 3 under half-split pairs: pair (0, 3)
        // sits at offset 0 of group 0 and offset 1 of group 1) — and the paper's and gemma3's
        // shapes have one:
        assert_eq!(seen, 27);
        for (hd, rope_layout) in [(64, RopeLayout::Interleaved), (256, RopeLayout::HalfSplit)] {
            let rope = Rope::new(hd, 10000.0, 4, rope_layout);
            let layout = VectorLayout::new(hd, 32, Grouping::Strided, true).unwrap();
            assert!(GroupRope::new(&rope, &layout).is_some());
        }
        let rope = Rope::new(64, 10000.0, 4, RopeLayout::Interleaved);
        let layout = VectorLayout::new(64, 32, Grouping::Strided, true)
            .unwrap()
            .with_rotation(Some(rvq::hadamard::Hadamard::largest_block(64).unwrap()))
            .unwrap();
        assert!(
            GroupRope::new(&rope, &layout).is_none(),
            "a rotation mixes channels"
        );
    }

    #[test]
    fn relative_position_property() {
        // <R(p)q, R(t)k> depends only on p - t.
        let rope = Rope::new(16, 10000.0, 128, RopeLayout::Interleaved);
        let q: Vec<f32> = (0..16).map(|i| (i as f32).cos()).collect();
        let k: Vec<f32> = (0..16).map(|i| (i as f32 * 1.3).sin()).collect();
        let dot = |p: usize, t: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            rope.rotate(&mut a, p);
            rope.rotate(&mut b, t);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((dot(10, 3) - dot(57, 50)).abs() < 1e-3);
    }
}
