//! Unit tests: every command and error path, driven through `DeviceModel::execute`.

use super::*;
use crate::ccw::CommandKind;
use crate::image::ckd::{ebcdic_label, CkdImage};
use crate::orb::dstat::{CHANNEL_END, DEVICE_END, STATUS_MODIFIER, UNIT_CHECK, UNIT_EXCEPTION};

const OK: u8 = CHANNEL_END | DEVICE_END;
const UC: u8 = CHANNEL_END | DEVICE_END | UNIT_CHECK;
const SM: u8 = OK | STATUS_MODIFIER;
const TS: usize = 56832;

struct Vol {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    dev: Dasd3390,
}

fn vol() -> Vol {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.ckd");
    drop(CkdImage::create_3390(&path, 3, Some("VOL001")).unwrap());
    let dev = Dasd3390::open(&path, Dasd3390Options::default()).unwrap();
    Vol {
        _dir: dir,
        path,
        dev,
    }
}

/// Two new volumes: one whose device reads its image through the mapping, and a device on
/// the other that reads through `pread` (the two must agree on everything), with that
/// volume (its directory lives as long as it does).
fn mapped_and_plain() -> (Vol, Vol, Dasd3390) {
    let mapped = vol();
    let plain = vol();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&plain.path)
        .unwrap();
    let img = CkdImage::from_backing(Box::new(file), CkdOpenOptions::default()).unwrap();
    let plain_dev = Dasd3390::new(img, 0).unwrap();
    assert!(mapped.dev.image().is_mapped());
    assert!(!plain_dev.image().is_mapped());
    (mapped, plain, plain_dev)
}

/// One channel program's commands, chained one after the other.
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

    /// Runs `code` with `buf` (output data, or a zeroed input area of its length).
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
        assert!(o.transferred <= buf.len());
        buf.truncate(o.transferred);
        (o, buf)
    }

    fn ok(&mut self, code: u8, buf: Vec<u8>) -> Vec<u8> {
        let (o, b) = self.io(code, buf);
        assert_eq!(
            o.status & UNIT_CHECK,
            0,
            "{code:#04x} failed: {:02x?}",
            self.dev.sense()
        );
        b
    }

    fn read(&mut self, code: u8, n: usize) -> Vec<u8> {
        self.ok(code, vec![0; n])
    }

    /// Runs `code`, expects unit check, returns the sense bytes (read with a Sense command in
    /// a new program, as a driver would).
    fn fails(&mut self, code: u8, buf: Vec<u8>) -> Vec<u8> {
        let (o, _) = self.io(code, buf);
        assert_eq!(o.status, UC, "{code:#04x} should fail");
        assert_eq!(o.transferred, 0);
        self.dev.sense()
    }
}

fn de(mask: u8, bcyl: u16, bhead: u16, ecyl: u16, ehead: u16, blksize: u16) -> Vec<u8> {
    crate::client::workload::define_extent(mask, (bcyl, bhead), (ecyl, ehead), blksize).to_vec()
}

fn de_all(mask: u8) -> Vec<u8> {
    de(mask, 0, 0, 2, 14, 0)
}

fn lr(oper: u8, count: u8, cyl: u16, head: u16, rec: u8, tlf: u16) -> Vec<u8> {
    crate::client::workload::locate_record(oper, count, cyl, head, rec, tlf).to_vec()
}

fn seek_arg(cyl: u16, head: u16) -> Vec<u8> {
    let mut d = vec![0, 0];
    d.extend_from_slice(&cyl.to_be_bytes());
    d.extend_from_slice(&head.to_be_bytes());
    d
}

fn id(cyl: u16, head: u16, rec: u8) -> Vec<u8> {
    let mut d = cyl.to_be_bytes().to_vec();
    d.extend_from_slice(&head.to_be_bytes());
    d.push(rec);
    d
}

fn ckd(cyl: u16, head: u16, rec: u8, key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut d = id(cyl, head, rec);
    d.push(key.len() as u8);
    d.extend_from_slice(&(data.len() as u16).to_be_bytes());
    d.extend_from_slice(key);
    d.extend_from_slice(data);
    d
}

fn vol1_data() -> Vec<u8> {
    crate::image::ckd::vol1_label("VOL001").unwrap().to_vec()
}

fn file_track(path: &std::path::Path, cyl: usize, head: usize) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let off = 512 + (cyl * 15 + head) * TS;
    b[off..off + TS].to_vec()
}

fn is_reject(s: &[u8], msg: u8) -> bool {
    s[0] == SENSE_CR && s[7] == msg
}

// ----- identification --------------------------------------------------------------------

#[test]
fn sense_id_answers_3990_e9_3390() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    let b = p.read(0xE4, 20);
    assert_eq!(&b[..8], &[0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90, 0x02, 0x00]);
    assert_eq!(&b[8..12], &[0x40, 0xFA, 0x01, 0x00]);
    let (o, b) = p.io(0xE4, vec![0; 7]);
    assert_eq!((o.status, o.transferred, o.more), (OK, 7, true));
    assert_eq!(b, v_identity_bytes());
    let (o, _) = p.io(0xE4, vec![0; 40]);
    assert_eq!((o.transferred, o.more), (20, false));
}

fn v_identity_bytes() -> Vec<u8> {
    DeviceIdentity {
        cu_type: 0x3990,
        cu_model: 0xE9,
        dev_type: 0x3390,
        dev_model: 0x02,
    }
    .sense_id_bytes()
    .to_vec()
}

#[test]
fn identity_matches_sense_id() {
    let v = vol();
    assert_eq!(
        v.dev.identity().sense_id_bytes().to_vec(),
        v_identity_bytes()
    );
}

#[test]
fn read_device_characteristics_and_configuration_data() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    let b = p.read(0x64, 64);
    assert_eq!(b, device_characteristics(0x02, 3).to_vec());
    assert_eq!(&b[12..14], &[0, 3]);
    assert_eq!(&b[60..64], &[0, 0, 0, 3]);
    let b = p.read(0xFA, 256);
    assert_eq!(&b[0..4], &[0xDC, 0x01, 0x01, 0x00]);
}

#[test]
fn sense_reports_position_and_clears() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(2, 5));
    let s = p.read(0x04, 32);
    assert_eq!(s[0], 0);
    assert_eq!(s[27], 0x80);
    assert_eq!(&s[29..32], &[0, 2, 5]);
    // A command reject is reported once, then the sense is clear again.
    let s = p.fails(0x01, vec![0; 8]);
    assert!(is_reject(&s, MSG_INVALID_COMMAND));
    let s = p.read(0x04, 32);
    assert_eq!(&s[..8], &[0x80, 0, 0, 0, 0, 2, 5, 0x01]);
    let s = p.read(0x04, 32);
    assert_eq!(s[0], 0);
    // A short sense area gets the first bytes and "more".
    let (o, _) = p.io(0x04, vec![0; 24]);
    assert_eq!((o.transferred, o.more), (24, true));
}

#[test]
fn unknown_commands_are_rejected() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    for code in [0x01, 0x0D, 0x27, 0x3E, 0x0C, 0x82] {
        let s = p.fails(code, vec![0; 8]);
        assert!(is_reject(&s, MSG_INVALID_COMMAND), "{code:#x}");
    }
}

#[test]
fn nop_and_its_rejection_in_a_domain() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    let (o, _) = p.io(0x03, vec![]);
    assert_eq!(o.status, OK);
    p.ok(0x63, de_all(0x00));
    p.ok(0x47, lr(0x06, 1, 0, 0, 3, 0));
    let s = p.fails(0x03, vec![]);
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
}

#[test]
fn not_ready_is_intervention_required() {
    let mut v = vol();
    v.dev.set_ready(false);
    let mut p = Prog::new(&mut v.dev);
    let s = p.fails(0x07, seek_arg(0, 0));
    assert_eq!(s[0], SENSE_IR);
    p.read(0xE4, 20);
    p.dev.set_ready(true);
    p.ok(0x07, seek_arg(0, 0));
}

// ----- ECKD: Define Extent + Locate Record ------------------------------------------------

#[test]
fn locate_record_read_data_reads_the_volume_label() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de_all(0x40));
    p.ok(0x47, lr(0x06, 2, 0, 0, 3, 0));
    assert_eq!(p.read(0x06, 80), vol1_data());
    // The domain's second command: R3 is the last record, so the next is R1 after the index.
    let b = p.read(0x0E, 28);
    assert_eq!(&b[..4], &ebcdic_label("IPL1")[..]);
    assert_eq!(&b[4..12], &[0x00, 0x06, 0, 0, 0, 0, 0, 0x0F]);
    // Domain exhausted: read commands are now outside it and still allowed.
    assert_eq!(p.read(0x12, 8), vec![0, 0, 0, 0, 2, 4, 0, 0x90]);
}

#[test]
fn locate_record_read_count_as_linux_analysis_does() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 0, 1, 0));
    p.ok(0x47, lr(0x06, 4, 0, 0, 0, 0));
    let counts: Vec<Vec<u8>> = (0..4).map(|_| p.read(0x12, 8)).collect();
    assert_eq!(counts[0], vec![0, 0, 0, 0, 1, 4, 0, 0x18]);
    assert_eq!(counts[1], vec![0, 0, 0, 0, 2, 4, 0, 0x90]);
    assert_eq!(counts[2], vec![0, 0, 0, 0, 3, 4, 0, 0x50]);
    // Past the end of the track once: back to R1 (not an error the first time).
    assert_eq!(counts[3], vec![0, 0, 0, 0, 1, 4, 0, 0x18]);
    p.ok(0x47, lr(0x06, 1, 0, 1, 0, 0));
    let s = p.fails(0x12, vec![0; 8]);
    // Track 1 has only R0: the search passes the index twice -> no record found.
    assert_eq!(s[1], SENSE1_NRF);
}

/// Formats (0,1) with three 4096-byte records, then updates R2 as Linux does.
#[test]
fn format_then_write_data_then_read_back() {
    let mut v = vol();
    {
        let mut p = Prog::new(&mut v.dev);
        p.ok(0x63, de(0xC0, 0, 1, 0, 1, 4096));
        p.ok(0x47, lr(0x03, 3, 0, 1, 0, 4096));
        for r in 1..=3u8 {
            let b = p.ok(0x1D, ckd(0, 1, r, &[], &[r; 4096]));
            assert_eq!(b.len(), 8 + 4096);
        }
    }
    {
        let mut p = Prog::new(&mut v.dev);
        p.ok(0x63, de(0x80, 0, 1, 0, 1, 4096));
        p.ok(0x47, lr(0x01, 1, 0, 1, 2, 4096));
        let (o, _) = p.io(0x85, vec![0xAB; 4096]);
        assert_eq!((o.status, o.transferred, o.more), (OK, 4096, false));
    }
    // Durable as soon as status was presented: the file already holds it.
    let t = file_track(&v.path, 0, 1);
    let r2 = 5 + 16 + (8 + 4096) + 8;
    assert_eq!(&t[r2 - 8..r2], &[0, 0, 0, 1, 2, 0, 0x10, 0]);
    assert!(t[r2..r2 + 4096].iter().all(|&b| b == 0xAB));
    assert!(t[r2 + 4096 + 8..r2 + 2 * 4096 + 8].iter().all(|&b| b == 3));
    let end = 5 + 16 + 3 * (8 + 4096);
    assert_eq!(&t[end..end + 8], &[0xFF; 8]);
    {
        let mut p = Prog::new(&mut v.dev);
        p.ok(0x63, de(0x40, 0, 1, 0, 1, 4096));
        p.ok(0x47, lr(0x06, 3, 0, 1, 1, 4096));
        assert_eq!(p.read(0x86, 4096), vec![1; 4096]);
        assert_eq!(p.read(0x86, 4096), vec![0xAB; 4096]);
        assert_eq!(p.read(0x86, 4096), vec![3; 4096]);
    }
}

#[test]
fn write_data_in_a_write_domain_checks_tlf_and_position() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x80, 0, 0, 2, 14, 0));
    // R3 (VOL1) has 80 data bytes; a TLF of 4096 does not match: invalid track format.
    p.ok(0x47, lr(0x01, 1, 0, 0, 3, 4096));
    let s = p.fails(0x85, vec![0; 4096]);
    assert_eq!(s[1], SENSE1_ITF);
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x80, 0, 0, 2, 14, 0));
    p.ok(0x47, lr(0x01, 1, 0, 0, 3, 80));
    let mut label = vol1_data();
    label[4..10].copy_from_slice(&ebcdic_label("NEWVOL"));
    let (o, _) = p.io(0x05, label[..40].to_vec());
    // Short data is padded with zeros; the device wanted 80.
    assert_eq!((o.status, o.transferred, o.more), (OK, 40, true));
    let t = file_track(&v.path, 0, 0);
    assert_eq!(&t[305 - 80..305 - 74], &ebcdic_label("VOL1NE")[..]);
    assert!(t[305 - 40..305].iter().all(|&b| b == 0));
}

#[test]
fn define_extent_parameter_and_sequence_errors() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    let s = p.fails(0x63, de_all(0)[..10].to_vec());
    assert!(is_reject(&s, MSG_COUNT_TOO_SMALL));
    // End before begin.
    let s = p.fails(0x63, de(0, 1, 0, 0, 14, 0));
    assert!(is_reject(&s, MSG_INVALID_PARAMETER));
    // Beyond the volume.
    let s = p.fails(0x63, de(0, 0, 0, 3, 0, 0));
    assert!(is_reject(&s, MSG_INVALID_PARAMETER));
    let s = p.fails(0x63, de(0, 0, 0, 0, 15, 0));
    assert!(is_reject(&s, MSG_INVALID_PARAMETER));
    // Not ECKD mode.
    let mut d = de_all(0);
    d[1] = 0x00;
    let s = p.fails(0x63, d);
    assert!(is_reject(&s, MSG_INVALID_PARAMETER));
    // Reserved mask bit; oversized block size; nonzero bytes 4-6.
    let s = p.fails(0x63, de_all(0x20));
    assert!(is_reject(&s, MSG_INVALID_PARAMETER));
    let s = p.fails(0x63, de(0, 0, 0, 2, 14, 60000));
    assert!(is_reject(&s, MSG_INVALID_PARAMETER));
    let mut d = de_all(0);
    d[5] = 1;
    let s = p.fails(0x63, d);
    assert!(is_reject(&s, MSG_INVALID_PARAMETER));
    // A second Define Extent may narrow with the same mask, not change the mask.
    p.ok(0x63, de(0x40, 0, 0, 1, 14, 0));
    p.ok(0x63, de(0x40, 0, 5, 1, 0, 0));
    let s = p.fails(0x63, de(0x40, 0, 0, 1, 14, 0));
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
    let s = p.fails(0x63, de(0xC0, 0, 5, 1, 0, 0));
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
    // Set File Mask after Define Extent, and Define Extent after Set File Mask.
    let s = p.fails(0x1F, vec![0]);
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0xC0]);
    let s = p.fails(0x63, de_all(0));
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
}

#[test]
fn extent_is_enforced_as_file_protect() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x00, 1, 0, 1, 14, 0));
    let s = p.fails(0x07, seek_arg(0, 0));
    assert_eq!(&s[..2], &[0, SENSE1_FP]);
    let s = p.fails(0x47, lr(0x06, 1, 2, 0, 0, 0));
    assert_eq!(&s[..2], &[0, SENSE1_FP]);
    p.ok(0x07, seek_arg(1, 14));
    // Multitrack read off the end of the extent: file protected.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x00, 1, 13, 1, 13, 0));
    p.ok(0x07, seek_arg(1, 13));
    let s = p.fails(0x86, vec![0; 8]);
    assert_eq!(s[1], SENSE1_FP);
}

#[test]
fn write_inhibit_masks_reject_writes() {
    let mut v = vol();
    // Define Extent "inhibit all writes": the write domain opens, Write Data is rejected.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 2, 14, 0));
    p.ok(0x47, lr(0x01, 1, 0, 0, 3, 80));
    let s = p.fails(0x05, vec![0; 80]);
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
    // Set File Mask "write update only": Write Data allowed, Write CKD rejected.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0x80]);
    p.ok(0x07, seek_arg(0, 0));
    assert_eq!(search_loop(&mut p, 0x31, id(0, 0, 3)), Ok(4));
    let s = p.fails(0x1D, ckd(0, 0, 4, &[], &[1; 10]));
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
    // Write HA needs "allow all": file protected otherwise.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0x00]);
    p.ok(0x07, seek_arg(0, 1));
    let s = p.fails(0x19, vec![0, 0, 0, 0, 1]);
    assert_eq!(s[1], SENSE1_FP);
    // Set File Mask with a reserved bit, or no byte at all.
    let mut p = Prog::new(&mut v.dev);
    assert!(is_reject(&p.fails(0x1F, vec![0x20]), MSG_INVALID_PARAMETER));
    let mut p = Prog::new(&mut v.dev);
    assert!(is_reject(&p.fails(0x1F, vec![]), MSG_COUNT_TOO_SMALL));
}

#[test]
fn locate_record_parameter_errors() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    // Without Define Extent.
    let s = p.fails(0x47, lr(0x06, 1, 0, 0, 3, 0));
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
    p.ok(0x63, de(0x40, 0, 0, 2, 14, 4096));
    assert!(is_reject(
        &p.fails(0x47, lr(0x06, 1, 0, 0, 3, 0)[..12].to_vec()),
        3
    ));
    // Bad operation code, bad orientation combination, count 0 for a read.
    assert!(is_reject(&p.fails(0x47, lr(0x05, 1, 0, 0, 3, 0)), 4));
    assert!(is_reject(&p.fails(0x47, lr(0xC1, 1, 0, 0, 3, 0)), 4));
    assert!(is_reject(&p.fails(0x47, lr(0x06, 0, 0, 0, 3, 0)), 4));
    // Seek address beyond the volume; sector out of range; TLF over the block size.
    assert!(is_reject(&p.fails(0x47, lr(0x06, 1, 3, 0, 3, 0)), 4));
    let mut d = lr(0x06, 1, 0, 0, 3, 0);
    d[13] = 224;
    assert!(is_reject(&p.fails(0x47, d), 4));
    assert!(is_reject(&p.fails(0x47, lr(0x06, 1, 0, 0, 3, 8192)), 4));
    // Record not on the track.
    let s = p.fails(0x47, lr(0x06, 1, 0, 0, 9, 0));
    assert_eq!(s[1], SENSE1_NRF);
    // Home orientation compares the home address.
    let s = p.fails(
        0x47,
        lr(0x46, 1, 0, 2, 0, 0)
            .iter()
            .enumerate()
            .map(|(i, &b)| if i == 11 { 1 } else { b })
            .collect(),
    );
    assert_eq!(s[1], SENSE1_NRF);
    p.ok(0x47, lr(0x46, 1, 0, 2, 0, 0));
    // Inside the domain: Locate Record, Seek, Sense and Search are out of sequence.
    assert!(is_reject(&p.fails(0x47, lr(0x06, 1, 0, 0, 3, 0)), 2));
}

#[test]
fn commands_out_of_sequence_in_a_domain() {
    let mut v = vol();
    for (code, buf) in [
        (0x07u8, seek_arg(0, 0)),
        (0x04, vec![0; 32]),
        (0x31, id(0, 0, 3)),
        (0x5E, vec![0; 100]),
        (0x1D, ckd(0, 0, 4, &[], &[0; 8])),
        (0x64, vec![0; 64]),
    ] {
        let mut p = Prog::new(&mut v.dev);
        p.ok(0x63, de_all(0xC0));
        p.ok(0x47, lr(0x06, 2, 0, 0, 3, 0));
        let s = p.fails(code, buf);
        assert!(is_reject(&s, MSG_INVALID_SEQUENCE), "{code:#x}");
    }
    // Read and search commands need a positioning command first (3990 rule).
    let mut p = Prog::new(&mut v.dev);
    for code in [0x06u8, 0x12, 0x1E, 0x31, 0x16, 0x1A] {
        let s = p.fails(code, vec![0; 8]);
        assert!(is_reject(&s, MSG_INVALID_SEQUENCE), "{code:#x}");
    }
    // Seek Head needs a Seek first.
    let s = p.fails(0x1B, seek_arg(0, 3));
    assert!(is_reject(&s, MSG_INVALID_SEQUENCE));
    // Write Data / Write CKD / Erase without a Search ID Equal that matched.
    p.ok(0x07, seek_arg(0, 0));
    for (code, buf) in [
        (0x05u8, vec![0; 8]),
        (0x1D, ckd(0, 0, 4, &[], &[0; 8])),
        (0x11, vec![0; 8]),
    ] {
        let s = p.fails(code, buf);
        assert!(is_reject(&s, MSG_INVALID_SEQUENCE), "{code:#x}");
    }
    // Write R0 without Write HA / Search HA; Read Track / Write CKD Next Track outside a domain.
    for (code, buf) in [
        (0x15u8, ckd(0, 0, 0, &[], &[0; 8])),
        (0xDE, vec![0; 100]),
        (0x9D, ckd(0, 1, 1, &[], &[0; 8])),
    ] {
        let s = p.fails(code, buf);
        assert!(is_reject(&s, MSG_INVALID_SEQUENCE), "{code:#x}");
    }
}

// ----- classic CKD: Seek / Search / TIC ----------------------------------------------------

#[test]
fn seek_variants_and_errors() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    assert!(is_reject(
        &p.fails(0x07, vec![0, 0, 0]),
        MSG_COUNT_TOO_SMALL
    ));
    assert!(is_reject(&p.fails(0x07, seek_arg(3, 0)), 4));
    assert!(is_reject(&p.fails(0x07, seek_arg(0, 15)), 4));
    assert!(is_reject(&p.fails(0x07, vec![0, 1, 0, 0, 0, 0]), 4));
    p.ok(0x07, seek_arg(1, 2));
    assert_eq!(p.read(0x1A, 5), vec![0, 0, 1, 0, 2]);
    p.ok(0x1B, seek_arg(2, 7)); // Seek Head keeps the cylinder
    assert_eq!(p.read(0x1A, 5), vec![0, 0, 1, 0, 7]);
    p.ok(0x0B, seek_arg(2, 0));
    assert_eq!(p.read(0x1A, 5), vec![0, 0, 2, 0, 0]);
    // File mask: inhibit seek and multitrack; seek cylinder / head only.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0x18]);
    assert_eq!(p.fails(0x07, seek_arg(0, 0))[1], SENSE1_FP);
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0x08]);
    assert_eq!(p.fails(0x07, seek_arg(0, 0))[1], SENSE1_FP);
    p.ok(0x0B, seek_arg(0, 0));
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0x10]);
    assert_eq!(p.fails(0x0B, seek_arg(0, 0))[1], SENSE1_FP);
}

/// Seek, then `Search ID Equal; TIC *-8` until status modifier or unit check.
fn search_loop(p: &mut Prog<'_>, code: u8, arg: Vec<u8>) -> Result<usize, Vec<u8>> {
    for n in 1..50 {
        let (o, _) = p.io(code, arg.clone());
        if o.status == SM {
            return Ok(n);
        }
        if o.status & UNIT_CHECK != 0 {
            return Err(p.dev.sense());
        }
        assert_eq!(o.status, OK);
    }
    panic!("search loop did not terminate");
}

#[test]
fn search_tic_loop_finds_or_ends_with_no_record_found() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 0));
    // R0 is searched too (Search ID keeps R0): R0, R1, R2, R3 -> found on the 4th.
    assert_eq!(search_loop(&mut p, 0x31, id(0, 0, 3)), Ok(4));
    assert_eq!(p.read(0x06, 80), vol1_data());
    // Absent record: around the track twice, then no record found.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 0));
    let s = search_loop(&mut p, 0x31, id(0, 0, 9)).unwrap_err();
    assert_eq!(&s[..2], &[0, SENSE1_NRF]);
    // High and equal-or-high.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 0));
    assert_eq!(search_loop(&mut p, 0x51, id(0, 0, 1)), Ok(3)); // R2 > R1
    assert_eq!(p.read(0x12, 8)[4], 3);
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 0));
    assert_eq!(search_loop(&mut p, 0x71, id(0, 0, 1)), Ok(2));
    // A short argument compares only the bytes given.
    let (o, _) = p.io(0x31, vec![0, 0]);
    assert_eq!((o.status, o.transferred), (SM, 2));
}

#[test]
fn classic_write_sequence_is_durable() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(1, 3));
    assert_eq!(search_loop(&mut p, 0x31, id(1, 3, 0)), Ok(1));
    let b = p.ok(0x1D, ckd(1, 3, 1, b"KEY1", &[0x11; 100]));
    assert_eq!(b.len(), 112);
    // Write CKD may follow Write CKD.
    p.ok(0x1D, ckd(1, 3, 2, &[], &[0x22; 50]));
    let t = file_track(&v.path, 1, 3);
    assert_eq!(&t[21..29], &[0, 1, 0, 3, 1, 4, 0, 100]);
    assert_eq!(&t[29..33], b"KEY1");
    assert_eq!(&t[133..141], &[0, 1, 0, 3, 2, 0, 0, 50]);
    assert_eq!(&t[191..199], &[0xFF; 8]);
    // Update R1's data, then read key and data back.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(1, 3));
    search_loop(&mut p, 0x31, id(1, 3, 1)).unwrap();
    p.ok(0x05, vec![0x33; 100]);
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(1, 3));
    search_loop(&mut p, 0x31, id(1, 3, 1)).unwrap();
    let kd = p.read(0x0E, 104);
    assert_eq!(&kd[..4], b"KEY1");
    assert!(kd[4..].iter().all(|&b| b == 0x33));
    assert!(file_track(&v.path, 1, 3)[33..133]
        .iter()
        .all(|&b| b == 0x33));
}

#[test]
fn write_ha_r0_ckd_and_erase_format_a_track() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0xC0]);
    p.ok(0x07, seek_arg(2, 4));
    let (o, _) = p.io(0x19, vec![0, 0, 2, 0, 4]);
    assert_eq!(o.status, OK);
    p.ok(0x15, ckd(2, 4, 0, &[], &[0; 8]));
    p.ok(0x1D, ckd(2, 4, 1, &[], &[7; 20]));
    p.ok(0x1D, ckd(2, 4, 2, &[], &[8; 20]));
    let t = file_track(&v.path, 2, 4);
    assert_eq!(&t[77..85], &[0xFF; 8]);
    // Search R1, then Erase: R2 is gone.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0xC0]);
    p.ok(0x07, seek_arg(2, 4));
    search_loop(&mut p, 0x31, id(2, 4, 1)).unwrap();
    p.ok(0x11, ckd(2, 4, 2, &[], &[0; 20]));
    let t = file_track(&v.path, 2, 4);
    assert_eq!(&t[49..57], &[0xFF; 8]);
    // Search HA Equal licenses Write R0 too.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0xC0]);
    p.ok(0x07, seek_arg(2, 4));
    let (o, _) = p.io(0x39, vec![0, 2, 0, 4]);
    assert_eq!(o.status, SM);
    p.ok(0x15, ckd(2, 4, 0, &[], &[9; 8]));
    let t = file_track(&v.path, 2, 4);
    assert_eq!(&t[13..21], &[9; 8]);
    assert_eq!(&t[21..29], &[0xFF; 8]);
}

#[test]
fn eckd_format_write_with_index_and_home_orientation() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0xC0, 0, 0, 2, 14, 0));
    p.ok(0x47, lr(0x43, 3, 0, 5, 0, 0));
    p.ok(0x19, vec![0, 0, 0, 0, 5]);
    p.ok(0x15, ckd(0, 5, 0, &[], &[0; 8]));
    p.ok(0x1D, ckd(0, 5, 1, &[], &[5; 64]));
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0xC0, 0, 0, 2, 14, 0));
    p.ok(0x47, lr(0xC3, 2, 0, 6, 0, 0));
    p.ok(0x15, ckd(0, 6, 0, &[], &[0; 8]));
    p.ok(0x1D, ckd(0, 6, 1, &[], &[6; 64]));
    let t5 = file_track(&v.path, 0, 5);
    let t6 = file_track(&v.path, 0, 6);
    assert_eq!(&t5[21..29], &[0, 0, 0, 5, 1, 0, 0, 64]);
    assert_eq!(&t6[21..29], &[0, 0, 0, 6, 1, 0, 0, 64]);
    assert_eq!(&t6[93..101], &[0xFF; 8]);
}

#[test]
fn write_ckd_next_track() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0xC0, 0, 0, 2, 14, 0));
    p.ok(0x47, lr(0x03, 2, 0, 7, 0, 0));
    p.ok(0x1D, ckd(0, 7, 1, &[], &[1; 16]));
    p.ok(0x9D, ckd(0, 8, 1, &[], &[2; 16]));
    assert_eq!(
        &file_track(&v.path, 0, 8)[21..29],
        &[0, 0, 0, 8, 1, 0, 0, 16]
    );
    // Not chained from Write CKD.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0xC0, 0, 0, 2, 14, 0));
    p.ok(0x47, lr(0x03, 2, 0, 9, 0, 0));
    assert!(is_reject(&p.fails(0x9D, ckd(0, 10, 1, &[], &[2; 16])), 2));
}

#[test]
fn invalid_track_format_when_a_record_does_not_fit() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 1));
    search_loop(&mut p, 0x31, id(0, 1, 0)).unwrap();
    let s = p.fails(0x1D, ckd(0, 1, 1, &[], &vec![0; 56832 - 21]));
    assert_eq!(&s[..2], &[0, SENSE1_ITF]);
    // The largest 3390 record fits.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 1));
    search_loop(&mut p, 0x31, id(0, 1, 0)).unwrap();
    p.ok(0x1D, ckd(0, 1, 1, &[], &vec![0x5A; 56664]));
}

#[test]
fn read_commands_return_fields() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 0));
    assert_eq!(p.read(0x1A, 5), vec![0; 5]);
    assert_eq!(
        p.read(0x16, 16),
        [vec![0, 0, 0, 0, 0, 0, 0, 8], vec![0; 8]].concat()
    );
    assert_eq!(p.read(0x12, 8), vec![0, 0, 0, 0, 1, 4, 0, 0x18]);
    let c = p.read(0x1E, 8 + 4 + 144);
    assert_eq!(&c[..8], &[0, 0, 0, 0, 2, 4, 0, 0x90]);
    assert_eq!(&c[8..12], &ebcdic_label("IPL2")[..]);
    // Read Multiple CKD: the rest of the track (R3 only).
    let m = p.read(0x5E, 200);
    assert_eq!(m.len(), 8 + 4 + 80);
    assert_eq!(&m[12..], &vol1_data()[..]);
    // Short read: "more" is set.
    p.ok(0x07, seek_arg(0, 0));
    let (o, b) = p.io(0x1E, vec![0; 10]);
    assert_eq!((o.status, o.transferred, o.more), (OK, 10, true));
    assert_eq!(&b[..8], &[0, 0, 0, 0, 1, 4, 0, 0x18]);
}

#[test]
fn read_data_of_an_empty_record_is_unit_exception() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 2));
    search_loop(&mut p, 0x31, id(0, 2, 0)).unwrap();
    p.ok(0x1D, ckd(0, 2, 1, &[], &[]));
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 2));
    let (o, _) = p.io(0x06, vec![0; 8]);
    assert_eq!((o.status, o.transferred), (OK | UNIT_EXCEPTION, 0));
}

#[test]
fn multitrack_read_and_end_of_cylinder() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 13));
    // (0,13) has only R0: a multitrack Read Count moves on to (0,14), then hits the cylinder end.
    let s = p.fails(0x92, vec![0; 8]);
    assert_eq!(&s[..2], &[0, SENSE1_EOC]);
    assert_eq!(&s[29..32], &[0, 0, 14]);
    // Read R0 multitrack advances one track.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x07, seek_arg(0, 3));
    assert_eq!(&p.read(0x96, 16)[..4], &[0, 0, 0, 4]);
}

#[test]
fn read_track_in_a_read_tracks_domain() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 0, 14, 0));
    p.ok(0x47, lr(0x0C, 2, 0, 0, 0, 0));
    let t0 = p.read(0xDE, 400);
    assert_eq!(t0.len(), 16 + (12 + 24) + (12 + 144) + (12 + 80) + 8);
    assert_eq!(&t0[..8], &[0, 0, 0, 0, 0, 0, 0, 8]);
    assert_eq!(&t0[t0.len() - 8..], &[0xFF; 8]);
    let t1 = p.read(0xDE, 400);
    assert_eq!(
        t1,
        [vec![0, 0, 0, 1, 0, 0, 0, 8], vec![0; 8], vec![0xFF; 8]].concat()
    );
    // Not chained from Locate Record: rejected.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 0, 14, 0));
    p.ok(0x47, lr(0x0C, 2, 0, 0, 0, 0));
    p.prev = Some(0x63);
    assert!(is_reject(&p.fails(0xDE, vec![0; 400]), 2));
    // Outside a Read Tracks domain.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 0, 14, 0));
    p.ok(0x47, lr(0x06, 2, 0, 0, 0, 0));
    assert!(is_reject(&p.fails(0xDE, vec![0; 400]), 2));
}

#[test]
fn locate_record_extended_and_prefix() {
    let mut v = vol();
    let mut lre = lr(0x16, 1, 0, 0, 3, 0);
    lre.extend_from_slice(&[0, 0, 0, 0]);
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 2, 14, 0));
    p.ok(0x4B, lre.clone());
    // Read(16) wants multitrack reads.
    assert!(is_reject(&p.fails(0x06, vec![0; 80]), 2));
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 2, 14, 0));
    p.ok(0x4B, lre.clone());
    assert_eq!(p.read(0x86, 80), vol1_data());
    // Extended operation codes are not modelled: invalid parameter.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 0, 0, 2, 14, 0));
    let mut ext = lre.clone();
    ext[0] = 0x3F;
    ext[17] = 0x0A;
    assert!(is_reject(&p.fails(0x4B, ext), 4));
    // Prefix: format 1 (DX + LRE), DX valid.
    let mut pfx = vec![0x01, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut dx = de(0x40, 0, 0, 2, 14, 0);
    dx.resize(32, 0);
    pfx.extend_from_slice(&dx);
    pfx.extend_from_slice(&lre);
    assert_eq!(pfx.len(), 64);
    let mut p = Prog::new(&mut v.dev);
    let (o, _) = p.io(0xE7, pfx.clone());
    assert_eq!((o.status, o.transferred), (OK, 64));
    assert_eq!(p.read(0x86, 80), vol1_data());
    // Prefix too short, or an unknown format.
    let mut p = Prog::new(&mut v.dev);
    assert!(is_reject(&p.fails(0xE7, pfx[..40].to_vec()), 3));
    let mut bad = pfx.clone();
    bad[0] = 0x02;
    assert!(is_reject(&p.fails(0xE7, bad), 4));
    // Format 0 (DX only) then a Locate Record.
    let mut p = Prog::new(&mut v.dev);
    let mut dxo = pfx.clone();
    dxo[0] = 0x00;
    p.ok(0xE7, dxo);
    p.ok(0x47, lr(0x06, 1, 0, 0, 3, 0));
    assert_eq!(p.read(0x06, 80), vol1_data());
}

#[test]
fn start_program_resets_per_program_state() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de(0x40, 1, 0, 1, 14, 0));
    p.ok(0x47, lr(0x06, 2, 1, 0, 0, 0));
    // New program: no extent, no domain, no Seek yet.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x1F, vec![0x00]);
    p.ok(0x07, seek_arg(0, 0));
    p.read(0x04, 32);
    // reset_operation drops a domain in progress.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x63, de_all(0x40));
    p.ok(0x47, lr(0x06, 2, 0, 0, 3, 0));
    p.dev.reset_operation();
    p.read(0x04, 32);
}

#[test]
fn read_ipl_reads_the_first_record() {
    let mut v = vol();
    let mut p = Prog::new(&mut v.dev);
    let b = p.read(0x02, 24);
    assert_eq!(&b[..8], &[0x00, 0x06, 0, 0, 0, 0, 0, 0x0F]);
    // Define Extent after Read IPL is out of sequence on a 3390.
    assert!(is_reject(&p.fails(0x63, de_all(0)), 2));
}

// ----- media errors --------------------------------------------------------------------------

#[test]
fn read_only_image_refuses_writes_with_write_inhibited() {
    let v = vol();
    let opts = Dasd3390Options {
        open: CkdOpenOptions {
            read_only: true,
            sync_writes: false,
        },
        devnum: 0x190,
    };
    let mut dev = Dasd3390::open(&v.path, opts).unwrap();
    let mut p = Prog::new(&mut dev);
    p.ok(0x63, de_all(0xC0));
    let s = p.fails(0x47, lr(0x01, 1, 0, 0, 3, 80));
    assert_eq!(&s[..2], &[SENSE_EC, SENSE1_WRI]);
    let mut p = Prog::new(&mut dev);
    p.ok(0x07, seek_arg(0, 0));
    search_loop(&mut p, 0x31, id(0, 0, 3)).unwrap();
    let s = p.fails(0x05, vec![0; 80]);
    assert_eq!(&s[..2], &[SENSE_EC, SENSE1_WRI]);
    // Reads work.
    let mut p = Prog::new(&mut dev);
    p.ok(0x63, de_all(0x40));
    p.ok(0x47, lr(0x06, 1, 0, 0, 3, 0));
    assert_eq!(p.read(0x06, 80), vol1_data());
}

#[test]
fn failing_write_is_equipment_check_not_success() {
    let v = vol();
    // Opened for reading only but told it may write: every pwrite fails with EBADF.
    let f = std::fs::File::open(&v.path).unwrap();
    let img = CkdImage::from_file(f, CkdOpenOptions::default()).unwrap();
    let mut dev = Dasd3390::new(img, 0).unwrap();
    let before = std::fs::read(&v.path).unwrap();
    let mut p = Prog::new(&mut dev);
    p.ok(0x07, seek_arg(0, 0));
    search_loop(&mut p, 0x31, id(0, 0, 3)).unwrap();
    let s = p.fails(0x05, vec![0x77; 80]);
    assert_eq!(&s[..8], &[SENSE_EC, 0, 0, 0, 0, 0, 0, 0x10]);
    assert_eq!(std::fs::read(&v.path).unwrap(), before);
    // The cache was dropped: a re-read shows the unchanged record.
    let mut p = Prog::new(&mut dev);
    p.ok(0x07, seek_arg(0, 0));
    search_loop(&mut p, 0x31, id(0, 0, 3)).unwrap();
    assert_eq!(p.read(0x06, 80), vol1_data());
}

#[test]
fn damaged_track_is_a_data_check() {
    let v = vol();
    let mut bytes = std::fs::read(&v.path).unwrap();
    bytes[512 + 20 * TS + 2] = 9; // home address of (1,5) names another cylinder
    std::fs::write(&v.path, &bytes).unwrap();
    let mut dev = Dasd3390::open(&v.path, Dasd3390Options::default()).unwrap();
    let mut p = Prog::new(&mut dev);
    let s = p.fails(0x07, seek_arg(1, 5));
    assert_eq!(s[0], SENSE_DC);
    assert_eq!(s[7], 0x40);
    assert_eq!(&s[8..12], &[0, 1, 0, 5]);
    p.ok(0x07, seek_arg(1, 6));
}

#[test]
fn non_3390_images_are_refused() {
    let v = vol();
    let mut bytes = std::fs::read(&v.path).unwrap();
    bytes[16] = 0x80; // 3380
    std::fs::write(&v.path, &bytes).unwrap();
    let e = Dasd3390::open(&v.path, Dasd3390Options::default()).unwrap_err();
    assert!(matches!(e, DasdError::NotA3390 { dev_type: 0x80, .. }));
    assert_eq!(e.errno(), libc::EINVAL);
}

#[test]
fn path_group_id_set_sense_and_chain_rules() {
    let mut v = vol();
    let pgid: Vec<u8> = (1..=11).collect();
    let mut p = Prog::new(&mut v.dev);
    assert_eq!(p.read(0x34, 12), vec![0; 12]);
    // Nothing may follow it in the chain.
    assert!(is_reject(&p.fails(0x03, vec![]), 2));
    let mut p = Prog::new(&mut v.dev);
    let (o, _) = p.io(0xAF, [vec![0x80], pgid.clone()].concat());
    assert_eq!((o.status, o.transferred), (OK, 12));
    let mut p = Prog::new(&mut v.dev);
    assert_eq!(p.read(0x34, 12), [vec![0x00], pgid.clone()].concat());
    // Another id while grouped, a zero id, a reserved function: invalid parameter.
    let mut other = pgid.clone();
    other[0] = 9;
    for bad in [
        [vec![0x80], other].concat(),
        [vec![0x00], vec![0; 11]].concat(),
        [vec![0x60], pgid.clone()].concat(),
        [vec![0x01], pgid.clone()].concat(),
    ] {
        let mut p = Prog::new(&mut v.dev);
        assert!(is_reject(&p.fails(0xAF, bad), 4));
    }
    let mut p = Prog::new(&mut v.dev);
    assert!(is_reject(&p.fails(0xAF, vec![0; 5]), 3));
    // Not first in the chain.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0x03, vec![]);
    assert!(is_reject(&p.fails(0x34, vec![0; 12]), 2));
    // Disband clears the id.
    let mut p = Prog::new(&mut v.dev);
    p.ok(0xAF, [vec![0x20], pgid.clone()].concat());
    let mut p = Prog::new(&mut v.dev);
    assert_eq!(p.read(0x34, 12), vec![0; 12]);
}

/// Runs the same writes and reads on a device whose image is mapped and on one reading
/// with `pread` (an image behind a plain `ImageFile`): every outcome, every byte read and
/// the files must agree.
#[test]
fn mapped_and_pread_images_behave_alike() {
    fn script(dev: &mut Dasd3390) -> Vec<(Outcome, Vec<u8>)> {
        let mut out = Vec::new();
        let mut p = Prog::new(dev);
        out.push(p.io(0x07, seek_arg(1, 3)));
        out.push(p.io(0x31, id(1, 3, 0)));
        out.push(p.io(0x1D, ckd(1, 3, 1, b"KEY1", &[0x11; 100])));
        out.push(p.io(0x1D, ckd(1, 3, 2, &[], &[0x22; 50])));
        let mut p = Prog::new(dev);
        out.push(p.io(0x07, seek_arg(1, 3)));
        out.push(p.io(0x31, id(1, 3, 1)));
        out.push(p.io(0x31, id(1, 3, 1)));
        out.push(p.io(0x05, vec![0x33; 100]));
        let mut p = Prog::new(dev);
        out.push(p.io(0x07, seek_arg(1, 3)));
        out.push(p.io(0x31, id(1, 3, 1)));
        out.push(p.io(0x31, id(1, 3, 1)));
        out.push(p.io(0x0E, vec![0; 104]));
        out.push(p.io(0x12, vec![0; 8]));
        let mut p = Prog::new(dev);
        out.push(p.io(0x07, seek_arg(1, 3)));
        out.push(p.io(0x5E, vec![0; 400]));
        let mut p = Prog::new(dev);
        out.push(p.io(0x07, seek_arg(1, 3)));
        out.push(p.io(0x16, vec![0; 16]));
        out.push(p.io(0x1E, vec![0; 60]));
        out.push(p.io(0x06, vec![0; 10]));
        let mut p = Prog::new(dev);
        out.push(p.io(0x63, de_all(0x40)));
        out.push(p.io(0x47, lr(0x06, 2, 1, 3, 1, 0)));
        out.push(p.io(0x86, vec![0; 100]));
        out.push(p.io(0x86, vec![0; 60]));
        out
    }
    let (mut mapped, plain, mut plain_dev) = mapped_and_plain();
    let a = script(&mut mapped.dev);
    let b = script(&mut plain_dev);
    assert_eq!(a, b);
    // Spot checks: the data written is what Read Key and Data and the LR reads return.
    assert!(a.iter().all(|(o, _)| o.status & UNIT_CHECK == 0));
    assert_eq!((a[6].0.status, a[7].0.transferred), (SM, 100));
    assert_eq!(&a[11].1[..4], b"KEY1");
    assert!(a[11].1[4..].iter().all(|&x| x == 0x33));
    assert_eq!(a[12].1, [0, 1, 0, 3, 2, 0, 0, 50]);
    assert_eq!(a[14].0.transferred, 170);
    assert_eq!(a[21].1, vec![0x33; 100]);
    assert_eq!(a[22].1, vec![0x22; 50]);
    assert!(!a[22].0.more);
    assert_eq!(
        std::fs::read(&mapped.path).unwrap(),
        std::fs::read(&plain.path).unwrap()
    );
}

#[test]
fn read_data_fast_path_flags_are_read_datas() {
    assert_eq!(READ_DATA_FLAGS, CODE_FLAGS[0x06]);
    assert_eq!(READ_DATA_FLAGS, CODE_FLAGS[0x86]);
    assert_eq!(EOT_WORD, u64::MAX);
    assert_eq!(
        count_parts(u64::from_be_bytes([0, 1, 0, 2, 3, 4, 0x10, 0x01])),
        (3, 4, 0x1001)
    );
    assert_eq!(count_word(&[0xFF; 12], 4), Some(EOT_WORD));
    assert_eq!(count_word(&[0xFF; 12], 5), None);
    assert_eq!(count_word(&[0xFF; 12], usize::MAX), None);
}

/// Read Data's fast path (the track borrowed once, the next track of a multitrack read
/// entered without the general path) against the general one: a write to the track being
/// read is seen by the next read, in the same Locate Record domain's program and across
/// domains and tracks; the index point passed on the way, the end of the extent and a
/// track with nothing after R0 end as before. The mapped device takes the fast track
/// switch, the `pread` one does not: both must agree, and with the expected bytes.
#[test]
fn writes_are_read_at_once_and_multitrack_reads_agree() {
    /// Outcome, bytes, and the sense after a unit check.
    type Step = (Outcome, Vec<u8>, Vec<u8>);
    fn step(p: &mut Prog<'_>, code: u8, buf: Vec<u8>) -> Step {
        let (o, b) = p.io(code, buf);
        let s = if o.status & UNIT_CHECK != 0 {
            p.dev.sense()
        } else {
            Vec::new()
        };
        (o, b, s)
    }
    fn fill(head: u16, rec: u8) -> u8 {
        0x10 * head as u8 + rec
    }
    fn script(dev: &mut Dasd3390) -> Vec<Step> {
        for head in 0..2u16 {
            let mut p = Prog::new(dev);
            p.ok(0x63, de(0xC0, 1, 0, 1, 1, 4096));
            p.ok(0x47, lr(0x03, 3, 1, head, 0, 4096));
            for r in 1..=3u8 {
                p.ok(0x1D, ckd(1, head, r, &[], &[fill(head, r); 4096]));
            }
        }
        let mut out = Vec::new();
        let mut p = Prog::new(dev);
        out.push(step(&mut p, 0x63, de(0xC0, 1, 0, 1, 1, 4096)));
        out.push(step(&mut p, 0x47, lr(0x06, 1, 1, 0, 1, 4096)));
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 2: (1,0) R1
        out.push(step(&mut p, 0x47, lr(0x01, 1, 1, 0, 2, 4096)));
        out.push(step(&mut p, 0x85, vec![0xEE; 4096]));
        out.push(step(&mut p, 0x47, lr(0x06, 3, 1, 0, 2, 4096)));
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 6: (1,0) R2, just written
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 7: (1,0) R3
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 8: (1,1) R1, next track
        out.push(step(&mut p, 0x47, lr(0x01, 1, 1, 1, 2, 4096)));
        out.push(step(&mut p, 0x85, vec![0xDD; 4096]));
        out.push(step(&mut p, 0x47, lr(0x06, 2, 1, 1, 1, 4096)));
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 12: (1,1) R1
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 13: (1,1) R2, just written
                                                     // The index point passed by the track switch stays passed for single-track Read
                                                     // Counts: the end of the new track is no record found, not a wrap.
        let mut p = Prog::new(dev);
        out.push(step(&mut p, 0x63, de(0x40, 1, 0, 1, 1, 4096)));
        out.push(step(&mut p, 0x47, lr(0x06, 6, 1, 0, 3, 4096)));
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 16: (1,0) R3
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 17: (1,1) R1
        out.push(step(&mut p, 0x12, vec![0; 8])); // 18: R2's count
        out.push(step(&mut p, 0x12, vec![0; 8])); // 19: R3's count
        out.push(step(&mut p, 0x12, vec![0; 8])); // 20: no record found
                                                  // The end of the extent: file protected.
        let mut p = Prog::new(dev);
        out.push(step(&mut p, 0x63, de(0x40, 1, 0, 1, 1, 4096)));
        out.push(step(&mut p, 0x47, lr(0x06, 3, 1, 1, 3, 4096)));
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 23: (1,1) R3
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 24: file protected
                                                     // A next track with only R0: no record found.
        let mut p = Prog::new(dev);
        out.push(step(&mut p, 0x63, de(0x40, 1, 0, 1, 2, 4096)));
        out.push(step(&mut p, 0x47, lr(0x06, 3, 1, 1, 3, 4096)));
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 27: (1,1) R3
        out.push(step(&mut p, 0x86, vec![0; 4096])); // 28: no record found
        out
    }
    let (mut mapped, _plain, mut plain_dev) = mapped_and_plain();
    let a = script(&mut mapped.dev);
    let b = script(&mut plain_dev);
    assert_eq!(a, b);
    let data = |i: usize, byte: u8| {
        assert_eq!(a[i].0.status, OK, "step {i}: {:02x?}", a[i].2);
        assert_eq!(a[i].1, vec![byte; 4096], "step {i}");
    };
    data(2, fill(0, 1));
    data(6, 0xEE);
    data(7, fill(0, 3));
    data(8, fill(1, 1));
    data(12, fill(1, 1));
    data(13, 0xDD);
    data(16, fill(0, 3));
    data(17, fill(1, 1));
    assert_eq!(a[18].1, [0, 1, 0, 1, 2, 0, 0x10, 0]);
    assert_eq!(a[19].1, [0, 1, 0, 1, 3, 0, 0x10, 0]);
    assert_eq!(a[20].0.status, UC);
    assert_eq!(a[20].2[1], SENSE1_NRF);
    data(23, fill(1, 3));
    assert_eq!(a[24].0.status, UC);
    assert_eq!(a[24].2[1], SENSE1_FP);
    data(27, fill(1, 3));
    assert_eq!(a[28].0.status, UC);
    assert_eq!(a[28].2[1], SENSE1_NRF);
    assert!(a
        .iter()
        .enumerate()
        .all(|(i, s)| matches!(i, 20 | 24 | 28) || s.0.status & UNIT_CHECK == 0));
}
