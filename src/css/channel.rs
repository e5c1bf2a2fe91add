//! The channel engine: an interpreter for command-mode channel programs.
//!
//! [`ChannelRun`] executes one started channel program (per its [`Orb`]) over storage
//! ([`ChannelMemory`]) and a device ([`DeviceModel`]), one command at a time, and produces the
//! SCSWs a channel presents: intermediate status for PCI and initial status, suspended
//! status, and final status. Stepping lets the subchannel thread honour halt and clear between
//! CCWs and resume a suspended program.
//!
//! Semantics follow the z/Architecture Principles of Operation (SA22-7832, "Input/Output
//! Instructions", "Basic I/O Functions"); where the PoP leaves the channel a choice, Hercules'
//! `channel.c` is followed and the choice is named in the comment at that spot.
//!
//! # Data chaining
//! The channel walks a whole data chain before it starts the device, resolving every CCW's
//! storage (direct, IDA, MIDA) into pieces, so the device sees one buffer (`css::device`). An
//! error found in that walk (a bad data-chained CCW, IDAW or MIDAW, or a storage fault while
//! fetching output data) sits at a byte offset of the command's data; it is reported only if
//! the device needs that byte (it transfers past it, or up to it with `more`), as on a channel
//! that finds the error when the transfer reaches it. An error at offset 0 ends the program
//! before the device is started. Input is scattered after the device ran; a storage fault
//! there stops the scatter (bytes before the faulting piece stay stored) and is reported with
//! the residual count at the faulting piece.
//!
//! # Example
//! ```
//! use vccw::css::{ChannelRun, GuestChannelMemory, LoopbackDevice, Step};
//! use vccw::ccw::{Ccw1, CcwFlags};
//! use vccw::orb::{dstat, Orb, OrbControls};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! // One WRITE of 4 bytes at 0x2000, program at 0x1000.
//! let ccw = Ccw1 { cmd: 0x01, flags: CcwFlags::new(), count: 4, cda: 0x2000 };
//! gm.write_slice(&ccw.to_bytes(), GuestAddress(0x1000)).unwrap();
//! gm.write_slice(b"abcd", GuestAddress(0x2000)).unwrap();
//! let mem = GuestChannelMemory::new(gm);
//! let mut dev = LoopbackDevice::new();
//! let orb = Orb { intparm: 1, ctl: OrbControls::new().with_format1(true), cpa: 0x1000 };
//! let mut run = ChannelRun::new(&orb);
//! let Step::Done(scsw) = run.step(&mem, &mut dev) else { panic!() };
//! assert_eq!(scsw.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
//! assert_eq!(scsw.cpa, 0x1008);
//! assert_eq!(dev.written(), b"abcd");
//! ```

use thiserror::Error;

use crate::ccw::{command, Ccw0, Ccw1, CcwFlags, CommandKind, IdawFormat, Midaw, CCW_SIZE};
use crate::css::device::{Command, DataArea, DeviceModel, InputSink, Outcome};
use crate::css::memory::{AccessFault, ChannelMemory};
use crate::orb::{actl, cstat, dstat, fctl, stctl, Orb, Scsw, ScswFlags};

/// Consecutive CCWs (TICs and data-chained CCWs included) the channel fetches without any
/// data transfer before it ends the program with a program check: QEMU's css.c rule ("more
/// than 255 CCWs without data transfer"), chosen over Hercules' backward-TIC counter because
/// it also bounds forward loops of NOOPs. Data moves when the device executes a command, so a
/// single data chain is bounded to 255 CCWs too (the kernel's translator refuses longer
/// chain segments anyway).
pub const MAX_CCWS_WITHOUT_DATA: u32 = 255;

/// Most bytes one data chain may offer a device (an emulation bound, not architecture: a
/// TIC loop of data-chained CCWs would otherwise gather without end). Exceeding it is a
/// program check. 16 MiB covers 256 CCWs of the largest count.
pub const MAX_DATA_CHAIN_BYTES: usize = 16 << 20;

/// Output data up to this many bytes is gathered on the stack rather than in the run's
/// buffer (control commands' parameters; a 3390's largest is Locate Record Extended's 20
/// bytes plus extended parameters).
const SMALL_OUTPUT: usize = 64;

/// Status-control bits of a suspended SCSW. The PoP has alert status set with intermediate
/// and status pending (Hercules notes it and deliberately presents 0x29 without alert for old
/// operating systems); vccw follows the PoP.
pub const SUSPENDED_STCTL: u8 = stctl::ALERT | stctl::INTERMEDIATE | stctl::STATUS_PENDING;

/// One data transfer between storage and the channel: only data bytes (never CCW, IDAW or
/// MIDAW fetches, never skipped bytes). Adjacent transfers in the same direction are merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Lowest storage address of the bytes moved.
    pub addr: u64,
    /// Number of bytes.
    pub len: usize,
    /// Stored into storage (read, read backward, sense) rather than fetched from it.
    pub input: bool,
}

/// What one [`ChannelRun::step`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A command completed and the program goes on; nothing to present.
    Continue,
    /// Intermediate status is pending (PCI, initial status); the program goes on.
    Intermediate(Scsw),
    /// The program is suspended (`None` if the ORB suppresses the suspended interruption).
    /// Stepping a suspended run returns `Suspended(None)` until [`ChannelRun::resume`].
    Suspended(Option<Scsw>),
    /// The program ended with this final status (returned again by later steps).
    Done(Scsw),
}

/// Why a resume was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ResumeError {
    /// The run is not suspended (RESUME SUBCHANNEL would set condition code 1 or 2).
    #[error("channel program is not suspended")]
    NotSuspended,
}

impl ResumeError {
    /// The errno the vfio-ccw uAPI uses for it: `EBUSY` (cc 1/2).
    pub fn errno(&self) -> i32 {
        libc::EBUSY
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Suspended { ccw: u32 },
    Finished(Scsw),
}

/// A check that ends the program: subchannel status, CCW address and residual count.
#[derive(Debug, Clone, Copy)]
struct Check {
    cstat: u8,
    cpa: u32,
    count: u16,
}

/// An error inside a data chain, located at a byte offset of the command's data.
#[derive(Debug, Clone, Copy)]
struct ChainErr {
    cstat: u8,
    cpa: u32,
    /// Offset of the faulty CCW's first byte in the command's data.
    start: usize,
    /// Count of the faulty CCW (0 if it could not be fetched).
    count: u16,
}

/// One CCW of a data chain.
#[derive(Debug, Clone, Copy)]
struct Seg {
    ccw: u32,
    flags: CcwFlags,
    count: u16,
    start: usize,
}

/// A contiguous storage area of a command's data, in transfer order. For read backward the
/// bytes go from `lo + len - 1` downward.
#[derive(Debug, Clone, Copy)]
struct Piece {
    lo: u64,
    len: usize,
    skip: bool,
}

/// The channel's side of a direct input [`DataArea`]: stores each byte the device puts at
/// its place in storage (pieces in transfer order), at most `valid` bytes, nothing into skip
/// pieces, and nothing after the first storage fault (bytes before the faulting piece stay
/// stored, as on a channel that finds the fault when the transfer reaches it).
struct Scatter<'a> {
    mem: &'a dyn ChannelMemory,
    key: u8,
    pieces: &'a [Piece],
    valid: usize,
    back: bool,
    /// Index and transfer offset of the piece the last store ended in (stores come in
    /// increasing order, so the walk resumes there).
    cursor: (usize, usize),
    /// Transfer offset of the first byte of the piece that faulted, and the fault.
    fault: Option<(usize, AccessFault)>,
    /// Storage ranges stored, when tracing.
    trace: Option<Vec<(u64, usize)>>,
    /// The channel's reusable buffer (for `with_buffer`).
    buf: &'a mut Vec<u8>,
}

impl InputSink for Scatter<'_> {
    fn store(&mut self, off: usize, src: &[u8]) {
        // The usual put: all of a read's bytes at once, into the first piece. Stored as
        // the walk below would (the cursor stays at the first piece), without the walk.
        if off == 0
            && self.cursor == (0, 0)
            && self.fault.is_none()
            && self.trace.is_none()
            && !self.back
            && !src.is_empty()
            && src.len() <= self.valid
        {
            if let Some(p) = self
                .pieces
                .first()
                .filter(|p| !p.skip && src.len() <= p.len)
            {
                if let Err(f) = self.mem.write(p.lo, src, self.key) {
                    self.fault = Some((0, f));
                }
                return;
            }
        }
        let (mut i, mut pos) = self.cursor;
        if off < pos {
            (i, pos) = (0, 0);
        }
        let mut off = off;
        let mut src = src;
        while !src.is_empty() && self.fault.is_none() && off < self.valid {
            let Some(p) = self.pieces.get(i) else { break };
            if off >= pos + p.len {
                pos += p.len;
                i += 1;
                continue;
            }
            let r = off - pos;
            let n = (p.len - r).min(src.len()).min(self.valid - off);
            if !p.skip {
                let res = if self.back {
                    // Transfer order runs downward from the piece's top byte.
                    let lo = p.lo + (p.len - r - n) as u64;
                    store_reversed(self.mem, lo, &src[..n], self.key).map(|()| lo)
                } else {
                    let lo = p.lo + r as u64;
                    self.mem.write(lo, &src[..n], self.key).map(|()| lo)
                };
                match res {
                    Ok(lo) => {
                        if let Some(t) = &mut self.trace {
                            t.push((lo, n));
                        }
                    }
                    Err(f) => {
                        self.fault = Some((pos, f));
                        break;
                    }
                }
            }
            off += n;
            src = &src[n..];
        }
        self.cursor = (i, pos);
    }

    fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(self.buf)
    }

    fn give_back(&mut self, buf: Vec<u8>) {
        *self.buf = buf;
    }
}

/// [`Scatter`] for the usual input command (see [`Core::execute`]): one storage piece of
/// `len` bytes at `lo`, stored in ascending order, every byte valid, no trace. What
/// `Scatter` does with such a single piece, without its walk.
struct OnePiece<'a> {
    mem: &'a dyn ChannelMemory,
    key: u8,
    lo: u64,
    len: usize,
    /// The storage fault that stopped the stores (at transfer offset 0: the only piece).
    fault: Option<AccessFault>,
    /// The channel's reusable buffer (for `with_buffer`).
    buf: &'a mut Vec<u8>,
}

impl InputSink for OnePiece<'_> {
    fn store(&mut self, off: usize, src: &[u8]) {
        if self.fault.is_some() || off >= self.len || src.is_empty() {
            return;
        }
        let n = (self.len - off).min(src.len());
        if let Err(f) = self.mem.write(self.lo + off as u64, &src[..n], self.key) {
            self.fault = Some(f);
        }
    }

    fn take_buffer(&mut self) -> Vec<u8> {
        std::mem::take(self.buf)
    }

    fn give_back(&mut self, buf: Vec<u8>) {
        *self.buf = buf;
    }
}

/// Stores zeros at transfer offsets `[from, to)`: bytes the device transferred but did not
/// put read as zeros, as in a buffer.
#[cold]
fn store_zeros(sink: &mut dyn InputSink, from: usize, to: usize) {
    let zeros = [0u8; 512];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len());
        sink.store(at, &zeros[..n]);
        at += n;
    }
}

/// Stores `src` (in transfer order) reversed, so its first byte lands at the highest
/// address of `[lo, lo + src.len())`. One checked write: a fault stores nothing.
fn store_reversed(
    mem: &dyn ChannelMemory,
    lo: u64,
    src: &[u8],
    key: u8,
) -> Result<(), AccessFault> {
    let rev: Vec<u8> = src.iter().rev().copied().collect();
    mem.write(lo, &rev, key)
}

/// The storage of one step: the channel's memory, with its program image (if it has one)
/// at hand, so CCW, IDAW and MIDAW fetches from the program cost no call.
struct Storage<'a> {
    mem: &'a dyn ChannelMemory,
    base: u64,
    image: &'a [u8],
}

impl<'a> Storage<'a> {
    fn new(mem: &'a dyn ChannelMemory) -> Self {
        let (base, image) = mem.program_image().unwrap_or((0, &[]));
        Storage { mem, base, image }
    }

    /// Fetches `N` (a CCW, IDAW or MIDAW) bytes at `addr`: from the image when they lie in
    /// it (what `read` would return), else through `read`.
    #[inline(always)]
    fn fetch<const N: usize>(&self, addr: u64, key: u8) -> Result<[u8; N], AccessFault> {
        let in_image = usize::try_from(addr.wrapping_sub(self.base))
            .ok()
            .and_then(|off| self.image.get(off..))
            .and_then(|s| s.first_chunk::<N>());
        match in_image {
            Some(b) => Ok(*b),
            None => self.fetch_slow(addr, key),
        }
    }

    /// [`Self::fetch`] outside the image: out of line, so the usual fetch stays small.
    #[cold]
    #[inline(never)]
    fn fetch_slow<const N: usize>(&self, addr: u64, key: u8) -> Result<[u8; N], AccessFault> {
        let mut b = [0u8; N];
        self.mem.read(addr, &mut b, key)?;
        Ok(b)
    }
}

fn fault_status(f: AccessFault) -> u8 {
    match f {
        AccessFault::Addressing(_) => cstat::PROGRAM_CHECK,
        AccessFault::Protection(_) => cstat::PROTECTION_CHECK,
    }
}

/// The ORB's addressing controls, decoded once per start rather than at every use.
#[derive(Debug, Clone, Copy)]
struct Mode {
    fmt1: bool,
    key: u8,
    /// Highest address a CCW, IDAL, MIDAL or direct data address may reach.
    limit: u64,
    /// Bytes per IDAW.
    idaw_size: u64,
    /// Size of the block an IDAW designates, less one.
    block_mask: u64,
}

impl Mode {
    fn of(orb: &Orb) -> Self {
        let fmt1 = orb.ctl.format1();
        let idaw = IdawFormat::from_orb(orb.ctl.format2_idaw(), orb.ctl.idaw_2k());
        Mode {
            fmt1,
            key: orb.ctl.key(),
            limit: if fmt1 { 0x7fff_ffff } else { 0x00ff_ffff },
            idaw_size: idaw.idaw_size(),
            block_mask: idaw.block_size() - 1,
        }
    }
}

/// [`CommandKind::of`] for every code: one load per command instead of two matches.
static KINDS: [CommandKind; 256] = {
    let mut t = [CommandKind::Invalid; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = CommandKind::of(i as u8);
        i += 1;
    }
    t
};

/// One started channel program.
#[derive(Debug, Clone)]
pub struct ChannelRun {
    core: Core,
    /// The per-command lists, apart from the program's state so the data-chain walk and
    /// the transfer borrow both at once (no moving them out and back per command).
    scratch: Scratch,
}

/// A run's reusable lists: the data buffer, CCWs and storage pieces of the last command,
/// kept so a long chain does not allocate (and free) them per CCW.
#[derive(Debug, Clone, Default)]
struct Scratch {
    buf: Vec<u8>,
    segs: Vec<Seg>,
    pieces: Vec<Piece>,
}

/// The program's state (everything but the scratch lists).
#[derive(Debug, Clone)]
struct Core {
    orb: Orb,
    /// What the ORB says about addressing, decoded once per start.
    mode: Mode,
    /// Address of the next CCW to fetch.
    next: u32,
    /// Address of the last CCW executed (for the halt CPA).
    last_ccw: Option<u32>,
    chained: bool,
    prev_code: Option<u8>,
    seq: u32,
    no_data: u32,
    started: bool,
    initial_due: bool,
    state: State,
    trace: bool,
    transfers: Vec<Transfer>,
    /// Data bytes the device transferred so far (for the inline time budget).
    moved: u64,
    /// Whether a command of one CCW and one storage piece takes the single path of
    /// [`Core::execute`] (always, but for the test comparing it with the general path).
    lean: bool,
}

impl ChannelRun {
    /// Prepares the program the ORB designates; nothing is fetched until [`Self::step`].
    pub fn new(orb: &Orb) -> Self {
        ChannelRun {
            core: Core::new(orb),
            scratch: Scratch::default(),
        }
    }

    /// Prepares the program `orb` designates, as [`Self::new`] does, keeping this run's
    /// buffers (a subchannel reuses one run for program after program without allocating).
    pub fn restart(&mut self, orb: &Orb) {
        self.core.restart(orb);
        let Scratch { buf, segs, pieces } = &mut self.scratch;
        buf.clear();
        segs.clear();
        pieces.clear();
    }

    /// The ORB this program was started with.
    pub fn orb(&self) -> &Orb {
        &self.core.orb
    }

    /// Whether the program has ended (final status, halt or clear).
    pub fn is_finished(&self) -> bool {
        matches!(self.core.state, State::Finished(_))
    }

    /// Whether the program is suspended.
    pub fn is_suspended(&self) -> bool {
        matches!(self.core.state, State::Suspended { .. })
    }

    /// Turns recording of [`Transfer`]s (and `tracing` events per command) on or off.
    pub fn set_trace(&mut self, on: bool) {
        self.core.trace = on;
    }

    /// The data transfers recorded while tracing was on, in order.
    pub fn transfers(&self) -> &[Transfer] {
        &self.core.transfers
    }

    /// Data bytes the device transferred since the program started (either direction).
    pub(crate) fn bytes_moved(&self) -> u64 {
        self.core.moved
    }

    /// Runs the program up to the end of one command (with its data-chained CCWs).
    #[inline]
    pub fn step(&mut self, mem: &dyn ChannelMemory, dev: &mut dyn DeviceModel) -> Step {
        self.step_while(mem, dev, |_, _| false)
    }

    /// Steps as [`Self::step`] does, again and again while `more(step, bytes_moved)`
    /// (asked after every command, with what it returned and [`Self::bytes_moved`] then)
    /// says so; returns the last step. The subchannel runs commands back to back this
    /// way, with the program's storage looked up once rather than per command.
    #[inline]
    pub(crate) fn step_while(
        &mut self,
        mem: &dyn ChannelMemory,
        dev: &mut dyn DeviceModel,
        mut more: impl FnMut(Step, u64) -> bool,
    ) -> Step {
        let mem = &Storage::new(mem);
        loop {
            let s = self.core.step(mem, dev, &mut self.scratch);
            if !more(s, self.core.moved) {
                return s;
            }
        }
    }

    /// Steps until the program ends or suspends (or `max_steps` commands ran) and returns
    /// every status it presented: intermediate ones, then the final or suspended one.
    pub fn run_until_end(
        &mut self,
        mem: &dyn ChannelMemory,
        dev: &mut dyn DeviceModel,
        max_steps: usize,
    ) -> Vec<Scsw> {
        let mut out = Vec::new();
        for _ in 0..max_steps {
            match self.step(mem, dev) {
                Step::Continue => {}
                Step::Intermediate(s) => out.push(s),
                Step::Suspended(s) => {
                    out.extend(s);
                    break;
                }
                Step::Done(s) => {
                    out.push(s);
                    break;
                }
            }
        }
        out
    }

    /// RESUME SUBCHANNEL: a suspended program continues by refetching the suspended CCW
    /// (which suspends again if its S flag is still one).
    pub fn resume(&mut self) -> Result<(), ResumeError> {
        self.core.resume()
    }

    /// HALT SUBCHANNEL between CCWs: the device is signalled and the program ends.
    ///
    /// Status (as QEMU's css.c presents it): start and halt function, status pending alone,
    /// device end when the device was active, CCW address = last CCW executed + 8 (the
    /// suspended CCW + 8 when suspended), no subchannel status, count 0.
    pub fn halt(&mut self, dev: &mut dyn DeviceModel) -> Scsw {
        self.core.halt(dev)
    }

    /// CLEAR SUBCHANNEL: the device is reset and the program ends; the SCSW holds only the
    /// clear function and status pending (PoP "Clear Function").
    pub fn clear(&mut self, dev: &mut dyn DeviceModel) -> Scsw {
        self.core.clear(dev)
    }
}

impl Core {
    fn new(orb: &Orb) -> Self {
        Core {
            orb: *orb,
            mode: Mode::of(orb),
            next: orb.cpa,
            last_ccw: None,
            chained: false,
            prev_code: None,
            seq: 0,
            no_data: 0,
            started: false,
            initial_due: orb.ctl.initial_status_interrupt(),
            state: State::Running,
            trace: false,
            transfers: Vec::new(),
            moved: 0,
            lean: true,
        }
    }

    fn restart(&mut self, orb: &Orb) {
        // Field by field, in place: building a fresh run and moving it over `self` costs a
        // copy of the whole run per START. The destructuring keeps this in step with `new`.
        let Core {
            orb: o,
            mode,
            next,
            last_ccw,
            chained,
            prev_code,
            seq,
            no_data,
            started,
            initial_due,
            state,
            trace,
            transfers,
            moved,
            lean: _,
        } = self;
        *o = *orb;
        *mode = Mode::of(orb);
        *next = orb.cpa;
        *last_ccw = None;
        *chained = false;
        *prev_code = None;
        *seq = 0;
        *no_data = 0;
        *started = false;
        *initial_due = orb.ctl.initial_status_interrupt();
        *state = State::Running;
        *trace = false;
        transfers.clear();
        *moved = 0;
    }

    fn fmt1(&self) -> bool {
        self.mode.fmt1
    }

    fn key(&self) -> u8 {
        self.mode.key
    }

    /// Highest address a CCW, IDAL, MIDAL or direct data address may reach.
    fn limit(&self) -> u64 {
        self.mode.limit
    }

    /// SCSW word 0 bits the channel copies from the ORB.
    fn base_flags(&self) -> ScswFlags {
        ScswFlags::from_orb(&self.orb.ctl)
    }

    fn final_scsw(&self, cpa: u32, ds: u8, cs: u8, count: u16, zero_cc: bool) -> Scsw {
        let mut st = stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING;
        // Alert: any check or unusual device status (status modifier is normal ending).
        if cs & !cstat::PCI != 0
            || ds & !dstat::STATUS_MODIFIER != dstat::CHANNEL_END | dstat::DEVICE_END
        {
            st |= stctl::ALERT;
        }
        Scsw {
            flags: self
                .base_flags()
                .with_zero_cc(zero_cc)
                .with_fctl(fctl::START)
                .with_stctl(st),
            cpa,
            dstat: ds,
            cstat: cs,
            count,
        }
    }

    fn intermediate_scsw(&self, cpa: u32, pci: bool, zero_cc: bool) -> Scsw {
        Scsw {
            flags: self
                .base_flags()
                .with_zero_cc(zero_cc)
                .with_fctl(fctl::START)
                .with_actl(actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE)
                .with_stctl(stctl::INTERMEDIATE | stctl::STATUS_PENDING),
            cpa,
            dstat: 0,
            cstat: if pci { cstat::PCI } else { 0 },
            count: 0,
        }
    }

    fn finish(&mut self, s: Scsw) -> Step {
        self.state = State::Finished(s);
        Step::Done(s)
    }

    fn finish_check(&mut self, c: Check, ds: u8, pci: bool) -> Step {
        let s = self.final_scsw(
            c.cpa,
            ds,
            c.cstat | if pci { cstat::PCI } else { 0 },
            c.count,
            false,
        );
        self.finish(s)
    }

    fn record(&mut self, addr: u64, len: usize, input: bool) {
        if !self.trace || len == 0 {
            return;
        }
        if let Some(last) = self.transfers.last_mut() {
            if last.input == input {
                if last.addr.checked_add(last.len as u64) == Some(addr) {
                    last.len += len;
                    return;
                }
                if addr.checked_add(len as u64) == Some(last.addr) {
                    last.addr = addr;
                    last.len += len;
                    return;
                }
            }
        }
        self.transfers.push(Transfer { addr, len, input });
    }

    /// Fetches the CCW at `at` (alignment and addressing limit checked; address 0 is a
    /// program check, as in QEMU and in the translator).
    #[inline(always)]
    fn fetch_ccw(&self, mem: &Storage<'_>, at: u32) -> Result<Ccw1, u8> {
        if at == 0 || at & 7 != 0 || at as u64 > self.limit() {
            return Err(cstat::PROGRAM_CHECK);
        }
        let b = mem
            .fetch::<8>(at as u64, self.key())
            .map_err(fault_status)?;
        Ok(if self.fmt1() {
            Ccw1::from_bytes(b)
        } else {
            Ccw0::from_bytes(b).to_format1()
        })
    }

    /// Fetches the CCW at `at`, following TICs; returns the address of the non-TIC CCW.
    #[inline(always)]
    fn fetch_following(&mut self, mem: &Storage<'_>, at: u32) -> Result<(u32, Ccw1), Check> {
        // The usual CCW: no TIC, no fault, the no-data bound not reached. Anything else is
        // left to the loop, from the start (this changed nothing).
        if self.no_data < MAX_CCWS_WITHOUT_DATA {
            if let Ok(ccw) = self.fetch_ccw(mem, at) {
                if ccw.cmd != command::TIC {
                    self.no_data += 1;
                    return Ok((at, ccw));
                }
            }
        }
        self.fetch_following_loop(mem, at)
    }

    /// [`Self::fetch_following`] for TICs and checks.
    #[inline(never)]
    fn fetch_following_loop(&mut self, mem: &Storage<'_>, at: u32) -> Result<(u32, Ccw1), Check> {
        let mut at = at;
        let mut tic: Option<u32> = None;
        loop {
            self.no_data += 1;
            let cpa = at.wrapping_add(CCW_SIZE as u32);
            if self.no_data > MAX_CCWS_WITHOUT_DATA {
                return Err(Check {
                    cstat: cstat::PROGRAM_CHECK,
                    cpa,
                    count: 0,
                });
            }
            let ccw = match self.fetch_ccw(mem, at) {
                Ok(c) => c,
                Err(cs) => {
                    // Hercules: an invalid CCW address reached by a TIC reports TIC + 8.
                    let cpa = match tic {
                        Some(t) if cs == cstat::PROGRAM_CHECK => t.wrapping_add(8),
                        _ => cpa,
                    };
                    return Err(Check {
                        cstat: cs,
                        cpa,
                        count: 0,
                    });
                }
            };
            // Format 1: only 0x08 is a TIC; other xxxx1000 codes are invalid (Hercules).
            if ccw.cmd == command::TIC {
                let pc = Check {
                    cstat: cstat::PROGRAM_CHECK,
                    cpa,
                    count: 0,
                };
                // TIC to TIC, misaligned target, and (format 1) flags or count set: PoP
                // "Transfer in Channel" with Hercules' format-1 reading.
                if tic.is_some()
                    || ccw.cda & 7 != 0
                    || (self.fmt1() && (ccw.flags.into_bits() != 0 || ccw.count != 0))
                {
                    return Err(pc);
                }
                tic = Some(at);
                at = ccw.cda;
                continue;
            }
            return Ok((at, ccw));
        }
    }

    /// Checks a CCW's data address (PoP "Designation of Storage Area"; Hercules' checks).
    #[inline(always)]
    fn check_data_address(&self, ccw: &Ccw1, kind: CommandKind) -> Result<(), u8> {
        let count = ccw.count as u64;
        if count == 0 || (ccw.flags.skp() && kind.is_input()) {
            return Ok(());
        }
        let a = ccw.cda as u64;
        let bad = if ccw.flags.ida() {
            a & (self.mode.idaw_size - 1) != 0 || a > self.limit()
        } else if ccw.flags.mida() {
            a & 0xf != 0 || a > self.limit()
        } else if kind == CommandKind::ReadBackward {
            a > self.limit() || a + 1 < count
        } else {
            a + count - 1 > self.limit()
        };
        if bad {
            Err(cstat::PROGRAM_CHECK)
        } else {
            Ok(())
        }
    }

    /// Flag checks every CCW of a command (first or data chained) must pass.
    fn check_flags(&self, ccw: &Ccw1, data_chained: bool) -> Result<(), u8> {
        let f = ccw.flags;
        let pc = Err(cstat::PROGRAM_CHECK);
        if f.cd() && f.s() {
            return pc;
        }
        if f.mida() && (!self.orb.ctl.midaw() || f.ida() || f.skp()) {
            return pc;
        }
        if data_chained && f.s() {
            return pc;
        }
        Ok(())
    }

    /// Count checks (PoP: format-0 count 0 is a program check; Hercules: format-1 count 0
    /// with data chaining, on either side of the chain).
    fn check_count(&self, ccw: &Ccw1, data_chained: bool) -> Result<(), u8> {
        if ccw.count == 0 && (!self.fmt1() || ccw.flags.cd() || data_chained) {
            return Err(cstat::PROGRAM_CHECK);
        }
        Ok(())
    }

    /// Resolves one CCW's data area into pieces. Pieces before an error stay valid.
    fn resolve(
        &self,
        mem: &Storage<'_>,
        ccw: &Ccw1,
        kind: CommandKind,
        out: &mut Vec<Piece>,
    ) -> Result<(), u8> {
        let count = ccw.count as usize;
        if count == 0 {
            return Ok(());
        }
        let input = kind.is_input();
        let back = kind == CommandKind::ReadBackward;
        if ccw.flags.skp() && input {
            // Skip: count consumed, no storage touched (not even IDAWs, as Hercules).
            out.push(Piece {
                lo: 0,
                len: count,
                skip: true,
            });
            return Ok(());
        }
        let a = ccw.cda as u64;
        if ccw.flags.ida() {
            self.resolve_ida(mem, a, count, back, out)
        } else if ccw.flags.mida() {
            self.resolve_mida(mem, a, count, input, back, out)
        } else {
            // Direct: split at 4 KiB so a fault keeps page granularity.
            let mut left = count;
            let mut cur = a;
            while left > 0 {
                let n = if back {
                    ((cur & 0xfff) + 1).min(left as u64) as usize
                } else {
                    (0x1000 - (cur & 0xfff)).min(left as u64) as usize
                };
                if back {
                    out.push(Piece {
                        lo: cur + 1 - n as u64,
                        len: n,
                        skip: false,
                    });
                    cur = cur.wrapping_sub(n as u64);
                } else {
                    out.push(Piece {
                        lo: cur,
                        len: n,
                        skip: false,
                    });
                    cur += n as u64;
                }
                left -= n;
            }
            Ok(())
        }
    }

    fn resolve_ida(
        &self,
        mem: &Storage<'_>,
        idal: u64,
        count: usize,
        back: bool,
        out: &mut Vec<Piece>,
    ) -> Result<(), u8> {
        let size = self.mode.idaw_size;
        let mask = self.mode.block_mask;
        let (limit, key) = (self.limit(), self.key());
        let mut left = count;
        let mut at = idal;
        let mut first = true;
        while left > 0 {
            if at > limit {
                return Err(cstat::PROGRAM_CHECK);
            }
            // Fixed-size fetches, decoded as `IdawFormat::decode` and checked as
            // `Idaw::is_valid` do (format 1: 31-bit address, bit 0 zero).
            let d = if size == 8 {
                u64::from_be_bytes(mem.fetch::<8>(at, key).map_err(fault_status)?)
            } else {
                let w = u32::from_be_bytes(mem.fetch::<4>(at, key).map_err(fault_status)?);
                if w & 0x8000_0000 != 0 {
                    return Err(cstat::PROGRAM_CHECK);
                }
                w as u64
            };
            // Later IDAWs must designate a block boundary (the block's last byte when
            // reading backward).
            let n = if back {
                if !first && d.wrapping_add(1) & mask != 0 {
                    return Err(cstat::PROGRAM_CHECK);
                }
                (d & mask) + 1
            } else {
                if !first && d & mask != 0 {
                    return Err(cstat::PROGRAM_CHECK);
                }
                mask + 1 - (d & mask)
            };
            let n = n.min(left as u64) as usize;
            let lo = if back { d + 1 - n as u64 } else { d };
            out.push(Piece {
                lo,
                len: n,
                skip: false,
            });
            left -= n;
            at += size;
            first = false;
        }
        Ok(())
    }

    /// MIDA per Hercules' fetch_midaw: MIDAW quadword aligned, a MIDAL may not run onto a
    /// new 4 KiB page, reserved bits and the data-transfer-interruption flag are program
    /// checks, count 0 is a program check, a MIDAW whose data moves may not cross 4 KiB, the
    /// MIDAW counts may not exceed the CCW count, and a last MIDAW leaving count unused is a
    /// program check (reaching the CCW count without a last flag is accepted).
    fn resolve_mida(
        &self,
        mem: &Storage<'_>,
        midal: u64,
        count: usize,
        input: bool,
        back: bool,
        out: &mut Vec<Piece>,
    ) -> Result<(), u8> {
        let mut left = count;
        let mut at = midal;
        let mut first = true;
        let pc = Err(cstat::PROGRAM_CHECK);
        while left > 0 {
            if at > self.limit() || (!first && at & 0xfff == 0) {
                return pc;
            }
            let b = mem.fetch::<16>(at, self.key()).map_err(fault_status)?;
            let m = Midaw::from_bytes(b);
            if !m.reserved_ok() || m.flags.dtic() || m.count == 0 {
                return pc;
            }
            let n = m.count as usize;
            if n > left {
                return pc;
            }
            // Skip is honoured on input only; output fetches the data (vccw: the skip flag
            // of a CCW is ignored for output, and a MIDAW's likewise).
            let skip = m.flags.skip() && input;
            let room = if back {
                (m.data & 0xfff) + 1
            } else {
                0x1000 - (m.data & 0xfff)
            };
            if !skip && n as u64 > room {
                return pc;
            }
            let lo = if back {
                m.data.wrapping_sub(n as u64 - 1)
            } else {
                m.data
            };
            out.push(Piece { lo, len: n, skip });
            left -= n;
            at += 16;
            first = false;
            if m.flags.last() {
                break;
            }
        }
        if left > 0 {
            return pc;
        }
        Ok(())
    }

    #[inline(always)]
    fn step(
        &mut self,
        mem: &Storage<'_>,
        dev: &mut dyn DeviceModel,
        scratch: &mut Scratch,
    ) -> Step {
        match self.state {
            State::Finished(s) => return Step::Done(s),
            State::Suspended { .. } => return Step::Suspended(None),
            State::Running => {}
        }
        if !self.started {
            self.started = true;
            dev.start_program();
        }
        let (at, ccw) = match self.fetch_following(mem, self.next) {
            Ok(v) => v,
            Err(c) => return self.finish_check(c, 0, false),
        };
        let cpa = at.wrapping_add(8);
        let pc = |count| Check {
            cstat: cstat::PROGRAM_CHECK,
            cpa,
            count,
        };
        let kind = KINDS[ccw.cmd as usize];
        if kind == CommandKind::Invalid || kind == CommandKind::Tic {
            return self.finish_check(pc(ccw.count), 0, ccw.flags.pci());
        }
        if let Err(cs) = self.check_flags(&ccw, false) {
            let c = Check {
                cstat: cs,
                ..pc(ccw.count)
            };
            return self.finish_check(c, 0, ccw.flags.pci());
        }
        if ccw.flags.s() {
            if !self.orb.ctl.suspend() {
                return self.finish_check(pc(ccw.count), 0, ccw.flags.pci());
            }
            return self.suspend(at, &ccw);
        }
        if let Err(cs) = self
            .check_count(&ccw, false)
            .and_then(|_| self.check_data_address(&ccw, kind))
        {
            let c = Check {
                cstat: cs,
                ..pc(ccw.count)
            };
            return self.finish_check(c, 0, ccw.flags.pci());
        }
        self.execute(mem, dev, at, ccw, kind, scratch)
    }

    fn suspend(&mut self, at: u32, ccw: &Ccw1) -> Step {
        self.state = State::Suspended { ccw: at };
        self.last_ccw = None;
        let pci = ccw.flags.pci();
        // PCI forces the interruption even when the ORB suppresses it (Hercules).
        if self.orb.ctl.suppress_suspended_interrupt() && !pci {
            return Step::Suspended(None);
        }
        Step::Suspended(Some(Scsw {
            flags: self
                .base_flags()
                .with_fctl(fctl::START)
                .with_actl(actl::SUSPENDED)
                .with_stctl(SUSPENDED_STCTL),
            cpa: at.wrapping_add(8),
            dstat: 0,
            cstat: if pci { cstat::PCI } else { 0 },
            count: ccw.count,
        }))
    }

    /// Walks the data chain from the validated first CCW into `segs` and `pieces` (cleared
    /// first); returns the bytes offered and the chain's error, if any.
    fn walk(
        &mut self,
        mem: &Storage<'_>,
        first_at: u32,
        first: Ccw1,
        kind: CommandKind,
        segs: &mut Vec<Seg>,
        pieces: &mut Vec<Piece>,
    ) -> (usize, Option<ChainErr>) {
        segs.clear();
        pieces.clear();
        let mut offered = 0usize;
        let (mut at, mut ccw) = (first_at, first);
        let mut data_chained = false;
        loop {
            let cpa = at.wrapping_add(8);
            let err = |cs, start| ChainErr {
                cstat: cs,
                cpa,
                start,
                count: ccw.count,
            };
            if data_chained {
                if let Err(cs) = self
                    .check_flags(&ccw, true)
                    .and_then(|_| self.check_count(&ccw, true))
                    .and_then(|_| self.check_data_address(&ccw, kind))
                {
                    return (offered, Some(err(cs, offered)));
                }
            }
            if offered + ccw.count as usize > MAX_DATA_CHAIN_BYTES {
                return (offered, Some(err(cstat::PROGRAM_CHECK, offered)));
            }
            let start = offered;
            segs.push(Seg {
                ccw: at,
                flags: ccw.flags,
                count: ccw.count,
                start,
            });
            let before = pieces.len();
            if let Err(cs) = self.resolve(mem, &ccw, kind, pieces) {
                offered += pieces[before..].iter().map(|p| p.len).sum::<usize>();
                return (offered, Some(err(cs, start)));
            }
            offered += ccw.count as usize;
            if !ccw.flags.cd() {
                return (offered, None);
            }
            match self.fetch_following(mem, at.wrapping_add(8)) {
                Ok((a, c)) => {
                    at = a;
                    ccw = c;
                    data_chained = true;
                }
                Err(c) => {
                    let e = ChainErr {
                        cstat: c.cstat,
                        cpa: c.cpa,
                        start: offered,
                        count: 0,
                    };
                    return (offered, Some(e));
                }
            }
        }
    }

    fn seg_at(segs: &[Seg], off: usize) -> usize {
        segs.iter()
            .position(|s| off < s.start + s.count as usize)
            .unwrap_or(segs.len().saturating_sub(1))
    }

    /// Runs the validated command at `at`: the usual one (one CCW, no data chaining, no
    /// trace, its data one storage piece: direct within a 4 KiB page or one IDAW; not read
    /// backward, not skipped; output of at most [`SMALL_OUTPUT`] bytes that fetches without
    /// fault) without the data-chain lists, doing exactly what `walk` and `transfer` would
    /// (a test runs both on random programs); any other through [`Self::execute_chain`],
    /// which also reports every error in the data address.
    #[inline(always)]
    fn execute(
        &mut self,
        mem: &Storage<'_>,
        dev: &mut dyn DeviceModel,
        at: u32,
        ccw: Ccw1,
        kind: CommandKind,
        scratch: &mut Scratch,
    ) -> Step {
        let input = kind.is_input();
        let count = ccw.count as usize;
        let key = self.key();
        if !self.lean
            || self.trace
            || ccw.flags.cd()
            || kind == CommandKind::ReadBackward
            || ccw.flags.mida()
            || (input && ccw.flags.skp())
            || (!input && count > SMALL_OUTPUT)
        {
            return self.execute_chain(mem, dev, at, ccw, kind, scratch);
        }
        let lo = if count == 0 {
            0
        } else if ccw.flags.ida() {
            // `resolve_ida`'s first IDAW (no boundary rule), which must cover the count.
            match self.first_idaw(mem, ccw.cda as u64) {
                Some(d)
                    if count as u64 <= self.mode.block_mask + 1 - (d & self.mode.block_mask) =>
                {
                    d
                }
                _ => return self.execute_chain(mem, dev, at, ccw, kind, scratch),
            }
        } else {
            let a = ccw.cda as u64;
            if count as u64 > 0x1000 - (a & 0xfff) {
                return self.execute_chain(mem, dev, at, ccw, kind, scratch);
            }
            a
        };
        let cmd = Command {
            code: ccw.cmd,
            kind,
            count,
            chained: self.chained,
            prev_code: self.prev_code,
            seq: self.seq,
        };
        let (mut outcome, t, fault, zero_cc) = if input {
            let zero_cc = std::mem::take(&mut self.initial_due);
            let mut sink = OnePiece {
                mem: mem.mem,
                key,
                lo,
                len: count,
                fault: None,
                buf: &mut scratch.buf,
            };
            let mut area = DataArea::direct(count, &mut sink);
            let outcome = dev.execute_area(&cmd, &mut area);
            let t = outcome.transferred.min(count);
            let put = area.put_len();
            if put < t {
                store_zeros(&mut sink, put, t);
            }
            (outcome, t, sink.fault, zero_cc)
        } else {
            let mut small = [0u8; SMALL_OUTPUT];
            // A fault here is the general path's to report (it fetches again: a faulting
            // read stores nothing and changes nothing).
            if count > 0 && mem.mem.read(lo, &mut small[..count], key).is_err() {
                return self.execute_chain(mem, dev, at, ccw, kind, scratch);
            }
            let zero_cc = std::mem::take(&mut self.initial_due);
            let outcome = dev.execute_area(&cmd, &mut DataArea::buffer(&mut small[..count]));
            (outcome, outcome.transferred.min(count), None, zero_cc)
        };
        self.device_done(dev, cmd.code, &mut outcome, t);
        let pci = ccw.flags.pci();
        // One piece: a store fault is at offset 0, reached when anything was transferred.
        if let Some(f) = fault.filter(|_| t > 0) {
            let e = ChainErr {
                cstat: fault_status(f),
                cpa: at.wrapping_add(8),
                start: 0,
                count: ccw.count,
            };
            return self.fail_command(e, 0, pci, outcome.status, zero_cc);
        }
        let seg = Seg {
            ccw: at,
            flags: ccw.flags,
            count: ccw.count,
            start: 0,
        };
        self.end_command(ccw.cmd, seg, pci.then_some(at), outcome, t, zero_cc)
    }

    /// The first IDAW of the IDAL at `idal` when it can be fetched and is valid (as
    /// `resolve_ida` decodes and checks it).
    #[inline(always)]
    fn first_idaw(&self, mem: &Storage<'_>, idal: u64) -> Option<u64> {
        if idal > self.limit() {
            return None;
        }
        if self.mode.idaw_size == 8 {
            Some(u64::from_be_bytes(mem.fetch::<8>(idal, self.key()).ok()?))
        } else {
            let w = u32::from_be_bytes(mem.fetch::<4>(idal, self.key()).ok()?);
            (w & 0x8000_0000 == 0).then_some(w as u64)
        }
    }

    /// The general command: walks its data chain, then runs the device over it.
    #[inline(never)]
    fn execute_chain(
        &mut self,
        mem: &Storage<'_>,
        dev: &mut dyn DeviceModel,
        at: u32,
        ccw: Ccw1,
        kind: CommandKind,
        scratch: &mut Scratch,
    ) -> Step {
        let Scratch { buf, segs, pieces } = scratch;
        let (offered, err) = self.walk(mem, at, ccw, kind, segs, pieces);
        self.transfer(mem.mem, dev, at, ccw, kind, segs, pieces, buf, offered, err)
    }

    /// Runs the device for the command at `at` whose data chain `walk` resolved.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        mem: &dyn ChannelMemory,
        dev: &mut dyn DeviceModel,
        at: u32,
        ccw: Ccw1,
        kind: CommandKind,
        segs: &[Seg],
        pieces: &[Piece],
        data: &mut Vec<u8>,
        mut offered: usize,
        mut err: Option<ChainErr>,
    ) -> Step {
        let input = kind.is_input();
        let back = kind == CommandKind::ReadBackward;

        // Output: gather; a fault truncates the offer at that piece. Input needs no buffer:
        // the device puts its bytes and they are stored as they come (see `Scatter`).
        // Control data (Define Extent, Locate Record: a few dozen bytes) goes to a zeroed
        // array on the stack, which costs less than sizing and zeroing the heap buffer.
        let mut small = [0u8; SMALL_OUTPUT];
        let in_small = !input && offered <= SMALL_OUTPUT;
        data.clear();
        if !input {
            let out: &mut [u8] = if in_small {
                &mut small[..offered]
            } else {
                data.resize(offered, 0);
                data
            };
            let mut pos = 0usize;
            for p in pieces {
                if pos >= offered {
                    break;
                }
                let n = p.len.min(offered - pos);
                // A faulting read stores nothing (`ChannelMemory`), so the bytes from `pos`
                // on stay zero.
                if let Err(f) = mem.read(p.lo, &mut out[pos..pos + n], self.key()) {
                    let k = Self::seg_at(segs, pos);
                    err = Some(ChainErr {
                        cstat: fault_status(f),
                        cpa: segs[k].ccw.wrapping_add(8),
                        start: segs[k].start,
                        count: segs[k].count,
                    });
                    offered = pos;
                    if !in_small {
                        data.truncate(pos);
                    }
                    break;
                }
                pos += n;
            }
        }

        // An error in the command's own CCW before any byte: the device is never started.
        // A data fault at the first byte is different: the channel fetches output data only
        // as the device asks for it, so a command that moves nothing (NOOP) never faults.
        if let Some(e) = err {
            if offered == 0 && (segs.is_empty() || e.count == 0) {
                let pci = segs.first().is_some_and(|s| s.flags.pci());
                let c = Check {
                    cstat: e.cstat,
                    cpa: e.cpa,
                    count: e.count,
                };
                return self.finish_check(c, 0, pci);
            }
        }

        // With an error in the chain, the device is offered the count it would see up to the
        // end of the faulty CCW (at least one byte past the valid ones), so its own decision
        // tells whether it needs the byte at the error; bytes past `valid` are zeros on
        // output and dropped on input.
        let valid = offered;
        let offer = match err {
            Some(e) => (e.start + e.count as usize).max(valid + 1),
            None => valid,
        };
        let cmd = Command {
            code: ccw.cmd,
            kind,
            count: offer,
            chained: self.chained,
            prev_code: self.prev_code,
            seq: self.seq,
        };
        let zero_cc = std::mem::take(&mut self.initial_due);
        let mut fail: Option<(usize, ChainErr)> = None;
        let (mut outcome, t) = if input {
            let mut sink = Scatter {
                mem,
                key: self.key(),
                pieces,
                valid,
                back,
                cursor: (0, 0),
                fault: None,
                trace: self.trace.then(Vec::new),
                buf: data,
            };
            let mut area = DataArea::direct(offer, &mut sink);
            let outcome = dev.execute_area(&cmd, &mut area);
            let t = outcome.transferred.min(offer);
            // Bytes the device transferred but did not put read as zeros (as in a buffer).
            let put = area.put_len();
            if put < t {
                store_zeros(&mut sink, put, t);
            }
            if let Some(stored) = sink.trace.take() {
                for (lo, n) in stored {
                    self.record(lo, n, true);
                }
            }
            // A fault past what the device transferred was never reached.
            if let Some((pos, f)) = sink.fault.filter(|&(pos, _)| pos < t.min(valid)) {
                let k = Self::seg_at(segs, pos);
                let e = ChainErr {
                    cstat: fault_status(f),
                    cpa: segs[k].ccw.wrapping_add(8),
                    start: segs[k].start,
                    count: segs[k].count,
                };
                fail = Some((pos, e));
            }
            (outcome, t)
        } else {
            // Bytes past `valid` read as zeros (never fetched).
            let out: &mut [u8] = if in_small && offer <= SMALL_OUTPUT {
                &mut small[..offer]
            } else {
                if in_small {
                    data.extend_from_slice(&small[..valid]);
                }
                data.resize(offer, 0);
                data
            };
            let outcome = dev.execute_area(&cmd, &mut DataArea::buffer(out));
            (outcome, outcome.transferred.min(offer))
        };
        if self.trace {
            tracing::trace!(
                ccw = at,
                code = ccw.cmd,
                count = offer,
                transferred = t,
                status = outcome.status,
                more = outcome.more,
                "channel command"
            );
        }
        self.device_done(dev, cmd.code, &mut outcome, t);
        if !input && self.trace {
            // Output moved only what the device consumed (prefetched bytes are not "moved").
            let mut pos = 0usize;
            for p in pieces {
                let end = t.min(valid);
                if pos >= end {
                    break;
                }
                let n = p.len.min(end - pos);
                self.record(p.lo, n, false);
                pos += n;
            }
        }
        if fail.is_none() {
            if let Some(e) = err {
                // The device needed the byte at the error: it reached it.
                if t > valid || (t == valid && outcome.more) {
                    fail = Some((valid, e));
                }
            }
        }

        if let Some((done, e)) = fail {
            let k = segs
                .iter()
                .rposition(|s| s.start <= done)
                .unwrap_or_default();
            let pci = segs[..=k.min(segs.len().saturating_sub(1))]
                .iter()
                .any(|s| s.flags.pci());
            return self.fail_command(e, done, pci, outcome.status, zero_cc);
        }

        // Normal end of the command: the last CCW reached holds the residual count. Data
        // chaining fetches the next CCW as soon as a count reaches zero, so a device that
        // stops exactly at a boundary ends on the next CCW, with its whole count left.
        let k = segs
            .iter()
            .position(|s| s.start + s.count as usize > t)
            .unwrap_or(segs.len() - 1);
        let pci_at = segs[..=k]
            .iter()
            .rev()
            .find(|s| s.flags.pci())
            .map(|s| s.ccw);
        self.end_command(ccw.cmd, segs[k], pci_at, outcome, t, zero_cc)
    }

    /// What follows every device execution: status modifier from a command the device did
    /// not declare is dropped, and the bytes moved are counted.
    #[inline(always)]
    fn device_done(&mut self, dev: &dyn DeviceModel, code: u8, outcome: &mut Outcome, t: usize) {
        if outcome.status & dstat::STATUS_MODIFIER != 0
            && !dev.status_modifier_commands().contains(code)
        {
            // The translator prepared no slot after a chain's end for this command (the
            // device declared it never ends that way): a skip there would run whatever
            // follows the host chain. Hold the model to its declaration.
            tracing::warn!(code, "status modifier from an undeclared command: dropped");
            outcome.status &= !dstat::STATUS_MODIFIER;
        }
        if t > 0 {
            self.no_data = 0;
            self.moved += t as u64;
        }
    }

    /// Ends the program at a chain error or storage fault the device reached: `done` bytes
    /// were transferred; `pci` when a CCW reached so far had PCI.
    fn fail_command(&mut self, e: ChainErr, done: usize, pci: bool, ds: u8, zero_cc: bool) -> Step {
        self.last_ccw = Some(e.cpa.wrapping_sub(8));
        let count = (e.start + e.count as usize).saturating_sub(done) as u16;
        let s = self.final_scsw(
            e.cpa,
            ds,
            e.cstat | if pci { cstat::PCI } else { 0 },
            count,
            zero_cc,
        );
        self.finish(s)
    }

    /// Ends a command that met no error, `t` bytes transferred: the residual count and
    /// incorrect length come from `seg` (the last CCW reached), then the program chains or
    /// ends. `pci_at`: the last CCW up to `seg` with the PCI flag.
    #[inline(always)]
    fn end_command(
        &mut self,
        code: u8,
        seg: Seg,
        pci_at: Option<u32>,
        outcome: Outcome,
        t: usize,
        zero_cc: bool,
    ) -> Step {
        let residual = (seg.start + seg.count as usize).saturating_sub(t);
        let mut cs = 0u8;
        if residual > 0 || outcome.more {
            // SLI does not apply while data chaining is in effect (Hercules); the ORB's
            // incorrect-length-suppression mode covers immediate operations (PoP).
            let sli = seg.flags.sli() && !seg.flags.cd();
            let immediate = t == 0 && !outcome.more;
            let ils = self.fmt1() && self.orb.ctl.incorrect_length_suppression() && immediate;
            if !sli && !ils {
                cs |= cstat::INCORRECT_LENGTH;
            }
        }
        self.last_ccw = Some(seg.ccw);
        let ds = outcome.status;
        let normal = ds & !dstat::STATUS_MODIFIER == dstat::CHANNEL_END | dstat::DEVICE_END;
        let chain = cs == 0 && normal && seg.flags.cc() && !seg.flags.cd();
        if chain {
            // Status modifier: skip one CCW (PoP "Command Chaining").
            let skip = if ds & dstat::STATUS_MODIFIER != 0 {
                16
            } else {
                8
            };
            self.next = seg.ccw.wrapping_add(skip);
            self.chained = true;
            self.prev_code = Some(code);
            self.seq += 1;
            return match (pci_at, zero_cc) {
                (None, false) => Step::Continue,
                (p, z) => {
                    let cpa = p.unwrap_or(seg.ccw).wrapping_add(8);
                    Step::Intermediate(self.intermediate_scsw(cpa, p.is_some(), z))
                }
            };
        }
        if pci_at.is_some() {
            cs |= cstat::PCI;
        }
        let s = self.final_scsw(seg.ccw.wrapping_add(8), ds, cs, residual as u16, zero_cc);
        self.finish(s)
    }

    fn resume(&mut self) -> Result<(), ResumeError> {
        match self.state {
            State::Suspended { ccw } => {
                self.next = ccw;
                self.chained = false;
                self.prev_code = None;
                self.no_data = 0;
                self.initial_due = self.orb.ctl.initial_status_interrupt();
                self.state = State::Running;
                Ok(())
            }
            _ => Err(ResumeError::NotSuspended),
        }
    }

    fn halt(&mut self, dev: &mut dyn DeviceModel) -> Scsw {
        let (ds, cpa) = match self.state {
            State::Running if self.started => {
                dev.reset_operation();
                (
                    dstat::DEVICE_END,
                    self.last_ccw.map_or(0, |a| a.wrapping_add(8)),
                )
            }
            State::Running => (0, 0),
            State::Suspended { ccw } => (0, ccw.wrapping_add(8)),
            State::Finished(s) => (0, s.cpa),
        };
        let s = Scsw {
            flags: self
                .base_flags()
                .with_fctl(fctl::START | fctl::HALT)
                .with_stctl(stctl::STATUS_PENDING),
            cpa,
            dstat: ds,
            cstat: 0,
            count: 0,
        };
        self.state = State::Finished(s);
        s
    }

    fn clear(&mut self, dev: &mut dyn DeviceModel) -> Scsw {
        if self.state == State::Running && self.started {
            dev.reset_operation();
        }
        let s = Scsw {
            flags: ScswFlags::new()
                .with_fctl(fctl::CLEAR)
                .with_stctl(stctl::STATUS_PENDING),
            ..Default::default()
        };
        self.state = State::Finished(s);
        s
    }
}

/// Runs a program until it ends or suspends, or `max_steps` steps pass, and returns every
/// status it presented (intermediate, suspended, final) in order.
pub fn run_to_completion(
    orb: &Orb,
    mem: &dyn ChannelMemory,
    dev: &mut dyn DeviceModel,
    max_steps: usize,
) -> Vec<Scsw> {
    ChannelRun::new(orb).run_until_end(mem, dev, max_steps)
}

#[cfg(test)]
mod lean_tests {
    //! The single path of [`Core::execute`] against the general path (`walk` +
    //! `transfer`): random programs run both ways must present the same statuses, leave
    //! the same storage and drive the device the same way.

    use super::*;
    use crate::ccw::CommandSet;
    use crate::css::testdev::Length;
    use crate::css::{GuestChannelMemory, LoopbackDevice};
    use crate::orb::OrbControls;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    /// Mapped storage: [0, MEM); anything above faults.
    const MEM: usize = 0x10000;
    const PROG: u32 = 0x1000;
    const IDAL: u64 = 0x8000;

    #[derive(Debug, Clone)]
    struct Case {
        /// cmd, flags, count, cda
        ccws: Vec<(u8, u8, u16, u32)>,
        idaws: Vec<u64>,
        /// key, format 1, format-2 IDAWs, 2K IDAWs, ILS, suspend, initial status, MIDA
        orb: (u8, bool, bool, bool, bool, bool, bool, bool),
        length: Length,
        /// unit check, unit exception, status modifier on these codes
        status: (Option<u8>, Option<u8>, Option<u8>),
        declared_all: bool,
        put_chunk: Option<usize>,
        keys: Vec<(u64, u8)>,
    }

    fn code() -> impl Strategy<Value = u8> {
        prop::sample::select(vec![
            0x01u8, 0x02, 0x03, 0x04, 0x0c, 0x07, 0x06, 0x08, 0x00, 0xe4, 0x05, 0x0e, 0x02, 0x02,
            0x01,
        ])
    }

    fn flags() -> impl Strategy<Value = u8> {
        // S and MIDA (the low two bits) rarely; the rest freely.
        prop_oneof![
            4 => any::<u8>().prop_map(|f| f & !0x03),
            1 => any::<u8>(),
        ]
    }

    fn count() -> impl Strategy<Value = u16> {
        prop_oneof![
            Just(0u16),
            1..=70u16,
            Just(4096u16),
            4000..=4200u16,
            2040..=2060u16,
            any::<u16>(),
        ]
    }

    fn cda() -> impl Strategy<Value = u32> {
        prop_oneof![
            (0..16u32).prop_map(|k| IDAL as u32 + 8 * k),
            (0..32u32).prop_map(|k| IDAL as u32 + 4 * k),
            0x2000..0x6000u32,
            (2..6u32).prop_map(|p| p << 12),
            (0..8u32).prop_map(|k| PROG + 8 * k),
            0xff00..0x10100u32,
            Just(0x2_0000u32),
            Just(0x7fff_fff8u32),
            Just(0x0100_0000u32),
        ]
    }

    fn idaw() -> impl Strategy<Value = u64> {
        prop_oneof![
            0x2000..0x6000u64,
            (2..6u64).prop_map(|p| p << 12),
            (4..12u64).prop_map(|p| p << 11),
            0xf000..0x11000u64,
            Just(0x8000_2000u64),
            Just(0x0000_2000_0000_3000u64),
        ]
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            prop::collection::vec((code(), flags(), count(), cda()), 1..6),
            prop::collection::vec(idaw(), 16),
            (
                0..3u8,
                prop::bool::weighted(0.8),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
            prop_oneof![
                Just(Length::AsOffered),
                (0..5000usize).prop_map(Length::Fixed)
            ],
            (
                prop::option::weighted(0.2, code()),
                prop::option::weighted(0.2, code()),
                prop::option::weighted(0.3, code()),
            ),
            any::<bool>(),
            prop::option::of(prop::sample::select(vec![1usize, 7, 512, 4096])),
            prop::collection::vec(
                (2..6u64, prop::sample::select(vec![0u8, 0x10, 0x18, 0x20])),
                0..3,
            ),
        )
            .prop_map(
                |(ccws, idaws, orb, length, status, declared_all, put_chunk, keys)| Case {
                    ccws,
                    idaws,
                    orb,
                    length,
                    status,
                    declared_all,
                    put_chunk,
                    keys,
                },
            )
    }

    /// What a run leaves: the steps, all of storage, and the device's record.
    type Result = (
        Vec<Step>,
        Vec<u8>,
        Vec<u8>,
        Vec<u8>,
        Vec<Command>,
        (u32, u32),
    );

    fn run(c: &Case, lean: bool) -> Result {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let fill: Vec<u8> = (0..MEM).map(|i| (i * 7 + i / 251) as u8).collect();
        gm.write_slice(&fill, GuestAddress(0)).unwrap();
        let (key, fmt1, c64, i2k, ils, suspend, isi, midaw) = c.orb;
        for (i, &(cmd, flags, count, cda)) in c.ccws.iter().enumerate() {
            let flags = CcwFlags::from_bits(flags);
            let b = if fmt1 {
                Ccw1 {
                    cmd,
                    flags,
                    count,
                    cda,
                }
                .to_bytes()
            } else {
                Ccw0 {
                    cmd,
                    cda: cda & 0x00ff_ffff,
                    flags,
                    count,
                }
                .to_bytes()
            };
            gm.write_slice(&b, GuestAddress(PROG as u64 + 8 * i as u64))
                .unwrap();
        }
        for (i, w) in c.idaws.iter().enumerate() {
            gm.write_slice(&w.to_be_bytes(), GuestAddress(IDAL + 8 * i as u64))
                .unwrap();
        }
        let mut mem = GuestChannelMemory::with_keys(gm);
        for &(page, k) in &c.keys {
            mem.set_key(page << 12, k);
        }
        let mut dev = LoopbackDevice::new();
        dev.length = c.length;
        (
            dev.unit_check_on,
            dev.unit_exception_on,
            dev.status_modifier_on,
        ) = c.status;
        if !c.declared_all {
            dev.declared_status_modifier = CommandSet::of(&[0x02]);
        }
        dev.put_chunk = c.put_chunk;
        let orb = Orb {
            intparm: 7,
            ctl: OrbControls::new()
                .with_key(key)
                .with_format1(fmt1)
                .with_format2_idaw(c64)
                .with_idaw_2k(i2k)
                .with_incorrect_length_suppression(ils)
                .with_suspend(suspend)
                .with_initial_status_interrupt(isi)
                .with_midaw(midaw),
            cpa: PROG,
        };
        let mut run = ChannelRun::new(&orb);
        run.core.lean = lean;
        let mut steps = Vec::new();
        for _ in 0..12 {
            let s = run.step(&mem, &mut dev);
            steps.push(s);
            if matches!(s, Step::Done(_) | Step::Suspended(_)) {
                break;
            }
        }
        let mut out = vec![0u8; MEM];
        mem.memory().read_slice(&mut out, GuestAddress(0)).unwrap();
        (
            steps,
            out,
            dev.written().to_vec(),
            dev.produced().to_vec(),
            dev.commands().to_vec(),
            dev.counts(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn single_ccw_path_matches_general(c in case()) {
            let lean = run(&c, true);
            let general = run(&c, false);
            prop_assert_eq!(&lean.0, &general.0);
            prop_assert!(lean.1 == general.1, "storage differs");
            prop_assert_eq!(&lean.2, &general.2);
            prop_assert_eq!(&lean.3, &general.3);
            prop_assert_eq!(&lean.4, &general.4);
            prop_assert_eq!(lean.5, general.5);
        }
    }

    #[test]
    fn kind_table_is_command_kind_of() {
        for c in 0..=255u8 {
            assert_eq!(KINDS[c as usize], CommandKind::of(c), "code {c:#04x}");
        }
    }

    /// A plain read through one IDAW takes the single path (so the comparison above
    /// compares something), and a data-chained one does not.
    #[test]
    fn single_path_is_taken_for_the_usual_read() {
        let c = Case {
            ccws: vec![(0x02, 0x04, 4096, IDAL as u32)],
            idaws: vec![0x3000; 16],
            orb: (0, true, true, false, false, false, false, false),
            length: Length::AsOffered,
            status: (None, None, None),
            declared_all: true,
            put_chunk: Some(4096),
            keys: vec![],
        };
        let (steps, out, ..) = run(&c, true);
        assert!(matches!(steps[..], [Step::Done(s)] if s.count == 0 && s.cstat == 0));
        assert_eq!(out[0x3000], LoopbackDevice::pattern(0));
        // The general path's lists stay untouched by the single path.
        let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let ccw = Ccw1 {
            cmd: 0x02,
            flags: CcwFlags::new().with_ida(true),
            count: 4096,
            cda: IDAL as u32,
        };
        gm.write_slice(&ccw.to_bytes(), GuestAddress(PROG as u64))
            .unwrap();
        gm.write_slice(&0x3000u64.to_be_bytes(), GuestAddress(IDAL))
            .unwrap();
        let mem = GuestChannelMemory::new(gm);
        let orb = Orb {
            intparm: 0,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_format2_idaw(true),
            cpa: PROG,
        };
        let mut dev = LoopbackDevice::new();
        let mut run = ChannelRun::new(&orb);
        assert!(matches!(run.step(&mem, &mut dev), Step::Done(_)));
        assert!(run.scratch.segs.is_empty() && run.scratch.pieces.is_empty());
        let mut run = ChannelRun::new(&orb);
        run.core.lean = false;
        assert!(matches!(run.step(&mem, &mut dev), Step::Done(_)));
        assert_eq!(run.scratch.segs.len(), 1);
    }
}
