//! The device facade: [`VfioCcwDevice`], its shared state, and the locking discipline.
//!
//! # Threads and locks
//! Region accesses and ioctls come from client threads, interrupts and path events from the
//! backend's threads, unmap notifications from whichever thread unmaps. The device state
//! (FSM state, region images, channel program, CRW queue) is behind **one** mutex, the
//! kernel's `io_mutex` and subchannel lock in one:
//! * region writes `try_lock` it and fail with EAGAIN when it is held (Linux takes `io_mutex`
//!   with `mutex_trylock` the same way); reads, open/close/reset and unmaps wait for it;
//! * it is held across translation and the backend call that starts the program, so the
//!   program's interrupt is handled only once the state says CP_PENDING;
//! * backend events never wait for it: [`SubchannelEvents`] pushes them on a small queue
//!   and then *tries* the state lock. Whoever holds the state lock drains the queue before
//!   and after unlocking, so no event is stranded. A backend may therefore block in
//!   `start`/`clear` on its own threads even while those are delivering events. A backend
//!   thread that ends up draining runs only interrupt and CRW handling, which never calls
//!   the backend.
//!
//! Lock order: state -> event queue, state -> IRQ triggers, state -> store. The queue and
//! the IRQ triggers are leaves. The store calls unmap listeners with no store lock held.
//! Assumption: the store's `pin`/`read` never wait for an unmap in progress (they fail
//! with Busy instead), since an unmap may be waiting for this device's state lock.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut, Range};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError, Weak};
use std::time::Duration;

use thiserror::Error;

use super::fsm::State;
use super::irq::{IrqIndex, IrqSet, IrqTriggers, NUM_IRQS, VFIO_IRQ_INFO_EVENTFD};
use super::regions::{
    CCW_CMD_REGION_SIZE, CCW_CRW_REGION_SIZE, CCW_IO_REGION_SIZE, CCW_SCHIB_REGION_SIZE,
    VFIO_DEVICE_FLAGS_CCW, VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD, VFIO_REGION_SUBTYPE_CCW_CRW,
    VFIO_REGION_SUBTYPE_CCW_SCHIB, VFIO_REGION_TYPE_CCW,
};
use super::subchannel::{Subchannel, SubchannelEvents};
use crate::ccw::{HostProgram, TranslateConfig};
use crate::iommu_store::{IommuStore, UnmapListener, PAGE_SIZE};
use crate::orb::{Crw, Irb, Schib};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_RESET, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

/// Region index of the I/O region (`VFIO_CCW_CONFIG_REGION_INDEX`).
pub const IO_REGION_INDEX: u32 = 0;
/// Region index of the async command region (type 2, subtype 1).
pub const ASYNC_REGION_INDEX: u32 = 1;
/// Region index of the SCHIB region (type 2, subtype 2).
pub const SCHIB_REGION_INDEX: u32 = 2;
/// Region index of the CRW region (type 2, subtype 3).
pub const CRW_REGION_INDEX: u32 = 3;
/// Number of regions the device reports.
pub const NUM_REGIONS: u32 = 4;

/// Why a device operation failed. [`DeviceError::errno`] is what the kernel's vfio-ccw
/// returns for it (negated in a `read`/`write`/`ioctl` result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DeviceError {
    /// Bad region index, offset or length, write to a read-only region, bad SET_IRQS
    /// request or fd, or a device that cannot be (re)opened: EINVAL.
    #[error("invalid argument")]
    InvalidArgument,
    /// Another request is being handled (the state lock is held): EAGAIN. Retry.
    #[error("another request is being handled")]
    Again,
    /// The region request was refused; the region's `ret_code` holds the negated errno
    /// carried here (EBUSY, ENODEV, EACCES, EOPNOTSUPP, EIO, EAGAIN, EINVAL, EFAULT, ...).
    #[error("request refused (errno {0})")]
    Refused(i32),
    /// The subchannel is not operational (SCHIB refresh failed): ENODEV.
    #[error("subchannel not operational")]
    NoDevice,
}

impl DeviceError {
    /// The (positive) errno.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::InvalidArgument => libc::EINVAL,
            DeviceError::Again => libc::EAGAIN,
            DeviceError::Refused(e) => *e,
            DeviceError::NoDevice => libc::ENODEV,
        }
    }
}

/// Device options.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Translator limits and arena.
    pub translate: TranslateConfig,
    /// Present a refused channel program as a channel would (start accepted with cc0, then
    /// an interrupt with the status of `TranslateError::channel_status`) instead of failing
    /// the region write with its errno. Off by default (kernel-compatible).
    pub errors_as_status: bool,
    /// How long close/reset waits for the interrupt of each CLEAR SUBCHANNEL (Linux: 3 s).
    pub quiesce_timeout: Duration,
    /// How many CLEAR SUBCHANNELs close/reset issues before declaring the subchannel not
    /// operational.
    pub quiesce_retries: u32,
    /// Most CRWs queued; later ones are dropped and the next queued CRW has its overflow
    /// bit set.
    pub crw_queue_limit: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            translate: TranslateConfig::default(),
            errors_as_status: false,
            quiesce_timeout: Duration::from_secs(3),
            quiesce_retries: 3,
            crw_queue_limit: 256,
        }
    }
}

/// `struct vfio_device_info` contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_CCW | VFIO_DEVICE_FLAGS_RESET`.
    pub flags: u32,
    /// 4.
    pub num_regions: u32,
    /// 3.
    pub num_irqs: u32,
}

/// `VFIO_REGION_INFO_CAP_TYPE` contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionType {
    /// Region type (`VFIO_REGION_TYPE_CCW` = 2).
    pub ty: u32,
    /// Region subtype (1 async, 2 SCHIB, 3 CRW).
    pub subtype: u32,
}

/// `struct vfio_region_info` contents (the offset is the transport's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*` (READ, WRITE, CAPS when `cap_type` is present).
    pub flags: u32,
    /// The type capability of the extra regions.
    pub cap_type: Option<RegionType>,
}

/// `struct vfio_irq_info` contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    /// IRQ index.
    pub index: u32,
    /// `VFIO_IRQ_INFO_EVENTFD`.
    pub flags: u32,
    /// 1.
    pub count: u32,
}

/// Receives every new image of the I/O region, so a transport can expose it without a
/// round trip (vccw's service keeps a read-only shared-memory mirror of it).
///
/// Called with the device's state lock held, after each client write to the region (the
/// image then carries the request's `ret_code`) and after each stored IRB, *before* the IO
/// eventfd is signalled: whoever saw the eventfd finds the IRB in the mirror. It must be
/// quick and must not call back into the device.
pub trait IoRegionMirror: Send + Sync {
    /// The region's full image (`struct ccw_io_region`, 124 bytes) as it is now.
    fn update(&self, image: &[u8; CCW_IO_REGION_SIZE]);
}

/// An event from the backend waiting for the state lock.
pub(super) enum Pending {
    Irb(Irb),
    Crw(Crw),
}

/// Everything behind the state lock.
pub(super) struct Inner {
    pub state: State,
    pub io_region: [u8; CCW_IO_REGION_SIZE],
    pub cmd_region: [u8; CCW_CMD_REGION_SIZE],
    pub schib_region: [u8; CCW_SCHIB_REGION_SIZE],
    pub crw_region: [u8; CCW_CRW_REGION_SIZE],
    pub crws: VecDeque<Crw>,
    pub crw_lost: bool,
    /// The started (or being started) program; dropping it releases the pins.
    pub program: Option<Arc<HostProgram>>,
    /// The status mapper of the last program started: a halt's own status can arrive after
    /// the final status freed the program, and must not show the guest host addresses.
    pub last_mapper: Option<crate::ccw::ScswMapper>,
    /// A halt or clear was accepted and its final interrupt has not been handled.
    pub async_pending: bool,
    /// Logical path mask (Linux `sch->lpm`).
    pub lpm: u8,
    /// The SCHIB as last stored (channel-path ids for path events).
    pub schib: Option<Schib>,
    /// Where I/O region images go (see [`IoRegionMirror`]).
    pub io_mirror: Option<Arc<dyn IoRegionMirror>>,
    /// The first interrupt the backend presented inside this holder's START (see
    /// [`Shared::start_backend`]), handled before the event queue.
    pub inline_irb: Option<Irb>,
}

pub(super) struct Shared {
    pub backend: Arc<dyn Subchannel>,
    pub store: IommuStore,
    pub cfg: DeviceConfig,
    pub irqs: IrqTriggers,
    inner: Mutex<Inner>,
    queue: Mutex<EventQueue>,
    queue_cv: Condvar,
    /// The queue's length, written under the queue lock: lets the unlock path see an empty
    /// queue (the common case) without taking that lock.
    queued: AtomicUsize,
    /// The extra regions exist (Linux registers them at open).
    pub regions_open: AtomicBool,
}

/// Backend events waiting for the state lock, and how many threads wait for one.
#[derive(Default)]
struct EventQueue {
    events: VecDeque<Pending>,
    /// Threads in [`Shared::wait_event`]: only they need the condvar (whose notify is a
    /// system call).
    waiters: usize,
}

/// The state lock, held; drains backend events before and after unlocking.
///
/// Drop order does the work without an `Option` around the guard: `Locked::drop` drains
/// with the lock held, then the fields drop in order: `g` unlocks, `after` drains what
/// arrived meanwhile.
pub(super) struct Locked<'a> {
    g: MutexGuard<'a, Inner>,
    after: DrainAfterUnlock<'a>,
}

/// Drains the event queue once the state lock is released (see [`Locked`]).
struct DrainAfterUnlock<'a>(&'a Shared);

impl Drop for DrainAfterUnlock<'_> {
    fn drop(&mut self) {
        self.0.drain_after_unlock();
    }
}

impl Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.g
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.g
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Usually there is nothing to drain (a read, a request that presented no status):
        // decided here without a call. `drain` looks at the queue the same way.
        if self.g.inline_irb.is_some() || self.after.0.queued.load(Ordering::SeqCst) != 0 {
            self.after.0.drain(&mut self.g);
        }
    }
}

impl Shared {
    pub(super) fn lock(&self) -> Locked<'_> {
        Locked {
            g: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            after: DrainAfterUnlock(self),
        }
    }

    pub(super) fn try_lock(&self) -> Option<Locked<'_>> {
        let g = match self.inner.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(Locked {
            g,
            after: DrainAfterUnlock(self),
        })
    }

    fn queue(&self) -> MutexGuard<'_, EventQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `ev`; true when a thread waits for it in [`Shared::wait_event`].
    fn enqueue(&self, ev: Pending) -> bool {
        let mut q = self.queue();
        q.events.push_back(ev);
        self.queued.store(q.events.len(), Ordering::SeqCst);
        q.waiters > 0
    }

    fn push(&self, ev: Pending) {
        if self.enqueue(ev) {
            self.queue_cv.notify_all();
        }
        // Handle it now if nobody holds the state; otherwise the holder will. The fence
        // pairs with the one in `drain_after_unlock`: either this try_lock sees the
        // holder's unlock, or the holder sees `queued` non-zero.
        fence(Ordering::SeqCst);
        if let Some(l) = self.try_lock() {
            drop(l);
        }
    }

    fn pop(&self) -> Option<Pending> {
        // Empty (the common case): no queue lock. A push racing with this is seen by
        // `drain_after_unlock` or handled by its pusher.
        if self.queued.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut q = self.queue();
        let ev = q.events.pop_front();
        self.queued.store(q.events.len(), Ordering::SeqCst);
        ev
    }

    /// Waits up to `timeout` for a backend event (state lock held by the caller).
    pub(super) fn wait_event(&self, timeout: Duration) -> Option<Pending> {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.queue();
        q.waiters += 1;
        let ev = loop {
            if let Some(ev) = q.events.pop_front() {
                self.queued.store(q.events.len(), Ordering::SeqCst);
                break Some(ev);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break None;
            }
            q = self
                .queue_cv
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        q.waiters -= 1;
        ev
    }

    pub(super) fn handle(&self, st: &mut Inner, ev: Pending) {
        match ev {
            Pending::Irb(irb) => self.fsm_interrupt(st, irb),
            Pending::Crw(crw) => self.queue_crw(st, crw),
        }
    }

    /// Queues an interrupt the device itself presents (errors_as_status), handled like a
    /// backend interrupt once the current request is done.
    pub(super) fn push_local(&self, irb: Irb) {
        // The caller holds the state lock and so drains it; nobody waits meanwhile.
        self.enqueue(Pending::Irb(irb));
    }

    fn drain(&self, st: &mut Inner) {
        // Presented before anything its START left in the queue (see `interrupt`).
        if let Some(irb) = st.inline_irb.take() {
            self.fsm_interrupt(st, irb);
        }
        while let Some(ev) = self.pop() {
            self.handle(st, ev);
        }
    }

    #[inline]
    fn drain_after_unlock(&self) {
        // Pairs with the fence in `push` (see there). The queue is usually empty: no call.
        fence(Ordering::SeqCst);
        if self.queued.load(Ordering::SeqCst) != 0 {
            self.drain_after_unlock_slow();
        }
    }

    #[cold]
    fn drain_after_unlock_slow(&self) {
        loop {
            // Pairs with the fence in `push` (see there).
            fence(Ordering::SeqCst);
            if self.queued.load(Ordering::SeqCst) == 0 {
                return;
            }
            let mut g = match self.inner.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                // The holder drains after its own unlock.
                Err(TryLockError::WouldBlock) => return,
            };
            self.drain(&mut g);
        }
    }
}

thread_local! {
    /// The device this thread is in [`Subchannel::start`] for (see
    /// [`Shared::start_backend`]); null otherwise.
    static STARTING: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
    /// The first interrupt that device's backend presented on this thread inside `start`.
    static INLINE_IRB: Cell<Option<Irb>> = const { Cell::new(None) };
}

impl Shared {
    /// [`Subchannel::start`], keeping aside the first interrupt the backend presents on this
    /// thread before it returns (a program run inline, as the emulated channel runs short
    /// ones). This thread holds the state lock and handles it when it unlocks, so the
    /// interrupt needs no queue, no queue lock and no fence; a later one (a second interrupt
    /// of the same START, or any from another thread) goes through the queue, handled after it.
    pub(super) fn start_backend(&self, st: &mut Inner, program: Arc<HostProgram>) -> u8 {
        /// Clears `STARTING` even if `start` unwinds.
        struct Done;
        impl Drop for Done {
            fn drop(&mut self) {
                STARTING.with(|s| s.set(std::ptr::null()));
            }
        }
        STARTING.with(|s| s.set(self));
        let done = Done;
        let cc = self.backend.start(program);
        drop(done);
        let irb = INLINE_IRB.with(Cell::take);
        if irb.is_some() {
            st.inline_irb = irb;
        }
        cc
    }
}

impl SubchannelEvents for Shared {
    fn interrupt(&self, irb: Irb) {
        if STARTING.with(|s| std::ptr::eq(s.get(), self)) {
            // Only the first is kept; looking at the slot copies nothing but its tag.
            let kept = INLINE_IRB.with(|slot| {
                let free = slot.get().is_none();
                if free {
                    slot.set(Some(irb));
                }
                free
            });
            if kept {
                return;
            }
        }
        self.push(Pending::Irb(irb));
    }

    fn path_event(&self, crw: Crw) {
        self.push(Pending::Crw(crw));
    }
}

impl UnmapListener for Shared {
    fn unmap_pinned(&self, iova: u64, size: u64) {
        let mut st = self.lock();
        if program_touches(st.program.as_deref(), iova, size) {
            tracing::debug!(iova, size, "unmap hits the channel program's pins: reset");
            self.reset_locked(&mut st);
        }
    }
}

/// Whether any page `program` pinned lies in `[iova, iova + size)` (Linux `cp_iova_pinned`).
fn program_touches(program: Option<&HostProgram>, iova: u64, size: u64) -> bool {
    let Some(p) = program else { return false };
    if size == 0 {
        return false;
    }
    let last = iova.saturating_add(size - 1);
    p.pages()
        .iter()
        .any(|pg| pg.iova <= last && iova <= pg.iova.saturating_add(PAGE_SIZE - 1))
}

/// `offset..offset + len` inside a region of `size` bytes, else EINVAL (Linux:
/// `pos + count > sizeof(*region)`).
pub(super) fn region_range(
    offset: u64,
    len: usize,
    size: usize,
) -> Result<Range<usize>, DeviceError> {
    let end = offset
        .checked_add(len as u64)
        .ok_or(DeviceError::InvalidArgument)?;
    if end > size as u64 {
        return Err(DeviceError::InvalidArgument);
    }
    Ok(offset as usize..end as usize)
}

/// A user-space vfio-ccw device: the regions, IRQs and state machine of Linux's vfio-ccw
/// mdev, over a [`Subchannel`] backend and an [`IommuStore`] holding guest memory.
///
/// Create it, `open` it, install eventfds with `set_irqs`, then drive it through region
/// reads and writes exactly as a client drives the kernel's device fd:
///
/// ```
/// use std::sync::{Arc, Weak};
/// use vccw::ccw::HostProgram;
/// use vccw::driver::{
///     DeviceConfig, Subchannel, SubchannelEvents, VfioCcwDevice, IO_REGION_INDEX,
///     ASYNC_REGION_INDEX,
/// };
/// use vccw::iommu_store::{IommuStore, StoreConfig};
/// use vccw::orb::Schib;
///
/// /// A subchannel that is always busy.
/// struct Busy;
/// impl Subchannel for Busy {
///     fn start(&self, _p: Arc<HostProgram>) -> u8 { 2 }
///     fn resume(&self) -> u8 { 2 }
///     fn halt(&self) -> u8 { 2 }
///     fn clear(&self) -> u8 { 0 }
///     fn store_schib(&self) -> Result<Schib, i32> { Ok(Schib::default()) }
///     fn set_events(&self, _e: Weak<dyn SubchannelEvents>) {}
/// }
///
/// let store = IommuStore::new(StoreConfig::default());
/// let dev = VfioCcwDevice::new(Arc::new(Busy), store, DeviceConfig::default());
/// dev.open().unwrap();
/// // HSCH through the async region: cc2 becomes -EBUSY, the write fails with it.
/// let mut cmd = [0u8; 8];
/// cmd[..4].copy_from_slice(&1u32.to_ne_bytes());
/// let err = dev.write_region(ASYNC_REGION_INDEX, 0, &cmd).unwrap_err();
/// assert_eq!(err.errno(), libc::EBUSY);
/// // The I/O region is 124 bytes; reading past it is EINVAL.
/// let mut buf = [0u8; 8];
/// assert_eq!(dev.read_region(IO_REGION_INDEX, 120, &mut buf).unwrap_err().errno(), libc::EINVAL);
/// ```
pub struct VfioCcwDevice {
    sh: Arc<Shared>,
}

impl std::fmt::Debug for VfioCcwDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioCcwDevice")
            .field("state", &self.state())
            .finish()
    }
}

impl VfioCcwDevice {
    /// A device in state STANDBY over `backend`, translating through `store`. Registers
    /// itself with the backend (events) and the store (unmap listener).
    pub fn new(backend: Arc<dyn Subchannel>, store: IommuStore, mut cfg: DeviceConfig) -> Self {
        // Prepare the slot after a chain's end only where the device behind can reach it.
        cfg.translate.status_modifier = cfg
            .translate
            .status_modifier
            .intersection(backend.status_modifier_commands());
        let sh = Arc::new(Shared {
            backend,
            store,
            cfg,
            irqs: IrqTriggers::default(),
            inner: Mutex::new(Inner {
                state: State::Standby,
                io_region: [0; CCW_IO_REGION_SIZE],
                cmd_region: [0; CCW_CMD_REGION_SIZE],
                schib_region: [0; CCW_SCHIB_REGION_SIZE],
                crw_region: [0; CCW_CRW_REGION_SIZE],
                crws: VecDeque::new(),
                crw_lost: false,
                program: None,
                last_mapper: None,
                async_pending: false,
                lpm: 0,
                schib: None,
                io_mirror: None,
                inline_irb: None,
            }),
            queue: Mutex::new(EventQueue::default()),
            queue_cv: Condvar::new(),
            queued: AtomicUsize::new(0),
            regions_open: AtomicBool::new(false),
        });
        let events: Weak<dyn SubchannelEvents> = Arc::downgrade(&sh) as Weak<Shared>;
        sh.backend.set_events(events);
        let listener: Weak<dyn UnmapListener> = Arc::downgrade(&sh) as Weak<Shared>;
        sh.store.register_unmap_listener(listener);
        VfioCcwDevice { sh }
    }

    /// The FSM state.
    pub fn state(&self) -> State {
        self.sh.lock().state
    }

    /// Opens the device (Linux `open_device`): the extra regions appear and the OPEN event
    /// takes STANDBY to IDLE. EINVAL when the device is, or becomes, not operational.
    /// Opening an open device is the kernel's OPEN-in-IDLE cell: it goes NOT_OPER.
    pub fn open(&self) -> Result<(), DeviceError> {
        let mut st = self.sh.lock();
        if st.state == State::NotOper {
            return Err(DeviceError::InvalidArgument);
        }
        self.sh.regions_open.store(true, Ordering::SeqCst);
        self.sh.fsm_event(&mut st, super::fsm::Event::Open);
        if st.state == State::NotOper {
            self.sh.regions_open.store(false, Ordering::SeqCst);
            return Err(DeviceError::InvalidArgument);
        }
        Ok(())
    }

    /// Closes the device (Linux `close_device`): quiesces the subchannel, frees the channel
    /// program (releasing its pins) and goes STANDBY (NOT_OPER if quiescing fails).
    pub fn close(&self) {
        let mut st = self.sh.lock();
        self.sh.fsm_event(&mut st, super::fsm::Event::Close);
        self.sh.regions_open.store(false, Ordering::SeqCst);
    }

    /// VFIO_DEVICE_RESET: CLOSE then OPEN. EINVAL when the device ends up not operational.
    pub fn reset(&self) -> Result<(), DeviceError> {
        let mut st = self.sh.lock();
        self.sh.reset_locked(&mut st);
        if st.state == State::NotOper {
            return Err(DeviceError::InvalidArgument);
        }
        Ok(())
    }

    /// The subchannel is gone (the owner of the backend learnt it): NOT_OPER event.
    pub fn not_operational(&self) {
        let mut st = self.sh.lock();
        self.sh.fsm_event(&mut st, super::fsm::Event::NotOper);
    }

    /// Asks the client to release the device (signals the REQ eventfd, Linux `request`).
    /// False when no REQ eventfd is installed.
    pub fn request_release(&self) -> bool {
        self.sh.irqs.signal(IrqIndex::Req)
    }

    /// VFIO_DEVICE_GET_INFO.
    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_CCW | VFIO_DEVICE_FLAGS_RESET,
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
        }
    }

    /// VFIO_DEVICE_GET_REGION_INFO; EINVAL for an unknown index.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let ro = VFIO_REGION_INFO_FLAG_READ;
        let extra = |size: usize, flags: u32, subtype: u32| RegionInfo {
            index,
            size: size as u64,
            flags: flags | VFIO_REGION_INFO_FLAG_CAPS,
            cap_type: Some(RegionType {
                ty: VFIO_REGION_TYPE_CCW,
                subtype,
            }),
        };
        Ok(match index {
            IO_REGION_INDEX => RegionInfo {
                index,
                size: CCW_IO_REGION_SIZE as u64,
                flags: rw,
                cap_type: None,
            },
            ASYNC_REGION_INDEX => extra(CCW_CMD_REGION_SIZE, rw, VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD),
            SCHIB_REGION_INDEX => extra(CCW_SCHIB_REGION_SIZE, ro, VFIO_REGION_SUBTYPE_CCW_SCHIB),
            CRW_REGION_INDEX => extra(CCW_CRW_REGION_SIZE, ro, VFIO_REGION_SUBTYPE_CCW_CRW),
            _ => return Err(DeviceError::InvalidArgument),
        })
    }

    /// VFIO_DEVICE_GET_IRQ_INFO; EINVAL for an unknown index.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, DeviceError> {
        IrqIndex::from_raw(index)
            .map(|_| IrqInfo {
                index,
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 1,
            })
            .ok_or(DeviceError::InvalidArgument)
    }

    /// VFIO_DEVICE_SET_IRQS (see [`IrqTriggers::set_irqs`]).
    pub fn set_irqs(&self, req: IrqSet) -> Result<(), DeviceError> {
        self.sh.irqs.set_irqs(req)
    }

    /// Installs an in-process trigger for `index` in place of an eventfd (`None` tears the
    /// index's trigger down); see [`IrqNotify`](super::irq::IrqNotify). For embeddings in the
    /// same process: the device then signals the IO interrupt without a system call.
    pub fn set_irq_notify(&self, index: IrqIndex, notify: Option<Arc<dyn super::irq::IrqNotify>>) {
        self.sh.irqs.set_notify(index, notify);
    }

    /// Reads `buf.len()` bytes at `offset` of region `index`; returns the byte count.
    /// EINVAL for a bad index or a range outside the region; the extra regions exist only
    /// while the device is open. A SCHIB read refreshes it (ENODEV when that fails); a CRW
    /// read pops one CRW.
    pub fn read_region(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, DeviceError> {
        match index {
            IO_REGION_INDEX => self.sh.read_io_region(offset, buf),
            ASYNC_REGION_INDEX | SCHIB_REGION_INDEX | CRW_REGION_INDEX
                if self.sh.regions_open.load(Ordering::SeqCst) =>
            {
                match index {
                    ASYNC_REGION_INDEX => self.sh.read_cmd_region(offset, buf),
                    SCHIB_REGION_INDEX => self.sh.read_schib_region(offset, buf),
                    _ => self.sh.read_crw_region(offset, buf),
                }
            }
            _ => Err(DeviceError::InvalidArgument),
        }
    }

    /// Writes `data` at `offset` of region `index`; returns the byte count, or the request's
    /// `ret_code` as [`DeviceError::Refused`], or EAGAIN while another request is handled.
    /// The SCHIB and CRW regions are read-only (EINVAL).
    pub fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, DeviceError> {
        match index {
            IO_REGION_INDEX => self.sh.write_io_region(offset, data),
            ASYNC_REGION_INDEX if self.sh.regions_open.load(Ordering::SeqCst) => {
                self.sh.write_cmd_region(offset, data)
            }
            _ => Err(DeviceError::InvalidArgument),
        }
    }

    /// Installs (or with `None` removes) the I/O region mirror; a new mirror receives the
    /// current image at once.
    pub fn set_io_mirror(&self, mirror: Option<Arc<dyn IoRegionMirror>>) {
        let mut st = self.sh.lock();
        st.io_mirror = mirror;
        self.sh.mirror_io(&st);
    }

    /// Whether the device holds a channel program (and so guest page pins).
    pub fn has_program(&self) -> bool {
        self.sh.lock().program.is_some()
    }
}

impl UnmapListener for VfioCcwDevice {
    /// The store's unmap hit pinned pages: reset when they are this device's (Linux
    /// `vfio_ccw_dma_unmap`), which releases the pins.
    fn unmap_pinned(&self, iova: u64, size: u64) {
        self.sh.unmap_pinned(iova, size);
    }
}

impl Drop for VfioCcwDevice {
    fn drop(&mut self) {
        // Release the pins: a closed or broken device holds none.
        let mut st = self.sh.lock();
        if matches!(
            st.state,
            State::Idle | State::CpProcessing | State::CpPending
        ) {
            self.sh.fsm_event(&mut st, super::fsm::Event::Close);
        }
        st.program = None;
    }
}

impl Shared {
    pub(super) fn reset_locked(&self, st: &mut Inner) {
        self.fsm_event(st, super::fsm::Event::Close);
        self.fsm_event(st, super::fsm::Event::Open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fsm::{Event, EVENTS, STATES};
    use crate::driver::regions::VFIO_CCW_ASYNC_CMD_HSCH;
    use crate::iommu_store::StoreConfig;
    use crate::orb::{stctl, Scsw, ScswFlags};
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Null {
        halts: AtomicUsize,
    }
    impl Subchannel for Null {
        fn start(&self, _p: Arc<HostProgram>) -> u8 {
            unreachable!("the test programs never translate")
        }
        fn resume(&self) -> u8 {
            1
        }
        fn halt(&self) -> u8 {
            self.halts.fetch_add(1, Ordering::SeqCst);
            0
        }
        fn clear(&self) -> u8 {
            0
        }
        fn store_schib(&self) -> Result<Schib, i32> {
            Ok(Schib::default())
        }
        fn set_events(&self, _e: Weak<dyn SubchannelEvents>) {}
    }

    const SENTINEL: i32 = 0x1234;

    /// A whole-region write and reads of the IRB's size (at the IRB and elsewhere), of the
    /// whole region and of a few bytes move exactly the bytes at their offsets.
    #[test]
    fn io_region_copies_move_the_bytes_at_their_offsets() {
        let dev = VfioCcwDevice::new(
            Arc::new(Null::default()),
            IommuStore::new(StoreConfig::default()),
            DeviceConfig::default(),
        );
        dev.open().unwrap();
        // No function in the SCSW (bytes 12-23 zero): the request only stores the image.
        let mut img = [0u8; CCW_IO_REGION_SIZE];
        for (i, b) in img.iter_mut().enumerate() {
            *b = i as u8 | 0x80;
        }
        img[12..24].fill(0);
        img[120..].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(dev.write_region(IO_REGION_INDEX, 0, &img), Ok(124));
        for (offset, len) in [(24, 96), (0, 96), (28, 96), (0, 124), (5, 3), (120, 4)] {
            let mut b = vec![0u8; len];
            assert_eq!(
                dev.read_region(IO_REGION_INDEX, offset as u64, &mut b),
                Ok(len)
            );
            assert_eq!(b, img[offset..offset + len], "{offset}+{len}");
        }
        // A partial write lands at its offset only.
        assert_eq!(dev.write_region(IO_REGION_INDEX, 0, &[1, 2, 3, 4]), Ok(4));
        let mut b = [0u8; 96];
        dev.read_region(IO_REGION_INDEX, 0, &mut b).unwrap();
        assert_eq!(&b[..4], &[1, 2, 3, 4]);
        assert_eq!(&b[4..], &img[4..96]);
    }

    /// (next state, io ret_code, cmd ret_code, IRB stored, halts issued).
    type Outcome = (State, i32, i32, bool, usize);

    /// Runs `event` in `state` on a fresh device; returns (next state, io ret_code,
    /// cmd ret_code, IRB stored, halts issued).
    fn cell(state: State, event: Event) -> Outcome {
        let null = Arc::new(Null::default());
        let dev = VfioCcwDevice::new(
            null.clone(),
            IommuStore::new(StoreConfig::default()),
            DeviceConfig::default(),
        );
        let sh = &dev.sh;
        let mut st = sh.lock();
        st.state = state;
        // A start request for a program at address 0 (refused by translation: EINVAL).
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(crate::orb::fctl::START),
            ..Default::default()
        };
        st.io_region[12..24].copy_from_slice(&scsw.to_bytes());
        super::super::io::set_ret_code(&mut st.io_region, SENTINEL);
        st.cmd_region[..4].copy_from_slice(&VFIO_CCW_ASYNC_CMD_HSCH.to_ne_bytes());
        st.cmd_region[4..].copy_from_slice(&SENTINEL.to_ne_bytes());
        if event == Event::Interrupt {
            let irb = Irb::new(
                Scsw {
                    flags: ScswFlags::new().with_stctl(stctl::ALERT | stctl::STATUS_PENDING),
                    dstat: 0x80,
                    ..Default::default()
                },
                0x80,
            );
            sh.fsm_interrupt(&mut st, irb);
        } else {
            sh.fsm_event(&mut st, event);
        }
        let io = super::super::io::ret_code(&st.io_region);
        let mut b = [0u8; 4];
        b.copy_from_slice(&st.cmd_region[4..]);
        let stored = st.io_region[24..120].iter().any(|&x| x != 0);
        let r = (
            st.state,
            io,
            i32::from_ne_bytes(b),
            stored,
            null.halts.load(Ordering::SeqCst),
        );
        // Nothing runs on the Null backend: let the drop skip quiescing.
        st.state = State::Standby;
        st.async_pending = false;
        drop(st);
        r
    }

    #[test]
    fn every_fsm_cell_result() {
        use State::*;
        let s = SENTINEL;
        let eio = -libc::EIO;
        let again = -libc::EAGAIN;
        let busy = -libc::EBUSY;
        let inval = -libc::EINVAL;
        // Per state: NOT_OPER, IO_REQ, ASYNC_REQ, INTERRUPT, OPEN, CLOSE.
        let want: [[Outcome; 6]; 5] = [
            [
                (NotOper, s, s, false, 0),
                (NotOper, eio, s, false, 0),
                (NotOper, s, eio, false, 0),
                (NotOper, s, s, false, 0),
                (NotOper, s, s, false, 0),
                (NotOper, s, s, false, 0),
            ],
            [
                (NotOper, s, s, false, 0),
                (Standby, eio, s, false, 0),
                (Standby, s, eio, false, 0),
                (Standby, s, s, false, 0),
                (Idle, s, s, false, 0),
                (NotOper, s, s, false, 0),
            ],
            [
                (NotOper, s, s, false, 0),
                (Idle, inval, s, false, 0),
                (Idle, s, 0, false, 1),
                (Idle, s, s, true, 0),
                (NotOper, s, s, false, 0),
                (Standby, s, s, false, 0),
            ],
            [
                (NotOper, s, s, false, 0),
                (CpProcessing, again, s, false, 0),
                (CpProcessing, s, again, false, 0),
                (CpProcessing, s, s, true, 0),
                (NotOper, s, s, false, 0),
                (Standby, s, s, false, 0),
            ],
            [
                (NotOper, s, s, false, 0),
                (CpPending, busy, s, false, 0),
                (CpPending, s, 0, false, 1),
                (CpPending, s, s, true, 0),
                (NotOper, s, s, false, 0),
                (Standby, s, s, false, 0),
            ],
        ];
        for (si, state) in STATES.iter().enumerate() {
            for (ei, event) in EVENTS.iter().enumerate() {
                assert_eq!(cell(*state, *event), want[si][ei], "{state:?} x {event:?}");
            }
        }
    }

    /// Records every image and whether the IO eventfd was already signalled then.
    struct Recorder {
        efd: nix::sys::eventfd::EventFd,
        images: Mutex<Vec<([u8; CCW_IO_REGION_SIZE], bool)>>,
    }
    impl IoRegionMirror for Recorder {
        fn update(&self, image: &[u8; CCW_IO_REGION_SIZE]) {
            let mut p = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&self.efd),
                nix::poll::PollFlags::POLLIN,
            )];
            let signalled = nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO).unwrap() > 0;
            self.images.lock().unwrap().push((*image, signalled));
        }
    }

    #[test]
    fn io_mirror_gets_each_image_before_the_eventfd() {
        use nix::sys::eventfd::{EfdFlags, EventFd};
        let dev = VfioCcwDevice::new(
            Arc::new(Null::default()),
            IommuStore::new(StoreConfig::default()),
            DeviceConfig::default(),
        );
        dev.open().unwrap();
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let dup = std::os::fd::AsFd::as_fd(&efd).try_clone_to_owned().unwrap();
        dev.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(dup)))
            .unwrap();
        let rec = Arc::new(Recorder {
            efd,
            images: Mutex::new(Vec::new()),
        });
        dev.set_io_mirror(Some(rec.clone()));
        // Installing hands over the current image (all zeros).
        assert_eq!(
            rec.images.lock().unwrap()[0],
            ([0; CCW_IO_REGION_SIZE], false)
        );
        // A start the translator refuses (CPA 0 is not mapped): the image carries -EINVAL.
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(crate::orb::fctl::START),
            ..Default::default()
        };
        let mut req = [0u8; CCW_IO_REGION_SIZE];
        req[12..24].copy_from_slice(&scsw.to_bytes());
        assert!(dev.write_region(IO_REGION_INDEX, 0, &req).is_err());
        {
            let imgs = rec.images.lock().unwrap();
            assert_eq!(imgs.len(), 2);
            assert_eq!(&imgs[1].0[..24], &req[..24]);
            assert_eq!(&imgs[1].0[120..], &(-libc::EINVAL).to_ne_bytes());
        }
        // An interrupt: the IRB is in the image handed over before the eventfd fires.
        let irb = Irb::new(
            Scsw {
                flags: ScswFlags::new().with_stctl(stctl::ALERT | stctl::STATUS_PENDING),
                dstat: 0x80,
                ..Default::default()
            },
            0x80,
        );
        SubchannelEvents::interrupt(&*dev.sh, irb);
        {
            let imgs = rec.images.lock().unwrap();
            assert_eq!(imgs.len(), 3);
            assert_eq!(&imgs[2].0[24..120], &irb.to_bytes()[..]);
            assert!(
                !imgs[2].1,
                "eventfd signalled before the mirror was updated"
            );
        }
        assert!(rec.efd.read().is_ok());
        // Removed: no more images.
        dev.set_io_mirror(None);
        SubchannelEvents::interrupt(&*dev.sh, irb);
        assert_eq!(rec.images.lock().unwrap().len(), 3);
        // Every image equals what a region read returns at the end.
        let mut now = [0u8; CCW_IO_REGION_SIZE];
        dev.read_region(IO_REGION_INDEX, 0, &mut now).unwrap();
        assert_eq!(now, rec.images.lock().unwrap()[2].0);
    }

    #[test]
    fn region_ranges() {
        assert_eq!(region_range(0, 124, 124), Ok(0..124));
        assert_eq!(region_range(120, 4, 124), Ok(120..124));
        assert_eq!(region_range(124, 0, 124), Ok(124..124));
        assert_eq!(region_range(121, 4, 124), Err(DeviceError::InvalidArgument));
        assert_eq!(region_range(125, 0, 124), Err(DeviceError::InvalidArgument));
        assert_eq!(
            region_range(u64::MAX, 1, 124),
            Err(DeviceError::InvalidArgument)
        );
    }

    #[test]
    fn errnos() {
        assert_eq!(DeviceError::InvalidArgument.errno(), libc::EINVAL);
        assert_eq!(DeviceError::Again.errno(), libc::EAGAIN);
        assert_eq!(DeviceError::Refused(libc::EBUSY).errno(), libc::EBUSY);
        assert_eq!(DeviceError::NoDevice.errno(), libc::ENODEV);
    }
}
