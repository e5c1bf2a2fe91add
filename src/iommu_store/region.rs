//! One mapping as the published snapshot sees it: a vm-memory region plus the per-page
//! state (pin counts, storage keys) that pins and unmaps share.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::{
    GuestAddress, GuestMemoryRegion, GuestMemoryRegionBytes, GuestRegionMmap, GuestUsize,
    MemoryRegionAddress, MmapRegion, VolatileSlice,
};

use super::pages::SparsePages;
use super::types::{Perm, PAGE_SIZE};

/// Pins for write per page we refuse to exceed (a page's count is its pins for write).
pub(crate) const PIN_MAX: u64 = 0xffff_0000;

/// Store-wide state that pins need when they are dropped.
pub(crate) struct Globals {
    /// Dirty-page tracking is started.
    pub(crate) tracking: AtomicBool,
    waiter: Mutex<()>,
    cv: Condvar,
}

impl Globals {
    pub(crate) fn new() -> Self {
        Globals {
            tracking: AtomicBool::new(false),
            waiter: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    /// Wakes unmaps waiting for pins to go.
    pub(crate) fn notify(&self) {
        let _g = self.waiter.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }

    /// Waits until `done()` holds or `timeout` passes; returns `done()`'s last value.
    pub(crate) fn wait_until(&self, timeout: std::time::Duration, done: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.waiter.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Checked under the waiter lock: a release notifies under it too, so no wake-up
            // is lost between this check and the wait.
            if done() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            // Short slices as a backstop in case a wake-up is missed anyway.
            let slice = (deadline - now).min(std::time::Duration::from_millis(10));
            g = self
                .cv
                .wait_timeout(g, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The state of one mapping that outlives a VADDR update (which only swaps the memory).
pub(crate) struct Shared {
    pub(crate) iova: u64,
    pub(crate) size: u64,
    pub(crate) perm: Perm,
    /// Per-page counts of pins for write (the pages kept dirty while pinned). Pins for read
    /// are counted only in `total`: nothing needs them per page.
    pub(crate) pins: SparsePages<AtomicU64>,
    /// Per-page s390 storage keys (default 0).
    pub(crate) keys: SparsePages<AtomicU8>,
    /// Total page pins outstanding in this mapping; with `dying` it forms the
    /// increment-then-check pair that makes pin versus unmap safe.
    pub(crate) total: AtomicU64,
    /// An unmap is in progress (or done): new pins fail.
    pub(crate) dying: AtomicBool,
    pub(crate) globals: Arc<Globals>,
}

impl Shared {
    pub(crate) fn new(iova: u64, size: u64, perm: Perm, globals: Arc<Globals>) -> Self {
        let npages = size / PAGE_SIZE;
        Shared {
            iova,
            size,
            perm,
            pins: SparsePages::new(npages),
            keys: SparsePages::new(npages),
            total: AtomicU64::new(0),
            dying: AtomicBool::new(false),
            globals,
        }
    }

    /// Last byte of the mapping (inclusive, so a mapping may end at `u64::MAX`).
    pub(crate) fn last(&self) -> u64 {
        self.iova + (self.size - 1)
    }

    /// Returns `n` page pins to the mapping's total and wakes a waiting unmap at zero.
    #[inline]
    pub(crate) fn release_total(&self, n: u64) {
        let prev = self.total.fetch_sub(n, Ordering::SeqCst);
        if prev == n && self.dying.load(Ordering::SeqCst) {
            self.globals.notify();
        }
    }
}

/// One generation of a mapping's memory: the vm-memory region holding exactly the mapped
/// bytes (region-relative, guest base 0, so a mapping ending at `u64::MAX` is expressible).
pub(crate) struct Backed {
    pub(crate) shared: Arc<Shared>,
    pub(crate) mem: GuestRegionMmap<AtomicBitmap>,
    /// Keeps a caller's region alive while `mem` aliases part of it.
    pub(crate) _keepalive: Option<Arc<MmapRegion<AtomicBitmap>>>,
    /// Cleared by UNMAP with FLAG_VADDR; a VADDR update installs a new `Backed`.
    pub(crate) valid: AtomicBool,
}

impl Backed {
    /// Process-virtual address of the mapping's first byte.
    pub(crate) fn host_base(&self) -> u64 {
        self.mem.as_ptr() as u64
    }

    /// The vm-memory dirty bitmap of this generation (offsets are mapping-relative).
    pub(crate) fn dirty(&self) -> &AtomicBitmap {
        MmapRegion::bitmap(&self.mem)
    }
}

/// A mapping in the published `GuestRegionCollection`. The bounds are copied inline so the
/// snapshot's binary search touches one cache line per step; `.0` is what a pin clones to
/// keep the memory alive.
pub(crate) struct StoreRegion(pub(crate) Arc<Backed>, u64, u64);

impl StoreRegion {
    pub(crate) fn new(b: Backed) -> Self {
        let (iova, size) = (b.shared.iova, b.shared.size);
        StoreRegion(Arc::new(b), iova, size)
    }
}

impl GuestMemoryRegion for StoreRegion {
    type B = AtomicBitmap;

    fn len(&self) -> GuestUsize {
        self.2
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(self.1)
    }

    fn bitmap(&self) -> BS<'_, Self::B> {
        self.0.mem.bitmap()
    }

    fn get_host_address(
        &self,
        addr: MemoryRegionAddress,
    ) -> vm_memory::guest_memory::Result<*mut u8> {
        self.0.mem.get_host_address(addr)
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> vm_memory::guest_memory::Result<VolatileSlice<'_, BS<'_, Self::B>>> {
        self.0.mem.get_slice(offset, count)
    }
}

impl GuestMemoryRegionBytes for StoreRegion {}
