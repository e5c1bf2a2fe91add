//! The kernel backend: a real I/O subchannel bound to Linux's vfio-ccw, driven through its
//! mediated device (mdev) from user space.
//!
//! * [`ioctl`]: a small typed layer over the VFIO ioctls (vfio-ioctls refuses CCW devices).
//! * [`plan`]: the address plan (what the VFIO container maps, at which IOVA).
//! * [`MdevSubchannel`]: implements [`crate::driver::Subchannel`], so the vccw device runs
//!   its translated programs on the real subchannel.
//! * [`probe`]: the `vccw mdev probe` / `vccw mdev bench` programs.
//!
//! See `docs/kernel-backend.md`.

pub mod ioctl;
pub mod plan;
pub mod probe;
mod subchannel;

use nix::errno::Errno;
use thiserror::Error;

pub use plan::{AddressPlan, ContainerMap, PlanError, PlanOp};
pub use subchannel::{
    group_from_link, irb_is_final, refusal_irb, valid_uuid, IoStamps, MdevConfig, MdevInfo,
    MdevRegions, MdevSubchannel,
};

/// Why opening or driving an mdev failed.
#[derive(Debug, Error)]
pub enum MdevError {
    /// A system call failed; `errno` is its error.
    #[error("{what}: {errno}")]
    Sys {
        /// The call.
        what: &'static str,
        /// Its errno.
        errno: Errno,
    },
    /// The UUID is not 8-4-4-4-12 hex digits (EINVAL).
    #[error("bad mdev UUID {0:?}")]
    BadUuid(String),
    /// The `iommu_group` link does not name a group (ENOENT).
    #[error("the mdev has no IOMMU group")]
    NoGroup,
    /// The container speaks another VFIO API version (EINVAL).
    #[error("VFIO API version {0}, want 0")]
    ApiVersion(i32),
    /// The container lacks VFIO_TYPE1v2_IOMMU (ENODEV).
    #[error("the VFIO container offers no type1v2 IOMMU")]
    NoType1v2,
    /// The group is not viable: not all its devices are bound to VFIO (EPERM).
    #[error("IOMMU group {0} is not viable")]
    NotViable(u32),
    /// The device is not a CCW device (ENODEV).
    #[error("not a vfio-ccw device (flags {0:#x})")]
    NotCcw(u32),
    /// A required region is missing (ENODEV).
    #[error("vfio-ccw region missing: {0}")]
    MissingRegion(&'static str),
    /// A program was started before a store was attached (EINVAL).
    #[error("no store attached to the mdev subchannel")]
    NoStore,
    /// The address plan refused a range.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl MdevError {
    /// The (positive) errno.
    pub fn errno(&self) -> i32 {
        match self {
            MdevError::Sys { errno, .. } => *errno as i32,
            MdevError::BadUuid(_) | MdevError::ApiVersion(_) | MdevError::NoStore => libc::EINVAL,
            MdevError::NoGroup => libc::ENOENT,
            MdevError::NoType1v2 | MdevError::NotCcw(_) | MdevError::MissingRegion(_) => {
                libc::ENODEV
            }
            MdevError::NotViable(_) => libc::EPERM,
            MdevError::Plan(p) => p.errno(),
        }
    }
}
