//! The in-process I/O path, end to end, against the floors measured in the same run.
//!
//! * `floor/eventfd`: one-way blocking wake-up between two threads (eventfd ping-pong / 2).
//! * `floor/spin`: one-way hand-off between two spinning threads (atomic ping-pong / 2).
//! * `floor/signal`: an eventfd write + non-blocking read on one thread (the notification
//!   alone, no thread woken).
//! * `floor/latch`: the same through an in-process `IrqLatch` (notify + take).
//! * `rt4k/<mode>/<wait>`: SSCH -> IRB for a Linux-style 4 KiB DASD read (Define Extent +
//!   Locate Record + Read Data MT through a one-IDAW IDAL): write ORB + SCSW into the I/O
//!   region, wait for the IO eventfd (blocking `poll`+`read`, or a spin on a non-blocking
//!   `read`), read the IRB. p50 / p99 over `N` I/Os. Modes: `inline` (the default policy:
//!   START runs the program and presents the status on the client's thread, no hand-off),
//!   or the program on the channel thread, which spins (`spin50`, 50 us) or blocks at once
//!   (`nospin`) when idle. `inline/latch` is `inline` with the IO interrupt delivered
//!   through an in-process `IrqLatch` instead of the eventfd (an embedding in the same
//!   process; the rows with an eventfd are what a client of the vfio-ccw uAPI pays).
//! * `seq1m`: 1 MiB sequential read (256 x 4 KiB records, one program: DE, LR 128, 128 Read
//!   Data, TIC, LR 128, 128 Read Data) through the whole stack vs `memcpy` of 1 MiB.
//!
//! Every figure is also given as a ratio to the floor the path pays: on the channel thread a
//! round trip is two hand-offs (client -> channel thread, channel thread -> client); inline
//! it is none, only the eventfd signal.
//!
//! Run: `cargo bench --bench io_path` (env `IO_PATH_N` = I/Os per round-trip series,
//! default 20000; `IO_PATH_SEQ_ONLY=REPS` / `IO_PATH_RT_ONLY=REPS` run only the 1 MiB read
//! (then as many 1 MiB memcpys, its floor) / the blocking 4 KiB round trip, REPS times, for a
//! profiler; inline unless `IO_PATH_THREAD`
//! is set, through the eventfd unless `IO_PATH_LATCH` is set).

use std::hint::black_box;
use std::time::{Duration, Instant};

use vccw::ccw::{Ccw1, CcwFlags};
use vccw::css::{InlinePolicy, SpinPolicy, SubchannelConfig};
use vccw::devices::dasd3390::Dasd3390;
use vccw::driver::State;
use vccw::image::ckd::{CkdImage, CkdOpenOptions};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
use vccw::orb::{dstat, Orb, OrbControls};
use vccw::runner::{is_final, Stack, Wait};

#[path = "common/floors.rs"]
mod floors;

const T: Duration = Duration::from_secs(10);
const DATA: u64 = 0x10_0000;
const REC: usize = 4096;
/// 4 KiB records per 3390 track (Linux's formatting).
const PER_TRACK: u8 = 12;

/// CPU time of the whole process (both threads): what the path costs whatever the waits.
fn cpu_time() -> Duration {
    let mut r = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage struct we pass; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, r.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: zero-initialised and filled by a successful getrusage.
    let r = unsafe { r.assume_init() };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(us(r.ru_utime) + us(r.ru_stime))
}

fn orb(cpa: u32) -> Orb {
    Orb {
        intparm: 1,
        ctl: OrbControls::new()
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

fn de(mask: u8, ecyl: u16, ehead: u16) -> Vec<u8> {
    vccw::client::workload::define_extent(mask, (1, 0), (ecyl, ehead), 0x1000).to_vec()
}

fn lr(oper: u8, count: u8, cyl: u16, head: u16, rec: u8) -> Vec<u8> {
    vccw::client::workload::locate_record(oper, count, cyl, head, rec, 0x1000).to_vec()
}

struct Bench {
    stack: Stack,
    _dir: tempfile::TempDir,
}

impl Bench {
    fn put(&self, addr: u64, b: &[u8]) {
        self.stack.store().write(addr, b).unwrap();
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

    /// One I/O; returns its SSCH -> IRB time.
    fn io(&mut self, cpa: u32, wait: Wait) -> Duration {
        let o = orb(cpa);
        let t0 = Instant::now();
        self.stack.start(&o).expect("start");
        // Until the program's final status: a signal may be left over from earlier status.
        let irb = loop {
            self.stack.wait_irq(wait, T).expect("interrupt");
            let irb = self.stack.irb().expect("irb");
            if is_final(&irb.scsw) && self.stack.device().state() == State::Idle {
                break irb;
            }
        };
        let t = t0.elapsed();
        assert_eq!(
            irb.scsw.dstat,
            dstat::CHANNEL_END | dstat::DEVICE_END,
            "{:?}",
            irb.scsw
        );
        black_box(irb);
        t
    }
}

/// A volume with cylinder 1 and 2 formatted with 12 x 4 KiB records per track (patterned),
/// behind the whole stack.
/// For the single-series runs: inline (the default) unless `IO_PATH_THREAD` is set.
fn setup(spin: SpinPolicy) -> Bench {
    let inline = if std::env::var_os("IO_PATH_THREAD").is_some() {
        InlinePolicy::OFF
    } else {
        InlinePolicy::default()
    };
    setup_with(spin, inline)
}

/// As [`setup`], with the subchannel's inline policy given.
fn setup_with(spin: SpinPolicy, inline: InlinePolicy) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.3390");
    drop(CkdImage::create_3390(&path, 4, Some("BENCH1")).unwrap());
    let img = CkdImage::open(
        &path,
        CkdOpenOptions {
            read_only: false,
            sync_writes: false,
        },
    )
    .unwrap();
    let dev = Dasd3390::new(img, 0x100).unwrap();
    let store = IommuStore::new(StoreConfig::default());
    store
        .map_dma(0, DATA, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    store
        .map_dma(DATA, 0x20_0000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    let cfg = SubchannelConfig {
        spin,
        inline,
        ..Default::default()
    };
    let stack = Stack::with_config(Box::new(dev), store, cfg).unwrap();
    let mut b = Bench { stack, _dir: dir };
    // Format (Write CKD, count fields only + SLI, as Linux does) then write the data.
    for cyl in 1..=2u16 {
        for head in 0..15u16 {
            b.put(0x2000, &de(0xC0, 2, 14));
            b.put(0x2010, &lr(0x03, PER_TRACK, cyl, head, 0));
            b.ccw(0x1000, 0x63, cc(), 16, 0x2000);
            b.ccw(0x1008, 0x47, cc(), 16, 0x2010);
            for r in 0..PER_TRACK {
                let at = 0x3000 + 8 * r as u64;
                let mut c = cyl.to_be_bytes().to_vec();
                c.extend_from_slice(&head.to_be_bytes());
                c.extend_from_slice(&[r + 1, 0, 0x10, 0x00]);
                b.put(at, &c);
                let f = CcwFlags::new().with_sli(true).with_cc(r + 1 < PER_TRACK);
                b.ccw(0x1010 + 8 * r as u64, 0x1D, f, 8, at);
            }
            b.io(0x1000, Wait::Block);
        }
    }
    b
}

/// DE + LR + Read Data MT of (1,0,R1) into one page through a one-IDAW IDAL at 0x8000.
fn program_4k(b: &Bench) -> u32 {
    b.put(0x4000, &de(0x40, 2, 14));
    b.put(0x4010, &lr(0x06, 1, 1, 0, 1));
    b.put(0x8000, &DATA.to_be_bytes());
    b.ccw(0x5000, 0x63, cc(), 16, 0x4000);
    b.ccw(0x5008, 0x47, cc(), 16, 0x4010);
    b.ccw(
        0x5010,
        0x86,
        CcwFlags::new().with_ida(true),
        REC as u16,
        0x8000,
    );
    0x5000
}

/// 256 records (1 MiB) from (1,0,R1) on, into DATA.. DATA + 1 MiB, in two segments.
fn program_1m(b: &Bench) -> u32 {
    let base = 0x10000u64;
    b.put(0x4100, &de(0x40, 2, 14));
    b.put(0x4110, &lr(0x06, 128, 1, 0, 1));
    // Record 129 is (1, 10, R9): 128 = 10 tracks of 12 + 8.
    b.put(0x4120, &lr(0x06, 128, 1, 10, 9));
    let mut at = base;
    b.ccw(at, 0x63, cc(), 16, 0x4100);
    b.ccw(at + 8, 0x47, cc(), 16, 0x4110);
    at += 16;
    for i in 0..256u64 {
        if i == 128 {
            // A TIC starts a second segment (each segment stays under 256 CCWs).
            b.ccw(at, 0x08, CcwFlags::new(), 0, at + 8);
            b.ccw(at + 8, 0x47, cc(), 16, 0x4120);
            at += 16;
        }
        let idaw = 0x9000 + 8 * i;
        b.put(idaw, &(DATA + i * REC as u64).to_be_bytes());
        let f = CcwFlags::new().with_ida(true).with_cc(i < 255);
        b.ccw(at, 0x86, f, REC as u16, idaw);
        at += 8;
    }
    base as u32
}

/// `n` in-process latch signals taken on the same thread (the latch's floor).
fn latch_signal(n: u32) -> Duration {
    use vccw::driver::{IrqIndex, IrqLatch, IrqNotify};
    let l = IrqLatch::default();
    let t0 = Instant::now();
    for _ in 0..n {
        l.notify(IrqIndex::Io);
        assert_eq!(black_box(l.take()), 1);
    }
    t0.elapsed()
}

/// `reps` timed copies of 1 MiB between two buffers: the seq1m floor.
fn memcpy_1m(reps: usize) -> Vec<Duration> {
    let src = vec![0x5Au8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
            t0.elapsed()
        })
        .collect()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let n: usize = std::env::var("IO_PATH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        // `cargo test --all-targets` runs this once without `--bench`: a short smoke run.
        .unwrap_or(if std::env::args().any(|a| a == "--bench") {
            20_000
        } else {
            200
        });
    if let Some(reps) = std::env::var("IO_PATH_SEQ_ONLY")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        let mut b = setup(SpinPolicy::OFF);
        if std::env::var_os("IO_PATH_LATCH").is_some() {
            b.stack.use_latch();
        }
        let cpa = program_1m(&b);
        let (t0, c0) = (Instant::now(), cpu_time());
        let mut v: Vec<Duration> = (0..reps).map(|_| b.io(cpa, Wait::Block)).collect();
        let (mean, cpu) = (
            us(t0.elapsed()) / reps as f64,
            us(cpu_time() - c0) / reps as f64,
        );
        v.sort_unstable();
        // The floor right after, in the same process (see the full run's seq1m rows).
        let mut m = memcpy_1m(reps);
        m.sort_unstable();
        println!(
            "seq1m x{reps}: mean {mean:.1} us, p50 {:.1} us, min {:.1} us, CPU {cpu:.1} us per I/O; \
             memcpy p50 {:.1} us: stack/memcpy throughput {:.0}%",
            us(pct(&v, 0.5)),
            us(v[0]),
            us(pct(&m, 0.5)),
            100.0 * pct(&m, 0.5).as_secs_f64() / pct(&v, 0.5).as_secs_f64()
        );
        return;
    }
    if let Some(reps) = std::env::var("IO_PATH_RT_ONLY")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        let mut b = setup(SpinPolicy::OFF);
        if std::env::var_os("IO_PATH_LATCH").is_some() {
            b.stack.use_latch();
        }
        let cpa = program_4k(&b);
        let c0 = cpu_time();
        let mut v: Vec<Duration> = (0..reps).map(|_| b.io(cpa, Wait::Block)).collect();
        v.sort_unstable();
        println!(
            "rt4k/block x{reps}: p50 {:.2} us, CPU {:.2} us per I/O",
            us(pct(&v, 0.5)),
            us(cpu_time() - c0) / reps as f64
        );
        return;
    }
    println!("io_path: {n} I/Os per round-trip series");
    let ev = floors::eventfd_oneway(20_000) / 20_000;
    let sp = floors::spin_oneway(200_000) / 200_000;
    println!("floor/eventfd  one-way blocking wake-up  {:8.2} us", us(ev));
    println!("floor/spin     one-way spinning hand-off {:8.3} us", us(sp));

    let sig = floors::eventfd_signal(200_000) / 200_000;
    println!(
        "floor/signal   eventfd write + read, no wake-up {:6.3} us",
        us(sig)
    );
    let latch = latch_signal(200_000) / 200_000;
    println!(
        "floor/latch    IrqLatch notify + take, no wake-up {:6.3} us",
        us(latch)
    );

    for (sname, spin, inline) in [
        ("inline", SpinPolicy::OFF, InlinePolicy::default()),
        ("nospin", SpinPolicy::OFF, InlinePolicy::OFF),
        ("spin50", SpinPolicy::default(), InlinePolicy::OFF),
    ] {
        let mut b = setup_with(spin, inline);
        let cpa = program_4k(&b);
        let inline_on = inline != InlinePolicy::OFF;
        let waits: &[(&str, Wait)] = if inline_on {
            &[
                ("block", Wait::Block),
                ("spin", Wait::Spin),
                ("latch", Wait::Block),
            ]
        } else {
            &[("block", Wait::Block), ("spin", Wait::Spin)]
        };
        for &(wname, wait) in waits {
            if wname == "latch" {
                b.stack.use_latch();
            }
            for _ in 0..n / 10 {
                b.io(cpa, wait);
            }
            let c0 = cpu_time();
            let mut v: Vec<Duration> = (0..n).map(|_| b.io(cpa, wait)).collect();
            let cpu = us(cpu_time() - c0) / n as f64;
            v.sort_unstable();
            let (p50, p99) = (pct(&v, 0.5), pct(&v, 0.99));
            // Which floor: inline, only the signal; else a blocking wake-up on either side
            // that blocks.
            let (floor, fname) = match (inline_on, spin == SpinPolicy::OFF, wait) {
                (true, _, _) if wname == "latch" => (us(latch), "latch signal, no wake-up"),
                (true, _, _) => (us(sig), "eventfd signal, no wake-up"),
                (false, true, Wait::Block) => (2.0 * us(ev), "2 x eventfd"),
                (false, false, Wait::Spin) => (2.0 * us(sp), "2 x spin"),
                _ => (us(ev) + us(sp), "eventfd + spin"),
            };
            println!(
                "rt4k/{sname}/{wname:<5} p50 {:7.2} us  p99 {:7.2} us  \
                 p50/floor {:5.2} (floor {:.2} us = {})  CPU {:.2} us/IO",
                us(p50),
                us(p99),
                us(p50) / floor,
                floor,
                fname,
                cpu
            );
        }
        let st = b.stack.subchannel().handoff_stats();
        println!(
            "  channel thread ({sname}): picked up by spin {} / parked {} / spun {:.1} ms; \
             programs ended inline {} / handed over {}",
            st.spin_hits,
            st.parks,
            st.spin_ns as f64 / 1e6,
            st.inline_done,
            st.inline_handoffs
        );
        if spin == SpinPolicy::OFF {
            // 1 MiB sequential through the stack vs memcpy of 1 MiB, same run.
            let cpa = program_1m(&b);
            let want: Vec<u8> = {
                let mut v = vec![0u8; REC];
                b.stack.store().read(DATA, &mut v).unwrap();
                v
            };
            let reps = 200;
            let c0 = cpu_time();
            let mut t: Vec<Duration> = (0..reps).map(|_| b.io(cpa, Wait::Block)).collect();
            let cpu = cpu_time() - c0;
            t.sort_unstable();
            let mut check = vec![0u8; REC];
            b.stack.store().read(DATA, &mut check).unwrap();
            assert_eq!(check, want);
            let mut m = memcpy_1m(reps);
            m.sort_unstable();
            let (io, mc) = (pct(&t, 0.5), pct(&m, 0.5));
            let gbs = |d: Duration| (1u64 << 20) as f64 / d.as_secs_f64() / 1e9;
            println!(
                "seq1m/{sname} stack p50 {:8.1} us ({:.2} GB/s)  memcpy p50 {:7.1} us ({:.2} GB/s)  \
                 stack/memcpy throughput {:.0}% (best run {:.0}%)  CPU {:.1} us/IO",
                us(io),
                gbs(io),
                us(mc),
                gbs(mc),
                100.0 * mc.as_secs_f64() / io.as_secs_f64(),
                100.0 * m[0].as_secs_f64() / t[0].as_secs_f64(),
                us(cpu) / reps as f64
            );
        }
    }
}
