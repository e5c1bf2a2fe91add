use super::*;
use crate::ccw::CommandKind;
use crate::image::awstape::{AwsTape, OpenMode};
use crate::orb::dstat::{UNIT_CHECK, UNIT_EXCEPTION};

const CE_DE: u8 = 0x0C;
const CE_DE_UC: u8 = 0x0E;
const CE_DE_UX: u8 = 0x0D;

fn command(code: u8, count: usize) -> Command {
    Command {
        code,
        kind: CommandKind::of(code),
        count,
        chained: false,
        prev_code: None,
        seq: 0,
    }
}

/// Runs an output command with `data`.
fn out(d: &mut Tape3490, code: u8, data: &[u8]) -> Outcome {
    let mut b = data.to_vec();
    d.execute(&command(code, b.len()), &mut b)
}

/// Runs an input command with `count` bytes offered.
fn inp(d: &mut Tape3490, code: u8, count: usize) -> (Outcome, Vec<u8>) {
    let mut b = vec![0u8; count];
    let o = d.execute(&command(code, count), &mut b);
    b.truncate(o.transferred);
    (o, b)
}

fn ctl(d: &mut Tape3490, code: u8) -> Outcome {
    d.execute(&command(code, 0), &mut [])
}

fn sense(d: &mut Tape3490) -> Vec<u8> {
    let (o, s) = inp(d, cmd::SENSE, 32);
    assert_eq!(o.status, CE_DE);
    assert_eq!(s.len(), 32);
    s
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    dev: Tape3490,
}

fn fixture(cfg: Tape3490Config) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.aws");
    let tape = AwsTape::create(&path).unwrap();
    Fixture {
        _dir: dir,
        path,
        dev: Tape3490::with_tape(tape, cfg),
    }
}

fn loaded() -> Fixture {
    fixture(Tape3490Config::default())
}

#[test]
fn sense_id_matches_hercules_3490() {
    let mut d = Tape3490::new(Tape3490Config::default());
    let (o, b) = inp(&mut d, cmd::SENSE_ID, 7);
    assert_eq!(o, Outcome::done(7));
    assert_eq!(b, [0xFF, 0x34, 0x90, 0x50, 0x34, 0x90, 0x50]);
    // A longer count gets 7 bytes and no "more".
    let (o, _) = inp(&mut d, cmd::SENSE_ID, 256);
    assert_eq!((o.transferred, o.more), (7, false));
    assert_eq!(d.identity().dev_type, 0x3490);
}

#[test]
fn write_read_forward_and_backward() {
    let mut f = loaded();
    let d = &mut f.dev;
    let a = pattern(300, 1);
    let b = pattern(5000, 2);
    assert_eq!(out(d, cmd::WRITE, &a), Outcome::done(300));
    assert_eq!(out(d, cmd::WRITE, &b), Outcome::done(5000));
    assert_eq!(ctl(d, cmd::WRITE_TAPE_MARK), Outcome::done(0));
    assert_eq!(ctl(d, cmd::REWIND), Outcome::done(0));

    // Exact count.
    let (o, got) = inp(d, cmd::READ_FORWARD, 300);
    assert_eq!(o, Outcome::done(300));
    assert_eq!(got, a);
    // Count shorter than the block: truncated, more = true (incorrect length unless SLI).
    let (o, got) = inp(d, cmd::READ_FORWARD, 100);
    assert_eq!(
        o,
        Outcome {
            status: CE_DE,
            transferred: 100,
            more: true
        }
    );
    assert_eq!(got, b[..100]);
    // Tape mark: CE DE UX, nothing transferred.
    let (o, _) = inp(d, cmd::READ_FORWARD, 100);
    assert_eq!(o.status, CE_DE_UX);
    assert_eq!(o.transferred, 0);

    // Read backward over the tape mark, then the 5000-byte block with a longer count
    // (short block: transferred < count, more = false), in transfer order.
    let (o, _) = inp(d, cmd::READ_BACKWARD, 10);
    assert_eq!(o.status, CE_DE_UX);
    let (o, got) = inp(d, cmd::READ_BACKWARD, 8000);
    assert_eq!(
        o,
        Outcome {
            status: CE_DE,
            transferred: 5000,
            more: false
        }
    );
    let rev: Vec<u8> = b.iter().rev().copied().collect();
    assert_eq!(got, rev);
    // Read backward with a short count gets the block's last bytes, last byte first.
    let (o, got) = inp(d, cmd::READ_BACKWARD, 4);
    assert_eq!((o.transferred, o.more), (4, true));
    assert_eq!(got, [a[299], a[298], a[297], a[296]]);
    assert!(d.tape().unwrap().at_load_point());
    // Backward at the load point: unit check, ERA 0x39.
    let (o, _) = inp(d, cmd::READ_BACKWARD, 4);
    assert_eq!(o.status, CE_DE_UC);
    let s = sense(d);
    assert_eq!(s[0], 0);
    assert_eq!(s[1], 0x48); // online, at BOT
    assert_eq!(s[3], 0x39);
}

#[test]
fn read_at_end_of_data_is_tape_void() {
    let mut f = loaded();
    let d = &mut f.dev;
    let (o, _) = inp(d, cmd::READ_FORWARD, 80);
    assert_eq!(o.status, CE_DE_UC);
    assert_eq!(o.transferred, 0);
    let s = sense(d);
    assert_eq!((s[0], s[3]), (0x08, 0x31));
    // Sense was consumed: the next Sense is unsolicited.
    let s = sense(d);
    assert_eq!((s[0], s[3], s[7]), (0, 0, 0x20));
    // Forward space block and file at the end of data too.
    assert_eq!(ctl(d, cmd::FORWARD_SPACE_BLOCK).status, CE_DE_UC);
    assert_eq!(sense(d)[3], 0x31);
    assert_eq!(ctl(d, cmd::FORWARD_SPACE_FILE).status, CE_DE_UC);
    assert_eq!(sense(d)[3], 0x31);
}

#[test]
fn spacing_blocks_and_files() {
    let mut f = loaded();
    let d = &mut f.dev;
    for i in 0..3 {
        out(d, cmd::WRITE, &pattern(100 + i, i as u8));
    }
    ctl(d, cmd::WRITE_TAPE_MARK);
    out(d, cmd::WRITE, &pattern(50, 9));
    ctl(d, cmd::WRITE_TAPE_MARK);
    ctl(d, cmd::REWIND);

    assert_eq!(ctl(d, cmd::FORWARD_SPACE_BLOCK), Outcome::done(0));
    assert_eq!(d.tape().unwrap().block_id(), 1);
    assert_eq!(ctl(d, cmd::FORWARD_SPACE_FILE), Outcome::done(0));
    assert_eq!(d.tape().unwrap().block_id(), 4);
    let (_, got) = inp(d, cmd::READ_FORWARD, 50);
    assert_eq!(got, pattern(50, 9));
    // Forward space block over a tape mark: unit exception.
    assert_eq!(ctl(d, cmd::FORWARD_SPACE_BLOCK).status, CE_DE_UX);
    // Backspace block over a tape mark: unit exception; over a block: CE DE.
    assert_eq!(ctl(d, cmd::BACKSPACE_BLOCK).status, CE_DE_UX);
    assert_eq!(ctl(d, cmd::BACKSPACE_BLOCK), Outcome::done(0));
    // Backspace file: stops before the first tape mark (position after block 3).
    assert_eq!(ctl(d, cmd::BACKSPACE_FILE), Outcome::done(0));
    assert_eq!(d.tape().unwrap().block_id(), 3);
    // Backspace file with no tape mark before: reaches the load point, unit check 0x39.
    assert_eq!(ctl(d, cmd::BACKSPACE_FILE).status, CE_DE_UC);
    assert_eq!(sense(d)[3], 0x39);
    assert!(d.tape().unwrap().at_load_point());
    assert_eq!(ctl(d, cmd::BACKSPACE_BLOCK).status, CE_DE_UC);
    let s = sense(d);
    assert_eq!((s[0], s[1], s[3]), (0, 0x48, 0x39));
}

#[test]
fn block_id_and_locate() {
    let mut f = loaded();
    let d = &mut f.dev;
    for i in 0..5u8 {
        out(d, cmd::WRITE, &pattern(64, i));
    }
    let (o, id) = inp(d, cmd::READ_BLOCK_ID, 8);
    assert_eq!(o, Outcome::done(8));
    assert_eq!(id, [0x01, 0, 0, 5, 0x01, 0, 0, 5]);
    // Locate block 2 with Linux's block-ID layout (wrap 0, segment 1, format 0).
    let o = out(d, cmd::LOCATE, &[0x01, 0x00, 0x00, 0x02]);
    assert_eq!(o, Outcome::done(4));
    let (_, got) = inp(d, cmd::READ_FORWARD, 64);
    assert_eq!(got, pattern(64, 2));
    // Format 3480 XF (format bits 10) is accepted.
    assert_eq!(out(d, cmd::LOCATE, &[0x01, 0x80, 0x00, 0x01]).status, CE_DE);
    assert_eq!(d.tape().unwrap().block_id(), 1);
    // Reserved format 11: command reject (unit check alone).
    let o = out(d, cmd::LOCATE, &[0x01, 0xC0, 0x00, 0x01]);
    assert_eq!(o.status, UNIT_CHECK);
    assert_eq!(sense(d)[..4], [0x80, 0x40, 0x20, 0x27]);
    // Too short a count: command reject.
    assert_eq!(out(d, cmd::LOCATE, &[0, 0, 1]).status, UNIT_CHECK);
    // Past the end: locate failure.
    assert_eq!(out(d, cmd::LOCATE, &[0x01, 0, 0, 9]).status, CE_DE_UC);
    let s = sense(d);
    assert_eq!((s[0], s[3]), (0x10, 0x44));
}

#[test]
fn write_truncates_and_is_on_disk_before_status() {
    let mut f = loaded();
    let path = f.path.clone();
    let d = &mut f.dev;
    for i in 0..4u8 {
        out(d, cmd::WRITE, &pattern(1000, i));
    }
    ctl(d, cmd::REWIND);
    ctl(d, cmd::FORWARD_SPACE_BLOCK);
    assert_eq!(out(d, cmd::WRITE, &[7; 10]), Outcome::done(10));
    // The file already holds exactly block 0 and the new block.
    let mut t = AwsTape::open(&path, OpenMode::ReadOnly).unwrap();
    let m = t.map().unwrap();
    assert_eq!(m.len(), 2);
    let mut buf = Vec::new();
    t.skip_forward().unwrap();
    t.read_forward(&mut buf).unwrap();
    assert_eq!(buf, [7; 10]);
}

#[test]
fn large_block_over_64k() {
    let mut f = loaded();
    let d = &mut f.dev;
    let big = pattern(200_000, 5);
    assert_eq!(out(d, cmd::WRITE, &big), Outcome::done(200_000));
    ctl(d, cmd::REWIND);
    let (o, got) = inp(d, cmd::READ_FORWARD, 200_000);
    assert_eq!(o, Outcome::done(200_000));
    assert_eq!(got, big);
}

#[test]
fn end_of_tape_warning_and_physical_end() {
    let cfg = Tape3490Config {
        max_size: Some(10_000),
        eot_margin: 4_000,
        ..Tape3490Config::default()
    };
    let mut f = fixture(cfg);
    let d = &mut f.dev;
    // Ends at 3006: outside the warning zone.
    assert_eq!(out(d, cmd::WRITE, &[1; 3000]), Outcome::done(3000));
    // Ends at 6012 > 10000 - 4000: unit exception, data written.
    let o = out(d, cmd::WRITE, &[2; 3000]);
    assert_eq!(o.status, CE_DE | UNIT_EXCEPTION);
    assert_eq!(o.transferred, 3000);
    assert_eq!(ctl(d, cmd::WRITE_TAPE_MARK).status, CE_DE_UX);
    // Would end past 10000: unit check, equipment check, ERA 0x38, nothing written.
    let len_before = d.tape().unwrap().len();
    let o = out(d, cmd::WRITE, &[3; 5000]);
    assert_eq!(o.status, CE_DE_UC);
    assert_eq!(o.transferred, 0);
    assert_eq!(d.tape().unwrap().len(), len_before);
    let s = sense(d);
    assert_eq!((s[0], s[1], s[3]), (0x10, 0x40, 0x38));
    // Rewinding and overwriting frees the space.
    ctl(d, cmd::REWIND);
    assert_eq!(out(d, cmd::WRITE, &[4; 5000]), Outcome::done(5000));
}

#[cfg(target_os = "linux")]
#[test]
fn host_disk_full_is_unit_check_never_success() {
    // /dev/full fails every write with ENOSPC.
    let t = AwsTape::open("/dev/full", OpenMode::ReadWrite).unwrap();
    let mut d = Tape3490::with_tape(t, Tape3490Config::default());
    let o = out(&mut d, cmd::WRITE, &[1; 100]);
    assert_eq!(o.status, CE_DE_UC);
    assert_eq!(o.transferred, 0);
    let s = sense(&mut d);
    assert_eq!((s[0], s[3]), (0x10, 0x38));
    assert_eq!(ctl(&mut d, cmd::WRITE_TAPE_MARK).status, CE_DE_UC);
}

#[test]
fn failing_host_write_is_equipment_check() {
    // ENOSPC -> physical end of tape; any other host error -> equipment check (ERA 0x2C).
    let enospc = AwsError::Io {
        op: "write",
        offset: 0,
        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
    };
    assert_eq!(Tape3490::write_error(&enospc), Condition::PhysicalEnd);
    let eio = AwsError::Io {
        op: "write",
        offset: 0,
        source: std::io::Error::from_raw_os_error(libc::EIO),
    };
    assert_eq!(Tape3490::write_error(&eio), Condition::WriteFail);
    assert_eq!(Condition::WriteFail.status(), CE_DE_UC);
    let st = sense::DriveState {
        loaded: true,
        at_load_point: false,
        read_only: false,
        dev_num: 0,
    };
    let s = sense::build(Condition::WriteFail, st);
    assert_eq!((s[0], s[3]), (0x10, 0x2C));
}

#[test]
fn write_protected_tape() {
    let mut f = loaded();
    out(&mut f.dev, cmd::WRITE, &[1; 10]);
    let t = AwsTape::open(&f.path, OpenMode::ReadOnly).unwrap();
    let mut d = Tape3490::with_tape(t, Tape3490Config::default());
    for code in [
        cmd::WRITE,
        cmd::WRITE_TAPE_MARK,
        cmd::ERASE_GAP,
        cmd::DATA_SECURITY_ERASE,
    ] {
        let o = out(&mut d, code, &[1; 4]);
        assert_eq!(o.status, CE_DE_UC, "code {code:#x}");
        let s = sense(&mut d);
        // Command reject + file protected, as Linux maps to EACCES.
        assert_eq!((s[0], s[1] & 0x02, s[3]), (0x80, 0x02, 0x30));
    }
    let (o, got) = inp(&mut d, cmd::READ_FORWARD, 10);
    assert_eq!(o, Outcome::done(10));
    assert_eq!(got, [1; 10]);
    // Synchronize on a read-only tape has nothing to flush.
    assert_eq!(ctl(&mut d, cmd::SYNCHRONIZE), Outcome::done(0));
}

#[test]
fn rewind_unload_then_not_ready() {
    let mut f = loaded();
    let d = &mut f.dev;
    out(d, cmd::WRITE, &[1; 10]);
    let o = ctl(d, cmd::REWIND_UNLOAD);
    assert_eq!(o.status, CE_DE_UC);
    let s = sense(d);
    assert_eq!(&s[..4], &[0x40, 0x42, 0x20, 0x2B]);
    assert_eq!(s[7], 0x22);
    assert!(d.tape().is_none());
    // Commands needing a tape: unit check alone, intervention required, ERA 0x43.
    for code in [
        cmd::READ_FORWARD,
        cmd::NOP,
        cmd::REWIND,
        cmd::FORWARD_SPACE_FILE,
    ] {
        let o = ctl(d, code);
        assert_eq!(o.status, UNIT_CHECK, "code {code:#x}");
        let s = sense(d);
        assert_eq!((s[0], s[1], s[3]), (0x40, 0x42, 0x43));
    }
    // Commands that do not need one still work.
    assert_eq!(inp(d, cmd::SENSE_ID, 7).0.status, CE_DE);
    assert_eq!(out(d, cmd::MODE_SET, &[0]).status, CE_DE);
    assert_eq!(out(d, cmd::ASSIGN, &[0; 11]).status, CE_DE);
    // Reload.
    let t = AwsTape::open(&f.path, OpenMode::ReadWrite).unwrap();
    f.dev.load(t);
    assert_eq!(inp(&mut f.dev, cmd::READ_FORWARD, 10).0, Outcome::done(10));
}

#[test]
fn linux_setup_commands() {
    let mut f = loaded();
    let d = &mut f.dev;
    // Assign / Unassign with 11 bytes, chained to NOP.
    assert_eq!(out(d, cmd::ASSIGN, &[0; 11]), Outcome::done(11));
    assert!(d.is_assigned());
    assert_eq!(ctl(d, cmd::NOP), Outcome::done(0));
    assert_eq!(out(d, cmd::UNASSIGN, &[0; 11]), Outcome::done(11));
    assert!(!d.is_assigned());
    assert_eq!(out(d, cmd::ASSIGN, &[0; 5]).status, UNIT_CHECK);
    // Load Display: 17 bytes.
    let msg: Vec<u8> = (0..17).collect();
    assert_eq!(out(d, cmd::LOAD_DISPLAY, &msg), Outcome::done(17));
    assert_eq!(&d.display()[..], &msg[..]);
    // Mode Set with Linux's modeset byte (0x00 or 0x08 for compression).
    assert_eq!(out(d, cmd::MODE_SET, &[0x08]), Outcome::done(1));
    assert_eq!(out(d, cmd::MODE_SET, &[]).status, UNIT_CHECK);
    // Old mode-set codes are accepted and ignored.
    for c in cmd::IGNORED_MODE_SETS {
        assert_eq!(out(d, c, &[0]), Outcome::done(0), "code {c:#x}");
    }
    // Synchronize, Read Buffer, Erase Gap, Set Write Immediate, Suspend Multipath.
    for c in [
        cmd::SYNCHRONIZE,
        cmd::READ_BUFFER,
        cmd::ERASE_GAP,
        cmd::SET_WRITE_IMMEDIATE,
        cmd::SUSPEND_MULTIPATH,
    ] {
        assert_eq!(ctl(d, c), Outcome::done(0), "code {c:#x}");
    }
    // Path group: set then sense.
    let mut spid = [0u8; 12];
    spid[1..].copy_from_slice(&[9; 11]);
    assert_eq!(out(d, cmd::SET_PATH_GROUP_ID, &spid), Outcome::done(12));
    let (o, pg) = inp(d, cmd::SENSE_PATH_GROUP_ID, 12);
    assert_eq!(o, Outcome::done(12));
    assert_eq!(pg[0], 0xC0);
    assert_eq!(&pg[1..], &[9; 11]);
    // Unknown command: command reject, unit check alone.
    assert_eq!(ctl(d, 0x8B).status, UNIT_CHECK);
    let s = sense(d);
    assert_eq!((s[0], s[3]), (0x80, 0x27));
}

#[test]
fn supervisor_inhibit_lasts_one_program() {
    let mut f = loaded();
    let d = &mut f.dev;
    d.start_program();
    assert_eq!(out(d, cmd::MODE_SET, &[0x10]), Outcome::done(1));
    assert_eq!(out(d, cmd::MODE_SET, &[0]).status, UNIT_CHECK);
    assert_eq!(out(d, cmd::ASSIGN, &[0; 11]).status, UNIT_CHECK);
    d.start_program();
    assert_eq!(out(d, cmd::ASSIGN, &[0; 11]), Outcome::done(11));
}

#[test]
fn write_immediate_mode_syncs() {
    let mut f = fixture(Tape3490Config {
        sync_writes: true,
        ..Tape3490Config::default()
    });
    let d = &mut f.dev;
    d.start_program();
    out(d, cmd::MODE_SET, &[0x20]);
    assert_eq!(out(d, cmd::WRITE, &[5; 100]), Outcome::done(100));
    assert_eq!(ctl(d, cmd::WRITE_TAPE_MARK), Outcome::done(0));
}

#[test]
fn sense_states_and_concurrent_sense() {
    let mut f = loaded();
    let d = &mut f.dev;
    // Unsolicited, at load point.
    let s = d.sense();
    assert_eq!(&s[..4], &[0, 0x48, 0x20, 0]);
    assert_eq!(s.len(), 32);
    assert_eq!((s[7], s[25], s[27]), (0x20, 0x06, 0xEC));
    // After a unit check, concurrent sense shows it without consuming it...
    ctl(d, cmd::BACKSPACE_BLOCK);
    assert_eq!(d.sense()[3], 0x39);
    assert_eq!(d.sense()[3], 0x39);
    // ...and the next non-sense command ends the contingent allegiance.
    out(d, cmd::WRITE, &[1; 8]);
    assert_eq!(d.sense()[3], 0);
    assert_eq!(d.sense()[1], 0x40);
    // Sense with a short count: truncated with more = true.
    let (o, s) = inp(d, cmd::SENSE, 8);
    assert_eq!((o.transferred, o.more, s.len()), (8, true, 8));
    // Read Buffered Log returns the sense bytes too.
    let (o, _) = inp(d, cmd::READ_BUFFERED_LOG, 32);
    assert_eq!(o, Outcome::done(32));
}

#[test]
fn malformed_block_is_data_check() {
    let mut f = loaded();
    out(&mut f.dev, cmd::WRITE, &[1; 10]);
    ctl(&mut f.dev, cmd::REWIND);
    // Damage the header's flags behind the device's back.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.path)
        .unwrap();
    file.write_all_at(&[0xA3], 4).unwrap();
    let (o, _) = inp(&mut f.dev, cmd::READ_FORWARD, 10);
    assert_eq!(o.status, CE_DE_UC);
    let s = sense(&mut f.dev);
    assert_eq!((s[0], s[3]), (0x08, 0x23));
    drop(file);
    // A truncated file maps to equipment check, end of data (ERA 0x36); reopening such a
    // file is refused outright.
    assert_eq!(
        Tape3490::read_error(&AwsError::TruncatedBlock { offset: 0 }),
        Condition::BlockShort
    );
    std::fs::write(&f.path, [10u8, 0, 0, 0, 0xA0, 0, 1, 2]).unwrap();
    assert!(AwsTape::open(&f.path, OpenMode::ReadOnly).is_err());
}

#[test]
fn zero_length_write_is_rejected_and_count_is_bounded() {
    let mut f = loaded();
    let d = &mut f.dev;
    assert_eq!(out(d, cmd::WRITE, &[]).status, UNIT_CHECK);
    // A count larger than the buffer is clamped to the buffer.
    let mut b = [9u8; 4];
    let o = d.execute(&command(cmd::WRITE, 1000), &mut b);
    assert_eq!(o, Outcome::done(4));
    assert_eq!(d.tape().unwrap().len(), 10);
}
