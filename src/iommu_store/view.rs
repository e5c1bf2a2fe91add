//! One snapshot held for a burst of lookups (a whole channel-program translation), so each
//! read or pin skips the snapshot load. On any failure the operation is redone through the
//! store (a fresh snapshot): the outcome is the one a fresh lookup gives, only the successful
//! common case is faster.

use vm_memory::GuestMemoryLoadGuard;

use super::error::StoreError;
use super::keys::storage_key_in;
use super::pin::{check_pin_args, try_pin, try_pin_fast, try_pin_general};
use super::rw::read_in;
use super::types::Perm;
use super::{IommuStore, PinnedPages, Snapshot};

/// A store seen through one snapshot (see the module docs).
pub(crate) struct StoreView<'a> {
    store: &'a IommuStore,
    snap: GuestMemoryLoadGuard<Snapshot>,
}

impl IommuStore {
    /// A view of the store through its current snapshot, for many lookups in a row.
    pub(crate) fn view(&self) -> StoreView<'_> {
        StoreView {
            store: self,
            snap: self.snapshot(),
        }
    }
}

impl StoreView<'_> {
    /// [`IommuStore::read`].
    pub(crate) fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        read_in(&self.snap, iova, buf).or_else(|_| self.store.read(iova, buf))
    }

    /// [`IommuStore::storage_key`].
    pub(crate) fn storage_key(&self, iova: u64) -> Result<u8, StoreError> {
        storage_key_in(&self.snap, iova).or_else(|_| self.store.storage_key(iova))
    }

    /// [`IommuStore::pin`].
    pub(crate) fn pin(
        &self,
        iova: u64,
        npages: usize,
        perm: Perm,
    ) -> Result<PinnedPages, StoreError> {
        check_pin_args(iova, npages, perm)?;
        // A failed attempt holds nothing: redo it as a plain pin would.
        try_pin(&self.snap, iova, npages as u64, perm)
            .or_else(|_| self.store.pin(iova, npages, perm))
    }

    /// [`IommuStore::pin_runs`].
    pub(crate) fn pin_runs(&self, runs: &[(u64, u64, Perm)]) -> Result<PinnedPages, StoreError> {
        // (The fast path checks the arguments itself.)
        if let Some(p) = try_pin_fast(&self.snap, runs) {
            return Ok(p);
        }
        for &(iova, n, perm) in runs {
            check_pin_args(iova, n as usize, perm)?;
        }
        // A failed attempt holds nothing: redo it as a plain pin would.
        try_pin_general(&self.snap, runs).or_else(|_| self.store.pin_runs(runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu_store::{Backing, StoreConfig};

    #[test]
    fn view_sees_what_the_store_sees_and_falls_back_on_change() {
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0x1000, 0x2000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        store.write(0x1ff8, &[7; 16]).unwrap();
        store.set_storage_key(0x2000, 0x58).unwrap();
        let v = store.view();
        let mut b = [0u8; 16];
        v.read(0x1ff8, &mut b).unwrap();
        assert_eq!(b, [7; 16]);
        assert_eq!(v.storage_key(0x2000).unwrap(), 0x58);
        assert_eq!(v.storage_key(0x1000).unwrap(), 0);
        {
            let p = v.pin(0x1000, 2, Perm::WRITE).unwrap();
            assert_eq!(p.pages()[1].storage_key, 0x58);
            assert_eq!(store.stats().pinned_pages, 2);
        }
        assert_eq!(store.stats().pinned_pages, 0);
        // A mapping made after the view's snapshot: found through the fallback.
        store
            .map_dma(0x8000, 0x1000, Perm::READ, Backing::Anonymous)
            .unwrap();
        assert!(v.read(0x8000, &mut b).is_ok());
        assert_eq!(v.pin(0x8000, 1, Perm::READ).unwrap().len(), 1);
        // Errors are the store's own.
        assert_eq!(
            v.pin(0x8000, 1, Perm::WRITE).unwrap_err(),
            store.pin(0x8000, 1, Perm::WRITE).unwrap_err()
        );
        assert_eq!(
            v.read(0x9000, &mut b).unwrap_err(),
            store.read(0x9000, &mut b).unwrap_err()
        );
        assert!(v.pin(0x1000, 0, Perm::READ).is_err());
        assert_eq!(store.stats().pinned_pages, 0);
    }
}
