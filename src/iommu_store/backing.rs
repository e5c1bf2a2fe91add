//! Where a mapping's bytes live, and how the store turns that into a vm-memory region.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use super::error::StoreError;
use super::types::{Perm, PAGE_SIZE};

/// A vm-memory mapping the store can share with its caller (dirty bitmap included).
pub type StoreMmapRegion = MmapRegion<AtomicBitmap>;

/// The process memory behind a MAP_DMA (or a VADDR update).
#[derive(Debug)]
pub enum Backing {
    /// The store mmaps (`MAP_SHARED`) the mapping's `size` bytes of `file` at `offset` and
    /// owns that mapping. `offset` must be page aligned, and the range must lie inside the
    /// file: touching a page past its end would raise SIGBUS, so such a range is refused with
    /// EINVAL. (A client that shrinks the file afterwards can still cause SIGBUS: prefer
    /// sealed memfds, `F_SEAL_SHRINK`.)
    File {
        /// The file (typically a memfd received over vfio-user).
        file: std::fs::File,
        /// Byte offset of the mapping's first page in the file.
        offset: u64,
    },
    /// A fresh anonymous zero-filled private mapping owned by the store (tests, `vccw
    /// translate`).
    Anonymous,
    /// `size` bytes at `offset` of an existing vm-memory mapping shared with the caller
    /// (e.g. a VMM's guest RAM). The store keeps the `Arc`, so the memory outlives every pin.
    Region {
        /// The caller's mapping.
        region: Arc<StoreMmapRegion>,
        /// Byte offset of the mapping's first page in `region`.
        offset: u64,
    },
}

impl Backing {
    /// The backing offset, checked for page alignment with the other MAP arguments.
    pub(crate) fn offset(&self) -> u64 {
        match self {
            Backing::File { offset, .. } | Backing::Region { offset, .. } => *offset,
            Backing::Anonymous => 0,
        }
    }
}

fn prot_for(perm: Perm) -> i32 {
    // The store itself reads guest memory for CCW/IDAW fetches and copies; a write-only
    // mapping still needs PROT_READ on most architectures for stores, so always ask for it.
    if perm.write {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    }
}

fn mmap_err(e: MmapRegionError) -> StoreError {
    match e {
        MmapRegionError::Mmap(io) => StoreError::Host(io.raw_os_error().unwrap_or(libc::ENOMEM)),
        MmapRegionError::InvalidPointer => {
            StoreError::Invalid("backing offset not host-page aligned")
        }
        _ => StoreError::Invalid("backing mapping refused"),
    }
}

/// The memory generation built from `backing`: the region (exactly `size` bytes) and, for
/// `Backing::Region`, the caller's mapping to keep alive.
pub(crate) type Materialized = (GuestRegionMmap<AtomicBitmap>, Option<Arc<StoreMmapRegion>>);

/// Creates the region for a mapping of `size` bytes with `perm`.
pub(crate) fn materialize(
    size: u64,
    perm: Perm,
    backing: Backing,
) -> Result<Materialized, StoreError> {
    let len =
        usize::try_from(size).map_err(|_| StoreError::Invalid("size exceeds the address space"))?;
    if backing.offset() % PAGE_SIZE != 0 {
        return Err(StoreError::Invalid("backing offset not page aligned"));
    }
    let (mmap, keep) = match backing {
        Backing::Anonymous => {
            let m = StoreMmapRegion::build(
                None,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(mmap_err)?;
            (m, None)
        }
        Backing::File { file, offset } => {
            let meta = file
                .metadata()
                .map_err(|e| StoreError::Host(e.raw_os_error().unwrap_or(libc::EBADF)))?;
            let ft = meta.file_type();
            // Only regular files (memfds included) have a length we can trust; a device or
            // socket could fault anywhere.
            if !ft.is_file() {
                return Err(StoreError::Invalid("backing file is not a regular file"));
            }
            let end = offset
                .checked_add(size)
                .ok_or(StoreError::Invalid("backing range wraps"))?;
            if end > meta.len() {
                return Err(StoreError::Invalid(
                    "backing range extends past the end of the file",
                ));
            }
            let m = StoreMmapRegion::build(
                Some(FileOffset::new(file, offset)),
                len,
                prot_for(perm),
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(mmap_err)?;
            (m, None)
        }
        Backing::Region { region, offset } => {
            let end = offset
                .checked_add(size)
                .ok_or(StoreError::Invalid("backing range wraps"))?;
            if end > region.size() as u64 {
                return Err(StoreError::Invalid(
                    "backing range extends past the end of the region",
                ));
            }
            let prot = region.prot();
            if prot & libc::PROT_READ == 0 || (perm.write && prot & libc::PROT_WRITE == 0) {
                return Err(StoreError::Access);
            }
            let ptr = region.as_ptr().wrapping_add(offset as usize);
            // SAFETY: `ptr..ptr + len` lies inside the caller's live mapping (checked just
            // above), and the `Arc` returned alongside keeps that mapping alive for as long as
            // this non-owning alias exists; the alias never unmaps it.
            let m = unsafe { StoreMmapRegion::build_raw(ptr, len, prot, region.flags()) }
                .map_err(mmap_err)?;
            (m, Some(region))
        }
    };
    let mem = GuestRegionMmap::new(mmap, GuestAddress(0))
        .ok_or(StoreError::Invalid("mapping too large"))?;
    Ok((mem, keep))
}
