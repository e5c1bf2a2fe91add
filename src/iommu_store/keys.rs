//! s390 storage keys, one byte per 4 KiB page of a mapping.
//!
//! Byte layout (as ISKE/SSKE hold it): bits 0-3 the access-control key (ACC = `key >> 4`),
//! bit 4 fetch protection (`key & 0x08`), bit 5 reference (`0x04`), bit 6 change (`0x02`);
//! bit 7 (`0x01`) is unused and must be zero. A new mapping's pages have key 0.

use std::sync::atomic::Ordering;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::error::StoreError;
use super::types::PAGE_SIZE;
use super::{IommuStore, Snapshot};

/// Storage-key bit for fetch protection.
pub const KEY_FETCH_PROTECT: u8 = 0x08;

impl IommuStore {
    /// Sets the storage key of the page containing `iova`.
    ///
    /// Errors: `iova` not mapped, or bit 7 (`0x01`) of `key` set: EINVAL.
    pub fn set_storage_key(&self, iova: u64, key: u8) -> Result<(), StoreError> {
        if key & 0x01 != 0 {
            return Err(StoreError::Invalid("storage key bit 7 is reserved"));
        }
        let snap = self.snapshot();
        let r = snap
            .find_region(GuestAddress(iova))
            .ok_or(StoreError::NotMapped(iova))?;
        let sh = &r.0.shared;
        let idx = (iova - sh.iova) / PAGE_SIZE;
        let slot = sh
            .keys
            .get_or_init(idx)
            .ok_or(StoreError::NotMapped(iova))?;
        slot.store(key, Ordering::Relaxed);
        Ok(())
    }

    /// The storage key of the page containing `iova` (0 unless set).
    ///
    /// Errors: `iova` not mapped: EINVAL.
    pub fn storage_key(&self, iova: u64) -> Result<u8, StoreError> {
        storage_key_in(&self.snapshot(), iova)
    }
}

/// [`IommuStore::storage_key`] through the snapshot `snap`.
pub(super) fn storage_key_in(snap: &Snapshot, iova: u64) -> Result<u8, StoreError> {
    let r = snap
        .find_region(GuestAddress(iova))
        .ok_or(StoreError::NotMapped(iova))?;
    let sh = &r.0.shared;
    let idx = (iova - sh.iova) / PAGE_SIZE;
    Ok(sh.keys.get(idx).map_or(0, |k| k.load(Ordering::Relaxed)))
}
