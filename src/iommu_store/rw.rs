//! Unpinned copies to and from mapped memory (CCW and IDAW fetches, DMA_READ/DMA_WRITE).

use std::sync::atomic::Ordering;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::error::StoreError;
use super::region::StoreRegion;
use super::types::Perm;
use super::{IommuStore, Snapshot};

impl IommuStore {
    /// Copies `buf.len()` bytes from `iova` (may span mappings). Every byte must be mapped
    /// with READ permission; the whole range is checked before any byte moves.
    ///
    /// Errors: range wraps or a byte is unmapped: EINVAL; a mapping without READ: EPERM; an
    /// invalidated vaddr: EBUSY.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        read_in(&self.snapshot(), iova, buf)
    }

    /// Copies `data` to `iova` (may span mappings). Every byte must be mapped with WRITE
    /// permission; the whole range is checked before any byte moves. The stores mark the
    /// mapping's vm-memory dirty bitmap.
    ///
    /// Errors: as [`IommuStore::read`], with WRITE in place of READ.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), StoreError> {
        access(
            &self.snapshot(),
            iova,
            data.len(),
            Perm::WRITE,
            |r, off, start, n| {
                let s = r
                    .get_slice(MemoryRegionAddress(off), n)
                    .map_err(|_| StoreError::NotMapped(iova))?;
                // VolatileSlice::copy_from marks the region's AtomicBitmap.
                s.copy_from(&data[start..start + n]);
                Ok(())
            },
        )
    }
}

/// [`IommuStore::read`] through the snapshot `snap`.
pub(super) fn read_in(snap: &Snapshot, iova: u64, buf: &mut [u8]) -> Result<(), StoreError> {
    access(snap, iova, buf.len(), Perm::READ, |r, off, start, n| {
        let s = r
            .get_slice(MemoryRegionAddress(off), n)
            .map_err(|_| StoreError::NotMapped(iova))?;
        s.copy_to(&mut buf[start..start + n]);
        Ok(())
    })
}

/// Checks `iova..iova + len` in `snap` for `need`, then calls `f(region, region offset,
/// buffer offset, length)` for each piece in order.
fn access(
    snap: &Snapshot,
    iova: u64,
    len: usize,
    need: Perm,
    f: impl FnMut(&StoreRegion, u64, usize, usize) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if len == 0 {
        return Ok(());
    }
    iova.checked_add(len as u64 - 1)
        .ok_or(StoreError::Invalid("access wraps around the address space"))?;
    // The common case, one mapping holding the whole range: one lookup, not two passes.
    if let Some(r) = snap.find_region(GuestAddress(iova)) {
        let sh = &r.0.shared;
        let off = iova - sh.iova;
        if sh.size - off >= len as u64 && sh.perm.allows(need) && r.0.valid.load(Ordering::SeqCst) {
            let mut f = f;
            return f(r, off, 0, len);
        }
    }
    access_pieces(snap, iova, len, need, f)
}

/// [`access`] of a range that is not all in one allowed mapping (out of line: the common
/// case above stays small).
#[inline(never)]
fn access_pieces(
    snap: &Snapshot,
    iova: u64,
    len: usize,
    need: Perm,
    mut f: impl FnMut(&StoreRegion, u64, usize, usize) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    // Pass 1 checks everything, pass 2 copies: a fault transfers nothing.
    for pass in 0..2 {
        let mut done = 0usize;
        while done < len {
            let cur = iova + done as u64;
            let r = snap
                .find_region(GuestAddress(cur))
                .ok_or(StoreError::NotMapped(cur))?;
            let sh = &r.0.shared;
            let off = cur - sh.iova;
            let n = ((sh.size - off).min((len - done) as u64)) as usize;
            if pass == 0 {
                if !sh.perm.allows(need) {
                    return Err(StoreError::Permission(cur));
                }
                if !r.0.valid.load(Ordering::SeqCst) {
                    return Err(StoreError::VaddrInvalid(cur));
                }
            } else {
                f(r, off, done, n)?;
            }
            done += n;
        }
    }
    Ok(())
}
