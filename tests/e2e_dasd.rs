//! End to end in one process, 3390 DASD: guest memory in the store, the channel programs
//! Linux's dasd_eckd driver issues, written into the vfio-ccw I/O region; the translator, the
//! emulated subchannel and the 3390 model on a Hercules `dasdinit` volume run them; the IRB
//! comes back in the region with an IO eventfd signal, the data at the guest addresses.
//!
//! Needs the Hercules tools (`apt-get install -y hercules`): the tests fail, never skip,
//! without them.

mod common;
use common::{dasdinit, tool};

use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::thread;
use std::time::{Duration, Instant};

use vccw::ccw::{Ccw1, CcwFlags};
use vccw::devices::dasd3390::{Dasd3390, Dasd3390Options};
use vccw::driver::State;
use vccw::image::ckd::{CkdImage, CkdOpenOptions};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
use vccw::orb::{actl, cstat, dstat, fctl, stctl, Irb, Orb, OrbControls};
use vccw::runner::{Stack, Wait};

const T: Duration = Duration::from_secs(10);
const CE_DE: u8 = dstat::CHANNEL_END | dstat::DEVICE_END;

/// `dasdseq -expert <image> -lrecl 4096 -abs <cyl> <head> <tracks> <out>`: the data blocks
/// of the tracks as 4096-byte records, concatenated.
fn dasdseq(image: &Path, cyl: u32, head: u32, tracks: u32, out: &Path) -> Vec<u8> {
    let o = Proc::new(tool("dasdseq"))
        .arg("-expert")
        .arg(image)
        .args([
            "-lrecl",
            "4096",
            "-abs",
            &cyl.to_string(),
            &head.to_string(),
            &tracks.to_string(),
        ])
        .arg(out)
        .output()
        .expect("run dasdseq");
    assert!(
        o.status.success(),
        "dasdseq failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).expect("dasdseq output")
}

/// Guest memory: 0..1 MiB holds programs and parameters, 1..3 MiB data (a separate
/// mapping, so a test can unmap it alone).
const DATA: u64 = 0x10_0000;

struct Rig {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stack: Stack,
}

fn store() -> IommuStore {
    let s = IommuStore::new(StoreConfig::default());
    s.map_dma(0, DATA, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    s.map_dma(DATA, 0x20_0000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    s
}

/// A `dasdinit` volume (or one made by `CkdImage::create_3390`) behind the whole stack.
fn rig_on(cyls: u32, hercules: bool, write: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.3390");
    if hercules {
        dasdinit(&path, "E2E001", cyls);
    } else {
        drop(CkdImage::create_3390(&path, cyls, Some("E2E001")).unwrap());
    }
    let opts = Dasd3390Options {
        open: CkdOpenOptions {
            read_only: !write,
            sync_writes: false,
        },
        devnum: 0x200,
    };
    let dev = Dasd3390::open(&path, opts).unwrap();
    let stack = Stack::new(Box::new(dev), store(), vccw::css::SpinPolicy::OFF).unwrap();
    Rig {
        _dir: dir,
        path,
        stack,
    }
}

fn rig(write: bool) -> Rig {
    rig_on(3, true, write)
}

impl Rig {
    fn mem(&self) -> &IommuStore {
        self.stack.store()
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem().write(addr, bytes).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem().read(addr, &mut b).unwrap();
        b
    }

    fn ccw(&self, addr: u64, cmd: u8, flags: CcwFlags, count: u16, cda: u64) {
        let c = Ccw1 {
            cmd,
            flags,
            count,
            cda: cda as u32,
        };
        self.put(addr, &c.to_bytes());
    }

    /// A format-2 IDAL at `at` for `len` bytes in 4 KiB blocks starting at `pages[i]`.
    fn idal(&self, at: u64, pages: &[u64]) {
        let b: Vec<u8> = pages.iter().flat_map(|p| p.to_be_bytes()).collect();
        self.put(at, &b);
    }

    /// Runs the program at `cpa`, checks the eventfd was signalled and the device is idle
    /// with no pins; returns the final IRB.
    fn run(&mut self, cpa: u32) -> Irb {
        self.run_orb(&orb(cpa, 0))
    }

    fn run_orb(&mut self, o: &Orb) -> Irb {
        self.stack.start(o).expect("start accepted");
        // The IO eventfd fires (blocking wait), and the region holds the IRB.
        let n = self.stack.wait_irq(Wait::Block, T).expect("IO eventfd");
        assert!(n >= 1);
        let irb = self.stack.irb().unwrap();
        assert!(vccw::runner::is_final(&irb.scsw), "{irb:?}");
        assert_eq!(self.stack.device().state(), State::Idle);
        assert_eq!(self.mem().stats().pinned_pages, 0, "pins left after I/O");
        irb
    }
}

/// A Linux-like ORB: format 1, prefetch, format-2 IDAWs (c64), LPM 0x80.
fn orb(cpa: u32, key: u8) -> Orb {
    Orb {
        intparm: 0x0DA5_D0DA,
        ctl: OrbControls::new()
            .with_key(key)
            .with_format1(true)
            .with_prefetch(true)
            .with_format2_idaw(true)
            .with_lpm(0x80),
        cpa,
    }
}

fn cc() -> CcwFlags {
    CcwFlags::new().with_cc(true)
}

fn de(mask: u8, bcyl: u16, bhead: u16, ecyl: u16, ehead: u16, blksize: u16) -> Vec<u8> {
    vccw::client::workload::define_extent(mask, (bcyl, bhead), (ecyl, ehead), blksize).to_vec()
}

fn lr(oper: u8, count: u8, cyl: u16, head: u16, rec: u8, tlf: u16) -> Vec<u8> {
    vccw::client::workload::locate_record(oper, count, cyl, head, rec, tlf).to_vec()
}

/// Prefix (format 1: Define Extent + Locate Record Extended), 64 bytes, as Linux builds it
/// for controllers that support it.
fn prefix(de: &[u8], lr: &[u8]) -> Vec<u8> {
    let mut p = vec![0x01, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut dx = de.to_vec();
    dx.resize(32, 0);
    p.extend_from_slice(&dx);
    p.extend_from_slice(lr);
    p.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(p.len(), 64);
    p
}

fn count_field(cyl: u16, head: u16, rec: u8, dl: u16) -> Vec<u8> {
    let mut d = cyl.to_be_bytes().to_vec();
    d.extend_from_slice(&head.to_be_bytes());
    d.extend_from_slice(&[rec, 0]);
    d.extend_from_slice(&dl.to_be_bytes());
    d
}

fn ebcdic(s: &str) -> Vec<u8> {
    vccw::image::ckd::ebcdic_label(s)
}

fn vol1() -> Vec<u8> {
    let mut v = ebcdic("VOL1E2E001");
    v.push(0x40);
    v
}

fn pattern(rec: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7) ^ rec.wrapping_mul(0x35))
        .collect()
}

#[test]
fn define_extent_locate_record_read_data_reads_vol1_through_an_idal() {
    let mut r = rig(false);
    r.put(0x2000, &de(0x40, 0, 0, 2, 14, 0));
    r.put(0x2010, &lr(0x06, 1, 0, 0, 3, 0));
    // Read Data MT (0x86) of the 80-byte VOL1 record into a buffer that starts 40 bytes
    // before a page end: the IDAL's two IDAWs split it over two distant pages.
    let (a, b) = (DATA + 0x5000 - 40, DATA + 0x9000);
    r.idal(0x3000, &[a, b]);
    r.put(a, &[0xEE; 40]);
    r.put(b, &[0xEE; 100]);
    r.ccw(0x1000, 0x63, cc(), 16, 0x2000);
    r.ccw(0x1008, 0x47, cc(), 16, 0x2010);
    r.ccw(0x1010, 0x86, CcwFlags::new().with_ida(true), 80, 0x3000);
    let irb = r.run(0x1000);
    let s = irb.scsw;
    assert_eq!((s.dstat, s.cstat, s.count), (CE_DE, 0, 0), "{irb:?}");
    assert_eq!(s.cpa, 0x1018, "CPA is the guest's: last CCW + 8");
    assert_eq!(s.flags.fctl(), fctl::START);
    assert_eq!(
        s.flags.stctl(),
        stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
    );
    let mut got = r.get(a, 40);
    got.extend(r.get(b, 40));
    assert_eq!(&got[..11], &vol1()[..]);
    assert_eq!(&got[41..49], &ebcdic("HERCULES")[..]);
    // Nothing outside the two pieces was touched.
    assert_eq!(r.get(b + 40, 60), vec![0xEE; 60]);
    assert_eq!(r.get(a - 8, 8), vec![0; 8]);
}

#[test]
fn classic_seek_search_tic_read_loop() {
    let mut r = rig(false);
    r.put(0x3000, &[0, 0, 0, 0, 0, 0]);
    r.put(0x3008, &[0, 0, 0, 0, 3]);
    r.ccw(0x1000, 0x07, cc(), 6, 0x3000);
    r.ccw(0x1008, 0x31, cc(), 5, 0x3008);
    r.ccw(0x1010, 0x08, CcwFlags::new(), 0, 0x1008);
    r.ccw(0x1018, 0x06, CcwFlags::new().with_sli(true), 4096, DATA);
    let irb = r.run(0x1000);
    assert_eq!(
        (irb.scsw.dstat, irb.scsw.cstat, irb.scsw.cpa),
        (CE_DE, 0, 0x1020)
    );
    assert_eq!(irb.scsw.count, 4096 - 80, "residual of an 80-byte record");
    assert_eq!(&r.get(DATA, 11), &vol1()[..]);
    // A record that does not exist: the loop ends at the second index point with unit
    // check, no record found (sense byte 1 bit 4), the sense in the IRB's ECW.
    r.put(0x3008, &[0, 0, 0, 0, 9]);
    let irb = r.run(0x1000);
    assert_eq!(irb.scsw.dstat, CE_DE | dstat::UNIT_CHECK, "{irb:?}");
    let sense = irb.concurrent_sense().expect("concurrent sense");
    assert_eq!(sense[1] & 0x08, 0x08, "no record found: {sense:02x?}");
    assert_eq!(irb.scsw.cpa, 0x1010, "ended on the search");
}

/// Formats cylinder 1 head 0 with twelve 4 KiB records (Write CKD with count fields only,
/// SLI, as Linux's format does), writes three records with Prefix + Write Data MT through
/// IDALs, reads them back with Define Extent + Locate Record + Read Data MT, and checks the
/// image with Hercules `dasdseq`.
#[test]
fn format_write_and_read_back_4k_blocks_checked_by_dasdseq() {
    let mut r = rig(true);
    // Format: DE (mask 0xC0 allows all writes), LR format (0x03) of 12 records.
    r.put(0x2000, &de(0xC0, 1, 0, 1, 0, 4096));
    r.put(0x2010, &lr(0x03, 12, 1, 0, 0, 4096));
    r.ccw(0x1000, 0x63, cc(), 16, 0x2000);
    r.ccw(0x1008, 0x47, cc(), 16, 0x2010);
    for i in 0..12u8 {
        let at = 0x4000 + 8 * i as u64;
        r.put(at, &count_field(1, 0, i + 1, 4096));
        let last = i == 11;
        let f = CcwFlags::new().with_sli(true).with_cc(!last);
        r.ccw(0x1010 + 8 * i as u64, 0x1D, f, 8, at);
    }
    let irb = r.run(0x1000);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0), "{irb:?}");
    assert_eq!(irb.scsw.cpa, 0x1010 + 12 * 8);

    // Write records 4..6 with Prefix (DE + LR write) + 3 x Write Data MT, one IDAW each, the
    // pages out of order in guest memory.
    let pages = [DATA + 0x7000, DATA + 0x3000, DATA + 0x11000];
    for (i, p) in pages.iter().enumerate() {
        r.put(*p, &pattern(4 + i as u8, 4096));
    }
    r.put(
        0x2100,
        &prefix(&de(0x80, 1, 0, 1, 0, 4096), &lr(0x01, 3, 1, 0, 4, 4096)),
    );
    r.ccw(0x1100, 0xE7, cc(), 64, 0x2100);
    for (i, p) in pages.iter().enumerate() {
        r.idal(0x5000 + 8 * i as u64, &[*p]);
        let f = CcwFlags::new().with_ida(true).with_cc(i < 2);
        r.ccw(0x1108 + 8 * i as u64, 0x85, f, 4096, 0x5000 + 8 * i as u64);
    }
    let irb = r.run(0x1100);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0), "{irb:?}");

    // Read records 3..6 back: DE + LR read (0x06) of 4 records, Read Data MT into IDALs.
    r.put(0x2200, &de(0x40, 1, 0, 1, 0, 4096));
    r.put(0x2210, &lr(0x06, 4, 1, 0, 3, 4096));
    r.ccw(0x1200, 0x63, cc(), 16, 0x2200);
    r.ccw(0x1208, 0x47, cc(), 16, 0x2210);
    let dst = [
        DATA + 0x40000,
        DATA + 0x50000,
        DATA + 0x42000,
        DATA + 0x61000,
    ];
    for (i, p) in dst.iter().enumerate() {
        r.put(*p, &[0xEE; 4096]);
        r.idal(0x6000 + 8 * i as u64, &[*p]);
        let f = CcwFlags::new().with_ida(true).with_cc(i < 3);
        r.ccw(0x1210 + 8 * i as u64, 0x86, f, 4096, 0x6000 + 8 * i as u64);
    }
    let irb = r.run(0x1200);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0), "{irb:?}");
    assert_eq!(irb.scsw.cpa, 0x1230);
    assert_eq!(r.get(dst[0], 4096), vec![0; 4096], "R3 is formatted zeros");
    for i in 0..3 {
        assert_eq!(
            r.get(dst[i + 1], 4096),
            pattern(4 + i as u8, 4096),
            "record {}",
            4 + i
        );
    }

    // Hercules reads the same bytes from the image: 12 blocks of 4096 on (1,0).
    let out = dasdseq(&r.path, 1, 0, 1, &r._dir.path().join("seq.bin"));
    assert_eq!(out.len(), 12 * 4096, "dasdseq block bytes");
    for i in 0..12u8 {
        let blk = &out[i as usize * 4096..(i as usize + 1) * 4096];
        let want = if (3..6).contains(&i) {
            pattern(i + 1, 4096)
        } else {
            vec![0; 4096]
        };
        assert!(blk == &want[..], "record {} differs in the image", i + 1);
    }
}

#[test]
fn vccw_created_volume_reads_the_same_label() {
    let mut r = rig_on(2, false, false);
    r.put(0x2000, &de(0x40, 0, 0, 1, 14, 0));
    r.put(0x2010, &lr(0x06, 1, 0, 0, 3, 0));
    r.ccw(0x1000, 0x63, cc(), 16, 0x2000);
    r.ccw(0x1008, 0x47, cc(), 16, 0x2010);
    r.ccw(0x1010, 0x06, CcwFlags::new(), 80, DATA);
    let irb = r.run(0x1000);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    assert_eq!(&r.get(DATA, 11), &vol1()[..]);
}

/// A 200-CCW read chain that never ends by itself: Seek, 198 Read Data (each record of
/// track 0 in turn, round and round the track) and a TIC back to the first read.
fn long_chain(r: &Rig) {
    r.put(0x3000, &[0; 6]);
    r.ccw(0x1000, 0x07, cc(), 6, 0x3000);
    for i in 0..198u64 {
        let f = CcwFlags::new().with_cc(true).with_sli(true);
        r.ccw(0x1008 + 8 * i, 0x06, f, 256, DATA + 0x1000 * (i % 64));
    }
    r.ccw(0x1008 + 8 * 198, 0x08, CcwFlags::new(), 0, 0x1008);
}

fn wait_running(r: &Rig) {
    // Let the channel get going: some reads must have landed.
    let deadline = Instant::now() + T;
    // The third read (page 2) gets R3, the VOL1 label.
    while r.get(DATA + 0x2000, 4) != vec![0xE5, 0xD6, 0xD3, 0xF1] {
        assert!(Instant::now() < deadline, "the chain never ran");
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(5));
    assert_eq!(r.stack.device().state(), State::CpPending, "still running");
    assert!(r.mem().stats().pinned_pages >= 64);
}

#[test]
fn halt_subchannel_during_a_200_ccw_chain() {
    let mut r = rig(false);
    long_chain(&r);
    r.stack.start(&orb(0x1000, 0)).unwrap();
    wait_running(&r);
    r.stack.halt().expect("HSCH accepted");
    r.stack.wait_irq(Wait::Block, T).expect("halt interrupt");
    let irb = r.stack.irb().unwrap();
    let s = irb.scsw;
    assert_eq!(s.flags.fctl() & fctl::HALT, fctl::HALT, "{irb:?}");
    assert_eq!(
        s.flags.actl() & (actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE),
        0
    );
    assert_ne!(s.flags.stctl() & stctl::STATUS_PENDING, 0);
    // The CPA points into the guest chain.
    assert!((0x1008..=0x1008 + 8 * 199).contains(&s.cpa), "{:#x}", s.cpa);
    assert_eq!(r.stack.device().state(), State::Idle);
    assert_eq!(r.mem().stats().pinned_pages, 0);
    // The device works again.
    long_chain_done_check(&mut r);
}

#[test]
fn clear_subchannel_during_a_200_ccw_chain() {
    let mut r = rig(false);
    long_chain(&r);
    r.stack.start(&orb(0x1000, 0)).unwrap();
    wait_running(&r);
    r.stack.clear().expect("CSCH accepted");
    r.stack.wait_irq(Wait::Block, T).expect("clear interrupt");
    let irb = r.stack.irb().unwrap();
    let s = irb.scsw;
    assert_eq!(s.flags.fctl(), fctl::CLEAR, "{irb:?}");
    assert_eq!(s.flags.actl(), 0);
    assert_eq!(
        (s.dstat, s.cstat),
        (0, 0),
        "clear status has no device status"
    );
    assert_eq!(r.stack.device().state(), State::Idle);
    assert_eq!(r.mem().stats().pinned_pages, 0);
    long_chain_done_check(&mut r);
}

/// After a halt/clear/reset the device runs a plain program again.
fn long_chain_done_check(r: &mut Rig) {
    r.put(0x3100, &[0xFF; 8]);
    r.ccw(0x1800, 0xE4, CcwFlags::new().with_sli(true), 8, 0x3100);
    let irb = r.run(0x1800);
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0));
    assert_eq!(&r.get(0x3100, 4), &[0xFF, 0x39, 0x90, 0xE9]);
}

#[test]
fn unmap_of_pinned_pages_during_io_resets_the_device() {
    let mut r = rig(false);
    long_chain(&r);
    r.stack.start(&orb(0x1000, 0)).unwrap();
    wait_running(&r);
    // The data mapping is pinned by the running program: the unmap tells the device, which
    // resets (quiescing the subchannel and dropping the program), and then completes.
    let t0 = Instant::now();
    let n = r
        .mem()
        .unmap_dma(DATA, 0x20_0000, false)
        .expect("unmap completes");
    assert_eq!(n, 0x20_0000);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "unmap waited for a timeout"
    );
    assert_eq!(r.mem().stats().pinned_pages, 0);
    assert_eq!(r.mem().stats().mappings, 1);
    assert_eq!(r.stack.device().state(), State::Idle);
    assert!(!r.stack.device().has_program());
    // Whatever the reset's CLEAR presented was signalled; a client reads and drops it.
    let _ = r.stack.take_irq().unwrap();
    // The unmapped data area is now refused at translation (EFAULT-class errno, no start).
    let e = r.stack.start(&orb(0x1000, 0)).unwrap_err();
    assert!(e.errno() > 0, "{e:?}");
    assert_eq!(r.stack.device().state(), State::Idle);
    // Remapped, the device runs again.
    r.mem()
        .map_dma(DATA, 0x20_0000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    long_chain_done_check(&mut r);
}

#[test]
fn storage_key_mismatch_is_a_protection_check() {
    let mut r = rig(false);
    // The page holding the input area has storage key 3 (no fetch protection); the ORB
    // runs with key 2: the store of the read data is refused.
    r.mem().set_storage_key(DATA + 0x8000, 0x30).unwrap();
    r.put(DATA + 0x8000, &[0xEE; 80]);
    r.put(0x2000, &de(0x40, 0, 0, 2, 14, 0));
    r.put(0x2010, &lr(0x06, 1, 0, 0, 3, 0));
    r.ccw(0x1000, 0x63, cc(), 16, 0x2000);
    r.ccw(0x1008, 0x47, cc(), 16, 0x2010);
    r.ccw(0x1010, 0x06, CcwFlags::new(), 80, DATA + 0x8000);
    let irb = r.run_orb(&orb(0x1000, 2));
    assert_eq!(
        irb.scsw.cstat & cstat::PROTECTION_CHECK,
        cstat::PROTECTION_CHECK,
        "{irb:?}"
    );
    assert_eq!(irb.scsw.flags.key(), 2);
    assert_eq!(irb.scsw.cpa, 0x1018, "the read CCW + 8");
    assert_eq!(r.get(DATA + 0x8000, 80), vec![0xEE; 80], "nothing stored");
    // The same program with the matching key, and with key 0, stores the label.
    for key in [3, 0] {
        let irb = r.run_orb(&orb(0x1000, key));
        assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (CE_DE, 0), "key {key}");
        assert_eq!(&r.get(DATA + 0x8000, 11), &vol1()[..]);
        r.put(DATA + 0x8000, &[0xEE; 80]);
    }
}

#[test]
fn invalid_ccw_reached_by_a_status_modifier_skip_is_a_program_check() {
    let mut r = rig(false);
    // Seek, Search ID Equal (satisfied: status modifier), TIC, and in the skip slot a CCW
    // with command code 0: the translator makes it a trap, the channel meets it at run time.
    r.put(0x3000, &[0; 6]);
    r.put(0x3008, &[0, 0, 0, 0, 3]);
    r.ccw(0x1000, 0x07, cc(), 6, 0x3000);
    r.ccw(0x1008, 0x31, cc(), 5, 0x3008);
    r.ccw(0x1010, 0x08, CcwFlags::new(), 0, 0x1008);
    r.ccw(0x1018, 0x00, CcwFlags::new(), 80, DATA);
    let irb = r.run(0x1000);
    assert_eq!(irb.scsw.cstat, cstat::PROGRAM_CHECK, "{irb:?}");
    assert_eq!(irb.scsw.cpa, 0x1020, "the trap slot + 8, in guest terms");
    assert_eq!(
        irb.scsw.flags.stctl() & stctl::ALERT,
        stctl::ALERT,
        "program check is alert status"
    );
    // A search that fails to match never reaches the slot: the loop ends normally.
    r.put(0x3008, &[0, 0, 0, 0, 9]);
    let irb = r.run(0x1000);
    assert_eq!(irb.scsw.cstat & cstat::PROGRAM_CHECK, 0, "{irb:?}");
    assert_eq!(irb.scsw.dstat, CE_DE | dstat::UNIT_CHECK);
}

#[test]
fn spin_wait_sees_the_same_interrupt() {
    let mut r = rig(false);
    r.put(0x3100, &[0; 8]);
    r.ccw(0x1800, 0xE4, CcwFlags::new().with_sli(true), 8, 0x3100);
    for _ in 0..50 {
        r.stack.start(&orb(0x1800, 0)).unwrap();
        assert_eq!(r.stack.wait_irq(Wait::Spin, T).unwrap(), 1);
        let irb = r.stack.irb().unwrap();
        assert_eq!((irb.scsw.dstat, irb.scsw.cpa), (CE_DE, 0x1808));
        assert!(!r.stack.take_irq().unwrap(), "one signal per I/O");
    }
    assert_eq!(&r.get(0x3100, 6), &[0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90]);
}
