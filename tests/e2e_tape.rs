//! End to end in one process, 3490 tape: the channel programs Linux's tape_34xx driver
//! issues (Mode Set + Write, Write Tape Mark, Rewind, Read Forward, Read Backward, Forward
//! Space File, Sense, Sense ID) written into the vfio-ccw I/O region and run by the
//! translator, the emulated subchannel and the 3490 model on an AWSTAPE file made with
//! `AwsTape::create`; the file is then checked with Hercules `tapemap`.
//!
//! Needs the Hercules tools (`apt-get install -y hercules`): the tests fail without them.

use std::path::Path;
use std::process::Command as Proc;
use std::time::Duration;

use vccw::ccw::{Ccw1, CcwFlags};
use vccw::devices::tape3490::{cmd, Tape3490, Tape3490Config};
use vccw::driver::State;
use vccw::image::awstape::AwsTape;
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
use vccw::orb::{cstat, dstat, Irb, Orb, OrbControls};
use vccw::runner::{Stack, Wait};

const T: Duration = Duration::from_secs(10);
const CE_DE: u8 = dstat::CHANNEL_END | dstat::DEVICE_END;
const DATA: u64 = 0x10_0000;

fn tapemap(path: &Path) -> String {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("tapemap").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "Hercules tool `tapemap` not found: install it with `apt-get install -y hercules`"
    );
    let out = Proc::new("tapemap").arg(path).output().unwrap();
    assert!(out.status.success(), "tapemap failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Rig {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    stack: Stack,
    /// Next free CCW address: every program gets fresh memory.
    next: u64,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.aws");
    let tape = AwsTape::create(&path).unwrap();
    let dev = Tape3490::with_tape(tape, Tape3490Config::default());
    let s = IommuStore::new(StoreConfig::default());
    s.map_dma(0, 0x40_0000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    let stack = Stack::new(Box::new(dev), s, vccw::css::SpinPolicy::OFF).unwrap();
    Rig {
        _dir: dir,
        path,
        stack,
        next: 0x1000,
    }
}

/// One CCW of a program: command, flags, count, data address.
type C = (u8, CcwFlags, u16, u64);

impl Rig {
    fn put(&self, addr: u64, b: &[u8]) {
        self.stack.store().write(addr, b).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.stack.store().read(addr, &mut b).unwrap();
        b
    }

    /// Writes `ccws` (command chaining added between them) at fresh addresses and runs them;
    /// returns the final IRB and the program's address.
    fn run(&mut self, ccws: &[C]) -> (Irb, u32) {
        let cpa = self.next;
        for (i, (code, flags, count, cda)) in ccws.iter().enumerate() {
            let f = flags.with_cc(i + 1 < ccws.len());
            let c = Ccw1 {
                cmd: *code,
                flags: f,
                count: *count,
                cda: *cda as u32,
            };
            self.put(cpa + 8 * i as u64, &c.to_bytes());
        }
        self.next += 0x100;
        let orb = Orb {
            intparm: 0x7A9E,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_prefetch(true)
                .with_format2_idaw(true)
                .with_lpm(0x80),
            cpa: cpa as u32,
        };
        self.stack.start(&orb).expect("start accepted");
        assert!(self.stack.wait_irq(Wait::Block, T).unwrap() >= 1);
        let irb = self.stack.irb().unwrap();
        assert_eq!(self.stack.device().state(), State::Idle);
        assert_eq!(self.stack.store().stats().pinned_pages, 0);
        (irb, cpa as u32)
    }

    /// Runs and expects channel end + device end and no subchannel status.
    fn ok(&mut self, ccws: &[C]) -> Irb {
        let (irb, cpa) = self.run(ccws);
        assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0), "{irb:?}");
        assert_eq!(
            irb.scsw.cpa,
            cpa + 8 * ccws.len() as u32,
            "CPA after the last CCW"
        );
        irb
    }

    /// A format-2 IDAL for the pages at `at`.
    fn idal(&self, at: u64, pages: &[u64]) {
        let b: Vec<u8> = pages.iter().flat_map(|p| p.to_be_bytes()).collect();
        self.put(at, &b);
    }
}

fn none() -> CcwFlags {
    CcwFlags::new()
}

fn sli() -> CcwFlags {
    CcwFlags::new().with_sli(true)
}

fn ida() -> CcwFlags {
    CcwFlags::new().with_ida(true)
}

/// The mode-set byte lives at 0x800.
const MODE: u64 = 0x800;

fn mode_set() -> C {
    (cmd::MODE_SET, none(), 1, MODE)
}

fn nop() -> C {
    (cmd::NOP, sli(), 1, 0)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn sense_id_and_sense() {
    let mut r = rig();
    r.put(0x900, &[0xEE; 16]);
    let irb = r.ok(&[(cmd::SENSE_ID, sli(), 16, 0x900)]);
    assert_eq!(irb.scsw.count, 16 - 7);
    assert_eq!(
        r.get(0x900, 8),
        vec![0xFF, 0x34, 0x90, 0x50, 0x34, 0x90, 0x50, 0xEE]
    );
    // A Mode Set without its byte is a command reject: unit check, sense in the IRB ...
    let (irb, _) = r.run(&[(cmd::MODE_SET, sli(), 0, 0)]);
    assert_eq!(
        irb.scsw.dstat & dstat::UNIT_CHECK,
        dstat::UNIT_CHECK,
        "{irb:?}"
    );
    let cs = irb.concurrent_sense().expect("concurrent sense").to_vec();
    assert_eq!(cs[0] & 0x80, 0x80, "command reject: {cs:02x?}");
    // ... and the Sense command returns the same bytes (32 of them).
    r.put(0xA00, &[0xEE; 32]);
    r.ok(&[(cmd::SENSE, none(), 32, 0xA00)]);
    let s = r.get(0xA00, 32);
    assert_eq!(s[0] & 0x80, 0x80, "{s:02x?}");
    assert_eq!(&s[..], &cs[..32]);
}

#[test]
fn linux_tape_programs_write_read_space_and_tapemap_agrees() {
    let mut r = rig();
    r.put(MODE, &[0x00]);
    let b1 = pattern(80, 1);
    let b2 = pattern(6000, 2);
    let b3 = pattern(4096, 3);
    let b4 = pattern(100, 4);
    // File 1: three blocks. The 6000-byte block comes from two pages far apart (IDAL).
    r.put(DATA, &b1);
    r.ok(&[mode_set(), (cmd::WRITE, none(), 80, DATA)]);
    let (p1, p2) = (DATA + 0x10000 + 4096 - 1000, DATA + 0x30000);
    r.put(p1, &b2[..1000]);
    r.put(p2, &b2[1000..]);
    // 1000 bytes to the end of p1's page, then two 4 KiB blocks from p2.
    r.idal(0x600, &[p1, p2, p2 + 4096]);
    r.ok(&[mode_set(), (cmd::WRITE, ida(), 6000, 0x600)]);
    r.put(DATA + 0x2000, &b3);
    r.ok(&[mode_set(), (cmd::WRITE, none(), 4096, DATA + 0x2000)]);
    // Write Tape Mark as tape_34xx chains it: Mode Set, WTM, NOP.
    r.ok(&[mode_set(), (cmd::WRITE_TAPE_MARK, sli(), 1, 0), nop()]);
    // File 2: one block, then the double tape mark.
    r.put(DATA + 0x4000, &b4);
    r.ok(&[mode_set(), (cmd::WRITE, none(), 100, DATA + 0x4000)]);
    r.ok(&[mode_set(), (cmd::WRITE_TAPE_MARK, sli(), 1, 0), nop()]);
    r.ok(&[mode_set(), (cmd::WRITE_TAPE_MARK, sli(), 1, 0), nop()]);

    let map = tapemap(&r.path);
    assert!(
        map.contains("File 1: Blocks=3, block size min=80, max=6000"),
        "{map}"
    );
    assert!(
        map.contains("File 2: Blocks=1, block size min=100, max=100"),
        "{map}"
    );
    assert!(map.contains("End of tape."), "{map}");

    // Rewind (+ NOP), then Read Forward with an oversized count and SLI: residual 20.
    r.ok(&[(cmd::REWIND, sli(), 1, 0), nop()]);
    let irb = r.ok(&[mode_set(), (cmd::READ_FORWARD, sli(), 100, DATA + 0x8000)]);
    assert_eq!(irb.scsw.count, 20);
    assert_eq!(r.get(DATA + 0x8000, 80), b1);
    // Without SLI the short block is incorrect length.
    let (irb, _) = r.run(&[(cmd::READ_FORWARD, none(), 7000, DATA + 0x9000)]);
    assert_eq!(irb.scsw.cstat, cstat::INCORRECT_LENGTH, "{irb:?}");
    assert_eq!(irb.scsw.count, 1000);
    assert!(r.get(DATA + 0x9000, 6000) == b2, "block 2 read forward");
    // Read Backward returns the same block, stored at descending addresses from the data
    // address (the area's last byte): with a count of 8000 it fills the top of the area.
    let top = DATA + 0x20000;
    let irb = r.ok(&[mode_set(), (cmd::READ_BACKWARD, sli(), 8000, top + 7999)]);
    assert_eq!(irb.scsw.count, 2000);
    let area = r.get(top, 8000);
    assert!(area[2000..] == b2[..], "block at the top of the area");
    assert!(
        area[..2000].iter().all(|&b| b == 0),
        "nothing below the block"
    );
    // Forward again through block 2 into an IDAL over two pages, then block 3.
    let (q1, q2) = (DATA + 0x50000 + 4096 - 10, DATA + 0x70000);
    r.idal(0x700, &[q1, q2, q2 + 4096]);
    r.ok(&[mode_set(), (cmd::READ_FORWARD, ida(), 6000, 0x700)]);
    let mut got = r.get(q1, 10);
    got.extend(r.get(q2, 5990));
    assert!(got == b2, "block 2 through the IDAL");
    r.ok(&[(cmd::READ_FORWARD, none(), 4096, DATA + 0xA000)]);
    assert!(r.get(DATA + 0xA000, 4096) == b3, "block 3");
    // The tape mark: unit exception, nothing transferred.
    let (irb, _) = r.run(&[(cmd::READ_FORWARD, sli(), 100, DATA + 0xB000)]);
    assert_eq!(irb.scsw.dstat, CE_DE | dstat::UNIT_EXCEPTION, "{irb:?}");
    assert_eq!(irb.scsw.count, 100);
    // Rewind, Forward Space File (Mode Set, FSF, NOP): the next read is file 2's block.
    r.ok(&[(cmd::REWIND, sli(), 1, 0), nop()]);
    r.ok(&[mode_set(), (cmd::FORWARD_SPACE_FILE, sli(), 1, 0), nop()]);
    r.ok(&[mode_set(), (cmd::READ_FORWARD, none(), 100, DATA + 0xC000)]);
    assert_eq!(r.get(DATA + 0xC000, 100), b4);
}
