//! Interoperability with the real Hercules tools: images made by `dasdinit` open in vccw,
//! records written through the 3390 model's channel commands read back with `dasdseq`.
//!
//! These tests need the Hercules utilities (`apt-get install hercules`); they fail, not skip,
//! when the tools are missing.

mod common;
use common::{dasdinit, tool};

use std::path::Path;
use std::process::Command as Proc;

use vccw::ccw::CommandKind;
use vccw::css::{Command, DeviceModel, Outcome};
use vccw::devices::dasd3390::{Dasd3390, Dasd3390Options, DasdError};
use vccw::image::ckd::{ascii_label, ebcdic_label, CkdError, CkdImage, CkdOpenOptions};
use vccw::orb::dstat;

/// `dasdseq -expert -ascii <image> -abs <cyl> <head> <tracks> <out>`: the blocks of the
/// extent as 80-byte records translated to ASCII, one per line.
fn dasdseq(image: &Path, cyl: u32, head: u32, tracks: u32, out: &Path) -> Vec<String> {
    let o = Proc::new(tool("dasdseq"))
        .arg("-expert")
        .arg("-ascii")
        .arg(image)
        .args([
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
        "dasdseq failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read_to_string(out)
        .expect("dasdseq output")
        .lines()
        .map(str::to_string)
        .collect()
}

struct Prog<'a> {
    dev: &'a mut Dasd3390,
    seq: u32,
    prev: Option<u8>,
}

impl<'a> Prog<'a> {
    fn new(dev: &'a mut Dasd3390) -> Self {
        dev.start_program();
        Prog {
            dev,
            seq: 0,
            prev: None,
        }
    }

    fn io(&mut self, code: u8, mut buf: Vec<u8>) -> (Outcome, Vec<u8>) {
        let cmd = Command {
            code,
            kind: CommandKind::of(code),
            count: buf.len(),
            chained: self.seq > 0,
            prev_code: self.prev,
            seq: self.seq,
        };
        let o = self.dev.execute(&cmd, &mut buf);
        self.seq += 1;
        self.prev = Some(code);
        buf.truncate(o.transferred);
        (o, buf)
    }

    fn ok(&mut self, code: u8, buf: Vec<u8>) -> Vec<u8> {
        let (o, b) = self.io(code, buf);
        assert_eq!(
            o.status & dstat::UNIT_CHECK,
            0,
            "command {code:#04x} failed, sense {:02x?}",
            self.dev.sense()
        );
        b
    }

    /// Search ID Equal with a TIC back to it until status modifier.
    fn search(&mut self, id: Vec<u8>) {
        for _ in 0..20 {
            let (o, _) = self.io(0x31, id.clone());
            assert_eq!(o.status & dstat::UNIT_CHECK, 0, "search failed");
            if o.status & dstat::STATUS_MODIFIER != 0 {
                return;
            }
        }
        panic!("search did not end");
    }
}

fn de(mask: u8, cyl: u16, blksize: u16) -> Vec<u8> {
    vccw::client::workload::define_extent(mask, (cyl, 0), (cyl, 14), blksize).to_vec()
}

fn lr(oper: u8, count: u8, cyl: u16, head: u16, rec: u8, tlf: u16) -> Vec<u8> {
    vccw::client::workload::locate_record(oper, count, cyl, head, rec, tlf).to_vec()
}

fn ckd(cyl: u16, head: u16, rec: u8, data: &[u8]) -> Vec<u8> {
    let mut d = cyl.to_be_bytes().to_vec();
    d.extend_from_slice(&head.to_be_bytes());
    d.extend_from_slice(&[rec, 0]);
    d.extend_from_slice(&(data.len() as u16).to_be_bytes());
    d.extend_from_slice(data);
    d
}

fn id(cyl: u16, head: u16, rec: u8) -> Vec<u8> {
    let mut d = cyl.to_be_bytes().to_vec();
    d.extend_from_slice(&head.to_be_bytes());
    d.push(rec);
    d
}

/// A 160-byte block of two 80-byte EBCDIC card images.
fn block(a: &str, b: &str) -> Vec<u8> {
    let mut v = ebcdic_label(&format!("{a:<80}"));
    v.extend(ebcdic_label(&format!("{b:<80}")));
    v
}

fn open(path: &Path) -> Dasd3390 {
    Dasd3390::open(
        path,
        Dasd3390Options {
            open: CkdOpenOptions {
                read_only: false,
                sync_writes: true,
            },
            devnum: 0x0190,
        },
    )
    .expect("open dasdinit image")
}

#[test]
fn dasdinit_image_is_what_vccw_creates() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.ckd");
    let ours = dir.path().join("ours.ckd");
    dasdinit(&theirs, "VOL001", 3);
    drop(CkdImage::create_3390(&ours, 3, Some("VOL001")).unwrap());
    let a = std::fs::read(&theirs).unwrap();
    let b = std::fs::read(&ours).unwrap();
    assert_eq!(a.len(), b.len());
    // Newer Hercules versions fill the header serial number (bytes 20-31); all else matches.
    assert_eq!(&a[..20], &b[..20]);
    let first_diff = a[32..].iter().zip(&b[32..]).position(|(x, y)| x != y);
    assert_eq!(
        first_diff,
        None,
        "images differ at offset {:?}",
        first_diff.map(|d| d + 32)
    );
}

#[test]
fn reads_the_volume_label_of_a_dasdinit_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.ckd");
    dasdinit(&path, "LINUX1", 5);
    let mut dev = open(&path);
    assert_eq!(dev.cylinders(), 5);
    let mut p = Prog::new(&mut dev);
    let sid = p.ok(0xE4, vec![0; 20]);
    assert_eq!(&sid[..7], &[0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90, 0x02]);
    let rdc = p.ok(0x64, vec![0; 64]);
    assert_eq!(&rdc[12..16], &[0, 5, 0, 15]);
    // ECKD: Define Extent + Locate Record + Read Key and Data of R3.
    p.ok(0x63, de(0x40, 0, 0));
    p.ok(0x47, lr(0x06, 1, 0, 0, 3, 0));
    let kd = p.ok(0x0E, vec![0; 84]);
    assert_eq!(ascii_label(&kd[..14]), "VOL1VOL1LINUX1");
    // Classic: Seek + Search ID Equal + TIC + Read Data.
    let mut p = Prog::new(&mut dev);
    p.ok(0x07, vec![0; 6]);
    p.search(id(0, 0, 3));
    let data = p.ok(0x06, vec![0; 80]);
    assert_eq!(ascii_label(&data[..10]), "VOL1LINUX1");
    assert_eq!(ascii_label(&data[41..49]), "HERCULES");
}

#[test]
fn records_written_through_the_model_read_back_with_dasdseq() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.ckd");
    dasdinit(&path, "DATA01", 5);
    let mut dev = open(&path);

    // ECKD format write on (1,0): three 160-byte blocks after R0.
    let mut p = Prog::new(&mut dev);
    p.ok(0x63, de(0xC0, 1, 160));
    p.ok(0x47, lr(0x03, 3, 1, 0, 0, 0));
    for r in 1..=3u8 {
        p.ok(
            0x1D,
            ckd(
                1,
                0,
                r,
                &block(&format!("ECKD {r} A"), &format!("ECKD {r} B")),
            ),
        );
    }
    // ECKD update of block 2: Define Extent + Locate Record (write data) + Write Update Data.
    let mut p = Prog::new(&mut dev);
    p.ok(0x63, de(0x80, 1, 160));
    p.ok(0x47, lr(0x01, 1, 1, 0, 2, 160));
    p.ok(0x85, block("UPDATED 2 A", "UPDATED 2 B"));

    // Classic CKD on (1,1): Seek, Search ID Equal R0 + TIC, Write CKD x2, end-of-file record.
    let mut p = Prog::new(&mut dev);
    p.ok(0x1F, vec![0xC0]);
    p.ok(0x07, vec![0, 0, 0, 1, 0, 1]);
    p.search(id(1, 1, 0));
    p.ok(0x1D, ckd(1, 1, 1, &block("CLASSIC 1 A", "CLASSIC 1 B")));
    p.ok(0x1D, ckd(1, 1, 2, &block("CLASSIC 2 A", "CLASSIC 2 B")));
    p.ok(0x1D, ckd(1, 1, 3, &[]));
    // Classic update: Seek, Search ID Equal R1 + TIC, Write Data.
    let mut p = Prog::new(&mut dev);
    p.ok(0x07, vec![0, 0, 0, 1, 0, 1]);
    p.search(id(1, 1, 1));
    p.ok(0x05, block("REWRITTEN 1 A", "REWRITTEN 1 B"));
    drop(dev);

    let lines = dasdseq(&path, 1, 0, 2, &dir.path().join("out.txt"));
    assert_eq!(
        lines,
        [
            "ECKD 1 A",
            "ECKD 1 B",
            "UPDATED 2 A",
            "UPDATED 2 B",
            "ECKD 3 A",
            "ECKD 3 B",
            "REWRITTEN 1 A",
            "REWRITTEN 1 B",
            "CLASSIC 2 A",
            "CLASSIC 2 B",
        ]
    );
}

#[test]
fn refuses_a_truncated_image_and_a_bad_magic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.ckd");
    dasdinit(&path, "VOL001", 2);
    let bytes = std::fs::read(&path).unwrap();

    let cut = dir.path().join("cut.ckd");
    std::fs::write(&cut, &bytes[..bytes.len() - 56832 * 3]).unwrap();
    let e = Dasd3390::open(&cut, Dasd3390Options::default()).unwrap_err();
    assert!(
        matches!(e, DasdError::Image(CkdError::PartialCylinder { .. })),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EINVAL);
    std::fs::write(&cut, &bytes[..300]).unwrap();
    assert!(matches!(
        CkdImage::open(&cut, CkdOpenOptions::default()),
        Err(CkdError::Truncated { len: 300 })
    ));

    let bad = dir.path().join("bad.ckd");
    let mut b = bytes.clone();
    b[..8].copy_from_slice(b"FBA_P370");
    std::fs::write(&bad, &b).unwrap();
    let e = Dasd3390::open(&bad, Dasd3390Options::default()).unwrap_err();
    assert!(matches!(e, DasdError::Image(CkdError::BadMagic(_))), "{e}");
}
