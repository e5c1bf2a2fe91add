//! Typed store errors, each with the errno the type1 uAPI would return.

use thiserror::Error;

/// Why a store operation was refused.
///
/// [`StoreError::errno`] gives the positive `libc::E*` value the VFIO type1 IOMMU returns
/// (negated) for the same request.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// A malformed argument: zero size, misalignment, wrap-around, bad flags, a range that
    /// bisects a mapping, a backing too short for the mapping (EINVAL).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// The address is not inside any mapping, or its mapping is being unmapped (EINVAL).
    #[error("iova {0:#x} is not mapped")]
    NotMapped(u64),
    /// The new mapping overlaps an existing one (EEXIST).
    #[error("range {iova:#x}+{size:#x} overlaps an existing mapping")]
    Exists {
        /// First byte of the refused range.
        iova: u64,
        /// Length of the refused range.
        size: u64,
    },
    /// The store already holds `dma_entry_limit` mappings (ENOSPC).
    #[error("the store already holds its limit of {0} mappings")]
    NoSpace(u32),
    /// A VADDR update names no existing mapping (ENOENT).
    #[error("no mapping overlaps iova {0:#x}")]
    NoEntry(u64),
    /// The mapping's permissions do not allow the requested access (EPERM).
    #[error("mapping at iova {0:#x} does not permit this access")]
    Permission(u64),
    /// The mapping's process address is invalidated (UNMAP with FLAG_VADDR) and not yet
    /// updated (EBUSY).
    #[error("mapping at iova {0:#x} has no valid process address")]
    VaddrInvalid(u64),
    /// Pages in the range stayed pinned past the unmap timeout, or a page's pin count would
    /// overflow (EBUSY).
    #[error("pinned pages in {iova:#x}+{size:#x} were not released")]
    Busy {
        /// First byte of the range.
        iova: u64,
        /// Length of the range.
        size: u64,
    },
    /// The backing's protection forbids the mapping's permissions (EACCES).
    #[error("the backing memory does not allow the requested permissions")]
    Access,
    /// Creating the host mapping failed with this errno (from `mmap(2)` or `fstat(2)`).
    #[error("host mapping failed: errno {0}")]
    Host(i32),
}

impl StoreError {
    /// The positive errno the type1 uAPI returns for this error (`libc::EINVAL`, ...).
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::Invalid(_) | StoreError::NotMapped(_) => libc::EINVAL,
            StoreError::Exists { .. } => libc::EEXIST,
            StoreError::NoSpace(_) => libc::ENOSPC,
            StoreError::NoEntry(_) => libc::ENOENT,
            StoreError::Permission(_) => libc::EPERM,
            StoreError::VaddrInvalid(_) | StoreError::Busy { .. } => libc::EBUSY,
            StoreError::Access => libc::EACCES,
            StoreError::Host(e) => *e,
        }
    }
}
