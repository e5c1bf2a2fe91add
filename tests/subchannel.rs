//! The emulated subchannel: real translated programs (stand-in store + translator) run on the
//! channel thread over a loopback device, with interrupts observed through the event sink.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use vccw::ccw::{translate, Ccw1, CcwFlags, HostProgram, TranslateConfig};
use vccw::css::device::{Command, DeviceIdentity, DeviceModel, Outcome};
use vccw::css::subchannel::SENSE_EQUIPMENT_CHECK;
use vccw::css::{
    EmulatedSubchannel, InlinePolicy, LoopbackDevice, SpinPolicy, SubchannelConfig, SubchannelEvent,
};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
use vccw::orb::{actl, cstat, dstat, fctl, stctl, Crw, Irb, Orb, OrbControls};

const PROG: u64 = 0x10000;
const DATA: u64 = 0x20000;
const WAIT: Duration = Duration::from_secs(10);

/// A gate a device command blocks on, so a test can act while the channel is mid-program.
#[derive(Default)]
struct Gate {
    state: Mutex<(bool, bool)>, // (entered, released)
    cv: Condvar,
}

impl Gate {
    fn wait_entered(&self) {
        let mut g = self.state.lock().unwrap();
        let t0 = Instant::now();
        while !g.0 {
            assert!(t0.elapsed() < WAIT, "device never entered the gate");
            g = self.cv.wait_timeout(g, WAIT).unwrap().0;
        }
    }
    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
    fn pass(&self) {
        let mut g = self.state.lock().unwrap();
        g.0 = true;
        self.cv.notify_all();
        while !g.1 {
            g = self.cv.wait(g).unwrap();
        }
    }
}

/// A loopback device that can block on one command, panic on another, and reports its
/// resets and its own drop through shared counters.
struct TestDevice {
    inner: LoopbackDevice,
    gate_on: Option<(u8, Arc<Gate>)>,
    panic_on: Option<u8>,
    resets: Arc<AtomicU32>,
    dropped: Arc<AtomicBool>,
}

impl TestDevice {
    fn new() -> Self {
        TestDevice {
            inner: LoopbackDevice::new(),
            gate_on: None,
            panic_on: None,
            resets: Arc::default(),
            dropped: Arc::default(),
        }
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

impl DeviceModel for TestDevice {
    fn start_program(&mut self) {
        self.inner.start_program()
    }
    fn execute(&mut self, cmd: &Command, data: &mut [u8]) -> Outcome {
        if self.panic_on == Some(cmd.code) {
            panic!("test device model failure");
        }
        if let Some((code, gate)) = &self.gate_on {
            if *code == cmd.code {
                gate.pass();
            }
        }
        self.inner.execute(cmd, data)
    }
    fn sense(&self) -> Vec<u8> {
        self.inner.sense()
    }
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn reset_operation(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.inner.reset_operation()
    }
}

/// Events from the sink, plus the program's strong count seen at each interrupt.
#[derive(Default)]
struct Events {
    list: Mutex<Vec<(SubchannelEvent, usize)>>,
    cv: Condvar,
    watch: Mutex<Option<Weak<HostProgram>>>,
}

impl Events {
    fn install(self: &Arc<Self>, sub: &EmulatedSubchannel) {
        let me = self.clone();
        sub.set_event_sink(Arc::new(move |ev| {
            let count = me
                .watch
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, |w| w.strong_count());
            me.list.lock().unwrap().push((ev, count));
            me.cv.notify_all();
        }));
    }
    fn watch(&self, p: &Arc<HostProgram>) {
        *self.watch.lock().unwrap() = Some(Arc::downgrade(p));
    }
    /// Waits for the `n`-th event (1-based) and returns it.
    fn nth(&self, n: usize) -> (SubchannelEvent, usize) {
        let mut g = self.list.lock().unwrap();
        let t0 = Instant::now();
        while g.len() < n {
            assert!(t0.elapsed() < WAIT, "event {n} never came; got {:?}", *g);
            g = self.cv.wait_timeout(g, WAIT).unwrap().0;
        }
        g[n - 1]
    }
    fn irb(&self, n: usize) -> (Irb, usize) {
        match self.nth(n) {
            (SubchannelEvent::Interrupt(irb), c) => (irb, c),
            other => panic!("expected an interrupt, got {other:?}"),
        }
    }
    fn len(&self) -> usize {
        self.list.lock().unwrap().len()
    }
}

fn store() -> IommuStore {
    let s = IommuStore::new(StoreConfig::default());
    s.map_dma(PROG, 0x40000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    s.write(DATA, b"abcdefgh").unwrap();
    s
}

fn ccw(cmd: u8, flags: CcwFlags, count: u16, cda: u64) -> Ccw1 {
    Ccw1 {
        cmd,
        flags,
        count,
        cda: cda as u32,
    }
}

fn program(s: &IommuStore, ccws: &[Ccw1], suspend: bool) -> Arc<HostProgram> {
    for (i, c) in ccws.iter().enumerate() {
        s.write(PROG + 8 * i as u64, &c.to_bytes()).unwrap();
    }
    let orb = Orb {
        intparm: 0xcafe_f00d,
        ctl: OrbControls::new()
            .with_format1(true)
            .with_lpm(0x80)
            .with_suspend(suspend),
        cpa: PROG as u32,
    };
    Arc::new(translate(&orb, s, &TranslateConfig::default()).unwrap())
}

fn one_write(s: &IommuStore) -> Arc<HostProgram> {
    program(s, &[ccw(0x01, CcwFlags::new(), 4, DATA)], false)
}

/// WRITE (gated, command-chained) then WRITE.
fn two_writes(s: &IommuStore) -> Arc<HostProgram> {
    program(
        s,
        &[
            ccw(0x01, CcwFlags::new().with_cc(true), 4, DATA),
            ccw(0x09, CcwFlags::new(), 4, DATA + 4),
        ],
        false,
    )
}

fn subchannel(dev: TestDevice) -> (EmulatedSubchannel, Arc<Events>) {
    let cfg = SubchannelConfig {
        devno: 0x1234,
        chpid: 0x42,
        spin: SpinPolicy::default(),
        // These tests are about the channel thread (a gated command would block the test's
        // own thread in START); inline execution has its own tests below.
        inline: InlinePolicy::OFF,
    };
    let sub = EmulatedSubchannel::new(Box::new(dev), cfg).unwrap();
    let ev = Arc::new(Events::default());
    ev.install(&sub);
    (sub, ev)
}

fn gated(code: u8) -> (TestDevice, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let mut d = TestDevice::new();
    d.gate_on = Some((code, gate.clone()));
    (d, gate)
}

#[test]
fn start_to_final_interrupt() {
    let s = store();
    let (sub, ev) = subchannel(TestDevice::new());
    let p = one_write(&s);
    ev.watch(&p);
    assert_eq!(sub.start(p.clone()), 0);
    let (irb, count) = ev.irb(1);
    // The subchannel let go of the program before the interrupt was delivered.
    assert_eq!(count, 1);
    assert_eq!(Arc::strong_count(&p), 1);
    let scsw = irb.scsw;
    assert_eq!(scsw.flags.fctl(), fctl::START);
    assert_eq!(scsw.flags.actl(), 0);
    assert_eq!(
        scsw.flags.stctl(),
        stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
    );
    assert_eq!(scsw.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
    assert_eq!((scsw.cstat, scsw.count), (0, 0));
    // The host CPA designates the CCW after the WRITE and maps back to the guest's.
    let guest = p.to_guest_scsw(&scsw);
    assert_eq!(guest.cpa, PROG as u32 + 8);
    // Byte image: format-1 ESW with LPUM 0x80, no sense.
    let b = irb.to_bytes();
    assert_eq!(&b[0..4], &scsw.flags.into_bits().to_be_bytes());
    assert_eq!(b[8..10], [0x0c, 0x00]);
    assert_eq!(b[13], 0x80);
    assert!(irb.concurrent_sense().is_none());
    // Status is no longer pending: the next start is accepted.
    assert_eq!(sub.start(one_write(&s)), 0);
    let (irb2, _) = ev.irb(2);
    assert_eq!(irb2.scsw.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
    drop(p);
    drop(sub);
    assert_eq!(s.stats().pinned_pages, 0);
}

#[test]
fn pci_intermediate_then_final() {
    let s = store();
    let (sub, ev) = subchannel(TestDevice::new());
    let p = program(
        &s,
        &[
            ccw(0x01, CcwFlags::new().with_cc(true).with_pci(true), 4, DATA),
            ccw(0x01, CcwFlags::new(), 4, DATA + 4),
        ],
        false,
    );
    assert_eq!(sub.start(p.clone()), 0);
    let (i, _) = ev.irb(1);
    assert_eq!(
        i.scsw.flags.stctl(),
        stctl::INTERMEDIATE | stctl::STATUS_PENDING
    );
    assert_eq!(i.scsw.cstat, cstat::PCI);
    assert_eq!(i.scsw.flags.fctl(), fctl::START);
    assert_eq!(p.to_guest_scsw(&i.scsw).cpa, PROG as u32 + 8);
    let (f, _) = ev.irb(2);
    assert_eq!(
        f.scsw.flags.stctl(),
        stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
    );
    assert_eq!(p.to_guest_scsw(&f.scsw).cpa, PROG as u32 + 16);
    assert_eq!(ev.len(), 2);
}

#[test]
fn suspend_resume_refetches_then_halt() {
    let s = store();
    let (dev, _) = gated(0xff);
    let resets = dev.resets.clone();
    let (sub, ev) = subchannel(dev);
    let p = program(
        &s,
        &[
            ccw(0x01, CcwFlags::new().with_cc(true), 4, DATA),
            ccw(0x03, CcwFlags::new().with_s(true), 0, 0),
        ],
        true,
    );
    ev.watch(&p);
    // Resume with no start function: cc 2.
    assert_eq!(sub.resume(), 2);
    assert_eq!(sub.start(p.clone()), 0);
    let (susp, count) = ev.irb(1);
    assert_eq!(count, 2, "a suspended program is still held");
    assert_eq!(susp.scsw.flags.actl(), actl::SUSPENDED);
    assert_eq!(
        susp.scsw.flags.stctl(),
        stctl::ALERT | stctl::INTERMEDIATE | stctl::STATUS_PENDING
    );
    assert_eq!(p.to_guest_scsw(&susp.scsw).cpa, PROG as u32 + 16);
    let schib = sub.store_schib().unwrap();
    assert_eq!(schib.scsw.flags.actl(), actl::SUSPENDED);
    assert_eq!(schib.scsw.flags.fctl(), fctl::START);
    assert_eq!(schib.scsw.flags.stctl(), 0);
    // A busy start function: SSCH cc 2.
    assert_eq!(sub.start(one_write(&s)), 2);
    // RSCH refetches the CCW; its S flag is still one in the host copy: suspended again.
    assert_eq!(sub.resume(), 0);
    let (again, _) = ev.irb(2);
    assert_eq!(again.scsw.flags.actl(), actl::SUSPENDED);
    assert_eq!(p.to_guest_scsw(&again.scsw).cpa, PROG as u32 + 16);
    // Halt the suspended program: no device end, CPA = suspended CCW + 8.
    assert_eq!(sub.halt(), 0);
    let (h, count) = ev.irb(3);
    assert_eq!(count, 1);
    assert_eq!(h.scsw.flags.fctl(), fctl::START | fctl::HALT);
    assert_eq!(h.scsw.flags.stctl(), stctl::STATUS_PENDING);
    assert_eq!(h.scsw.dstat, 0);
    assert_eq!(p.to_guest_scsw(&h.scsw).cpa, PROG as u32 + 16);
    assert_eq!(resets.load(Ordering::SeqCst), 0);
    assert_eq!(sub.resume(), 2);
}

#[test]
fn halt_mid_chain() {
    let s = store();
    let (dev, gate) = gated(0x01);
    let resets = dev.resets.clone();
    let (sub, ev) = subchannel(dev);
    let p = two_writes(&s);
    ev.watch(&p);
    assert_eq!(sub.start(p.clone()), 0);
    gate.wait_entered();
    let schib = sub.store_schib().unwrap();
    assert_eq!(schib.scsw.flags.fctl(), fctl::START);
    assert_eq!(
        schib.scsw.flags.actl(),
        actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE
    );
    assert_eq!(sub.halt(), 0);
    assert_eq!(sub.halt(), 2, "halt already in progress");
    let schib = sub.store_schib().unwrap();
    assert_eq!(schib.scsw.flags.fctl(), fctl::START | fctl::HALT);
    assert_ne!(schib.scsw.flags.actl() & actl::HALT_PENDING, 0);
    gate.release();
    let (h, count) = ev.irb(1);
    assert_eq!(count, 1);
    assert_eq!(h.scsw.flags.fctl(), fctl::START | fctl::HALT);
    assert_eq!(h.scsw.flags.stctl(), stctl::STATUS_PENDING);
    assert_eq!(h.scsw.dstat, dstat::DEVICE_END);
    assert_eq!(h.scsw.cstat, 0);
    // Halted after the first WRITE: CPA = that CCW + 8; the second never ran.
    assert_eq!(p.to_guest_scsw(&h.scsw).cpa, PROG as u32 + 8);
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    assert_eq!(ev.len(), 1);
}

#[test]
fn halt_and_clear_when_idle() {
    let (sub, ev) = subchannel(TestDevice::new());
    assert_eq!(sub.halt(), 0);
    let (h, _) = ev.irb(1);
    assert_eq!(h.scsw.flags.fctl(), fctl::HALT);
    assert_eq!(h.scsw.flags.stctl(), stctl::STATUS_PENDING);
    assert_eq!(h.scsw.dstat, dstat::DEVICE_END);
    assert_eq!(sub.clear(), 0);
    let (c, _) = ev.irb(2);
    assert_eq!(
        c.scsw.to_bytes(),
        [0, 0, 0x10, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn clear_mid_chain_releases_program_on_return() {
    let s = store();
    let (dev, gate) = gated(0x01);
    let resets = dev.resets.clone();
    let (sub, ev) = subchannel(dev);
    let sub = Arc::new(sub);
    let p = two_writes(&s);
    assert_eq!(sub.start(p.clone()), 0);
    gate.wait_entered();
    assert_eq!(Arc::strong_count(&p), 2);
    let (tx, rx) = std::sync::mpsc::channel();
    let t = {
        let sub = sub.clone();
        let p = Arc::downgrade(&p);
        std::thread::spawn(move || {
            let cc = sub.clear();
            // Observed the moment clear() returns.
            tx.send((cc, p.strong_count())).unwrap();
        })
    };
    // clear() waits for the device call in progress.
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    gate.release();
    let (cc, count) = rx.recv_timeout(WAIT).unwrap();
    t.join().unwrap();
    assert_eq!(cc, 0);
    assert_eq!(
        count, 1,
        "the subchannel's clone is gone when clear() returns"
    );
    let (c, _) = ev.irb(1);
    assert_eq!(c.scsw.flags.fctl(), fctl::CLEAR);
    assert_eq!(c.scsw.flags.actl(), 0);
    assert_eq!(c.scsw.flags.stctl(), stctl::STATUS_PENDING);
    assert_eq!((c.scsw.cpa, c.scsw.dstat, c.scsw.cstat), (0, 0, 0));
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    // The second WRITE never ran; the subchannel takes new work.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(ev.len(), 1);
    drop(p);
    assert_eq!(s.stats().pinned_pages, 0);
}

#[test]
fn start_while_busy_is_cc2() {
    let s = store();
    let (dev, gate) = gated(0x01);
    let (sub, ev) = subchannel(dev);
    assert_eq!(sub.start(two_writes(&s)), 0);
    gate.wait_entered();
    let other = one_write(&s);
    assert_eq!(sub.start(other.clone()), 2);
    assert_eq!(
        Arc::strong_count(&other),
        1,
        "a refused program is not kept"
    );
    gate.release();
    let (f, _) = ev.irb(1);
    assert_eq!(f.scsw.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
    assert_eq!(sub.start(other), 0);
    ev.irb(2);
}

#[test]
fn status_pending_without_sink_is_cc1() {
    let s = store();
    let sub =
        EmulatedSubchannel::new(Box::new(TestDevice::new()), SubchannelConfig::default()).unwrap();
    assert_eq!(sub.start(one_write(&s)), 0);
    let t0 = Instant::now();
    let schib = loop {
        let schib = sub.store_schib().unwrap();
        if schib.scsw.flags.stctl() & stctl::STATUS_PENDING != 0 {
            break schib;
        }
        assert!(t0.elapsed() < WAIT);
        std::thread::yield_now();
    };
    assert_eq!(schib.scsw.flags.fctl(), fctl::START);
    assert_eq!(sub.start(one_write(&s)), 1);
    assert_eq!(sub.halt(), 1);
    assert_eq!(sub.resume(), 1);
    // Installing a sink delivers it; then the subchannel is free.
    let ev = Arc::new(Events::default());
    ev.install(&sub);
    ev.irb(1);
    assert_eq!(sub.start(one_write(&s)), 0);
    ev.irb(2);
}

#[test]
fn path_offline_gives_cc3_and_crws() {
    let s = store();
    let (sub, ev) = subchannel(TestDevice::new());
    assert!(!sub.set_path_online(0x41, false), "not our CHPID");
    assert!(sub.set_path_online(0x42, false));
    assert!(!sub.set_path_online(0x42, false), "no change");
    match ev.nth(1).0 {
        SubchannelEvent::PathEvent(crw) => {
            assert_eq!(crw, Crw::channel_path_offline(0x42));
            assert_eq!(crw.to_bytes(), [0x04, 0x06, 0x00, 0x42]);
        }
        e => panic!("{e:?}"),
    }
    let schib = sub.store_schib().unwrap();
    assert_eq!(
        (schib.pmcw.pam, schib.pmcw.pom, schib.pmcw.pnom),
        (0, 0, 0x80)
    );
    let p = one_write(&s);
    assert_eq!(sub.start(p.clone()), 3);
    assert_eq!(Arc::strong_count(&p), 1);
    assert!(sub.set_path_online(0x42, true));
    match ev.nth(2).0 {
        SubchannelEvent::PathEvent(crw) => assert_eq!(crw.to_bytes(), [0x04, 0x02, 0x00, 0x42]),
        e => panic!("{e:?}"),
    }
    let schib = sub.store_schib().unwrap();
    assert_eq!(
        (schib.pmcw.pam, schib.pmcw.pom, schib.pmcw.pnom),
        (0x80, 0x80, 0)
    );
    assert_eq!(sub.start(p), 0);
    ev.irb(3);
}

#[test]
fn store_schib_fields() {
    let s = store();
    let (sub, ev) = subchannel(TestDevice::new());
    let schib = sub.store_schib().unwrap();
    // PMCW of an idle, enabled I/O subchannel, devno 0x1234 on CHPID 0x42.
    assert_eq!(
        schib.pmcw.to_bytes(),
        [
            0, 0, 0, 0, // intparm
            0x00, 0x81, 0x12, 0x34, // E, V; devno
            0x80, 0x00, 0x00, 0x80, // LPM, PNOM, LPUM, PIM
            0x00, 0x00, 0x80, 0x80, // MBI, POM, PAM
            0x42, 0, 0, 0, 0, 0, 0, 0, // CHPIDs
            0x00, 0x00, 0x00, 0x01, // type I/O, concurrent sense
        ]
    );
    assert_eq!(schib.scsw.to_bytes(), [0; 12]);
    assert_eq!(sub.start(one_write(&s)), 0);
    ev.irb(1);
    let schib = sub.store_schib().unwrap();
    assert_eq!(schib.pmcw.intparm, 0xcafe_f00d);
    assert_eq!(schib.pmcw.lpum, 0x80);
    // Status accepted: no function, activity or status bits left.
    assert_eq!(schib.scsw.flags.fctl(), 0);
    assert_eq!(schib.scsw.flags.stctl(), 0);
}

#[test]
fn drop_joins_the_channel_thread() {
    let s = store();
    let dev = TestDevice::new();
    let dropped = dev.dropped.clone();
    let cfg = SubchannelConfig {
        devno: 0xbeef,
        // The program must run on the channel thread for the thread-name check below.
        inline: InlinePolicy::OFF,
        ..Default::default()
    };
    let sub = EmulatedSubchannel::new(Box::new(dev), cfg).unwrap();
    let ev = Arc::new(Events::default());
    ev.install(&sub);
    let name = "vccw-chan-beef";
    let threads = || {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                    .filter(|c| c.trim() == name)
                    .count()
            })
            .ok()
    };
    // Leave a program suspended: drop must still release it.
    let p = program(&s, &[ccw(0x03, CcwFlags::new().with_s(true), 0, 0)], true);
    let w = Arc::downgrade(&p);
    assert_eq!(sub.start(p), 0);
    ev.irb(1);
    // The thread has run (and named itself) by now.
    if let Some(n) = threads() {
        assert_eq!(n, 1);
    }
    assert!(w.upgrade().is_some());
    drop(sub);
    assert!(
        dropped.load(Ordering::SeqCst),
        "device dropped: thread gone"
    );
    assert!(w.upgrade().is_none());
    if let Some(n) = threads() {
        assert_eq!(n, 0);
    }
}

#[test]
fn unit_check_carries_concurrent_sense() {
    let s = store();
    let mut dev = TestDevice::new();
    dev.inner.unit_check_on = Some(0x01);
    let (sub, ev) = subchannel(dev);
    assert_eq!(sub.start(one_write(&s)), 0);
    let (irb, _) = ev.irb(1);
    assert_eq!(
        irb.scsw.dstat,
        dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_CHECK
    );
    assert!(irb.scsw.flags.extended_control());
    assert_eq!(irb.concurrent_sense().unwrap()[0], 0x80);
}

#[test]
fn panicking_device_gives_equipment_check() {
    panicking_device(false);
}

#[test]
fn panicking_device_inline_gives_equipment_check_and_start_returns() {
    panicking_device(true);
}

fn panicking_device(inline: bool) {
    let s = store();
    let mut dev = TestDevice::new();
    dev.panic_on = Some(0x01);
    let resets = dev.resets.clone();
    let (sub, ev) = if inline {
        inline_subchannel(dev, Duration::from_secs(10))
    } else {
        subchannel(dev)
    };
    let p = one_write(&s);
    ev.watch(&p);
    assert_eq!(sub.start(p.clone()), 0);
    let (irb, count) = ev.irb(1);
    assert_eq!(count, 1);
    assert_eq!(
        irb.scsw.dstat,
        dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_CHECK
    );
    assert_eq!(
        irb.scsw.flags.stctl(),
        stctl::ALERT | stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
    );
    assert_eq!(irb.scsw.flags.fctl(), fctl::START);
    let sense = irb.concurrent_sense().unwrap();
    assert_eq!(sense[0], SENSE_EQUIPMENT_CHECK);
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    // The subchannel is still operational: a program the device handles completes.
    let noop = program(&s, &[ccw(0x03, CcwFlags::new(), 0, 0)], false);
    assert_eq!(sub.start(noop), 0);
    let (f, _) = ev.irb(2);
    assert_eq!(f.scsw.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
}

#[test]
fn spin_off_still_wakes() {
    let s = store();
    let cfg = SubchannelConfig {
        spin: SpinPolicy::OFF,
        inline: InlinePolicy::OFF,
        ..Default::default()
    };
    let sub = EmulatedSubchannel::new(Box::new(TestDevice::new()), cfg).unwrap();
    let ev = Arc::new(Events::default());
    ev.install(&sub);
    for i in 1..=20 {
        assert_eq!(sub.start(one_write(&s)), 0);
        ev.irb(i);
    }
    let st = sub.handoff_stats();
    assert_eq!((st.spin_hits, st.spin_ns), (0, 0));
    assert!(st.parks >= 1);
}

#[test]
fn spinning_thread_picks_up_the_next_start() {
    let s = store();
    let cfg = SubchannelConfig {
        spin: SpinPolicy {
            spin: Duration::from_millis(500),
        },
        inline: InlinePolicy::OFF,
        ..Default::default()
    };
    let sub = EmulatedSubchannel::new(Box::new(TestDevice::new()), cfg).unwrap();
    let ev = Arc::new(Events::default());
    ev.install(&sub);
    for i in 1..=3 {
        // Give the thread time to finish delivering and start spinning.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(sub.start(one_write(&s)), 0);
        ev.irb(i);
    }
    let st = sub.handoff_stats();
    assert!(st.spin_hits >= 1, "{st:?}");
    assert!(st.spin_ns > 0);
}

// ---- Inline execution (the default policy): START runs the program on the calling thread.

fn inline_subchannel(dev: TestDevice, budget: Duration) -> (EmulatedSubchannel, Arc<Events>) {
    let cfg = SubchannelConfig {
        devno: 0x4321,
        spin: SpinPolicy::OFF,
        inline: InlinePolicy { budget },
        ..Default::default()
    };
    let sub = EmulatedSubchannel::new(Box::new(dev), cfg).unwrap();
    let ev = Arc::new(Events::default());
    ev.install(&sub);
    (sub, ev)
}

#[test]
fn inline_start_presents_the_final_status_before_returning() {
    let s = store();
    let (sub, ev) = inline_subchannel(TestDevice::new(), Duration::from_secs(10));
    let p = two_writes(&s);
    ev.watch(&p);
    assert_eq!(sub.start(p), 0);
    // No waiting: the interrupt was delivered by the START itself.
    assert_eq!(ev.len(), 1, "final interrupt delivered inside start()");
    let (irb, strong) = ev.irb(1);
    assert_eq!(irb.scsw.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
    assert_eq!(irb.scsw.flags.fctl(), fctl::START);
    assert_eq!(irb.scsw.flags.actl(), 0);
    // The subchannel let go of the program before presenting the status (the test gave
    // away its only clone).
    assert_eq!(strong, 0, "program released before the interrupt");
    let st = sub.handoff_stats();
    assert_eq!(
        (st.inline_done, st.inline_handoffs, st.parks),
        (1, 0, st.parks)
    );
    // Back to back: the next START is accepted at once and also ends inline.
    assert_eq!(sub.start(one_write(&s)), 0);
    assert_eq!(ev.len(), 2);
    assert_eq!(sub.handoff_stats().inline_done, 2);
}

#[test]
fn inline_pci_then_final_in_order() {
    let s = store();
    let (sub, ev) = inline_subchannel(TestDevice::new(), Duration::from_secs(10));
    let p = program(
        &s,
        &[
            ccw(0x01, CcwFlags::new().with_cc(true).with_pci(true), 4, DATA),
            ccw(0x09, CcwFlags::new(), 4, DATA + 4),
        ],
        false,
    );
    assert_eq!(sub.start(p), 0);
    // Intermediate status is either presented on its own (first) or folded into the final
    // status as PCI; either way the final status comes last and nothing is lost.
    let n = ev.len();
    assert!(n == 1 || n == 2, "{n} events");
    let (last, _) = ev.irb(n);
    assert_eq!(last.scsw.flags.stctl() & stctl::PRIMARY, stctl::PRIMARY);
    let pci_seen = (1..=n).any(|i| ev.irb(i).0.scsw.cstat & cstat::PCI != 0);
    assert!(pci_seen, "PCI presented");
}

#[test]
fn inline_budget_hands_a_long_program_to_the_channel_thread() {
    let s = store();
    // A zero-ish budget: the first command runs inline, the rest on the channel thread.
    let (sub, ev) = inline_subchannel(TestDevice::new(), Duration::from_nanos(1));
    let ccws: Vec<Ccw1> = (0..64)
        .map(|i| ccw(0x01, CcwFlags::new().with_cc(i < 63), 4, DATA))
        .collect();
    let p = program(&s, &ccws, false);
    assert_eq!(sub.start(p.clone()), 0);
    let (irb, _) = ev.irb(1);
    assert_eq!(irb.scsw.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
    assert_eq!(p.to_guest_scsw(&irb.scsw).cpa as u64, PROG + 8 * 64);
    let st = sub.handoff_stats();
    assert_eq!((st.inline_done, st.inline_handoffs), (0, 1));
    assert_eq!(ev.len(), 1);
}

#[test]
fn inline_program_halted_and_cleared_from_other_threads() {
    let s = store();
    // START on a helper thread blocks inside the gated command, inline; HSCH and CSCH from
    // this thread must be performed by that inline runner at the next command boundary.
    let (dev, gate) = gated(0x01);
    let (sub, ev) = inline_subchannel(dev, Duration::from_secs(10));
    let sub = Arc::new(sub);
    let p = two_writes(&s);
    let w = Arc::downgrade(&p);
    let starter = {
        let sub = sub.clone();
        std::thread::spawn(move || sub.start(p))
    };
    gate.wait_entered();
    assert_eq!(sub.halt(), 0, "halt accepted while the command runs inline");
    let clearer = {
        let sub = sub.clone();
        std::thread::spawn(move || sub.clear())
    };
    // The clear waits for the command in progress.
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !clearer.is_finished(),
        "clear returned while the device call was running"
    );
    gate.release();
    assert_eq!(clearer.join().unwrap(), 0);
    assert_eq!(starter.join().unwrap(), 0);
    // Clear wins: its status is the one presented, and the program is gone.
    let (irb, _) = ev.irb(ev.len());
    assert_eq!(irb.scsw.flags.fctl(), fctl::CLEAR);
    assert!(w.upgrade().is_none(), "program released by the clear");
    // The subchannel is usable again, inline.
    let before = ev.len();
    assert_eq!(sub.start(one_write(&s)), 0);
    assert_eq!(ev.len(), before + 1);
}

#[test]
fn inline_start_while_the_channel_thread_delivers_stays_ordered() {
    // Many back-to-back starts with a sink that re-enters the subchannel (STORE SUBCHANNEL):
    // every program ends with exactly one final interrupt, in order.
    let s = store();
    let (sub, ev) = inline_subchannel(TestDevice::new(), Duration::from_micros(500));
    for i in 0..200 {
        assert_eq!(sub.start(one_write(&s)), 0, "start {i}");
        let (irb, _) = ev.irb(i + 1);
        assert_eq!(irb.scsw.flags.fctl(), fctl::START);
        assert_eq!(sub.store_schib().unwrap().scsw.flags.fctl(), 0);
    }
    assert_eq!(ev.len(), 200);
}
