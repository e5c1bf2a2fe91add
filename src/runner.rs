//! The whole in-process I/O path as one value, and `vccw run`.
//!
//! [`Stack`] wires guest memory ([`IommuStore`]), the vfio-ccw device ([`VfioCcwDevice`]),
//! its IO eventfd and an [`EmulatedSubchannel`] over a device model, and drives them as a
//! VMM does: a START is a write of ORB + SCSW into the I/O region, completion is the IO
//! eventfd, the result is the IRB read back from the region. The end-to-end tests, the
//! `io_path` benchmark and [`run_program`] (the `vccw run` command) all use it.
//!
//! `vccw run` output: the decoded IRB of every interrupt (each SCSW field named), the sense
//! bytes on unit check, and a hex + EBCDIC dump of the guest areas the program read into
//! (the file's `dump` statements, or else the data areas of its input CCWs).

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;

use crate::ccw::{Ccw0, Ccw1, CommandKind, IdawFormat};
use crate::ccwfile::{ProgramFile, MAX_DUMP};
use crate::css::{DeviceModel, EmulatedSubchannel, SpinPolicy, SubchannelConfig};
use crate::devices::dasd3390::{Dasd3390, Dasd3390Options};
use crate::devices::tape3490::{Tape3490, Tape3490Config};
use crate::driver::regions::{
    CcwIoRegion, CCW_IO_REGION_SIZE, IO_IRB_OFFSET, IO_ORB_OFFSET, IO_RET_CODE_OFFSET,
    IO_SCSW_OFFSET, VFIO_CCW_ASYNC_CMD_CSCH, VFIO_CCW_ASYNC_CMD_HSCH,
};
use crate::driver::{
    wait_eventfd, DeviceConfig, DeviceError, EventfdWaitError, IrqIndex, IrqLatch, IrqNotify,
    IrqSet, State, VfioCcwDevice, ASYNC_REGION_INDEX, IO_REGION_INDEX,
};
use crate::image::awstape::{AwsTape, OpenMode};
use crate::image::ckd::CkdOpenOptions;
use crate::iommu_store::{IommuStore, StoreConfig};
use crate::orb::{actl, cstat, dstat, fctl, stctl, Irb, Orb, Scsw, ScswFlags, IRB_SIZE};

/// Why the stack or `vccw run` failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// The channel thread could not be created.
    #[error("cannot start the channel thread: {0}")]
    Thread(std::io::Error),
    /// The device refused a request (the errno is in the error).
    #[error("device: {0} (errno {errno})", errno = .0.errno())]
    Device(#[from] DeviceError),
    /// The eventfd could not be created, polled or read.
    #[error("eventfd: {0}")]
    Eventfd(Errno),
    /// No interrupt arrived in time.
    #[error("no interrupt within {0:?}")]
    Timeout(Duration),
    /// The program file or the device image could not be used (a usage error).
    #[error("{0}")]
    Usage(String),
}

/// How to wait for the IO eventfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// `poll(2)` then `read(2)`: the thread sleeps (a blocking wake-up).
    Block,
    /// Non-blocking `read(2)` in a loop: the thread spins on the counter.
    Spin,
}

/// Guest memory + vfio-ccw device + IO eventfd + emulated subchannel over one device model.
pub struct Stack {
    // Field order is drop order: the device quiesces the subchannel before it goes.
    device: VfioCcwDevice,
    subchannel: Arc<EmulatedSubchannel>,
    store: IommuStore,
    io: EventFd,
    /// The in-process IO trigger, once [`Stack::use_latch`] replaced the eventfd.
    latch: Option<Arc<IrqLatch>>,
    region: [u8; CCW_IO_REGION_SIZE],
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Stack {
    /// Builds and opens the stack over `model`, with `store` as guest memory and the
    /// channel thread spinning as `spin` says (other subchannel options default, so short
    /// programs run inline in START). The device has default options except a 1 s quiesce
    /// timeout.
    pub fn new(
        model: Box<dyn DeviceModel>,
        store: IommuStore,
        spin: SpinPolicy,
    ) -> Result<Self, RunError> {
        let cfg = SubchannelConfig {
            spin,
            ..Default::default()
        };
        Self::with_config(model, store, cfg)
    }

    /// As [`Stack::new`], with every subchannel option given.
    pub fn with_config(
        model: Box<dyn DeviceModel>,
        store: IommuStore,
        cfg: SubchannelConfig,
    ) -> Result<Self, RunError> {
        let subchannel = Arc::new(EmulatedSubchannel::new(model, cfg).map_err(RunError::Thread)?);
        let device = VfioCcwDevice::new(
            subchannel.clone(),
            store.clone(),
            DeviceConfig {
                quiesce_timeout: Duration::from_secs(1),
                ..Default::default()
            },
        );
        device.open()?;
        // The device owns (and writes) a dup of the eventfd; the stack reads the original.
        let io = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).map_err(RunError::Eventfd)?;
        let dup = nix::unistd::dup(&io).map_err(RunError::Eventfd)?;
        device.set_irqs(IrqSet::eventfd(IrqIndex::Io, Some(dup)))?;
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(fctl::START),
            ..Default::default()
        };
        Ok(Stack {
            device,
            subchannel,
            store,
            io,
            latch: None,
            region: CcwIoRegion::request(&Orb::default(), &scsw).to_bytes(),
        })
    }

    /// Guest memory.
    pub fn store(&self) -> &IommuStore {
        &self.store
    }

    /// The vfio-ccw device.
    pub fn device(&self) -> &VfioCcwDevice {
        &self.device
    }

    /// The emulated subchannel behind the device.
    pub fn subchannel(&self) -> &EmulatedSubchannel {
        &self.subchannel
    }

    /// The IO eventfd as the client sees it (non-blocking). Not signalled any more after
    /// [`Stack::use_latch`].
    pub fn io_eventfd(&self) -> &EventFd {
        &self.io
    }

    /// Replaces the device's IO eventfd by an in-process [`IrqLatch`] (as an embedding in the
    /// same process would): [`Stack::wait_irq`] and [`Stack::take_irq`] then read the latch,
    /// and an interrupt presented before the wait costs no system call on either side.
    pub fn use_latch(&mut self) {
        let latch = Arc::new(IrqLatch::default());
        self.device
            .set_irq_notify(IrqIndex::Io, Some(latch.clone() as Arc<dyn IrqNotify>));
        self.latch = Some(latch);
    }

    /// START SUBCHANNEL: writes `orb` and an SCSW with the start function into the I/O
    /// region, as QEMU does (the whole 124-byte region). No allocation.
    pub fn start(&mut self, orb: &Orb) -> Result<(), DeviceError> {
        // The image is `CcwIoRegion::request(orb, start SCSW)`: only the ORB changes between
        // starts; the SCSW is set once and the IRB area and ret_code stay zero.
        self.region[IO_ORB_OFFSET..IO_SCSW_OFFSET].copy_from_slice(&orb.to_bytes());
        self.device
            .write_region(IO_REGION_INDEX, 0, &self.region)
            .map(|_| ())
    }

    /// HALT SUBCHANNEL through the async region.
    pub fn halt(&self) -> Result<(), DeviceError> {
        self.async_cmd(VFIO_CCW_ASYNC_CMD_HSCH)
    }

    /// CLEAR SUBCHANNEL through the async region.
    pub fn clear(&self) -> Result<(), DeviceError> {
        self.async_cmd(VFIO_CCW_ASYNC_CMD_CSCH)
    }

    fn async_cmd(&self, command: u32) -> Result<(), DeviceError> {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&command.to_ne_bytes());
        self.device
            .write_region(ASYNC_REGION_INDEX, 0, &b)
            .map(|_| ())
    }

    /// Waits for the IO eventfd (or the latch, see [`Stack::use_latch`]) and reads (resets)
    /// it; returns the counter.
    pub fn wait_irq(&self, how: Wait, timeout: Duration) -> Result<u64, RunError> {
        if let Some(l) = &self.latch {
            // Usually signalled already (an inline START presents its interrupt before it
            // returns): taken here, without a call, whichever way the caller waits.
            match l.take() {
                0 => {}
                n => return Ok(n),
            }
            return match how {
                Wait::Block => l.wait(timeout).ok_or(RunError::Timeout(timeout)),
                Wait::Spin => {
                    let deadline = Instant::now() + timeout;
                    loop {
                        match l.take() {
                            0 if Instant::now() >= deadline => {
                                return Err(RunError::Timeout(timeout))
                            }
                            0 => std::hint::spin_loop(),
                            n => return Ok(n),
                        }
                    }
                }
            };
        }
        wait_eventfd(&self.io, timeout, how == Wait::Spin).map_err(|e| match e {
            EventfdWaitError::TimedOut => RunError::Timeout(timeout),
            EventfdWaitError::Sys(e) => RunError::Eventfd(e),
        })
    }

    /// Whether the IO eventfd (or the latch) is signalled now (reads and resets it).
    pub fn take_irq(&self) -> Result<bool, RunError> {
        if let Some(l) = &self.latch {
            return Ok(l.take() > 0);
        }
        match self.io.read() {
            Ok(n) => Ok(n > 0),
            Err(Errno::EAGAIN) => Ok(false),
            Err(e) => Err(RunError::Eventfd(e)),
        }
    }

    /// The IRB in the I/O region (one 96-byte region read).
    pub fn irb(&self) -> Result<Irb, DeviceError> {
        let mut b = [0u8; IRB_SIZE];
        self.device
            .read_region(IO_REGION_INDEX, IO_IRB_OFFSET as u64, &mut b)?;
        Ok(Irb::from_bytes(&b))
    }

    /// The I/O region's `ret_code`.
    pub fn ret_code(&self) -> Result<i32, DeviceError> {
        let mut b = [0u8; 4];
        self.device
            .read_region(IO_REGION_INDEX, IO_RET_CODE_OFFSET as u64, &mut b)?;
        Ok(i32::from_ne_bytes(b))
    }

    /// Starts `orb` and waits (blocking) for the interrupts until the device is idle again;
    /// returns every IRB seen, the final one last.
    pub fn run(&mut self, orb: &Orb, timeout: Duration) -> Result<Vec<Irb>, RunError> {
        self.start(orb)?;
        self.wait_final(timeout)
    }

    /// Waits for interrupts until one is final (neither subchannel nor device active) and
    /// the device is back in IDLE; returns the IRBs read after each signal.
    pub fn wait_final(&self, timeout: Duration) -> Result<Vec<Irb>, RunError> {
        let deadline = Instant::now() + timeout;
        let mut irbs = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_irq(Wait::Block, left)?;
            let irb = self.irb()?;
            irbs.push(irb);
            if is_final(&irb.scsw) && self.device.state() == State::Idle {
                return Ok(irbs);
            }
        }
    }
}

/// No function in progress at subchannel or device (Linux's finality test).
pub fn is_final(scsw: &Scsw) -> bool {
    scsw.flags.actl() & (actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE) == 0
}

/// Channel end and device end, with no unit check, unit exception or subchannel status.
pub fn is_success(scsw: &Scsw) -> bool {
    let ce_de = dstat::CHANNEL_END | dstat::DEVICE_END;
    scsw.dstat & ce_de == ce_de
        && scsw.dstat & (dstat::UNIT_CHECK | dstat::UNIT_EXCEPTION) == 0
        && scsw.cstat == 0
}

fn bit_names(v: u8, names: &[(u8, &str)]) -> String {
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| v & b != 0)
        .map(|(_, n)| *n)
        .collect();
    v.join("|")
}

const FCTL_NAMES: &[(u8, &str)] = &[
    (fctl::START, "start"),
    (fctl::HALT, "halt"),
    (fctl::CLEAR, "clear"),
];
const ACTL_NAMES: &[(u8, &str)] = &[
    (actl::RESUME_PENDING, "resume-pending"),
    (actl::START_PENDING, "start-pending"),
    (actl::HALT_PENDING, "halt-pending"),
    (actl::CLEAR_PENDING, "clear-pending"),
    (actl::SUBCHANNEL_ACTIVE, "subchannel-active"),
    (actl::DEVICE_ACTIVE, "device-active"),
    (actl::SUSPENDED, "suspended"),
];
const STCTL_NAMES: &[(u8, &str)] = &[
    (stctl::ALERT, "alert"),
    (stctl::INTERMEDIATE, "intermediate"),
    (stctl::PRIMARY, "primary"),
    (stctl::SECONDARY, "secondary"),
    (stctl::STATUS_PENDING, "status-pending"),
];
const DSTAT_NAMES: &[(u8, &str)] = &[
    (dstat::ATTENTION, "attention"),
    (dstat::STATUS_MODIFIER, "status-modifier"),
    (dstat::CONTROL_UNIT_END, "control-unit-end"),
    (dstat::BUSY, "busy"),
    (dstat::CHANNEL_END, "channel-end"),
    (dstat::DEVICE_END, "device-end"),
    (dstat::UNIT_CHECK, "unit-check"),
    (dstat::UNIT_EXCEPTION, "unit-exception"),
];
const CSTAT_NAMES: &[(u8, &str)] = &[
    (cstat::PCI, "pci"),
    (cstat::INCORRECT_LENGTH, "incorrect-length"),
    (cstat::PROGRAM_CHECK, "program-check"),
    (cstat::PROTECTION_CHECK, "protection-check"),
    (cstat::CHANNEL_DATA_CHECK, "channel-data-check"),
    (cstat::CHANNEL_CONTROL_CHECK, "channel-control-check"),
    (cstat::INTERFACE_CONTROL_CHECK, "interface-control-check"),
    (cstat::CHAINING_CHECK, "chaining-check"),
];

/// The IRB decoded, one SCSW field per line (fctl/actl/stctl, CPA, dstat/cstat with bit
/// names, residual count), plus the concurrent-sense bytes when the ECW holds them.
pub fn describe_irb(irb: &Irb) -> String {
    let s = &irb.scsw;
    let f = s.flags;
    let mut o = String::new();
    let _ = writeln!(o, "  SCSW  {}", hex_bytes(&s.to_bytes()));
    let _ = writeln!(
        o,
        "    key={} fmt1={} prefetch={} cc(deferred)={}",
        f.key(),
        f.format1() as u8,
        f.prefetch() as u8,
        f.deferred_cc()
    );
    let _ = writeln!(
        o,
        "    fctl={:#x} ({})",
        f.fctl(),
        bit_names(f.fctl(), FCTL_NAMES)
    );
    let _ = writeln!(
        o,
        "    actl={:#04x} ({})",
        f.actl(),
        bit_names(f.actl(), ACTL_NAMES)
    );
    let _ = writeln!(
        o,
        "    stctl={:#04x} ({})",
        f.stctl(),
        bit_names(f.stctl(), STCTL_NAMES)
    );
    let _ = writeln!(o, "    CPA (guest)={:#010x}", s.cpa);
    let _ = writeln!(
        o,
        "    dstat={:#04x} ({})",
        s.dstat,
        bit_names(s.dstat, DSTAT_NAMES)
    );
    let _ = writeln!(
        o,
        "    cstat={:#04x} ({})",
        s.cstat,
        bit_names(s.cstat, CSTAT_NAMES)
    );
    let _ = writeln!(o, "    residual count={}", s.count);
    if s.dstat & dstat::UNIT_CHECK != 0 {
        match irb.concurrent_sense() {
            Some(sense) => {
                let _ = writeln!(o, "  sense bytes (concurrent sense):");
                for (i, chunk) in sense.chunks(16).enumerate() {
                    let _ = writeln!(o, "    {:02}: {}", i * 16, hex_bytes(chunk));
                }
            }
            None => {
                let _ = writeln!(o, "  sense bytes: none in the IRB (issue a Sense command)");
            }
        }
    }
    o
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The printable character of an EBCDIC (code page 037) byte, or `.`.
pub fn ebcdic_char(b: u8) -> char {
    let c = match b {
        0x40 => b' ',
        0x4B => b'.',
        0x4C => b'<',
        0x4D => b'(',
        0x4E => b'+',
        0x4F => b'|',
        0x50 => b'&',
        0x5A => b'!',
        0x5B => b'$',
        0x5C => b'*',
        0x5D => b')',
        0x5E => b';',
        0x60 => b'-',
        0x61 => b'/',
        0x6B => b',',
        0x6C => b'%',
        0x6D => b'_',
        0x6E => b'>',
        0x6F => b'?',
        0x7A => b':',
        0x7B => b'#',
        0x7C => b'@',
        0x7D => b'\'',
        0x7E => b'=',
        0x7F => b'"',
        0x81..=0x89 => b'a' + (b - 0x81),
        0x91..=0x99 => b'j' + (b - 0x91),
        0xA2..=0xA9 => b's' + (b - 0xA2),
        0xC1..=0xC9 => b'A' + (b - 0xC1),
        0xD1..=0xD9 => b'J' + (b - 0xD1),
        0xE2..=0xE9 => b'S' + (b - 0xE2),
        0xF0..=0xF9 => b'0' + (b - 0xF0),
        _ => b'.',
    };
    c as char
}

/// A hex + EBCDIC dump of `bytes` found at guest address `addr`, 16 bytes a line:
/// `ADDRESS  hex bytes  |text|`.
pub fn hex_ebcdic_dump(addr: u64, bytes: &[u8]) -> String {
    let mut o = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let mut hex = String::with_capacity(48);
        for (j, b) in chunk.iter().enumerate() {
            if j == 8 {
                hex.push(' ');
            }
            let _ = write!(hex, "{b:02x} ");
        }
        let text: String = chunk.iter().map(|&b| ebcdic_char(b)).collect();
        let _ = writeln!(o, "  {:016x}  {hex:<49} |{text}|", addr + (i * 16) as u64);
    }
    o
}

/// Most CCWs [`input_areas`] visits.
const MAX_WALK: usize = 256;

/// The guest data areas of the input CCWs (read, read backward, sense) reachable from the
/// ORB's CPA: sequential chaining, TIC, and the CCW a status-modifier skip reaches. IDALs
/// are followed (one range per IDAW, read-backward IDALs as if forward); MIDA CCWs are left
/// out; a direct read-backward area ends at its data address. Areas are merged and sorted;
/// unreadable CCWs end that path.
pub fn input_areas(orb: &Orb, store: &IommuStore) -> Vec<(u64, u64)> {
    let fmt1 = orb.ctl.format1();
    let idaw = IdawFormat::from_orb(orb.ctl.format2_idaw(), orb.ctl.idaw_2k());
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([orb.cpa as u64]);
    let mut areas = Vec::new();
    while let Some(addr) = queue.pop_front() {
        if seen.len() >= MAX_WALK || !seen.insert(addr) || addr % 8 != 0 {
            continue;
        }
        let mut b = [0u8; 8];
        if store.read(addr, &mut b).is_err() {
            continue;
        }
        let ccw = if fmt1 {
            Ccw1::from_bytes(b)
        } else {
            Ccw0::from_bytes(b).to_format1()
        };
        let kind = CommandKind::of(ccw.cmd);
        if kind == CommandKind::Tic {
            queue.push_back(ccw.cda as u64);
            continue;
        }
        let input = matches!(
            kind,
            CommandKind::Read | CommandKind::ReadBackward | CommandKind::Sense
        );
        if input && ccw.count > 0 && !ccw.flags.skp() && !ccw.flags.mida() {
            let count = ccw.count as u64;
            if ccw.flags.ida() {
                let mut left = count;
                let mut at = ccw.cda as u64;
                while left > 0 {
                    let mut w = [0u8; 8];
                    let n = idaw.idaw_size() as usize;
                    if store.read(at, &mut w[..n]).is_err() {
                        break;
                    }
                    let a = idaw.decode(&w[..n]).0;
                    let bs = idaw.block_size();
                    let len = (bs - a % bs).min(left);
                    areas.push((a, len));
                    left -= len;
                    at += n as u64;
                }
            } else if kind == CommandKind::ReadBackward {
                // Read backward stores downwards from the data address (PoP).
                let end = ccw.cda as u64 + 1;
                areas.push((end.saturating_sub(count), count.min(end)));
            } else {
                areas.push((ccw.cda as u64, count));
            }
        }
        if ccw.flags.cc() || ccw.flags.cd() {
            queue.push_back(addr + 8);
        }
        if ccw.flags.cc() {
            queue.push_back(addr + 16);
        }
    }
    merge(areas)
}

fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, l) in v {
        let end = a.saturating_add(l);
        if let Some(last) = out.last_mut() {
            if a <= last.0 + last.1 {
                last.1 = last.1.max(end - last.0);
                continue;
            }
        }
        out.push((a, l));
    }
    out
}

/// The device `vccw run` drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A 3390 on a Hercules CKD image.
    Dasd(PathBuf),
    /// A 3490 with an AWSTAPE file loaded.
    Tape(PathBuf),
}

/// What `vccw run` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// The device and its image.
    pub target: Target,
    /// The program file.
    pub program: PathBuf,
    /// Open the image read-write (read-only otherwise).
    pub write: bool,
    /// How long to wait for the final interrupt.
    pub timeout: Duration,
}

/// How `vccw run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Channel end and device end without checks or exceptions (exit code 0).
    Success,
    /// A check or exception in the final status, or the device refused the program (1).
    Check,
}

impl RunOutcome {
    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            RunOutcome::Success => 0,
            RunOutcome::Check => 1,
        }
    }
}

/// Opens the device model on the image (read-only unless `write`).
pub fn open_model(target: &Target, write: bool) -> Result<Box<dyn DeviceModel>, RunError> {
    let usage =
        |p: &Path, e: &dyn std::fmt::Display| RunError::Usage(format!("{}: {e}", p.display()));
    Ok(match target {
        Target::Dasd(p) => {
            let opts = Dasd3390Options {
                open: CkdOpenOptions {
                    read_only: !write,
                    sync_writes: false,
                },
                devnum: 0,
            };
            Box::new(Dasd3390::open(p, opts).map_err(|e| usage(p, &e))?)
        }
        Target::Tape(p) => {
            let mode = if write {
                OpenMode::ReadWrite
            } else {
                OpenMode::ReadOnly
            };
            let tape = AwsTape::open(p, mode).map_err(|e| usage(p, &e))?;
            Box::new(Tape3490::with_tape(tape, Tape3490Config::default()))
        }
    })
}

/// `vccw run`: loads the program, opens the device, runs the program through the whole
/// stack and prints what happened to `out`. Usage errors (unreadable file, bad program,
/// image that does not open) are [`RunError::Usage`]; a refused program is a printed
/// [`RunOutcome::Check`].
pub fn run_program(opts: &RunOptions, out: &mut dyn Write) -> Result<RunOutcome, RunError> {
    let p = &opts.program;
    let usage = |e: &dyn std::fmt::Display| RunError::Usage(format!("{}: {e}", p.display()));
    let text = std::fs::read_to_string(p).map_err(|e| usage(&e))?;
    let pf = ProgramFile::parse(&text).map_err(|e| usage(&e))?;
    let store = IommuStore::new(StoreConfig::default());
    pf.load(&store).map_err(|e| usage(&e))?;
    let model = open_model(&opts.target, opts.write)?;
    let mut stack = Stack::new(model, store.clone(), SpinPolicy::OFF)?;
    let (what, img) = match &opts.target {
        Target::Dasd(i) => ("3390", i),
        Target::Tape(i) => ("3490", i),
    };
    let io = |e: std::io::Error| RunError::Usage(format!("output: {e}"));
    writeln!(
        out,
        "device: {what} on {} ({})",
        img.display(),
        if opts.write {
            "read-write"
        } else {
            "read-only"
        }
    )
    .map_err(io)?;
    writeln!(out, "guest ORB: {}", hex_bytes(&pf.orb.to_bytes())).map_err(io)?;
    let irbs = match stack.start(&pf.orb) {
        Ok(()) => stack.wait_final(opts.timeout)?,
        Err(e) => {
            writeln!(
                out,
                "start refused: {e} (errno {}: {})",
                e.errno(),
                std::io::Error::from_raw_os_error(e.errno())
            )
            .map_err(io)?;
            writeln!(out, "result: check").map_err(io)?;
            return Ok(RunOutcome::Check);
        }
    };
    for (i, irb) in irbs.iter().enumerate() {
        let kind = if i + 1 == irbs.len() {
            "final"
        } else {
            "intermediate"
        };
        writeln!(out, "interrupt {} ({kind}):", i + 1).map_err(io)?;
        write!(out, "{}", describe_irb(irb)).map_err(io)?;
    }
    let areas = if pf.dumps.is_empty() {
        writeln!(out, "data areas of the input CCWs:").map_err(io)?;
        input_areas(&pf.orb, &store)
    } else {
        writeln!(out, "dumps:").map_err(io)?;
        pf.dumps.clone()
    };
    for (addr, len) in areas {
        let len = len.min(MAX_DUMP);
        let mut buf = vec![0u8; len as usize];
        match store.read(addr, &mut buf) {
            Ok(()) => {
                writeln!(out, "  {addr:#x} ({len} bytes):").map_err(io)?;
                write!(out, "{}", hex_ebcdic_dump(addr, &buf)).map_err(io)?;
            }
            Err(e) => writeln!(out, "  {addr:#x} ({len} bytes): {e}").map_err(io)?,
        }
    }
    let last = irbs.last().map(|i| i.scsw).unwrap_or_default();
    let outcome = if is_success(&last) {
        RunOutcome::Success
    } else {
        RunOutcome::Check
    };
    writeln!(
        out,
        "result: {}",
        match outcome {
            RunOutcome::Success => "ok",
            RunOutcome::Check => "check",
        }
    )
    .map_err(io)?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ccw::CcwFlags;
    use crate::iommu_store::{Backing, Perm};
    use crate::orb::OrbControls;

    #[test]
    fn ebcdic_dump_line() {
        // "VOL1" in EBCDIC, a blank, 'a', a non-printable byte.
        let d = hex_ebcdic_dump(0x1000, &[0xE5, 0xD6, 0xD3, 0xF1, 0x40, 0x81, 0x00]);
        assert_eq!(
            d,
            format!(
                "  0000000000001000  {:<49} |VOL1 a.|\n",
                "e5 d6 d3 f1 40 81 00 "
            )
        );
        let d = hex_ebcdic_dump(0, &[0xC1; 17]);
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].contains("c1 c1  c1"), "gap after 8 bytes: {d}");
        assert!(lines[1].starts_with("  0000000000000010  c1 "));
    }

    #[test]
    fn irb_fields_are_named() {
        let scsw = Scsw {
            flags: ScswFlags::new()
                .with_fctl(fctl::START)
                .with_stctl(stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING),
            cpa: 0x1018,
            dstat: dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_CHECK,
            cstat: cstat::INCORRECT_LENGTH,
            count: 7,
        };
        let mut sense = [0u8; 32];
        sense[0] = 0x80;
        let irb = Irb::new(scsw, 0x80).with_concurrent_sense(&sense);
        let d = describe_irb(&irb);
        for want in [
            "fctl=0x4 (start)",
            "stctl=0x07 (primary|secondary|status-pending)",
            "CPA (guest)=0x00001018",
            "dstat=0x0e (channel-end|device-end|unit-check)",
            "cstat=0x40 (incorrect-length)",
            "residual count=7",
            "00: 80 00",
        ] {
            assert!(d.contains(want), "{want:?} missing in\n{d}");
        }
        assert!(!is_success(&scsw));
        let ok = Scsw {
            dstat: dstat::CHANNEL_END | dstat::DEVICE_END,
            cstat: 0,
            ..scsw
        };
        assert!(is_success(&ok) && is_final(&ok));
    }

    #[test]
    fn input_areas_follow_tic_skip_and_idals() {
        let s = IommuStore::new(StoreConfig::default());
        s.map_dma(0, 0x10_0000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        let ccw = |addr: u64, cmd: u8, flags: CcwFlags, count: u16, cda: u32| {
            s.write(
                addr,
                &Ccw1 {
                    cmd,
                    flags,
                    count,
                    cda,
                }
                .to_bytes(),
            )
            .unwrap();
        };
        let cc = CcwFlags::new().with_cc(true);
        ccw(0x1000, 0x07, cc, 6, 0x3000); // seek (output)
        ccw(0x1008, 0x31, cc, 5, 0x3008); // search (output)
        ccw(0x1010, 0x08, CcwFlags::new(), 0, 0x1008); // TIC *-8
        ccw(0x1018, 0x06, cc.with_ida(true), 6000, 0x5000); // read data, IDAL
        ccw(0x1020, 0x04, cc, 32, 0x8000); // sense
        ccw(0x1028, 0x0C, CcwFlags::new(), 16, 0x9000); // read backward: ends at 0x9000
        s.write(0x5000, &0x2_0800u64.to_be_bytes()).unwrap();
        s.write(0x5008, &0x4_0000u64.to_be_bytes()).unwrap();
        let orb = Orb {
            intparm: 0,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_format2_idaw(true),
            cpa: 0x1000,
        };
        assert_eq!(
            input_areas(&orb, &s),
            vec![
                (0x8000, 32),
                (0x8FF1, 16),
                (0x2_0800, 2048),
                (0x4_0000, 3952)
            ]
        );
        assert_eq!(
            merge(vec![(10, 10), (0, 12), (30, 1)]),
            vec![(0, 20), (30, 1)]
        );
    }
}
