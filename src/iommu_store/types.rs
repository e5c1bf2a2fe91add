//! Plain value types of the store: configuration, permissions, info and statistics.

use std::time::Duration;

/// The store's only page size (the type1 `pgsize_bitmap` has just this bit set).
pub const PAGE_SIZE: u64 = 4096;

/// Most pages one [`IommuStore::pin`](super::IommuStore::pin) call may pin (type1's
/// `VFIO_PIN_PAGES_MAX_ENTRIES`).
pub const MAX_PIN_PAGES: usize = 512;

/// Default `dma_entry_limit`, the type1 module parameter's default.
pub const DEFAULT_DMA_ENTRY_LIMIT: u32 = 65_535;

/// Default time an unmap waits for pinned pages to be released before failing with EBUSY.
pub const DEFAULT_UNMAP_TIMEOUT: Duration = Duration::from_secs(1);

/// Most pages one dirty-bitmap query may cover (type1's `DIRTY_BITMAP_PAGES_MAX`, `INT_MAX`).
pub const MAX_DIRTY_BITMAP_PAGES: u64 = i32::MAX as u64;

/// Store configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Most mappings the store holds at once; one more MAP_DMA fails with ENOSPC.
    pub dma_entry_limit: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            dma_entry_limit: DEFAULT_DMA_ENTRY_LIMIT,
        }
    }
}

/// Device access permissions of a mapping or a pin (type1 `VFIO_DMA_MAP_FLAG_READ/WRITE`,
/// from the device's point of view: READ = the device fetches, WRITE = the device stores).
/// `Default` is no permission (what [`Perm::is_empty`] reports), which no pin accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Perm {
    /// The device may read (fetch from) the memory.
    pub read: bool,
    /// The device may write (store into) the memory.
    pub write: bool,
}

impl Perm {
    /// Read only.
    pub const READ: Perm = Perm {
        read: true,
        write: false,
    };
    /// Write only.
    pub const WRITE: Perm = Perm {
        read: false,
        write: true,
    };
    /// Read and write.
    pub const READ_WRITE: Perm = Perm {
        read: true,
        write: true,
    };

    /// True when neither read nor write is set.
    #[inline]
    pub fn is_empty(self) -> bool {
        // (Non-short-circuit operators: no branches on the pin path.)
        !(self.read | self.write)
    }

    /// True when every access in `need` is allowed by `self`.
    #[inline]
    pub fn allows(self, need: Perm) -> bool {
        !((need.read & !self.read) | (need.write & !self.write))
    }
}

/// What VFIO_IOMMU_GET_INFO reports for this store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreInfo {
    /// Supported page sizes (only [`PAGE_SIZE`]).
    pub pgsize_bitmap: u64,
    /// Usable IOVA ranges, inclusive `(start, last)`: the whole 64-bit space.
    pub iova_ranges: Vec<(u64, u64)>,
    /// How many more mappings MAP_DMA accepts (the DMA_AVAIL capability).
    pub dma_avail: u32,
    /// Page sizes the dirty bitmap supports (the migration capability).
    pub migration_pgsize_bitmap: u64,
    /// Most pages one dirty-bitmap query may cover (the migration capability).
    pub max_dirty_bitmap_pages: u64,
}

/// A snapshot of the store's counters, for leak checks and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Mappings in the table (including ones with an invalidated process address).
    pub mappings: usize,
    /// Pages currently pinned, counted once per pin (a page pinned twice counts 2).
    pub pinned_pages: u64,
    /// Mappings whose process address is invalidated (FLAG_VADDR) and not yet updated.
    pub invalid_vaddrs: usize,
    /// Whether dirty-page tracking is started.
    pub dirty_tracking: bool,
}

#[cfg(test)]
mod tests {
    use super::Perm;

    /// `allows` and `is_empty` over every pair: a permission allows exactly its subsets.
    #[test]
    fn perm_allows_exactly_its_subsets() {
        let all = [Perm::default(), Perm::READ, Perm::WRITE, Perm::READ_WRITE];
        for have in all {
            assert_eq!(have.is_empty(), !have.read && !have.write);
            for need in all {
                let subset = (!need.read || have.read) && (!need.write || have.write);
                assert_eq!(have.allows(need), subset, "{have:?} {need:?}");
            }
        }
        assert!(!Perm::READ.allows(Perm::READ_WRITE));
        assert!(Perm::READ_WRITE.allows(Perm::WRITE));
        assert!(Perm::default().is_empty() && !Perm::WRITE.is_empty());
    }
}
