//! A lazily allocated per-page table of atomics (pin counts, storage keys).
//!
//! A flat array would cost bytes per page of every mapping even when nothing is pinned; this
//! two-level radix table allocates a 512-entry leaf only when a page in it is first touched, so
//! a huge mapping costs a few pointers until it is used. Lookups are two acquire loads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

const LEAF: usize = 512;
const DIR: usize = 512;
const PER_DIR: u64 = (LEAF * DIR) as u64;

type Leaf<T> = [T; LEAF];
type Dir<T> = [OnceLock<Box<Leaf<T>>>; DIR];

/// One `T` per page index in `0..len`, allocated on first write access.
pub(crate) struct SparsePages<T> {
    len: u64,
    top: Box<[OnceLock<Box<Dir<T>>>]>,
    /// A leaf was handed out (set before the caller can write through it): while clear,
    /// every entry is at its default, found with one load.
    used: AtomicBool,
}

impl<T: Default> SparsePages<T> {
    /// A table for `len` pages. `len` must fit the process address space (the caller has
    /// already mapped that many pages), so the top level stays small.
    pub(crate) fn new(len: u64) -> Self {
        let ntop = len.div_ceil(PER_DIR) as usize;
        SparsePages {
            len,
            top: (0..ntop).map(|_| OnceLock::new()).collect(),
            used: AtomicBool::new(false),
        }
    }

    #[inline]
    fn split(idx: u64) -> (usize, usize, usize) {
        let t = (idx / PER_DIR) as usize;
        let rem = (idx % PER_DIR) as usize;
        (t, rem / LEAF, rem % LEAF)
    }

    #[inline]
    fn leaf(&self, idx: u64) -> Option<&Leaf<T>> {
        let (t, d, _) = Self::split(idx);
        self.top.get(t)?.get()?[d].get().map(|b| &**b)
    }

    fn leaf_or_init(&self, idx: u64) -> Option<&Leaf<T>> {
        if idx >= self.len {
            return None;
        }
        let (t, d, _) = Self::split(idx);
        let dir = self
            .top
            .get(t)?
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        let leaf = dir[d].get_or_init(|| Box::new(std::array::from_fn(|_| T::default())));
        self.used.store(true, Ordering::Release);
        Some(leaf)
    }

    /// No leaf was ever handed out: every entry is at its default.
    #[inline]
    pub(crate) fn unused(&self) -> bool {
        !self.used.load(Ordering::Acquire)
    }

    /// The entry for page `idx`, if its leaf exists.
    pub(crate) fn get(&self, idx: u64) -> Option<&T> {
        if idx >= self.len {
            return None;
        }
        self.leaf(idx).map(|l| &l[(idx % LEAF as u64) as usize])
    }

    /// The entry for page `idx`, allocating its leaf if needed; `None` past the end.
    pub(crate) fn get_or_init(&self, idx: u64) -> Option<&T> {
        self.leaf_or_init(idx)
            .map(|l| &l[(idx % LEAF as u64) as usize])
    }

    /// Calls `f` for pages `first..first + n` (allocating leaves), one leaf lookup per leaf.
    /// Returns false, having visited nothing, if the run leaves the table.
    pub(crate) fn run_or_init(&self, first: u64, n: u64, mut f: impl FnMut(u64, &T)) -> bool {
        self.chunks_or_init(first, n, |idx0, slots| {
            for (i, slot) in slots.iter().enumerate() {
                f(idx0 + i as u64, slot);
            }
        })
    }

    /// Calls `f(first index, entries)` for the pages `first..first + n`, one call per leaf
    /// (allocating leaves). Returns false, having visited nothing, if the run leaves the table.
    pub(crate) fn chunks_or_init(&self, first: u64, n: u64, mut f: impl FnMut(u64, &[T])) -> bool {
        match first.checked_add(n) {
            Some(end) if end <= self.len => {}
            _ => return false,
        }
        let mut idx = first;
        let end = first + n;
        while idx < end {
            let Some(leaf) = self.leaf_or_init(idx) else {
                return false;
            };
            let start = (idx % LEAF as u64) as usize;
            let take = ((LEAF - start) as u64).min(end - idx) as usize;
            f(idx, &leaf[start..start + take]);
            idx += take as u64;
        }
        true
    }

    /// The entries of pages `first..first + n` when they lie in one allocated leaf; `None` when
    /// that leaf is not allocated (every entry at its default) or the run is not in one leaf.
    #[inline(always)]
    pub(crate) fn chunk(&self, first: u64, n: usize) -> Option<&[T]> {
        let start = (first % LEAF as u64) as usize;
        if first >= self.len || start + n > LEAF {
            return None;
        }
        self.leaf(first).map(|l| &l[start..start + n])
    }

    /// Calls `f` for every allocated entry in `first..first + n` (unallocated ones are at their
    /// default value and skipped).
    pub(crate) fn for_each_present(&self, first: u64, n: u64, mut f: impl FnMut(u64, &T)) {
        let end = first.saturating_add(n).min(self.len);
        let mut idx = first;
        while idx < end {
            let start = (idx % LEAF as u64) as usize;
            let take = ((LEAF - start) as u64).min(end - idx) as usize;
            if let Some(leaf) = self.leaf(idx) {
                for (i, slot) in leaf[start..start + take].iter().enumerate() {
                    f(idx + i as u64, slot);
                }
            }
            idx += take as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn lazy_and_bounded() {
        let t: SparsePages<AtomicU64> = SparsePages::new(PER_DIR + 10);
        assert!(t.get(5).is_none(), "nothing allocated yet");
        t.get_or_init(PER_DIR + 3)
            .unwrap()
            .store(7, Ordering::Relaxed);
        assert_eq!(t.get(PER_DIR + 3).unwrap().load(Ordering::Relaxed), 7);
        assert!(t.get_or_init(PER_DIR + 10).is_none(), "past the end");
        let mut seen = vec![];
        assert!(t.run_or_init(510, 4, |i, s| {
            s.fetch_add(1, Ordering::Relaxed);
            seen.push(i)
        }));
        assert_eq!(seen, vec![510, 511, 512, 513]);
        assert!(!t.run_or_init(PER_DIR + 8, 3, |_, _| panic!("out of range visited")));
        let mut present = 0;
        t.for_each_present(0, PER_DIR + 10, |_, s| {
            present += s.load(Ordering::Relaxed);
        });
        assert_eq!(present, 4 + 7);
    }

    #[test]
    fn chunks_follow_leaves() {
        let t: SparsePages<AtomicU64> = SparsePages::new(2 * LEAF as u64);
        assert!(t.chunk(3, 2).is_none(), "leaf not allocated");
        let mut calls = vec![];
        assert!(t.chunks_or_init(500, 20, |i, s| {
            s[0].store(i, Ordering::Relaxed);
            calls.push((i, s.len()))
        }));
        assert_eq!(calls, vec![(500, 12), (512, 8)]);
        assert_eq!(t.chunk(500, 12).unwrap()[0].load(Ordering::Relaxed), 500);
        assert_eq!(t.chunk(512, 1).unwrap()[0].load(Ordering::Relaxed), 512);
        assert!(t.chunk(510, 4).is_none(), "crosses a leaf");
        assert!(t.chunk(2 * LEAF as u64, 1).is_none(), "past the end");
        assert!(!t.chunks_or_init(1000, 30, |_, _| panic!("out of range visited")));
    }
}
