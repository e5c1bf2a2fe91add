//! The device's three interrupt triggers (IO, CRW, REQ) and VFIO `SET_IRQS` semantics.
//!
//! The device owns the eventfds it is given and signals them with `write(2)` of a native
//! `u64` 1, on the very fd it received: never a `try_clone()` (F_DUPFD_CLOEXEC) duplicate,
//! which qemu-user mistranslates. An accepted fd is switched to non-blocking so a client that
//! saturates its own counter cannot make the device block (EAGAIN then means "already
//! signalled", as the kernel's saturating `eventfd_signal`).
//!
//! An embedding in the same process may install an [`IrqNotify`] instead of an eventfd
//! ([`IrqTriggers::set_notify`]): the device then calls it where it would write the eventfd,
//! and a client waiting on an [`IrqLatch`] is told without a system call when it is not
//! asleep (the eventfd costs a `write` by the device and a `read` by the client every time).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;

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

/// An in-process interrupt trigger, installed with [`IrqTriggers::set_notify`] in place of an
/// eventfd. `notify` is called where the eventfd would be written (for IO: after the IRB is
/// in the I/O region), possibly with the device's state lock and with the triggers' lock
/// held: it must be quick and must not call back into the device.
pub trait IrqNotify: Send + Sync {
    /// Interrupt `index` happened.
    fn notify(&self, index: IrqIndex);
}

/// A counting latch an in-process client waits on: the [`IrqNotify`] counterpart of an
/// eventfd's counter. A signal to a client that is not waiting costs two atomic operations
/// and no system call; a waiting client is woken through a condvar.
#[derive(Debug, Default)]
pub struct IrqLatch {
    count: AtomicU64,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

impl IrqNotify for IrqLatch {
    fn notify(&self, _index: IrqIndex) {
        self.count.fetch_add(1, Ordering::SeqCst);
        // Paired with `wait`: either it sees the count, or this sees it waiting and takes
        // the lock (so it is inside `wait_timeout`, not between its check and its sleep).
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_all();
        }
    }
}

impl IrqLatch {
    /// Takes every pending signal without waiting: their number (0: none).
    pub fn take(&self) -> u64 {
        self.count.swap(0, Ordering::SeqCst)
    }

    /// Takes every pending signal, waiting up to `timeout` for one: their number, or `None`
    /// on timeout.
    pub fn wait(&self, timeout: Duration) -> Option<u64> {
        match self.take() {
            0 => {}
            n => return Some(n),
        }
        let deadline = Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let got = loop {
            match self.take() {
                0 => {}
                n => break Some(n),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break None;
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        got
    }
}

/// What an index signals.
enum Trigger {
    Eventfd(OwnedFd),
    Notify(Arc<dyn IrqNotify>),
}

impl std::fmt::Debug for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Eventfd(fd) => write!(f, "Eventfd({})", fd.as_raw_fd()),
            Trigger::Notify(_) => f.write_str("Notify"),
        }
    }
}

/// Why [`wait_eventfd`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventfdWaitError {
    /// No signal within the timeout.
    TimedOut,
    /// `read` or `poll` failed with this errno.
    Sys(Errno),
}

/// Takes every pending signal of the non-blocking eventfd `fd` (their count), waiting up to
/// `timeout` for one: sleeping in `poll`, or with `spin` reading again and again. The read
/// comes first and the clock is read only if it finds nothing, so an interrupt presented
/// before the wait (a program run inline in START) costs one system call. What the clients
/// of an IO or CRW eventfd share (`runner::Stack`, `client::CcwClient`, the mdev probe).
pub fn wait_eventfd(fd: &EventFd, timeout: Duration, spin: bool) -> Result<u64, EventfdWaitError> {
    let mut deadline = None;
    loop {
        match fd.read() {
            Ok(n) => return Ok(n),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(e) => return Err(EventfdWaitError::Sys(e)),
        }
        let now = Instant::now();
        let deadline = *deadline.get_or_insert(now + timeout);
        if now >= deadline {
            return Err(EventfdWaitError::TimedOut);
        }
        if spin {
            std::hint::spin_loop();
            continue;
        }
        let t = PollTimeout::try_from(deadline - now).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, t) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(EventfdWaitError::Sys(e)),
        }
    }
}

/// The three triggers. Its lock is a leaf but for an [`IrqNotify`], which is called with it
/// held and locks nothing of the device's.
#[derive(Debug, Default)]
pub struct IrqTriggers {
    slots: Mutex<[Option<Trigger>; 3]>,
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
                    self.slot(index, Some(Trigger::Eventfd(fd)));
                }
            },
        }
        Ok(())
    }

    fn slot(&self, index: IrqIndex, t: Option<Trigger>) {
        let old = {
            let mut g = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut g[index as usize], t)
        };
        // The replaced fd is closed here, outside the lock.
        drop(old);
    }

    /// Installs an in-process trigger for `index` in place of its eventfd (`None` tears
    /// either down). A later `SET_IRQS` with an eventfd replaces it, as it replaces an fd.
    pub fn set_notify(&self, index: IrqIndex, notify: Option<Arc<dyn IrqNotify>>) {
        self.slot(index, notify.map(Trigger::Notify));
    }

    /// Whether `index` has a trigger (an eventfd or an [`IrqNotify`]).
    pub fn is_set(&self, index: IrqIndex) -> bool {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())[index as usize].is_some()
    }

    /// Signals `index` (adds 1 to its eventfd counter, or calls its [`IrqNotify`]); false
    /// when no trigger is set.
    pub fn signal(&self, index: IrqIndex) -> bool {
        let g = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let fd = match g[index as usize].as_ref() {
            None => return false,
            // Under the lock, as the eventfd's write: `notify` is quick and never calls back
            // into the device (its contract), and no `Arc` clone is paid per interrupt.
            Some(Trigger::Notify(n)) => {
                n.notify(index);
                return true;
            }
            Some(Trigger::Eventfd(fd)) => fd,
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

    #[derive(Default)]
    struct Seen(Mutex<Vec<IrqIndex>>);

    impl IrqNotify for Seen {
        fn notify(&self, index: IrqIndex) {
            self.0.lock().unwrap().push(index);
        }
    }

    #[test]
    fn notify_replaces_and_is_replaced_by_an_eventfd() {
        let t = IrqTriggers::default();
        let seen = Arc::new(Seen::default());
        t.set_notify(IrqIndex::Io, Some(seen.clone()));
        assert!(t.is_set(IrqIndex::Io));
        assert!(t.signal(IrqIndex::Io));
        assert!(!t.signal(IrqIndex::Crw));
        assert_eq!(*seen.0.lock().unwrap(), vec![IrqIndex::Io]);
        // SET_IRQS with an eventfd takes the slot over; the notify is no longer called.
        let (e, d) = efd();
        t.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(d))).unwrap();
        assert!(t.signal(IrqIndex::Io));
        assert_eq!(count(&e), 1);
        assert_eq!(seen.0.lock().unwrap().len(), 1);
        // And back; None tears it down.
        t.set_notify(IrqIndex::Io, Some(seen.clone()));
        assert!(t.signal(IrqIndex::Io));
        assert_eq!(count(&e), 0);
        assert_eq!(seen.0.lock().unwrap().len(), 2);
        t.set_notify(IrqIndex::Io, None);
        assert!(!t.is_set(IrqIndex::Io));
        assert!(!t.signal(IrqIndex::Io));
    }

    #[test]
    fn wait_eventfd_reads_first_then_waits_or_times_out() {
        let (e, d) = efd();
        let w = |spin| wait_eventfd(&e, Duration::from_millis(5), spin);
        assert_eq!(w(false), Err(EventfdWaitError::TimedOut));
        assert_eq!(w(true), Err(EventfdWaitError::TimedOut));
        nix::unistd::write(&d, &2u64.to_ne_bytes()).unwrap();
        assert_eq!(w(false), Ok(2));
        nix::unistd::write(&d, &1u64.to_ne_bytes()).unwrap();
        assert_eq!(w(true), Ok(1));
        // A signal that comes while the waiter sleeps in poll.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            nix::unistd::write(&d, &1u64.to_ne_bytes()).unwrap();
        });
        assert_eq!(wait_eventfd(&e, Duration::from_secs(10), false), Ok(1));
        t.join().unwrap();
    }

    #[test]
    fn latch_counts_and_wakes() {
        let l = Arc::new(IrqLatch::default());
        assert_eq!(l.take(), 0);
        assert_eq!(l.wait(Duration::from_millis(10)), None);
        l.notify(IrqIndex::Io);
        l.notify(IrqIndex::Io);
        assert_eq!(l.wait(Duration::from_secs(1)), Some(2));
        assert_eq!(l.take(), 0);
        // A waiter asleep before the signal is woken by it; many rounds, so a lost wake-up
        // (the waiter checking, then sleeping after the signal) would hang one of them.
        for _ in 0..200 {
            let w = {
                let l = l.clone();
                std::thread::spawn(move || l.wait(Duration::from_secs(10)))
            };
            l.notify(IrqIndex::Io);
            assert_eq!(w.join().unwrap(), Some(1));
        }
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
