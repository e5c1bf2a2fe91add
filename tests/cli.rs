//! The `vccw` command line on the shipped examples.

mod common;

fn vccw(args: &[&str]) -> (i32, String) {
    let out = common::command(env!("CARGO_BIN_EXE_vccw"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run vccw");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn translate_sense_id_example() {
    let (code, out) = vccw(&["translate", "examples/sense-id.ccw"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("fmt1=1 c64=1 i2k=0"), "{out}");
    assert!(
        out.contains("(guest 0x2f00)") && out.contains("(guest 0x3000)"),
        "{out}"
    );
    assert!(out.contains("pinned pages (3 pins)"), "{out}");
}

#[test]
fn translate_midaw_example_expands_out_of_line() {
    let (code, out) = vccw(&["translate", "examples/midaw-scatter.ccw"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cmd=0x02 flags=0x90 count=512"),
        "skipped piece: {out}"
    );
    assert!(out.contains("pinned pages (2 pins)"), "{out}");
}

#[test]
fn translate_format0_example_uses_2k_idaws() {
    let (code, out) = vccw(&["translate", "examples/format0-idal.ccw"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("i2k=1"), "{out}");
}

#[test]
fn refused_program_prints_errno_and_status() {
    let (code, out) = vccw(&["translate", "examples/tic-to-tic.ccw"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("errno: 22"), "{out}");
    assert!(out.contains("program check"), "{out}");
}

#[test]
fn bad_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.ccw");
    std::fs::write(&f, "orb cpa=0x1000\nccw 0x1000 read bogus 1 0\n").unwrap();
    let (code, out) = vccw(&["translate", f.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("line 2") && out.contains("bogus"), "{out}");
    let (code, _) = vccw(&["translate", "/nonexistent.ccw"]);
    assert_eq!(code, 2);
}
