//! Page pinning: the translator's hot path. No store lock is taken unless the snapshot is
//! stale; each page costs one atomic add on its count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::error::StoreError;
use super::region::{Backed, PIN_MAX, PIN_ONE, PIN_WRITE};
use super::types::{Perm, MAX_PIN_PAGES, PAGE_SIZE};
use super::{IommuStore, Snapshot};

/// One pinned page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedPage {
    /// The page's IOVA (guest-physical address).
    pub iova: u64,
    /// The process-virtual address of the page, valid while its [`PinnedPages`] lives.
    pub host_addr: u64,
    /// The page's s390 storage key byte at pin time (see
    /// [`IommuStore::set_storage_key`]).
    pub storage_key: u8,
    /// Pinned for write (the device may store into it).
    pub writable: bool,
}

/// A run of pages pinned in one mapping.
struct Segment {
    region: Arc<Backed>,
    /// First page index inside the mapping.
    first: u64,
    n: u64,
    write: bool,
    /// IOVA and process address of the first page.
    iova: u64,
    host: u64,
}

impl Segment {
    fn release(&self) {
        let sh = &self.region.shared;
        let dec = PIN_ONE + if self.write { PIN_WRITE } else { 0 };
        // A run inside one leaf (the usual case): its counts directly, no leaf walk.
        match sh.pins.chunk(self.first, self.n as usize) {
            Some(counts) => {
                for c in counts {
                    c.fetch_sub(dec, Ordering::SeqCst);
                }
            }
            None => {
                sh.pins.run_or_init(self.first, self.n, |_, c| {
                    c.fetch_sub(dec, Ordering::SeqCst);
                });
            }
        }
        if self.write && sh.globals.tracking.load(Ordering::SeqCst) {
            // The device may have stored until now.
            self.region.dirty().set_addr_range(
                (self.first * PAGE_SIZE) as usize,
                (self.n * PAGE_SIZE) as usize,
            );
        }
        sh.release_total(self.n);
    }
}

/// Pages pinned by one [`IommuStore::pin`] call.
///
/// Dropping it unpins every page exactly once. It holds its mappings' memory alive, so the
/// host addresses stay valid for its whole life, even across an unmap attempt.
///
/// The pages are kept as runs (one per mapping); the per-page list is built only when
/// [`PinnedPages::pages`] asks for it. The common case (one mapping, no storage keys set) is
/// a small value with no allocation: the first run inline, everything rarer boxed.
pub struct PinnedPages {
    head: Segment,
    len: usize,
    /// Further runs, keys and the page list: allocated only when one is needed.
    extra: OnceLock<Box<Extra>>,
}

/// The rarely needed parts of a [`PinnedPages`].
#[derive(Default)]
struct Extra {
    /// Runs after the first (pins spanning several mappings).
    rest: Vec<Segment>,
    /// Storage keys at pin time, one per page in order; empty when all are 0.
    keys: Vec<u8>,
    pages: OnceLock<Vec<PinnedPage>>,
}

impl std::fmt::Debug for PinnedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedPages")
            .field("pages", &self.pages())
            .finish()
    }
}

impl PinnedPages {
    /// The pinned pages, in IOVA order.
    pub fn pages(&self) -> &[PinnedPage] {
        self.extra.get_or_init(Box::default).pages.get_or_init(|| {
            let mut v = Vec::with_capacity(self.len);
            for (iova, host, n, write) in self.runs() {
                for k in 0..n {
                    v.push(PinnedPage {
                        iova: iova + k * PAGE_SIZE,
                        host_addr: host + k * PAGE_SIZE,
                        storage_key: self.key(v.len()),
                        writable: write,
                    });
                }
            }
            v
        })
    }

    /// Number of pinned pages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a pin takes at least one page); for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn rest(&self) -> &[Segment] {
        self.extra.get().map_or(&[], |e| &e.rest)
    }

    /// The pinned runs in IOVA order: (IOVA of the first page, its process address, pages,
    /// pinned for write). Pages of a run are contiguous in both spaces.
    pub(crate) fn runs(&self) -> impl Iterator<Item = (u64, u64, u64, bool)> + '_ {
        std::iter::once(&self.head)
            .chain(self.rest())
            .map(|s| (s.iova, s.host, s.n, s.write))
    }

    /// The first run (see [`PinnedPages::runs`]) and whether it is the only one.
    #[inline]
    pub(crate) fn first_run(&self) -> ((u64, u64, u64, bool), bool) {
        let s = &self.head;
        ((s.iova, s.host, s.n, s.write), self.rest().is_empty())
    }

    /// The storage key at pin time of the `i`-th page (in IOVA order).
    #[inline]
    pub(crate) fn key(&self, i: usize) -> u8 {
        match self.extra.get() {
            None => 0,
            Some(e) => e.keys.get(i).copied().unwrap_or(0),
        }
    }

    /// Runs `f` on the boxed extras, allocating them first if needed.
    fn with_extra(&mut self, f: impl FnOnce(&mut Extra)) {
        if let Some(e) = self.extra.get_mut() {
            f(e);
            return;
        }
        let mut e = Box::<Extra>::default();
        f(&mut e);
        self.extra = OnceLock::from(e);
    }
}

impl Drop for PinnedPages {
    fn drop(&mut self) {
        self.head.release();
        for s in self.rest() {
            s.release();
        }
    }
}

/// Why one attempt failed; `Retry` means the snapshot showed an invalidated generation
/// that a fresher snapshot may already have replaced.
pub(super) enum Fail {
    Err(StoreError),
    Retry(u64),
}

impl IommuStore {
    /// Pins `npages` pages starting at the page-aligned `iova` for `perm`, all or nothing.
    ///
    /// The pages may span several mappings. Errors: `npages` 0 or above 512, `iova` not page
    /// aligned, the range wrapping, or `perm` empty: EINVAL; a page not mapped, or in a
    /// mapping being unmapped: EINVAL; a mapping lacking `perm`: EPERM; a mapping whose
    /// process address is invalidated (FLAG_VADDR): EBUSY. On error nothing stays pinned.
    pub fn pin(&self, iova: u64, npages: usize, perm: Perm) -> Result<PinnedPages, StoreError> {
        check_pin_args(iova, npages, perm)?;
        match try_pin(&self.snapshot(), iova, npages as u64, perm) {
            Ok(p) => Ok(p),
            Err(Fail::Err(e)) => Err(e),
            Err(Fail::Retry(at)) => {
                // One more attempt on a fresh snapshot: a VADDR update may have landed.
                self.ensure_fresh();
                match try_pin(&self.snapshot(), iova, npages as u64, perm) {
                    Ok(p) => Ok(p),
                    Err(Fail::Err(e)) => Err(e),
                    Err(Fail::Retry(_)) => Err(StoreError::VaddrInvalid(at)),
                }
            }
        }
    }
}

/// The argument checks of [`IommuStore::pin`].
pub(super) fn check_pin_args(iova: u64, npages: usize, perm: Perm) -> Result<(), StoreError> {
    if npages == 0 || npages > MAX_PIN_PAGES {
        return Err(StoreError::Invalid("pin count must be 1..=512 pages"));
    }
    if perm.is_empty() {
        return Err(StoreError::Invalid("neither READ nor WRITE requested"));
    }
    if iova % PAGE_SIZE != 0 {
        return Err(StoreError::Invalid("pin iova not page aligned"));
    }
    iova.checked_add(npages as u64 * PAGE_SIZE - 1)
        .ok_or(StoreError::Invalid("pin range wraps"))?;
    Ok(())
}

/// One pin attempt through the snapshot `snap` (arguments already checked).
pub(super) fn try_pin(
    snap: &Snapshot,
    iova: u64,
    npages: u64,
    perm: Perm,
) -> Result<PinnedPages, Fail> {
    let inc = PIN_ONE + if perm.write { PIN_WRITE } else { 0 };
    // Built at the first run, so a failure before it holds nothing.
    let mut out: Option<PinnedPages> = None;
    let mut keys_out: Vec<u8> = Vec::new();
    let mut len = 0usize;
    let mut cur = iova;
    let mut left = npages;
    while left > 0 {
        let region = snap
            .find_region(GuestAddress(cur))
            .ok_or(Fail::Err(StoreError::NotMapped(cur)))?;
        let b = &region.0;
        let sh = &b.shared;
        if !sh.perm.allows(perm) {
            return Err(Fail::Err(StoreError::Permission(cur)));
        }
        let first = (cur - sh.iova) / PAGE_SIZE;
        let n = (sh.size / PAGE_SIZE - first).min(left);
        // Add, then check: an unmap sets `dying` before reading `total`.
        sh.total.fetch_add(n, Ordering::SeqCst);
        if sh.dying.load(Ordering::SeqCst) {
            sh.release_total(n);
            return Err(Fail::Err(StoreError::NotMapped(cur)));
        }
        if !b.valid.load(Ordering::SeqCst) {
            sh.release_total(n);
            return Err(Fail::Retry(cur));
        }
        let base = b.host_base();
        let mut taken = 0u64;
        let mut overflow = false;
        // Pages of this call pinned before this mapping.
        let before = len;
        let keys_out = &mut keys_out;
        // One leaf of pin counts (and of storage keys) at a time.
        let mut per_leaf = |idx0: u64, counts: &[AtomicU64]| {
            if overflow {
                return;
            }
            let mut got = 0usize;
            for c in counts {
                if c.fetch_add(inc, Ordering::SeqCst) & 0xffff_ffff >= PIN_MAX {
                    c.fetch_sub(inc, Ordering::SeqCst);
                    overflow = true;
                    break;
                }
                got += 1;
            }
            // Keys are recorded only once a leaf of them exists (else every key is 0).
            if let Some(keys) = sh.keys.chunk(idx0, got) {
                keys_out.resize(before + taken as usize, 0);
                keys_out.extend(keys.iter().map(|k| k.load(Ordering::Relaxed)));
            }
            taken += got as u64;
        };
        // A run inside one existing leaf (the usual case): no leaf walk.
        match sh.pins.chunk(first, n as usize) {
            Some(counts) => per_leaf(first, counts),
            None => {
                sh.pins.chunks_or_init(first, n, per_leaf);
            }
        }
        if taken < n {
            // Return the untaken part of the total; the taken part goes with the segment.
            sh.release_total(n - taken);
        }
        if taken > 0 {
            if perm.write && sh.globals.tracking.load(Ordering::SeqCst) {
                b.dirty()
                    .set_addr_range((first * PAGE_SIZE) as usize, (taken * PAGE_SIZE) as usize);
            }
            let seg = Segment {
                region: Arc::clone(b),
                first,
                n: taken,
                write: perm.write,
                iova: sh.iova + first * PAGE_SIZE,
                host: base + first * PAGE_SIZE,
            };
            match &mut out {
                None => {
                    out = Some(PinnedPages {
                        head: seg,
                        len: 0,
                        extra: OnceLock::new(),
                    })
                }
                Some(p) => p.with_extra(|e| e.rest.push(seg)),
            }
            len += taken as usize;
            if let Some(p) = &mut out {
                p.len = len;
            }
        }
        if taken < n {
            return Err(Fail::Err(StoreError::Busy {
                iova: cur,
                size: PAGE_SIZE,
            }));
        }
        left -= n;
        // Wraps only when the last page is at the top of the space, and then left == 0.
        cur = cur.wrapping_add(n * PAGE_SIZE);
    }
    // npages >= 1, so a run was pinned (every failure returned above).
    let mut out = out.ok_or(Fail::Err(StoreError::Invalid(
        "pin count must be 1..=512 pages",
    )))?;
    if !keys_out.is_empty() {
        out.with_extra(|e| e.keys = keys_out);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::iommu_store::{Backing, IommuStore, Perm, StoreConfig, PAGE_SIZE};

    /// Pages are kept as runs and listed on request, with the storage keys as they were at
    /// pin time (a later key change does not show), and one run per mapping.
    #[test]
    fn runs_list_pages_with_keys_at_pin_time() {
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0x10000, 0x2000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        store
            .map_dma(0x12000, 0x2000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        // Keys only in the second mapping: the first one's pages are listed with key 0.
        store.set_storage_key(0x13000, 0x30).unwrap();
        let p = store.pin(0x11000, 3, Perm::WRITE).unwrap();
        assert_eq!(p.len(), 3);
        store.set_storage_key(0x13000, 0x50).unwrap();
        store.set_storage_key(0x11000, 0x60).unwrap();
        let runs: Vec<_> = p.runs().map(|(iova, _, n, w)| (iova, n, w)).collect();
        assert_eq!(runs, [(0x11000, 1, true), (0x12000, 2, true)]);
        let pages = p.pages();
        let got: Vec<_> = pages
            .iter()
            .map(|q| (q.iova, q.storage_key, q.writable))
            .collect();
        assert_eq!(
            got,
            [
                (0x11000, 0, true),
                (0x12000, 0, true),
                (0x13000, 0x30, true)
            ]
        );
        let (_, host, _, _) = p.runs().nth(1).unwrap();
        assert_eq!(pages[2].host_addr, host + PAGE_SIZE);
        assert_eq!((p.key(0), p.key(2), p.key(3)), (0, 0x30, 0));
        assert_eq!(store.stats().pinned_pages, 3);
        drop(p);
        assert_eq!(store.stats().pinned_pages, 0);
    }
}
