//! The emulated subchannel: runs translated host programs against a [`DeviceModel`] and
//! delivers their interrupts, on the thread that issued START (inline, for as long as the
//! [`InlinePolicy`] budget allows) and on its own channel thread (everything else).
//!
//! # Functions and condition codes
//! START, HALT, CLEAR and RESUME follow the PoP ("I/O Instructions") and QEMU's `css.c`:
//!
//! | call | cc 0 | cc 1 | cc 2 | cc 3 |
//! |---|---|---|---|---|
//! | [`EmulatedSubchannel::start`] | started | status pending | a function in progress | no path / thread gone |
//! | [`EmulatedSubchannel::resume`] | resume pending | status pending | no start function, ORB without suspend control, resume already pending | no path / thread gone |
//! | [`EmulatedSubchannel::halt`] | halt pending | status pending (other than intermediate alone) | halt or clear in progress | thread gone |
//! | [`EmulatedSubchannel::clear`] | always | - | - | thread gone |
//!
//! Status pending is modelled simply: a status is pending from the moment the channel stores
//! it until it is handed to the event sink (the driver "accepts" it there, as TEST SUBCHANNEL
//! would). It is cleared *before* the sink is called, so a driver reacting to the interrupt on
//! another thread may start the next program at once. Without a sink, status stays pending.
//!
//! # Program lifetime
//! The subchannel holds one clone of the started `Arc<HostProgram>` while the program runs. It
//! drops it before the final (or halt, or clear) interrupt is delivered, and before
//! [`EmulatedSubchannel::clear`] returns: so the driver dropping its own clone really releases
//! the pins.
//!
//! # Resume
//! Resume refetches the suspended CCW (PoP: "the channel never executes a CCW with the S
//! flag"). The host program is an immutable translated copy, so the refetch sees the S flag
//! again and the program suspends again; continuing a program the guest modified needs a
//! re-translation by the driver.
//!
//! # Inline execution
//! A channel program on an emulated device is CPU work (a track image lookup and a copy), so
//! handing it to another thread costs more than running it: two blocking wake-ups, ~2-8 us
//! each on the VMs measured, against ~1-5 us of work for a 4 KiB DASD read. START therefore
//! runs the program itself when the channel thread is idle, the way QEMU's `css.c` runs a
//! virtual device's program inside the SSCH handler: command by command, then the interrupt
//! handed to the sink *on the caller's thread* before `start` returns. Between commands (from
//! the fifth on: a short program never reads the clock twice) it checks a time budget
//! ([`InlinePolicy::budget`], 500 us by default, counted from START); a program still
//! running then (a long or endless chain) goes on on the channel thread, so HALT and CLEAR
//! keep working on it and START never holds its caller much longer than the budget.
//!
//! One runner at a time (`Inner::runner`): the channel thread does no work while a START
//! runs inline and vice versa, so events keep their order and the device model is used by one
//! thread at a time. A HALT or CLEAR issued from another thread while a START runs inline is
//! performed by that START at the next command boundary (CLEAR waits for it, as it waits for
//! the channel thread). A driver calling `start` with its own lock held receives the
//! interrupt on the same thread: the `SubchannelEvents` contract (never wait for the driver's
//! lock) is what makes this safe; `VfioCcwDevice` queues it and handles it when it unlocks.
//! [`InlinePolicy::OFF`] keeps every program on the channel thread.
//!
//! # Hand-off
//! When it runs out of work, the channel thread spins for [`SpinPolicy::spin`] watching a
//! request counter before it blocks on a condvar, so back-to-back I/O need not pay a blocking
//! wake-up per START. The price is up to `spin` of one core's CPU after every burst of work
//! ([`HandoffStats::spin_ns`]). Spinning only pays when the requester gets a core while the
//! channel thread spins; on an oversubscribed machine it rarely does, so after 4 fruitless
//! spins in a row the thread blocks at once for the next 64 idle periods (adaptive back-off).
//!
//! Measured by `benches/handoff.rs` on the 2-core VM *under load average ~7* (other builds
//! running): eventfd wake-up 7.3 us one way, condvar 8.5 us, two spinning threads 4.2 ms (the
//! partner was rarely on a CPU); subchannel start -> final interrupt 19.7 us with spin off,
//! 36.9 us with 50 us spin; spin cost 2.6-3.0 us of CPU per I/O with the back-off (56 us per
//! I/O without it, which made the round trip 216 us).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ccw::{CommandSet, HostProgram};
use crate::css::channel::{ChannelRun, Step};
use crate::css::device::DeviceModel;
use crate::orb::{
    actl, dstat, fctl, stctl, subchannel_type, Crw, Irb, Pmcw, PmcwChars, PmcwFlags, Schib, Scsw,
    ScswFlags,
};

/// Sense byte 0 bit for equipment check: what a device model that panicked reports.
pub const SENSE_EQUIPMENT_CHECK: u8 = 0x10;

/// Channel-path mask bit of the one installed path (PIM/PAM/POM bit 0).
const PATH: u8 = 0x80;

/// Most channel reports queued while no sink takes them; further ones set the overflow bit of
/// the last queued CRW and are dropped (as a channel subsystem's CRW queue does).
const MAX_QUEUED_CRWS: usize = 64;

/// What the subchannel reports to its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubchannelEvent {
    /// An I/O interrupt: intermediate, suspended, final, halt or clear status.
    Interrupt(Irb),
    /// A channel report (channel path came online or went offline).
    PathEvent(Crw),
}

/// The driver's callback for [`SubchannelEvent`]s; called on the channel thread, never with
/// a subchannel lock held (it may call back into the subchannel).
pub type EventSink = Arc<dyn Fn(SubchannelEvent) + Send + Sync>;

/// How long the idle channel thread spins before it blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinPolicy {
    /// Spin budget after the last piece of work (zero: block at once).
    pub spin: Duration,
}

impl SpinPolicy {
    /// No spinning: every hand-off is a blocking wake-up.
    pub const OFF: SpinPolicy = SpinPolicy {
        spin: Duration::ZERO,
    };
}

impl Default for SpinPolicy {
    /// 50 us: longer than a blocking wake-up on the VMs measured, short enough that an idle
    /// subchannel costs nothing.
    fn default() -> Self {
        SpinPolicy {
            spin: Duration::from_micros(50),
        }
    }
}

/// How much of a program START runs on the calling thread before the channel thread takes
/// over (see "Inline execution" in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InlinePolicy {
    /// Time budget: commands run inline until the program ends or this much time has passed
    /// (checked between commands, from the fifth on); zero: every program runs on the
    /// channel thread.
    pub budget: Duration,
}

impl InlinePolicy {
    /// No inline execution: START only queues the program for the channel thread, and every
    /// interrupt is delivered from the channel thread.
    pub const OFF: InlinePolicy = InlinePolicy {
        budget: Duration::ZERO,
    };
}

impl Default for InlinePolicy {
    /// 500 us: a 4 KiB or 64 KiB DASD read (a few us) and a 1 MiB one (a few hundred us) end
    /// inline; a long or endless chain goes to the channel thread, so a caller is never held
    /// much longer than a START that has to wake a thread would be held under load.
    fn default() -> Self {
        InlinePolicy {
            budget: Duration::from_micros(500),
        }
    }
}

/// Configuration of an emulated subchannel (default: device 0000 on CHPID 00, 50 us spin,
/// 500 us inline budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubchannelConfig {
    /// Device number (PMCW word 1).
    pub devno: u16,
    /// CHPID of the single channel path (PMCW CHPID 0).
    pub chpid: u8,
    /// The channel thread's spin before blocking.
    pub spin: SpinPolicy,
    /// How much of a started program runs on the thread that issued START.
    pub inline: InlinePolicy,
}

/// Counters of how the channel thread picked up work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HandoffStats {
    /// Requests seen while spinning (no blocking wake-up needed).
    pub spin_hits: u64,
    /// Times the thread blocked on its condvar.
    pub parks: u64,
    /// Total time spent spinning, in nanoseconds (the CPU cost of the policy).
    pub spin_ns: u64,
    /// Programs that ran to their end on the thread that started them (no hand-off at all).
    pub inline_done: u64,
    /// Programs started inline that went on on the channel thread (budget used up, or work
    /// left such as a pending halt).
    pub inline_handoffs: u64,
}

/// A started program being executed. The run is boxed: an `Exec` moves out of `Inner` and
/// back for every command (the lock is released while the device works), and moving two
/// pointers is cheaper than moving the run (seen as memcpy in the per-I/O profile).
struct Exec {
    run: Box<ChannelRun>,
    prog: Arc<HostProgram>,
}

/// Subchannel state, under one mutex. The device and the running program are taken out of
/// it while the channel thread steps, so requests never wait for a device.
struct Inner {
    /// The device; `None` while the channel thread is stepping.
    dev: Option<Box<dyn DeviceModel>>,
    /// The started program; `None` when idle, start pending, or while stepping.
    exec: Option<Exec>,
    /// A program whose start is pending.
    queued: Option<Arc<HostProgram>>,
    /// The run of the last program that ended, kept for its buffers (no allocation per START).
    spare: Option<Box<ChannelRun>>,
    /// SCSW function control of the subchannel.
    fctl: u8,
    /// SCSW activity control of the subchannel.
    actl: u8,
    /// The current program's ORB had suspend control.
    suspend_ctl: bool,
    /// Status pending (not yet handed to the sink).
    pending: Option<Irb>,
    /// The last status stored (CPA, device and subchannel status, count for the SCHIB).
    last: Scsw,
    /// Channel reports not yet handed to the sink.
    crws: VecDeque<Crw>,
    sink: Option<EventSink>,
    intparm: u32,
    pam: u8,
    pom: u8,
    pnom: u8,
    lpum: u8,
    clears_requested: u64,
    clears_done: u64,
    /// Who is running the subchannel's work (stepping the program, performing halt and clear,
    /// delivering events). One runner at a time keeps the events in order and the device in
    /// one place.
    runner: Runner,
    /// The channel thread is blocked on `work`.
    sleeping: bool,
    shutdown: bool,
    /// The channel thread has exited: the subchannel is not operational.
    dead: bool,
}

/// Who runs the subchannel's work loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    /// Nobody: the channel thread is idle (spinning or parked).
    Idle,
    /// The channel thread.
    Channel,
    /// A thread inside [`EmulatedSubchannel::start`] (inline execution).
    Inline,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the channel thread.
    work: Condvar,
    /// Wakes `clear()` callers waiting for the channel thread.
    done: Condvar,
    /// Bumped on every request, so the spinning thread notices work without the lock.
    seq: AtomicU64,
    spin: Duration,
    spin_hits: AtomicU64,
    parks: AtomicU64,
    spin_ns: AtomicU64,
    inline_budget: Duration,
    inline_done: AtomicU64,
    inline_handoffs: AtomicU64,
    devno: u16,
    chpid: u8,
    /// What the device model declared (`DeviceModel::status_modifier_commands`).
    status_modifier: CommandSet,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic never happens with the lock held (device calls are caught), but stay usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Announces a request (called with the lock held, so the thread cannot miss it) and
    /// returns whether the sleeping thread must be notified; the caller notifies after
    /// unlocking, so the woken thread does not block at once on the lock still held
    /// (`Mutex::lock_contended` and a second context switch per START, seen in a profile).
    fn announce(&self, g: &Inner) -> bool {
        self.seq.fetch_add(1, Ordering::Release);
        g.sleeping
    }

    /// Announces a request (called with the lock held, so the thread cannot miss it).
    fn kick(&self, g: &Inner) {
        self.seq.fetch_add(1, Ordering::Release);
        if g.sleeping {
            self.work.notify_one();
        }
    }
}

/// Runs a device call, turning a panic into `None` with an error event.
fn guarded<R>(what: &str, f: impl FnOnce() -> R) -> Option<R> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(e) => {
            let msg = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(what, panic = %msg, "device model panicked");
            None
        }
    }
}

/// Sense bytes of an equipment check.
fn equipment_check_sense() -> Vec<u8> {
    let mut s = vec![0u8; 32];
    s[0] = SENSE_EQUIPMENT_CHECK;
    s
}

/// The status of a program whose device model panicked: unit check, alert, final.
fn equipment_check_scsw(flags: ScswFlags, cpa: u32, fc: u8) -> Scsw {
    Scsw {
        flags: flags
            .with_fctl(fc)
            .with_actl(0)
            .with_stctl(stctl::ALERT | stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING),
        cpa,
        dstat: dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_CHECK,
        cstat: 0,
        count: 0,
    }
}

impl Inner {
    /// Makes `irb` the pending status. An intermediate-only status still pending is replaced
    /// (its PCI bit carried over), as a channel accumulates status at the subchannel.
    fn set_status(&mut self, mut irb: Irb) {
        if let Some(p) = self.pending {
            if p.scsw.flags.stctl() == stctl::INTERMEDIATE | stctl::STATUS_PENDING {
                irb.scsw.cstat |= p.scsw.cstat & crate::orb::cstat::PCI;
            }
        }
        self.last = irb.scsw;
        self.pending = Some(irb);
    }

    /// The SCSW as STORE SUBCHANNEL shows it.
    fn current_scsw(&self) -> Scsw {
        if let Some(p) = self.pending {
            return p.scsw;
        }
        Scsw {
            flags: self
                .last
                .flags
                .with_fctl(self.fctl)
                .with_actl(self.actl)
                .with_stctl(0),
            ..self.last
        }
    }

    fn irb(&self, scsw: Scsw) -> Irb {
        Irb::new(scsw, self.lpum)
    }

    /// Performs the clear function (needs the device: not while stepping).
    fn do_clear(&mut self) {
        if let Some(mut e) = self.exec.take() {
            if let Some(dev) = self.dev.as_mut() {
                guarded("reset_operation", || e.run.clear(dev.as_mut()));
            }
            // The program's pins go here, before any status is presented.
            drop(e);
        }
        self.queued = None;
        self.fctl = 0;
        self.actl = 0;
        self.pending = None;
        self.pnom = 0;
        let scsw = Scsw {
            flags: ScswFlags::new()
                .with_fctl(fctl::CLEAR)
                .with_stctl(stctl::STATUS_PENDING),
            ..Default::default()
        };
        let irb = self.irb(scsw);
        self.set_status(irb);
    }

    /// Performs the halt function (QEMU `sch_handle_halt_func`).
    fn do_halt(&mut self) {
        let scsw = if let (Some(mut e), Some(dev)) = (self.exec.take(), self.dev.as_mut()) {
            let flags = ScswFlags::from_orb(&e.run.orb().ctl);
            let s = guarded("reset_operation", || e.run.halt(dev.as_mut()));
            drop(e);
            s.unwrap_or_else(|| {
                equipment_check_scsw(flags, self.last.cpa, fctl::START | fctl::HALT)
            })
        } else if let Some(p) = self.queued.take() {
            // Start pending: the start function is never performed; no device status.
            Scsw {
                flags: ScswFlags::from_orb(&p.orb().ctl)
                    .with_fctl(fctl::START | fctl::HALT)
                    .with_stctl(stctl::STATUS_PENDING),
                cpa: self.last.cpa,
                ..Default::default()
            }
        } else {
            // No function in progress: the halt signal reaches an idle device, device end.
            Scsw {
                flags: ScswFlags::new()
                    .with_fctl(fctl::HALT)
                    .with_stctl(stctl::STATUS_PENDING),
                cpa: self.last.cpa,
                dstat: dstat::DEVICE_END,
                cstat: 0,
                count: 0,
            }
        };
        let halt_eq = scsw.dstat & dstat::UNIT_CHECK != 0;
        self.fctl = 0;
        self.actl = 0;
        let mut irb = self.irb(scsw);
        if halt_eq {
            irb = irb.with_concurrent_sense(&equipment_check_sense());
        }
        self.set_status(irb);
    }

    /// The next event for the sink, with the status made non-pending.
    fn take_event(&mut self) -> Option<SubchannelEvent> {
        if let Some(irb) = self.pending.take() {
            return Some(SubchannelEvent::Interrupt(irb));
        }
        self.crws.pop_front().map(SubchannelEvent::PathEvent)
    }
}

/// Sets `dead` and wakes every waiter when the channel thread exits, however it exits.
struct DeathGuard(Arc<Shared>);

impl Drop for DeathGuard {
    fn drop(&mut self) {
        let mut g = self.0.lock();
        g.dead = true;
        g.clears_done = g.clears_requested;
        // Nothing runs any more: release the program (and its pins) now.
        g.exec = None;
        g.queued = None;
        self.0.done.notify_all();
    }
}

/// The emulated channel subsystem's I/O subchannel, with its channel thread.
///
/// Dropping it stops and joins the thread (after the device call in progress, if any).
pub struct EmulatedSubchannel {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmulatedSubchannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedSubchannel")
            .field("devno", &self.shared.devno)
            .field("chpid", &self.shared.chpid)
            .finish()
    }
}

impl EmulatedSubchannel {
    /// Creates the subchannel (enabled, its path online) and starts its channel thread.
    pub fn new(device: Box<dyn DeviceModel>, config: SubchannelConfig) -> std::io::Result<Self> {
        let status_modifier = device.status_modifier_commands();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                dev: Some(device),
                exec: None,
                queued: None,
                spare: None,
                fctl: 0,
                actl: 0,
                suspend_ctl: false,
                pending: None,
                last: Scsw::default(),
                crws: VecDeque::new(),
                sink: None,
                intparm: 0,
                pam: PATH,
                pom: PATH,
                pnom: 0,
                lpum: 0,
                clears_requested: 0,
                clears_done: 0,
                runner: Runner::Idle,
                sleeping: false,
                shutdown: false,
                dead: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            seq: AtomicU64::new(0),
            spin: config.spin.spin,
            spin_hits: AtomicU64::new(0),
            parks: AtomicU64::new(0),
            spin_ns: AtomicU64::new(0),
            inline_budget: config.inline.budget,
            inline_done: AtomicU64::new(0),
            inline_handoffs: AtomicU64::new(0),
            devno: config.devno,
            chpid: config.chpid,
            status_modifier,
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vccw-chan-{:04x}", config.devno))
            .spawn(move || channel_thread(sh))?;
        Ok(EmulatedSubchannel {
            shared,
            thread: Some(thread),
        })
    }

    /// Installs the driver's event sink; status already pending is delivered to it.
    pub fn set_event_sink(&self, sink: EventSink) {
        let mut g = self.shared.lock();
        g.sink = Some(sink);
        self.shared.kick(&g);
    }

    /// START SUBCHANNEL with a translated program; returns the condition code. On any cc but
    /// 0 the program is dropped before this returns.
    pub fn start(&self, program: Arc<HostProgram>) -> u8 {
        let mut g = self.shared.lock();
        if g.dead || g.pam & g.pom == 0 {
            return 3;
        }
        if g.pending.is_some() {
            return 1;
        }
        if g.fctl != 0 {
            return 2;
        }
        let orb = *program.orb();
        g.fctl = fctl::START;
        g.actl = actl::START_PENDING;
        g.suspend_ctl = orb.ctl.suspend();
        g.intparm = orb.intparm;
        g.last = Scsw {
            flags: ScswFlags::from_orb(&orb.ctl),
            cpa: orb.cpa,
            ..Default::default()
        };
        g.queued = Some(program);
        if !self.shared.inline_budget.is_zero() && g.runner == Runner::Idle && g.sink.is_some() {
            g.runner = Runner::Inline;
            run_inline(&self.shared, g);
            return 0;
        }
        // The state changed under the lock, so notifying after unlocking loses no wake-up.
        let wake = self.shared.announce(&g);
        drop(g);
        if wake {
            self.shared.work.notify_one();
        }
        0
    }

    /// RESUME SUBCHANNEL; returns the condition code. With the program not yet suspended the
    /// subchannel becomes resume pending and the next suspension is not performed (PoP).
    pub fn resume(&self) -> u8 {
        let mut g = self.shared.lock();
        if g.dead || g.pam & g.pom == 0 {
            return 3;
        }
        if g.pending.is_some() {
            return 1;
        }
        if g.fctl != fctl::START || !g.suspend_ctl || g.actl & actl::RESUME_PENDING != 0 {
            return 2;
        }
        g.actl |= actl::RESUME_PENDING;
        self.shared.kick(&g);
        0
    }

    /// HALT SUBCHANNEL; returns the condition code. The halt status interrupt follows from
    /// the channel thread (also when no function was in progress).
    pub fn halt(&self) -> u8 {
        let mut g = self.shared.lock();
        if g.dead {
            return 3;
        }
        if let Some(p) = g.pending {
            // Intermediate status alone does not prevent a halt (PoP, QEMU css_do_hsch).
            if p.scsw.flags.stctl() != stctl::INTERMEDIATE | stctl::STATUS_PENDING {
                return 1;
            }
        }
        if g.fctl & (fctl::HALT | fctl::CLEAR) != 0 {
            return 2;
        }
        g.fctl |= fctl::HALT;
        g.actl |= actl::HALT_PENDING;
        self.shared.kick(&g);
        0
    }

    /// CLEAR SUBCHANNEL; returns the condition code. Pending status is discarded, the device
    /// reset, and the program's `Arc` is dropped before this returns (waiting for the device
    /// call in progress, if any); the clear status interrupt follows from the channel thread.
    pub fn clear(&self) -> u8 {
        let sh = &self.shared;
        let mut g = sh.lock();
        if g.dead {
            return 3;
        }
        if g.dev.is_some() {
            // Not stepping (idle, suspended, or between steps): clear right here.
            g.do_clear();
            sh.kick(&g);
            return 0;
        }
        g.fctl = fctl::CLEAR;
        g.actl = actl::CLEAR_PENDING;
        g.pending = None;
        g.clears_requested += 1;
        let want = g.clears_requested;
        sh.kick(&g);
        while g.clears_done < want && !g.dead {
            g = sh.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        0
    }

    /// STORE SUBCHANNEL: the SCHIB (PMCW and current SCSW). `Err(ENODEV)` once the channel
    /// thread is gone.
    pub fn store_schib(&self) -> Result<Schib, i32> {
        let g = self.shared.lock();
        if g.dead {
            return Err(libc::ENODEV);
        }
        let mut chpid = [0u8; 8];
        chpid[0] = self.shared.chpid;
        Ok(Schib {
            pmcw: Pmcw {
                intparm: g.intparm,
                flags: PmcwFlags::new().with_enabled(true).with_devno_valid(true),
                devno: self.shared.devno,
                lpm: PATH,
                pnom: g.pnom,
                lpum: g.lpum,
                pim: PATH,
                mbi: 0,
                pom: g.pom,
                pam: g.pam,
                chpid,
                chars: PmcwChars::new()
                    .with_subchannel_type(subchannel_type::IO)
                    .with_concurrent_sense(true),
            },
            scsw: g.current_scsw(),
            mda: [0; 12],
        })
    }

    /// Sets channel path `chpid` online or offline and queues the channel report; returns
    /// false (and does nothing) if `chpid` is not this subchannel's path or nothing changes.
    pub fn set_path_online(&self, chpid: u8, online: bool) -> bool {
        if chpid != self.shared.chpid {
            return false;
        }
        let mut g = self.shared.lock();
        if (g.pam & PATH != 0) == online {
            return false;
        }
        let crw = if online {
            g.pam |= PATH;
            g.pom |= PATH;
            g.pnom &= !PATH;
            Crw::channel_path_online(chpid)
        } else {
            g.pam &= !PATH;
            g.pom &= !PATH;
            g.pnom |= PATH;
            Crw::channel_path_offline(chpid)
        };
        if g.crws.len() < MAX_QUEUED_CRWS {
            g.crws.push_back(crw);
        } else if let Some(last) = g.crws.back_mut() {
            last.set_overflow(true);
        }
        self.shared.kick(&g);
        true
    }

    /// How the channel thread has picked up work so far.
    pub fn handoff_stats(&self) -> HandoffStats {
        HandoffStats {
            spin_hits: self.shared.spin_hits.load(Ordering::Relaxed),
            parks: self.shared.parks.load(Ordering::Relaxed),
            spin_ns: self.shared.spin_ns.load(Ordering::Relaxed),
            inline_done: self.shared.inline_done.load(Ordering::Relaxed),
            inline_handoffs: self.shared.inline_handoffs.load(Ordering::Relaxed),
        }
    }
}

impl Drop for EmulatedSubchannel {
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock();
            g.shutdown = true;
            self.shared.kick(&g);
        }
        if let Some(t) = self.thread.take() {
            // The last reference can go on the channel thread itself (an interrupt sink that
            // held the device, which holds us): it cannot join itself, and needs not — it sees
            // `shutdown` when this returns and exits.
            if t.thread().id() == std::thread::current().id() {
                return;
            }
            if t.join().is_err() {
                tracing::error!(devno = self.shared.devno, "channel thread panicked");
            }
        }
    }
}

/// What the channel thread does next, decided under the lock.
enum Work {
    /// Status or a channel report is pending: [`deliver`] takes it, still under the lock.
    Deliver(EventSink),
    Step(Exec, Box<dyn DeviceModel>),
    Idle(u64),
    Again,
    Exit,
}

fn next_work(g: &mut Inner, seq: &AtomicU64) -> Work {
    if g.shutdown {
        return Work::Exit;
    }
    // Clear first: its caller is waiting (and it discards any pending status).
    if g.actl & actl::CLEAR_PENDING != 0 {
        g.do_clear();
        g.clears_done = g.clears_requested;
        return Work::Again;
    }
    // The sink is cloned only when there is something to deliver (an `Arc` clone and drop
    // per loop turn otherwise). The event stays in `Inner` until `deliver` takes it: the IRB
    // is not moved through `Work`.
    if g.pending.is_some() || !g.crws.is_empty() {
        if let Some(sink) = g.sink.clone() {
            return Work::Deliver(sink);
        }
    }
    if g.actl & actl::HALT_PENDING != 0 {
        g.do_halt();
        return Work::Again;
    }
    if g.actl & actl::START_PENDING != 0 {
        if let Some(prog) = g.queued.take() {
            let run = match g.spare.take() {
                Some(mut run) => {
                    run.restart(prog.orb());
                    run
                }
                None => Box::new(ChannelRun::new(prog.orb())),
            };
            g.exec = Some(Exec { run, prog });
            g.actl =
                (g.actl & !actl::START_PENDING) | actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE;
            g.lpum = PATH;
        } else {
            g.actl &= !actl::START_PENDING;
        }
        // Go on at once, under the same lock: nobody waits on a start (no `done` wake-up
        // needed). Nothing checked above changed (no status, halt or clear came with the
        // start), so the program is what is left to decide on.
    }
    let runnable =
        g.exec.is_some() && (g.actl & actl::SUSPENDED == 0 || g.actl & actl::RESUME_PENDING != 0);
    if runnable {
        if let (Some(mut exec), Some(dev)) = (g.exec.take(), g.dev.take()) {
            if g.actl & actl::SUSPENDED != 0 {
                // Resume: the suspended CCW is refetched.
                let _ = exec.run.resume();
                g.actl = (g.actl & !(actl::SUSPENDED | actl::RESUME_PENDING))
                    | actl::SUBCHANNEL_ACTIVE
                    | actl::DEVICE_ACTIVE;
            }
            return Work::Step(exec, dev);
        }
    }
    Work::Idle(seq.load(Ordering::Acquire))
}

/// Records what one step produced (lock held, device back in place).
fn finish_step(g: &mut Inner, mut exec: Exec, step: Option<Step>, sense: Option<Vec<u8>>) {
    let clearing = g.actl & actl::CLEAR_PENDING != 0;
    let halting = g.actl & actl::HALT_PENDING != 0;
    match step {
        Some(Step::Continue) => g.exec = Some(exec),
        Some(Step::Intermediate(s)) => {
            g.exec = Some(exec);
            if !clearing {
                let irb = g.irb(s);
                g.set_status(irb);
            }
        }
        Some(Step::Suspended(s)) => {
            if !clearing && g.actl & actl::RESUME_PENDING != 0 {
                // Resume pending when the S flag is met: the CCW is refetched at once.
                let _ = exec.run.resume();
                g.actl &= !actl::RESUME_PENDING;
            } else if !clearing {
                g.actl = (g.actl & actl::HALT_PENDING) | actl::SUSPENDED;
                if let Some(s) = s {
                    let irb = g.irb(s);
                    g.set_status(irb);
                }
            }
            g.exec = Some(exec);
        }
        Some(Step::Done(mut s)) => {
            // The program (and, if the driver let go, its pins) goes before the interrupt.
            let Exec { run, prog } = exec;
            drop(prog);
            g.spare = Some(run);
            if !clearing {
                if halting {
                    // The halt function ends with the final status (PoP).
                    s.flags.set_fctl(s.flags.fctl() | fctl::HALT);
                }
                g.fctl = 0;
                g.actl = 0;
                let mut irb = g.irb(s);
                if s.dstat & dstat::UNIT_CHECK != 0 {
                    irb = irb.with_concurrent_sense(&sense.unwrap_or_default());
                }
                g.set_status(irb);
            }
        }
        None => {
            let flags = ScswFlags::from_orb(&exec.run.orb().ctl);
            drop(exec);
            if !clearing {
                let fc = fctl::START | if halting { fctl::HALT } else { 0 };
                let s = equipment_check_scsw(flags, g.last.cpa, fc);
                g.fctl = 0;
                g.actl = 0;
                let irb = g.irb(s).with_concurrent_sense(&equipment_check_sense());
                g.set_status(irb);
            }
        }
    }
}

/// Takes the pending event (lock held, as [`next_work`] left it) and hands it to the sink with
/// the lock released; returns the lock.
fn deliver<'a>(
    sh: &'a Shared,
    mut g: MutexGuard<'a, Inner>,
    sink: EventSink,
) -> MutexGuard<'a, Inner> {
    let Some(ev) = g.take_event() else {
        return g;
    };
    drop(g);
    if catch_unwind(AssertUnwindSafe(|| sink(ev))).is_err() {
        tracing::error!(devno = sh.devno, "subchannel event sink panicked");
    }
    sh.lock()
}

/// How long a runner may go on stepping: the inline budget (see [`run_inline`]), or none
/// for the channel thread.
struct Budget {
    /// When the budget is spent; `None`: never.
    deadline: Option<Instant>,
    /// Commands run so far.
    commands: u32,
    /// Data bytes those commands transferred.
    bytes: u64,
    /// The clock is read next once `commands` reaches this ...
    check_commands: u32,
    /// ... or `bytes` reaches this.
    check_bytes: u64,
    /// The deadline was seen passed (it stays passed: no more reads).
    expired: bool,
    /// Clock reads so far.
    clock_reads: u32,
}

impl Budget {
    /// A budget of `len` from now (a deadline past the clock's range is no deadline).
    fn new(len: Duration) -> Self {
        Budget {
            deadline: Instant::now().checked_add(len),
            commands: 0,
            bytes: 0,
            check_commands: UNTIMED_COMMANDS,
            check_bytes: CLOCK_EVERY_BYTES,
            expired: false,
            clock_reads: 0,
        }
    }

    /// No limit (the channel thread).
    fn unlimited() -> Self {
        // Built without reading the clock (the channel thread makes one per step).
        Budget {
            deadline: None,
            commands: 0,
            bytes: 0,
            check_commands: 0,
            check_bytes: 0,
            expired: false,
            clock_reads: 0,
        }
    }

    /// Counts one command that transferred `bytes`.
    fn ran(&mut self, bytes: u64) {
        self.commands = self.commands.saturating_add(1);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Whether the runner must stop before the next command. The clock is read once
    /// [`UNTIMED_COMMANDS`] commands have run, then again after every
    /// [`CLOCK_EVERY_COMMANDS`] commands or [`CLOCK_EVERY_BYTES`] bytes, whichever comes
    /// first (a read costs more than a short command's bookkeeping); once passed, the
    /// deadline stays passed.
    fn spent(&mut self) -> bool {
        if self.expired {
            return true;
        }
        let Some(deadline) = self.deadline else {
            return false;
        };
        if self.commands < self.check_commands && self.bytes < self.check_bytes {
            return false;
        }
        self.check_commands = self.commands.saturating_add(CLOCK_EVERY_COMMANDS);
        self.check_bytes = self.bytes.saturating_add(CLOCK_EVERY_BYTES);
        self.clock_reads += 1;
        self.expired = Instant::now() >= deadline;
        self.expired
    }
}

/// Runs the program with the lock released (the device and the program are out of `Inner`
/// meanwhile, so requests never wait for the device) and returns the lock. Commands that
/// just continue the program (no status) run back to back while no request came in (each
/// bumps `seq` under the lock) and the budget lasts: taking the lock between them would
/// find nothing to do but the next command.
fn step<'a>(
    sh: &'a Shared,
    g: MutexGuard<'a, Inner>,
    mut exec: Exec,
    mut dev: Box<dyn DeviceModel>,
    budget: &mut Budget,
) -> MutexGuard<'a, Inner> {
    // Read under the lock: a request made after this is seen at the next command boundary.
    let seen = sh.seq.load(Ordering::Acquire);
    drop(g);
    let mut moved = exec.run.bytes_moved();
    let step = guarded("execute", || {
        exec.run.step_while(&*exec.prog, dev.as_mut(), |s, now| {
            budget.ran(now.wrapping_sub(moved));
            moved = now;
            s == Step::Continue && sh.seq.load(Ordering::Acquire) == seen && !budget.spent()
        })
    });
    let sense = match step {
        Some(Step::Done(s)) if s.dstat & dstat::UNIT_CHECK != 0 => guarded("sense", || dev.sense()),
        None => {
            guarded("reset_operation", || dev.reset_operation());
            None
        }
        _ => None,
    };
    let mut g = sh.lock();
    g.dev = Some(dev);
    finish_step(&mut g, exec, step, sense);
    g
}

/// Commands an inline START runs before it first compares the clock with its budget: a
/// DASD read (Define Extent, Locate Record, Read) ends without reading the clock again.
/// They stay bounded: each is one command, and a single command may outlast the budget
/// anyway (the budget is only checked between commands).
const UNTIMED_COMMANDS: u32 = 4;

/// After the first clock read, commands between two reads: with data moving at memory
/// speed a command of a few KiB takes about a microsecond, so 16 of them stay far inside
/// any useful budget (a 1 MiB program of 4 KiB reads reads the clock 17 times, not 256).
const CLOCK_EVERY_COMMANDS: u32 = 16;

/// After the first clock read, data bytes between two reads: bounds the time between reads
/// for programs of large commands (256 KiB is tens of microseconds of copying).
const CLOCK_EVERY_BYTES: u64 = 256 << 10;

/// Inline execution: the thread in START runs the subchannel's work (the program, then its
/// interrupts) until nothing is left or the budget is spent, then hands what remains to the
/// channel thread. Called with `runner` set to `Inline`.
fn run_inline<'a>(sh: &'a Shared, mut g: MutexGuard<'a, Inner>) {
    // The budget runs from here (when the clock is read: `Budget::spent`).
    let mut budget = Budget::new(sh.inline_budget);
    loop {
        // Over budget with status still to present: present it here first (it is cheap and
        // saves the channel thread a wake-up); otherwise hand the rest over.
        if g.pending.is_none() && g.crws.is_empty() && budget.spent() {
            break;
        }
        match next_work(&mut g, &sh.seq) {
            Work::Exit => break,
            Work::Again => sh.done.notify_all(),
            Work::Deliver(sink) => g = deliver(sh, g, sink),
            Work::Step(exec, dev) => g = step(sh, g, exec, dev, &mut budget),
            Work::Idle(_) => {
                // Nothing left for anybody (the program ended or is suspended).
                g.runner = Runner::Idle;
                if g.exec.is_none() && g.queued.is_none() {
                    sh.inline_done.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
    sh.inline_handoffs.fetch_add(1, Ordering::Relaxed);
    g.runner = Runner::Idle;
    let wake = sh.announce(&g);
    drop(g);
    if wake {
        sh.work.notify_one();
    }
}

fn channel_thread(sh: Arc<Shared>) {
    let _guard = DeathGuard(sh.clone());
    let mut backoff = Backoff::default();
    let mut g = sh.lock();
    loop {
        let work = if g.runner == Runner::Inline {
            // A START is running the work on its own thread; it hands over what it leaves.
            Work::Idle(sh.seq.load(Ordering::Acquire))
        } else {
            next_work(&mut g, &sh.seq)
        };
        match work {
            Work::Exit => return,
            Work::Again => {
                g.runner = Runner::Channel;
                // Wake clear() callers whose request was just performed.
                sh.done.notify_all();
            }
            Work::Deliver(sink) => {
                g.runner = Runner::Channel;
                g = deliver(&sh, g, sink);
            }
            Work::Step(exec, dev) => {
                g.runner = Runner::Channel;
                g = step(&sh, g, exec, dev, &mut Budget::unlimited());
            }
            Work::Idle(seen) => {
                if g.runner == Runner::Channel {
                    g.runner = Runner::Idle;
                }
                drop(g);
                if !sh.spin.is_zero() && backoff.should_spin() {
                    let hit = spin_for(&sh, seen);
                    backoff.record(hit);
                    if hit {
                        g = sh.lock();
                        continue;
                    }
                }
                g = sh.lock();
                if sh.seq.load(Ordering::Acquire) == seen {
                    sh.parks.fetch_add(1, Ordering::Relaxed);
                    while sh.seq.load(Ordering::Acquire) == seen {
                        g.sleeping = true;
                        g = sh.work.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.sleeping = false;
                }
            }
        }
    }
}

/// Adaptive spinning: after [`Backoff::MAX_MISSES`] spins in a row that found no work, the
/// thread blocks at once for the next [`Backoff::SKIP`] idle periods, then tries spinning
/// again. When the cores are oversubscribed the requester is rarely running while the channel
/// thread spins, and every miss would burn the whole budget (see `benches/handoff.rs`).
#[derive(Debug, Default)]
struct Backoff {
    misses: u32,
    skip: u32,
}

impl Backoff {
    const MAX_MISSES: u32 = 4;
    const SKIP: u32 = 64;

    fn should_spin(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn record(&mut self, hit: bool) {
        if hit {
            self.misses = 0;
        } else {
            self.misses += 1;
            if self.misses >= Self::MAX_MISSES {
                self.misses = 0;
                self.skip = Self::SKIP;
            }
        }
    }
}

/// Spins up to the policy's budget for a request; true if one came.
fn spin_for(sh: &Shared, seen: u64) -> bool {
    let t0 = Instant::now();
    let mut hit = false;
    'spin: loop {
        // Check the clock only every few iterations: reading it costs more than the load.
        for _ in 0..64 {
            if sh.seq.load(Ordering::Acquire) != seen {
                hit = true;
                break 'spin;
            }
            std::hint::spin_loop();
        }
        if t0.elapsed() >= sh.spin {
            break;
        }
    }
    let ns = t0.elapsed().as_nanos().min(u64::MAX as u128) as u64;
    sh.spin_ns.fetch_add(ns, Ordering::Relaxed);
    if hit {
        sh.spin_hits.fetch_add(1, Ordering::Relaxed);
    }
    hit
}

/// The emulated subchannel as the vfio-ccw device's backend.
impl crate::driver::Subchannel for EmulatedSubchannel {
    fn start(&self, program: Arc<HostProgram>) -> u8 {
        EmulatedSubchannel::start(self, program)
    }

    fn resume(&self) -> u8 {
        EmulatedSubchannel::resume(self)
    }

    fn halt(&self) -> u8 {
        EmulatedSubchannel::halt(self)
    }

    fn clear(&self) -> u8 {
        EmulatedSubchannel::clear(self)
    }

    fn store_schib(&self) -> Result<crate::orb::Schib, i32> {
        EmulatedSubchannel::store_schib(self)
    }

    fn status_modifier_commands(&self) -> CommandSet {
        self.shared.status_modifier
    }

    fn set_events(&self, events: std::sync::Weak<dyn crate::driver::SubchannelEvents>) {
        self.set_event_sink(Arc::new(move |ev| {
            if let Some(dev) = events.upgrade() {
                match ev {
                    SubchannelEvent::Interrupt(irb) => dev.interrupt(irb),
                    SubchannelEvent::PathEvent(crw) => dev.path_event(crw),
                }
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB program of 4 KiB reads (259 commands) reads the clock about every 16
    /// commands, not at every one, and a short program never.
    #[test]
    fn budget_reads_the_clock_every_few_commands() {
        let mut b = Budget::new(Duration::from_secs(3600));
        for _ in 0..3 {
            b.ran(4096);
            assert!(!b.spent());
        }
        assert_eq!(
            b.clock_reads, 0,
            "a DASD read (3 commands) never reads the clock"
        );
        for _ in 3..259 {
            b.ran(4096);
            assert!(!b.spent());
        }
        // At command 4, then every 16: 4, 20, ..., 244.
        assert_eq!(b.clock_reads, 16);
    }

    /// Large commands bring the read forward: every 256 KiB moved.
    #[test]
    fn budget_reads_the_clock_by_bytes() {
        let mut b = Budget::new(Duration::from_secs(3600));
        for _ in 0..8 {
            b.ran(256 << 10);
            assert!(!b.spent());
        }
        assert_eq!(b.clock_reads, 8);
        // The channel thread never reads it.
        let mut u = Budget::unlimited();
        for _ in 0..100 {
            u.ran(1 << 20);
            assert!(!u.spent());
        }
        assert_eq!(u.clock_reads, 0);
    }

    /// A long program is still handed over: a budget that runs out mid-program is seen
    /// within 16 commands, and stays spent (the runner's loop asks again before handing
    /// the program to the channel thread).
    #[test]
    fn budget_spent_mid_program_stops_the_runner() {
        let mut b = Budget::new(Duration::from_secs(3600));
        let mut n = 0u32;
        while n < 40 {
            b.ran(8);
            n += 1;
            assert!(!b.spent());
        }
        b.deadline = Some(Instant::now());
        let mut stopped = None;
        for _ in 0..10_000 {
            b.ran(8);
            n += 1;
            if b.spent() {
                stopped = Some(n);
                break;
            }
        }
        let stopped = stopped.expect("the budget ends the inline run");
        assert!((41..=56).contains(&stopped), "{stopped}");
        assert!(b.spent(), "stays spent");
        // An expired deadline is seen at the first check (command 4).
        let mut b = Budget::new(Duration::ZERO);
        let k = (1..100)
            .find(|_| {
                b.ran(0);
                b.spent()
            })
            .unwrap();
        assert_eq!(k, UNTIMED_COMMANDS);
    }
}
