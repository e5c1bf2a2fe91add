//! vccw: a user-space vfio-ccw mediated channel-I/O service.
//!
//! A guest's channel program (guest-physical addresses) is translated into one a channel can
//! run, started on a subchannel backend, and its status returned as the guest expects.
//! See `docs/architecture.md` for the I/O path.

#![warn(missing_docs)]

pub mod ccw;
pub mod ccwfile;
pub mod client;
pub mod css;
pub mod devices;
pub mod driver;
pub mod image;
pub mod iommu_store;
pub mod loadtest;
#[cfg(target_os = "linux")]
pub mod mdev;
pub mod orb;
pub mod runner;
pub mod service;
pub mod vfio_user;
