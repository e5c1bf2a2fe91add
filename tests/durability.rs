//! Durability: kill -9 of `vccw serve` in the middle of a write stream loses no write it
//! acknowledged.
//!
//! Each round starts the server on the same images, first checks every write acknowledged
//! in earlier rounds (read back through the server), then a client streams writes — 3390
//! tracks formatted with Write CKD (12 records of 4 KiB in one I/O) then each record
//! rewritten with Write Data, every record content distinct, interleaved with 4 KiB tape
//! blocks written from load point — recording as acknowledged each write whose final status
//! is exactly channel end + device end. Another thread kill -9s the server after a random
//! delay. With the server dead, the images are checked by Hercules' own tools: `dasdseq`
//! reads every acknowledged track and must show its records' acknowledged content, `dasdls`
//! must open the volume, `tapemap` must list at least the acknowledged blocks in file 1.
//! A write in flight at the kill may or may not have landed: for it both the old and the new
//! content are accepted. The last round's data is read back through a restarted server.
//!
//! Needs the Hercules utilities (`apt-get install hercules`).

mod common;
use common::tool;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use vccw::client::workload::{pattern, Guest, WorkloadError};
use vccw::client::GuestMemory;
use vccw::image::awstape::AwsTape;
use vccw::image::ckd::CkdImage;
use vccw::loadtest::{
    connect_retry, format_track, read_record, tape_read, tape_rewind, tape_write, write_record,
    ServerProcess, RECORD, RECORDS_PER_TRACK,
};

const ROUNDS: u32 = 6;
/// Cylinders each round writes (cylinder 0 holds the volume label).
const CYLS_PER_ROUND: u32 = 2;
const HEADS: u16 = 15;
/// dasdseq deblocks each 4096-byte block into 80-byte records: 52 of them, the last padded.
const DASDSEQ_BLOCK: usize = 52 * 80;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vccw"))
}

/// xorshift64*: reproducible delays from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Distinct content of a record: round, address and version in the seed.
fn content(round: u32, cyl: u16, head: u16, rec: u8, version: u32) -> Vec<u8> {
    let seed = (round << 28) ^ ((cyl as u32) << 16) ^ ((head as u32) << 8) ^ version;
    pattern(rec as u32, seed, RECORD)
}

fn block(round: u32, n: u32) -> Vec<u8> {
    pattern(n, 0x7A9E_0000 ^ (round << 20), RECORD)
}

/// What may be in a record: its acknowledged content, and the content of a write that was
/// in flight when the server was killed.
type Expect = BTreeMap<(u16, u16, u8), Vec<Vec<u8>>>;

#[derive(Debug, Default)]
struct Round {
    dasd_acked: u64,
    tape_acked: u32,
    /// Tracks whose format write was acknowledged.
    tracks: Vec<(u16, u16)>,
    killed_mid_dasd: bool,
}

/// Streams writes until the server dies (or the round's cylinders are full: then tape
/// only). `expect` gains every acknowledged record.
fn stream(
    srv: &ServerProcess,
    round: u32,
    expect: &mut Expect,
    killed: &AtomicBool,
    first_ack: &AtomicBool,
) -> Round {
    let sock = |k: &str| {
        srv.ready
            .iter()
            .find(|r| r.kind == k)
            .map(|r| r.socket.clone())
            .unwrap()
    };
    let far = Instant::now() + Duration::from_secs(10);
    // The kill may come before the clients are even set up (slow machines, qemu-user): that
    // round then acknowledges nothing. Before the kill, any failure is a real error.
    let setup = (|| -> Result<_, String> {
        let dasd = connect_retry(&sock("3390"), far)
            .map_err(|e| e.to_string())?
            .0
            .ok_or("connect: still refused at the deadline")?;
        let tape = connect_retry(&sock("3490"), far)
            .map_err(|e| e.to_string())?
            .0
            .ok_or("connect: still refused at the deadline")?;
        let (dm, tm) = (
            GuestMemory::new(128 << 10).map_err(|e| e.to_string())?,
            GuestMemory::new(128 << 10).map_err(|e| e.to_string())?,
        );
        dasd.map_memory(&dm, 0).map_err(|e| e.to_string())?;
        tape.map_memory(&tm, 0).map_err(|e| e.to_string())?;
        Ok((dasd, tape, dm, tm))
    })();
    let (dasd, tape, dm, tm) = match setup {
        Ok(x) => x,
        Err(e) => {
            assert!(
                killed.load(Ordering::SeqCst),
                "setup failed before the kill: {e}"
            );
            return Round::default();
        }
    };
    let (mut s1, mut s2) = (std::io::sink(), std::io::sink());
    let timeout = Duration::from_secs(1);
    let mut dg = Guest::new(&dasd, &dm, &mut s1, timeout);
    let mut tg = Guest::new(&tape, &tm, &mut s2, timeout);
    let mut r = Round::default();
    // A failure before the kill is a real error, not the crash.
    let check = |e: WorkloadError, what: &str| {
        assert!(
            killed.load(Ordering::SeqCst),
            "{what} failed before the kill: {e}"
        );
    };
    if let Err(e) = tape_rewind(&mut tg) {
        check(e, "rewind");
        return r;
    }
    let first_cyl = (1 + round * CYLS_PER_ROUND) as u16;
    let steps = CYLS_PER_ROUND as usize * HEADS as usize * (1 + RECORDS_PER_TRACK as usize);
    for step in 0.. {
        if step < steps {
            let track = step / (1 + RECORDS_PER_TRACK as usize);
            let cyl = first_cyl + (track / HEADS as usize) as u16;
            let head = (track % HEADS as usize) as u16;
            let sub = (step % (1 + RECORDS_PER_TRACK as usize)) as u8;
            let res = if sub == 0 {
                format_track(&mut dg, &dm, cyl, head, RECORDS_PER_TRACK, &|rec| {
                    content(round, cyl, head, rec, 0)
                })
            } else {
                write_record(
                    &mut dg,
                    &dm,
                    cyl,
                    head,
                    sub,
                    &content(round, cyl, head, sub, 1),
                )
            };
            match res {
                Ok(()) if sub == 0 => {
                    r.tracks.push((cyl, head));
                    r.dasd_acked += 1;
                    first_ack.store(true, Ordering::SeqCst);
                    for rec in 1..=RECORDS_PER_TRACK {
                        expect.insert((cyl, head, rec), vec![content(round, cyl, head, rec, 0)]);
                    }
                }
                Ok(()) => {
                    r.dasd_acked += 1;
                    first_ack.store(true, Ordering::SeqCst);
                    expect.insert((cyl, head, sub), vec![content(round, cyl, head, sub, 1)]);
                }
                Err(e) => {
                    check(e, "DASD write");
                    r.killed_mid_dasd = true;
                    if sub != 0 {
                        // In flight: either version may be on the image.
                        expect
                            .get_mut(&(cyl, head, sub))
                            .unwrap()
                            .push(content(round, cyl, head, sub, 1));
                    }
                    return r;
                }
            }
        }
        match tape_write(&mut tg, &tm, &block(round, r.tape_acked)) {
            Ok(()) => r.tape_acked += 1,
            Err(e) => {
                check(e, "tape write");
                return r;
            }
        }
    }
    r
}

/// Reads every expected record and `blocks` tape blocks back through the server.
fn verify_through_server(srv: &ServerProcess, expect: &Expect, round: u32, blocks: u32) {
    let sock = |k: &str| {
        srv.ready
            .iter()
            .find(|r| r.kind == k)
            .map(|r| r.socket.clone())
            .unwrap()
    };
    let far = Instant::now() + Duration::from_secs(10);
    let dasd = connect_retry(&sock("3390"), far).unwrap().0.unwrap();
    let mem = GuestMemory::new(128 << 10).unwrap();
    dasd.map_memory(&mem, 0).unwrap();
    let mut sink = std::io::sink();
    let mut g = Guest::new(&dasd, &mem, &mut sink, Duration::from_secs(10));
    for (&(cyl, head, rec), ok) in expect {
        let got = read_record(&mut g, &mem, cyl, head, rec)
            .unwrap_or_else(|e| panic!("read cyl {cyl} head {head} R{rec}: {e}"));
        assert!(
            ok.contains(&got),
            "cyl {cyl} head {head} R{rec}: acknowledged content lost"
        );
    }
    let tape = connect_retry(&sock("3490"), far).unwrap().0.unwrap();
    let tm = GuestMemory::new(128 << 10).unwrap();
    tape.map_memory(&tm, 0).unwrap();
    let mut sink = std::io::sink();
    let mut tg = Guest::new(&tape, &tm, &mut sink, Duration::from_secs(10));
    tape_rewind(&mut tg).unwrap();
    for b in 0..blocks {
        let got = tape_read(&mut tg, &tm, RECORD).unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&block(round, b)[..]),
            "tape block {b} of round {round} lost"
        );
    }
}

/// `dasdseq -expert IMAGE -abs CYL HEAD 1 OUT` for every acknowledged track: each record's
/// block must hold acceptable content. Returns the records checked.
fn verify_with_dasdseq(image: &Path, dir: &Path, tracks: &[(u16, u16)], expect: &Expect) -> u64 {
    let out = dir.join("dasdseq.bin");
    let mut checked = 0;
    for &(cyl, head) in tracks {
        let _ = std::fs::remove_file(&out);
        let o = Command::new(tool("dasdseq"))
            .arg("-expert")
            .arg(image)
            .args(["-abs", &cyl.to_string(), &head.to_string(), "1"])
            .arg(&out)
            .output()
            .expect("run dasdseq");
        assert!(
            o.status.success(),
            "dasdseq cyl {cyl} head {head}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let bytes = std::fs::read(&out).expect("dasdseq output");
        for rec in 1..=RECORDS_PER_TRACK {
            let at = (rec as usize - 1) * DASDSEQ_BLOCK;
            let got = bytes
                .get(at..at + RECORD)
                .unwrap_or_else(|| panic!("dasdseq: cyl {cyl} head {head} R{rec} missing"));
            assert!(
                expect[&(cyl, head, rec)].iter().any(|c| c[..] == got[..]),
                "dasdseq: cyl {cyl} head {head} R{rec} is not the acknowledged content"
            );
            checked += 1;
        }
    }
    checked
}

/// `dasdls IMAGE` opens the volume (exit 0).
fn dasdls_ok(image: &Path) {
    let o = Command::new(tool("dasdls")).arg(image).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "dasdls: {err}");
    assert!(
        !err.contains("open error") && !err.contains("HHCDA"),
        "dasdls: {err}"
    );
}

/// Walks the AWSTAPE header chain of `tape` (6-byte headers: current length and previous
/// length, little-endian, then flags): the complete blocks, the offset after the last one,
/// its length, and whether bytes of a torn write follow it.
fn aws_walk(tape: &Path) -> (u32, usize, u16, bool) {
    let b = std::fs::read(tape).unwrap();
    let (mut at, mut blocks, mut prev) = (0usize, 0u32, 0u16);
    while let Some(h) = b.get(at..at + 6) {
        let cur = u16::from_le_bytes([h[0], h[1]]);
        let prv = u16::from_le_bytes([h[2], h[3]]);
        assert_eq!(prv, prev, "AWSTAPE chain broken at offset {at}");
        if at + 6 + cur as usize > b.len() {
            break;
        }
        // Tape marks (flags 0x40) end a file; the stream writes none.
        assert_eq!(h[4] & 0x40, 0, "unexpected tape mark at offset {at}");
        at += 6 + cur as usize;
        prev = cur;
        blocks += 1;
    }
    (blocks, at, prev, at != b.len())
}

/// `tapemap` of a copy of the crashed tape cut after its last complete block and closed
/// with a tape mark (what a guest does on restart; Hercules' tools only count a file at
/// its tape mark): the blocks of file 1, and tapemap's output.
fn tapemap(tape: &Path, dir: &Path) -> (u32, String) {
    let (_, end, prev, _) = aws_walk(tape);
    let copy = dir.join("tapemap.aws");
    let mut b = std::fs::read(tape).unwrap();
    b.truncate(end);
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&prev.to_le_bytes());
    b.extend_from_slice(&[0x40, 0]);
    std::fs::write(&copy, &b).unwrap();
    let o = Command::new(tool("tapemap")).arg(&copy).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "tapemap:\n{text}");
    let blocks = text
        .lines()
        .find_map(|l| l.strip_prefix("File 1: Blocks="))
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (blocks, text)
}

#[test]
fn kill_9_mid_stream_loses_no_acknowledged_write() {
    let seed = std::env::var("VCCW_DURABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("seed {seed} (VCCW_DURABILITY_SEED to repeat)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dur.ckd");
    let aws = dir.path().join("dur.aws");
    CkdImage::create_3390(&img, 1 + ROUNDS * CYLS_PER_ROUND, Some("DURA01")).unwrap();
    AwsTape::create(&aws).unwrap();
    let (dasd, tape) = (vec![img.clone()], vec![aws.clone()]);
    let mut expect = Expect::new();
    let (mut acked, mut lost, mut hercules_checked, mut mid_dasd) = (0u64, 0u64, 0u64, 0);
    let mut last: Option<(u32, u32)> = None;
    for round in 0..ROUNDS {
        let srv = ServerProcess::start(&exe(), dir.path(), &dasd, &tape).unwrap();
        if let Some((r, blocks)) = last {
            verify_through_server(&srv, &expect, r, blocks);
        }
        let delay = Duration::from_millis((30 + rng.next() % 300) * common::slowdown() as u64);
        let killed = Arc::new(AtomicBool::new(false));
        let first_ack = Arc::new(AtomicBool::new(false));
        let pid = Pid::from_raw(srv.pid() as i32);
        let (k, f) = (killed.clone(), first_ack.clone());
        let killer = std::thread::spawn(move || {
            // The delay counts from the first acknowledged DASD write: connecting and mapping
            // take a variable time (much longer under qemu-user on a loaded machine), and a
            // round must have acknowledged writes to check.
            let t0 = Instant::now();
            while !f.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(delay);
            k.store(true, Ordering::SeqCst);
            kill(pid, Signal::SIGKILL).unwrap();
        });
        let r = stream(&srv, round, &mut expect, &killed, &first_ack);
        killer.join().unwrap();
        let status = srv.kill9().unwrap();
        assert!(!status.success(), "the server was not killed: {status}");
        // The crashed images, as Hercules sees them.
        dasdls_ok(&img);
        hercules_checked += verify_with_dasdseq(&img, dir.path(), &r.tracks, &expect);
        let (walked, _, _, torn) = aws_walk(&aws);
        let (blocks, text) = tapemap(&aws, dir.path());
        assert!(
            blocks >= r.tape_acked && walked >= r.tape_acked,
            "tapemap lists {blocks} blocks, the chain {walked}, {} acknowledged:\n{text}",
            r.tape_acked
        );
        assert!(text.contains("End of tape."), "tapemap:\n{text}");
        println!(
            "round {round}: killed after {delay:?}; acknowledged {} DASD writes ({} tracks), \
             {} tape blocks; tapemap lists {blocks} blocks in file 1{}",
            r.dasd_acked,
            r.tracks.len(),
            r.tape_acked,
            if torn {
                " (a torn block after them)"
            } else {
                ""
            }
        );
        mid_dasd += r.killed_mid_dasd as u32;
        acked += r.dasd_acked + r.tape_acked as u64;
        lost += r.tape_acked.saturating_sub(blocks) as u64;
        assert!(
            r.dasd_acked > 0,
            "round {round}: no DASD write before the kill"
        );
        last = Some((round, r.tape_acked));
    }
    // The last round's writes through a restarted server, then a clean stop.
    let srv = ServerProcess::start(&exe(), dir.path(), &dasd, &tape).unwrap();
    let (r, blocks) = last.unwrap();
    verify_through_server(&srv, &expect, r, blocks);
    assert!(srv.terminate().unwrap().success());
    dasdls_ok(&img);
    println!(
        "rounds {ROUNDS} (killed mid-DASD-stream {mid_dasd}), writes acknowledged {acked}, \
         records checked with dasdseq {hercules_checked}, \
         records read back {}, lost {lost}",
        expect.len()
    );
    assert_eq!(lost, 0);
}
