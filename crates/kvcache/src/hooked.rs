//! A cache with hooks on its two hot calls, `append` and `attend`: what benchmarks (timing),
//! calibration (capturing K/V) and tests (injected faults) need, without each re-implementing
//! the whole seam around an inner cache.

use crate::{CacheError, CacheShape, KvCache, MemoryReport, Part, Queries, Rope};
use std::ops::Range;

pub trait Hooks: Send + Sync + 'static {
    /// Stores `k` and `v` (default: in `inner`, nothing else).
    fn append(
        &self,
        inner: &mut dyn KvCache,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), CacheError> {
        inner.append(layer, k, v)
    }

    /// Attends through `inner` (default: nothing else).
    fn attend(
        &self,
        inner: &dyn KvCache,
        layer: usize,
        queries: &Queries,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        inner.attend(layer, queries, out)
    }

    /// The hooks a copy of the cache gets (`KvCache::box_clone`).
    fn for_copy(&self) -> Self
    where
        Self: Sized;
}

/// `inner` with `hooks` around its `append` and `attend`; every other call goes straight through.
pub struct Hooked<H> {
    inner: Box<dyn KvCache>,
    hooks: H,
}

impl<H: Hooks> Hooked<H> {
    pub fn new(inner: Box<dyn KvCache>, hooks: H) -> Self {
        Self { inner, hooks }
    }

    pub fn hooks(&self) -> &H {
        &self.hooks
    }
}

impl<H: Hooks> KvCache for Hooked<H> {
    fn shape(&self) -> CacheShape {
        self.inner.shape()
    }
    fn rope(&self, layer: usize) -> &Rope {
        self.inner.rope(layer)
    }
    fn spec(&self) -> String {
        self.inner.spec()
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), CacheError> {
        self.hooks.append(self.inner.as_mut(), layer, k, v)
    }
    fn len(&self, layer: usize) -> usize {
        self.inner.len(layer)
    }
    fn read(
        &self,
        layer: usize,
        head: usize,
        part: Part,
        positions: Range<usize>,
        out: &mut [f32],
    ) -> Result<(), CacheError> {
        self.inner.read(layer, head, part, positions, out)
    }
    fn attend(&self, layer: usize, queries: &Queries, out: &mut [f32]) -> Result<(), CacheError> {
        self.hooks.attend(self.inner.as_ref(), layer, queries, out)
    }
    fn memory(&self) -> MemoryReport {
        self.inner.memory()
    }
    fn bytes_at(&self, tokens: usize) -> u64 {
        self.inner.bytes_at(tokens)
    }
    fn truncate(&mut self, len: usize) {
        self.inner.truncate(len)
    }
    fn forget_before(&mut self, layer: usize, pos: usize) {
        self.inner.forget_before(layer, pos)
    }
    fn box_clone(&self) -> Box<dyn KvCache> {
        Box::new(Self {
            inner: self.inner.box_clone(),
            hooks: self.hooks.for_copy(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::F32Cache;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts appended tokens, shared by copies.
    struct Count(Arc<AtomicUsize>);
    impl Hooks for Count {
        fn append(
            &self,
            inner: &mut dyn KvCache,
            layer: usize,
            k: &[f32],
            v: &[f32],
        ) -> Result<(), CacheError> {
            self.0.fetch_add(k.len() / 8, Ordering::Relaxed);
            inner.append(layer, k, v)
        }
        fn for_copy(&self) -> Self {
            Count(self.0.clone())
        }
    }

    #[test]
    fn hooks_see_appends_and_everything_else_goes_through() {
        let shape = CacheShape {
            layers: 2,
            kv_heads: 2,
            head_dim: 4,
        };
        let rope = Arc::new(Rope::new(4, 10000.0, 16, crate::RopeLayout::Interleaved).into());
        let count = Arc::new(AtomicUsize::new(0));
        let mut c = Hooked::new(Box::new(F32Cache::new(shape, rope)), Count(count.clone()));
        c.append(1, &[1.0; 16], &[2.0; 16]).unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 2);
        assert_eq!((c.len(1), c.len(0), c.spec().as_str()), (2, 0, "f32"));
        let mut out = vec![0f32; 8];
        c.read(1, 0, Part::Values, 0..2, &mut out).unwrap();
        assert_eq!(out, [2.0; 8]);
        let mut copy = c.box_clone();
        copy.append(0, &[1.0; 8], &[1.0; 8]).unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 3);
        assert_eq!(c.memory(), c.box_clone().memory());
    }
}
