//! [`MdevSubchannel`]: a real I/O subchannel through the kernel's vfio-ccw mdev.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vfio_bindings::bindings::vfio::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE,
};
use vm_memory::{MmapRegion, VolatileMemory};

use super::ioctl;
use super::plan::{AddressPlan, PlanOp};
use super::MdevError;
use crate::ccw::{HostProgram, TranslateConfig};
use crate::driver::regions::{
    CcwCmdRegion, CcwCrwRegion, CcwIoRegion, CCW_CRW_REGION_SIZE, CCW_IO_REGION_SIZE,
    CCW_SCHIB_REGION_SIZE, VFIO_CCW_ASYNC_CMD_CSCH, VFIO_CCW_ASYNC_CMD_HSCH,
    VFIO_CCW_CONFIG_REGION_INDEX, VFIO_CCW_CRW_IRQ_INDEX, VFIO_CCW_IO_IRQ_INDEX,
    VFIO_CCW_REQ_IRQ_INDEX, VFIO_DEVICE_FLAGS_CCW, VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD,
    VFIO_REGION_SUBTYPE_CCW_CRW, VFIO_REGION_SUBTYPE_CCW_SCHIB, VFIO_REGION_TYPE_CCW,
};
use crate::driver::{Subchannel, SubchannelEvents};
use crate::iommu_store::{IommuStore, PAGE_SIZE};
use crate::orb::{actl, cstat, fctl, stctl, Crw, Irb, Orb, Schib, Scsw, ScswFlags, SCHIB_SIZE};

/// Options of an [`MdevSubchannel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MdevConfig {
    /// Channel address (IOVA) of the arena; must equal the translator's `arena_base`.
    pub arena_base: u32,
    /// Arena size; at least the translator's `arena_size`.
    pub arena_size: u32,
    /// Hand the kernel direct-addressed CCWs where it can (see
    /// [`MdevSubchannel::set_direct_ccws`]); on by default.
    pub direct_ccws: bool,
}

impl Default for MdevConfig {
    fn default() -> Self {
        let t = TranslateConfig::default();
        MdevConfig {
            arena_base: t.arena_base,
            arena_size: t.arena_size,
            direct_ccws: true,
        }
    }
}

/// Where the vfio-ccw regions are in the device fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MdevRegions {
    /// The I/O region (`struct ccw_io_region`).
    pub io: u64,
    /// The async command region, if the kernel offers it.
    pub async_cmd: Option<u64>,
    /// The SCHIB region, if offered.
    pub schib: Option<u64>,
    /// The CRW region, if offered.
    pub crw: Option<u64>,
}

/// What [`MdevSubchannel::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MdevInfo {
    /// The IOMMU group number (`/dev/vfio/N`).
    pub group: u32,
    /// `VFIO_DEVICE_GET_INFO`.
    pub device: ioctl::DeviceInfo,
    /// Region offsets.
    pub regions: MdevRegions,
    /// Whether the CRW and REQ eventfds were accepted.
    pub crw_irq: bool,
    /// Whether the REQ eventfd was accepted.
    pub req_irq: bool,
}

/// The fds, in drop order: device before group before container.
struct Fds {
    device: File,
    _group: File,
    container: File,
}

struct Core {
    fds: Fds,
    info: MdevInfo,
    cfg: MdevConfig,
    arena: MmapRegion<()>,
    plan: Mutex<AddressPlan>,
    store: Mutex<Option<IommuStore>>,
    events: Mutex<Option<Weak<dyn SubchannelEvents>>>,
    /// The running program's clone (keeps its pins until the final interrupt).
    current: Mutex<Option<Arc<HostProgram>>>,
    /// Serializes region writes (the kernel answers EAGAIN to concurrent ones).
    io: Mutex<()>,
    /// The errno of the last kernel refusal presented as a program check.
    last_errno: AtomicI32,
    stop: EventFd,
    stamps: Stamps,
    /// See [`MdevSubchannel::set_direct_ccws`].
    direct: AtomicBool,
}

/// When the steps of the last I/O happened, in ns since the subchannel opened. Recorded only
/// while enabled: `vccw mdev bench` reads them to split a round trip into its parts.
#[derive(Debug)]
struct Stamps {
    on: AtomicBool,
    epoch: Instant,
    start: AtomicU64,
    issued: AtomicU64,
    written: AtomicU64,
    irq: AtomicU64,
    delivered: AtomicU64,
}

impl Stamps {
    fn new() -> Self {
        Stamps {
            on: AtomicBool::new(false),
            epoch: Instant::now(),
            start: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            written: AtomicU64::new(0),
            irq: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn mark(&self, at: &AtomicU64) {
        if self.on.load(Ordering::Relaxed) {
            at.store(self.now(), Ordering::Relaxed);
        }
    }
}

/// The step times of the last I/O on an [`MdevSubchannel`] (ns on its
/// [`MdevSubchannel::now_ns`] clock; 0 until recorded). See [`MdevSubchannel::set_stamps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoStamps {
    /// START entered the backend (after vccw's translation) or `start_raw` was called.
    pub start: u64,
    /// The I/O region write was issued (vccw: after the container mapping check and the
    /// arena copy).
    pub issued: u64,
    /// The kernel accepted the I/O region write (its translation and SSCH done).
    pub written: u64,
    /// The interrupt thread woke on the IO eventfd.
    pub irq: u64,
    /// The interrupt was delivered (the device's handling, or the baseline's sink, done).
    pub delivered: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sys(what: &'static str) -> impl FnOnce(Errno) -> MdevError {
    move |errno| MdevError::Sys { what, errno }
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A UUID as sysfs names mdevs: 8-4-4-4-12 hex digits. Checked so it cannot walk paths.
pub fn valid_uuid(uuid: &str) -> bool {
    let parts: Vec<&str> = uuid.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    parts.len() == 5
        && parts
            .iter()
            .zip(lens)
            .all(|(p, n)| p.len() == n && p.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// The group number from an `iommu_group` link target (`.../kernel/iommu_groups/N`).
pub fn group_from_link(target: &Path) -> Option<u32> {
    target.file_name()?.to_str()?.parse().ok()
}

/// Whether an IRB ends the program (Linux `vfio_ccw_sch_io_todo`: neither subchannel nor
/// device active).
pub fn irb_is_final(irb: &Irb) -> bool {
    irb.scsw.flags.actl() & (actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE) == 0
}

/// The interrupt presented when the kernel refuses a program vccw accepted (it pins or
/// validates differently): a program check at the ORB's CPA, as a channel would report it.
pub fn refusal_irb(orb: &Orb) -> Irb {
    let flags = ScswFlags::new()
        .with_key(orb.ctl.key())
        .with_format1(orb.ctl.format1())
        .with_prefetch(orb.ctl.prefetch())
        .with_fctl(fctl::START)
        .with_stctl(stctl::ALERT | stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING);
    Irb::new(
        Scsw {
            flags,
            cpa: orb.cpa,
            dstat: 0,
            cstat: cstat::PROGRAM_CHECK,
            count: 0,
        },
        0,
    )
}

/// One I/O subchannel bound to vfio_ccw, driven through its mdev.
///
/// Implements [`Subchannel`], so a [`VfioCcwDevice`](crate::driver::VfioCcwDevice) runs
/// vccw-translated programs on real hardware with it. Attach the device's store with
/// [`MdevSubchannel::attach_store`] before the first start. See `docs/kernel-backend.md`.
pub struct MdevSubchannel {
    core: Arc<Core>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for MdevSubchannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MdevSubchannel")
            .field("info", &self.core.info)
            .finish()
    }
}

impl MdevSubchannel {
    /// Opens the mdev `uuid` with the default arena (the translator's default).
    pub fn open(uuid: &str) -> Result<Arc<Self>, MdevError> {
        Self::open_with(uuid, MdevConfig::default())
    }

    /// Opens the mdev `uuid`: container with the type1v2 IOMMU, group, device fd, regions,
    /// the arena mapped at `cfg.arena_base`, IO/CRW/REQ eventfds, and the interrupt thread.
    pub fn open_with(uuid: &str, cfg: MdevConfig) -> Result<Arc<Self>, MdevError> {
        if !valid_uuid(uuid) {
            return Err(MdevError::BadUuid(uuid.to_string()));
        }
        let link = format!("/sys/bus/mdev/devices/{uuid}/iommu_group");
        let target = std::fs::read_link(&link).map_err(|e| MdevError::Sys {
            what: "readlink iommu_group",
            errno: io_errno(&e),
        })?;
        let group_no = group_from_link(&target).ok_or(MdevError::NoGroup)?;
        let rw = |p: &str, what: &'static str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| MdevError::Sys {
                    what,
                    errno: io_errno(&e),
                })
        };
        let container = rw("/dev/vfio/vfio", "open /dev/vfio/vfio")?;
        let v = ioctl::get_api_version(container.as_fd()).map_err(sys("GET_API_VERSION"))?;
        if v != VFIO_API_VERSION as i32 {
            return Err(MdevError::ApiVersion(v));
        }
        // Plain TYPE1 makes every start fail with EACCES on vfio-ccw: v2 is required.
        if ioctl::check_extension(container.as_fd(), VFIO_TYPE1v2_IOMMU)
            .map_err(sys("CHECK_EXTENSION"))?
            <= 0
        {
            return Err(MdevError::NoType1v2);
        }
        let group = rw(&format!("/dev/vfio/{group_no}"), "open /dev/vfio/N")?;
        let st = ioctl::group_get_status(group.as_fd()).map_err(sys("GROUP_GET_STATUS"))?;
        if st & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(MdevError::NotViable(group_no));
        }
        ioctl::group_set_container(group.as_fd(), container.as_fd())
            .map_err(sys("GROUP_SET_CONTAINER"))?;
        ioctl::set_iommu(container.as_fd(), VFIO_TYPE1v2_IOMMU).map_err(sys("SET_IOMMU"))?;
        let dfd =
            ioctl::group_get_device_fd(group.as_fd(), uuid).map_err(sys("GROUP_GET_DEVICE_FD"))?;
        // SAFETY: GET_DEVICE_FD returned a new descriptor that nothing else owns.
        let device = unsafe { File::from_raw_fd(dfd) };
        let dinfo = ioctl::device_get_info(device.as_fd()).map_err(sys("DEVICE_GET_INFO"))?;
        if dinfo.flags & VFIO_DEVICE_FLAGS_CCW == 0 {
            return Err(MdevError::NotCcw(dinfo.flags));
        }
        let regions = find_regions(&device, dinfo.num_regions)?;

        let arena = MmapRegion::<()>::new(cfg.arena_size as usize).map_err(|_| MdevError::Sys {
            what: "mmap arena",
            errno: Errno::ENOMEM,
        })?;
        let arena_host = arena.as_ptr() as u64;
        ioctl::iommu_map_dma(
            container.as_fd(),
            arena_host,
            u64::from(cfg.arena_base),
            u64::from(cfg.arena_size),
        )
        .map_err(sys("MAP_DMA arena"))?;
        let plan = AddressPlan::new(
            u64::from(cfg.arena_base),
            arena_host,
            u64::from(cfg.arena_size),
        );

        let efd = || EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(sys("eventfd"));
        let (io_efd, crw_efd, req_efd) = (efd()?, efd()?, efd()?);
        ioctl::device_set_irq_eventfd(device.as_fd(), VFIO_CCW_IO_IRQ_INDEX, Some(io_efd.as_fd()))
            .map_err(sys("SET_IRQS io"))?;
        // CRW and REQ are optional (older kernels): go on without them.
        let crw_irq = ioctl::device_set_irq_eventfd(
            device.as_fd(),
            VFIO_CCW_CRW_IRQ_INDEX,
            Some(crw_efd.as_fd()),
        )
        .is_ok();
        let req_irq = ioctl::device_set_irq_eventfd(
            device.as_fd(),
            VFIO_CCW_REQ_IRQ_INDEX,
            Some(req_efd.as_fd()),
        )
        .is_ok();
        let info = MdevInfo {
            group: group_no,
            device: dinfo,
            regions,
            crw_irq,
            req_irq,
        };
        let core = Arc::new(Core {
            fds: Fds {
                device,
                _group: group,
                container,
            },
            info,
            cfg,
            arena,
            plan: Mutex::new(plan),
            store: Mutex::new(None),
            events: Mutex::new(None),
            current: Mutex::new(None),
            io: Mutex::new(()),
            last_errno: AtomicI32::new(0),
            stop: efd()?,
            stamps: Stamps::new(),
            direct: AtomicBool::new(cfg.direct_ccws),
        });
        let c = Arc::clone(&core);
        let thread = std::thread::Builder::new()
            .name("vccw-mdev-irq".into())
            .spawn(move || c.irq_loop(io_efd, crw_efd, req_efd))
            .map_err(|e| MdevError::Sys {
                what: "spawn interrupt thread",
                errno: io_errno(&e),
            })?;
        Ok(Arc::new(MdevSubchannel {
            core,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// What `open` found.
    pub fn info(&self) -> MdevInfo {
        self.core.info
    }

    /// The store whose memory the translated programs address: its mappings are mapped
    /// into the container (IOVA = process address) as programs first touch them.
    pub fn attach_store(&self, store: IommuStore) {
        *lock(&self.core.store) = Some(store);
    }

    /// The errno of the last start the kernel refused after vccw accepted it (0: none).
    pub fn last_kernel_errno(&self) -> i32 {
        self.core.last_errno.load(Ordering::Relaxed)
    }

    /// Pass-through baseline: maps every mapping of `store` into the container at
    /// IOVA = guest-physical address (what QEMU does), for [`MdevSubchannel::start_raw`].
    pub fn map_passthrough(&self, store: &IommuStore) -> Result<(), MdevError> {
        let mut plan = lock(&self.core.plan);
        for m in store.mappings() {
            let ops = plan.ensure(m.iova, m.host, m.size)?;
            self.core.apply(&mut plan, ops)?;
        }
        Ok(())
    }

    /// Pass-through baseline: starts `orb` as given (guest addresses = IOVAs, no vccw
    /// translation). The kernel's errno on refusal.
    pub fn start_raw(&self, orb: &Orb) -> Result<(), MdevError> {
        self.core.stamps.mark(&self.core.stamps.start);
        let _g = lock(&self.core.io);
        self.core.stamps.mark(&self.core.stamps.issued);
        self.core
            .write_start(orb)
            .map_err(sys("start (pass-through)"))?;
        self.core.stamps.mark(&self.core.stamps.written);
        Ok(())
    }

    /// Records (or stops recording) the step times of each I/O, read by
    /// [`MdevSubchannel::stamps`]: four clock reads per I/O, off by default.
    pub fn set_stamps(&self, on: bool) {
        self.core.stamps.on.store(on, Ordering::Relaxed);
    }

    /// The step times of the last I/O (zeros unless [`MdevSubchannel::set_stamps`] is on).
    pub fn stamps(&self) -> IoStamps {
        let s = &self.core.stamps;
        IoStamps {
            start: s.start.load(Ordering::Relaxed),
            issued: s.issued.load(Ordering::Relaxed),
            written: s.written.load(Ordering::Relaxed),
            irq: s.irq.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
        }
    }

    /// The clock [`IoStamps`] are on: ns since the subchannel opened.
    pub fn now_ns(&self) -> u64 {
        self.core.stamps.now()
    }

    /// Whether a start rewrites IDA CCWs into direct ones where it can: a data CCW whose
    /// bytes are one contiguous guest range below the arena (and below 2 GiB) is handed to the
    /// kernel with its guest-physical address, through a window that maps that store mapping
    /// at IOVA = guest physical (as the pass-through does), instead of with a one-use IDAL of
    /// process addresses. The kernel then pins the range directly rather than first fetching
    /// the IDAL. The bytes moved and the status are the same either way; see
    /// `docs/kernel-backend.md`.
    pub fn set_direct_ccws(&self, on: bool) {
        self.core.direct.store(on, Ordering::Relaxed);
    }

    /// The interrupt listener currently set (the device's, once a device was opened on
    /// this subchannel), so a caller can switch listeners and back.
    pub fn events(&self) -> Option<Weak<dyn SubchannelEvents>> {
        lock(&self.core.events).clone()
    }

    /// Reads the I/O region's IRB (the last interrupt's status).
    pub fn read_irb(&self) -> Result<Irb, MdevError> {
        self.core.read_io().map(|r| r.irb())
    }
}

fn find_regions(device: &File, num: u32) -> Result<MdevRegions, MdevError> {
    let mut r = MdevRegions::default();
    let mut io = None;
    for index in 0..num.min(16) {
        let Ok(ri) = ioctl::device_get_region_info(device.as_fd(), index) else {
            continue;
        };
        if index == VFIO_CCW_CONFIG_REGION_INDEX {
            if ri.size < CCW_IO_REGION_SIZE as u64 {
                return Err(MdevError::MissingRegion("I/O (too small)"));
            }
            io = Some(ri.offset);
            continue;
        }
        match ri.cap_type {
            Some((VFIO_REGION_TYPE_CCW, VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD)) => {
                r.async_cmd = Some(ri.offset)
            }
            Some((VFIO_REGION_TYPE_CCW, VFIO_REGION_SUBTYPE_CCW_SCHIB)) => {
                r.schib = Some(ri.offset)
            }
            Some((VFIO_REGION_TYPE_CCW, VFIO_REGION_SUBTYPE_CCW_CRW)) => r.crw = Some(ri.offset),
            _ => {}
        }
    }
    r.io = io.ok_or(MdevError::MissingRegion("I/O"))?;
    Ok(r)
}

/// Region writes the kernel answers EAGAIN while it handles another request: retried this
/// many times, 1 ms apart.
const EAGAIN_RETRIES: u32 = 100;

impl Core {
    fn apply(&self, plan: &mut AddressPlan, ops: Vec<PlanOp>) -> Result<(), MdevError> {
        for op in ops {
            match op {
                PlanOp::Unmap { iova, size } => {
                    ioctl::iommu_unmap_dma(self.fds.container.as_fd(), iova, size)
                        .map_err(sys("UNMAP_DMA"))?;
                }
                PlanOp::Map(m) => {
                    ioctl::iommu_map_dma(self.fds.container.as_fd(), m.host, m.iova, m.size)
                        .map_err(sys("MAP_DMA"))?;
                }
            }
            plan.apply(op);
        }
        Ok(())
    }

    /// Makes the container ready for `program` and copies it into the arena, all under one
    /// plan lock: identity entries for the store mappings it has pinned pages in (mapped
    /// once, not per start), the image, then (direct CCWs on) its IDA CCWs rewritten where
    /// they can be direct.
    fn load(&self, program: &HostProgram) -> Result<(), MdevError> {
        let mut plan = lock(&self.plan);
        let mut store: Option<IommuStore> = None;
        let mut store = || -> Result<IommuStore, MdevError> {
            if store.is_none() {
                store = lock(&self.store).clone();
            }
            store.clone().ok_or(MdevError::NoStore)
        };
        for page in program.pages() {
            if plan.covers_identity(page.host, PAGE_SIZE) {
                continue;
            }
            // The whole store mapping when it still is the one the pin came from; otherwise
            // (a VADDR update since) just the pinned page, which the pin keeps alive.
            let (host, size) = match store()?.mapping_at(page.iova) {
                Some(m) if m.contains_host(page.host) => (m.host, m.size),
                _ => (page.host & !(PAGE_SIZE - 1), PAGE_SIZE),
            };
            let ops = plan.ensure_identity(host, size)?;
            self.apply(&mut plan, ops)?;
        }
        let image = program.image();
        let outside = || MdevError::Sys {
            what: "host program outside the arena",
            errno: Errno::EFAULT,
        };
        let off = u64::from(program.base())
            .checked_sub(u64::from(self.cfg.arena_base))
            .filter(|o| o + image.len() as u64 <= u64::from(self.cfg.arena_size))
            .ok_or_else(outside)? as usize;
        self.arena
            .get_slice(off, image.len())
            .map_err(|_| outside())?
            .copy_from(image);
        if self.direct.load(Ordering::Relaxed) {
            self.direct_ccws(&mut plan, program, off, &mut store);
        }
        Ok(())
    }

    /// Rewrites, in the arena copy of `program` (at `arena_off`), each IDA CCW whose data is
    /// one contiguous range of one store mapping that lies below the arena and below 2 GiB
    /// into a direct CCW addressing it at IOVA = guest physical. The store mapping is mapped
    /// there once (a *window*); later starts find the window among the plan's entries
    /// without asking the store. A window can never send the kernel to the wrong memory,
    /// for the same reason an identity entry cannot: it maps IOVAs to the process addresses
    /// the program pinned, and the kernel resolves those when it pins. CCWs that cannot be
    /// direct (scattered data, memory above the limit, a window that would displace an
    /// identity entry) stay IDA, which is always valid.
    fn direct_ccws(
        &self,
        plan: &mut AddressPlan,
        program: &HostProgram,
        arena_off: usize,
        store: &mut impl FnMut() -> Result<IommuStore, MdevError>,
    ) {
        let orb = program.orb();
        if !orb.ctl.format2_idaw() || orb.ctl.idaw_2k() {
            return;
        }
        let image = program.image();
        let base = u64::from(program.base());
        let limit = u64::from(self.cfg.arena_base).min(1 << 31);
        let idaw = |addr: u64| -> Option<u64> {
            let off = usize::try_from(addr.checked_sub(base)?).ok()?;
            let b: [u8; 8] = image.get(off..off.checked_add(8)?)?.try_into().ok()?;
            Some(u64::from_be_bytes(b))
        };
        for (addr, ccw) in program.ccws() {
            if !ccw.flags.ida() || ccw.count == 0 || ccw.is_tic() {
                continue;
            }
            let count = u64::from(ccw.count);
            let list = u64::from(ccw.cda);
            let Some(first) = idaw(list) else { continue };
            // Contiguous in process memory: IDAW k is the k-th page after the first.
            let pages = ((first % PAGE_SIZE) + count).div_ceil(PAGE_SIZE);
            let page0 = first & !(PAGE_SIZE - 1);
            if !(1..pages).all(|k| idaw(list + 8 * k) == Some(page0 + k * PAGE_SIZE)) {
                continue;
            }
            let window = |plan: &AddressPlan| {
                plan.entries()
                    .find(|e| {
                        e.iova != e.host
                            && first >= e.host
                            && first - e.host + count <= e.size
                            && e.iova + e.size <= limit
                    })
                    .map(|e| e.iova + (first - e.host))
            };
            let gpa = match window(plan) {
                Some(g) => g,
                None => match self.open_window(plan, program, first, count, limit, store) {
                    Some(()) => match window(plan) {
                        Some(g) => g,
                        None => continue,
                    },
                    None => continue,
                },
            };
            let direct = crate::ccw::Ccw1 {
                flags: ccw.flags.with_ida(false),
                cda: gpa as u32,
                ..ccw
            };
            let at = arena_off + (u64::from(addr) - base) as usize;
            if let Ok(s) = self.arena.get_slice(at, 8) {
                s.copy_from(&direct.to_bytes());
            }
        }
    }

    /// Maps the store mapping holding the `count` bytes at process address `first` (pinned
    /// by `program`) at IOVA = guest physical, if it lies below `limit` and displaces no
    /// identity entry.
    fn open_window(
        &self,
        plan: &mut AddressPlan,
        program: &HostProgram,
        first: u64,
        count: u64,
        limit: u64,
        store: &mut impl FnMut() -> Result<IommuStore, MdevError>,
    ) -> Option<()> {
        let gpa = program.host_to_guest(first)?;
        let m = store().ok()?.mapping_at(gpa)?;
        let fits = m.contains_host(first)
            && first - m.host == gpa - m.iova
            && first - m.host + count <= m.size
            && m.iova + m.size <= limit;
        if !fits {
            return None;
        }
        let ops = plan.ensure(m.iova, m.host, m.size).ok()?;
        let displaces_identity = ops.iter().any(|op| match *op {
            PlanOp::Unmap { iova, .. } => plan.entry_at(iova).is_some_and(|e| e.iova == e.host),
            PlanOp::Map(_) => false,
        });
        if displaces_identity {
            return None;
        }
        match self.apply(plan, ops) {
            Ok(()) => Some(()),
            Err(e) => {
                tracing::debug!(%e, "direct CCWs: no window");
                None
            }
        }
    }

    fn write_start(&self, orb: &Orb) -> Result<(), Errno> {
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(fctl::START),
            ..Default::default()
        };
        let req = CcwIoRegion::request(orb, &scsw).to_bytes();
        self.write_region(self.info.regions.io, &req)
    }

    fn write_region(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        for _ in 0..EAGAIN_RETRIES {
            match self.fds.device.write_at(data, offset) {
                Ok(_) => return Ok(()),
                Err(e) if io_errno(&e) == Errno::EAGAIN => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => return Err(io_errno(&e)),
            }
        }
        Err(Errno::EAGAIN)
    }

    fn read_io(&self) -> Result<CcwIoRegion, MdevError> {
        let mut b = [0u8; CCW_IO_REGION_SIZE];
        self.fds
            .device
            .read_exact_at(&mut b, self.info.regions.io)
            .map_err(|e| MdevError::Sys {
                what: "read I/O region",
                errno: io_errno(&e),
            })?;
        Ok(CcwIoRegion::from_bytes(&b))
    }

    fn async_cmd(&self, command: u32) -> Result<(), Errno> {
        let off = self.info.regions.async_cmd.ok_or(Errno::EOPNOTSUPP)?;
        let _g = lock(&self.io);
        let req = CcwCmdRegion {
            command,
            ret_code: 0,
        };
        self.write_region(off, &req.to_bytes())
    }

    fn deliver(&self, irb: Irb) {
        let ev = lock(&self.events).as_ref().and_then(|w| w.upgrade());
        match ev {
            Some(ev) => ev.interrupt(irb),
            None => tracing::debug!("interrupt with no listener: dropped"),
        }
    }

    fn irq_loop(&self, io: EventFd, crw: EventFd, req: EventFd) {
        loop {
            let mut fds = [
                PollFd::new(io.as_fd(), PollFlags::POLLIN),
                PollFd::new(crw.as_fd(), PollFlags::POLLIN),
                PollFd::new(req.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
            ];
            match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(%e, "mdev interrupt poll failed: thread ends");
                    return;
                }
            }
            let ready: Vec<bool> = fds
                .iter()
                .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                .collect();
            if ready[3] {
                return;
            }
            if ready[0] {
                self.stamps.mark(&self.stamps.irq);
                let _ = io.read();
                self.on_io();
                self.stamps.mark(&self.stamps.delivered);
            }
            if ready[1] {
                let _ = crw.read();
                self.on_crw();
            }
            if ready[2] {
                let _ = req.read();
                tracing::warn!("the kernel asks to release the mdev (REQ)");
            }
        }
    }

    fn on_io(&self) {
        let irb = match self.read_io() {
            Ok(r) => r.irb(),
            Err(e) => {
                tracing::error!(%e, "interrupt without a readable I/O region");
                return;
            }
        };
        if irb_is_final(&irb) {
            // Drop our clone first: the device's own drop then really unpins.
            lock(&self.current).take();
        }
        self.deliver(irb);
    }

    fn on_crw(&self) {
        let Some(off) = self.info.regions.crw else {
            return;
        };
        // Each read pops one CRW; a zero CRW means the queue is empty. Bounded: the kernel
        // queue is small, and a broken one must not spin us.
        for _ in 0..64 {
            let mut b = [0u8; CCW_CRW_REGION_SIZE];
            if self.fds.device.read_exact_at(&mut b, off).is_err() {
                return;
            }
            let r = CcwCrwRegion::from_bytes(&b);
            if r.crw == Crw::default() {
                return;
            }
            let ev = lock(&self.events).as_ref().and_then(|w| w.upgrade());
            if let Some(ev) = ev {
                ev.path_event(r.crw);
            }
        }
    }
}

impl Subchannel for MdevSubchannel {
    fn start(&self, program: Arc<HostProgram>) -> u8 {
        let core = &self.core;
        core.stamps.mark(&core.stamps.start);
        let _g = lock(&core.io);
        if let Err(e) = core.load(&program) {
            tracing::error!(%e, "cannot load the program into the container and the arena");
            core.last_errno.store(e.errno(), Ordering::Relaxed);
            return 3;
        }
        let orb = *program.orb();
        *lock(&core.current) = Some(program);
        core.stamps.mark(&core.stamps.issued);
        match core.write_start(&orb) {
            Ok(()) => {
                core.stamps.mark(&core.stamps.written);
                0
            }
            Err(e) => {
                lock(&core.current).take();
                match e {
                    Errno::EBUSY => 2,
                    Errno::ENODEV | Errno::EACCES => 3,
                    Errno::EAGAIN => 2,
                    e => {
                        // vccw accepted the program but the kernel refused it: present the
                        // program check a channel would, rather than a bogus condition code.
                        tracing::warn!(%e, "kernel refused a translated program");
                        core.last_errno.store(e as i32, Ordering::Relaxed);
                        core.deliver(refusal_irb(&orb));
                        0
                    }
                }
            }
        }
    }

    fn resume(&self) -> u8 {
        // The kernel offers no RESUME SUBCHANNEL; vfio-ccw never issues one.
        2
    }

    fn halt(&self) -> u8 {
        match self.core.async_cmd(VFIO_CCW_ASYNC_CMD_HSCH) {
            Ok(()) => 0,
            Err(Errno::ENODEV) => 3,
            Err(_) => 2,
        }
    }

    fn clear(&self) -> u8 {
        let r = self.core.async_cmd(VFIO_CCW_ASYNC_CMD_CSCH);
        // After CSCH the channel no longer touches the program: our clone can go (the kernel
        // holds its own page references until its clear interrupt).
        lock(&self.core.current).take();
        match r {
            Ok(()) => 0,
            Err(_) => 3,
        }
    }

    fn store_schib(&self) -> Result<Schib, i32> {
        let off = self.core.info.regions.schib.ok_or(libc::EOPNOTSUPP)?;
        let mut b = [0u8; CCW_SCHIB_REGION_SIZE];
        self.core
            .fds
            .device
            .read_exact_at(&mut b, off)
            .map_err(|e| io_errno(&e) as i32)?;
        let mut s = [0u8; SCHIB_SIZE];
        s.copy_from_slice(&b);
        Ok(Schib::from_bytes(&s))
    }

    fn set_events(&self, events: Weak<dyn SubchannelEvents>) {
        *lock(&self.core.events) = Some(events);
    }
}

impl Drop for MdevSubchannel {
    fn drop(&mut self) {
        let _ = self.core.stop.write(1);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        assert!(valid_uuid("7e270a25-e163-4922-af60-757fc8ed48c6"));
        assert!(!valid_uuid("7e270a25-e163-4922-af60-757fc8ed48c"));
        assert!(!valid_uuid("../../../../etc/passwd"));
        assert!(!valid_uuid("7e270a25-e163-4922-af60/757fc8ed48c6"));
        assert!(!valid_uuid("7e270a25-e163-4922-af60-757fc8ed48c6-"));
    }

    #[test]
    fn group_links() {
        assert_eq!(
            group_from_link(Path::new("../../../kernel/iommu_groups/12")),
            Some(12)
        );
        assert_eq!(group_from_link(Path::new("/x/iommu_groups/a")), None);
    }

    #[test]
    fn finality_and_refusal() {
        let mut irb = Irb::default();
        irb.scsw.flags = ScswFlags::new().with_actl(actl::DEVICE_ACTIVE);
        assert!(!irb_is_final(&irb));
        irb.scsw.flags = ScswFlags::new().with_actl(actl::SUBCHANNEL_ACTIVE);
        assert!(!irb_is_final(&irb));
        irb.scsw.flags = ScswFlags::new().with_actl(actl::START_PENDING);
        assert!(irb_is_final(&irb));
        let orb = Orb {
            intparm: 0,
            ctl: crate::orb::OrbControls::new()
                .with_format1(true)
                .with_prefetch(true),
            cpa: 0x7000_0000,
        };
        let b = refusal_irb(&orb).to_bytes();
        // Word 0: F+P (0xC0), fctl start (0x40), stctl alert|primary|secondary|pending.
        assert_eq!(
            &b[..12],
            &[0, 0xC0, 0x40, 0x17, 0x70, 0, 0, 0, 0, 0x20, 0, 0]
        );
    }
}
