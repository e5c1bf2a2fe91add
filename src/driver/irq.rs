//! The device's three interrupt triggers (IO, CRW, REQ) and VFIO `SET_IRQS` semantics.
//!
//! The device owns the eventfds it is given and signals them with `write(2)` of a native
//! `u64` 1, on the very fd it received: never a `try_clone()` (F_DUPFD_CLOEXEC) duplicate,
//! which qemu-user mistranslates. An accepted fd is switched to non-blocking so a client that
//! saturates its own counter cannot make the device block (EAGAIN then means "already
//! signalled", as the kernel's saturating `eventfd_signal`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::device::DeviceError;
pub use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
};

/// The vfio-ccw IRQ indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum IrqIndex {
    /// I/O interruption: the IRB in the I/O region is new.
    Io = 0,
    /// Channel report: read the CRW region.
    Crw = 1,
    /// Device request: the device is being removed, the client should release it.
    Req = 2,
}

impl IrqIndex {
    /// All indexes.
    pub const ALL: [IrqIndex; 3] = [IrqIndex::Io, IrqIndex::Crw, IrqIndex::Req];

    /// The index for a raw `index` field, if valid.
    pub fn from_raw(index: u32) -> Option<Self> {
        Self::ALL.get(index as usize).copied()
    }
}

/// Number of IRQ indexes (`VFIO_CCW_NUM_IRQS`).
pub const NUM_IRQS: u32 = 3;

/// The data part of a `SET_IRQS` request.
#[derive(Debug)]
pub enum IrqSetData {
    /// `VFIO_IRQ_SET_DATA_NONE`.
    None,
    /// `VFIO_IRQ_SET_DATA_BOOL`: one flag per interrupt in `start..start + count`.
    Bool(Vec<bool>),
    /// `VFIO_IRQ_SET_DATA_EVENTFD`: one fd per interrupt; `None` stands for fd -1 (tear down).
    /// The device takes ownership of every fd (a rejected one is closed).
    Eventfd(Vec<Option<OwnedFd>>),
}

impl IrqSetData {
    fn type_flag(&self) -> u32 {
        match self {
            IrqSetData::None => VFIO_IRQ_SET_DATA_NONE,
            IrqSetData::Bool(_) => VFIO_IRQ_SET_DATA_BOOL,
            IrqSetData::Eventfd(_) => VFIO_IRQ_SET_DATA_EVENTFD,
        }
    }

    fn len(&self) -> Option<usize> {
        match self {
            IrqSetData::None => None,
            IrqSetData::Bool(v) => Some(v.len()),
            IrqSetData::Eventfd(v) => Some(v.len()),
        }
    }
}

/// A `VFIO_DEVICE_SET_IRQS` request (`struct vfio_irq_set` with its data decoded).
#[derive(Debug)]
pub struct IrqSet {
    /// `VFIO_IRQ_SET_DATA_*` | `VFIO_IRQ_SET_ACTION_*`; the data type must match `data`.
    pub flags: u32,
    /// The IRQ index (see [`IrqIndex`]).
    pub index: u32,
    /// First interrupt of the index (each index has one: must be 0).
    pub start: u32,
    /// Number of interrupts (0 or 1; 0 only with DATA_NONE | ACTION_TRIGGER: tear down).
    pub count: u32,
    /// The data.
    pub data: IrqSetData,
}

impl IrqSet {
    /// ACTION_TRIGGER with an eventfd (`Some`) or fd -1 (`None`) for `index`.
    pub fn eventfd(index: IrqIndex, fd: Option<OwnedFd>) -> Self {
        IrqSet {
            flags: VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD,
            index: index as u32,
            start: 0,
            count: 1,
            data: IrqSetData::Eventfd(vec![fd]),
        }
    }
}

/// The three triggers. Its lock is a leaf: nothing else is locked while it is held.
#[derive(Debug, Default)]
pub struct IrqTriggers {
    fds: Mutex<[Option<OwnedFd>; 3]>,
}

impl IrqTriggers {
    /// Applies a `SET_IRQS` request with the checks of Linux's
    /// `vfio_set_irqs_validate_and_prepare` and `vfio_ccw_mdev_set_irqs`; every rejection is
    /// [`DeviceError::InvalidArgument`] (EINVAL).
    ///
    /// ACTION_TRIGGER only: DATA_NONE signals (count 1) or tears down (count 0), DATA_BOOL
    /// signals when true, DATA_EVENTFD installs an eventfd or tears down (fd -1).
    pub fn set_irqs(&self, req: IrqSet) -> Result<(), DeviceError> {
        let inval = Err(DeviceError::InvalidArgument);
        let index = match IrqIndex::from_raw(req.index) {
            Some(i) => i,
            None => return inval,
        };
        if req.flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0 {
            return inval;
        }
        let data_type = req.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = req.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if data_type.count_ones() != 1 || action.count_ones() != 1 {
            return inval;
        }
        if data_type != req.data.type_flag() {
            return inval;
        }
        if req.count == 0
            && (data_type != VFIO_IRQ_SET_DATA_NONE || action != VFIO_IRQ_SET_ACTION_TRIGGER)
        {
            return inval;
        }
        // One interrupt per index.
        if req.start >= 1 || u64::from(req.start) + u64::from(req.count) > 1 {
            return inval;
        }
        if let Some(n) = req.data.len() {
            if n != req.count as usize {
                return inval;
            }
        }
        if action != VFIO_IRQ_SET_ACTION_TRIGGER {
            return inval;
        }
        match req.data {
            IrqSetData::None if req.count == 0 => {
                self.slot(index, None);
            }
            IrqSetData::None => {
                self.signal(index);
            }
            IrqSetData::Bool(v) => {
                if v[0] {
                    self.signal(index);
                }
            }
            IrqSetData::Eventfd(mut v) => match v.pop().flatten() {
                None => self.slot(index, None),
                Some(fd) => {
                    check_eventfd(&fd)?;
                    self.slot(index, Some(fd));
                }
            },
        }
        Ok(())
    }

    fn slot(&self, index: IrqIndex, fd: Option<OwnedFd>) {
        let old = {
            let mut g = self.fds.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut g[index as usize], fd)
        };
        // The replaced fd is closed here, outside the lock.
        drop(old);
    }

    /// Whether `index` has an eventfd.
    pub fn is_set(&self, index: IrqIndex) -> bool {
        self.fds.lock().unwrap_or_else(|e| e.into_inner())[index as usize].is_some()
    }

    /// Signals `index` (adds 1 to its eventfd counter); false when no eventfd is set.
    pub fn signal(&self, index: IrqIndex) -> bool {
        let g = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = g[index as usize].as_ref() else {
            return false;
        };
        loop {
            match nix::unistd::write(fd.as_fd(), &1u64.to_ne_bytes()) {
                Err(Errno::EINTR) => continue,
                // EAGAIN: the counter is saturated, the client has a signal pending anyway.
                Ok(_) | Err(Errno::EAGAIN) => return true,
                Err(e) => {
                    tracing::warn!(?index, %e, "eventfd signal failed");
                    return false;
                }
            }
        }
    }
}

/// Accepts only eventfds (Linux: `eventfd_ctx_fdget` fails with EINVAL otherwise) and makes
/// them non-blocking. Without /proc the kind cannot be checked; non-blocking still bounds the
/// harm of a wrong fd.
fn check_eventfd(fd: &OwnedFd) -> Result<(), DeviceError> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match nix::fcntl::readlink(link.as_str()) {
        Ok(target) => {
            if target.to_str() != Some("anon_inode:[eventfd]") {
                return Err(DeviceError::InvalidArgument);
            }
        }
        Err(_) if !std::path::Path::new("/proc/self/fd").exists() => {}
        Err(_) => return Err(DeviceError::InvalidArgument),
    }
    let fl = fcntl(fd, FcntlArg::F_GETFL).map_err(|_| DeviceError::InvalidArgument)?;
    let fl = OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(fl)).map_err(|_| DeviceError::InvalidArgument)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::eventfd::{EfdFlags, EventFd};

    fn efd() -> (EventFd, OwnedFd) {
        let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let d = nix::unistd::dup(&e).unwrap();
        (e, d)
    }

    fn count(e: &EventFd) -> u64 {
        e.read().unwrap_or(0)
    }

    #[test]
    fn install_signal_teardown() {
        let t = IrqTriggers::default();
        assert!(!t.signal(IrqIndex::Io));
        let (e, d) = efd();
        t.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(d))).unwrap();
        assert!(t.is_set(IrqIndex::Io));
        assert!(t.signal(IrqIndex::Io));
        assert!(t.signal(IrqIndex::Io));
        assert_eq!(count(&e), 2);
        t.set_irqs(IrqSet::eventfd(IrqIndex::Io, None)).unwrap();
        assert!(!t.is_set(IrqIndex::Io));
        assert!(!t.signal(IrqIndex::Io));
    }

    #[test]
    fn rejects_non_eventfd() {
        let t = IrqTriggers::default();
        let fd: OwnedFd = tempfile::tempfile().unwrap().into();
        assert_eq!(
            t.set_irqs(IrqSet::eventfd(IrqIndex::Crw, Some(fd))),
            Err(DeviceError::InvalidArgument)
        );
        assert!(!t.is_set(IrqIndex::Crw));
    }
}
