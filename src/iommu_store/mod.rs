//! The VFIO type1-compatible "store-only" IOMMU.
//!
//! MAP_DMA and UNMAP_DMA only *record* IOVA (= guest physical) to process-virtual
//! translations; nothing is pinned until the channel-program translator asks for pages with
//! [`IommuStore::pin`]. The rules (errnos included) follow the kernel's
//! `drivers/vfio/vfio_iommu_type1.c`.
//!
//! # Design
//! * The authoritative table is a `BTreeMap` (O(log n) overlap and bisect checks) behind a
//!   mutex that only MAP/UNMAP/VADDR/dirty operations take.
//! * Lookups go through a vm-memory `GuestRegionCollection` of `StoreRegion`s published
//!   with `GuestMemoryAtomic` (an RCU-style snapshot): binary search, no lock. A change marks
//!   the snapshot stale and the next lookup rebuilds it once, so a burst of 65,535 MAP_DMA
//!   calls costs one rebuild, not O(n²) vector clones.
//! * Each mapping's memory is a vm-memory `GuestRegionMmap<AtomicBitmap>` holding exactly the
//!   mapped bytes; its `AtomicBitmap` is the dirty bitmap (stores through [`IommuStore::write`]
//!   mark it as vm-memory writes do).
//! * Pins are counted in their mapping (its total, found through the snapshot), pins for
//!   write also per page (atomic counts: those pages stay dirty while pinned); a pin holds
//!   an `Arc` of the mapping's memory, so no pointer to unmapped memory can survive.
//! * Pin versus unmap: a pin adds to the mapping's pin total and *then* checks its `dying`
//!   flag; an unmap sets `dying` and *then* reads the total (both sequentially consistent),
//!   so either the pin fails or the unmap sees it.
//!
//! # Deviations from type1, by design
//! * A pin in a mapping whose process address is invalidated (UNMAP with FLAG_VADDR) fails
//!   at once with EBUSY rather than blocking.
//! * A pin in a mapping that an unmap is removing fails with EINVAL (as if already unmapped).
//! * An unmap of a range with pinned pages notifies every [`UnmapListener`] (no store lock
//!   held), then waits up to the unmap timeout (1 s by default) for the pins to be dropped;
//!   if they are not, it fails with EBUSY and leaves the mappings in place.
//! * VADDR invalidate and update both need an exact iova/size match of one mapping.
//! * The memory of an unmapped range is released once no pin holds it and the published
//!   snapshot has been rebuilt (at the next lookup).

mod backing;
mod dirty;
mod error;
mod keys;
mod mapping;
mod pages;
mod pin;
mod query;
mod region;
mod rw;
mod types;
mod unmap;
mod view;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestRegionCollection,
};

pub use backing::{Backing, StoreMmapRegion};
pub use error::StoreError;
pub use keys::KEY_FETCH_PROTECT;
pub use pin::{PinnedPage, PinnedPages};
pub use query::MappingInfo;
pub use types::{
    Perm, StoreConfig, StoreInfo, StoreStats, DEFAULT_DMA_ENTRY_LIMIT, DEFAULT_UNMAP_TIMEOUT,
    MAX_DIRTY_BITMAP_PAGES, MAX_PIN_PAGES, PAGE_SIZE,
};

use mapping::Table;
use region::{Backed, Globals, Shared, StoreRegion};
pub(crate) use view::StoreView;

/// Told when an unmap covers pages it still has pinned; it must drop those pins (the
/// vfio-ccw driver resets the device and frees its channel program).
pub trait UnmapListener: Send + Sync {
    /// The mapping `iova..iova + size` is being unmapped while some of its pages are pinned.
    /// Called with no store lock held; the unmap waits for the pins to be dropped.
    fn unmap_pinned(&self, iova: u64, size: u64);
}

type Snapshot = GuestRegionCollection<StoreRegion>;

struct Inner {
    table: Mutex<Table>,
    mem: GuestMemoryAtomic<Snapshot>,
    /// The published snapshot lags the table; set under the table lock.
    stale: AtomicBool,
    globals: Arc<Globals>,
    listeners: Mutex<Vec<Weak<dyn UnmapListener>>>,
    unmap_timeout_us: AtomicU64,
}

/// The store: a type1-compatible IOMMU that records translations and pins on demand.
///
/// `Clone` shares the same store (an `Arc` inside); it is `Send + Sync`.
///
/// # Example
/// ```
/// use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
///
/// let store = IommuStore::new(StoreConfig::default());
/// store.map_dma(0x10000, 0x4000, Perm::READ_WRITE, Backing::Anonymous)?;
/// store.write(0x10ff8, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])?; // spans two pages
/// let mut buf = [0u8; 10];
/// store.read(0x10ff8, &mut buf)?;
/// assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
/// {
///     let pins = store.pin(0x11000, 2, Perm::WRITE)?;
///     assert_eq!(pins.pages()[1].iova, 0x12000);
///     assert_eq!(store.stats().pinned_pages, 2);
/// } // dropping the pins releases them
/// assert_eq!(store.stats().pinned_pages, 0);
/// assert_eq!(store.unmap_dma(0, 0, true)?, 0x4000);
/// # Ok::<(), vccw::iommu_store::StoreError>(())
/// ```
#[derive(Clone)]
pub struct IommuStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IommuStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuStore")
            .field("stats", &self.stats())
            .finish()
    }
}

impl IommuStore {
    /// An empty store.
    pub fn new(cfg: StoreConfig) -> Self {
        IommuStore {
            inner: Arc::new(Inner {
                table: Mutex::new(Table::new(cfg.dma_entry_limit)),
                mem: GuestMemoryAtomic::new(Snapshot::new()),
                stale: AtomicBool::new(false),
                globals: Arc::new(Globals::new()),
                listeners: Mutex::new(Vec::new()),
                unmap_timeout_us: AtomicU64::new(DEFAULT_UNMAP_TIMEOUT.as_micros() as u64),
            }),
        }
    }

    /// Sets how long an unmap waits for pinned pages to be released (default 1 s).
    pub fn set_unmap_timeout(&self, timeout: Duration) {
        let us = u64::try_from(timeout.as_micros()).unwrap_or(u64::MAX);
        self.inner.unmap_timeout_us.store(us, Ordering::Relaxed);
    }

    fn unmap_timeout(&self) -> Duration {
        Duration::from_micros(self.inner.unmap_timeout_us.load(Ordering::Relaxed))
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the snapshot stale; call with the table lock held, after changing the table.
    fn mark_stale(&self) {
        self.inner.stale.store(true, Ordering::SeqCst);
    }

    /// Rebuilds the published snapshot if the table changed since it was built.
    fn ensure_fresh(&self) {
        if self.inner.stale.load(Ordering::SeqCst) {
            let table = self.table();
            if self.inner.stale.swap(false, Ordering::SeqCst) {
                let snap = table.snapshot();
                let guard = self.inner.mem.lock().unwrap_or_else(|e| e.into_inner());
                guard.replace(snap);
            }
        }
    }

    /// The current snapshot (rebuilt first if stale): lock-free binary-search lookups.
    fn snapshot(&self) -> GuestMemoryLoadGuard<Snapshot> {
        self.ensure_fresh();
        self.inner.mem.memory()
    }

    /// MAP_DMA: records that `iova..iova + size` translates to `backing` with `perm`.
    ///
    /// Errors: `perm` empty, `size` zero, `iova`/`size`/backing offset not page aligned, the
    /// range wrapping (inclusive end: a map ending at `u64::MAX` is legal), or a backing that
    /// does not cover the range: EINVAL; overlap with a mapping: EEXIST; `dma_entry_limit`
    /// mappings already: ENOSPC; a backing whose protection forbids `perm`: EACCES; mmap
    /// failure: its errno.
    pub fn map_dma(
        &self,
        iova: u64,
        size: u64,
        perm: Perm,
        backing: Backing,
    ) -> Result<(), StoreError> {
        if perm.is_empty() {
            return Err(StoreError::Invalid("neither READ nor WRITE requested"));
        }
        let last = mapping::check_range(iova, size)?;
        if backing.offset() % PAGE_SIZE != 0 {
            return Err(StoreError::Invalid("backing offset not page aligned"));
        }
        let mut table = self.table();
        table.check_new(iova, last)?;
        let (mem, keepalive) = backing::materialize(size, perm, backing)?;
        let shared = Arc::new(Shared::new(
            iova,
            size,
            perm,
            Arc::clone(&self.inner.globals),
        ));
        table.insert(Arc::new(StoreRegion::new(Backed {
            shared,
            mem,
            _keepalive: keepalive,
            valid: AtomicBool::new(true),
        })));
        self.mark_stale();
        Ok(())
    }

    /// UNMAP_DMA with FLAG_VADDR: invalidates the process address of the mapping exactly
    /// equal to `iova`/`size`. Until [`IommuStore::update_vaddr`], pins, reads and writes in
    /// it fail with EBUSY (existing pins stay valid: they hold the old memory).
    ///
    /// Errors: bad alignment, no mapping exactly matching, or already invalidated: EINVAL.
    pub fn invalidate_vaddr(&self, iova: u64, size: u64) -> Result<(), StoreError> {
        mapping::check_range(iova, size)?;
        let table = self.table();
        let r = table.exact(iova, size).ok_or(StoreError::Invalid(
            "VADDR invalidate needs an exact mapping match",
        ))?;
        if !r.0.valid.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Invalid("mapping's vaddr is already invalid"));
        }
        Ok(())
    }

    /// MAP_DMA with FLAG_VADDR: gives the invalidated mapping exactly equal to `iova`/`size`
    /// its new process memory. Pin counts, storage keys and dirty bits carry over.
    ///
    /// Errors: bad alignment, an inexact match, or a mapping whose vaddr is valid: EINVAL;
    /// no mapping overlapping the range: ENOENT; backing errors as for [`IommuStore::map_dma`].
    pub fn update_vaddr(&self, iova: u64, size: u64, backing: Backing) -> Result<(), StoreError> {
        let last = mapping::check_range(iova, size)?;
        if backing.offset() % PAGE_SIZE != 0 {
            return Err(StoreError::Invalid("backing offset not page aligned"));
        }
        let mut table = self.table();
        if table.first_overlap(iova, last).is_none() {
            return Err(StoreError::NoEntry(iova));
        }
        let old = table.exact(iova, size).ok_or(StoreError::Invalid(
            "VADDR update needs an exact mapping match",
        ))?;
        if old.0.valid.load(Ordering::SeqCst) {
            return Err(StoreError::Invalid("mapping's vaddr is valid"));
        }
        let shared = Arc::clone(&old.0.shared);
        let (mem, keepalive) = backing::materialize(size, shared.perm, backing)?;
        let new = Backed {
            shared,
            mem,
            _keepalive: keepalive,
            valid: AtomicBool::new(true),
        };
        dirty::carry_over(&old.0, &new);
        table.replace(Arc::new(StoreRegion::new(new)));
        self.mark_stale();
        Ok(())
    }

    /// VFIO_IOMMU_GET_INFO: page sizes, IOVA ranges, DMA_AVAIL and migration capabilities.
    pub fn info(&self) -> StoreInfo {
        let table = self.table();
        StoreInfo {
            pgsize_bitmap: PAGE_SIZE,
            iova_ranges: vec![(0, u64::MAX)],
            dma_avail: table.limit().saturating_sub(table.len() as u32),
            migration_pgsize_bitmap: PAGE_SIZE,
            max_dirty_bitmap_pages: MAX_DIRTY_BITMAP_PAGES,
        }
    }

    /// Counters: mappings, pinned pages, invalid vaddrs, dirty tracking.
    pub fn stats(&self) -> StoreStats {
        let table = self.table();
        let mut s = StoreStats {
            mappings: table.len(),
            dirty_tracking: self.inner.globals.tracking.load(Ordering::SeqCst),
            ..StoreStats::default()
        };
        for r in table.iter() {
            s.pinned_pages += r.0.shared.total.load(Ordering::SeqCst);
            if !r.0.valid.load(Ordering::SeqCst) {
                s.invalid_vaddrs += 1;
            }
        }
        s
    }

    /// Registers a listener told about unmaps of pinned pages. Held weakly: a dropped
    /// listener is simply forgotten.
    pub fn register_unmap_listener(&self, l: Weak<dyn UnmapListener>) {
        let mut ls = self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        ls.retain(|w| w.strong_count() > 0);
        ls.push(l);
    }
}
