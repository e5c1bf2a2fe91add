//! `vccw mdev probe` and `vccw mdev bench`: guest channel programs run on a real subchannel
//! through vccw's store, translator and device ([`VfioCcwDevice`] over [`MdevSubchannel`]),
//! and, as a baseline, passed through untranslated (what QEMU does).
//!
//! The programs target a virtio-ccw device (QEMU's CU type 3832): SENSE ID, and virtio
//! READ_CONF (0x22), whose first 8 bytes on a legacy (revision 0) virtio-blk device are its
//! capacity in 512-byte sectors, big-endian. They are written three ways: format 1 with
//! direct addresses, format 1 with a MIDAW list scattering the 8 bytes over two pages, and
//! format 0 — the latter two are refused by the kernel's vfio-ccw alone.
//!
//! Every check prints one `RESULT ok <name> ...` or `RESULT FAIL <name> ...` line.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;

use super::{MdevError, MdevSubchannel};
use crate::ccw::{command, Ccw0, Ccw1, CcwFlags, Midaw, MidawFlags};
use crate::driver::regions::{
    CcwCmdRegion, CcwIoRegion, VFIO_CCW_ASYNC_CMD_CSCH, VFIO_CCW_ASYNC_CMD_HSCH,
};
use crate::driver::{
    DeviceConfig, DeviceError, IrqIndex, IrqLatch, IrqNotify, IrqSet, Subchannel, SubchannelEvents,
    VfioCcwDevice, ASYNC_REGION_INDEX, IO_REGION_INDEX, SCHIB_REGION_INDEX,
};
use crate::iommu_store::{Backing, IommuStore, Perm, StoreConfig, StoreError};
use crate::orb::{dstat, fctl, Crw, Irb, Orb, OrbControls, Schib, Scsw, ScswFlags, SCHIB_SIZE};

/// Virtio-ccw READ_CONF command code.
pub const VIRTIO_READ_CONF: u8 = 0x22;
/// First guest-physical address of the probe's guest memory.
pub const GUEST_BASE: u64 = 0x1_0000;
/// Size of the probe's guest memory.
pub const GUEST_SIZE: u64 = 0x1_0000;
/// How long to wait for one interrupt.
pub const IRQ_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest program variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Format 1, direct addresses: SENSE ID (32 bytes) chained to READ_CONF (8 bytes).
    Basic,
    /// Format 1, READ_CONF through a MIDAW list: 4 bytes at the end of one page, 4 at the
    /// start of a non-adjacent one.
    Midaw,
    /// Format 0: SENSE ID chained to READ_CONF.
    Format0,
    /// Format 1, SENSE ID (7 bytes) through a guest format-2 IDAL scattering them over two
    /// non-adjacent pages (4 + 3 bytes): a diagnostic of the channel's IDAW handling.
    Ida,
}

/// Where each variant's CCWs and data are (guest-physical).
pub mod layout {
    /// Basic: the CCWs.
    pub const BASIC_CCWS: u64 = 0x1_0000;
    /// Basic: SENSE ID data.
    pub const BASIC_ID: u64 = 0x1_1000;
    /// Basic: READ_CONF data.
    pub const BASIC_CONF: u64 = 0x1_2000;
    /// MIDAW: the CCW.
    pub const MIDAW_CCW: u64 = 0x1_0100;
    /// MIDAW: the MIDAW list (quadword aligned).
    pub const MIDAW_LIST: u64 = 0x1_0200;
    /// MIDAW: first piece (4 bytes).
    pub const MIDAW_PIECE1: u64 = 0x1_4100;
    /// MIDAW: second piece (the next 4 bytes, same page: see `docs/kernel-backend.md` for
    /// why the pieces do not straddle pages on QEMU 7.2).
    pub const MIDAW_PIECE2: u64 = 0x1_4104;
    /// Scattered IDAL: first piece (last 4 bytes of a page).
    pub const SCATTER1: u64 = 0x1_3FFC;
    /// Scattered IDAL: second piece (first bytes of a page two pages on).
    pub const SCATTER2: u64 = 0x1_5000;
    /// IDA: the CCW.
    pub const IDA_CCW: u64 = 0x1_0180;
    /// IDA: the format-2 IDAL.
    pub const IDA_LIST: u64 = 0x1_0300;
    /// Format 0: the CCWs.
    pub const FMT0_CCWS: u64 = 0x1_0400;
    /// Format 0: SENSE ID data.
    pub const FMT0_ID: u64 = 0x1_6000;
    /// Format 0: READ_CONF data.
    pub const FMT0_CONF: u64 = 0x1_6100;
}

/// Why a probe step failed.
#[derive(Debug, Error)]
pub enum ProbeError {
    /// Opening or driving the mdev.
    #[error(transparent)]
    Mdev(#[from] MdevError),
    /// The store refused a map, read or write.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The vccw device refused a request (errno in the error).
    #[error("device: {0} (errno {errno})", errno = .0.errno())]
    Device(DeviceError),
    /// No interrupt within [`IRQ_TIMEOUT`] (ETIMEDOUT).
    #[error("no interrupt within {0:?}")]
    Timeout(Duration),
    /// A system call of the probe itself.
    #[error("{0}")]
    Sys(#[from] nix::errno::Errno),
}

impl From<DeviceError> for ProbeError {
    fn from(e: DeviceError) -> Self {
        ProbeError::Device(e)
    }
}

fn ccw1(cmd: u8, flags: CcwFlags, count: u16, cda: u64) -> [u8; 8] {
    Ccw1 {
        cmd,
        flags,
        count,
        cda: cda as u32,
    }
    .to_bytes()
}

/// Writes every variant's CCWs (and the MIDAW list) into `store`, and zeroes the data areas.
pub fn load_programs(store: &IommuStore) -> Result<(), StoreError> {
    use layout::*;
    let cc_sli = CcwFlags::new().with_cc(true).with_sli(true);
    let sli = CcwFlags::new().with_sli(true);
    store.write(BASIC_CCWS, &ccw1(command::SENSE_ID, cc_sli, 32, BASIC_ID))?;
    store.write(BASIC_CCWS + 8, &ccw1(VIRTIO_READ_CONF, sli, 8, BASIC_CONF))?;
    let mida = CcwFlags::new().with_sli(true).with_mida(true);
    store.write(MIDAW_CCW, &ccw1(VIRTIO_READ_CONF, mida, 8, MIDAW_LIST))?;
    let m1 = Midaw {
        count: 4,
        data: MIDAW_PIECE1,
        ..Default::default()
    };
    let m2 = Midaw {
        flags: MidawFlags::new().with_last(true),
        count: 4,
        data: MIDAW_PIECE2,
        ..Default::default()
    };
    store.write(MIDAW_LIST, &m1.to_bytes())?;
    store.write(MIDAW_LIST + 16, &m2.to_bytes())?;
    let ida = CcwFlags::new().with_sli(true).with_ida(true);
    store.write(IDA_CCW, &ccw1(command::SENSE_ID, ida, 7, IDA_LIST))?;
    store.write(IDA_LIST, &SCATTER1.to_be_bytes())?;
    store.write(IDA_LIST + 8, &SCATTER2.to_be_bytes())?;
    let c0 = |cmd, flags, count, cda: u64| {
        Ccw0 {
            cmd,
            cda: cda as u32,
            flags,
            count,
        }
        .to_bytes()
    };
    store.write(FMT0_CCWS, &c0(command::SENSE_ID, cc_sli, 32, FMT0_ID))?;
    store.write(FMT0_CCWS + 8, &c0(VIRTIO_READ_CONF, sli, 8, FMT0_CONF))?;
    clear_data(store)
}

/// Zeroes the data areas (so a result cannot be left over from an earlier run).
pub fn clear_data(store: &IommuStore) -> Result<(), StoreError> {
    use layout::*;
    for (a, n) in [
        (BASIC_ID, 32),
        (BASIC_CONF, 8),
        (MIDAW_PIECE1, 4),
        (MIDAW_PIECE2, 4),
        (SCATTER1, 4),
        (SCATTER2, 4),
        (FMT0_ID, 32),
        (FMT0_CONF, 8),
    ] {
        store.write(a, &vec![0u8; n])?;
    }
    Ok(())
}

/// The guest ORB of a variant: format per variant, prefetch, all paths, MIDAW control for
/// the MIDAW variant.
pub fn orb(v: Variant) -> Orb {
    let base = OrbControls::new().with_prefetch(true).with_lpm(0xff);
    let (ctl, cpa) = match v {
        Variant::Basic => (base.with_format1(true), layout::BASIC_CCWS),
        Variant::Midaw => (base.with_format1(true).with_midaw(true), layout::MIDAW_CCW),
        Variant::Format0 => (base, layout::FMT0_CCWS),
        Variant::Ida => (
            base.with_format1(true).with_format2_idaw(true),
            layout::IDA_CCW,
        ),
    };
    Orb {
        intparm: 0x7663_6377, // "vccw"
        ctl,
        cpa: cpa as u32,
    }
}

/// What a variant's data areas hold after it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readout {
    /// SENSE ID bytes 0-6 (0xFF, CU type, CU model, device type, device model); None for
    /// the MIDAW variant, which reads only the configuration.
    pub sense_id: Option<[u8; 7]>,
    /// The first 8 configuration bytes as a big-endian u64.
    pub conf: u64,
}

impl Readout {
    /// `"3832/02"`: control-unit type and model, when SENSE ID ran and is well formed.
    pub fn cu(&self) -> Option<String> {
        let id = self.sense_id?;
        (id[0] == 0xFF).then(|| format!("{:02x}{:02x}/{:02x}", id[1], id[2], id[3]))
    }
}

/// Reads a variant's results from guest memory.
pub fn readout(store: &IommuStore, v: Variant) -> Result<Readout, StoreError> {
    use layout::*;
    let mut conf = [0u8; 8];
    let mut id = [0u8; 7];
    let sense_id = match v {
        Variant::Basic => {
            store.read(BASIC_ID, &mut id)?;
            store.read(BASIC_CONF, &mut conf)?;
            Some(id)
        }
        Variant::Midaw => {
            store.read(MIDAW_PIECE1, &mut conf[..4])?;
            store.read(MIDAW_PIECE2, &mut conf[4..])?;
            None
        }
        Variant::Ida => {
            store.read(SCATTER1, &mut id[..4])?;
            store.read(SCATTER2, &mut id[4..])?;
            Some(id)
        }
        Variant::Format0 => {
            store.read(FMT0_ID, &mut id)?;
            store.read(FMT0_CONF, &mut conf)?;
            Some(id)
        }
    };
    Ok(Readout {
        sense_id,
        conf: u64::from_be_bytes(conf),
    })
}

/// A store holding the probe's guest memory with the programs loaded.
pub fn guest_store() -> Result<IommuStore, StoreError> {
    let store = IommuStore::new(StoreConfig::default());
    store.map_dma(GUEST_BASE, GUEST_SIZE, Perm::READ_WRITE, Backing::Anonymous)?;
    load_programs(&store)?;
    Ok(store)
}

/// Consumes the signals of the non-blocking `efd`, waiting up to `timeout` for one.
fn wait_fd(efd: &EventFd, timeout: Duration) -> Result<(), ProbeError> {
    crate::driver::wait_eventfd(efd, timeout, false)
        .map(|_| ())
        .map_err(|e| match e {
            crate::driver::EventfdWaitError::TimedOut => ProbeError::Timeout(timeout),
            crate::driver::EventfdWaitError::Sys(e) => ProbeError::Sys(e),
        })
}

/// Drives a [`VfioCcwDevice`] as a client does: region writes, IO eventfd, IRB reads.
pub struct DeviceRunner {
    /// The device.
    pub dev: VfioCcwDevice,
    wake: Wake,
}

/// How a [`DeviceRunner`] learns of an IO interrupt.
enum Wake {
    /// The IO eventfd, as a client in another process (a VMM over vfio-user) does.
    Eventfd(EventFd),
    /// An in-process [`IrqLatch`] (no system call when the interrupt came before the wait).
    Latch(Arc<IrqLatch>),
}

impl DeviceRunner {
    /// Opens a device over `backend` and `store` and installs its IO eventfd.
    pub fn new(backend: Arc<dyn Subchannel>, store: IommuStore) -> Result<Self, ProbeError> {
        let dev = VfioCcwDevice::new(backend, store, DeviceConfig::default());
        dev.open()?;
        let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        // dup(), not F_DUPFD_CLOEXEC: qemu-user mistranslates eventfds cloned that way.
        let fd = nix::unistd::dup(efd.as_fd())?;
        dev.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(fd)))?;
        Ok(DeviceRunner {
            dev,
            wake: Wake::Eventfd(efd),
        })
    }

    /// Opens a device over `backend` and `store` whose IO interrupt is an in-process
    /// [`IrqLatch`] instead of an eventfd (an embedding in the same process).
    pub fn with_latch(backend: Arc<dyn Subchannel>, store: IommuStore) -> Result<Self, ProbeError> {
        let dev = VfioCcwDevice::new(backend, store, DeviceConfig::default());
        dev.open()?;
        let latch = Arc::new(IrqLatch::default());
        dev.set_irq_notify(IrqIndex::Io, Some(latch.clone()));
        Ok(DeviceRunner {
            dev,
            wake: Wake::Latch(latch),
        })
    }

    fn wait_irb(&self) -> Result<Irb, ProbeError> {
        match &self.wake {
            Wake::Eventfd(efd) => wait_fd(efd, IRQ_TIMEOUT)?,
            Wake::Latch(l) => {
                l.wait(IRQ_TIMEOUT)
                    .ok_or(ProbeError::Timeout(IRQ_TIMEOUT))?;
            }
        }
        let mut b = [0u8; crate::driver::regions::CCW_IO_REGION_SIZE];
        self.dev.read_region(IO_REGION_INDEX, 0, &mut b)?;
        Ok(CcwIoRegion::from_bytes(&b).irb())
    }

    /// SSCH with `orb` through the I/O region, then the interrupt's IRB.
    pub fn run(&self, orb: &Orb) -> Result<Irb, ProbeError> {
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(fctl::START),
            ..Default::default()
        };
        let req = CcwIoRegion::request(orb, &scsw).to_bytes();
        self.dev.write_region(IO_REGION_INDEX, 0, &req)?;
        self.wait_irb()
    }

    /// HSCH or CSCH through the async region, then the interrupt's IRB.
    pub fn async_cmd(&self, command: u32) -> Result<Irb, ProbeError> {
        let req = CcwCmdRegion {
            command,
            ret_code: 0,
        };
        self.dev
            .write_region(ASYNC_REGION_INDEX, 0, &req.to_bytes())?;
        self.wait_irb()
    }

    /// Reads the SCHIB region (a fresh STSCH).
    pub fn schib(&self) -> Result<Schib, ProbeError> {
        let mut b = [0u8; SCHIB_SIZE];
        self.dev.read_region(SCHIB_REGION_INDEX, 0, &mut b)?;
        Ok(Schib::from_bytes(&b))
    }
}

/// Collects interrupts of the pass-through baseline (no vccw device in between). It wakes
/// its waiter through an [`IrqLatch`], as a latch-mode [`DeviceRunner`] is woken, so both
/// sides of `vccw mdev bench` are told of an interrupt the same way.
#[derive(Default)]
pub struct Sink {
    irbs: Mutex<VecDeque<Irb>>,
    latch: IrqLatch,
}

impl SubchannelEvents for Sink {
    fn interrupt(&self, irb: Irb) {
        self.irbs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(irb);
        self.latch.notify(IrqIndex::Io);
    }

    fn path_event(&self, _crw: Crw) {}
}

impl Sink {
    /// Waits for the next interrupt.
    pub fn wait(&self, timeout: Duration) -> Result<Irb, ProbeError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(irb) = self
                .irbs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()
            {
                return Ok(irb);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.latch.wait(left).is_none() {
                return Err(ProbeError::Timeout(timeout));
            }
        }
    }
}

/// Whether a start ended cleanly: channel end + device end, no subchannel status.
pub fn clean(irb: &Irb) -> bool {
    irb.scsw.dstat == dstat::CHANNEL_END | dstat::DEVICE_END && irb.scsw.cstat == 0
}

fn status(irb: &Irb) -> String {
    format!(
        "dstat={:#04x} cstat={:#04x} fctl={:#x} stctl={:#04x} cpa={:#x}",
        irb.scsw.dstat,
        irb.scsw.cstat,
        irb.scsw.flags.fctl(),
        irb.scsw.flags.stctl(),
        irb.scsw.cpa
    )
}

/// Prints and counts RESULT lines.
#[derive(Debug, Default)]
pub struct Report {
    /// Failed checks.
    pub failed: u32,
}

impl Report {
    /// `RESULT ok name detail` or `RESULT FAIL name detail`.
    pub fn check(&mut self, ok: bool, name: &str, detail: &str) {
        println!("RESULT {} {name} {detail}", if ok { "ok" } else { "FAIL" });
        if !ok {
            self.failed += 1;
        }
    }

    /// A failed step (its error).
    pub fn fail(&mut self, name: &str, e: &dyn std::fmt::Display) {
        self.check(false, name, &format!("error: {e}"));
    }
}

/// The bytes around the two scattered pieces (diagnostics).
fn pieces(store: &IommuStore) -> String {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    let _ = store.read(layout::SCATTER1 - 4, &mut a);
    let _ = store.read(layout::SCATTER2, &mut b);
    format!("around-piece1={a:02x?} piece2={b:02x?}")
}

/// Runs `v` through the vccw device and checks it; the scattered variants must read the
/// configuration the basic one read (`want`).
pub fn check_variant(
    r: &mut Report,
    run: &DeviceRunner,
    store: &IommuStore,
    v: Variant,
    want: Option<u64>,
) -> Option<u64> {
    let name = match v {
        Variant::Basic => "sense-id",
        Variant::Midaw => "midaw",
        Variant::Format0 => "format0",
        Variant::Ida => "ida",
    };
    let res = clear_data(store)
        .map_err(ProbeError::from)
        .and_then(|_| run.run(&orb(v)))
        .and_then(|irb| Ok((irb, readout(store, v)?)));
    match res {
        Err(e) => {
            r.fail(name, &e);
            None
        }
        Ok((irb, out)) => {
            let st = status(&irb);
            let same = want.is_none_or(|w| w == out.conf);
            match v {
                Variant::Basic => {
                    let cu = out.cu();
                    r.check(
                        clean(&irb) && cu.is_some(),
                        "sense-id",
                        &format!("cu={} {st}", cu.unwrap_or_else(|| "?".into())),
                    );
                    r.check(clean(&irb), "read-conf", &format!("capacity={}", out.conf));
                }
                Variant::Midaw => r.check(
                    clean(&irb) && same,
                    name,
                    &format!("capacity={} (2 MIDAWs) {st}", out.conf),
                ),
                // Informational: QEMU 7.2's channel does not advance its buffer across
                // IDAWs, so a correct result is not required here.
                Variant::Ida => println!(
                    "RESULT info scattered-ida sense-id={:02x?} {st} {}",
                    out.sense_id.unwrap_or_default(),
                    pieces(store)
                ),
                Variant::Format0 => {
                    let cu = out.cu();
                    r.check(
                        clean(&irb) && cu.is_some() && same,
                        "format0",
                        &format!(
                            "cu={} capacity={} {st}",
                            cu.unwrap_or_else(|| "?".into()),
                            out.conf
                        ),
                    );
                }
            }
            Some(out.conf)
        }
    }
}

/// The vccw path of `vccw mdev probe` over any backend: the four variants, HSCH, CSCH and
/// a SCHIB read. With `same_conf`, the other variants must read the configuration the basic
/// one read (a real device; not a test device producing fresh bytes per read).
pub fn probe_device(backend: Arc<dyn Subchannel>, store: &IommuStore, same_conf: bool) -> Report {
    let mut r = Report::default();
    let run = match DeviceRunner::new(backend, store.clone()) {
        Ok(x) => x,
        Err(e) => {
            r.fail("device", &e);
            return r;
        }
    };
    let want = check_variant(&mut r, &run, store, Variant::Basic, None).filter(|_| same_conf);
    for v in [Variant::Midaw, Variant::Ida, Variant::Format0] {
        check_variant(&mut r, &run, store, v, want);
    }
    for (name, cmd, f) in [
        ("hsch", VFIO_CCW_ASYNC_CMD_HSCH, fctl::HALT),
        ("csch", VFIO_CCW_ASYNC_CMD_CSCH, fctl::CLEAR),
    ] {
        match run.async_cmd(cmd) {
            Ok(irb) => r.check(irb.scsw.flags.fctl() & f != 0, name, &status(&irb)),
            Err(e) => r.fail(name, &e),
        }
    }
    match run.schib() {
        Ok(s) => r.check(
            s.pmcw.flags.devno_valid(),
            "schib",
            &format!(
                "devno={:04x} pim={:#04x} pam={:#04x} pom={:#04x} chpid0={:#04x} enabled={}",
                s.pmcw.devno,
                s.pmcw.pim,
                s.pmcw.pam,
                s.pmcw.pom,
                s.pmcw.chpid[0],
                s.pmcw.flags.enabled()
            ),
        ),
        Err(e) => r.fail("schib", &e),
    }
    r
}

/// `vccw mdev probe --uuid UUID`: the real vccw path on the mdev.
pub fn probe(uuid: &str) -> Report {
    let mut r = Report::default();
    let mdev = match MdevSubchannel::open(uuid) {
        Ok(m) => m,
        Err(e) => {
            r.fail("open", &e);
            return r;
        }
    };
    let i = mdev.info();
    r.check(
        true,
        "open",
        &format!(
            "group={} flags={:#x} regions={} irqs={} async={} schib={} crw={} crw_irq={} req_irq={}",
            i.group,
            i.device.flags,
            i.device.num_regions,
            i.device.num_irqs,
            i.regions.async_cmd.is_some(),
            i.regions.schib.is_some(),
            i.regions.crw.is_some(),
            i.crw_irq,
            i.req_irq
        ),
    );
    let store = match guest_store() {
        Ok(s) => s,
        Err(e) => {
            r.fail("store", &e);
            return r;
        }
    };
    mdev.attach_store(store.clone());
    let sub = probe_device(mdev.clone(), &store, true);
    r.failed += sub.failed;
    if mdev.last_kernel_errno() != 0 {
        println!(
            "note: the kernel refused a translated program (errno {})",
            mdev.last_kernel_errno()
        );
    }
    r
}

/// Runs `v` untranslated on `mdev` (guest memory already mapped at IOVA = guest physical).
pub fn run_passthrough(mdev: &MdevSubchannel, sink: &Sink, v: Variant) -> Result<Irb, ProbeError> {
    mdev.start_raw(&orb(v))?;
    sink.wait(IRQ_TIMEOUT)
}

fn open_passthrough(
    uuid: &str,
) -> Result<(Arc<MdevSubchannel>, Arc<Sink>, IommuStore), ProbeError> {
    let mdev = MdevSubchannel::open(uuid)?;
    let store = guest_store()?;
    mdev.map_passthrough(&store)?;
    let sink = Arc::new(Sink::default());
    let w: Weak<dyn SubchannelEvents> = Arc::downgrade(&sink) as Weak<Sink>;
    mdev.set_events(w);
    Ok((mdev, sink, store))
}

/// `vccw mdev probe --uuid UUID --passthrough`: the guest programs untranslated (IOVA =
/// guest physical), as QEMU passes them; the MIDAW and format-0 variants show what the
/// kernel alone does with them.
pub fn probe_passthrough(uuid: &str) -> Report {
    let mut r = Report::default();
    let (mdev, sink, store) = match open_passthrough(uuid) {
        Ok(x) => x,
        Err(e) => {
            r.fail("passthrough", &e);
            return r;
        }
    };
    match run_passthrough(&mdev, &sink, Variant::Basic)
        .and_then(|irb| Ok((irb, readout(&store, Variant::Basic)?)))
    {
        Ok((irb, out)) => r.check(
            clean(&irb) && out.cu().is_some(),
            "passthrough",
            &format!(
                "cu={} capacity={} {}",
                out.cu().unwrap_or_else(|| "?".into()),
                out.conf,
                status(&irb)
            ),
        ),
        Err(e) => r.fail("passthrough", &e),
    }
    for (name, v) in [
        ("midaw", Variant::Midaw),
        ("ida", Variant::Ida),
        ("format0", Variant::Format0),
    ] {
        let _ = clear_data(&store);
        let what = match run_passthrough(&mdev, &sink, v) {
            Ok(irb) => {
                let o = readout(&store, v).ok();
                format!(
                    "{} conf={:#x} sense-id={:02x?} {}",
                    status(&irb),
                    o.map_or(0, |o| o.conf),
                    o.and_then(|o| o.sense_id).unwrap_or_default(),
                    pieces(&store)
                )
            }
            Err(e) => format!("refused: {e}"),
        };
        println!("RESULT info passthrough-{name} {what}");
    }
    r
}

/// One round trip split at the backend's [`IoStamps`](super::IoStamps) (ns).
#[derive(Debug, Clone, Copy, Default)]
struct Split {
    total: u64,
    /// Caller -> backend START: vccw's device, store and translator (pass-through: ~0).
    pre: u64,
    /// START -> the region write issued: vccw's container mapping check and arena copy.
    prep: u64,
    /// Issued -> the kernel accepted the region write: the kernel's own translation and SSCH.
    kernel: u64,
    /// Region write accepted -> the interrupt thread woke: the channel, the device, the
    /// kernel's interrupt path and the wake-up.
    device: u64,
    /// Woke -> delivered: the I/O region read and the listener (vccw: the device's
    /// interrupt handling, unpinning, the IO eventfd write).
    handle: u64,
    /// Delivered -> the caller has the IRB: its wake-up (eventfd or condvar) and, for vccw,
    /// the region read.
    wake: u64,
}

impl Split {
    fn new(t0: u64, t1: u64, s: super::IoStamps) -> Self {
        // Clamp the stamps into [t0, t1] in order: an interrupt may be seen before the
        // region write returns.
        let start = s.start.clamp(t0, t1);
        let issued = s.issued.clamp(start, t1);
        let written = s.written.clamp(issued, t1);
        let irq = s.irq.clamp(start, t1);
        let delivered = s.delivered.clamp(irq, t1);
        Split {
            total: t1 - t0,
            pre: start - t0,
            prep: issued - start,
            kernel: written - issued,
            device: irq.saturating_sub(written),
            handle: delivered - irq,
            wake: t1 - delivered,
        }
    }
}

fn median_ns(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The median of each part of `runs`, formatted in microseconds.
fn split_medians(runs: &[Split]) -> (f64, String) {
    let col = |f: fn(&Split) -> u64| {
        let mut v: Vec<u64> = runs.iter().map(f).collect();
        median_ns(&mut v) as f64 / 1e3
    };
    let total = col(|s| s.total);
    let parts = format!(
        "pre={:.1} prep={:.1} kernel={:.1} device={:.1} handle={:.1} wake={:.1}",
        col(|s| s.pre),
        col(|s| s.prep),
        col(|s| s.kernel),
        col(|s| s.device),
        col(|s| s.handle),
        col(|s| s.wake)
    );
    (total, parts)
}

/// `vccw mdev bench --uuid UUID --count N`: the basic program N times through each of four
/// paths, **interleaved** on one open mdev (so every path sees the same host load), with the
/// median of each and of each part of the round trip (see `Split`):
///
/// * `vccw`: vccw's device, store and translator, direct CCWs on, the caller told of the
///   interrupt through an in-process [`IrqLatch`];
/// * `vccw-ida`: the same with every data CCW left IDA (direct CCWs off);
/// * `vccw-eventfd`: the same as `vccw` with the caller told through the IO eventfd, as a
///   client in another process is;
/// * `passthrough`: the baseline, untranslated (IOVA = guest physical), told through an
///   [`IrqLatch`] too.
///
/// The ratio `vccw / passthrough` is the goal's; the others are printed beside it. vccw's
/// store is mapped at IOVA = process address (and, for direct CCWs, a window at guest
/// physical), the baseline's own copy of the guest memory at IOVA = guest physical: both
/// fit in one container. The backend's interrupt listener is switched to the path that
/// starts each I/O.
pub fn bench(uuid: &str, count: usize) -> Report {
    let mut r = Report::default();
    match bench_runs(uuid, count.max(1)) {
        Ok(runs) => {
            let (b, pa) = split_medians(&runs.passthrough);
            let b = b.max(1e-9);
            let (a, va) = split_medians(&runs.vccw);
            for (name, series) in [
                ("vccw-ida", &runs.vccw_ida),
                ("vccw-eventfd", &runs.vccw_eventfd),
            ] {
                let (m, parts) = split_medians(series);
                println!(
                    "RESULT info bench-{name} median_us={m:.1} ratio={:.3} parts_us: {parts}",
                    m / b
                );
            }
            println!("RESULT info bench-vccw parts_us: {va}");
            println!("RESULT info bench-passthrough parts_us: {pa}");
            let ratio = a / b;
            r.check(
                true,
                "bench",
                &format!(
                    "count={} vccw_median_us={a:.1} passthrough_median_us={b:.1} ratio={ratio:.3} goal<=1.3:{}",
                    runs.vccw.len(),
                    if ratio <= 1.3 { "met" } else { "missed" }
                ),
            );
        }
        Err(e) => r.fail("bench", &e),
    }
    r
}

/// The interleaved series of [`bench`].
struct BenchRuns {
    vccw: Vec<Split>,
    vccw_ida: Vec<Split>,
    vccw_eventfd: Vec<Split>,
    passthrough: Vec<Split>,
}

fn bench_runs(uuid: &str, count: usize) -> Result<BenchRuns, ProbeError> {
    let warm = 3;
    let mdev = MdevSubchannel::open(uuid)?;
    let store = guest_store()?;
    mdev.attach_store(store.clone());
    let pt_store = guest_store()?;
    mdev.map_passthrough(&pt_store)?;
    let nodev = || ProbeError::Sys(nix::errno::Errno::ENODEV);
    // Two devices on the one subchannel, each the listener while it runs an I/O.
    let by_fd = DeviceRunner::new(mdev.clone(), store.clone())?;
    let by_fd_events = mdev.events().ok_or_else(nodev)?;
    let by_latch = DeviceRunner::with_latch(mdev.clone(), store)?;
    let by_latch_events = mdev.events().ok_or_else(nodev)?;
    let sink = Arc::new(Sink::default());
    let sink_events: Weak<dyn SubchannelEvents> = Arc::downgrade(&sink) as Weak<Sink>;
    mdev.set_stamps(true);
    let o = orb(Variant::Basic);
    let timed = |f: &dyn Fn() -> Result<Irb, ProbeError>| -> Result<Split, ProbeError> {
        let t0 = mdev.now_ns();
        let irb = f();
        let t1 = mdev.now_ns();
        if !clean(&irb?) {
            return Err(ProbeError::Sys(nix::errno::Errno::EIO));
        }
        Ok(Split::new(t0, t1, mdev.stamps()))
    };
    let one = |path: usize| -> Result<Split, ProbeError> {
        match path {
            0 | 1 => {
                mdev.set_events(by_latch_events.clone());
                mdev.set_direct_ccws(path == 0);
                timed(&|| by_latch.run(&o))
            }
            2 => {
                mdev.set_events(by_fd_events.clone());
                mdev.set_direct_ccws(true);
                timed(&|| by_fd.run(&o))
            }
            _ => {
                mdev.set_events(sink_events.clone());
                timed(&|| run_passthrough(&mdev, &sink, Variant::Basic))
            }
        }
    };
    let mut runs = BenchRuns {
        vccw: Vec::with_capacity(count),
        vccw_ida: Vec::with_capacity(count),
        vccw_eventfd: Vec::with_capacity(count),
        passthrough: Vec::with_capacity(count),
    };
    for i in 0..count + warm {
        // Rotate the order, so no path always follows the same other path.
        let mut got = [Split::default(); 4];
        for k in 0..4 {
            let path = (i + k) % 4;
            got[path] = one(path)?;
        }
        if i >= warm {
            runs.vccw.push(got[0]);
            runs.vccw_ida.push(got[1]);
            runs.vccw_eventfd.push(got[2]);
            runs.passthrough.push(got[3]);
        }
    }
    mdev.set_stamps(false);
    mdev.set_direct_ccws(true);
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_images() {
        let s = guest_store().unwrap();
        let mut b = [0u8; 16];
        s.read(layout::BASIC_CCWS, &mut b).unwrap();
        // SENSE ID, CC|SLI (0x60), 32 bytes at 0x11000; READ_CONF, SLI, 8 bytes at 0x12000.
        assert_eq!(
            b,
            [0xE4, 0x60, 0, 32, 0, 1, 0x10, 0, 0x22, 0x20, 0, 8, 0, 1, 0x20, 0]
        );
        s.read(layout::FMT0_CCWS, &mut b).unwrap();
        // Format 0: cmd, 24-bit address, flags, zero, count.
        assert_eq!(
            b,
            [0xE4, 0x01, 0x60, 0x00, 0x60, 0, 0, 32, 0x22, 0x01, 0x61, 0x00, 0x20, 0, 0, 8]
        );
        let mut m = [0u8; 40];
        s.read(layout::MIDAW_CCW, &mut m[..8]).unwrap();
        assert_eq!(&m[..8], &[0x22, 0x21, 0, 8, 0, 1, 0x02, 0]);
        s.read(layout::MIDAW_LIST, &mut m[8..40]).unwrap();
        // MIDAW: reserved 5 bytes, flags, count, 64-bit address.
        assert_eq!(
            &m[8..40],
            &[
                0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 1, 0x41, 0x00, //
                0, 0, 0, 0, 0, 0x80, 0, 4, 0, 0, 0, 0, 0, 1, 0x41, 0x04
            ]
        );
        // SENSE ID, IDA|SLI (0x24), 7 bytes, IDAL at 0x10300 = [0x13ffc, 0x15000].
        s.read(layout::IDA_CCW, &mut m[..8]).unwrap();
        assert_eq!(&m[..8], &[0xE4, 0x24, 0, 7, 0, 1, 0x03, 0]);
        s.read(layout::IDA_LIST, &mut m[..16]).unwrap();
        assert_eq!(
            &m[..16],
            &[0, 0, 0, 0, 0, 1, 0x3F, 0xFC, 0, 0, 0, 0, 0, 1, 0x50, 0]
        );
        // Format 1, format-2 IDAWs (bit 14).
        assert_eq!(orb(Variant::Ida).to_bytes()[4..8], [0x00, 0xC2, 0xFF, 0x00]);
        assert_eq!(
            orb(Variant::Basic).to_bytes()[4..8],
            [0x00, 0xC0, 0xFF, 0x00]
        );
        assert_eq!(
            orb(Variant::Format0).to_bytes()[4..8],
            [0x00, 0x40, 0xFF, 0x00]
        );
        // MIDAW control is bit 25 of word 1.
        assert_eq!(
            orb(Variant::Midaw).to_bytes()[4..8],
            [0x00, 0xC0, 0xFF, 0x40]
        );
    }

    #[test]
    fn readout_reassembles_midaw_pieces() {
        let s = guest_store().unwrap();
        s.write(layout::MIDAW_PIECE1, &[0, 0, 0, 0]).unwrap();
        s.write(layout::MIDAW_PIECE2, &[0, 0, 0x80, 0]).unwrap();
        let r = readout(&s, Variant::Midaw).unwrap();
        assert_eq!(r.conf, 32768);
        assert_eq!(r.cu(), None);
        s.write(layout::BASIC_ID, &[0xFF, 0x38, 0x32, 0x02])
            .unwrap();
        assert_eq!(
            readout(&s, Variant::Basic).unwrap().cu().as_deref(),
            Some("3832/02")
        );
        assert_eq!(median_ns(&mut [3, 1, 2]), 2);
        assert_eq!(median_ns(&mut []), 0);
    }

    /// The parts of a round trip add up to its total, and stamps out of order (an interrupt
    /// seen before the region write returned) or missing are clamped, never negative.
    #[test]
    fn split_parts_add_up() {
        let s = |start, written, irq, delivered| crate::mdev::IoStamps {
            start,
            issued: start + 10,
            written,
            irq,
            delivered,
        };
        let p = Split::new(100, 1000, s(150, 400, 700, 800));
        assert_eq!(
            (p.total, p.pre, p.prep, p.kernel, p.device, p.handle, p.wake),
            (900, 50, 10, 240, 300, 100, 200)
        );
        // Interrupt before the write returned: no device time, handle from the irq.
        let p = Split::new(100, 1000, s(150, 600, 500, 800));
        assert_eq!((p.kernel, p.device, p.handle, p.wake), (440, 0, 300, 200));
        // Stale stamps from an earlier I/O are clamped into the window.
        let p = Split::new(100, 1000, s(10, 20, 30, 40));
        assert_eq!((p.total, p.pre, p.wake), (900, 0, 900));
        let (total, parts) = split_medians(&[p, Split::new(0, 2000, s(0, 0, 0, 0))]);
        assert!(total > 0.0 && parts.starts_with("pre="), "{parts}");
    }

    /// The vccw half of the probe, end to end on the emulated channel: the MIDAW and
    /// format-0 variants run translated, HSCH/CSCH interrupt, the SCHIB reads.
    #[test]
    fn probe_device_on_emulated_subchannel() {
        use crate::css::device::DeviceIdentity;
        use crate::css::subchannel::{EmulatedSubchannel, SubchannelConfig};
        use crate::css::testdev::LoopbackDevice;
        let mut dev = LoopbackDevice::new();
        dev.identity = DeviceIdentity {
            cu_type: 0x3832,
            cu_model: 2,
            dev_type: 0,
            dev_model: 0,
        };
        let cfg = SubchannelConfig {
            devno: 5,
            ..Default::default()
        };
        let sub = Arc::new(EmulatedSubchannel::new(Box::new(dev.clone()), cfg).unwrap());
        let store = guest_store().unwrap();
        let r = probe_device(sub, &store, false);
        assert_eq!(r.failed, 0);
        // The loopback device fills reads with a running pattern: a MIDAW run stores 8
        // bytes at the two pieces and nothing around them.
        let sub = Arc::new(EmulatedSubchannel::new(Box::new(dev), cfg).unwrap());
        let run = DeviceRunner::new(sub, store.clone()).unwrap();
        clear_data(&store).unwrap();
        assert!(clean(&run.run(&orb(Variant::Midaw)).unwrap()));
        let mut a = [0u8; 12];
        store.read(layout::MIDAW_PIECE1 - 2, &mut a).unwrap();
        assert_eq!((&a[..2], &a[10..]), (&[0u8, 0][..], &[0u8, 0][..]));
        assert_ne!(a[2..6], [0; 4]);
        assert_ne!(a[6..10], [0; 4]);
        // The scattered IDAL: SENSE ID's 7 bytes land 4 + 3 in two non-adjacent pages.
        clear_data(&store).unwrap();
        assert!(clean(&run.run(&orb(Variant::Ida)).unwrap()));
        let id = readout(&store, Variant::Ida).unwrap();
        assert_eq!(id.cu().as_deref(), Some("3832/02"));
        let mut next = [0u8; 1];
        store.read(layout::SCATTER2 + 3, &mut next).unwrap();
        assert_eq!(next, [0]);
    }
}
