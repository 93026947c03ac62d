//! A trained quantizer as a codec — encode, sum codewords — whether its codebooks are held in
//! f32 ([`Rvq`], as trained) or in f16 ([`HalfRvq`], half the bytes to hold and to read).
//!
//! At decode time a KV cache reads every layer's codebooks once per token (encoding and
//! attention both touch them), so for a small model their bytes rival the cache's own; f16
//! halves them. An [`HalfRvq`] is exactly the f32 quantizer of its f16-rounded codewords: it
//! encodes to the codes that quantizer would choose and decodes to the same sums.

use crate::aligned::LineAligned;
use crate::kernels::{self, row_norms};
use crate::lanes::LaneWord;
use crate::quantizer::{check_vectors, greedy_stage};
use crate::search::{self, Kernel};
use crate::{bits_for, check_finite, Result, Rvq};
use half::f16;
use half::slice::HalfFloatSliceExt;
use simd::vector::F32x16;
use std::borrow::Cow;
use std::ops::Deref;

/// What encoding and decoding need from a quantizer, independent of how it stores codebooks.
pub trait Quantizer: Send + Sync + std::fmt::Debug {
    /// Vector dimension d.
    fn dim(&self) -> usize;
    /// Codewords per stage, C.
    fn size(&self) -> usize;
    /// Number of stages, K.
    fn stages(&self) -> usize;
    /// Bits of one code: ceil(log2 C).
    fn code_bits(&self) -> u32 {
        bits_for(self.size())
    }
    /// Bytes held: the codebooks and what the searches keep beside them (per-codeword squared
    /// norms, scales, bounds).
    fn bytes(&self) -> u64;
    /// Stage `stage`'s codebook ([C, d]) as f32: borrowed where stored so, converted otherwise.
    fn codebook_f32(&self, stage: usize) -> Cow<'_, [f32]>;
    /// The codebooks as held ([stages] of [C, d]), for kernels that gather codewords themselves.
    fn codewords(&self) -> Codewords<'_>;
    /// One codeword as f32 into `out` ([d]).
    fn codeword_into(&self, stage: usize, code: usize, out: &mut [f32]);
    /// Codes ([n, stages]) of vectors `x` ([n, d]); `beam` = 1 is greedy. See [`Rvq::encode`].
    fn encode(&self, x: &[f32], beam: usize, codes: &mut [u16]) -> Result<()>;
    /// `acc` [n, groups·d] = per vector and group, Σ over stages of the named codewords, from
    /// `codes` [n, groups·stages] (group-major). See [`crate::layout::sum_codewords`].
    fn sum_codewords(&self, groups: usize, codes: &[u16], acc: &mut [f32]);
    /// Stage `stage`'s codewords weighted per row, added to `out` (row r at `out[r·stride..]`):
    /// see [`add_weighted_codewords`].
    fn add_weighted_codewords(
        &self,
        stage: usize,
        weights: RowWeights,
        out: &mut [f32],
        stride: usize,
    );
}

impl Quantizer for Rvq {
    fn dim(&self) -> usize {
        Rvq::dim(self)
    }
    fn size(&self) -> usize {
        Rvq::size(self)
    }
    fn stages(&self) -> usize {
        Rvq::stages(self)
    }
    fn bytes(&self) -> u64 {
        // Codebooks and their f32 squared norms.
        self.codebook_bytes() + (self.stages() * self.size() * 4) as u64
    }
    fn codebook_f32(&self, stage: usize) -> Cow<'_, [f32]> {
        Cow::Borrowed(self.codebook(stage))
    }
    fn codewords(&self) -> Codewords<'_> {
        Codewords::F32(self.codebooks())
    }
    fn codeword_into(&self, stage: usize, code: usize, out: &mut [f32]) {
        out.copy_from_slice(self.codeword(stage, code));
    }
    fn encode(&self, x: &[f32], beam: usize, codes: &mut [u16]) -> Result<()> {
        Rvq::encode(self, x, beam, codes)
    }
    fn sum_codewords(&self, groups: usize, codes: &[u16], acc: &mut [f32]) {
        crate::layout::sum_codewords(self, groups, codes, acc)
    }
    fn add_weighted_codewords(
        &self,
        stage: usize,
        weights: RowWeights,
        out: &mut [f32],
        stride: usize,
    ) {
        add_weighted_codewords(self.codebook(stage), self.dim(), weights, out, stride)
    }
}

/// A quantizer's codebooks as held: [stages] of [C, d], in f32, f16 or i8 with scales.
#[derive(Clone, Copy, Debug)]
pub enum Codewords<'a> {
    F32(&'a [Vec<f32>]),
    F16(&'a [LineAligned<f16>]),
    I8(ScaledI8<'a>),
}

/// i8 codebooks ([stages, C, d] in one slice) whose scale of stage s and channel j is an
/// integer multiple of one unit per channel: codeword c of stage s is
/// `unit ⊙ (multipliers[s] ⊙ books[s][c])` (see [`crate::I8Rvq`]). A vector's codewords then
/// sum exactly in i16 before one conversion.
#[derive(Clone, Copy, Debug)]
pub struct ScaledI8<'a> {
    /// [stages, C, d]
    books: &'a [i8],
    /// [stages, d], each ≥ 0 and Σ_s multipliers[s][j] ≤ [`crate::int8::MAX_MULTIPLIER_SUM`].
    multipliers: &'a [i16],
    /// [d]
    unit: &'a [f32],
    /// C · d: the distance from one stage's codebook to the next.
    stage_len: usize,
}

impl<'a> ScaledI8<'a> {
    /// The codebooks `books` [stages, C, d], `multipliers` [stages, d] and `unit` [d].
    ///
    /// # Panics
    /// If the shapes disagree.
    pub fn new(books: &'a [i8], multipliers: &'a [i16], unit: &'a [f32]) -> Self {
        let d = unit.len();
        let stages = multipliers.len() / d.max(1);
        assert!(
            d > 0
                && multipliers.len() == stages * d
                && stages > 0
                && books.len().is_multiple_of(stages),
            "i8 codebooks: [stages, C, d], multipliers [stages, d], unit [d]"
        );
        Self {
            books,
            multipliers,
            unit,
            stage_len: books.len() / stages,
        }
    }

    /// (codeword, multipliers) of each stage's code in `codes`, all addressed from the one base.
    ///
    /// # Safety
    /// Every code < C (the pointers are computed unchecked).
    #[inline(always)]
    unsafe fn words(self, codes: &[u16]) -> impl Iterator<Item = (*const i8, *const i16)> + '_ {
        let (books, multipliers) = (self.books.as_ptr(), self.multipliers.as_ptr());
        codes.iter().enumerate().map(move |(s, &code)| {
            (
                books.add(s * self.stage_len + code as usize * 32),
                multipliers.add(s * 32),
            )
        })
    }
}

/// d = 32 codebooks as the fused kernels gather them: per group, the sum of the codewords its
/// codes name, in f32 lanes, stage 0 first.
pub trait GroupSum: Copy + Send + Sync {
    /// Stages K.
    fn stages(&self) -> usize;
    /// The two 16-lane halves of Σ_s (codeword `codes[s]` of stage s). The loop runs over
    /// `codes`, so a caller whose slice length is a constant gets it unrolled.
    ///
    /// # Safety
    /// `codes` holds K codes, each < C of its codebook; the CPU runs `V`'s level.
    unsafe fn sum_group<V: F32x16>(self, codes: &[u16]) -> (V, V);
    /// [`GroupSum::sum_group`] before its last product, by the per-channel factor
    /// [`GroupSum::unit`] (i8 books; f16 and f32 books have none): for a kernel that applies
    /// the factor once to something linear in the sums (a weighted sum of values) instead of
    /// to every token's.
    ///
    /// # Safety
    /// As [`GroupSum::sum_group`].
    #[inline(always)]
    unsafe fn sum_group_unscaled<V: F32x16>(self, codes: &[u16]) -> (V, V) {
        self.sum_group(codes)
    }
    /// The factor (32 f32, one per channel) by which [`GroupSum::sum_group`] multiplies
    /// [`GroupSum::sum_group_unscaled`], if any.
    fn unit(&self) -> Option<&[f32]> {
        None
    }
    /// Hints the CPU to cache the codewords `codes` names (K codes of one group, each < C), a
    /// few keys before [`GroupSum::sum_group`] reads them: at random codes the loads otherwise
    /// wait on L2 misses one window of the out-of-order core at a time.
    fn prefetch_group(self, codes: &[u16]);
}

/// Prefetch hint for the line holding `p` (T0: all levels).
#[inline(always)]
pub(crate) fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl<W: LaneWord, B: Deref<Target = [W]> + Sync> GroupSum for &[B] {
    fn stages(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    unsafe fn sum_group<V: F32x16>(self, codes: &[u16]) -> (V, V) {
        let (mut lo, mut hi) = (V::zero(), V::zero());
        for (s, &code) in codes.iter().enumerate() {
            let w = self.get_unchecked(s).as_ptr().add(code as usize * 32);
            lo = lo.add(W::load16(w));
            hi = hi.add(W::load16(w.add(16)));
        }
        (lo, hi)
    }
    #[inline(always)]
    fn prefetch_group(self, codes: &[u16]) {
        for (&code, book) in codes.iter().zip(self) {
            let w = book.as_ptr().wrapping_add(code as usize * 32);
            prefetch_line(w);
            prefetch_line(w.wrapping_add(31));
        }
    }
}

impl GroupSum for ScaledI8<'_> {
    fn stages(&self) -> usize {
        self.multipliers.len() / self.unit.len()
    }
    /// Σ_s multipliers[s] ⊙ q_s in exact i16 lanes (|Σ| ≤ 127 · 258 < 2¹⁵), then one conversion
    /// and one product with the unit ([`F32x16::sum_i8_multiples`]): the same bits at every level.
    /// Every stage's codeword is addressed from the one base, so the unrolled loop spends no
    /// loads on pointers.
    #[inline(always)]
    unsafe fn sum_group<V: F32x16>(self, codes: &[u16]) -> (V, V) {
        V::sum_i8_multiples(self.words(codes), self.unit.as_ptr())
    }
    #[inline(always)]
    unsafe fn sum_group_unscaled<V: F32x16>(self, codes: &[u16]) -> (V, V) {
        V::sum_i8_integers(self.words(codes))
    }
    fn unit(&self) -> Option<&[f32]> {
        Some(self.unit)
    }
    #[inline(always)]
    fn prefetch_group(self, codes: &[u16]) {
        let books = self.books.as_ptr();
        for (s, &code) in codes.iter().enumerate() {
            prefetch_line(books.wrapping_add(s * self.stage_len + code as usize * 32));
        }
    }
}

simd::dispatch16! {
    /// `acc` [n, groups·32] = per vector and group the sum of its codewords ([`GroupSum`]),
    /// from `codes` [n, groups·stages]; the caller checked every code < C.
    pub(crate) fn sum_groups_d32<B: GroupSum>(books: B, codes: &[u16], acc: &mut [f32]) = sum_groups_d32_body;
}

#[inline(always)]
unsafe fn sum_groups_d32_body<V: F32x16, B: GroupSum>(
    _avx2: bool,
    books: B,
    codes: &[u16],
    acc: &mut [f32],
) {
    let k = books.stages();
    for (a, c) in acc.chunks_exact_mut(32).zip(codes.chunks_exact(k)) {
        let (lo, hi) = books.sum_group::<V>(c);
        lo.store(a.as_mut_ptr());
        hi.store(a.as_mut_ptr().add(16));
    }
}

/// A quantizer whose codebooks are held in f16.
#[derive(Clone, Debug, PartialEq)]
pub struct HalfRvq {
    dim: usize,
    size: usize,
    /// [stages] of [size, dim], each from a cache line's start
    codebooks: Vec<LineAligned<f16>>,
    /// [stages] of [size]: squared norms of the f16 codewords
    norms: Vec<Vec<f32>>,
}

impl HalfRvq {
    /// `rvq`'s codebooks rounded to f16 (to nearest; values beyond f16's range are an error,
    /// not infinities).
    pub fn from_rvq(rvq: &Rvq) -> Result<Self> {
        let (dim, size) = (rvq.dim(), rvq.size());
        let mut codebooks = Vec::with_capacity(rvq.stages());
        let mut norms = Vec::with_capacity(rvq.stages());
        for s in 0..rvq.stages() {
            let book: Vec<f16> = rvq.codebook(s).iter().map(|&v| f16::from_f32(v)).collect();
            let back = to_f32(&book);
            check_finite(&back, &format!("codebook {s} in f16 (|value| > 65504)"))?;
            norms.push(row_norms(&back, dim));
            codebooks.push(LineAligned::from_slice(&book));
        }
        Ok(Self {
            dim,
            size,
            codebooks,
            norms,
        })
    }

    /// The f32 quantizer of the same (f16-valued) codewords.
    pub fn to_rvq(&self) -> Rvq {
        let books = self.codebooks.iter().map(|b| to_f32(b)).collect();
        Rvq::from_codebooks(self.dim, self.size, books).expect("f16 codebooks are finite")
    }

    /// Stage `stage`'s codebook as stored.
    pub fn codebook(&self, stage: usize) -> &[f16] {
        &self.codebooks[stage]
    }

    /// Greedy encoding of a few vectors (one block): each stage's codebook converted once into
    /// an f32 scratch and searched as [`Rvq`] searches its own.
    fn encode_few_greedy(&self, x: &[f32], codes: &mut [u16]) {
        let (d, k) = (self.dim, self.stages());
        if search::kernel(d, x.len() / d) == Kernel::Rows {
            return crate::row_search::encode_greedy(&self.codebooks, &self.norms, x, codes);
        }
        let mut residual = x.to_vec(); // [m, d]
        let mut scores = Vec::new();
        let mut book = vec![0f32; self.size * d];
        for s in 0..k {
            f16_to_f32(&self.codebooks[s], &mut book);
            greedy_stage(
                &book,
                &self.norms[s],
                d,
                &mut residual,
                &mut scores,
                |r, code| codes[r * k + s] = code,
            );
        }
    }
}

impl Quantizer for HalfRvq {
    fn dim(&self) -> usize {
        self.dim
    }
    fn size(&self) -> usize {
        self.size
    }
    fn stages(&self) -> usize {
        self.codebooks.len()
    }
    fn bytes(&self) -> u64 {
        // f16 codebooks and their f32 squared norms.
        (self.stages() * self.size * (self.dim * 2 + 4)) as u64
    }
    fn codebook_f32(&self, stage: usize) -> Cow<'_, [f32]> {
        Cow::Owned(to_f32(&self.codebooks[stage]))
    }
    fn codewords(&self) -> Codewords<'_> {
        Codewords::F16(&self.codebooks)
    }
    fn codeword_into(&self, stage: usize, code: usize, out: &mut [f32]) {
        let d = self.dim;
        f16_to_f32(&self.codebooks[stage][code * d..(code + 1) * d], out);
    }
    fn encode(&self, x: &[f32], beam: usize, codes: &mut [u16]) -> Result<()> {
        let few = |x: &[f32], codes: &mut [u16]| self.encode_few_greedy(x, codes);
        // One block below the lane kernel's batch: a decode step's few vectors.
        let n = x.len() / self.dim;
        let few = (n <= kernels::BLOCK && search::kernel(self.dim, n) != Kernel::Lanes)
            .then_some(&few as _);
        encode_held(self, x, beam, codes, few, || self.to_rvq())
    }
    fn sum_codewords(&self, groups: usize, codes: &[u16], acc: &mut [f32]) {
        check_sums(self, groups, codes, acc);
        match self.dim {
            32 => sum_groups_d32(&self.codebooks[..], codes, acc),
            _ => sum_codewords_each(self, codes, acc),
        }
    }
    fn add_weighted_codewords(
        &self,
        stage: usize,
        weights: RowWeights,
        out: &mut [f32],
        stride: usize,
    ) {
        add_weighted_codewords(self.codebook(stage), self.dim, weights, out, stride)
    }
}

/// Greedy codes ([n, stages]) of vectors ([n, d]) by a search on the codebooks as held.
pub(crate) type HeldEncoder<'a> = dyn Fn(&[f32], &mut [u16]) + 'a;

/// [`Quantizer::encode`] for codebooks held in another form than f32: the checks, then greedy
/// codes through `greedy` where the caller gives one for these vectors, and everything else —
/// beams, batches the held form searches slower — through the f32 quantizer `full()`
/// (converting all codebooks costs little next to those searches).
pub(crate) fn encode_held(
    q: &dyn Quantizer,
    x: &[f32],
    beam: usize,
    codes: &mut [u16],
    greedy: Option<&HeldEncoder>,
    full: impl FnOnce() -> Rvq,
) -> Result<()> {
    let d = q.dim();
    check_vectors(d, q.stages(), x, codes.len(), "vectors to encode")?;
    check_finite(x, "vectors to encode")?;
    match greedy {
        Some(greedy) if beam == 1 => {
            greedy(x, codes);
            Ok(())
        }
        _ => full().encode(x, beam, codes),
    }
}

/// The shape checks of [`Quantizer::sum_codewords`]: `codes` [n, groups·stages] and `acc`
/// [n, groups·d] agree on n, and every code names a codeword.
pub(crate) fn check_sums(q: &dyn Quantizer, groups: usize, codes: &[u16], acc: &[f32]) {
    assert_eq!(
        codes.len() / (groups * q.stages()),
        acc.len() / (groups * q.dim()),
        "codes and sums disagree on n"
    );
    assert_codes_below(codes, q.size());
}

/// [`Quantizer::sum_codewords`] one codeword at a time through [`Quantizer::codeword_into`]
/// (any d; stage 0 first, from zero): the fallback of the quantizers that hold codebooks
/// converted, once [`check_sums`] passed.
pub(crate) fn sum_codewords_each(q: &dyn Quantizer, codes: &[u16], acc: &mut [f32]) {
    let (d, k) = (q.dim(), q.stages());
    let mut w = vec![0f32; d];
    for (a, c) in acc.chunks_exact_mut(d).zip(codes.chunks_exact(k)) {
        a.fill(0.0);
        for (s, &code) in c.iter().enumerate() {
            q.codeword_into(s, code as usize, &mut w);
            a.iter_mut().zip(&w).for_each(|(a, w)| *a += w);
        }
    }
}

/// Panics unless every code is below `size`: kernels that read codewords without bounds checks
/// rely on it.
pub fn assert_codes_below(codes: &[u16], size: usize) {
    let max = largest_code(codes) as usize;
    assert!(max < size, "code {max} out of range (C = {size})");
}

simd::multiversion! {
    /// The largest of `codes` (0 if none), vectorized where the CPU has an unsigned 16-bit max
    /// (baseline SSE2 has none, and the check showed at 1.4% of an 8K decode step).
    fn largest_code(codes: &[u16]) -> u16 = largest_code_body;
}

#[inline(always)]
fn largest_code_body(codes: &[u16]) -> u16 {
    codes.iter().copied().fold(0, u16::max)
}

fn to_f32(book: &[f16]) -> Vec<f32> {
    let mut out = vec![0f32; book.len()];
    f16_to_f32(book, &mut out);
    out
}

/// `dst[i] = src[i]` as f32, 8 values per F16C instruction where the CPU has it: `half`'s slice
/// conversion calls a function per 8 values, ≈ 8× slower, and a decode step converts a whole
/// codebook per stage.
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "f16 → f32: slices of different lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::lanes::available(crate::lanes::DIM) {
        // SAFETY: AVX2 and F16C checked; equal lengths.
        unsafe { f16_to_f32_f16c(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let body = src.len() / 8 * 8;
    for i in (0..body).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    src[body..].convert_to_f32_slice(&mut dst[body..]);
}

/// Per-row weights of a codebook's codewords: (`weights` [C, lanes], lanes, rows ≤ lanes), row r
/// of codeword c at `weights[c·lanes + r]` — attention's value histograms.
pub type RowWeights<'a> = (&'a [f32], usize, usize);

/// `out[r·stride + j] += Σ_c weights[c·lanes + r] · book[c·d + j]` for rows r < `rows`: one
/// stage's codewords ([C, d], f32 or f16) weighted per row — in attention, the value
/// histograms times a codebook. Each row sums over c in order, multiply then add, from zero,
/// and the sum is then added to `out`; codewords no row weighs are skipped (adding ±0 changes
/// nothing). At d = 32 three rows' 32 sums stay in registers ([`F32x16`] lanes, AVX-512 or
/// AVX2) and each codeword is converted as it is loaded; the arithmetic is the same, so every
/// level gives the same sums.
pub fn add_weighted_codewords<T: LaneWord>(
    book: &[T],
    d: usize,
    (weights, lanes, rows): RowWeights,
    out: &mut [f32],
    stride: usize,
) {
    let c = book.len() / d;
    assert!(
        rows <= lanes && weights.len() >= c * lanes,
        "weights: [C, lanes ≥ rows]"
    );
    if rows == 0 {
        return;
    }
    assert!(out.len() >= (rows - 1) * stride + d, "out: rows × stride");
    if d == 32 {
        return weighted_codewords_d32(book, (weights, lanes, rows), out, stride);
    }
    let mut acc = vec![0f32; rows * d];
    let mut cw = vec![0f32; d];
    for (i, word) in book.chunks_exact(d).enumerate() {
        let w = &weights[i * lanes..i * lanes + rows];
        if w.iter().all(|&x| x == 0.0) {
            continue;
        }
        cw.iter_mut().zip(word).for_each(|(a, b)| *a = b.to_f32());
        for (acc, &wr) in acc.chunks_exact_mut(d).zip(w) {
            for (a, &x) in acc.iter_mut().zip(&cw) {
                *a += wr * x;
            }
        }
    }
    for (r, acc) in acc.chunks_exact(d).enumerate() {
        for (o, a) in out[r * stride..r * stride + d].iter_mut().zip(acc) {
            *o += a;
        }
    }
}

simd::dispatch16! {
    fn weighted_codewords_d32<T: LaneWord>(book: &[T], weights: RowWeights, out: &mut [f32], stride: usize) = weighted_codewords_d32_body;
}

/// [`add_weighted_codewords`] at d = 32, whose asserts this relies on: three rows at a time.
#[inline(always)]
unsafe fn weighted_codewords_d32_body<V: F32x16, T: LaneWord>(
    _avx2: bool,
    book: &[T],
    (weights, lanes, rows): RowWeights,
    out: &mut [f32],
    stride: usize,
) {
    for r0 in (0..rows).step_by(3) {
        let chunk = (book, weights, lanes, r0, &mut *out, stride);
        match rows - r0 {
            1 => weighted_rows_d32::<V, T, 1>(chunk),
            2 => weighted_rows_d32::<V, T, 2>(chunk),
            _ => weighted_rows_d32::<V, T, 3>(chunk),
        }
    }
}

/// Rows `r0..r0 + R` of [`weighted_codewords_d32_body`]: (book, weights, lanes, r0, out, stride).
type WeightedRows<'a, T> = (&'a [T], &'a [f32], usize, usize, &'a mut [f32], usize);

/// R is a constant so that the 2·R accumulators stay in registers (with a run-time row count
/// they lived on the stack: every add waited on a store and a load).
#[inline(always)]
unsafe fn weighted_rows_d32<V: F32x16, T: LaneWord, const R: usize>(
    (book, weights, lanes, r0, out, stride): WeightedRows<T>,
) {
    let mut acc = [[V::zero(); 2]; R];
    for i in 0..book.len() / 32 {
        let w = weights.as_ptr().add(i * lanes + r0);
        if (0..R).all(|r| *w.add(r) == 0.0) {
            continue;
        }
        let p = book.as_ptr().add(i * 32);
        let (lo, hi) = (T::load16::<V>(p), T::load16::<V>(p.add(16)));
        for (r, acc) in acc.iter_mut().enumerate() {
            let wr = V::splat(*w.add(r));
            acc[0] = acc[0].add(wr.mul(lo));
            acc[1] = acc[1].add(wr.mul(hi));
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let o = out.as_mut_ptr().add((r0 + r) * stride);
        for (h, a) in acc.iter().enumerate() {
            let at = o.add(16 * h);
            V::load(at).add(*a).store(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::testkit::random_rvq;
    use simd::at_each_level;

    #[test]
    fn half_rvq_is_the_f32_quantizer_of_its_rounded_codewords() {
        let mut rng = SplitMix64::new(4);
        // d = 32 takes the AVX2 sums where the CPU has them; d = 6 the portable loop. 300
        // vectors cross the few-vector path's block and take the batch path.
        for (d, c, k, n) in [(32, 2048, 8, 6), (32, 300, 4, 300), (6, 19, 3, 40)] {
            let q = random_rvq(&mut rng, d, c, k);
            let half = HalfRvq::from_rvq(&q).unwrap();
            let rounded = half.to_rvq();
            for s in 0..k {
                let want: Vec<f32> = q
                    .codebook(s)
                    .iter()
                    .map(|&v| f16::from_f32(v).to_f32())
                    .collect();
                assert_eq!(rounded.codebook(s), want.as_slice());
                assert_eq!(half.codebook_f32(s).as_ref(), want.as_slice());
            }
            // Codewords in 2 bytes instead of 4; both keep an f32 squared norm per codeword.
            let norms = (k * c * 4) as u64;
            assert_eq!(
                (Quantizer::bytes(&half) - norms) * 2,
                Quantizer::bytes(&q) - norms
            );
            let x: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
            for beam in [1, 3] {
                let (mut a, mut b) = (vec![0u16; n * k], vec![0u16; n * k]);
                Quantizer::encode(&half, &x, beam, &mut a).unwrap();
                rounded.encode(&x, beam, &mut b).unwrap();
                assert_eq!(a, b, "d {d} C {c} n {n} beam {beam}");
            }
            let groups = 2;
            let codes: Vec<u16> = (0..n * groups * k).map(|_| rng.below(c) as u16).collect();
            for (level, (got, want)) in simd::at_each_level(|_| {
                let (mut got, mut want) = (vec![0f32; n * groups * d], vec![0f32; n * groups * d]);
                half.sum_codewords(groups, &codes, &mut got);
                Quantizer::sum_codewords(&rounded, groups, &codes, &mut want);
                (got, want)
            }) {
                assert_eq!(got, want, "d {d} {level:?}");
            }
            let mut w = vec![0f32; d];
            half.codeword_into(k - 1, c - 1, &mut w);
            assert_eq!(w, rounded.codeword(k - 1, c - 1));
        }
    }

    #[test]
    fn f16_to_f32_converts_every_value_exactly_at_every_level() {
        // Every f16 bit pattern but NaNs (whose payloads need not survive), in lengths that
        // end inside and outside the 8-wide loop.
        let all: Vec<f16> = (0..=u16::MAX)
            .map(f16::from_bits)
            .filter(|h| !h.is_nan())
            .collect();
        for len in [0, 7, 8, 37, all.len()] {
            let src = &all[..len];
            let want: Vec<f32> = src.iter().map(|h| h.to_f32()).collect();
            for (level, got) in simd::at_each_level(|_| {
                let mut got = vec![0f32; len];
                f16_to_f32(src, &mut got);
                got
            }) {
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{len} {level:?}"
                );
            }
        }
    }

    /// Weighted codeword sums against the obvious f64 sum, the same at every level, for f32
    /// and f16 codebooks, with rows that skip codewords and rows past one block of three.
    #[test]
    fn weighted_codewords_match_the_slow_sum_at_every_level() {
        let mut rng = SplitMix64::new(21);
        // d = 32 takes rows three at a time: 3, 7 = 3 + 3 + 1, 5 = 3 + 2 and 1 cover each tail.
        let shapes = [
            (37, 32, 3, 4),
            (50, 32, 7, 8),
            (41, 32, 5, 8),
            (20, 32, 1, 4),
            (9, 5, 2, 4),
        ];
        for (c, d, rows, lanes) in shapes {
            let book: Vec<f32> = (0..c * d).map(|_| rng.normal()).collect();
            let half: Vec<f16> = book.iter().map(|&x| f16::from_f32(x)).collect();
            let rounded: Vec<f32> = half.iter().map(|x| x.to_f32()).collect();
            // A third of the weights zero, and codeword 1 weighed by no row.
            let mut weights: Vec<f32> = (0..c * lanes)
                .map(|i| if i % 3 == 0 { 0.0 } else { rng.normal() })
                .collect();
            weights[lanes..2 * lanes].fill(0.0);
            let stride = d + 3;
            let start: Vec<f32> = (0..rows * stride).map(|_| rng.normal()).collect();
            let want = |book: &[f32]| -> Vec<f64> {
                let mut out: Vec<f64> = start.iter().map(|&x| x as f64).collect();
                for r in 0..rows {
                    for j in 0..d {
                        out[r * stride + j] += (0..c)
                            .map(|i| weights[i * lanes + r] as f64 * book[i * d + j] as f64)
                            .sum::<f64>();
                    }
                }
                out
            };
            for (name, reference, each) in [
                (
                    "f32",
                    want(&book),
                    at_each_level(|_| {
                        let mut out = start.clone();
                        add_weighted_codewords(&book, d, (&weights, lanes, rows), &mut out, stride);
                        out
                    }),
                ),
                (
                    "f16",
                    want(&rounded),
                    at_each_level(|_| {
                        let mut out = start.clone();
                        add_weighted_codewords(&half, d, (&weights, lanes, rows), &mut out, stride);
                        out
                    }),
                ),
            ] {
                assert!(
                    each.iter().all(|(_, o)| *o == each[0].1),
                    "{name}: levels differ"
                );
                for (r, chunk) in each[0].1.chunks(stride).enumerate() {
                    for (j, &x) in chunk.iter().enumerate() {
                        let w = reference[r * stride + j];
                        assert!(
                            (x as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{name} {r} {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_largest_code_is_found_at_every_level() {
        let mut rng = SplitMix64::new(5);
        for n in [0usize, 1, 7, 31, 32, 33, 1000] {
            let mut codes: Vec<u16> = (0..n).map(|_| rng.below(40000) as u16).collect();
            if n > 3 {
                codes[n - 2] = u16::MAX; // above i16::MAX: a signed max would miss it
            }
            let want = codes.iter().copied().max().unwrap_or(0);
            for (level, got) in simd::at_each_level(|_| largest_code(&codes)) {
                assert_eq!(got, want, "{level:?}, n = {n}");
            }
        }
        assert!(std::panic::catch_unwind(|| assert_codes_below(&[3, 9, 2], 9)).is_err());
        assert_codes_below(&[3, 8, 2], 9);
    }

    #[test]
    fn bad_input_is_an_error() {
        let q = Rvq::from_codebooks(2, 2, vec![vec![1e6, 0.0, 1.0, 1.0]]).unwrap();
        let e = HalfRvq::from_rvq(&q).unwrap_err().to_string();
        assert!(e.contains("f16"), "{e}");
        let q = Rvq::from_codebooks(2, 2, vec![vec![0.0, 0.0, 1.0, 1.0]]).unwrap();
        let half = HalfRvq::from_rvq(&q).unwrap();
        let mut codes = vec![0u16; 1];
        assert!(Quantizer::encode(&half, &[f32::NAN, 0.0], 1, &mut codes).is_err());
        assert!(Quantizer::encode(&half, &[0.0; 3], 1, &mut codes).is_err());
    }
}
