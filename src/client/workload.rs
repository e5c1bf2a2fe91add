//! The `vccw guest` workload: a guest's view of a served device, through [`CcwClient`].
//!
//! Each device is identified by SENSE ID, then:
//! * 3390: Read Device Characteristics (cylinder count), read the volume label (VOL1) with
//!   Define Extent + Locate Record + Read Data, format-write N 4 KiB records on the last
//!   cylinder (Define Extent + Locate Record "format write" + Write CKD, one channel program
//!   per track), read them back (Locate Record + Read Data) and compare.
//! * 3490: rewind, write N blocks and two tape marks, rewind, read the blocks back and the
//!   tape mark (unit exception), compare.
//! * virtio-ccw (control unit 3832, e.g. a real subchannel served with `vccw serve --mdev`):
//!   READ_CONF (0x22) of the first 8 configuration bytes, which a legacy virtio-blk device
//!   answers with its capacity in 512-byte sectors (big-endian); then the same read through
//!   a MIDAW list of two 4-byte pieces, which only vccw's translator makes runnable (the
//!   kernel's vfio-ccw refuses MIDAWs), and must give the same capacity.
//!
//! Every I/O prints one line with its device and channel status.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::{CcwClient, CcwClientError, GuestMemory};
use crate::ccw::{Ccw1, CcwFlags, Midaw, MidawFlags};
use crate::image::ckd::{ascii_label, ebcdic_label};
use crate::orb::{dstat, Irb, Orb, OrbControls};

/// Guest memory size of the workload.
pub const GUEST_MEMORY: usize = 1 << 20;
/// Where the workload puts its channel programs.
const CCW_AREA: u64 = 0x1000;
/// Where it puts Define Extent / Locate Record parameters.
const PARAM_AREA: u64 = 0x3000;
/// Where data buffers start.
const DATA_AREA: u64 = 0x10000;
/// 3390 data record size used by the workload.
pub const RECORD_SIZE: usize = 4096;
/// Control-unit type of a virtio-ccw device (QEMU's, as SENSE ID reports it).
pub const VIRTIO_CU_TYPE: u16 = 0x3832;
/// Virtio-ccw READ_CONF command code.
pub const VIRTIO_READ_CONF: u8 = 0x22;
/// Offset in the data area of the first MIDAW piece of the virtio workload; the second
/// follows it, 4 bytes on, in the same page (QEMU 7.2's channel does not cross pages within
/// one MIDAW list correctly: see `docs/kernel-backend.md`).
const MIDAW_PIECE: u64 = 0x100;
/// Fill byte around the MIDAW pieces: a translation that stores outside them shows.
const GUARD: u8 = 0xEE;
/// 4 KiB records on one 3390 track.
pub const RECORDS_PER_TRACK: u32 = 12;
/// Tracks per 3390 cylinder.
const HEADS: u32 = 15;

/// Why the workload failed.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// The client failed (transport, timeout).
    #[error(transparent)]
    Client(#[from] CcwClientError),
    /// Data read back differs from what was written.
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// An I/O ended with unexpected status.
    #[error("unexpected status: {0}")]
    Status(String),
    /// The device is neither a 3390 nor a 3490.
    #[error("unsupported device type {0:04x}")]
    Unsupported(u16),
    /// Bad options (e.g. more records than a cylinder holds).
    #[error("{0}")]
    Usage(String),
    /// Printing failed.
    #[error("output: {0}")]
    Output(#[from] std::io::Error),
}

/// Options of the workload.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadOptions {
    /// Records (3390) or blocks (3490) written and read back.
    pub records: u32,
    /// Timeout of each I/O.
    pub timeout: Duration,
    /// virtio-ccw: the capacity (512-byte sectors) READ_CONF must report; any non-zero
    /// value when None.
    pub expect_capacity: Option<u64>,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        WorkloadOptions {
            records: 16,
            timeout: Duration::from_secs(10),
            expect_capacity: None,
        }
    }
}

/// What SENSE ID answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Control-unit type.
    pub cu_type: u16,
    /// Control-unit model.
    pub cu_model: u8,
    /// Device type.
    pub dev_type: u16,
    /// Device model.
    pub dev_model: u8,
}

/// What one device's workload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// The identity.
    pub identity: Identity,
    /// I/Os run.
    pub ios: u32,
    /// Payload bytes written and read back (virtio: configuration bytes read).
    pub bytes: u64,
    /// virtio-ccw: the capacity in 512-byte sectors.
    pub capacity: Option<u64>,
}

fn describe(irb: &Irb) -> String {
    let s = &irb.scsw;
    format!(
        "dstat={:#04x} cstat={:#04x} residual={}",
        s.dstat, s.cstat, s.count
    )
}

/// A device, its memory and a printer: runs channel programs built from a CCW list.
pub struct Guest<'a> {
    dev: &'a CcwClient,
    mem: &'a GuestMemory,
    out: &'a mut dyn Write,
    timeout: Duration,
    ios: u32,
    intparm: u32,
}

impl std::fmt::Debug for Guest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("ios", &self.ios).finish()
    }
}

/// One CCW of a chain: command, count, data address, extra flags (SLI etc.; CC is added).
pub type Op = (u8, u16, u64, u8);

const CC: u8 = 0x40;
const SLI: u8 = 0x20;
/// Format-1 CCW flag: the data address designates a MIDAW list.
const MIDA: u8 = 0x01;

impl<'a> Guest<'a> {
    /// A guest over a connected device whose memory `mem` is mapped at 0.
    pub fn new(
        dev: &'a CcwClient,
        mem: &'a GuestMemory,
        out: &'a mut dyn Write,
        timeout: Duration,
    ) -> Self {
        Guest {
            dev,
            mem,
            out,
            timeout,
            ios: 0,
            intparm: 0x1000,
        }
    }

    /// Runs a command-chained program of `ops` and returns its final IRB, printing `what`
    /// with the status and latency.
    pub fn chain(&mut self, what: &str, ops: &[Op]) -> Result<Irb, WorkloadError> {
        self.run_ops(what, ops, false)
    }

    /// As [`Guest::chain`], with the ORB's MIDAW control bit set (for CCWs flagged MIDA).
    pub fn chain_midaw(&mut self, what: &str, ops: &[Op]) -> Result<Irb, WorkloadError> {
        self.run_ops(what, ops, true)
    }

    fn run_ops(&mut self, what: &str, ops: &[Op], midaw: bool) -> Result<Irb, WorkloadError> {
        let ccws: Vec<Ccw1> = ops
            .iter()
            .enumerate()
            .map(|(i, &(cmd, count, cda, fl))| Ccw1 {
                cmd,
                flags: CcwFlags::from_bits(fl | if i + 1 < ops.len() { CC } else { 0 }),
                count,
                cda: cda as u32,
            })
            .collect();
        self.mem.write_ccws(CCW_AREA, &ccws)?;
        self.intparm = self.intparm.wrapping_add(1);
        let orb = Orb {
            intparm: self.intparm,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_prefetch(true)
                .with_midaw(midaw)
                .with_lpm(0xff),
            cpa: CCW_AREA as u32,
        };
        let t0 = Instant::now();
        let irb = self.dev.run(&orb, self.timeout)?;
        self.ios += 1;
        writeln!(
            self.out,
            "  {what}: {} ({} us)",
            describe(&irb),
            t0.elapsed().as_micros()
        )?;
        Ok(irb)
    }

    /// Runs `ops` and requires channel end + device end with no other status.
    pub fn chain_ok(&mut self, what: &str, ops: &[Op]) -> Result<Irb, WorkloadError> {
        let irb = self.chain(what, ops)?;
        check_ok(what, &irb)
    }
}

/// Requires channel end + device end with no other status.
fn check_ok(what: &str, irb: &Irb) -> Result<Irb, WorkloadError> {
    let s = irb.scsw;
    if s.dstat != dstat::CHANNEL_END | dstat::DEVICE_END || s.cstat != 0 {
        return Err(WorkloadError::Status(format!("{what}: {}", describe(irb))));
    }
    Ok(*irb)
}

impl Guest<'_> {
    /// SENSE ID.
    pub fn sense_id(&mut self) -> Result<Identity, WorkloadError> {
        self.mem.write(DATA_AREA, &[0; 7])?;
        self.chain_ok("sense id", &[(0xE4, 7, DATA_AREA, SLI)])?;
        let mut b = [0u8; 7];
        self.mem.read(DATA_AREA, &mut b)?;
        if b[0] != 0xFF {
            return Err(WorkloadError::Mismatch(format!(
                "SENSE ID byte 0 is {:#04x}, not 0xff",
                b[0]
            )));
        }
        Ok(Identity {
            cu_type: u16::from_be_bytes([b[1], b[2]]),
            cu_model: b[3],
            dev_type: u16::from_be_bytes([b[4], b[5]]),
            dev_model: b[6],
        })
    }

    /// I/Os run so far.
    pub fn ios(&self) -> u32 {
        self.ios
    }
}

/// Define Extent parameters (16 bytes): mask, global attributes, block size, extent.
pub fn define_extent(mask: u8, begin: (u16, u16), end: (u16, u16), blksize: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0] = mask;
    d[1] = 0xC0;
    d[2..4].copy_from_slice(&blksize.to_be_bytes());
    d[8..10].copy_from_slice(&begin.0.to_be_bytes());
    d[10..12].copy_from_slice(&begin.1.to_be_bytes());
    d[12..14].copy_from_slice(&end.0.to_be_bytes());
    d[14..16].copy_from_slice(&end.1.to_be_bytes());
    d
}

/// Locate Record parameters (16 bytes): operation, count, seek and search address, record,
/// transfer length factor.
pub fn locate_record(oper: u8, count: u8, cyl: u16, head: u16, rec: u8, tlf: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0] = oper;
    d[1] = if tlf != 0 { 0x80 } else { 0 };
    d[3] = count;
    d[4..6].copy_from_slice(&cyl.to_be_bytes());
    d[6..8].copy_from_slice(&head.to_be_bytes());
    d[8..10].copy_from_slice(&cyl.to_be_bytes());
    d[10..12].copy_from_slice(&head.to_be_bytes());
    d[12] = rec;
    d[13] = 0xFF;
    d[14..16].copy_from_slice(&tlf.to_be_bytes());
    d
}

/// The workload's data pattern for record `n` under `seed`.
pub fn pattern(n: u32, seed: u32, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(n * 7)
                .wrapping_add(seed) as u8
        })
        .collect();
    v[..4].copy_from_slice(&n.to_be_bytes());
    v[4..8].copy_from_slice(&seed.to_be_bytes());
    v
}

fn dasd(g: &mut Guest<'_>, opts: &WorkloadOptions, seed: u32) -> Result<u64, WorkloadError> {
    let max = RECORDS_PER_TRACK * HEADS;
    if opts.records == 0 || opts.records > max {
        return Err(WorkloadError::Usage(format!(
            "--records must be 1..={max} for a 3390 (one cylinder of 4 KiB records)"
        )));
    }
    // Read Device Characteristics: primary cylinders at bytes 12-13.
    g.chain_ok("read device characteristics", &[(0x64, 64, DATA_AREA, SLI)])?;
    let mut rdc = [0u8; 64];
    g.mem.read(DATA_AREA, &mut rdc)?;
    let cyls = u16::from_be_bytes([rdc[12], rdc[13]]);
    if cyls < 2 {
        return Err(WorkloadError::Usage(format!(
            "volume has {cyls} cylinder(s): no scratch cylinder"
        )));
    }
    writeln!(g.out, "  {cyls} cylinders")?;
    // The volume label: R3 of track 0.
    g.mem
        .write(PARAM_AREA, &define_extent(0x40, (0, 0), (0, 1), 0))?;
    g.mem
        .write(PARAM_AREA + 16, &locate_record(0x06, 1, 0, 0, 3, 0))?;
    g.chain_ok(
        "read VOL1 (define extent, locate record, read data)",
        &[
            (0x63, 16, PARAM_AREA, 0),
            (0x47, 16, PARAM_AREA + 16, 0),
            (0x06, 80, DATA_AREA, 0),
        ],
    )?;
    let mut vol1 = [0u8; 80];
    g.mem.read(DATA_AREA, &mut vol1)?;
    if vol1[..4] != ebcdic_label("VOL1")[..] {
        return Err(WorkloadError::Mismatch(format!(
            "record 3 of track 0 is not a VOL1 label: {:02x?}",
            &vol1[..4]
        )));
    }
    writeln!(g.out, "  volume serial {}", ascii_label(&vol1[4..10]))?;
    let cyl = cyls - 1;
    let tracks = opts.records.div_ceil(RECORDS_PER_TRACK);
    let rec_len = RECORD_SIZE as u64 + 8;
    // Format-write each track's records.
    for t in 0..tracks {
        let first = t * RECORDS_PER_TRACK;
        let n = (opts.records - first).min(RECORDS_PER_TRACK);
        let head = t as u16;
        g.mem.write(
            PARAM_AREA,
            &define_extent(0xC0, (cyl, head), (cyl, head), RECORD_SIZE as u16),
        )?;
        g.mem.write(
            PARAM_AREA + 16,
            &locate_record(0x03, n as u8, cyl, head, 0, RECORD_SIZE as u16),
        )?;
        let mut ops: Vec<Op> = vec![(0x63, 16, PARAM_AREA, 0), (0x47, 16, PARAM_AREA + 16, 0)];
        for r in 0..n {
            let addr = DATA_AREA + r as u64 * rec_len;
            let mut count = Vec::with_capacity(8);
            count.extend_from_slice(&cyl.to_be_bytes());
            count.extend_from_slice(&head.to_be_bytes());
            count.push(r as u8 + 1);
            count.push(0);
            count.extend_from_slice(&(RECORD_SIZE as u16).to_be_bytes());
            g.mem.write(addr, &count)?;
            g.mem
                .write(addr + 8, &pattern(first + r, seed, RECORD_SIZE))?;
            ops.push((0x1D, rec_len as u16, addr, 0));
        }
        g.chain_ok(
            &format!(
                "write {n} records cyl {cyl} head {head} (define extent, locate record, write CKD)"
            ),
            &ops,
        )?;
    }
    // Read them back.
    for t in 0..tracks {
        let first = t * RECORDS_PER_TRACK;
        let n = (opts.records - first).min(RECORDS_PER_TRACK);
        let head = t as u16;
        for r in 0..n {
            g.mem.write(
                DATA_AREA + r as u64 * RECORD_SIZE as u64,
                &[0u8; RECORD_SIZE],
            )?;
        }
        g.mem.write(
            PARAM_AREA,
            &define_extent(0x40, (cyl, head), (cyl, head), RECORD_SIZE as u16),
        )?;
        g.mem.write(
            PARAM_AREA + 16,
            &locate_record(0x06, n as u8, cyl, head, 1, RECORD_SIZE as u16),
        )?;
        let mut ops: Vec<Op> = vec![(0x63, 16, PARAM_AREA, 0), (0x47, 16, PARAM_AREA + 16, 0)];
        for r in 0..n {
            ops.push((
                0x86,
                RECORD_SIZE as u16,
                DATA_AREA + r as u64 * RECORD_SIZE as u64,
                0,
            ));
        }
        g.chain_ok(
            &format!("read {n} records cyl {cyl} head {head} (locate record, read data)"),
            &ops,
        )?;
        for r in 0..n {
            let mut b = vec![0u8; RECORD_SIZE];
            g.mem
                .read(DATA_AREA + r as u64 * RECORD_SIZE as u64, &mut b)?;
            if b != pattern(first + r, seed, RECORD_SIZE) {
                return Err(WorkloadError::Mismatch(format!(
                    "record {} (cyl {cyl} head {head} R{}) read back differs",
                    first + r,
                    r + 1
                )));
            }
        }
    }
    writeln!(
        g.out,
        "  verified {} records of {RECORD_SIZE} bytes",
        opts.records
    )?;
    Ok(opts.records as u64 * RECORD_SIZE as u64)
}

/// The MIDAW list of the virtio workload: two 4-byte pieces, adjacent in one page.
pub fn virtio_midaws(first: u64) -> [[u8; 16]; 2] {
    [
        Midaw {
            count: 4,
            data: first,
            ..Default::default()
        }
        .to_bytes(),
        Midaw {
            flags: MidawFlags::new().with_last(true),
            count: 4,
            data: first + 4,
            ..Default::default()
        }
        .to_bytes(),
    ]
}

/// Checks a one-CCW program's end as a channel reports it: clean status, every byte
/// transferred, and the SCSW's CCW address (guest-physical, after the last CCW) pointing just
/// past it: the service must not show the guest a host address.
fn check_single(what: &str, irb: &Irb) -> Result<(), WorkloadError> {
    check_ok(what, irb)?;
    let want = CCW_AREA as u32 + 8;
    if irb.scsw.count != 0 || irb.scsw.cpa != want {
        return Err(WorkloadError::Status(format!(
            "{what}: residual {} and CCW address {:#x}, want 0 and {want:#x}",
            irb.scsw.count, irb.scsw.cpa
        )));
    }
    Ok(())
}

/// The virtio-ccw workload (SENSE ID already ran): READ_CONF direct, then through MIDAWs.
/// Returns the capacity in 512-byte sectors.
fn virtio(g: &mut Guest<'_>, opts: &WorkloadOptions) -> Result<u64, WorkloadError> {
    g.mem.write(DATA_AREA, &[0u8; 8])?;
    let irb = g.chain(
        "read conf (virtio 0x22, 8 bytes)",
        &[(VIRTIO_READ_CONF, 8, DATA_AREA, SLI)],
    )?;
    check_single("read conf", &irb)?;
    let mut b = [0u8; 8];
    g.mem.read(DATA_AREA, &mut b)?;
    let capacity = u64::from_be_bytes(b);
    writeln!(g.out, "  capacity {capacity} sectors")?;
    match opts.expect_capacity {
        Some(want) if want != capacity => {
            return Err(WorkloadError::Mismatch(format!(
                "capacity {capacity} sectors, expected {want}"
            )))
        }
        None if capacity == 0 => {
            return Err(WorkloadError::Mismatch("capacity 0 sectors".into()));
        }
        _ => {}
    }
    // The same 8 bytes through a MIDAW list, guarded on both sides.
    let piece = DATA_AREA + MIDAW_PIECE;
    g.mem.write(piece - 8, &[GUARD; 24])?;
    let list = virtio_midaws(piece);
    g.mem.write(PARAM_AREA, &list[0])?;
    g.mem.write(PARAM_AREA + 16, &list[1])?;
    let irb = g.chain_midaw(
        "read conf through 2 MIDAWs",
        &[(VIRTIO_READ_CONF, 8, PARAM_AREA, SLI | MIDA)],
    )?;
    check_single("read conf (MIDAW)", &irb)?;
    let mut m = [0u8; 24];
    g.mem.read(piece - 8, &mut m)?;
    if m[..8] != [GUARD; 8] || m[16..] != [GUARD; 8] {
        return Err(WorkloadError::Mismatch(format!(
            "the MIDAW read stored outside its pieces: {m:02x?}"
        )));
    }
    let mut got = [0u8; 8];
    got.copy_from_slice(&m[8..16]);
    let via_midaw = u64::from_be_bytes(got);
    if via_midaw != capacity {
        return Err(WorkloadError::Mismatch(format!(
            "capacity through MIDAWs {via_midaw}, direct {capacity}"
        )));
    }
    writeln!(g.out, "RESULT ok guest-virtio capacity={capacity}")?;
    Ok(capacity)
}

/// Tape block size used by the workload.
pub const BLOCK_SIZE: usize = 4096;

fn tape(g: &mut Guest<'_>, opts: &WorkloadOptions, seed: u32) -> Result<u64, WorkloadError> {
    if opts.records == 0 {
        return Err(WorkloadError::Usage("--records must be at least 1".into()));
    }
    g.chain_ok("rewind", &[(0x07, 0, 0, 0)])?;
    for b in 0..opts.records {
        g.mem.write(DATA_AREA, &pattern(b, seed, BLOCK_SIZE))?;
        g.chain_ok(
            &format!("write block {b}"),
            &[(0x01, BLOCK_SIZE as u16, DATA_AREA, 0)],
        )?;
    }
    g.chain_ok("write tape mark x2", &[(0x1F, 0, 0, 0), (0x1F, 0, 0, 0)])?;
    g.chain_ok("rewind", &[(0x07, 0, 0, 0)])?;
    for b in 0..opts.records {
        g.mem.write(DATA_AREA, &[0u8; BLOCK_SIZE])?;
        g.chain_ok(
            &format!("read block {b}"),
            &[(0x02, BLOCK_SIZE as u16, DATA_AREA, 0)],
        )?;
        let mut got = vec![0u8; BLOCK_SIZE];
        g.mem.read(DATA_AREA, &mut got)?;
        if got != pattern(b, seed, BLOCK_SIZE) {
            return Err(WorkloadError::Mismatch(format!(
                "block {b} read back differs"
            )));
        }
    }
    let irb = g.chain(
        "read tape mark",
        &[(0x02, BLOCK_SIZE as u16, DATA_AREA, SLI)],
    )?;
    if irb.scsw.dstat & dstat::UNIT_EXCEPTION == 0 {
        return Err(WorkloadError::Status(format!(
            "tape mark read without unit exception: {}",
            describe(&irb)
        )));
    }
    g.chain_ok("rewind", &[(0x07, 0, 0, 0)])?;
    writeln!(
        g.out,
        "  verified {} blocks of {BLOCK_SIZE} bytes and the tape mark",
        opts.records
    )?;
    Ok(opts.records as u64 * BLOCK_SIZE as u64)
}

/// Connects to `socket`, maps a memfd, identifies the device and runs its workload,
/// printing each I/O on `out`.
pub fn run_guest(
    socket: &Path,
    opts: &WorkloadOptions,
    out: &mut dyn Write,
) -> Result<Summary, WorkloadError> {
    let mem = GuestMemory::new(GUEST_MEMORY)?;
    let dev = CcwClient::connect(socket)?;
    dev.map_memory(&mem, 0)?;
    writeln!(
        out,
        "{}: connected, {} KiB guest memory mapped by fd",
        socket.display(),
        mem.len() >> 10
    )?;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0x5eed);
    let mut g = Guest::new(&dev, &mem, out, opts.timeout);
    let id = g.sense_id()?;
    writeln!(
        g.out,
        "  sense id: control unit {:04x}-{:02x}, device {:04x}-{:02x}",
        id.cu_type, id.cu_model, id.dev_type, id.dev_model
    )?;
    let mut capacity = None;
    let bytes = match id.dev_type {
        _ if id.cu_type == VIRTIO_CU_TYPE => {
            capacity = Some(virtio(&mut g, opts)?);
            16
        }
        0x3390 => dasd(&mut g, opts, seed)?,
        0x3490 => tape(&mut g, opts, seed)?,
        t => return Err(WorkloadError::Unsupported(t)),
    };
    let ios = g.ios();
    dev.unmap_memory(&mem, 0)?;
    Ok(Summary {
        identity: id,
        ios,
        bytes,
        capacity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_blocks_are_big_endian() {
        assert_eq!(
            define_extent(0xC0, (0x0102, 3), (0x0102, 4), 4096),
            [0xC0, 0xC0, 0x10, 0x00, 0, 0, 0, 0, 0x01, 0x02, 0, 3, 0x01, 0x02, 0, 4]
        );
        assert_eq!(
            locate_record(0x03, 12, 4, 1, 0, 4096),
            [0x03, 0x80, 0, 12, 0, 4, 0, 1, 0, 4, 0, 1, 0, 0xFF, 0x10, 0x00]
        );
        let p = pattern(5, 0x01020304, 16);
        assert_eq!(&p[..8], &[0, 0, 0, 5, 1, 2, 3, 4]);
        assert_ne!(pattern(5, 1, 64), pattern(6, 1, 64));
    }
}

#[cfg(test)]
mod virtio_tests {
    use std::sync::Arc;

    use super::*;
    use crate::css::device::{Command, DeviceIdentity, DeviceModel, Outcome};
    use crate::css::subchannel::{EmulatedSubchannel, SubchannelConfig};
    use crate::driver::{DeviceConfig, VfioCcwDevice};
    use crate::iommu_store::{IommuStore, StoreConfig};
    use crate::service::backend::CcwBackend;
    use crate::service::listener::DeviceListener;
    use crate::vfio_user::server::ServerConfig;

    /// A legacy virtio-blk-ccw device as QEMU presents it: CU 3832-02, READ_CONF answering
    /// a 60-byte configuration that starts with the big-endian capacity.
    struct VirtioBlk {
        capacity: u64,
        reads: u32,
    }

    impl DeviceModel for VirtioBlk {
        fn execute(&mut self, cmd: &Command, data: &mut [u8]) -> Outcome {
            let src: Vec<u8> = match cmd.code {
                0xE4 => self.identity().sense_id_bytes().to_vec(),
                VIRTIO_READ_CONF => {
                    self.reads += 1;
                    let mut c = vec![0u8; 60];
                    c[..8].copy_from_slice(&self.capacity.to_be_bytes());
                    c
                }
                _ => return Outcome::unit_check(),
            };
            let n = src.len().min(cmd.count).min(data.len());
            data[..n].copy_from_slice(&src[..n]);
            Outcome {
                more: src.len() > n,
                ..Outcome::done(n)
            }
        }

        fn sense(&self) -> Vec<u8> {
            vec![0; 32]
        }

        fn identity(&self) -> DeviceIdentity {
            DeviceIdentity {
                cu_type: VIRTIO_CU_TYPE,
                cu_model: 2,
                dev_type: 0,
                dev_model: 0,
            }
        }
    }

    fn serve_virtio(socket: &Path, capacity: u64) -> DeviceListener {
        let model = Box::new(VirtioBlk { capacity, reads: 0 });
        let cfg = SubchannelConfig {
            devno: 5,
            ..Default::default()
        };
        let sch = EmulatedSubchannel::new(model, cfg).unwrap();
        let store = IommuStore::new(StoreConfig::default());
        let dev = VfioCcwDevice::new(Arc::new(sch), store.clone(), DeviceConfig::default());
        let backend = CcwBackend::new(dev, store, "0.0.0005").unwrap();
        DeviceListener::start(socket, Arc::new(backend), ServerConfig::default()).unwrap()
    }

    #[test]
    fn midaw_list_bytes() {
        // Reserved 5 bytes, flags (0x80 = last on the second), count 4, 64-bit address.
        let l = virtio_midaws(0x10100);
        assert_eq!(l[0], [0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 1, 0x01, 0x00]);
        assert_eq!(
            l[1],
            [0, 0, 0, 0, 0, 0x80, 0, 4, 0, 0, 0, 0, 0, 1, 0x01, 0x04]
        );
    }

    #[test]
    fn virtio_workload_over_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let l = serve_virtio(&sock, 32768);
        let mut out = Vec::new();
        let opts = WorkloadOptions {
            expect_capacity: Some(32768),
            ..Default::default()
        };
        let sum = run_guest(&sock, &opts, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(sum.capacity, Some(32768));
        assert_eq!(sum.identity.cu_type, 0x3832);
        // SENSE ID, READ_CONF direct, READ_CONF through MIDAWs.
        assert_eq!(sum.ios, 3);
        assert!(
            text.lines()
                .any(|l| l == "RESULT ok guest-virtio capacity=32768"),
            "{text}"
        );
        l.shutdown();

        // A wrong expectation fails, and no RESULT ok line is printed.
        let sock2 = dir.path().join("w.sock");
        let l = serve_virtio(&sock2, 1);
        let mut out = Vec::new();
        let e = run_guest(&sock2, &opts, &mut out).unwrap_err();
        assert!(matches!(e, WorkloadError::Mismatch(_)), "{e}");
        assert!(!String::from_utf8(out).unwrap().contains("RESULT ok"));
        l.shutdown();

        // Capacity 0 fails without an expectation.
        let sock3 = dir.path().join("z.sock");
        let l = serve_virtio(&sock3, 0);
        let e = run_guest(&sock3, &WorkloadOptions::default(), &mut Vec::new()).unwrap_err();
        assert!(matches!(e, WorkloadError::Mismatch(_)), "{e}");
        l.shutdown();
    }
}
