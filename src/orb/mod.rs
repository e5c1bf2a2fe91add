//! Subchannel-level wire types: ORB, SCSW, ESW, IRB, PMCW/SCHIB, CRW.
//!
//! Every type decodes from and encodes to its exact big-endian image, whatever the host's
//! byte order, because these bytes cross the vfio-ccw regions and guest memory as s390 data.

#[allow(clippy::module_inception)]
mod orb;

pub use orb::{Orb, OrbControls, ORB_SIZE};
mod scsw;
pub use scsw::{actl, cstat, dstat, fctl, stctl, Scsw, ScswFlags, SCSW_SIZE};
