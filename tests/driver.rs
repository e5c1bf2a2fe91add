//! The vfio-ccw device end to end over a fake subchannel: every reachable FSM cell, every
//! region's bounds and results, SET_IRQS, interrupts, HSCH/CSCH, CRWs, reset on unmap, and
//! errors_as_status.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use vccw::ccw::{Ccw1, CcwFlags, HostProgram};
use vccw::driver::irq::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
};
use vccw::driver::regions::{CcwIoRegion, VFIO_CCW_ASYNC_CMD_CSCH, VFIO_CCW_ASYNC_CMD_HSCH};
use vccw::driver::{
    DeviceConfig, DeviceError, IrqIndex, IrqSet, IrqSetData, RegionType, State, Subchannel,
    SubchannelEvents, VfioCcwDevice, ASYNC_REGION_INDEX, CRW_REGION_INDEX, IO_REGION_INDEX,
    SCHIB_REGION_INDEX,
};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig, UnmapListener};
use vccw::orb::{
    actl, cstat, dstat, fctl, stctl, Crw, Irb, Orb, OrbControls, Pmcw, Schib, Scsw, ScswFlags,
};

const PROG: u32 = 0x10000;
const DATA: u32 = 0x20000;

// ---------------------------------------------------------------------------------------
// The fake subchannel: completes a started program from its own thread after a delay.

#[derive(Default)]
struct Fake {
    me: Weak<Fake>,
    events: Mutex<Option<Weak<dyn SubchannelEvents>>>,
    current: Mutex<Option<Arc<HostProgram>>>,
    start_cc: AtomicU8,
    halt_cc: AtomicU8,
    clear_cc: AtomicU8,
    starts: AtomicUsize,
    halts: AtomicUsize,
    clears: AtomicUsize,
    /// Complete started programs on their own (else only halt/clear end them).
    auto_complete: AtomicBool,
    /// Clear delivers no interrupt (a subchannel that never quiesces).
    mute_clear: AtomicBool,
    schib_fails: AtomicBool,
    /// How long start() takes (to hold the device busy).
    start_delay_ms: AtomicUsize,
    pim: AtomicU8,
    /// Present this many interrupts inside start() itself, on the caller's thread (a
    /// program run inline): PCI intermediate ones, then the final one.
    inline_irbs: AtomicU8,
}

impl Fake {
    fn new() -> Arc<Fake> {
        let f = Arc::new_cyclic(|me| Fake {
            me: me.clone(),
            ..Default::default()
        });
        f.auto_complete.store(true, Ordering::SeqCst);
        f.pim.store(0x80, Ordering::SeqCst);
        f
    }

    fn deliver(&self, irb: Irb) {
        let ev = self
            .events
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|w| w.upgrade());
        if let Some(ev) = ev {
            ev.interrupt(irb);
        }
    }

    fn path(&self, crw: Crw) {
        let ev = self
            .events
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|w| w.upgrade());
        ev.expect("device registered").path_event(crw);
    }

    /// Ends the running program (if any) with `f` and `dstat`, from another thread.
    fn end_later(&self, func: u8, ms: u64, take: bool) {
        let me = self.me.upgrade().unwrap();
        let prog = if take {
            me.current.lock().unwrap().take()
        } else {
            None
        };
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(ms));
            let prog = prog.or_else(|| me.current.lock().unwrap().take());
            let cpa = prog.as_ref().map(|p| p.orb().cpa + 8).unwrap_or(0);
            // The backend lets go of the program before the final interrupt.
            drop(prog);
            let st = if func == fctl::CLEAR {
                stctl::STATUS_PENDING
            } else {
                stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
            };
            let scsw = Scsw {
                flags: ScswFlags::new()
                    .with_format1(true)
                    .with_fctl(func)
                    .with_stctl(st),
                cpa,
                dstat: if func == fctl::CLEAR {
                    0
                } else {
                    dstat::CHANNEL_END | dstat::DEVICE_END
                },
                cstat: 0,
                count: 0,
            };
            me.deliver(Irb::new(scsw, 0x80));
        });
    }
}

impl Subchannel for Fake {
    fn start(&self, program: Arc<HostProgram>) -> u8 {
        self.starts.fetch_add(1, Ordering::SeqCst);
        let d = self.start_delay_ms.load(Ordering::SeqCst);
        if d > 0 {
            thread::sleep(Duration::from_millis(d as u64));
        }
        let cc = self.start_cc.load(Ordering::SeqCst);
        if cc != 0 {
            return cc;
        }
        let inline = self.inline_irbs.load(Ordering::SeqCst);
        if inline > 0 {
            let cpa = program.orb().cpa + 8;
            drop(program);
            for i in 1..=inline {
                let last = i == inline;
                let scsw = Scsw {
                    flags: ScswFlags::new()
                        .with_format1(true)
                        .with_fctl(fctl::START)
                        .with_actl(if last { 0 } else { actl::SUBCHANNEL_ACTIVE })
                        .with_stctl(if last {
                            stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
                        } else {
                            stctl::INTERMEDIATE | stctl::STATUS_PENDING
                        }),
                    cpa,
                    dstat: if last {
                        dstat::CHANNEL_END | dstat::DEVICE_END
                    } else {
                        0
                    },
                    // Tells the interrupts apart.
                    count: i as u16,
                    cstat: if last { 0 } else { cstat::PCI },
                };
                self.deliver(Irb::new(scsw, 0x80));
            }
            return 0;
        }
        *self.current.lock().unwrap() = Some(program);
        if self.auto_complete.load(Ordering::SeqCst) {
            self.end_later(fctl::START, 30, false);
        }
        0
    }
    fn resume(&self) -> u8 {
        1
    }
    fn halt(&self) -> u8 {
        self.halts.fetch_add(1, Ordering::SeqCst);
        let cc = self.halt_cc.load(Ordering::SeqCst);
        if cc == 0 {
            self.end_later(fctl::START | fctl::HALT, 10, false);
        }
        cc
    }
    fn clear(&self) -> u8 {
        self.clears.fetch_add(1, Ordering::SeqCst);
        let cc = self.clear_cc.load(Ordering::SeqCst);
        if cc == 0 {
            if self.mute_clear.load(Ordering::SeqCst) {
                self.current.lock().unwrap().take();
            } else {
                // Drops the program before returning, delivers the status later.
                self.end_later(fctl::CLEAR, 10, true);
            }
        }
        cc
    }
    fn store_schib(&self) -> Result<Schib, i32> {
        if self.schib_fails.load(Ordering::SeqCst) {
            return Err(libc::ENODEV);
        }
        let pim = self.pim.load(Ordering::SeqCst);
        Ok(Schib {
            pmcw: Pmcw {
                devno: 0x0815,
                pim,
                pam: pim,
                pom: 0xff,
                chpid: [0x42, 0x43, 0, 0, 0, 0, 0, 0],
                ..Default::default()
            },
            ..Default::default()
        })
    }
    fn set_events(&self, events: Weak<dyn SubchannelEvents>) {
        *self.events.lock().unwrap() = Some(events);
    }
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn store() -> IommuStore {
    let s = IommuStore::new(StoreConfig::default());
    s.map_dma(0, 0x10_0000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    // READ 100 bytes into DATA (one page pinned).
    let ccw = Ccw1 {
        cmd: 0x02,
        flags: CcwFlags::new().with_sli(true),
        count: 100,
        cda: DATA,
    };
    s.write(PROG as u64, &ccw.to_bytes()).unwrap();
    s
}

struct Rig {
    fake: Arc<Fake>,
    store: IommuStore,
    dev: VfioCcwDevice,
    io: EventFd,
}

fn rig_with(cfg: DeviceConfig) -> Rig {
    let fake = Fake::new();
    let store = store();
    let dev = VfioCcwDevice::new(fake.clone(), store.clone(), cfg);
    dev.open().unwrap();
    let (io, fd) = efd();
    dev.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(fd)))
        .unwrap();
    Rig {
        fake,
        store,
        dev,
        io,
    }
}

fn rig() -> Rig {
    rig_with(DeviceConfig {
        quiesce_timeout: Duration::from_secs(2),
        ..Default::default()
    })
}

/// An eventfd and a dup(2) of it for the device to own.
fn efd() -> (EventFd, OwnedFd) {
    let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let d = nix::unistd::dup(&e).unwrap();
    (e, d)
}

/// The counter, resetting it; 0 when not signalled.
fn take(e: &EventFd) -> u64 {
    match e.read() {
        Ok(n) => n,
        Err(Errno::EAGAIN) => 0,
        Err(err) => panic!("eventfd read: {err}"),
    }
}

fn wait_signal(e: &EventFd) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = take(e);
        if n > 0 {
            return n;
        }
        assert!(Instant::now() < deadline, "no eventfd signal");
        thread::sleep(Duration::from_millis(2));
    }
}

fn wait_state(dev: &VfioCcwDevice, want: State) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while dev.state() != want {
        assert!(
            Instant::now() < deadline,
            "state {:?} != {want:?}",
            dev.state()
        );
        thread::sleep(Duration::from_millis(2));
    }
}

fn orb(cpa: u32) -> Orb {
    Orb {
        intparm: 0xcafe,
        ctl: OrbControls::new()
            .with_format1(true)
            .with_prefetch(true)
            .with_lpm(0x80),
        cpa,
    }
}

fn request(o: &Orb, function: u8) -> [u8; 124] {
    let scsw = Scsw {
        flags: ScswFlags::new().with_fctl(function),
        ..Default::default()
    };
    CcwIoRegion::request(o, &scsw).to_bytes()
}

fn start(dev: &VfioCcwDevice) -> Result<usize, DeviceError> {
    dev.write_region(IO_REGION_INDEX, 0, &request(&orb(PROG), fctl::START))
}

fn io_region(dev: &VfioCcwDevice) -> CcwIoRegion {
    let mut b = [0u8; 124];
    assert_eq!(dev.read_region(IO_REGION_INDEX, 0, &mut b), Ok(124));
    CcwIoRegion::from_bytes(&b)
}

fn cmd(dev: &VfioCcwDevice, command: u32) -> Result<usize, DeviceError> {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&command.to_ne_bytes());
    dev.write_region(ASYNC_REGION_INDEX, 0, &b)
}

fn pinned(s: &IommuStore) -> u64 {
    s.stats().pinned_pages
}

fn refused(e: i32) -> Result<usize, DeviceError> {
    Err(DeviceError::Refused(e))
}

// ---------------------------------------------------------------------------------------
// Info.

#[test]
fn device_region_and_irq_info() {
    let r = rig();
    let i = r.dev.device_info();
    assert_eq!((i.flags, i.num_regions, i.num_irqs), (0x10 | 0x1, 4, 3));
    let io = r.dev.region_info(0).unwrap();
    assert_eq!((io.size, io.flags, io.cap_type), (124, 0x3, None));
    let want = [
        (1, 8, 0x3 | 0x8, 1),
        (2, 52, 0x1 | 0x8, 2),
        (3, 8, 0x1 | 0x8, 3),
    ];
    for (idx, size, flags, subtype) in want {
        let ri = r.dev.region_info(idx).unwrap();
        assert_eq!((ri.index, ri.size, ri.flags), (idx, size, flags));
        assert_eq!(ri.cap_type, Some(RegionType { ty: 2, subtype }));
    }
    assert_eq!(r.dev.region_info(4), Err(DeviceError::InvalidArgument));
    for idx in 0..3 {
        let ii = r.dev.irq_info(idx).unwrap();
        assert_eq!((ii.index, ii.count, ii.flags), (idx, 1, 1));
    }
    assert_eq!(r.dev.irq_info(3), Err(DeviceError::InvalidArgument));
}

// ---------------------------------------------------------------------------------------
// Region bounds.

#[test]
fn every_region_bounds() {
    let r = rig();
    let d = &r.dev;
    let mut buf = [0u8; 200];
    for (idx, size) in [(0u32, 124usize), (1, 8), (2, 52), (3, 8)] {
        assert_eq!(d.read_region(idx, 0, &mut buf[..size]), Ok(size), "{idx}");
        assert_eq!(d.read_region(idx, size as u64, &mut buf[..0]), Ok(0));
        assert_eq!(
            d.read_region(idx, 1, &mut buf[..size]),
            Err(DeviceError::InvalidArgument)
        );
        assert_eq!(
            d.read_region(idx, 0, &mut buf[..size + 1]),
            Err(DeviceError::InvalidArgument)
        );
        assert_eq!(
            d.read_region(idx, size as u64 + 1, &mut buf[..0]),
            Err(DeviceError::InvalidArgument)
        );
        assert_eq!(
            d.read_region(idx, u64::MAX, &mut buf[..1]),
            Err(DeviceError::InvalidArgument)
        );
        assert_eq!(
            d.write_region(idx, 1, &buf[..size]),
            Err(DeviceError::InvalidArgument)
        );
        assert_eq!(
            d.write_region(idx, u64::MAX, &buf[..2]),
            Err(DeviceError::InvalidArgument)
        );
    }
    // Read-only regions refuse any write; unknown regions do not exist.
    assert_eq!(
        d.write_region(SCHIB_REGION_INDEX, 0, &buf[..4]),
        Err(DeviceError::InvalidArgument)
    );
    assert_eq!(
        d.write_region(CRW_REGION_INDEX, 0, &buf[..4]),
        Err(DeviceError::InvalidArgument)
    );
    assert_eq!(
        d.read_region(4, 0, &mut buf[..4]),
        Err(DeviceError::InvalidArgument)
    );
    assert_eq!(
        d.write_region(4, 0, &buf[..4]),
        Err(DeviceError::InvalidArgument)
    );
    // The ret_code field alone can be read (bytes 120..124).
    assert_eq!(d.read_region(IO_REGION_INDEX, 120, &mut buf[..4]), Ok(4));
}

#[test]
fn extra_regions_exist_only_while_open() {
    let fake = Fake::new();
    let dev = VfioCcwDevice::new(fake, store(), DeviceConfig::default());
    let mut b = [0u8; 8];
    for idx in [ASYNC_REGION_INDEX, SCHIB_REGION_INDEX, CRW_REGION_INDEX] {
        assert_eq!(
            dev.read_region(idx, 0, &mut b[..4]),
            Err(DeviceError::InvalidArgument)
        );
    }
    assert_eq!(dev.read_region(IO_REGION_INDEX, 0, &mut b), Ok(8));
    dev.open().unwrap();
    assert_eq!(dev.read_region(CRW_REGION_INDEX, 0, &mut b), Ok(8));
    dev.close();
    assert_eq!(
        dev.read_region(CRW_REGION_INDEX, 0, &mut b),
        Err(DeviceError::InvalidArgument)
    );
}

// ---------------------------------------------------------------------------------------
// FSM cells, state by state.

#[test]
fn standby_cells() {
    let fake = Fake::new();
    let dev = VfioCcwDevice::new(fake.clone(), store(), DeviceConfig::default());
    assert_eq!(dev.state(), State::Standby);
    // IO_REQ -> -EIO, stored in ret_code.
    assert_eq!(start(&dev), refused(libc::EIO));
    let mut rc = [0u8; 4];
    dev.read_region(IO_REGION_INDEX, 120, &mut rc).unwrap();
    assert_eq!(rc, (-libc::EIO).to_ne_bytes());
    // INTERRUPT -> dropped (the IRB area stays empty).
    fake.deliver(Irb::new(
        Scsw {
            flags: ScswFlags::new().with_stctl(stctl::ALERT | stctl::STATUS_PENDING),
            dstat: dstat::ATTENTION,
            ..Default::default()
        },
        0x80,
    ));
    assert_eq!(io_region(&dev).irb_area, [0; 96]);
    // OPEN -> IDLE. (ASYNC_REQ in STANDBY cannot be reached here: the async region exists
    // only while open; the unit tests drive that cell.) CLOSE in STANDBY -> NOT_OPER.
    dev.open().unwrap();
    assert_eq!(dev.state(), State::Idle);
    dev.close();
    assert_eq!(dev.state(), State::Standby);
    dev.close();
    assert_eq!(dev.state(), State::NotOper);
}

#[test]
fn standby_async_request_is_eio_and_notoper_event() {
    let fake = Fake::new();
    let dev = VfioCcwDevice::new(fake.clone(), store(), DeviceConfig::default());
    // Open fails when the subchannel is gone: NOT_OPER, EINVAL.
    fake.schib_fails.store(true, Ordering::SeqCst);
    assert_eq!(dev.open(), Err(DeviceError::InvalidArgument));
    assert_eq!(dev.state(), State::NotOper);
    let dev = VfioCcwDevice::new(fake.clone(), store(), DeviceConfig::default());
    dev.not_operational();
    assert_eq!(dev.state(), State::NotOper);
}

#[test]
fn not_oper_cells() {
    let r = rig();
    let d = &r.dev;
    d.not_operational();
    assert_eq!(d.state(), State::NotOper);
    assert_eq!(start(d), refused(libc::EIO));
    assert_eq!(cmd(d, VFIO_CCW_ASYNC_CMD_HSCH), refused(libc::EIO));
    assert_eq!(r.fake.halts.load(Ordering::SeqCst), 0);
    d.not_operational(); // nop
    d.close(); // nop
    assert_eq!(d.state(), State::NotOper);
    assert_eq!(d.open(), Err(DeviceError::InvalidArgument));
    assert_eq!(d.reset(), Err(DeviceError::InvalidArgument));
    assert_eq!(d.state(), State::NotOper);
    // INTERRUPT: dropped.
    r.fake.end_later(fctl::START, 0, false);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(take(&r.io), 0);
}

#[test]
fn idle_cells() {
    let r = rig();
    let d = &r.dev;
    assert_eq!(d.state(), State::Idle);
    // INTERRUPT (unsolicited attention): stored as is, IO signalled, still IDLE.
    let scsw = Scsw {
        flags: ScswFlags::new().with_stctl(stctl::ALERT | stctl::STATUS_PENDING),
        dstat: dstat::ATTENTION,
        cpa: 0x1234_5678,
        ..Default::default()
    };
    r.fake.deliver(Irb::new(scsw, 0x80));
    assert_eq!(wait_signal(&r.io), 1);
    assert_eq!(io_region(d).irb().scsw, scsw);
    assert_eq!(d.state(), State::Idle);
    // ASYNC_REQ in IDLE: a halt on an idle subchannel is issued.
    assert_eq!(cmd(d, VFIO_CCW_ASYNC_CMD_HSCH), Ok(8));
    assert_eq!(r.fake.halts.load(Ordering::SeqCst), 1);
    wait_signal(&r.io);
    // OPEN in IDLE -> NOT_OPER (as Linux).
    assert_eq!(d.open(), Err(DeviceError::InvalidArgument));
    assert_eq!(d.state(), State::NotOper);
}

#[test]
fn idle_close_goes_standby_without_clear() {
    let r = rig();
    r.dev.close();
    assert_eq!(r.dev.state(), State::Standby);
    assert_eq!(r.fake.clears.load(Ordering::SeqCst), 0);
    r.dev.open().unwrap();
    assert_eq!(r.dev.reset(), Ok(()));
    assert_eq!(r.dev.state(), State::Idle);
}

#[test]
fn start_runs_to_completion() {
    let r = rig();
    assert_eq!(start(&r.dev), Ok(124));
    // CP_PENDING until the fake's thread ends the program; its pins are held meanwhile.
    assert_eq!(r.dev.state(), State::CpPending);
    assert!(r.dev.has_program());
    assert_eq!(pinned(&r.store), 1);
    assert_eq!(wait_signal(&r.io), 1);
    assert_eq!(r.dev.state(), State::Idle);
    assert!(!r.dev.has_program());
    assert_eq!(pinned(&r.store), 0);
    let reg = io_region(&r.dev);
    assert_eq!(reg.ret_code, 0);
    let s = reg.irb().scsw;
    // The host CPA (one past the first host CCW) is back in guest terms.
    assert_eq!(s.cpa, PROG + 8);
    assert_eq!(s.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
    assert!(s.flags.format1());
    assert_eq!(r.fake.starts.load(Ordering::SeqCst), 1);
    // And again: the device is reusable.
    assert_eq!(start(&r.dev), Ok(124));
    wait_signal(&r.io);
    wait_state(&r.dev, State::Idle);
}

#[test]
fn interrupts_presented_inside_start_are_handled_in_order_before_the_write_returns() {
    struct Recorder(Mutex<Vec<Irb>>);
    impl vccw::driver::IoRegionMirror for Recorder {
        fn update(&self, image: &[u8; 124]) {
            self.0
                .lock()
                .unwrap()
                .push(CcwIoRegion::from_bytes(image).irb());
        }
    }
    let r = rig();
    let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
    r.dev.set_io_mirror(Some(rec.clone()));
    for n in [1u8, 3] {
        r.fake.inline_irbs.store(n, Ordering::SeqCst);
        rec.0.lock().unwrap().clear();
        assert_eq!(start(&r.dev), Ok(124));
        // Handled by the time the write returns: final status stored, program freed.
        assert_eq!(r.dev.state(), State::Idle);
        assert!(!r.dev.has_program());
        assert_eq!(pinned(&r.store), 0);
        assert_eq!(take(&r.io), n as u64);
        // The request's own image, then one per interrupt in the order presented.
        let counts: Vec<u16> = rec.0.lock().unwrap()[1..]
            .iter()
            .map(|irb| irb.scsw.count)
            .collect();
        assert_eq!(counts, (1..=n as u16).collect::<Vec<_>>());
        let s = io_region(&r.dev).irb().scsw;
        assert_eq!(s.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
        assert_eq!(s.cpa, PROG + 8);
    }
}

#[test]
fn cp_pending_cells() {
    let r = rig();
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    assert_eq!(start(&r.dev), Ok(124));
    assert_eq!(r.dev.state(), State::CpPending);
    // IO_REQ -> -EBUSY; the running program is untouched.
    assert_eq!(start(&r.dev), refused(libc::EBUSY));
    assert_eq!(r.dev.state(), State::CpPending);
    assert_eq!(pinned(&r.store), 1);
    assert_eq!(r.fake.starts.load(Ordering::SeqCst), 1);
    // An intermediate (PCI) interrupt does not end the program.
    let pci = Scsw {
        flags: ScswFlags::new()
            .with_fctl(fctl::START)
            .with_actl(actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE)
            .with_stctl(stctl::INTERMEDIATE | stctl::STATUS_PENDING),
        cstat: cstat::PCI,
        ..Default::default()
    };
    r.fake.deliver(Irb::new(pci, 0x80));
    wait_signal(&r.io);
    assert_eq!(r.dev.state(), State::CpPending);
    assert!(r.dev.has_program());
    // NOT_OPER: frees the program.
    drop(r.fake.current.lock().unwrap().take());
    r.dev.not_operational();
    assert_eq!(r.dev.state(), State::NotOper);
    assert_eq!(pinned(&r.store), 0);
}

#[test]
fn cp_pending_open_is_not_oper() {
    let r = rig();
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    start(&r.dev).unwrap();
    drop(r.fake.current.lock().unwrap().take());
    assert_eq!(r.dev.open(), Err(DeviceError::InvalidArgument));
    assert_eq!(r.dev.state(), State::NotOper);
    assert_eq!(pinned(&r.store), 0);
}

#[test]
fn cp_processing_is_eagain_for_concurrent_writes() {
    let r = Arc::new(rig());
    r.fake.start_delay_ms.store(300, Ordering::SeqCst);
    let r2 = r.clone();
    let t = thread::spawn(move || start(&r2.dev));
    thread::sleep(Duration::from_millis(80));
    assert_eq!(start(&r.dev), Err(DeviceError::Again));
    assert_eq!(
        cmd(&r.dev, VFIO_CCW_ASYNC_CMD_HSCH),
        Err(DeviceError::Again)
    );
    assert_eq!(DeviceError::Again.errno(), libc::EAGAIN);
    assert_eq!(t.join().unwrap(), Ok(124));
    assert_eq!(r.fake.halts.load(Ordering::SeqCst), 0);
    wait_signal(&r.io);
    wait_state(&r.dev, State::Idle);
}

// ---------------------------------------------------------------------------------------
// I/O region requests and their results.

#[test]
fn refused_requests_return_to_idle_unpinned() {
    let r = rig();
    let d = &r.dev;
    let mut tm = orb(PROG);
    tm.ctl = tm.ctl.with_transport_mode(true);
    let cases: [(Orb, u8, i32); 5] = [
        (tm, fctl::START, libc::EOPNOTSUPP),
        (orb(PROG), fctl::HALT, libc::EOPNOTSUPP),
        (orb(PROG), fctl::CLEAR, libc::EOPNOTSUPP),
        // CCW address 0: invalid program.
        (orb(0), fctl::START, libc::EINVAL),
        // Program beyond guest memory.
        (orb(0x20_0000), fctl::START, libc::EFAULT),
    ];
    for (o, f, errno) in cases {
        assert_eq!(
            d.write_region(IO_REGION_INDEX, 0, &request(&o, f)),
            refused(errno)
        );
        assert_eq!(d.state(), State::Idle);
        assert_eq!(io_region(d).ret_code, -errno);
        assert_eq!(pinned(&r.store), 0);
    }
    assert_eq!(r.fake.starts.load(Ordering::SeqCst), 0);
    // No function at all: ret_code stays what the client wrote (0 here): success.
    assert_eq!(
        d.write_region(IO_REGION_INDEX, 0, &request(&orb(PROG), 0)),
        Ok(124)
    );
    // A partial write keeps the rest of the region: writing only the ret_code reruns the
    // request in the region (no function: nothing), and a non-zero ret_code comes back.
    assert_eq!(d.write_region(IO_REGION_INDEX, 120, &[0; 4]), Ok(4));
    assert_eq!(
        d.write_region(IO_REGION_INDEX, 120, &(-libc::EIO).to_ne_bytes()),
        refused(libc::EIO)
    );
    assert_eq!(r.fake.starts.load(Ordering::SeqCst), 0);
}

#[test]
fn start_condition_codes() {
    let r = rig();
    for (cc, errno) in [
        (1u8, libc::EBUSY),
        (2, libc::EBUSY),
        (3, libc::ENODEV),
        (7, libc::EIO),
    ] {
        r.fake.start_cc.store(cc, Ordering::SeqCst);
        assert_eq!(start(&r.dev), refused(errno), "cc{cc}");
        assert_eq!(r.dev.state(), State::Idle);
        assert!(!r.dev.has_program());
        assert_eq!(pinned(&r.store), 0);
    }
}

#[test]
fn start_cc3_with_other_paths_left_is_eacces() {
    let fake = Fake::new();
    fake.pim.store(0xC0, Ordering::SeqCst);
    let s = store();
    let dev = VfioCcwDevice::new(fake.clone(), s.clone(), DeviceConfig::default());
    dev.open().unwrap();
    fake.start_cc.store(3, Ordering::SeqCst);
    // ORB path 0x80 fails, 0x40 remains.
    assert_eq!(start(&dev), refused(libc::EACCES));
    // Now 0x40 fails too: nothing left.
    let mut o = orb(PROG);
    o.ctl = o.ctl.with_lpm(0x40);
    assert_eq!(
        dev.write_region(IO_REGION_INDEX, 0, &request(&o, fctl::START)),
        refused(libc::ENODEV)
    );
    // STSCH failing after cc3: ENODEV.
    dev.reset().unwrap();
    fake.schib_fails.store(true, Ordering::SeqCst);
    assert_eq!(start(&dev), refused(libc::ENODEV));
    assert_eq!(s.stats().pinned_pages, 0);
}

// ---------------------------------------------------------------------------------------
// Async region: HSCH / CSCH.

#[test]
fn halt_during_cp_pending() {
    let r = rig();
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    start(&r.dev).unwrap();
    assert_eq!(cmd(&r.dev, VFIO_CCW_ASYNC_CMD_HSCH), Ok(8));
    assert_eq!(r.fake.halts.load(Ordering::SeqCst), 1);
    wait_signal(&r.io);
    wait_state(&r.dev, State::Idle);
    assert_eq!(pinned(&r.store), 0);
    let s = io_region(&r.dev).irb().scsw;
    assert_eq!(s.flags.fctl(), fctl::START | fctl::HALT);
    assert_eq!(s.cpa, PROG + 8);
    // The command region reads back the command and ret_code 0.
    let mut b = [0u8; 8];
    r.dev.read_region(ASYNC_REGION_INDEX, 0, &mut b).unwrap();
    assert_eq!(&b[..4], &VFIO_CCW_ASYNC_CMD_HSCH.to_ne_bytes());
    assert_eq!(&b[4..], &0i32.to_ne_bytes());
}

#[test]
fn clear_during_cp_pending() {
    let r = rig();
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    start(&r.dev).unwrap();
    assert_eq!(cmd(&r.dev, VFIO_CCW_ASYNC_CMD_CSCH), Ok(8));
    assert_eq!(r.fake.clears.load(Ordering::SeqCst), 1);
    wait_signal(&r.io);
    wait_state(&r.dev, State::Idle);
    assert_eq!(pinned(&r.store), 0);
    assert_eq!(io_region(&r.dev).irb().scsw.flags.fctl(), fctl::CLEAR);
}

#[test]
fn async_condition_codes() {
    let r = rig();
    for (cc, errno) in [(1u8, libc::EBUSY), (2, libc::EBUSY), (3, libc::ENODEV)] {
        r.fake.halt_cc.store(cc, Ordering::SeqCst);
        assert_eq!(cmd(&r.dev, VFIO_CCW_ASYNC_CMD_HSCH), refused(errno));
        let mut b = [0u8; 4];
        r.dev.read_region(ASYNC_REGION_INDEX, 4, &mut b).unwrap();
        assert_eq!(b, (-errno).to_ne_bytes());
    }
    r.fake.clear_cc.store(3, Ordering::SeqCst);
    assert_eq!(cmd(&r.dev, VFIO_CCW_ASYNC_CMD_CSCH), refused(libc::ENODEV));
    assert_eq!(cmd(&r.dev, 4), refused(libc::EINVAL));
    assert_eq!(cmd(&r.dev, 0), refused(libc::EINVAL));
    assert_eq!(
        cmd(&r.dev, VFIO_CCW_ASYNC_CMD_HSCH | VFIO_CCW_ASYNC_CMD_CSCH),
        refused(libc::EINVAL)
    );
}

// ---------------------------------------------------------------------------------------
// SCHIB and CRW regions.

#[test]
fn schib_region_refreshes() {
    let r = rig();
    let mut b = [0u8; 52];
    assert_eq!(r.dev.read_region(SCHIB_REGION_INDEX, 0, &mut b), Ok(52));
    assert_eq!(b, r.fake.store_schib().unwrap().to_bytes());
    // devno 0x0815 at PMCW bytes 6-7, PIM at byte 11, CHPID 0 at byte 16 (big-endian).
    assert_eq!(&b[6..8], &[0x08, 0x15]);
    assert_eq!(b[11], 0x80);
    assert_eq!(b[16], 0x42);
    let mut two = [0u8; 2];
    assert_eq!(r.dev.read_region(SCHIB_REGION_INDEX, 6, &mut two), Ok(2));
    assert_eq!(two, [0x08, 0x15]);
    r.fake.schib_fails.store(true, Ordering::SeqCst);
    assert_eq!(
        r.dev.read_region(SCHIB_REGION_INDEX, 0, &mut b),
        Err(DeviceError::NoDevice)
    );
    assert_eq!(DeviceError::NoDevice.errno(), libc::ENODEV);
}

#[test]
fn crw_queue_pops_and_resignals() {
    let r = rig();
    let (crw_e, fd) = efd();
    r.dev
        .set_irqs(IrqSet::eventfd(IrqIndex::Crw, Some(fd)))
        .unwrap();
    r.fake.path(Crw::channel_path_offline(0x42));
    r.fake.path(Crw::channel_path_online(0x42));
    assert_eq!(take(&crw_e), 2);
    let mut b = [0u8; 8];
    r.dev.read_region(CRW_REGION_INDEX, 0, &mut b).unwrap();
    assert_eq!(b, [0x04, 0x06, 0x00, 0x42, 0, 0, 0, 0]);
    // One left: signalled again.
    assert_eq!(take(&crw_e), 1);
    r.dev.read_region(CRW_REGION_INDEX, 0, &mut b).unwrap();
    assert_eq!(b, [0x04, 0x02, 0x00, 0x42, 0, 0, 0, 0]);
    assert_eq!(take(&crw_e), 0);
    // Empty: zeros, no signal.
    r.dev.read_region(CRW_REGION_INDEX, 0, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
    assert_eq!(take(&crw_e), 0);
    // A partial read still pops one CRW.
    r.fake.path(Crw::channel_path_offline(0x43));
    let mut pad = [0xffu8; 4];
    r.dev.read_region(CRW_REGION_INDEX, 4, &mut pad).unwrap();
    assert_eq!(pad, [0; 4]);
    r.dev.read_region(CRW_REGION_INDEX, 0, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
}

#[test]
fn crw_queue_overflow_sets_r_bit() {
    let fake = Fake::new();
    let dev = VfioCcwDevice::new(
        fake.clone(),
        store(),
        DeviceConfig {
            crw_queue_limit: 1,
            ..Default::default()
        },
    );
    dev.open().unwrap();
    fake.path(Crw::channel_path_offline(1));
    fake.path(Crw::channel_path_offline(2)); // lost
    let mut b = [0u8; 8];
    dev.read_region(CRW_REGION_INDEX, 0, &mut b).unwrap();
    assert_eq!(&b[..4], &[0x04, 0x06, 0x00, 0x01]);
    fake.path(Crw::channel_path_offline(3));
    dev.read_region(CRW_REGION_INDEX, 0, &mut b).unwrap();
    // R (overflow, bit 2) set: 0x20 in the first byte.
    assert_eq!(&b[..4], &[0x24, 0x06, 0x00, 0x03]);
}

// ---------------------------------------------------------------------------------------
// Reset, close, unmap.

#[test]
fn unmap_hitting_pins_resets_and_unpins() {
    let r = rig();
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    start(&r.dev).unwrap();
    assert_eq!(pinned(&r.store), 1);
    // A range that misses the program's page: nothing happens.
    r.dev.unmap_pinned(0x30000, 0x1000);
    r.dev.unmap_pinned(DATA as u64 + 0x1000, 0);
    assert_eq!(r.fake.clears.load(Ordering::SeqCst), 0);
    assert_eq!(r.dev.state(), State::CpPending);
    // The last byte of the range is in the page: reset, as Linux.
    r.dev.unmap_pinned(DATA as u64 - 0x1000, 0x1001);
    assert_eq!(r.fake.clears.load(Ordering::SeqCst), 1);
    assert_eq!(pinned(&r.store), 0);
    assert_eq!(r.dev.state(), State::Idle);
    // The clear's status reached the client.
    wait_signal(&r.io);
    assert_eq!(io_region(&r.dev).irb().scsw.flags.fctl(), fctl::CLEAR);
    // A huge range to the top of the address space does not overflow.
    start(&r.dev).unwrap();
    r.dev.unmap_pinned(0, u64::MAX);
    assert_eq!(pinned(&r.store), 0);
}

#[test]
fn reset_and_close_quiesce() {
    let r = rig();
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    start(&r.dev).unwrap();
    assert_eq!(r.dev.reset(), Ok(()));
    assert_eq!(r.dev.state(), State::Idle);
    assert_eq!(r.fake.clears.load(Ordering::SeqCst), 1);
    assert_eq!(pinned(&r.store), 0);
    start(&r.dev).unwrap();
    r.dev.close();
    assert_eq!(r.dev.state(), State::Standby);
    assert_eq!(pinned(&r.store), 0);
    // Clear cc3 while quiescing: NOT_OPER, pins released anyway.
    r.dev.open().unwrap();
    start(&r.dev).unwrap();
    r.fake.clear_cc.store(3, Ordering::SeqCst);
    drop(r.fake.current.lock().unwrap().take());
    r.dev.close();
    assert_eq!(r.dev.state(), State::NotOper);
    assert_eq!(pinned(&r.store), 0);
}

#[test]
fn quiesce_gives_up_after_bounded_retries() {
    let r = rig_with(DeviceConfig {
        quiesce_timeout: Duration::from_millis(50),
        quiesce_retries: 2,
        ..Default::default()
    });
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    r.fake.mute_clear.store(true, Ordering::SeqCst);
    start(&r.dev).unwrap();
    assert_eq!(r.dev.reset(), Err(DeviceError::InvalidArgument));
    assert_eq!(r.fake.clears.load(Ordering::SeqCst), 2);
    assert_eq!(r.dev.state(), State::NotOper);
    assert_eq!(pinned(&r.store), 0);
}

#[test]
fn dropping_the_device_releases_pins() {
    let r = rig();
    r.fake.auto_complete.store(false, Ordering::SeqCst);
    start(&r.dev).unwrap();
    let Rig {
        fake, store, dev, ..
    } = r;
    drop(dev);
    assert_eq!(fake.clears.load(Ordering::SeqCst), 1);
    assert_eq!(store.stats().pinned_pages, 0);
}

// ---------------------------------------------------------------------------------------
// errors_as_status.

#[test]
fn errors_as_status_presents_program_check() {
    let r = rig_with(DeviceConfig {
        errors_as_status: true,
        ..Default::default()
    });
    // Command code 0x00 (low nibble zero): a program check on a real channel.
    let bad = Ccw1 {
        cmd: 0x00,
        flags: CcwFlags::new(),
        count: 1,
        cda: DATA,
    };
    r.store.write(0x18000, &bad.to_bytes()).unwrap();
    let o = orb(0x18000);
    assert_eq!(
        r.dev
            .write_region(IO_REGION_INDEX, 0, &request(&o, fctl::START)),
        Ok(124)
    );
    assert_eq!(wait_signal(&r.io), 1);
    wait_state(&r.dev, State::Idle);
    assert_eq!(r.fake.starts.load(Ordering::SeqCst), 0);
    assert_eq!(pinned(&r.store), 0);
    let reg = io_region(&r.dev);
    assert_eq!(reg.ret_code, 0);
    let s = reg.irb().scsw;
    assert_eq!(s.cpa, 0x18000);
    assert_eq!((s.dstat, s.cstat), (0, cstat::PROGRAM_CHECK));
    assert_eq!(s.flags.fctl(), fctl::START);
    assert_eq!(
        s.flags.stctl(),
        stctl::ALERT | stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
    );
    assert!(s.flags.format1() && s.flags.prefetch());
    // Transport mode stays a region error.
    let mut tm = orb(PROG);
    tm.ctl = tm.ctl.with_transport_mode(true);
    assert_eq!(
        r.dev
            .write_region(IO_REGION_INDEX, 0, &request(&tm, fctl::START)),
        refused(libc::EOPNOTSUPP)
    );
    // Good programs still run.
    assert_eq!(start(&r.dev), Ok(124));
    wait_signal(&r.io);
    wait_state(&r.dev, State::Idle);
}

// ---------------------------------------------------------------------------------------
// SET_IRQS.

fn set(
    dev: &VfioCcwDevice,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    data: IrqSetData,
) -> Result<(), DeviceError> {
    dev.set_irqs(IrqSet {
        flags,
        index,
        start,
        count,
        data,
    })
}

#[test]
fn set_irqs_semantics() {
    let r = rig();
    let d = &r.dev;
    let t = VFIO_IRQ_SET_ACTION_TRIGGER;
    // DATA_NONE count 1: signal now.
    set(d, t | VFIO_IRQ_SET_DATA_NONE, 0, 0, 1, IrqSetData::None).unwrap();
    assert_eq!(take(&r.io), 1);
    // DATA_BOOL: signal when true only.
    set(
        d,
        t | VFIO_IRQ_SET_DATA_BOOL,
        0,
        0,
        1,
        IrqSetData::Bool(vec![false]),
    )
    .unwrap();
    assert_eq!(take(&r.io), 0);
    set(
        d,
        t | VFIO_IRQ_SET_DATA_BOOL,
        0,
        0,
        1,
        IrqSetData::Bool(vec![true]),
    )
    .unwrap();
    assert_eq!(take(&r.io), 1);
    // Replacing the eventfd: signals go to the new one only.
    let (e2, fd2) = efd();
    set(
        d,
        t | VFIO_IRQ_SET_DATA_EVENTFD,
        0,
        0,
        1,
        IrqSetData::Eventfd(vec![Some(fd2)]),
    )
    .unwrap();
    set(d, t | VFIO_IRQ_SET_DATA_NONE, 0, 0, 1, IrqSetData::None).unwrap();
    assert_eq!((take(&r.io), take(&e2)), (0, 1));
    // count 0 + DATA_NONE tears down.
    set(d, t | VFIO_IRQ_SET_DATA_NONE, 0, 0, 0, IrqSetData::None).unwrap();
    set(d, t | VFIO_IRQ_SET_DATA_NONE, 0, 0, 1, IrqSetData::None).unwrap();
    assert_eq!(take(&e2), 0);
    // fd -1 tears down.
    let (e3, fd3) = efd();
    d.set_irqs(IrqSet::eventfd(IrqIndex::Req, Some(fd3)))
        .unwrap();
    assert!(d.request_release());
    assert_eq!(take(&e3), 1);
    d.set_irqs(IrqSet::eventfd(IrqIndex::Req, None)).unwrap();
    assert!(!d.request_release());
    assert_eq!(take(&e3), 0);
    // Tearing down what is not set is fine.
    d.set_irqs(IrqSet::eventfd(IrqIndex::Crw, None)).unwrap();

    let inval = Err(DeviceError::InvalidArgument);
    let none = || IrqSetData::None;
    // Unknown index, bad start/count, count 0 with other data or actions.
    assert_eq!(set(d, t | VFIO_IRQ_SET_DATA_NONE, 3, 0, 1, none()), inval);
    assert_eq!(set(d, t | VFIO_IRQ_SET_DATA_NONE, 0, 1, 0, none()), inval);
    assert_eq!(set(d, t | VFIO_IRQ_SET_DATA_NONE, 0, 0, 2, none()), inval);
    assert_eq!(
        set(d, t | VFIO_IRQ_SET_DATA_NONE, 0, u32::MAX, 1, none()),
        inval
    );
    assert_eq!(
        set(
            d,
            t | VFIO_IRQ_SET_DATA_BOOL,
            0,
            0,
            0,
            IrqSetData::Bool(vec![])
        ),
        inval
    );
    assert_eq!(
        set(
            d,
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            0,
            0,
            none()
        ),
        inval
    );
    // Only ACTION_TRIGGER.
    assert_eq!(
        set(
            d,
            VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            0,
            1,
            none()
        ),
        inval
    );
    assert_eq!(
        set(
            d,
            VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            0,
            1,
            none()
        ),
        inval
    );
    // Exactly one data type and one action; no unknown bits; data must match the type.
    assert_eq!(
        set(
            d,
            t | VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL,
            0,
            0,
            1,
            none()
        ),
        inval
    );
    assert_eq!(
        set(
            d,
            t | VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_DATA_NONE,
            0,
            0,
            1,
            none()
        ),
        inval
    );
    assert_eq!(set(d, VFIO_IRQ_SET_DATA_NONE, 0, 0, 1, none()), inval);
    assert_eq!(
        set(d, t | VFIO_IRQ_SET_DATA_NONE | 0x40, 0, 0, 1, none()),
        inval
    );
    assert_eq!(set(d, t | VFIO_IRQ_SET_DATA_BOOL, 0, 0, 1, none()), inval);
    assert_eq!(
        set(
            d,
            t | VFIO_IRQ_SET_DATA_BOOL,
            0,
            0,
            1,
            IrqSetData::Bool(vec![true, true])
        ),
        inval
    );
    assert_eq!(
        set(
            d,
            t | VFIO_IRQ_SET_DATA_EVENTFD,
            0,
            0,
            1,
            IrqSetData::Eventfd(vec![])
        ),
        inval
    );
    // A regular file is not an eventfd.
    let f: OwnedFd = tempfile::tempfile().unwrap().into();
    assert_eq!(d.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(f))), inval);
}

#[test]
fn io_interrupt_reaches_the_installed_eventfd_only() {
    let r = rig();
    let (crw_e, fd) = efd();
    r.dev
        .set_irqs(IrqSet::eventfd(IrqIndex::Crw, Some(fd)))
        .unwrap();
    start(&r.dev).unwrap();
    assert_eq!(wait_signal(&r.io), 1);
    assert_eq!(take(&crw_e), 0);
    // Without an IO eventfd the status is still stored.
    r.dev.set_irqs(IrqSet::eventfd(IrqIndex::Io, None)).unwrap();
    start(&r.dev).unwrap();
    wait_state(&r.dev, State::Idle);
    assert_eq!(io_region(&r.dev).irb().scsw.cpa, PROG + 8);
}
