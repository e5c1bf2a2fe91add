//! `vccw load`: a load test of `vccw serve` run as a child process.
//!
//! Fresh images in a temporary directory are served by a `vccw serve` child; M client
//! threads per device then loop for T seconds: connect (a refusal with EBUSY, the server's
//! one-connection-per-device rule, is counted and retried, not an error), map a memfd, run a
//! verified workload, disconnect after K I/Os. A 3390 client writes 4 KiB records with
//! Define Extent + Locate Record + Write Data on its own track of a scratch cylinder and
//! reads each back (Read Data) and compares; a 3490 client rewinds, writes blocks and a tape
//! mark, rewinds and reads the blocks back and compares.
//!
//! The report gives I/Os, throughput, p50/p99 latency per kind of I/O, errors (any
//! mismatch, unexpected status or transport failure), and the leak check: the server's
//! SIGUSR1 stats (mappings, pinned pages, irqfds, shadows) and its open fd count
//! (`/proc/PID/fd`) after the run must equal those before it, and the I/O starts the server
//! counted must equal the I/Os the clients ran.
//!
//! [`ServerProcess`] (a `vccw serve` child with its stats and fds) is public so the
//! durability test can kill -9 and restart one.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::client::workload::{define_extent, locate_record, pattern, Guest, Op, WorkloadError};
use crate::client::{CcwClient, GuestMemory};
use crate::image::awstape::AwsTape;
use crate::image::ckd::CkdImage;
use crate::orb::dstat;
use crate::service::demo::ReadyLine;

/// How long a stats dump may take to arrive.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server's counters may take to settle after the last client left.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of each I/O.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Guest memory of each client connection.
const CLIENT_MEMORY: usize = 128 << 10;
/// Define Extent / Locate Record parameters (the workload's layout).
const PARAM_AREA: u64 = 0x3000;
/// Data buffers.
const DATA_AREA: u64 = 0x10000;
/// Record / block size.
pub const RECORD: usize = 4096;
/// 4 KiB records per 3390 track.
pub const RECORDS_PER_TRACK: u8 = 12;
/// Cylinders of the load test's 3390 images (the last is the scratch cylinder).
const LOAD_CYLINDERS: u32 = 2;
/// Blocks per tape cycle.
const TAPE_BLOCKS: u32 = 4;
/// Refusal retry pause.
const RETRY_PAUSE: Duration = Duration::from_millis(2);

// ----- the server child ------------------------------------------------------------------

/// One `stats DEVNO key=value ...` line of a SIGUSR1 dump.
pub type Stats = BTreeMap<String, u64>;

/// Parses `stats 0.0.0100 connections=1 mappings=0 ...` into (devno, counters).
pub fn parse_stats(line: &str) -> Option<(String, Stats)> {
    let rest = line.strip_prefix("stats ")?;
    let mut it = rest.split_whitespace();
    let devno = it.next()?.to_string();
    let mut m = Stats::new();
    for kv in it {
        let (k, v) = kv.split_once('=')?;
        m.insert(k.to_string(), v.parse().ok()?);
    }
    Some((devno, m))
}

/// A `vccw serve` child: its devices, its stats on demand, its fd count.
pub struct ServerProcess {
    child: Child,
    /// The devices it announced.
    pub ready: Vec<ReadyLine>,
    stats_rx: Receiver<String>,
}

impl std::fmt::Debug for ServerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerProcess")
            .field("pid", &self.child.id())
            .field("ready", &self.ready)
            .finish()
    }
}

impl ServerProcess {
    /// Starts `exe serve --data-dir DIR --dasd ... --tape ...` and waits for `serving`.
    /// The server's other stderr lines are passed on to this process's stderr.
    pub fn start(
        exe: &Path,
        dir: &Path,
        dasd: &[PathBuf],
        tape: &[PathBuf],
    ) -> Result<ServerProcess, String> {
        let mut cmd = crate::service::demo::exe_command(exe);
        cmd.arg("--log-level").arg("error").arg("serve");
        cmd.arg("--data-dir").arg(dir);
        for d in dasd {
            cmd.arg("--dasd").arg(d);
        }
        for t in tape {
            cmd.arg("--tape").arg(t);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {} serve: {e}", exe.display()))?;
        let stderr = child.stderr.take().ok_or("no server stderr")?;
        let (stx, stats_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("stats ") {
                    let _ = stx.send(line);
                } else {
                    eprintln!("[serve] {line}");
                }
            }
        });
        let (child, ready) = crate::service::demo::await_ready(child)?;
        Ok(ServerProcess {
            child,
            ready,
            stats_rx,
        })
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the server (`/proc/PID/fd`).
    pub fn fd_count(&self) -> Result<usize, String> {
        let p = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(&p)
            .map(|d| d.count())
            .map_err(|e| format!("{p}: {e}"))
    }

    /// Sends SIGUSR1 and collects one stats line per device.
    pub fn stats(&self) -> Result<BTreeMap<String, Stats>, String> {
        while self.stats_rx.try_recv().is_ok() {}
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGUSR1)
            .map_err(|e| format!("SIGUSR1: {e}"))?;
        let deadline = Instant::now() + STATS_TIMEOUT;
        let mut out = BTreeMap::new();
        while out.len() < self.ready.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .stats_rx
                .recv_timeout(left)
                .map_err(|_| "no stats dump after SIGUSR1".to_string())?;
            let (dev, s) = parse_stats(&line).ok_or(format!("bad stats line {line:?}"))?;
            out.insert(dev, s);
        }
        Ok(out)
    }

    /// kill -9 and reap.
    pub fn kill9(mut self) -> Result<ExitStatus, String> {
        let _ = self.child.kill();
        self.child.wait().map_err(|e| e.to_string())
    }

    /// SIGTERM and wait up to 30 s for the exit status.
    pub fn terminate(mut self) -> Result<ExitStatus, String> {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM)
            .map_err(|e| format!("SIGTERM: {e}"))?;
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err("no exit within 30 s of SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Connects to `socket`, retrying while the server refuses with EBUSY (another client is
/// connected, or its connection is still being torn down) until `deadline`. Returns the
/// client (None when the deadline passed) and the number of refusals.
pub fn connect_retry(
    socket: &Path,
    deadline: Instant,
) -> Result<(Option<CcwClient>, u64), crate::client::CcwClientError> {
    let mut refused = 0;
    loop {
        match CcwClient::connect(socket) {
            Ok(c) => return Ok((Some(c), refused)),
            Err(e) if e.errno() == libc::EBUSY => {
                refused += 1;
                if Instant::now() >= deadline {
                    return Ok((None, refused));
                }
                std::thread::sleep(RETRY_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

// ----- 3390 and 3490 channel programs ------------------------------------------------------

const SLI: u8 = 0x20;

/// Define Extent + Locate Record (format write) + one Write CKD per record: formats
/// `cyl`/`head` with records R1..R`n` of [`RECORD`] bytes, record `r` holding
/// `content(r)`.
pub fn format_track(
    g: &mut Guest<'_>,
    mem: &GuestMemory,
    cyl: u16,
    head: u16,
    n: u8,
    content: &dyn Fn(u8) -> Vec<u8>,
) -> Result<(), WorkloadError> {
    mem.write(
        PARAM_AREA,
        &define_extent(0xC0, (cyl, head), (cyl, head), RECORD as u16),
    )?;
    mem.write(
        PARAM_AREA + 16,
        &locate_record(0x03, n, cyl, head, 0, RECORD as u16),
    )?;
    let mut ops: Vec<Op> = vec![(0x63, 16, PARAM_AREA, 0), (0x47, 16, PARAM_AREA + 16, 0)];
    let rec_len = RECORD as u64 + 8;
    for r in 1..=n {
        let addr = DATA_AREA + (r as u64 - 1) * rec_len;
        let mut count = Vec::with_capacity(8);
        count.extend_from_slice(&cyl.to_be_bytes());
        count.extend_from_slice(&head.to_be_bytes());
        count.push(r);
        count.push(0);
        count.extend_from_slice(&(RECORD as u16).to_be_bytes());
        mem.write(addr, &count)?;
        mem.write(addr + 8, &content(r))?;
        ops.push((0x1D, rec_len as u16, addr, 0));
    }
    g.chain_ok("format track", &ops)?;
    Ok(())
}

/// Define Extent + Locate Record (write data) + Write Data of record `rec` of `cyl`/`head`.
pub fn write_record(
    g: &mut Guest<'_>,
    mem: &GuestMemory,
    cyl: u16,
    head: u16,
    rec: u8,
    data: &[u8],
) -> Result<(), WorkloadError> {
    mem.write(
        PARAM_AREA,
        &define_extent(0xC0, (cyl, head), (cyl, head), RECORD as u16),
    )?;
    mem.write(
        PARAM_AREA + 16,
        &locate_record(0x01, 1, cyl, head, rec, RECORD as u16),
    )?;
    mem.write(DATA_AREA, data)?;
    g.chain_ok(
        "write data",
        &[
            (0x63, 16, PARAM_AREA, 0),
            (0x47, 16, PARAM_AREA + 16, 0),
            (0x05, data.len() as u16, DATA_AREA, 0),
        ],
    )?;
    Ok(())
}

/// Define Extent + Locate Record (read data) + Read Data of record `rec` of `cyl`/`head`.
pub fn read_record(
    g: &mut Guest<'_>,
    mem: &GuestMemory,
    cyl: u16,
    head: u16,
    rec: u8,
) -> Result<Vec<u8>, WorkloadError> {
    mem.write(
        PARAM_AREA,
        &define_extent(0x40, (cyl, head), (cyl, head), RECORD as u16),
    )?;
    mem.write(
        PARAM_AREA + 16,
        &locate_record(0x06, 1, cyl, head, rec, RECORD as u16),
    )?;
    mem.write(DATA_AREA, &[0u8; RECORD])?;
    g.chain_ok(
        "read data",
        &[
            (0x63, 16, PARAM_AREA, 0),
            (0x47, 16, PARAM_AREA + 16, 0),
            (0x86, RECORD as u16, DATA_AREA, 0),
        ],
    )?;
    let mut b = vec![0u8; RECORD];
    mem.read(DATA_AREA, &mut b)?;
    Ok(b)
}

/// Rewind.
pub fn tape_rewind(g: &mut Guest<'_>) -> Result<(), WorkloadError> {
    g.chain_ok("rewind", &[(0x07, 0, 0, 0)])?;
    Ok(())
}

/// Write one block.
pub fn tape_write(g: &mut Guest<'_>, mem: &GuestMemory, data: &[u8]) -> Result<(), WorkloadError> {
    mem.write(DATA_AREA, data)?;
    g.chain_ok("write block", &[(0x01, data.len() as u16, DATA_AREA, 0)])?;
    Ok(())
}

/// Write a tape mark.
pub fn tape_mark(g: &mut Guest<'_>) -> Result<(), WorkloadError> {
    g.chain_ok("write tape mark", &[(0x1F, 0, 0, 0)])?;
    Ok(())
}

/// Read one block of up to `len` bytes (SLI: a shorter block is not an error); the bytes
/// read, or None at a tape mark (unit exception).
pub fn tape_read(
    g: &mut Guest<'_>,
    mem: &GuestMemory,
    len: usize,
) -> Result<Option<Vec<u8>>, WorkloadError> {
    mem.write(DATA_AREA, &vec![0u8; len])?;
    let irb = g.chain("read block", &[(0x02, len as u16, DATA_AREA, SLI)])?;
    let s = irb.scsw;
    if s.dstat == dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_EXCEPTION && s.cstat == 0 {
        return Ok(None);
    }
    if s.dstat != dstat::CHANNEL_END | dstat::DEVICE_END || s.cstat & !0x40 != 0 {
        return Err(WorkloadError::Status(format!(
            "read block: dstat={:#04x} cstat={:#04x}",
            s.dstat, s.cstat
        )));
    }
    let n = len.saturating_sub(s.count as usize);
    let mut b = vec![0u8; n];
    mem.read(DATA_AREA, &mut b)?;
    Ok(Some(b))
}

// ----- the load test --------------------------------------------------------------------

/// Options of `vccw load`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The `vccw` binary to run as the server (default: this executable).
    pub exe: Option<PathBuf>,
    /// Devices: the first half (rounded up) 3390s, the rest 3490s.
    pub devices: u32,
    /// Client threads per device (1..=15).
    pub clients: u32,
    /// How long the clients run.
    pub duration: Duration,
    /// I/Os after which a client disconnects and reconnects.
    pub ios_per_connection: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            exe: None,
            devices: 4,
            clients: 2,
            duration: Duration::from_secs(10),
            ios_per_connection: 50,
        }
    }
}

/// p50 / p99 / max of one kind of I/O, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Latency {
    /// I/Os of this kind.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Maximum.
    pub max_us: u64,
}

impl Latency {
    fn of(mut v: Vec<u64>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Latency {
            count: v.len() as u64,
            p50_us: at(0.50),
            p99_us: at(0.99),
            max_us: *v.last().unwrap_or(&0),
        }
    }
}

/// What `vccw load` measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// 3390s served.
    pub dasd: u32,
    /// 3490s served.
    pub tapes: u32,
    /// Client threads per device.
    pub clients: u32,
    /// I/Os completed (setup included).
    pub ios: u64,
    /// Payload bytes moved (records and blocks written or read).
    pub bytes: u64,
    /// Wall time of the client phase.
    pub elapsed: Duration,
    /// Successful connects.
    pub connects: u64,
    /// Connects refused with EBUSY (retried; not errors).
    pub refusals: u64,
    /// Errors: mismatches, unexpected status, transport failures.
    pub errors: u64,
    /// The first few errors.
    pub error_samples: Vec<String>,
    /// Latency per kind of I/O.
    pub latency: BTreeMap<String, Latency>,
    /// Server fds before / after.
    pub fds: (usize, usize),
    /// Server stats before / after, per device.
    pub stats: (BTreeMap<String, Stats>, BTreeMap<String, Stats>),
    /// Resources that did not return to their starting count, and other inconsistencies.
    pub leaks: Vec<String>,
    /// The server exited 0 on SIGTERM and removed its sockets.
    pub clean_stop: bool,
}

impl LoadReport {
    /// No errors, no leaks, a clean stop, and some I/O done.
    pub fn passed(&self) -> bool {
        self.errors == 0 && self.leaks.is_empty() && self.clean_stop && self.ios > 0
    }

    /// I/Os per second.
    pub fn iops(&self) -> f64 {
        self.ios as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// MiB per second of payload.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1u64 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Prints the report (one `key: value` line each; `RESULT ok|FAIL` last).
    pub fn print(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "devices: {} (3390 x{}, 3490 x{}), clients per device: {}",
            self.dasd + self.tapes,
            self.dasd,
            self.tapes,
            self.clients
        )?;
        writeln!(out, "elapsed: {:.2} s", self.elapsed.as_secs_f64())?;
        writeln!(out, "ios: {}", self.ios)?;
        writeln!(
            out,
            "throughput: {:.0} I/Os/s, {:.2} MiB/s",
            self.iops(),
            self.mib_per_s()
        )?;
        writeln!(
            out,
            "connects: {} (refused with EBUSY and retried: {})",
            self.connects, self.refusals
        )?;
        for (k, l) in &self.latency {
            writeln!(
                out,
                "latency {k}: n={} p50={} us p99={} us max={} us",
                l.count, l.p50_us, l.p99_us, l.max_us
            )?;
        }
        writeln!(out, "errors: {}", self.errors)?;
        for e in &self.error_samples {
            writeln!(out, "  error: {e}")?;
        }
        writeln!(
            out,
            "server fds: before={} after={}",
            self.fds.0, self.fds.1
        )?;
        for (dev, s) in &self.stats.1 {
            let b = self.stats.0.get(dev);
            let show = |m: Option<&Stats>| {
                m.map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
            };
            writeln!(out, "stats {dev} before: {}", show(b))?;
            writeln!(out, "stats {dev} after:  {}", show(Some(s)))?;
        }
        writeln!(out, "leaks: {}", self.leaks.len())?;
        for l in &self.leaks {
            writeln!(out, "  leak: {l}")?;
        }
        writeln!(
            out,
            "server stop: {}",
            if self.clean_stop {
                "clean (exit 0, sockets removed)"
            } else {
                "NOT clean"
            }
        )?;
        writeln!(out, "RESULT {}", if self.passed() { "ok" } else { "FAIL" })
    }
}

/// What one client thread did.
#[derive(Default)]
struct ThreadResult {
    ios: u64,
    bytes: u64,
    connects: u64,
    refusals: u64,
    errors: u64,
    samples: Vec<String>,
    lat: BTreeMap<&'static str, Vec<u64>>,
}

impl ThreadResult {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.samples.len() < 4 {
            self.samples.push(what);
        }
    }
}

/// Times one I/O of `kind`.
fn timed<T>(
    r: &mut ThreadResult,
    kind: &'static str,
    bytes: u64,
    f: impl FnOnce() -> Result<T, WorkloadError>,
) -> Result<T, WorkloadError> {
    let t0 = Instant::now();
    let v = f()?;
    r.lat
        .entry(kind)
        .or_default()
        .push(t0.elapsed().as_micros() as u64);
    r.ios += 1;
    r.bytes += bytes;
    Ok(v)
}

/// A seed no two clients share.
fn seed_of(dev: usize, thread: usize, n: u64) -> u32 {
    ((dev as u32) << 24) ^ ((thread as u32) << 16) ^ (n as u32).wrapping_mul(0x9E37_79B1)
}

/// One DASD cycle on the thread's own track: write record `rec` with fresh content and
/// read it back.
fn dasd_cycle(
    g: &mut Guest<'_>,
    mem: &GuestMemory,
    r: &mut ThreadResult,
    (cyl, head): (u16, u16),
    n: u64,
    seed: u32,
) -> Result<(), WorkloadError> {
    let rec = (n % RECORDS_PER_TRACK as u64) as u8 + 1;
    let data = pattern(rec as u32, seed, RECORD);
    timed(r, "3390 write", RECORD as u64, || {
        write_record(g, mem, cyl, head, rec, &data)
    })?;
    let got = timed(r, "3390 read", RECORD as u64, || {
        read_record(g, mem, cyl, head, rec)
    })?;
    if got != data {
        return Err(WorkloadError::Mismatch(format!(
            "cyl {cyl} head {head} R{rec} read back differs"
        )));
    }
    Ok(())
}

/// One tape cycle: rewind, blocks, tape mark, rewind, read the blocks back and compare.
fn tape_cycle(
    g: &mut Guest<'_>,
    mem: &GuestMemory,
    r: &mut ThreadResult,
    seed: u32,
) -> Result<(), WorkloadError> {
    timed(r, "3490 control", 0, || tape_rewind(g))?;
    for b in 0..TAPE_BLOCKS {
        let data = pattern(b, seed, RECORD);
        timed(r, "3490 write", RECORD as u64, || tape_write(g, mem, &data))?;
    }
    timed(r, "3490 control", 0, || tape_mark(g))?;
    timed(r, "3490 control", 0, || tape_rewind(g))?;
    for b in 0..TAPE_BLOCKS {
        let got = timed(r, "3490 read", RECORD as u64, || tape_read(g, mem, RECORD))?;
        if got.as_deref() != Some(&pattern(b, seed, RECORD)[..]) {
            return Err(WorkloadError::Mismatch(format!(
                "tape block {b} read back differs"
            )));
        }
    }
    Ok(())
}

/// A client thread: connect, map, cycles until K I/Os, disconnect; until `deadline`.
fn client_thread(
    socket: PathBuf,
    dasd_track: Option<(u16, u16)>,
    ids: (usize, usize),
    per_conn: u64,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> ThreadResult {
    let mut r = ThreadResult::default();
    let mut n: u64 = 0;
    let mut sink = std::io::sink();
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let dev = match connect_retry(&socket, deadline) {
            Ok((Some(d), refused)) => {
                r.refusals += refused;
                d
            }
            Ok((None, refused)) => {
                r.refusals += refused;
                break;
            }
            Err(e) => {
                r.error(format!("{}: connect: {e}", socket.display()));
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        r.connects += 1;
        let mem = match GuestMemory::new(CLIENT_MEMORY) {
            Ok(m) => m,
            Err(e) => {
                r.error(format!("guest memory: {e}"));
                break;
            }
        };
        if let Err(e) = dev.map_memory(&mem, 0) {
            r.error(format!("{}: map: {e}", socket.display()));
            continue;
        }
        let start_ios = r.ios;
        let mut g = Guest::new(&dev, &mem, &mut sink, IO_TIMEOUT);
        while r.ios - start_ios < per_conn && Instant::now() < deadline {
            let seed = seed_of(ids.0, ids.1, n);
            let res = match dasd_track {
                Some(t) => dasd_cycle(&mut g, &mem, &mut r, t, n, seed),
                None => tape_cycle(&mut g, &mem, &mut r, seed),
            };
            n += 1;
            if let Err(e) = res {
                r.error(format!("{}: {e}", socket.display()));
                break;
            }
        }
        if let Err(e) = dev.unmap_memory(&mem, 0) {
            r.error(format!("{}: unmap: {e}", socket.display()));
        }
    }
    r
}

/// Formats each client's track of the scratch cylinder of a 3390.
fn prepare_dasd(socket: &Path, clients: u32) -> Result<u64, String> {
    let far = Instant::now() + Duration::from_secs(30);
    let (dev, _) = connect_retry(socket, far).map_err(|e| format!("connect: {e}"))?;
    let dev = dev.ok_or("connect: refused for 30 s")?;
    let mem = GuestMemory::new(CLIENT_MEMORY).map_err(|e| e.to_string())?;
    dev.map_memory(&mem, 0).map_err(|e| e.to_string())?;
    let mut sink = std::io::sink();
    let mut g = Guest::new(&dev, &mem, &mut sink, IO_TIMEOUT);
    let cyl = (LOAD_CYLINDERS - 1) as u16;
    for head in 0..clients as u16 {
        format_track(&mut g, &mem, cyl, head, RECORDS_PER_TRACK, &|r| {
            vec![r; RECORD]
        })
        .map_err(|e| format!("format cyl {cyl} head {head}: {e}"))?;
    }
    let ios = g.ios() as u64;
    dev.unmap_memory(&mem, 0).map_err(|e| e.to_string())?;
    Ok(ios)
}

/// Waits until the server's counters (mappings, pinned pages, irqfds, shadows) and fds
/// are back to `before`, or the settle timeout passes; returns the last readings.
fn settle(
    srv: &ServerProcess,
    before: &BTreeMap<String, Stats>,
    fds_before: usize,
) -> Result<(BTreeMap<String, Stats>, usize), String> {
    let t0 = Instant::now();
    loop {
        let s = srv.stats()?;
        let fds = srv.fd_count()?;
        let same = fds == fds_before
            && s.iter().all(|(dev, m)| {
                ["mappings", "pinned", "irqfds", "shadows"]
                    .iter()
                    .all(|k| m.get(*k) == before.get(dev).and_then(|b| b.get(*k)))
            });
        if same || t0.elapsed() > SETTLE_TIMEOUT {
            return Ok((s, fds));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the load test in a fresh temporary directory.
pub fn run_load(opts: &LoadOptions) -> Result<LoadReport, String> {
    if opts.devices == 0 || opts.clients == 0 || opts.clients > 15 {
        return Err("--devices must be at least 1 and --clients 1..=15".into());
    }
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?,
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir =
        TempDir(std::env::temp_dir().join(format!("vccw-load-{}-{nanos}", std::process::id())));
    std::fs::create_dir_all(dir.path()).map_err(|e| format!("{}: {e}", dir.path().display()))?;
    let n_dasd = opts.devices.div_ceil(2);
    let n_tape = opts.devices - n_dasd;
    let mut dasd = Vec::new();
    for i in 0..n_dasd {
        let p = dir.path().join(format!("load{i}.ckd"));
        CkdImage::create_3390(&p, LOAD_CYLINDERS, Some(&format!("LOAD{i:02}")))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        dasd.push(p);
    }
    let mut tape = Vec::new();
    for i in 0..n_tape {
        let p = dir.path().join(format!("load{i}.aws"));
        AwsTape::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        tape.push(p);
    }
    let srv = ServerProcess::start(&exe, dir.path(), &dasd, &tape)?;
    let r = load_with(&srv, opts, (n_dasd, n_tape));
    let sockets: Vec<PathBuf> = srv.ready.iter().map(|r| r.socket.clone()).collect();
    let status = srv.terminate();
    let mut report = r?;
    report.clean_stop =
        matches!(status, Ok(s) if s.success()) && sockets.iter().all(|s| !s.exists());
    Ok(report)
}

fn load_with(
    srv: &ServerProcess,
    opts: &LoadOptions,
    (n_dasd, n_tape): (u32, u32),
) -> Result<LoadReport, String> {
    let fds_before = srv.fd_count()?;
    let before = srv.stats()?;
    let mut setup_ios = 0;
    for r in srv.ready.iter().filter(|r| r.kind == "3390") {
        setup_ios += prepare_dasd(&r.socket, opts.clients)
            .map_err(|e| format!("{}: {e}", r.socket.display()))?;
    }
    let t0 = Instant::now();
    let deadline = t0 + opts.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (d, rl) in srv.ready.iter().enumerate() {
        for t in 0..opts.clients as usize {
            let track = (rl.kind == "3390").then_some(((LOAD_CYLINDERS - 1) as u16, t as u16));
            let (sock, stop) = (rl.socket.clone(), stop.clone());
            let per = opts.ios_per_connection.max(1) as u64;
            handles.push(
                std::thread::Builder::new()
                    .name(format!("load-{d}-{t}"))
                    .spawn(move || client_thread(sock, track, (d, t), per, deadline, stop))
                    .map_err(|e| format!("spawn: {e}"))?,
            );
        }
    }
    let mut report = LoadReport {
        dasd: n_dasd,
        tapes: n_tape,
        clients: opts.clients,
        ios: setup_ios,
        ..Default::default()
    };
    let mut lat: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for h in handles {
        let r = match h.join() {
            Ok(r) => r,
            Err(_) => {
                report.errors += 1;
                report.error_samples.push("a client thread panicked".into());
                continue;
            }
        };
        report.ios += r.ios;
        report.bytes += r.bytes;
        report.connects += r.connects;
        report.refusals += r.refusals;
        report.errors += r.errors;
        for s in r.samples {
            if report.error_samples.len() < 8 {
                report.error_samples.push(s);
            }
        }
        for (k, v) in r.lat {
            lat.entry(k).or_default().extend(v);
        }
    }
    report.elapsed = t0.elapsed();
    report.latency = lat
        .into_iter()
        .map(|(k, v)| (k.to_string(), Latency::of(v)))
        .collect();
    let (after, fds_after) = settle(srv, &before, fds_before)?;
    if fds_after != fds_before {
        report
            .leaks
            .push(format!("server fds {fds_before} before, {fds_after} after"));
    }
    let (mut starts, mut conns) = (0u64, 0u64);
    for (dev, a) in &after {
        let b = before.get(dev).cloned().unwrap_or_default();
        for k in ["mappings", "pinned", "irqfds", "shadows"] {
            if a.get(k) != b.get(k) {
                report.leaks.push(format!(
                    "{dev} {k}: {:?} before, {:?} after",
                    b.get(k),
                    a.get(k)
                ));
            }
        }
        let delta = |k: &str| {
            a.get(k)
                .unwrap_or(&0)
                .saturating_sub(*b.get(k).unwrap_or(&0))
        };
        starts += delta("starts");
        conns += delta("connections");
    }
    // Every I/O the clients counted is one start the server accepted (none lost, none
    // invented), and every connect (the setup's included) one connection it served.
    let setup_conns = n_dasd as u64;
    if report.errors == 0 && starts != report.ios {
        report.leaks.push(format!(
            "server counted {starts} starts, clients ran {} I/Os",
            report.ios
        ));
    }
    if report.errors == 0 && conns != report.connects + setup_conns {
        report.leaks.push(format!(
            "server counted {conns} connections, clients made {}",
            report.connects + setup_conns
        ));
    }
    report.fds = (fds_before, fds_after);
    report.stats = (before, after);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_line_parses() {
        let (d, s) = parse_stats(
            "stats 0.0.0100 connections=3 mappings=0 pinned=0 irqfds=0 shadows=0 starts=42",
        )
        .unwrap();
        assert_eq!(d, "0.0.0100");
        assert_eq!(s["connections"], 3);
        assert_eq!(s["starts"], 42);
        assert_eq!(s.len(), 6);
        assert!(parse_stats("stats 0.0.0100 mappings=x").is_none());
        assert!(parse_stats("ready 0.0.0100 3390 /x").is_none());
    }

    #[test]
    fn percentiles() {
        let l = Latency::of((1..=100).collect());
        assert_eq!((l.count, l.p50_us, l.p99_us, l.max_us), (100, 50, 99, 100));
        let l = Latency::of(vec![7]);
        assert_eq!((l.p50_us, l.p99_us), (7, 7));
        assert_eq!(Latency::of(vec![]).count, 0);
    }
}
