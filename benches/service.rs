//! The service's I/O cost across processes (`cargo bench --bench service`).
//!
//! 1. SSCH -> interrupt -> IRB for a 4 KiB DASD read (Define Extent, Locate Record, Read
//!    Data) from this process to a `vccw serve` child, p50 and p99.
//! 2. The floor any out-of-process design pays, measured in the same run: a bare Unix-socket
//!    request/reply of the same size plus an eventfd signal, between this process and an
//!    echo child (this binary re-executed), and the same with a second request/reply (the
//!    IRB read), which is what the vfio-ccw protocol needs per I/O.
//! 3. 1 MiB read through the service (one channel program over 22 tracks) vs a 1 MiB memcpy.
//! 4. The 4 KiB read again over the threaded transport (reader thread), for comparison.
//! 5. The 4 KiB read against a second server started with `--poll-us 0`: the server's
//!    reader then sleeps between requests (the default busy-polls 50 us after each message,
//!    so a back-to-back client's next request costs it no wake-up; the floor pays two).
//!
//! `VCCW_BENCH_ONLY_4K=1` runs only the first 4 KiB series (for a profiler).
//!
//! `CcwClient` uses the synchronous transport and reads the IRB from the mapped I/O region
//! (the server's read-only mirror), so an I/O costs one request/reply plus the eventfd: the
//! floor's shape. The ratio line is the goal of issue #4 (<= 1.5).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vccw::ccw::{Ccw1, CcwFlags};
use vccw::client::workload::{define_extent, locate_record, pattern};
use vccw::client::{CcwClient, GuestMemory, WaitMode};
use vccw::orb::{Orb, OrbControls};

const ECHO_ENV: &str = "VCCW_BENCH_ECHO";
/// Set for an echo child that busy-polls its socket 50 us before each read, as the
/// server's readers do by default: the floor of a path that pays the same.
const ECHO_POLL_ENV: &str = "VCCW_BENCH_ECHO_POLL";
/// Request and reply size of the floor: a vfio-user header + a 124-byte I/O region write.
const MSG: usize = 16 + 16 + 124;
/// Measured iterations (`VCCW_BENCH_ITERS` overrides, e.g. for a quick debug run).
fn iters() -> usize {
    std::env::var("VCCW_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}
const WARMUP: usize = 200;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn wait_efd(e: &EventFd) {
    loop {
        if e.read().is_ok() {
            return;
        }
        let mut p = [PollFd::new(e.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut p, PollTimeout::from(1000u16));
    }
}

/// Echo child: accepts one connection, receives an eventfd, then for each request replies
/// with the same bytes and, for requests whose first byte is 1, signals the eventfd.
fn echo_main(path: &str) {
    let l = UnixListener::bind(path).unwrap();
    println!("echo-ready");
    std::io::stdout().flush().unwrap();
    let (s, _) = l.accept().unwrap();
    let mut byte = [0u8; 1];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let msg = recvmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&s),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut efd_raw = None;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            efd_raw = fds.first().copied();
        }
    }
    // SAFETY: the fd was just received over SCM_RIGHTS and is owned by nobody else here.
    let efd =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd_raw.unwrap()) };
    let mut s = s;
    let mut buf = [0u8; MSG];
    let busy = std::env::var_os(ECHO_POLL_ENV).is_some();
    loop {
        if busy {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_micros(50) {
                let mut p = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
                if poll(&mut p, PollTimeout::ZERO).unwrap_or(0) > 0 {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        if s.read_exact(&mut buf).is_err() {
            break;
        }
        if s.write_all(&buf).is_err() {
            break;
        }
        if buf[0] == 1 {
            let _ = nix::unistd::write(&efd, &1u64.to_ne_bytes());
        }
    }
}

struct Floor {
    one: Vec<f64>,
    two: Vec<f64>,
}

fn measure_floor(dir: &Path, poll: bool) -> Floor {
    let path = dir.join(if poll { "echo-poll.sock" } else { "echo.sock" });
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    if poll {
        cmd.env(ECHO_POLL_ENV, "1");
    }
    let mut child = cmd
        .env(ECHO_ENV, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 11];
    child.stdout.take().unwrap().read_exact(&mut line).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let fds = [std::os::fd::AsRawFd::as_raw_fd(&efd)];
    sendmsg::<()>(
        std::os::fd::AsRawFd::as_raw_fd(&s),
        &[std::io::IoSlice::new(&[0])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    let mut req = [0u8; MSG];
    let mut rep = [0u8; MSG];
    let mut one = Vec::with_capacity(iters());
    let mut two = Vec::with_capacity(iters());
    for i in 0..WARMUP + iters() {
        // Request/reply + eventfd.
        let t0 = Instant::now();
        req[0] = 1;
        s.write_all(&req).unwrap();
        s.read_exact(&mut rep).unwrap();
        wait_efd(&efd);
        let t1 = t0.elapsed();
        // The same plus a second request/reply (the IRB read).
        let t2 = Instant::now();
        s.write_all(&req).unwrap();
        s.read_exact(&mut rep).unwrap();
        wait_efd(&efd);
        req[0] = 0;
        s.write_all(&req).unwrap();
        s.read_exact(&mut rep).unwrap();
        let t3 = t2.elapsed();
        if i >= WARMUP {
            one.push(t1.as_secs_f64() * 1e6);
            two.push(t3.as_secs_f64() * 1e6);
        }
    }
    drop(s);
    let _ = child.wait();
    Floor { one, two }
}

fn ccw(cmd: u8, flags: u8, count: u16, cda: u64) -> Ccw1 {
    Ccw1 {
        cmd,
        flags: CcwFlags::from_bits(flags),
        count,
        cda: cda as u32,
    }
}

fn orb(cpa: u32) -> Orb {
    Orb {
        intparm: 1,
        ctl: OrbControls::new()
            .with_format1(true)
            .with_prefetch(true)
            .with_lpm(0xff),
        cpa,
    }
}

const PROG: u64 = 0x1000;
const PARAMS: u64 = 0x4000;
const DATA: u64 = 0x10000;

/// Formats `n` 4 KiB records on (cyl, head).
fn format_track(dev: &CcwClient, mem: &GuestMemory, cyl: u16, head: u16, n: u8) {
    mem.write(PARAMS, &define_extent(0xC0, (cyl, head), (cyl, head), 4096))
        .unwrap();
    mem.write(PARAMS + 16, &locate_record(0x03, n, cyl, head, 0, 4096))
        .unwrap();
    let mut ccws = vec![
        ccw(0x63, 0x40, 16, PARAMS),
        ccw(0x47, 0x40, 16, PARAMS + 16),
    ];
    for r in 0..n {
        let a = DATA + r as u64 * 4104;
        let mut c = Vec::new();
        c.extend_from_slice(&cyl.to_be_bytes());
        c.extend_from_slice(&head.to_be_bytes());
        c.extend_from_slice(&[r + 1, 0, 0x10, 0]);
        mem.write(a, &c).unwrap();
        mem.write(a + 8, &pattern(r as u32, 7, 4096)).unwrap();
        ccws.push(ccw(0x1D, if r + 1 < n { 0x40 } else { 0 }, 4104, a));
    }
    mem.write_ccws(PROG, &ccws).unwrap();
    let irb = dev.run(&orb(PROG as u32), Duration::from_secs(10)).unwrap();
    assert_eq!(irb.scsw.dstat, 0x0C, "format {cyl}/{head}: {irb:?}");
}

/// The 4 KiB read of (1,0,R1) into DATA: Define Extent, Locate Record, Read Data.
fn write_program_4k(mem: &GuestMemory) {
    mem.write(PARAMS, &define_extent(0x40, (1, 0), (1, 0), 4096))
        .unwrap();
    mem.write(PARAMS + 16, &locate_record(0x06, 1, 1, 0, 1, 4096))
        .unwrap();
    mem.write_ccws(
        PROG,
        &[
            ccw(0x63, 0x40, 16, PARAMS),
            ccw(0x47, 0x40, 16, PARAMS + 16),
            ccw(0x86, 0, 4096, DATA),
        ],
    )
    .unwrap();
}

fn main() {
    if let Ok(p) = std::env::var(ECHO_ENV) {
        echo_main(&p);
        return;
    }
    // `cargo bench` passes --bench; nothing else to parse.
    let dir = tempfile::tempdir().unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vccw"));
    let d = dir.path().to_string_lossy().to_string();
    let (server, ready) =
        vccw::service::demo::start_server(&exe, &["--data-dir", &d, "--cylinders", "5"]).unwrap();
    let mut server = KillOnDrop(server);
    let mut dev = CcwClient::connect(&ready[0].socket).unwrap();
    let mem = GuestMemory::new(4 << 20).unwrap();
    dev.map_memory(&mem, 0).unwrap();

    // Data: cylinders 1 and 2, 12 records per track (22 tracks = 264 records).
    let tracks: Vec<(u16, u16)> = (0..22u16).map(|t| (1 + t / 15, t % 15)).collect();
    for &(c, h) in &tracks {
        format_track(&dev, &mem, c, h, 12);
    }

    // 1. 4 KiB read round trips.
    write_program_4k(&mem);
    let run_4k = |dev: &CcwClient| {
        let mut v = Vec::with_capacity(iters());
        for i in 0..WARMUP + iters() {
            let t0 = Instant::now();
            let irb = dev.run(&orb(PROG as u32), Duration::from_secs(10)).unwrap();
            let t = t0.elapsed();
            assert_eq!(irb.scsw.dstat, 0x0C);
            if i >= WARMUP {
                v.push(t.as_secs_f64() * 1e6);
            }
        }
        v
    };
    let mut block = run_4k(&dev);
    if std::env::var_os("VCCW_BENCH_ONLY_4K").is_some() {
        // For a profiler (e.g. callgrind with --trace-children=yes): only the 4 KiB reads.
        println!("4 KiB DASD read only: p50 {:.1} us", pct(&mut block, 0.5));
        drop(dev);
        stop(&mut server);
        return;
    }
    dev.set_wait_mode(WaitMode::Spin);
    let mut spin = run_4k(&dev);
    dev.set_wait_mode(WaitMode::Block);
    let mut got = vec![0u8; 4096];
    mem.read(DATA, &mut got).unwrap();
    assert_eq!(got, pattern(0, 7, 4096));

    // 1b. One vfio-user round trip alone: a REGION_READ of the IRB (96 bytes), and the IRB
    //     read the client really does (from the mapped I/O region when offered).
    assert!(dev.transport().is_sync());
    let mapped = dev.io_region_mapped();
    let mut rt = Vec::with_capacity(iters());
    let mut irb_read = Vec::with_capacity(iters());
    let mut b = [0u8; 96];
    for i in 0..WARMUP + iters() {
        let t0 = Instant::now();
        dev.transport().region_read(0, 24, &mut b).unwrap();
        std::hint::black_box(&b);
        let t1 = Instant::now();
        std::hint::black_box(dev.irb().unwrap());
        if i >= WARMUP {
            rt.push((t1 - t0).as_secs_f64() * 1e6);
            irb_read.push(t1.elapsed().as_secs_f64() * 1e6);
        }
    }

    // 2. The floor.
    let mut f = measure_floor(dir.path(), false);
    let mut fp = measure_floor(dir.path(), true);

    // 3. 1 MiB as two channel programs of 128 records (512 KiB) each: Define Extent, then
    //    per track Locate Record + up to 12 Read Data. (One program of 280 CCWs works too
    //    when a TIC really splits it into segments of at most 256 CCWs; a chain of 280
    //    without one is refused, EINVAL, as Linux refuses it. Two programs keep each
    //    under the limit without a TIC.)
    let mut progs = Vec::new();
    let mut rec = 0u64;
    let mut t = 0usize;
    for half in 0..2u64 {
        let base = PROG + half * 0x1000;
        let pbase = PARAMS + half * 0x1000;
        let (c0, h0) = tracks[t];
        let mut ccws = vec![ccw(0x63, 0x40, 16, pbase)];
        let mut k = 0u64;
        while rec < 128 * (half + 1) {
            let (c, h) = tracks[t];
            let n = (128 * (half + 1) - rec).min(12 - (rec % 12)) as u8;
            let first = (rec % 12) as u8 + 1;
            let lr = pbase + 16 * (k + 1);
            mem.write(lr, &locate_record(0x06, n, c, h, first, 4096))
                .unwrap();
            ccws.push(ccw(0x47, 0x40, 16, lr));
            for _ in 0..n {
                ccws.push(ccw(0x86, 0x40, 4096, 0x100000 + rec * 4096));
                rec += 1;
            }
            k += 1;
            if rec % 12 == 0 {
                t += 1;
            }
        }
        let (c1, h1) = tracks[if rec % 12 == 0 { t - 1 } else { t }];
        mem.write(pbase, &define_extent(0x40, (c0, h0), (c1, h1), 4096))
            .unwrap();
        let last = ccws.len() - 1;
        ccws[last].flags = CcwFlags::from_bits(0);
        assert!(ccws.len() * 8 <= 0x1000);
        mem.write_ccws(base, &ccws).unwrap();
        progs.push(base as u32);
    }
    assert_eq!(rec, 256);
    let mut mib = Vec::new();
    for i in 0..25 {
        let t0 = Instant::now();
        for &p in &progs {
            let irb = dev.run(&orb(p), Duration::from_secs(30)).unwrap();
            assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (0x0C, 0), "{irb:?}");
        }
        let t = t0.elapsed();
        if i >= 5 {
            mib.push(t.as_secs_f64() * 1e6);
        }
    }
    let mut got = vec![0u8; 4096];
    mem.read(0x100000 + 255 * 4096, &mut got).unwrap();
    assert_eq!(got, pattern(255 % 12, 7, 4096));
    let src = vec![0x5Au8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    let mut cp = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        cp.push(t0.elapsed().as_secs_f64() * 1e6);
    }

    // 1c. The 4 KiB read against a second server that never busy-polls (`--poll-us 0`):
    //     its reader sleeps in recvmsg between requests, so each I/O pays both wake-ups,
    //     as the floor does.
    let mut nopoll = {
        let d2 = dir.path().join("nopoll").to_string_lossy().to_string();
        let (srv, rdy) = vccw::service::demo::start_server(
            &exe,
            &["--data-dir", &d2, "--cylinders", "5", "--poll-us", "0"],
        )
        .unwrap();
        let mut srv = KillOnDrop(srv);
        let dev2 = CcwClient::connect(&rdy[0].socket).unwrap();
        dev2.map_memory(&mem, 0).unwrap();
        format_track(&dev2, &mem, 1, 0, 12);
        write_program_4k(&mem);
        let v = run_4k(&dev2);
        drop(dev2);
        stop(&mut srv);
        v
    };

    let (b50, b99) = (pct(&mut block, 0.5), pct(&mut block, 0.99));
    let (n50, n99) = (pct(&mut nopoll, 0.5), pct(&mut nopoll, 0.99));
    let (s50, s99) = (pct(&mut spin, 0.5), pct(&mut spin, 0.99));
    let (f50, f99) = (pct(&mut f.one, 0.5), pct(&mut f.one, 0.99));
    let (p50, p99) = (pct(&mut fp.one, 0.5), pct(&mut fp.one, 0.99));
    let (g50, g99) = (pct(&mut f.two, 0.5), pct(&mut f.two, 0.99));
    let (r50, r99) = (pct(&mut rt, 0.5), pct(&mut rt, 0.99));
    let (i50, i99) = (pct(&mut irb_read, 0.5), pct(&mut irb_read, 0.99));
    let m50 = pct(&mut mib, 0.5);
    let c50 = pct(&mut cp, 0.5);
    println!(
        "service bench ({} iterations after {WARMUP} warm-up; microseconds)",
        iters()
    );
    println!(
        "4 KiB DASD read, SSCH -> IRB over vfio-user (blocking wait): p50 {b50:.1} p99 {b99:.1}"
    );
    println!(
        "4 KiB DASD read, SSCH -> IRB over vfio-user (spinning wait): p50 {s50:.1} p99 {s99:.1}"
    );
    println!(
        "4 KiB DASD read, server without busy poll (blocking wait):   p50 {n50:.1} p99 {n99:.1} \
         (ratio to the floor {:.2})",
        n50 / f50
    );
    println!(
        "one vfio-user round trip (REGION_READ of the IRB):           p50 {r50:.1} p99 {r99:.1}"
    );
    println!(
        "IRB read by the client ({}):               p50 {i50:.1} p99 {i99:.1}",
        if mapped {
            "mapped I/O region"
        } else {
            "REGION_READ      "
        }
    );
    println!(
        "floor: socket request/reply + eventfd:                        p50 {f50:.1} p99 {f99:.1}"
    );
    println!(
        "floor: request/reply + eventfd + request/reply (IRB read):    p50 {g50:.1} p99 {g99:.1}"
    );
    println!(
        "floor: request/reply + eventfd, echo busy-polling 50 us:      p50 {p50:.1} p99 {p99:.1} \
         (the wake-ups the default server pays; ratio to it {:.2})",
        b50 / p50
    );
    println!(
        "ratio to the floor (goal <= 1.5): blocking p50 {:.2} p99 {:.2}; spinning p50 {:.2} \
         p99 {:.2}; blocking p50 vs the two-round-trip floor {:.2}",
        b50 / f50,
        b99 / f99,
        s50 / f50,
        s99 / f99,
        b50 / g50
    );
    println!(
        "1 MiB DASD read in two channel programs (22 tracks): p50 {m50:.0} us = {:.0} MiB/s",
        1e6 / m50
    );
    println!(
        "1 MiB memcpy: p50 {c50:.1} us = {:.0} MiB/s; service / memcpy = {:.0}x",
        1e6 / c50,
        m50 / c50
    );
    // 4. The same 4 KiB read with the threaded transport (reader thread + hand-offs), for
    //    comparison with the synchronous one CcwClient uses.
    drop(dev);
    let threaded = loop {
        match CcwClient::connect_with(
            &ready[0].socket,
            vccw::vfio_user::client::ClientConfig::default(),
        ) {
            Ok(c) => break c,
            // The server is still tearing the last connection down.
            Err(e) if e.errno() == libc::EBUSY => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    };
    threaded.map_memory(&mem, 0).unwrap();
    write_program_4k(&mem);
    let mut thr = run_4k(&threaded);
    let (t50, t99) = (pct(&mut thr, 0.5), pct(&mut thr, 0.99));
    println!(
        "4 KiB DASD read, threaded transport (blocking wait):          p50 {t50:.1} p99 {t99:.1}"
    );
    drop(threaded);
    stop(&mut server);
}

/// SIGTERM to the server, then waits for it (it flushes and exits 0).
fn stop(server: &mut KillOnDrop) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = server.0.wait();
}

/// The server child, killed if the bench panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
