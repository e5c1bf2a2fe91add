//! The backend a [`VfioCcwDevice`](super::VfioCcwDevice) drives: one I/O subchannel.
//!
//! Two implementations are planned: the emulated channel subsystem (`css`) and a real kernel
//! vfio-ccw mdev on s390x. The device calls the [`Subchannel`] methods with its state lock
//! held; the backend reports status through [`SubchannelEvents`], which never blocks on that
//! lock (events are queued and handled by whichever thread holds or next takes the lock).
//!
//! Contract for implementations:
//! * `start`, `resume`, `halt`, `clear` and `store_schib` must not call back into the device
//!   (its region, reset or close methods) on the calling thread: the device's lock is not
//!   re-entrant. They may wait for the backend's own threads, even ones that are delivering
//!   events, because event delivery never waits for the device.
//! * Events may be reported from any thread, including the caller's own thread from inside
//!   `start` (the emulated subchannel runs short programs inline): the device queues them and
//!   handles them when it unlocks, so the interrupt of a program is never handled before
//!   `start` has returned and the state is CP_PENDING.
//! * A program handed to `start` is kept (one `Arc` clone) only when `start` returns 0, and
//!   until the program ends: the clone must be dropped *before* the final interrupt is
//!   delivered and before `clear` returns, so that the device freeing its own clone really
//!   releases the guest page pins.

use std::sync::{Arc, Weak};

use crate::ccw::HostProgram;
use crate::orb::{Crw, Irb, Schib};

/// One I/O subchannel as the vfio-ccw device drives it (the instructions the kernel driver
/// issues). Every method returns the condition code the instruction would set.
pub trait Subchannel: Send + Sync {
    /// START SUBCHANNEL with the host program's ORB: 0 start pending, 1 status pending,
    /// 2 busy, 3 not operational. On 0 the backend keeps `program` until the program ends
    /// and drops its clone before delivering the final interrupt and before returning from
    /// [`Subchannel::clear`].
    fn start(&self, program: Arc<HostProgram>) -> u8;
    /// RESUME SUBCHANNEL (vfio-ccw never issues it; present for completeness).
    fn resume(&self) -> u8;
    /// HALT SUBCHANNEL: 0 halt pending, 1 status pending, 2 busy, 3 not operational.
    fn halt(&self) -> u8;
    /// CLEAR SUBCHANNEL: 0 clear pending, 3 not operational.
    fn clear(&self) -> u8;
    /// STORE SUBCHANNEL: the current SCHIB, or the errno of the failure (ENODEV when the
    /// subchannel is gone).
    fn store_schib(&self) -> Result<Schib, i32>;
    /// Where to report interrupts and channel-path events. The backend keeps the `Weak`
    /// and upgrades it for each event (the device may be gone).
    fn set_events(&self, events: Weak<dyn SubchannelEvents>);
    /// The commands after which the device behind may present status modifier (the
    /// translator prepares the slot after a chain's end only after those). Default: every
    /// command, which is right for a device nobody knows (a real subchannel).
    fn status_modifier_commands(&self) -> crate::ccw::CommandSet {
        crate::ccw::CommandSet::ALL
    }
}

/// Reports from a [`Subchannel`] to the device. Both calls return quickly and never wait for
/// the device's lock, so a backend may call them from any thread, holding its own locks.
pub trait SubchannelEvents: Send + Sync {
    /// An I/O interruption for the subchannel: the IRB TEST SUBCHANNEL would store,
    /// describing the *host* program (the device rewrites it for the guest).
    fn interrupt(&self, irb: Irb);
    /// A channel-path event (path online / offline) to report to the guest as a CRW.
    fn path_event(&self, crw: Crw);
}
