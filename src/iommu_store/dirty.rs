//! Dirty-page tracking with type1 START / STOP / GET_BITMAP semantics, kept in each
//! mapping's vm-memory `AtomicBitmap`.
//!
//! A page is dirty if it was pinned for write or stored to through [`IommuStore::write`]
//! since the last query. A query clears the bits it reports, except for pages still pinned
//! for write: those stay dirty until they are unpinned and reported once more.

use std::sync::atomic::Ordering;

use super::error::StoreError;
use super::mapping;
use super::region::Backed;
use super::types::{MAX_DIRTY_BITMAP_PAGES, PAGE_SIZE};
use super::IommuStore;

fn write_pinned(b: &Backed, idx: u64) -> bool {
    b.shared
        .pins
        .get(idx)
        .is_some_and(|c| c.load(Ordering::SeqCst) > 0)
}

/// Copies the dirty bits of `old` into `new` (a VADDR update swaps the memory, not the
/// pages' history).
pub(crate) fn carry_over(old: &Backed, new: &Backed) {
    let npages = old.shared.size / PAGE_SIZE;
    for idx in 0..npages {
        let off = (idx * PAGE_SIZE) as usize;
        if old.dirty().is_addr_set(off) {
            new.dirty().set_addr_range(off, PAGE_SIZE as usize);
        }
    }
}

impl IommuStore {
    /// DIRTY_PAGES START: clears every mapping's bitmap, then marks the pages currently
    /// pinned for write. Starting twice is harmless (as in type1).
    pub fn dirty_start(&self) -> Result<(), StoreError> {
        let table = self.table();
        // Set before the scan: a concurrent pin-for-write either sees it and marks its own
        // pages, or its count is visible to the scan below.
        self.inner.globals.tracking.store(true, Ordering::SeqCst);
        for r in table.iter() {
            let b = &r.0;
            b.dirty().reset();
            b.shared
                .pins
                .for_each_present(0, b.shared.size / PAGE_SIZE, |idx, c| {
                    if c.load(Ordering::SeqCst) > 0 {
                        b.dirty()
                            .set_addr_range((idx * PAGE_SIZE) as usize, PAGE_SIZE as usize);
                    }
                });
        }
        Ok(())
    }

    /// DIRTY_PAGES STOP. Stopping when not started is harmless (as in type1).
    pub fn dirty_stop(&self) -> Result<(), StoreError> {
        self.inner.globals.tracking.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// DIRTY_PAGES GET_BITMAP for `iova..iova + size` at `pgsize` granularity: bit `i` of
    /// word `i / 64` (least significant first) is page `iova + i * pgsize`. Unmapped pages
    /// read as clean.
    ///
    /// Errors (EINVAL): tracking not started; `pgsize` other than 4096; zero size; `iova`
    /// or `size` unaligned; a wrapping range; more than `MAX_DIRTY_BITMAP_PAGES` pages; a
    /// range that bisects a mapping.
    pub fn dirty_bitmap(&self, iova: u64, size: u64, pgsize: u64) -> Result<Vec<u64>, StoreError> {
        if !self.inner.globals.tracking.load(Ordering::SeqCst) {
            return Err(StoreError::Invalid("dirty tracking is not started"));
        }
        if pgsize != PAGE_SIZE {
            return Err(StoreError::Invalid("dirty bitmap page size must be 4096"));
        }
        let last = mapping::check_range(iova, size)?;
        let npages = size / PAGE_SIZE;
        if npages > MAX_DIRTY_BITMAP_PAGES {
            return Err(StoreError::Invalid("dirty bitmap range too large"));
        }
        let table = self.table();
        let regions = table.whole_in(iova, last)?;
        let mut out = vec![0u64; npages.div_ceil(64) as usize];
        for r in &regions {
            let b = &r.0;
            let base = (b.shared.iova - iova) / PAGE_SIZE;
            for idx in 0..b.shared.size / PAGE_SIZE {
                let off = (idx * PAGE_SIZE) as usize;
                let pinned = write_pinned(b, idx);
                if b.dirty().is_addr_set(off) || pinned {
                    let bit = base + idx;
                    out[(bit / 64) as usize] |= 1 << (bit % 64);
                    if !pinned {
                        // (vm-memory's bitmap granularity is the host page: on hosts with
                        // pages above 4 KiB this clears the neighbours in that page too.)
                        b.dirty().reset_addr_range(off, PAGE_SIZE as usize);
                    }
                }
            }
        }
        Ok(out)
    }
}
