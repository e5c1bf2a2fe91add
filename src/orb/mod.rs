//! Subchannel-level wire types: ORB, SCSW, ESW, IRB, PMCW/SCHIB, CRW.
//!
//! Every type decodes from and encodes to its exact big-endian image, whatever the host's
//! byte order, because these bytes cross the vfio-ccw regions and guest memory as s390 data.

#[allow(clippy::module_inception)]
mod orb;

pub use orb::{Orb, OrbControls, ORB_SIZE};
mod scsw;
pub use scsw::{actl, cstat, dstat, fctl, stctl, Scsw, ScswFlags, SCSW_SIZE};
mod esw;
pub use esw::{Erw, Esw, SubchannelLogout, ESW_SIZE};
mod irb;
pub use irb::{Irb, ECW_SIZE, EMW_SIZE, IRB_SIZE};
mod schib;
pub use schib::{
    subchannel_type, Pmcw, PmcwChars, PmcwFlags, Schib, PMCW_SIZE, SCHIB_MDA_SIZE, SCHIB_SIZE,
};
mod crw;
pub use crw::{erc, rsc, Crw, CRW_SIZE};
