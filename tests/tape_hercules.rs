//! Interoperability with the Hercules tape tools (Debian package `hercules`): a tape written
//! through the vccw 3490 model is mapped by `tapemap` / `hetmap`, and tapes written by
//! `hetinit` / `hetupd` are read back by the model.
//!
//! These tests need the tools and fail (never skip) without them: `apt-get install hercules`.

use std::path::Path;
use std::process::Command as Proc;

use vccw::ccw::CommandKind;
use vccw::css::device::{Command, DeviceModel, Outcome};
use vccw::devices::tape3490::{cmd, Tape3490, Tape3490Config};
use vccw::image::awstape::{AwsTape, OpenMode, Record};

const CE_DE: u8 = 0x0C;
const CE_DE_UX: u8 = 0x0D;
const CE_DE_UC: u8 = 0x0E;

fn tool(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "the Hercules tool `{name}` is missing: install it with `apt-get install -y hercules`"
    );
    name.to_string()
}

fn run(name: &str, args: &[&str]) -> String {
    let out = Proc::new(tool(name)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

fn exec(d: &mut Tape3490, code: u8, data: &mut [u8]) -> Outcome {
    let n = data.len();
    d.execute(&command(code, n), data)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes blocks (Some) and tape marks (None) through the device model.
fn write_tape(path: &Path, items: &[Option<Vec<u8>>]) {
    let t = AwsTape::create(path).unwrap();
    let mut d = Tape3490::with_tape(t, Tape3490Config::default());
    for it in items {
        let o = match it {
            Some(b) => exec(&mut d, cmd::WRITE, &mut b.clone()),
            None => exec(&mut d, cmd::WRITE_TAPE_MARK, &mut []),
        };
        assert_eq!(o.status, CE_DE);
    }
}

/// `File N: Blocks=B, block size min=X, max=Y` lines of tapemap / hetmap -t.
fn parse_map(text: &str) -> Vec<(u32, u32, u32, u32)> {
    let mut v = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("File ") else {
            continue;
        };
        let nums: Vec<u32> = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(nums.len(), 4, "unexpected tapemap line {line:?}");
        v.push((nums[0], nums[1], nums[2], nums[3]));
    }
    v
}

#[test]
fn tape_written_by_vccw_is_mapped_by_tapemap() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vccw.aws");
    let ps = p.to_str().unwrap();
    write_tape(
        &p,
        &[
            Some(pattern(80, 1)),
            Some(pattern(800, 2)),
            Some(pattern(32760, 3)),
            None,
            Some(pattern(65535, 4)),
            Some(pattern(1, 5)),
            None,
            None,
        ],
    );
    let want = vec![(1, 3, 80, 32760), (2, 2, 1, 65535), (3, 0, 0, 0)];
    let text = run("tapemap", &[ps]);
    assert_eq!(parse_map(&text), want, "tapemap output:\n{text}");
    assert!(text.contains("End of tape."), "{text}");
    // hetmap (HETLIB) reads the same tape block by block.
    let text = run("hetmap", &["-t", ps]);
    assert_eq!(parse_map(&text), want, "hetmap output:\n{text}");
}

#[test]
fn block_over_64k_is_segmented_as_tapemap_sees_it() {
    // tapemap (Hercules 3.13) counts AWSTAPE segments, so a 200000-byte block written as
    // 65535+65535+65535+3395 shows as 4 "blocks" with max 65535: the segmentation and the
    // length chain are what tapemap walks.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.aws");
    let big = pattern(200_000, 7);
    write_tape(&p, &[Some(big.clone()), Some(pattern(10, 8)), None]);
    let text = run("tapemap", &[p.to_str().unwrap()]);
    assert_eq!(
        parse_map(&text),
        vec![(1, 5, 10, 65535)],
        "tapemap output:\n{text}"
    );
    let mut t = AwsTape::open(&p, OpenMode::ReadOnly).unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        t.read_forward(&mut buf).unwrap(),
        Record::Block {
            len: 200_000,
            segments: 4
        }
    );
    assert_eq!(buf, big);
}

#[test]
fn hetinit_tape_is_read_by_vccw() {
    let dir = tempfile::tempdir().unwrap();
    let het = dir.path().join("init.het");
    let aws = dir.path().join("init.aws");
    run(
        "hetinit",
        &["-d", het.to_str().unwrap(), "VOL001", "OWNERX"],
    );
    // Strict AWSTAPE: no compression, 4096-byte chunks.
    run(
        "hetupd",
        &["-s", het.to_str().unwrap(), aws.to_str().unwrap()],
    );
    let t = AwsTape::open(&aws, OpenMode::ReadOnly).unwrap();
    let mut d = Tape3490::with_tape(t, Tape3490Config::default());
    let mut b = vec![0u8; 80];
    assert_eq!(exec(&mut d, cmd::READ_FORWARD, &mut b), Outcome::done(80));
    // EBCDIC "VOL1VOL001"
    assert_eq!(
        &b[..10],
        &[0xE5, 0xD6, 0xD3, 0xF1, 0xE5, 0xD6, 0xD3, 0xF0, 0xF0, 0xF1]
    );
    // EBCDIC "OWNERX" at offset 41 (owner field).
    assert_eq!(&b[41..47], &[0xD6, 0xE6, 0xD5, 0xC5, 0xD9, 0xE7]);
    let mut b = vec![0u8; 100];
    let o = exec(&mut d, cmd::READ_FORWARD, &mut b);
    assert_eq!((o.status, o.transferred, o.more), (CE_DE, 80, false));
    // EBCDIC "HDR1"
    assert_eq!(&b[..4], &[0xC8, 0xC4, 0xD9, 0xF1]);
    assert_eq!(exec(&mut d, cmd::READ_FORWARD, &mut b).status, CE_DE_UX);
    // End of recorded data: unit check, data check, tape void.
    assert_eq!(exec(&mut d, cmd::READ_FORWARD, &mut b).status, CE_DE_UC);
    let mut s = vec![0u8; 32];
    exec(&mut d, cmd::SENSE, &mut s);
    assert_eq!((s[0], s[3]), (0x08, 0x31));
}

#[test]
fn hetupd_rechunked_tape_is_read_by_vccw() {
    // vccw writes 65535-byte segments; hetupd -s rewrites the tape with Hercules' own
    // writer in 4096-byte segments, which vccw must reassemble, forward and backward.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.aws");
    let dst = dir.path().join("dst.aws");
    let blocks = [pattern(20_000, 1), pattern(4096, 2), pattern(65535, 3)];
    write_tape(
        &src,
        &[
            Some(blocks[0].clone()),
            Some(blocks[1].clone()),
            None,
            Some(blocks[2].clone()),
            None,
        ],
    );
    run(
        "hetupd",
        &["-s", src.to_str().unwrap(), dst.to_str().unwrap()],
    );

    let mut t = AwsTape::open(&dst, OpenMode::ReadOnly).unwrap();
    let segs: Vec<Record> = t.map().unwrap().iter().map(|e| e.record).collect();
    assert_eq!(
        segs,
        vec![
            Record::Block {
                len: 20_000,
                segments: 5
            },
            Record::Block {
                len: 4096,
                segments: 1
            },
            Record::TapeMark,
            Record::Block {
                len: 65535,
                segments: 16
            },
            Record::TapeMark,
        ]
    );

    let mut d = Tape3490::with_tape(t, Tape3490Config::default());
    for b in &blocks[..2] {
        let mut got = vec![0u8; 70_000];
        let o = exec(&mut d, cmd::READ_FORWARD, &mut got);
        assert_eq!((o.status, o.transferred), (CE_DE, b.len()));
        assert_eq!(&got[..b.len()], &b[..]);
    }
    assert_eq!(exec(&mut d, cmd::READ_FORWARD, &mut []).status, CE_DE_UX);
    let mut got = vec![0u8; 65535];
    assert_eq!(
        exec(&mut d, cmd::READ_FORWARD, &mut got),
        Outcome::done(65535)
    );
    assert_eq!(got, blocks[2]);
    // Backward over the 16-segment block: last byte first.
    let mut got = vec![0u8; 65535];
    assert_eq!(
        exec(&mut d, cmd::READ_BACKWARD, &mut got),
        Outcome::done(65535)
    );
    got.reverse();
    assert_eq!(got, blocks[2]);
    assert_eq!(exec(&mut d, cmd::BACKSPACE_BLOCK, &mut []).status, CE_DE_UX);
    let mut got = vec![0u8; 20_000];
    let o = exec(&mut d, cmd::READ_BACKWARD, &mut got);
    assert_eq!((o.status, o.transferred, o.more), (CE_DE, 4096, false));
    let mut got = vec![0u8; 20_000];
    assert_eq!(
        exec(&mut d, cmd::READ_BACKWARD, &mut got),
        Outcome::done(20_000)
    );
    got.reverse();
    assert_eq!(got, blocks[0]);
}
