//! `vccw run` on the shipped examples, on a volume made by Hercules `dasdinit` and a tape
//! made by `AwsTape::create`. Needs the Hercules tools (`apt-get install -y hercules`).

mod common;

use std::path::{Path, PathBuf};

fn vccw(args: &[&str]) -> (i32, String, String) {
    let out = common::command(env!("CARGO_BIN_EXE_vccw"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run vccw");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dasdinit(dir: &Path) -> PathBuf {
    let p = dir.join("vol.3390");
    common::dasdinit(&p, "RUN001", 3);
    p
}

const VOL1_LINE: &str =
    "0000000000010000  e5 d6 d3 f1 d9 e4 d5 f0  f0 f1 40 00 00 00 01 01  |VOL1RUN001 .....|";

#[test]
fn dasd_read_vol1_example() {
    let dir = tempfile::tempdir().unwrap();
    let img = dasdinit(dir.path());
    let img = img.to_str().unwrap();
    let (code, out, err) = vccw(&["run", "--dasd", img, "examples/dasd-read-vol1.ccw"]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "device: 3390 on",
        "(read-only)",
        "interrupt 1 (final):",
        "fctl=0x4 (start)",
        "actl=0x00 ()",
        "stctl=0x07 (primary|secondary|status-pending)",
        "CPA (guest)=0x00001018",
        "dstat=0x0c (channel-end|device-end)",
        "cstat=0x00 ()",
        "residual count=0",
        VOL1_LINE,
        "HERCULE|",
        "result: ok",
    ] {
        assert!(out.contains(want), "{want:?} missing in:\n{out}");
    }
}

#[test]
fn dasd_search_read_example() {
    let dir = tempfile::tempdir().unwrap();
    let img = dasdinit(dir.path());
    let (code, out, err) = vccw(&[
        "run",
        "--dasd",
        img.to_str().unwrap(),
        "examples/dasd-search-read.ccw",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("CPA (guest)=0x00001020"), "{out}");
    assert!(
        out.contains("residual count=4016"),
        "SLI read of 80 bytes: {out}"
    );
    assert!(out.contains(VOL1_LINE), "{out}");
}

#[test]
fn tape_write_read_example_and_read_only_check() {
    let dir = tempfile::tempdir().unwrap();
    let tape = dir.path().join("t.aws");
    drop(vccw::image::awstape::AwsTape::create(&tape).unwrap());
    let t = tape.to_str().unwrap();
    let (code, out, err) = vccw(&[
        "run",
        "--write",
        "--tape",
        t,
        "examples/tape-write-read.ccw",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("device: 3490 on"), "{out}");
    assert!(out.contains("(read-write)"), "{out}");
    assert!(out.contains("residual count=1003"), "{out}");
    assert!(out.contains("|..<<|....&.HELLO|"), "{out}");
    assert!(out.contains("| TAPE|"), "{out}");
    // The tape holds the block and the tape mark.
    let mut at =
        vccw::image::awstape::AwsTape::open(&tape, vccw::image::awstape::OpenMode::ReadOnly)
            .unwrap();
    let map = at.map().unwrap();
    assert_eq!(map.len(), 2, "{map:?}");
    // Read-only (no --write): the write is refused with unit check; exit code 1 and the
    // sense bytes (command reject, byte 0 bit 0; write protected in byte 1) are shown.
    let (code, out, _) = vccw(&["run", "--tape", t, "examples/tape-write-read.ccw"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unit-check"), "{out}");
    assert!(out.contains("sense bytes (concurrent sense):"), "{out}");
    assert!(out.contains("    00: 80 "), "{out}");
    assert!(out.contains("result: check"), "{out}");
}

#[test]
fn usage_errors_exit_2_and_refused_programs_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let img = dasdinit(dir.path());
    let img = img.to_str().unwrap();
    // No device, two devices, a missing image, a missing program, a bad program.
    let (code, _, _) = vccw(&["run", "examples/dasd-read-vol1.ccw"]);
    assert_eq!(code, 2);
    let (code, _, _) = vccw(&[
        "run",
        "--dasd",
        img,
        "--tape",
        img,
        "examples/dasd-read-vol1.ccw",
    ]);
    assert_eq!(code, 2);
    let (code, _, err) = vccw(&[
        "run",
        "--dasd",
        "/nonexistent",
        "examples/dasd-read-vol1.ccw",
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = vccw(&["run", "--dasd", img, "/nonexistent.ccw"]);
    assert_eq!(code, 2, "{err}");
    let bad = dir.path().join("bad.ccw");
    std::fs::write(&bad, "orb cpa=0x1000\nccw 0x1000 read bogus 1 0\n").unwrap();
    let (code, _, err) = vccw(&["run", "--dasd", img, bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("line 2"), "{err}");
    // A TIC to a TIC: the translator refuses the start (-EINVAL-class errno): exit 1.
    let (code, out, _) = vccw(&["run", "--dasd", img, "examples/tic-to-tic.ccw"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("start refused"), "{out}");
    // A write to a read-only volume: unit check, exit 1.
    let w = dir.path().join("w.ccw");
    std::fs::write(
        &w,
        "orb fmt=1 cpa=0x1000\nmap 0 0x10000 rw\n\
         data 0x2000 c0c01000 00000000 00000000 0000000e\n\
         data 0x2010 01800001 00000000 00000000 03ff0050\n\
         ccw 0x1000 0x63 cc 16 0x2000\nccw 0x1008 0x47 cc 16 0x2010\n\
         ccw 0x1010 0x85 - 80 0x3000\n",
    )
    .unwrap();
    let (code, out, _) = vccw(&["run", "--dasd", img, w.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("dstat=0x0e (channel-end|device-end|unit-check)"),
        "{out}"
    );
}

#[test]
fn input_ccw_areas_are_dumped_without_dump_statements() {
    let dir = tempfile::tempdir().unwrap();
    let img = dasdinit(dir.path());
    // The search example without its dump statement: the Read Data area is walked from the
    // program (reached through the status-modifier skip), all 4096 bytes of it.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dasd-search-read.ccw"),
    )
    .unwrap();
    let p = dir.path().join("nodump.ccw");
    std::fs::write(&p, text.replace("dump 0x10000 80", "")).unwrap();
    let (code, out, _) = vccw(&["run", "--dasd", img.to_str().unwrap(), p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("data areas of the input CCWs:"), "{out}");
    assert!(out.contains("0x10000 (4096 bytes):"), "{out}");
    assert!(out.contains(VOL1_LINE), "{out}");
}
