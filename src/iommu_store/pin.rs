//! Page pinning: the translator's hot path. No store lock is taken unless the snapshot is
//! stale; each page costs one atomic add on its count.

use std::sync::atomic::Ordering;
use std::sync::Arc;

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
}

impl Segment {
    fn release(&self) {
        let sh = &self.region.shared;
        let dec = PIN_ONE + if self.write { PIN_WRITE } else { 0 };
        sh.pins.run_or_init(self.first, self.n, |_, c| {
            c.fetch_sub(dec, Ordering::SeqCst);
        });
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

enum Pages {
    One(PinnedPage),
    Many(Vec<PinnedPage>),
}

/// Pages pinned by one [`IommuStore::pin`] call.
///
/// Dropping it unpins every page exactly once. It holds its mappings' memory alive, so the
/// host addresses stay valid for its whole life, even across an unmap attempt.
pub struct PinnedPages {
    head: Option<Segment>,
    rest: Vec<Segment>,
    pages: Pages,
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
        match &self.pages {
            Pages::One(p) => std::slice::from_ref(p),
            Pages::Many(v) => v,
        }
    }

    /// Number of pinned pages.
    pub fn len(&self) -> usize {
        self.pages().len()
    }

    /// Always false (a pin takes at least one page); for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.pages().is_empty()
    }

    fn push(&mut self, s: Segment) {
        if self.head.is_none() {
            self.head = Some(s);
        } else {
            self.rest.push(s);
        }
    }
}

impl Drop for PinnedPages {
    fn drop(&mut self) {
        if let Some(s) = &self.head {
            s.release();
        }
        for s in &self.rest {
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
    let mut out = PinnedPages {
        head: None,
        rest: Vec::new(),
        pages: if npages == 1 {
            Pages::One(PinnedPage {
                iova,
                host_addr: 0,
                storage_key: 0,
                writable: perm.write,
            })
        } else {
            Pages::Many(Vec::with_capacity(npages as usize))
        },
    };
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
        let pages = &mut out.pages;
        // One leaf of pin counts (and of storage keys) at a time.
        sh.pins.chunks_or_init(first, n, |idx0, counts| {
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
            taken += got as u64;
            let keys = sh.keys.chunk(idx0, counts.len());
            let page = |i: usize| {
                let idx = idx0 + i as u64;
                PinnedPage {
                    iova: sh.iova + idx * PAGE_SIZE,
                    host_addr: base + idx * PAGE_SIZE,
                    storage_key: keys.map_or(0, |k| k[i].load(Ordering::Relaxed)),
                    writable: perm.write,
                }
            };
            match pages {
                Pages::One(p) => {
                    if got > 0 {
                        *p = page(0);
                    }
                }
                Pages::Many(v) => v.extend((0..got).map(page)),
            }
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
            out.push(Segment {
                region: Arc::clone(b),
                first,
                n: taken,
                write: perm.write,
            });
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
    Ok(out)
}
