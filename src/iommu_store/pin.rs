//! Page pinning: the translator's hot path. No store lock is taken unless the snapshot is
//! stale; a run costs one atomic add on its mapping's total, and for write one on each
//! page's count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::error::StoreError;
use super::region::{Backed, Shared, PIN_MAX};
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

/// A run of pages pinned in one mapping (kept small: a pin holds two inline).
struct Segment {
    region: Arc<Backed>,
    /// IOVA and process address of the first page.
    iova: u64,
    host: u64,
    /// Pages (at most [`MAX_PIN_PAGES`]).
    n: u32,
    write: bool,
}

impl Segment {
    /// First page index inside the mapping.
    #[inline]
    fn first(&self) -> u64 {
        (self.iova - self.region.shared.iova) / PAGE_SIZE
    }

    #[inline]
    fn n(&self) -> u64 {
        self.n as u64
    }

    #[inline]
    fn release(&self) {
        if self.write {
            self.unpin_write();
        }
        // Last: an unmap waiting for the total to reach 0 sees the page counts cleared.
        self.region.shared.release_total(self.n());
    }

    /// The per-page half of releasing a run pinned for write.
    #[inline(never)]
    fn unpin_write(&self) {
        let sh = &self.region.shared;
        let (first, n) = (self.first(), self.n());
        // A run inside one leaf (the usual case): its counts directly, no leaf walk.
        match sh.pins.chunk(first, n as usize) {
            Some(counts) => counts.iter().for_each(|c| {
                c.fetch_sub(1, Ordering::SeqCst);
            }),
            None => unpin_counts_walk(sh, first, n),
        }
        if sh.globals.tracking.load(Ordering::SeqCst) {
            // The device may have stored until now.
            self.region
                .dirty()
                .set_addr_range((first * PAGE_SIZE) as usize, (n * PAGE_SIZE) as usize);
        }
    }
}

/// Pages pinned by one [`IommuStore::pin`] call.
///
/// Dropping it unpins every page exactly once. It holds its mappings' memory alive, so the
/// host addresses stay valid for its whole life, even across an unmap attempt.
///
/// The pages are kept as runs (one per mapping); the per-page list is built only when
/// [`PinnedPages::pages`] asks for it. The common case (at most two runs, no storage keys
/// set) is a small value with no allocation: the first two runs inline, everything rarer
/// boxed.
pub struct PinnedPages {
    head: Segment,
    second: Option<Segment>,
    len: usize,
    /// Further runs, keys and the page list: allocated only when one is needed.
    extra: OnceLock<Box<Extra>>,
}

/// The rarely needed parts of a [`PinnedPages`].
#[derive(Default)]
struct Extra {
    /// Runs after the second (pins spanning several mappings).
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
            .chain(&self.second)
            .chain(self.rest())
            .map(|s| (s.iova, s.host, s.n(), s.write))
    }

    /// The first two runs (see [`PinnedPages::runs`]) when there are no more.
    #[cfg(test)]
    fn two_runs(&self) -> Option<(Run, Option<Run>)> {
        if !self.rest().is_empty() {
            return None;
        }
        let run = |s: &Segment| (s.iova, s.host, s.n(), s.write);
        Some((run(&self.head), self.second.as_ref().map(run)))
    }

    /// The page holding the process address `host` as (IOVA, process address, writable,
    /// key) of the page: `Some(None)` when no page of the pin holds it, `None` when the pin
    /// has more than two runs (the caller scans [`PinnedPages::runs`] then).
    #[inline]
    pub(crate) fn page_at(&self, host: u64) -> Option<Option<(u64, u64, bool, u8)>> {
        let extra = self.extra.get();
        if extra.is_some_and(|e| !e.rest.is_empty()) {
            return None;
        }
        let key = |i: u64| extra.map_or(0, |e| e.keys.get(i as usize).copied().unwrap_or(0));
        let s = &self.head;
        let off = host.wrapping_sub(s.host);
        if off < s.n() * PAGE_SIZE {
            let k = off / PAGE_SIZE;
            let p = (
                s.iova + k * PAGE_SIZE,
                s.host + k * PAGE_SIZE,
                s.write,
                key(k),
            );
            return Some(Some(p));
        }
        if let Some(t) = &self.second {
            let off = host.wrapping_sub(t.host);
            if off < t.n() * PAGE_SIZE {
                let k = off / PAGE_SIZE;
                let p = (
                    t.iova + k * PAGE_SIZE,
                    t.host + k * PAGE_SIZE,
                    t.write,
                    key(s.n() + k),
                );
                return Some(Some(p));
            }
        }
        Some(None)
    }

    /// Appends a run pinned after the others.
    fn push_segment(&mut self, seg: Segment) {
        if self.second.is_none() {
            self.second = Some(seg);
        } else {
            self.with_extra(|e| e.rest.push(seg));
        }
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

/// A pinned run: (IOVA of the first page, its process address, pages, pinned for write).
#[cfg(test)]
type Run = (u64, u64, u64, bool);

impl Drop for PinnedPages {
    fn drop(&mut self) {
        self.head.release();
        if let Some(s) = &self.second {
            s.release();
        }
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
        self.pin_runs_checked(&[(iova, npages as u64, perm)])
    }

    /// Pins several runs (first page, pages, permission) into one [`PinnedPages`], all or
    /// nothing, each run as [`IommuStore::pin`] would pin it (the same checks and errors).
    /// The runs must be ascending and disjoint for the pages to be listed in IOVA order.
    pub(crate) fn pin_runs(&self, runs: &[(u64, u64, Perm)]) -> Result<PinnedPages, StoreError> {
        for &(iova, n, perm) in runs {
            check_pin_args(iova, n as usize, perm)?;
        }
        self.pin_runs_checked(runs)
    }

    /// [`IommuStore::pin_runs`] with the arguments checked.
    fn pin_runs_checked(&self, runs: &[(u64, u64, Perm)]) -> Result<PinnedPages, StoreError> {
        match try_pin_runs(&self.snapshot(), runs) {
            Ok(p) => Ok(p),
            Err(Fail::Err(e)) => Err(e),
            Err(Fail::Retry(at)) => {
                // One more attempt on a fresh snapshot: a VADDR update may have landed.
                self.ensure_fresh();
                match try_pin_runs(&self.snapshot(), runs) {
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
    try_pin_runs(snap, &[(iova, npages, perm)])
}

/// One attempt at pinning several runs (each's arguments already checked) into one
/// [`PinnedPages`], all or nothing: the pages of each run in order, as if each were pinned
/// by its own call. The runs must be ascending and disjoint for the pages to be listed in
/// IOVA order.
pub(super) fn try_pin_runs(
    snap: &Snapshot,
    runs: &[(u64, u64, Perm)],
) -> Result<PinnedPages, Fail> {
    if let Some(p) = try_pin_fast(snap, runs) {
        return Ok(p);
    }
    try_pin_general(snap, runs)
}

/// [`try_pin_runs`] without its fast path (which the caller has tried).
pub(super) fn try_pin_general(
    snap: &Snapshot,
    runs: &[(u64, u64, Perm)],
) -> Result<PinnedPages, Fail> {
    // Built at the first run, so a failure before it holds nothing (and a later failure
    // releases what it holds when dropped).
    let mut out: Option<PinnedPages> = None;
    let mut keys_out: Vec<u8> = Vec::new();
    for &(iova, npages, perm) in runs {
        pin_into(snap, &mut out, &mut keys_out, iova, npages, perm)?;
    }
    // Every run has at least one page, so a run was pinned (every failure returned above).
    let mut out = out.ok_or(Fail::Err(StoreError::Invalid(
        "pin count must be 1..=512 pages",
    )))?;
    if !keys_out.is_empty() {
        out.with_extra(|e| e.keys = keys_out);
    }
    Ok(out)
}

/// The common case of [`try_pin_runs`], its outcome for a fraction of the work: one or two
/// runs, each inside one mapping (and for write in one allocated leaf of its pin counts),
/// with no storage keys recorded there (no key leaf); arguments need not be checked before.
/// `None`, holding nothing, whenever anything else holds,
/// failures included: the general path then redoes the attempt and gives its outcome.
#[inline(always)]
pub(super) fn try_pin_fast(snap: &Snapshot, runs: &[(u64, u64, Perm)]) -> Option<PinnedPages> {
    let (&(iova, n, perm), rest) = runs.split_first()?;
    if rest.len() > 1 {
        return None;
    }
    let head = pin_fast(snap, iova, n, perm)?;
    let second = match rest.first() {
        None => None,
        Some(&(iova, n2, perm)) => match pin_fast(snap, iova, n2, perm) {
            Some(s) => Some(s),
            None => {
                head.release();
                return None;
            }
        },
    };
    Some(PinnedPages {
        len: (n + second.as_ref().map_or(0, Segment::n)) as usize,
        head,
        second,
        extra: OnceLock::new(),
    })
}

/// One run of [`try_pin_fast`] as a segment (see there); `None` holding nothing.
#[inline(always)]
fn pin_fast(snap: &Snapshot, iova: u64, n: u64, perm: Perm) -> Option<Segment> {
    // The arguments as [`check_pin_args`] wants them (a run inside a mapping cannot wrap).
    if iova % PAGE_SIZE != 0 || n.wrapping_sub(1) >= MAX_PIN_PAGES as u64 || perm.is_empty() {
        return None;
    }
    let b = &snap.find_region(GuestAddress(iova))?.0;
    let sh = &b.shared;
    // (The region found holds `iova`.)
    let off = iova - sh.iova;
    if n > (sh.size - off) / PAGE_SIZE || !sh.perm.allows(perm) {
        return None;
    }
    let first = off / PAGE_SIZE;
    // Pins for read are counted in the total only.
    let counts = if perm.write {
        sh.pins.chunk(first, n as usize)?
    } else {
        &[]
    };
    if !sh.keys.unused() && sh.keys.chunk(first, n as usize).is_some() {
        return None;
    }
    // Add, then check: an unmap sets `dying` before reading `total`.
    sh.total.fetch_add(n, Ordering::SeqCst);
    if sh.dying.load(Ordering::SeqCst) || !b.valid.load(Ordering::SeqCst) {
        sh.release_total(n);
        return None;
    }
    for (k, c) in counts.iter().enumerate() {
        if c.fetch_add(1, Ordering::SeqCst) >= PIN_MAX {
            // A count at its limit (never in practice): undo what this run took.
            for c in &counts[..=k] {
                c.fetch_sub(1, Ordering::SeqCst);
            }
            sh.release_total(n);
            return None;
        }
    }
    if perm.write && sh.globals.tracking.load(Ordering::SeqCst) {
        b.dirty()
            .set_addr_range(off as usize, (n * PAGE_SIZE) as usize);
    }
    Some(Segment {
        region: Arc::clone(b),
        iova,
        host: b.host_base() + off,
        // (n <= 512: one leaf.)
        n: n as u32,
        write: perm.write,
    })
}

/// Pins `npages` pages from `iova` for `perm`, appending their runs to `out` and their
/// storage keys (once any is recorded) to `keys_out`.
fn pin_into(
    snap: &Snapshot,
    out: &mut Option<PinnedPages>,
    keys_out: &mut Vec<u8>,
    iova: u64,
    npages: u64,
    perm: Perm,
) -> Result<(), Fail> {
    let mut len = out.as_ref().map_or(0, |p| p.len);
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
        // Pins for read are counted in the total only; pins for write also per page.
        let taken = if perm.write {
            pin_counts(sh, first, n)
        } else {
            n
        };
        // Keys are recorded only once a leaf of them exists (else every key is 0).
        let before = len;
        sh.keys.for_each_present(first, taken, |idx, k| {
            keys_out.resize(before + (idx - first) as usize, 0);
            keys_out.push(k.load(Ordering::Relaxed));
        });
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
                // (taken <= npages <= 512.)
                n: taken as u32,
                write: perm.write,
                iova: sh.iova + first * PAGE_SIZE,
                host: base + first * PAGE_SIZE,
            };
            len += taken as usize;
            match out {
                None => {
                    *out = Some(PinnedPages {
                        head: seg,
                        second: None,
                        len,
                        extra: OnceLock::new(),
                    })
                }
                Some(p) => {
                    p.push_segment(seg);
                    p.len = len;
                }
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
    Ok(())
}

/// Drops a write pin from the counts of pages `first..first + n` of `sh`, leaf by leaf (a
/// run across leaves: out of line).
#[cold]
#[inline(never)]
fn unpin_counts_walk(sh: &Shared, first: u64, n: u64) {
    sh.pins.run_or_init(first, n, |_, c| {
        c.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Adds a write pin to the counts of pages `first..first + n` of `sh`, in order, up to the
/// first at its limit; returns how many were taken.
fn pin_counts(sh: &Shared, first: u64, n: u64) -> u64 {
    let mut taken = 0u64;
    let mut overflow = false;
    let mut per_leaf = |_: u64, counts: &[AtomicU64]| {
        for c in counts {
            if overflow {
                return;
            }
            if c.fetch_add(1, Ordering::SeqCst) >= PIN_MAX {
                c.fetch_sub(1, Ordering::SeqCst);
                overflow = true;
                return;
            }
            taken += 1;
        }
    };
    // A run inside one existing leaf (the usual case): no leaf walk.
    match sh.pins.chunk(first, n as usize) {
        Some(counts) => per_leaf(first, counts),
        None => {
            sh.pins.chunks_or_init(first, n, per_leaf);
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryBackend;

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

    /// Several runs pinned in one call: the pages of each in order (two runs inline, more
    /// boxed), keys indexed across runs, one release each on drop; a failing run leaves
    /// nothing pinned and reports what a plain pin of it reports.
    #[test]
    fn pin_runs_is_each_run_pinned_in_order_all_or_nothing() {
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0x10000, 0x4000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        store
            .map_dma(0x20000, 0x1000, Perm::READ, Backing::Anonymous)
            .unwrap();
        store.set_storage_key(0x13000, 0x40).unwrap();
        let runs = [
            (0x10000, 1, Perm::READ),
            (0x12000, 2, Perm::WRITE),
            (0x20000, 1, Perm::READ),
        ];
        let p = store.pin_runs(&runs).unwrap();
        assert_eq!(p.len(), 4);
        assert!(p.two_runs().is_none());
        let got: Vec<_> = p.runs().map(|(iova, _, n, w)| (iova, n, w)).collect();
        assert_eq!(
            got,
            [(0x10000, 1, false), (0x12000, 2, true), (0x20000, 1, false)]
        );
        let keys: Vec<_> = p.pages().iter().map(|q| q.storage_key).collect();
        assert_eq!(keys, [0, 0, 0x40, 0]);
        assert_eq!(store.stats().pinned_pages, 4);
        drop(p);
        assert_eq!(store.stats().pinned_pages, 0);

        // Two runs: both inline.
        let p = store.pin_runs(&runs[..2]).unwrap();
        let (a, b) = p.two_runs().unwrap();
        assert_eq!((a.0, a.2, a.3), (0x10000, 1, false));
        assert_eq!(b.map(|b| (b.0, b.2, b.3)), Some((0x12000, 2, true)));
        drop(p);

        // The last run lacks permission: nothing stays pinned, the plain pin's error.
        let bad = [(0x10000, 2, Perm::READ), (0x20000, 1, Perm::WRITE)];
        assert_eq!(
            store.pin_runs(&bad).unwrap_err(),
            store.pin(0x20000, 1, Perm::WRITE).unwrap_err()
        );
        assert_eq!(store.stats().pinned_pages, 0);
        // Argument checks per run, as a plain pin's.
        assert_eq!(
            store
                .pin_runs(&[(0x10000, 1, Perm::READ), (0x12000, 0, Perm::READ)])
                .unwrap_err(),
            store.pin(0x12000, 0, Perm::READ).unwrap_err()
        );
        let v = store.view();
        assert_eq!(v.pin_runs(&runs).unwrap().len(), 4);
        assert!(v.pin_runs(&bad).is_err());
        assert_eq!(store.stats().pinned_pages, 0);
    }

    /// The fast path (one or two runs, a leaf of counts there for write, no keys) gives
    /// what the general one gives: the same runs, counts, dirty pages and errors. Pins for
    /// read keep no page dirty; pins for write do until released.
    #[test]
    fn fast_path_pins_as_the_general_path_does() {
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0x10000, 0x4000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        store
            .map_dma(0x20000, 0x2000, Perm::READ, Backing::Anonymous)
            .unwrap();
        // The first pin for write allocates the leaf of counts (general path); later ones
        // find it.
        drop(store.pin(0x10000, 1, Perm::WRITE).unwrap());
        store.dirty_start().unwrap();
        let runs = [(0x20000, 2, Perm::READ), (0x11000, 2, Perm::WRITE)];
        let p = store.view().pin_runs(&runs).unwrap();
        assert_eq!(p.len(), 4);
        let got: Vec<_> = p.runs().map(|(iova, _, n, w)| (iova, n, w)).collect();
        assert_eq!(got, [(0x20000, 2, false), (0x11000, 2, true)]);
        let snap = store.snapshot();
        let host = |iova: u64| {
            let r = snap.find_region(vm_memory::GuestAddress(iova)).unwrap();
            r.0.host_base() + (iova - r.0.shared.iova)
        };
        let hosts: Vec<_> = p.runs().map(|(_, h, _, _)| h).collect();
        assert_eq!(hosts, [host(0x20000), host(0x11000)]);
        assert_eq!(store.stats().pinned_pages, 4);
        // Pages pinned for write are dirty and stay so while pinned; the others are not.
        assert_eq!(
            store.dirty_bitmap(0x10000, 0x4000, PAGE_SIZE).unwrap(),
            [0b0110]
        );
        assert_eq!(
            store.dirty_bitmap(0x10000, 0x4000, PAGE_SIZE).unwrap(),
            [0b0110]
        );
        assert_eq!(store.dirty_bitmap(0x20000, 0x2000, PAGE_SIZE).unwrap(), [0]);
        drop(p);
        assert_eq!(store.stats().pinned_pages, 0);
        assert_eq!(
            store.dirty_bitmap(0x10000, 0x4000, PAGE_SIZE).unwrap(),
            [0b0110]
        );
        assert_eq!(store.dirty_bitmap(0x10000, 0x4000, PAGE_SIZE).unwrap(), [0]);
        store.dirty_stop().unwrap();

        // Failures are the general path's, with nothing left pinned.
        let v = store.view();
        for bad in [
            [(0x10000, 1, Perm::READ), (0x20000, 1, Perm::WRITE)],
            [(0x10000, 1, Perm::WRITE), (0x11001, 1, Perm::READ)],
            [(0x10000, 1, Perm::WRITE), (0x11000, 0, Perm::READ)],
            [(0x10000, 513, Perm::READ), (0x20000, 1, Perm::READ)],
            [(0x10000, 1, Perm::WRITE), (0x11000, 1, Perm::default())],
            [(0x13000, 2, Perm::WRITE), (0x20000, 1, Perm::READ)],
        ] {
            let e = v.pin_runs(&bad).unwrap_err();
            assert_eq!(e, store.pin_runs(&bad).unwrap_err(), "{bad:?}");
            assert_eq!(store.stats().pinned_pages, 0, "{bad:?}");
        }
        assert_eq!(
            v.pin_runs(&[(0x20000, 1, Perm::WRITE)])
                .unwrap_err()
                .errno(),
            libc::EPERM
        );
        // A run crossing into the next mapping takes the general path.
        store
            .map_dma(0x14000, 0x1000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        let p = store.view().pin_runs(&[(0x13000, 2, Perm::READ)]).unwrap();
        assert_eq!(p.runs().count(), 2);
        drop(p);
        assert_eq!(store.stats().pinned_pages, 0);
    }

    /// A page count at its limit: the pin fails with EBUSY and takes nothing, through
    /// either path.
    #[test]
    fn count_at_its_limit_is_ebusy_and_pins_nothing() {
        use std::sync::atomic::Ordering;
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0x10000, 0x4000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        drop(store.pin(0x10000, 4, Perm::WRITE).unwrap());
        let snap = store.snapshot();
        let r = snap.find_region(vm_memory::GuestAddress(0x10000)).unwrap();
        let counts = &r.0.shared.pins;
        counts
            .get(2)
            .unwrap()
            .store(super::PIN_MAX, Ordering::SeqCst);
        // One run (fast path tried first), then two runs with the full one second.
        for runs in [
            &[(0x10000, 4, Perm::WRITE)][..],
            &[(0x10000, 1, Perm::WRITE), (0x11000, 3, Perm::WRITE)][..],
        ] {
            let e = store.view().pin_runs(runs).unwrap_err();
            assert_eq!(e.errno(), libc::EBUSY, "{runs:?}");
            assert_eq!(store.stats().pinned_pages, 0);
            let now: Vec<_> = (0..4)
                .map(|i| counts.get(i).unwrap().load(Ordering::SeqCst))
                .collect();
            assert_eq!(now, [0, 0, super::PIN_MAX, 0]);
        }
        // Pins for read are not counted per page: not limited by it.
        assert_eq!(store.pin(0x12000, 1, Perm::READ).unwrap().len(), 1);
    }
}
