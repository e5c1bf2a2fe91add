//! Fault injection through the full stack: an [`IommuStore`], a [`VfioCcwDevice`] driven
//! through its regions and eventfds, an [`EmulatedSubchannel`] with its channel thread, and
//! the real 3390 / 3490 models on image files.
//!
//! Every test ends with [`Rig::finish`], which checks that no page stays pinned, that the
//! device model was dropped and that the channel thread (named `vccw-chan-<devno>`, each
//! test with its own devno) is gone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use vccw::ccw::{Ccw1, CcwFlags};
use vccw::css::device::{Command, DeviceIdentity, DeviceModel, Outcome};
use vccw::css::{EmulatedSubchannel, InlinePolicy, SpinPolicy, SubchannelConfig};
use vccw::devices::dasd3390::{Dasd3390, DasdError};
use vccw::devices::tape3490::{cmd, Tape3490, Tape3490Config};
use vccw::driver::regions::{
    CcwIoRegion, CcwSchibRegion, VFIO_CCW_ASYNC_CMD_CSCH, VFIO_CCW_ASYNC_CMD_HSCH,
};
use vccw::driver::{
    DeviceConfig, DeviceError, IrqIndex, IrqSet, State, VfioCcwDevice, ASYNC_REGION_INDEX,
    CRW_REGION_INDEX, IO_REGION_INDEX, SCHIB_REGION_INDEX,
};
use vccw::image::awstape::{AwsError, AwsTape, OpenMode, Record};
use vccw::image::ckd::{CkdError, CkdImage, CkdOpenOptions, DEVHDR_SIZE, TRACK_SIZE_3390};
use vccw::image::ImageFile;
use vccw::iommu_store::{
    Backing, IommuStore, Perm, StoreConfig, StoreError, StoreMmapRegion, DEFAULT_DMA_ENTRY_LIMIT,
    PAGE_SIZE,
};
use vccw::orb::{cstat, dstat, fctl, stctl, Irb, Orb, OrbControls, Scsw, ScswFlags};

/// Channel programs live in the first mapping, data in the second.
const PROG: u64 = 0x10000;
const PROG_MAP: u64 = 0x20000;
const DATA: u64 = 0x20000;
const DATA_SIZE: u64 = 0x40000;
const CHPID: u8 = 0x42;
const WAIT: Duration = Duration::from_secs(10);
const CE_DE: u8 = dstat::CHANNEL_END | dstat::DEVICE_END;
const CE_DE_UC: u8 = CE_DE | dstat::UNIT_CHECK;

// ---------------------------------------------------------------------------------------
// A device wrapper that counts commands and can stop the channel thread between two of them.

/// Shared control of a [`Probe`]d device model.
#[derive(Default)]
struct ProbeCtl {
    /// Commands executed since the last [`ProbeCtl::reset`].
    executed: AtomicU32,
    resets: AtomicU32,
    /// Block after this many commands completed (0: off).
    gate_at: AtomicU32,
    /// (entered, released).
    gate: Mutex<(bool, bool)>,
    cv: Condvar,
    dropped: AtomicBool,
}

impl ProbeCtl {
    fn reset(&self) {
        self.executed.store(0, Ordering::SeqCst);
        self.gate_at.store(0, Ordering::SeqCst);
        *self.gate.lock().unwrap() = (false, false);
    }
    /// The channel thread will stop once `k` commands completed (their input not yet
    /// stored: the channel stores it when the device returns).
    fn arm(&self, k: u32) {
        self.reset();
        self.gate_at.store(k, Ordering::SeqCst);
    }
    fn pass(&self) {
        let mut g = self.gate.lock().unwrap();
        g.0 = true;
        self.cv.notify_all();
        let t0 = Instant::now();
        while !g.1 {
            assert!(t0.elapsed() < WAIT, "gate never released");
            g = self.cv.wait_timeout(g, WAIT).unwrap().0;
        }
    }
    fn wait_entered(&self) {
        let mut g = self.gate.lock().unwrap();
        let t0 = Instant::now();
        while !g.0 {
            assert!(t0.elapsed() < WAIT, "device never reached the gate");
            g = self.cv.wait_timeout(g, WAIT).unwrap().0;
        }
    }
    fn release(&self) {
        self.gate.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
    fn executed(&self) -> u32 {
        self.executed.load(Ordering::SeqCst)
    }
}

struct Probe {
    inner: Box<dyn DeviceModel>,
    ctl: Arc<ProbeCtl>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.ctl.dropped.store(true, Ordering::SeqCst);
    }
}

impl DeviceModel for Probe {
    fn start_program(&mut self) {
        self.inner.start_program()
    }
    fn execute(&mut self, c: &Command, data: &mut [u8]) -> Outcome {
        let o = self.inner.execute(c, data);
        let n = self.ctl.executed.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.ctl.gate_at.load(Ordering::SeqCst) {
            self.ctl.pass();
        }
        o
    }
    fn sense(&self) -> Vec<u8> {
        self.inner.sense()
    }
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn reset_operation(&mut self) {
        self.ctl.resets.fetch_add(1, Ordering::SeqCst);
        self.inner.reset_operation()
    }
}

// ---------------------------------------------------------------------------------------
// A file that fails on demand.

/// What a [`FaultyFile`] does: let `budget` more bytes be written, then fail every write
/// with `errno` (a write that crosses the budget is cut short first); optionally fail
/// every fdatasync with EIO.
#[derive(Debug, Default)]
struct FaultCtl {
    budget: Mutex<Option<u64>>,
    errno: AtomicI32,
    fail_sync: AtomicBool,
}

impl FaultCtl {
    fn arm(&self, budget: u64, errno: i32) {
        self.errno.store(errno, Ordering::SeqCst);
        *self.budget.lock().unwrap() = Some(budget);
    }
    fn disarm(&self) {
        *self.budget.lock().unwrap() = None;
        self.fail_sync.store(false, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct FaultyFile {
    file: File,
    ctl: Arc<FaultCtl>,
}

impl ImageFile for FaultyFile {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.pread(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut b = self.ctl.budget.lock().unwrap();
        let n = match *b {
            None => buf.len(),
            Some(0) => {
                return Err(io::Error::from_raw_os_error(
                    self.ctl.errno.load(Ordering::SeqCst),
                ))
            }
            Some(left) => buf.len().min(left as usize),
        };
        let n = self.file.pwrite(&buf[..n], offset)?;
        if let Some(left) = b.as_mut() {
            *left -= n as u64;
        }
        Ok(n)
    }
    fn datasync(&self) -> io::Result<()> {
        if self.ctl.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.datasync()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.truncate(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
}

fn faulty(path: &Path) -> (Box<dyn ImageFile>, Arc<FaultCtl>) {
    let ctl = Arc::new(FaultCtl::default());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    (
        Box::new(FaultyFile {
            file,
            ctl: ctl.clone(),
        }),
        ctl,
    )
}

// ---------------------------------------------------------------------------------------
// The rig: store + device + emulated subchannel + probed model.

struct Rig {
    store: IommuStore,
    data: Arc<StoreMmapRegion>,
    sub: Arc<EmulatedSubchannel>,
    dev: VfioCcwDevice,
    io: EventFd,
    crw: EventFd,
    probe: Arc<ProbeCtl>,
    devno: u16,
}

/// An eventfd and a dup(2) of it for the device to own.
fn efd() -> (EventFd, OwnedFd) {
    let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let d = nix::unistd::dup(&e).unwrap();
    (e, d)
}

fn take(e: &EventFd) -> u64 {
    match e.read() {
        Ok(n) => n,
        Err(Errno::EAGAIN) => 0,
        Err(err) => panic!("eventfd read: {err}"),
    }
}

fn wait_signal(e: &EventFd) -> u64 {
    let t0 = Instant::now();
    loop {
        let n = take(e);
        if n > 0 {
            return n;
        }
        assert!(t0.elapsed() < WAIT, "no eventfd signal");
        thread::sleep(Duration::from_micros(200));
    }
}

fn rig_with(model: Box<dyn DeviceModel>, devno: u16, cfg: DeviceConfig) -> Rig {
    let probe = Arc::new(ProbeCtl::default());
    let sub = Arc::new(
        EmulatedSubchannel::new(
            Box::new(Probe {
                inner: model,
                ctl: probe.clone(),
            }),
            SubchannelConfig {
                devno,
                chpid: CHPID,
                spin: SpinPolicy::OFF,
                inline: InlinePolicy::OFF,
            },
        )
        .unwrap(),
    );
    let store = IommuStore::new(StoreConfig::default());
    store
        .map_dma(0, PROG_MAP, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    let data = Arc::new(StoreMmapRegion::new(DATA_SIZE as usize).unwrap());
    map_data(&store, &data);
    let dev = VfioCcwDevice::new(sub.clone(), store.clone(), cfg);
    dev.open().unwrap();
    let (io, fd) = efd();
    dev.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(fd)))
        .unwrap();
    let (crw, fd) = efd();
    dev.set_irqs(IrqSet::eventfd(IrqIndex::Crw, Some(fd)))
        .unwrap();
    Rig {
        store,
        data,
        sub,
        dev,
        io,
        crw,
        probe,
        devno,
    }
}

fn rig(model: Box<dyn DeviceModel>, devno: u16) -> Rig {
    rig_with(
        model,
        devno,
        DeviceConfig {
            quiesce_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
}

fn map_data(store: &IommuStore, data: &Arc<StoreMmapRegion>) {
    store
        .map_dma(
            DATA,
            DATA_SIZE,
            Perm::READ_WRITE,
            Backing::Region {
                region: data.clone(),
                offset: 0,
            },
        )
        .unwrap();
}

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

impl Rig {
    fn pinned(&self) -> u64 {
        self.store.stats().pinned_pages
    }

    fn orb(&self, cpa: u64) -> Orb {
        orb(cpa)
    }

    /// Writes format-1 CCWs at `at`.
    fn ccws(&self, at: u64, ccws: &[Ccw1]) {
        let mut b = Vec::with_capacity(ccws.len() * 8);
        for c in ccws {
            b.extend_from_slice(&c.to_bytes());
        }
        self.store.write(at, &b).unwrap();
    }

    fn ssch(&self, cpa: u64) -> Result<usize, DeviceError> {
        take(&self.io);
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(fctl::START),
            ..Default::default()
        };
        let req = CcwIoRegion::request(&self.orb(cpa), &scsw).to_bytes();
        self.dev.write_region(IO_REGION_INDEX, 0, &req)
    }

    fn irb(&self) -> Irb {
        let mut b = [0u8; 124];
        assert_eq!(self.dev.read_region(IO_REGION_INDEX, 0, &mut b), Ok(124));
        CcwIoRegion::from_bytes(&b).irb()
    }

    /// Waits for the IO eventfd and returns the IRB of the I/O region.
    fn wait_irb(&self) -> Irb {
        wait_signal(&self.io);
        self.irb()
    }

    /// Runs the program at `cpa` to its final status, which must leave the device idle and
    /// unpinned.
    fn run(&self, cpa: u64) -> Irb {
        self.probe.reset();
        assert_eq!(self.ssch(cpa), Ok(124));
        let irb = self.wait_irb();
        self.wait_state(State::Idle);
        assert_eq!(self.pinned(), 0);
        irb
    }

    fn wait_state(&self, want: State) {
        let t0 = Instant::now();
        while self.dev.state() != want {
            assert!(
                t0.elapsed() < WAIT,
                "state {:?} != {want:?}",
                self.dev.state()
            );
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn cmd(&self, command: u32) -> Result<usize, DeviceError> {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&command.to_ne_bytes());
        self.dev.write_region(ASYNC_REGION_INDEX, 0, &b)
    }

    /// Waits until the subchannel shows function `f` (halt or clear) in progress or done.
    fn wait_function(&self, f: u8) {
        let t0 = Instant::now();
        while self.sub.store_schib().unwrap().scsw.flags.fctl() & f == 0 {
            assert!(
                t0.elapsed() < WAIT,
                "function {f:#x} never reached the subchannel"
            );
            thread::sleep(Duration::from_micros(100));
        }
    }

    fn schib(&self) -> vccw::orb::Schib {
        let mut b = [0u8; 52];
        assert_eq!(self.dev.read_region(SCHIB_REGION_INDEX, 0, &mut b), Ok(52));
        CcwSchibRegion::from_bytes(&b).schib()
    }

    fn read_crw(&self) -> [u8; 4] {
        let mut b = [0u8; 8];
        assert_eq!(self.dev.read_region(CRW_REGION_INDEX, 0, &mut b), Ok(8));
        [b[0], b[1], b[2], b[3]]
    }

    /// Leak checks: no pins; after dropping everything, the model is gone and so is the
    /// channel thread; the store's mappings all unmap.
    fn finish(self) {
        let Rig {
            store,
            data,
            sub,
            dev,
            io,
            crw,
            probe,
            devno,
        } = self;
        assert_eq!(store.stats().pinned_pages, 0, "pins leaked");
        drop(dev);
        drop(sub);
        // The last reference may have gone on the channel thread itself (an interrupt in
        // flight), which then exits on its own: allow it a bounded moment.
        let name = format!("vccw-chan-{devno:04x}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while (!probe.dropped.load(Ordering::SeqCst) || thread_names().contains(&name))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(probe.dropped.load(Ordering::SeqCst), "device model leaked");
        assert!(
            !thread_names().contains(&name),
            "channel thread {name} still running"
        );
        store.unmap_dma(0, 0, true).unwrap();
        assert_eq!(store.stats().mappings, 0);
        drop((data, io, crw));
    }
}

fn orb(cpa: u64) -> Orb {
    Orb {
        intparm: 0xfa17,
        ctl: OrbControls::new()
            .with_format1(true)
            .with_prefetch(true)
            .with_lpm(0x80),
        cpa: cpa as u32,
    }
}

fn ccw(code: u8, count: u16, cda: u64, cc: bool) -> Ccw1 {
    Ccw1 {
        cmd: code,
        flags: CcwFlags::new().with_cc(cc).with_sli(true),
        count,
        cda: cda as u32,
    }
}

fn tic(to: u64) -> Ccw1 {
    Ccw1 {
        cmd: 0x08,
        flags: CcwFlags::new(),
        count: 0,
        cda: to as u32,
    }
}

/// A chain of `n` commands `code` (command chained), data at `data + i * stride`.
fn chain(code: u8, n: usize, count: u16, data: u64, stride: u64) -> Vec<Ccw1> {
    (0..n)
        .map(|i| ccw(code, count, data + i as u64 * stride, i + 1 < n))
        .collect()
}

fn block(i: usize) -> Vec<u8> {
    vec![i as u8 + 1; 80]
}

/// A 3490 with a tape of `n` 80-byte blocks (block i filled with i + 1).
fn tape_with(dir: &Path, n: usize) -> (Box<dyn DeviceModel>, PathBuf) {
    let path = dir.join("t.aws");
    let mut t = AwsTape::create(&path).unwrap();
    for i in 0..n {
        t.write_block(&block(i)).unwrap();
    }
    (
        Box::new(Tape3490::with_tape(t, Tape3490Config::default())),
        path,
    )
}

fn sense(irb: &Irb) -> Vec<u8> {
    irb.concurrent_sense()
        .expect("unit check carries concurrent sense")
        .to_vec()
}

// ---------------------------------------------------------------------------------------
// 1. Unmap and VADDR invalidation while I/O is in flight.

/// Four Read Forward CCWs into four data pages.
fn read_four(r: &Rig) {
    r.ccws(PROG, &chain(cmd::READ_FORWARD, 4, 80, DATA, PAGE_SIZE));
}

fn rewind(r: &Rig) {
    r.ccws(PROG + 0x800, &[ccw(cmd::REWIND, 0, 0, false)]);
    let irb = r.run(PROG + 0x800);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
}

#[test]
fn unmap_during_io_resets_the_device_and_the_next_io_works() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 4);
    let r = rig(model, 0xf101);
    read_four(&r);
    r.probe.arm(2);
    assert_eq!(r.ssch(PROG), Ok(124));
    r.probe.wait_entered();
    assert_eq!(r.pinned(), 4);
    // The unmap hits the pins: it resets the device, whose CLEAR waits for the channel
    // thread, which the gate holds; so unmap from another thread and open the gate once the
    // clear reached the subchannel.
    let t0 = Instant::now();
    let store = r.store.clone();
    let unmapper = thread::spawn(move || store.unmap_dma(DATA, DATA_SIZE, false));
    r.wait_function(fctl::CLEAR);
    r.probe.release();
    assert_eq!(unmapper.join().unwrap(), Ok(DATA_SIZE));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let s = r.store.stats();
    assert_eq!((s.pinned_pages, s.mappings), (0, 1));
    assert_eq!(r.dev.state(), State::Idle);
    assert!(!r.dev.has_program());
    // The program stopped at the clear: the third command never ran.
    assert_eq!(r.probe.executed(), 2);
    assert!(r.probe.resets.load(Ordering::SeqCst) >= 1);
    // A program touching the unmapped range is refused (EFAULT), one inside mappings runs.
    r.probe.reset();
    assert_eq!(r.ssch(PROG), Err(DeviceError::Refused(libc::EFAULT)));
    assert_eq!(r.dev.state(), State::Idle);
    map_data(&r.store, &r.data);
    rewind(&r);
    read_four(&r);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    assert_eq!(irb.scsw.cpa as u64, PROG + 32);
    for i in 0..4 {
        let mut b = [0u8; 80];
        r.store.read(DATA + i * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b.to_vec(), block(i as usize));
    }
    r.finish();
}

#[test]
fn vaddr_invalidation_during_io_fails_new_pins_with_ebusy_until_update() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 4);
    let r = rig(model, 0xf102);
    read_four(&r);
    r.probe.arm(1);
    assert_eq!(r.ssch(PROG), Ok(124));
    r.probe.wait_entered();
    // Invalidation neither waits for the pins nor resets the device.
    r.store.invalidate_vaddr(DATA, DATA_SIZE).unwrap();
    assert_eq!(r.store.stats().invalid_vaddrs, 1);
    assert_eq!(r.dev.state(), State::CpPending);
    assert_eq!(
        r.store.pin(DATA, 1, Perm::WRITE).unwrap_err(),
        StoreError::VaddrInvalid(DATA)
    );
    r.probe.release();
    // The program in flight completes into the memory its pins hold.
    let irb = r.wait_irb();
    r.wait_state(State::Idle);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    assert_eq!(r.pinned(), 0);
    // SAFETY-free check through the region itself: the data reached the caller's memory.
    let mut b = [0u8; 80];
    for i in 0..4usize {
        vm_memory::VolatileMemory::get_slice(&*r.data, i * PAGE_SIZE as usize, 80)
            .unwrap()
            .copy_to(&mut b[..]);
        assert_eq!(b.to_vec(), block(i));
    }
    // No data, no pins: a rewind still runs. A read needs a pin: EBUSY.
    rewind(&r);
    assert_eq!(r.ssch(PROG), Err(DeviceError::Refused(libc::EBUSY)));
    assert_eq!((r.dev.state(), r.pinned()), (State::Idle, 0));
    r.store
        .update_vaddr(
            DATA,
            DATA_SIZE,
            Backing::Region {
                region: r.data.clone(),
                offset: 0,
            },
        )
        .unwrap();
    assert_eq!(r.store.stats().invalid_vaddrs, 0);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    r.finish();
}

// ---------------------------------------------------------------------------------------
// 2. HSCH and CSCH at every point of a long chain.

const N: usize = 64;
const STRIDE: u64 = 0x80;

fn check_buffers(r: &Rig, k: usize) {
    let mut all = vec![0u8; N * STRIDE as usize];
    r.store.read(DATA, &mut all).unwrap();
    for i in 0..N {
        let got = &all[i * STRIDE as usize..i * STRIDE as usize + 80];
        let want = if i < k { block(i) } else { vec![0; 80] };
        assert_eq!(got, &want[..], "buffer {i} after {k} commands");
    }
}

/// Stops the N-read chain after `k` completed commands with `command` (HSCH or CSCH),
/// issued from another thread while the channel thread is held between two commands.
fn stop_at(r: &Rig, k: usize, command: u32) -> Irb {
    rewind(r);
    r.store
        .write(DATA, &vec![0u8; N * STRIDE as usize])
        .unwrap();
    r.ccws(PROG, &chain(cmd::READ_FORWARD, N, 80, DATA, STRIDE));
    r.probe.arm(k as u32);
    assert_eq!(r.ssch(PROG), Ok(124));
    r.probe.wait_entered();
    let f = if command == VFIO_CCW_ASYNC_CMD_HSCH {
        fctl::HALT
    } else {
        fctl::CLEAR
    };
    let irb = thread::scope(|s| {
        let h = s.spawn(|| r.cmd(command));
        r.wait_function(f);
        r.probe.release();
        assert_eq!(h.join().unwrap(), Ok(8));
        r.wait_irb()
    });
    r.wait_state(State::Idle);
    assert_eq!(r.pinned(), 0, "pins after stopping at {k}");
    assert!(!r.dev.has_program());
    assert_eq!(r.probe.executed() as usize, k, "commands run");
    check_buffers(r, k);
    irb
}

#[test]
fn halt_at_every_point_of_a_64_ccw_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), N);
    let r = rig(model, 0xf201);
    for k in 1..=N {
        let irb = stop_at(&r, k, VFIO_CCW_ASYNC_CMD_HSCH);
        let s = irb.scsw;
        assert_eq!(s.cpa as u64, PROG + 8 * k as u64, "CPA after {k}");
        assert_eq!(s.cstat, 0);
        if k < N {
            // Halted between commands: halt function, status pending, device end only.
            assert_eq!(s.flags.fctl(), fctl::START | fctl::HALT, "fctl at {k}");
            assert_eq!(s.flags.stctl(), stctl::STATUS_PENDING, "stctl at {k}");
            assert_eq!(s.dstat, dstat::DEVICE_END);
        } else {
            // The last command ended the program: its final status, with the halt function.
            assert_eq!(s.flags.fctl(), fctl::START | fctl::HALT);
            assert_eq!(
                s.flags.stctl(),
                stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
            );
            assert_eq!(s.dstat, CE_DE);
        }
    }
    // The tape is where the halt left it (after block N), and usable.
    r.ccws(PROG, &[ccw(cmd::READ_BACKWARD, 80, DATA, false)]);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    r.finish();
}

#[test]
fn clear_at_every_point_of_a_64_ccw_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), N);
    let r = rig(model, 0xf202);
    for k in 1..=N {
        let irb = stop_at(&r, k, VFIO_CCW_ASYNC_CMD_CSCH);
        let s = irb.scsw;
        // The clear function: no CPA, no device or subchannel status.
        assert_eq!(s.flags.fctl(), fctl::CLEAR, "fctl at {k}");
        assert_eq!(s.flags.stctl(), stctl::STATUS_PENDING);
        assert_eq!((s.cpa, s.dstat, s.cstat, s.count), (0, 0, 0, 0));
    }
    rewind(&r);
    r.ccws(PROG, &[ccw(cmd::READ_FORWARD, 80, DATA, false)]);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    r.finish();
}

#[test]
fn halt_racing_the_start_is_consistent() {
    // HSCH straight after SSCH: the halt finds the start pending (no command run, CPA =
    // the ORB's) or a command boundary (CPA after the last command run, device end).
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), N);
    let r = rig(model, 0xf203);
    let (mut before_first, mut ended_first) = (0, 0);
    for _ in 0..20 {
        rewind(&r);
        r.store
            .write(DATA, &vec![0u8; N * STRIDE as usize])
            .unwrap();
        r.ccws(PROG, &chain(cmd::READ_FORWARD, N, 80, DATA, STRIDE));
        r.probe.reset();
        assert_eq!(r.ssch(PROG), Ok(124));
        assert_eq!(r.cmd(VFIO_CCW_ASYNC_CMD_HSCH), Ok(8));
        let s = r.wait_irb().scsw;
        r.wait_state(State::Idle);
        assert_eq!(r.pinned(), 0);
        let k = r.probe.executed() as usize;
        if s.flags.fctl() == fctl::START {
            // The program ended and its status was taken before the HSCH reached the idle
            // subchannel: that halt signal then ends with device end on its own.
            assert_eq!((k, s.dstat, s.cstat), (N, CE_DE, 0));
            let h = r.wait_irb().scsw;
            assert_eq!((h.flags.fctl(), h.dstat), (fctl::HALT, dstat::DEVICE_END));
            ended_first += 1;
        } else {
            assert!(s.flags.fctl() & fctl::HALT != 0, "{s:?} after {k}");
        }
        assert_eq!(s.cpa as u64, PROG + 8 * k as u64, "CPA after {k}");
        if k == 0 {
            before_first += 1;
            assert_eq!(s.dstat, 0);
        } else if k < N {
            assert_eq!(s.dstat, dstat::DEVICE_END);
        }
        check_buffers(&r, k);
    }
    eprintln!("halt before the first command: {before_first}/20, after the end: {ended_first}/20");
    r.finish();
}

// ---------------------------------------------------------------------------------------
// 3. Image files failing mid-write.

fn dasd_image(dir: &Path) -> PathBuf {
    let path = dir.join("d.ckd");
    drop(CkdImage::create_3390(&path, 1, Some("VOL001")).unwrap());
    path
}

fn de(mask: u8, cyl: u16, blksize: u16) -> Vec<u8> {
    vccw::client::workload::define_extent(mask, (cyl, 0), (cyl, 14), blksize).to_vec()
}

fn lr(oper: u8, count: u8, cyl: u16, head: u16, rec: u8) -> Vec<u8> {
    vccw::client::workload::locate_record(oper, count, cyl, head, rec, 0).to_vec()
}

fn ckd_record(head: u16, rec: u8, len: usize) -> Vec<u8> {
    let mut d = vec![0, 0];
    d.extend_from_slice(&head.to_be_bytes());
    d.extend_from_slice(&[rec, 0]);
    d.extend_from_slice(&(len as u16).to_be_bytes());
    d.extend(std::iter::repeat_n(rec, len));
    d
}

const REC_LEN: usize = 100;
/// Bytes of one Write CKD in the file: count, data, and the end-of-track marker after it.
const REC_WRITE: u64 = (8 + REC_LEN + 8) as u64;

/// Format-writes R1..R3 on track (0, 1): Define Extent, Locate Record, 3 x Write CKD.
fn dasd_format_three(r: &Rig) {
    let area = DATA;
    r.store.write(area, &de(0xC0, 0, REC_LEN as u16)).unwrap();
    r.store.write(area + 0x100, &lr(0x03, 3, 0, 1, 0)).unwrap();
    let mut prog = vec![ccw(0x63, 16, area, true), ccw(0x47, 16, area + 0x100, true)];
    for rec in 1..=3u8 {
        let at = area + 0x200 * u64::from(rec);
        r.store.write(at, &ckd_record(1, rec, REC_LEN)).unwrap();
        prog.push(ccw(0x1D, (8 + REC_LEN) as u16, at, rec < 3));
    }
    r.ccws(PROG, &prog);
}

/// The records of track (0, 1) as the file holds them now.
fn track_records(path: &Path) -> Result<Vec<(u8, Vec<u8>)>, CkdError> {
    let img = CkdImage::open(path, CkdOpenOptions::default())?;
    let mut buf = vec![0u8; img.track_size()];
    let layout = img.read_track(0, 1, &mut buf)?;
    Ok(layout
        .records
        .iter()
        .map(|l| {
            let d = l.offset + 8 + l.count.key_len as usize;
            (l.count.rec, buf[d..d + l.count.data_len as usize].to_vec())
        })
        .collect())
}

fn dasd_write_fault(
    devno: u16,
    errno: i32,
    budget: u64,
) -> (Irb, Vec<u8>, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dasd_image(dir.path());
    let (file, ctl) = faulty(&path);
    let img = CkdImage::from_backing(
        file,
        CkdOpenOptions {
            read_only: false,
            sync_writes: true,
        },
    )
    .unwrap();
    let r = rig(Box::new(Dasd3390::new(img, devno).unwrap()), devno);
    dasd_format_three(&r);
    ctl.arm(budget, errno);
    let irb = r.run(PROG);
    let sense = sense(&irb);
    ctl.disarm();
    // The device is usable after: the same program now succeeds.
    let ok = r.run(PROG);
    assert_eq!((ok.scsw.dstat, ok.scsw.cstat), (CE_DE, 0));
    r.finish();
    (irb, sense, path, dir)
}

#[test]
fn dasd_write_failing_with_eio_is_equipment_check_and_keeps_earlier_records() {
    // R1 reaches the file; the write of R2 fails before any byte.
    let (irb, sense, path, _dir) = dasd_write_fault(0xf301, libc::EIO, REC_WRITE);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE_UC, 0));
    assert_eq!(
        irb.scsw.cpa as u64,
        PROG + 8 * 4,
        "CPA after the failing CCW"
    );
    assert_eq!(irb.scsw.flags.stctl() & stctl::ALERT, stctl::ALERT);
    assert_eq!(sense[0], 0x10, "equipment check");
    // (After the fault the same program was run again and succeeded: R1..R3.)
    let recs = track_records(&path).unwrap();
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[2], (2, vec![2; REC_LEN]));
}

#[test]
fn dasd_write_failing_before_any_byte_leaves_a_parseable_track() {
    let dir = tempfile::tempdir().unwrap();
    let path = dasd_image(dir.path());
    let (file, ctl) = faulty(&path);
    let img = CkdImage::from_backing(file, CkdOpenOptions::default()).unwrap();
    let r = rig(Box::new(Dasd3390::new(img, 0xf302).unwrap()), 0xf302);
    dasd_format_three(&r);
    ctl.arm(REC_WRITE, libc::ENOSPC);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE_UC, 0));
    assert_eq!(sense(&irb)[0], 0x10);
    // R0 and R1 are there, R2 never was: the track parses.
    let recs = track_records(&path).unwrap();
    assert_eq!(recs, vec![(0, vec![0; 8]), (1, vec![1; REC_LEN])]);
    r.finish();
}

#[test]
fn dasd_write_torn_mid_record_keeps_the_track_parseable() {
    // R1 and half of R2's data reach the file, then ENOSPC. The model writes a record's
    // count field last, so the torn record is not there at all.
    let dir = tempfile::tempdir().unwrap();
    let path = dasd_image(dir.path());
    let (file, ctl) = faulty(&path);
    let img = CkdImage::from_backing(file, CkdOpenOptions::default()).unwrap();
    let r = rig(Box::new(Dasd3390::new(img, 0xf303).unwrap()), 0xf303);
    dasd_format_three(&r);
    ctl.arm(REC_WRITE + 50, libc::ENOSPC);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE_UC, 0));
    assert_eq!(irb.scsw.cpa as u64, PROG + 8 * 4);
    assert_eq!(sense(&irb)[0], 0x10);
    let raw = std::fs::read(&path).unwrap();
    let r2_data = DEVHDR_SIZE + TRACK_SIZE_3390 as usize + 5 + 16 + REC_WRITE as usize - 8 + 8;
    assert_eq!(&raw[r2_data..r2_data + 50], &[2u8; 50][..], "the torn part");
    let recs = track_records(&path).unwrap();
    assert_eq!(recs, vec![(0, vec![0; 8]), (1, vec![1; REC_LEN])]);
    // The device re-reads the track and goes on.
    ctl.disarm();
    let ok = r.run(PROG);
    assert_eq!((ok.scsw.dstat, ok.scsw.cstat), (CE_DE, 0));
    assert_eq!(track_records(&path).unwrap().len(), 4);
    r.finish();
}

#[test]
fn dasd_fdatasync_failure_is_equipment_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dasd_image(dir.path());
    let (file, ctl) = faulty(&path);
    let img = CkdImage::from_backing(
        file,
        CkdOpenOptions {
            read_only: false,
            sync_writes: true,
        },
    )
    .unwrap();
    let r = rig(Box::new(Dasd3390::new(img, 0xf304).unwrap()), 0xf304);
    dasd_format_three(&r);
    ctl.fail_sync.store(true, Ordering::SeqCst);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE_UC, 0));
    // The first Write CKD already fails: CPA after CCW 2.
    assert_eq!(irb.scsw.cpa as u64, PROG + 8 * 3);
    assert_eq!(sense(&irb)[0], 0x10);
    ctl.disarm();
    let ok = r.run(PROG);
    assert_eq!((ok.scsw.dstat, ok.scsw.cstat), (CE_DE, 0));
    r.finish();
}

/// Three Write CCWs of 100 bytes each (block i filled with 0x10 + i).
fn tape_write_three(r: &Rig) {
    for i in 0..3u64 {
        r.store
            .write(DATA + i * 0x100, &[0x10 + i as u8; 100])
            .unwrap();
    }
    r.ccws(PROG, &chain(cmd::WRITE, 3, 100, DATA, 0x100));
}

fn tape_write_fault(devno: u16, errno: i32, era: u8) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.aws");
    drop(AwsTape::create(&path).unwrap());
    let (file, ctl) = faulty(&path);
    let tape = AwsTape::from_backing(file, &path, OpenMode::ReadWrite).unwrap();
    let r = rig(
        Box::new(Tape3490::with_tape(tape, Tape3490Config::default())),
        devno,
    );
    tape_write_three(&r);
    // Block 1 (6 + 100 bytes) and part of block 2 reach the file, then the error.
    ctl.arm(106 + 40, errno);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE_UC, 0));
    assert_eq!(irb.scsw.cpa as u64, PROG + 8 * 2);
    let s = sense(&irb);
    assert_eq!((s[0], s[3]), (0x10, era), "equipment check, ERA");
    // The file was cut back to the end of block 1: it parses, block 1 intact.
    ctl.disarm();
    let mut t = AwsTape::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(t.len(), 106);
    let mut buf = Vec::new();
    assert_eq!(
        t.read_forward(&mut buf).unwrap(),
        Record::Block {
            len: 100,
            segments: 1
        }
    );
    assert_eq!(buf, vec![0x10; 100]);
    // The drive is usable: the write resumes at the failed block's place.
    r.ccws(PROG, &[ccw(cmd::WRITE, 100, DATA + 0x100, false)]);
    let ok = r.run(PROG);
    assert_eq!((ok.scsw.dstat, ok.scsw.cstat), (CE_DE, 0));
    let mut t = AwsTape::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(t.map().unwrap().len(), 2);
    r.finish();
}

#[test]
fn tape_write_failing_with_eio_is_equipment_check_and_keeps_earlier_blocks() {
    tape_write_fault(0xf305, libc::EIO, 0x2C);
}

#[test]
fn tape_write_failing_with_enospc_is_physical_end_and_keeps_earlier_blocks() {
    tape_write_fault(0xf306, libc::ENOSPC, 0x38);
}

#[test]
fn tape_on_a_full_host_device_is_unit_check_never_success() {
    // A real ENOSPC: /dev/full fails every write.
    let t = AwsTape::open("/dev/full", OpenMode::ReadWrite).unwrap();
    let r = rig(
        Box::new(Tape3490::with_tape(t, Tape3490Config::default())),
        0xf307,
    );
    tape_write_three(&r);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE_UC, 0));
    assert_eq!(irb.scsw.cpa as u64, PROG + 8);
    let s = sense(&irb);
    assert_eq!((s[0], s[3]), (0x10, 0x38));
    r.finish();
}

// ---------------------------------------------------------------------------------------
// 4. A channel path going offline and back.

#[test]
fn path_offline_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 2);
    let r = rig(model, 0xf401);
    let s = r.schib();
    assert_eq!((s.pmcw.pim, s.pmcw.pam, s.pmcw.pom), (0x80, 0x80, 0x80));
    assert_eq!(s.pmcw.chpid[0], CHPID);
    assert_eq!(take(&r.crw), 0);

    assert!(r.sub.set_path_online(CHPID, false));
    wait_signal(&r.crw);
    // CRW: channel path (RSC 4), permanent error not initialized (ERC 6), RSID = CHPID.
    assert_eq!(r.read_crw(), [0x04, 0x06, 0x00, CHPID]);
    assert_eq!(r.read_crw(), [0; 4], "one CRW only");
    let s = r.schib();
    assert_eq!((s.pmcw.pam, s.pmcw.pom, s.pmcw.pnom), (0, 0, 0x80));
    // No path left: cc3, ENODEV (EACCES only when other paths remain).
    r.ccws(PROG, &[ccw(cmd::READ_FORWARD, 80, DATA, false)]);
    assert_eq!(r.ssch(PROG), Err(DeviceError::Refused(libc::ENODEV)));
    assert_eq!((r.dev.state(), r.pinned()), (State::Idle, 0));
    assert_eq!(r.probe.executed(), 0);

    assert!(r.sub.set_path_online(CHPID, true));
    wait_signal(&r.crw);
    assert_eq!(r.read_crw(), [0x04, 0x02, 0x00, CHPID]);
    assert_eq!(r.read_crw(), [0; 4]);
    let s = r.schib();
    assert_eq!((s.pmcw.pam, s.pmcw.pom, s.pmcw.pnom), (0x80, 0x80, 0));
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    assert_eq!(irb.to_bytes()[13], 0x80, "LPUM");
    r.finish();
}

// ---------------------------------------------------------------------------------------
// 5. Limits.

#[test]
fn the_65536th_mapping_is_enospc() {
    let store = IommuStore::new(StoreConfig::default());
    let n = DEFAULT_DMA_ENTRY_LIMIT as u64;
    // One reserve of n + 1 pages; every mapping aliases one page of it (no mmap each).
    let mem = Arc::new(StoreMmapRegion::new(((n + 1) * PAGE_SIZE) as usize).unwrap());
    let map = |i: u64| {
        store.map_dma(
            i * PAGE_SIZE,
            PAGE_SIZE,
            Perm::READ_WRITE,
            Backing::Region {
                region: mem.clone(),
                offset: i * PAGE_SIZE,
            },
        )
    };
    for i in 0..n {
        map(i).unwrap();
    }
    assert_eq!(store.stats().mappings, 65_535);
    assert_eq!(store.info().dma_avail, 0);
    let e = map(n).unwrap_err();
    assert_eq!(e, StoreError::NoSpace(65_535));
    assert_eq!(e.errno(), libc::ENOSPC);
    // The store is intact: one unmap makes room for exactly one map.
    assert_eq!(store.unmap_dma(0, PAGE_SIZE, false), Ok(PAGE_SIZE));
    map(n).unwrap();
    assert_eq!(map(0).unwrap_err().errno(), libc::ENOSPC);
    store.write(n * PAGE_SIZE, b"last").unwrap();
    assert_eq!(store.unmap_dma(0, 0, true), Ok(n * PAGE_SIZE));
    assert_eq!(store.stats().mappings, 0);
}

/// Runs (or refuses) the program at PROG on a tape rig; `Ok(irb)` when it started.
fn try_run(r: &Rig) -> Result<Irb, DeviceError> {
    r.probe.reset();
    let res = r.ssch(PROG).map(|_| r.wait_irb());
    r.wait_state(State::Idle);
    assert_eq!(r.pinned(), 0);
    res
}

#[test]
fn segment_length_limit_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 0);
    let r = rig(model, 0xf501);
    // 256 Sense CCWs in one segment: the limit, accepted and run.
    r.ccws(PROG, &chain(cmd::SENSE, 256, 32, DATA, 0));
    let irb = try_run(&r).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    assert_eq!(irb.scsw.cpa as u64, PROG + 8 * 256);
    assert_eq!(r.probe.executed(), 256);
    // 257: refused before anything runs, EINVAL.
    r.ccws(PROG, &chain(cmd::SENSE, 257, 32, DATA, 0));
    assert_eq!(try_run(&r).unwrap_err(), DeviceError::Refused(libc::EINVAL));
    assert_eq!(r.probe.executed(), 0);
    // 255 NOOPs (no data transfer): accepted; 256: refused as a channel loop.
    r.ccws(PROG, &chain(cmd::NOP, 255, 0, 0, 0));
    let irb = try_run(&r).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    r.ccws(PROG, &chain(cmd::NOP, 256, 0, 0, 0));
    assert_eq!(try_run(&r).unwrap_err(), DeviceError::Refused(libc::EINVAL));
    r.finish();
}

#[test]
fn segment_length_limit_as_channel_status() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 0);
    let r = rig_with(
        model,
        0xf502,
        DeviceConfig {
            errors_as_status: true,
            quiesce_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    );
    // A mediator limit: unit exception.
    r.ccws(PROG, &chain(cmd::SENSE, 257, 32, DATA, 0));
    let irb = try_run(&r).unwrap();
    assert_eq!(
        (irb.scsw.dstat, irb.scsw.cstat),
        (CE_DE | dstat::UNIT_EXCEPTION, 0)
    );
    // An architectural one (a channel loop): program check.
    r.ccws(PROG, &chain(cmd::NOP, 256, 0, 0, 0));
    let irb = try_run(&r).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (0, cstat::PROGRAM_CHECK));
    assert_eq!(r.probe.executed(), 0);
    r.finish();
}

/// `n` segments: each a Sense then a TIC to the next, the last a lone Sense.
fn segments(r: &Rig, n: usize) {
    for i in 0..n {
        let at = PROG + i as u64 * 0x100;
        if i + 1 < n {
            r.ccws(at, &[ccw(cmd::SENSE, 32, DATA, true), tic(at + 0x100)]);
        } else {
            r.ccws(at, &[ccw(cmd::SENSE, 32, DATA, false)]);
        }
    }
}

#[test]
fn segment_count_limit_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 0);
    let r = rig(model, 0xf503);
    segments(&r, 16);
    let irb = try_run(&r).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    assert_eq!(irb.scsw.cpa as u64, PROG + 15 * 0x100 + 8);
    assert_eq!(r.probe.executed(), 16);
    segments(&r, 17);
    assert_eq!(try_run(&r).unwrap_err(), DeviceError::Refused(libc::EINVAL));
    assert_eq!(r.probe.executed(), 0);
    r.finish();
}

#[test]
fn tic_loops_end_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 0);
    let r = rig(model, 0xf504);
    // A TIC to itself: TIC to TIC, refused.
    let t0 = Instant::now();
    r.ccws(PROG, &[tic(PROG)]);
    assert_eq!(try_run(&r).unwrap_err(), DeviceError::Refused(libc::EINVAL));
    assert!(t0.elapsed() < Duration::from_secs(1));
    // NOOP + TIC back to it: no data ever moves; the channel ends it with a program check.
    let t0 = Instant::now();
    r.ccws(PROG, &[ccw(cmd::NOP, 0, 0, true), tic(PROG)]);
    let irb = try_run(&r).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(irb.scsw.cstat, cstat::PROGRAM_CHECK);
    assert_eq!(irb.scsw.dstat & dstat::UNIT_CHECK, 0);
    // Two segments TICing to each other, no data transfer.
    let t0 = Instant::now();
    r.ccws(PROG, &[ccw(cmd::NOP, 0, 0, true), tic(PROG + 0x100)]);
    r.ccws(PROG + 0x100, &[ccw(cmd::NOP, 0, 0, true), tic(PROG)]);
    let irb = try_run(&r).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(irb.scsw.cstat, cstat::PROGRAM_CHECK);
    r.finish();
}

#[test]
fn a_looping_program_that_moves_data_runs_until_halted_or_cleared() {
    // Sense + TIC back: legal and endless (as on a real channel); HSCH and CSCH end it.
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tape_with(dir.path(), 0);
    let r = rig(model, 0xf505);
    for (command, f) in [
        (VFIO_CCW_ASYNC_CMD_HSCH, fctl::START | fctl::HALT),
        (VFIO_CCW_ASYNC_CMD_CSCH, fctl::CLEAR),
    ] {
        r.ccws(PROG, &[ccw(cmd::SENSE, 32, DATA, true), tic(PROG)]);
        r.probe.reset();
        assert_eq!(r.ssch(PROG), Ok(124));
        let t0 = Instant::now();
        while r.probe.executed() < 1000 {
            assert!(t0.elapsed() < WAIT);
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(r.dev.state(), State::CpPending);
        let t0 = Instant::now();
        assert_eq!(r.cmd(command), Ok(8));
        let s = r.wait_irb().scsw;
        r.wait_state(State::Idle);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert_eq!(s.flags.fctl(), f);
        assert_eq!(r.pinned(), 0);
        let n = r.probe.executed();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(r.probe.executed(), n, "the loop stopped");
    }
    r.finish();
}

// ---------------------------------------------------------------------------------------
// 6. Malformed images.

#[test]
fn malformed_ckd_images_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(dasd_image(dir.path())).unwrap();
    let try_open = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        CkdImage::open(&p, CkdOpenOptions::default())
    };
    // Truncated header.
    let e = try_open("short.ckd", &good[..100]).unwrap_err();
    assert!(matches!(e, CkdError::Truncated { len: 100 }), "{e}");
    assert_eq!(
        (e.errno(), e.to_string().contains("truncated")),
        (libc::EINVAL, true)
    );
    // Wrong magic.
    let mut b = good.clone();
    b[..8].copy_from_slice(b"NOT_CKD!");
    let e = try_open("magic.ckd", &b).unwrap_err();
    assert!(
        matches!(e, CkdError::BadMagic(m) if &m == b"NOT_CKD!"),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("not a CKD image"));
    // Bad track length in the header: too small, too large, and not the file's layout.
    for (ts, name) in [(10u32, "ts-small"), (2 << 20, "ts-large")] {
        let mut b = good.clone();
        b[12..16].copy_from_slice(&ts.to_le_bytes());
        let e = try_open(name, &b).unwrap_err();
        assert!(
            matches!(e, CkdError::BadGeometry { heads: 15, track_size } if track_size == ts),
            "{e}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
    }
    let mut b = good.clone();
    b[12..16].copy_from_slice(&(TRACK_SIZE_3390 + 512).to_le_bytes());
    let e = try_open("ts-other.ckd", &b).unwrap_err();
    assert!(matches!(e, CkdError::PartialCylinder { .. }), "{e}");
    // Wrong device type: a valid CKD image, not a 3390.
    let mut b = good.clone();
    b[16] = 0x80;
    let p = dir.path().join("3380.ckd");
    std::fs::write(&p, &b).unwrap();
    let img = CkdImage::open(&p, CkdOpenOptions::default()).unwrap();
    let e = Dasd3390::new(img, 0).unwrap_err();
    assert!(
        matches!(e, DasdError::NotA3390 { dev_type: 0x80, .. }),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EINVAL);
    // A track whose record overflows it: the image opens, the track is refused (EIO).
    let mut b = good.clone();
    let t1 = DEVHDR_SIZE + TRACK_SIZE_3390 as usize;
    // R0's count field on track (0, 1): data length 0xFFFF runs past the slot.
    b[t1 + 5 + 6..t1 + 5 + 8].copy_from_slice(&[0xFF, 0xFF]);
    let p = dir.path().join("overflow.ckd");
    std::fs::write(&p, &b).unwrap();
    let img = CkdImage::open(&p, CkdOpenOptions::default()).unwrap();
    let mut buf = vec![0u8; img.track_size()];
    let e = img.read_track(0, 1, &mut buf).unwrap_err();
    assert!(
        matches!(
            e,
            CkdError::TrackOverflow {
                cyl: 0,
                head: 1,
                offset: 5
            }
        ),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EIO);
    // Through the stack: a Seek to that track is a unit check with data check sense.
    let r = rig(Box::new(Dasd3390::new(img, 0xf601).unwrap()), 0xf601);
    r.store.write(DATA, &[0, 0, 0, 0, 0, 1]).unwrap();
    r.ccws(PROG, &[ccw(0x07, 6, DATA, false)]);
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE_UC, 0));
    assert_eq!(sense(&irb)[0], 0x08, "data check");
    // Track (0, 0) still reads.
    r.store.write(DATA, &[0, 0, 0, 0, 0, 0]).unwrap();
    let irb = r.run(PROG);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    r.finish();
}

#[test]
fn malformed_awstape_files_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        AwsTape::open(&p, OpenMode::ReadOnly)
    };
    // Two good blocks of 4 bytes: [hdr cur=4 prev=0 0xA0][data][hdr cur=4 prev=4 0xA0][data].
    let good: Vec<u8> = [
        &[4, 0, 0, 0, 0xA0, 0][..],
        b"abcd",
        &[4, 0, 4, 0, 0xA0, 0],
        b"efgh",
    ]
    .concat();
    assert_eq!(open("good.aws", &good).unwrap().map().unwrap().len(), 2);
    // Truncated header.
    let e = open("short.aws", &good[..13]).unwrap_err();
    assert!(matches!(e, AwsError::TruncatedHeader { offset: 10 }), "{e}");
    assert!(e.is_malformed() && e.errno() == libc::EINVAL);
    assert!(e
        .to_string()
        .contains("truncated segment header at offset 10"));
    // Inconsistent previous-length chain.
    let mut b = good.clone();
    b[12] = 3;
    let e = open("chain.aws", &b).unwrap_err();
    assert!(
        matches!(
            e,
            AwsError::ChainMismatch {
                offset: 10,
                expected: 4,
                found: 3
            }
        ),
        "{e}"
    );
    assert!(e.is_malformed() && e.errno() == libc::EINVAL);
    assert!(e.to_string().contains("length chain broken"));
    // Bad flags: HET compression bits, and a non-zero second flags byte.
    for (i, v, name) in [(4usize, 0xA3u8, "f1.aws"), (5, 0x01, "f2.aws")] {
        let mut b = good.clone();
        b[i] = v;
        let e = open(name, &b).unwrap_err();
        assert!(matches!(e, AwsError::BadFlags { offset: 0, .. }), "{e}");
        assert!(e.is_malformed() && e.errno() == libc::EINVAL);
        assert!(e.to_string().contains("bad flags"));
    }
}
