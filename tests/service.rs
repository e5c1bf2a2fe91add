//! `vccw serve` across processes: the built binary serves, this test process (and child
//! processes of it) are the clients.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vccw::ccw::{Ccw1, CcwFlags};
use vccw::client::workload::{run_guest, WorkloadOptions};
use vccw::client::{CcwClient, GuestMemory};
use vccw::driver::regions::VFIO_DEVICE_FLAGS_CCW;
use vccw::orb::{fctl, Orb, OrbControls};
use vccw::service::demo::parse_ready;
use vccw::vfio_user::client::{Client, ClientConfig, ClientError};
use vccw::vfio_user::protocol::{Command as VCmd, DeviceInfo, Header, RegionAccess, Version};
use vccw::vfio_user::socket::{recv_message, send_message, RecvLimits};
use vfio_bindings::bindings::vfio::{VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_EVENTFD};

const EXE: &str = env!("CARGO_BIN_EXE_vccw");

/// A `vccw serve` child in a temporary data directory; SIGTERMed on drop.
struct Server {
    child: Option<Child>,
    dasd: PathBuf,
    tape: PathBuf,
    stderr: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut child = common::command(EXE)
            .args(["--log-level", "info", "serve", "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut ready = Vec::new();
        loop {
            let l = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("ready lines");
            if let Some(r) = parse_ready(&l) {
                ready.push(r);
            } else if l.starts_with("serving ") {
                assert_eq!(l, "serving 2 devices");
                break;
            }
        }
        assert_eq!(ready[0].devno, "0.0.0100");
        assert_eq!(ready[0].kind, "3390");
        assert_eq!(ready[1].devno, "0.0.0180");
        assert_eq!(ready[1].kind, "3490");
        Server {
            child: Some(child),
            dasd: ready[0].socket.clone(),
            tape: ready[1].socket.clone(),
            stderr,
            _dir: dir,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// SIGUSR1, then the stats line of `devno` printed after it.
    fn stats(&self, devno: &str) -> String {
        let before = self.stderr.lock().unwrap().len();
        kill(self.pid(), Signal::SIGUSR1).unwrap();
        let prefix = format!("stats {devno} ");
        let t0 = Instant::now();
        loop {
            if let Some(l) = self.stderr.lock().unwrap()[before..]
                .iter()
                .find(|l| l.starts_with(&prefix))
            {
                return l.clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no stats line");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the stats of `devno` contain every `want` field.
    fn wait_stats(&self, devno: &str, want: &[&str]) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.stats(devno);
            if want.iter().all(|w| s.split(' ').any(|f| f == *w)) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "stats never reached {want:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM).unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "server did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

fn orb(cpa: u32) -> Orb {
    Orb {
        intparm: 0xC0FFEE,
        ctl: OrbControls::new()
            .with_format1(true)
            .with_prefetch(true)
            .with_lpm(0xff),
        cpa,
    }
}

fn ccw(cmd: u8, flags: u8, count: u16, cda: u32) -> Ccw1 {
    Ccw1 {
        cmd,
        flags: CcwFlags::from_bits(flags),
        count,
        cda,
    }
}

/// SENSE into 0x2000 (command-chained) + TIC back to it: a channel program that never ends
/// and holds a pinned page.
fn endless(mem: &GuestMemory, at: u64) {
    mem.write_ccws(
        at,
        &[ccw(0x04, 0x60, 32, 0x2000), ccw(0x08, 0, 0, at as u32)],
    )
    .unwrap();
}

#[test]
fn every_region_and_irq_through_the_client() {
    let s = Server::start();
    let dev = CcwClient::connect(&s.dasd).unwrap();
    let t = dev.transport();
    let info = t.device_info().unwrap();
    assert_eq!(info.flags, VFIO_DEVICE_FLAGS_CCW | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!((info.num_regions, info.num_irqs), (4, 3));
    let want = [
        (124, None),
        (8, Some((2, 1))),
        (52, Some((2, 2))),
        (8, Some((2, 3))),
    ];
    for (i, (size, cap)) in want.into_iter().enumerate() {
        let r = t.region_info(i as u32).unwrap();
        assert_eq!(r.size, size, "region {i}");
        assert_eq!(r.cap_type(), cap, "region {i}");
    }
    assert_eq!(t.region_info(4).unwrap_err().errno(), libc::EINVAL);
    for i in 0..3 {
        let q = t.irq_info(i).unwrap();
        assert_eq!(
            (q.flags & VFIO_IRQ_INFO_EVENTFD, q.count),
            (VFIO_IRQ_INFO_EVENTFD, 1)
        );
    }
    assert_eq!(t.irq_info(3).unwrap_err().errno(), libc::EINVAL);
    // SCHIB: device number 0100, enabled (PMCW word 1: E bit), path 0x80 installed.
    let schib = dev.schib().unwrap();
    assert_eq!(schib.pmcw.devno, 0x0100);
    assert_eq!(schib.pmcw.pim, 0x80);
    assert_eq!(dev.crw().unwrap(), None);
    // SENSE ID through the I/O region, the IRQ eventfd and the IRB.
    let mem = GuestMemory::new(64 * 1024).unwrap();
    dev.map_memory(&mem, 0).unwrap();
    mem.write_ccws(0x1000, &[ccw(0xE4, 0x20, 7, 0x2000)])
        .unwrap();
    let irb = dev.run(&orb(0x1000), Duration::from_secs(5)).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (0x0C, 0));
    assert_eq!(irb.scsw.cpa, 0x1008);
    let mut id = [0u8; 7];
    mem.read(0x2000, &mut id).unwrap();
    assert_eq!(id, [0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90, 0x02]);
    // A CCW outside guest memory: the start is refused with the translator's errno.
    mem.write_ccws(0x1000, &[ccw(0xE4, 0x20, 7, 0x0100_0000)])
        .unwrap();
    let e = dev.start(&orb(0x1000)).unwrap_err();
    assert!(e.errno() != 0, "{e}");
    dev.reset().unwrap();
}

#[test]
fn dasd_and_tape_workloads_and_two_devices_at_once() {
    let s = Server::start();
    let opts = WorkloadOptions {
        records: 20,
        ..Default::default()
    };
    let (d, t) = (s.dasd.clone(), s.tape.clone());
    let a = std::thread::spawn(move || run_guest(&d, &opts, &mut Vec::new()).unwrap());
    let b = std::thread::spawn(move || run_guest(&t, &opts, &mut Vec::new()).unwrap());
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!(a.identity.dev_type, 0x3390);
    assert_eq!(a.bytes, 20 * 4096);
    assert_eq!(b.identity.dev_type, 0x3490);
    assert_eq!(b.ios, 1 + 1 + 20 + 1 + 1 + 20 + 1 + 1);
}

#[test]
fn halt_and_clear_through_the_async_region() {
    let s = Server::start();
    let dev = CcwClient::connect(&s.tape).unwrap();
    let mem = GuestMemory::new(64 * 1024).unwrap();
    dev.map_memory(&mem, 0).unwrap();
    endless(&mem, 0x1000);
    dev.start(&orb(0x1000)).unwrap();
    // While it runs, a second start is refused with EBUSY.
    assert_eq!(dev.start(&orb(0x1000)).unwrap_err().errno(), libc::EBUSY);
    dev.halt().unwrap();
    dev.wait_io(Duration::from_secs(5)).unwrap();
    let irb = dev.irb().unwrap();
    assert_ne!(irb.scsw.flags.fctl() & fctl::HALT, 0, "{irb:?}");
    // Again, ended by CLEAR this time.
    dev.start(&orb(0x1000)).unwrap();
    dev.clear().unwrap();
    dev.wait_io(Duration::from_secs(5)).unwrap();
    let irb = dev.irb().unwrap();
    assert_ne!(irb.scsw.flags.fctl() & fctl::CLEAR, 0, "{irb:?}");
    // The device works afterwards.
    mem.write_ccws(0x1000, &[ccw(0xE4, 0x20, 7, 0x2000)])
        .unwrap();
    let irb = dev.run(&orb(0x1000), Duration::from_secs(5)).unwrap();
    assert_eq!(irb.scsw.dstat, 0x0C);
}

#[test]
fn unmap_during_io_resets_the_device_and_releases_pins() {
    let s = Server::start();
    let dev = CcwClient::connect(&s.dasd).unwrap();
    let mem = GuestMemory::new(64 * 1024).unwrap();
    dev.map_memory(&mem, 0).unwrap();
    endless(&mem, 0x1000);
    dev.start(&orb(0x1000)).unwrap();
    let st = s.stats("0.0.0100");
    assert!(!st.contains(" pinned=0 "), "{st}");
    dev.unmap_memory(&mem, 0).unwrap();
    s.wait_stats("0.0.0100", &["mappings=0", "pinned=0"]);
    // Map again: the device runs the next program.
    dev.map_memory(&mem, 0).unwrap();
    mem.write_ccws(0x1000, &[ccw(0xE4, 0x20, 7, 0x2000)])
        .unwrap();
    let irb = dev.run(&orb(0x1000), Duration::from_secs(5)).unwrap();
    assert_eq!(irb.scsw.dstat, 0x0C);
}

/// Child mode of `client_killed_mid_io`: starts an endless program, says so, then waits to
/// be killed.
#[test]
#[ignore = "the child half of the kill -9 test: it runs only when that test spawns it"]
fn child_endless_io() {
    let Ok(sock) = std::env::var("VCCW_TEST_SOCKET") else {
        return;
    };
    let dev = CcwClient::connect(&sock).unwrap();
    let mem = GuestMemory::new(64 * 1024).unwrap();
    dev.map_memory(&mem, 0).unwrap();
    endless(&mem, 0x1000);
    dev.start(&orb(0x1000)).unwrap();
    println!("CHILD-STARTED");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn client_killed_mid_io_leaks_nothing() {
    let mut s = Server::start();
    let fds_before = s.fd_count();
    let mut child = common::command(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_endless_io", "--nocapture"])
        .env("VCCW_TEST_SOCKET", &s.dasd)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut started = false;
    for l in out.lines().map_while(Result::ok) {
        if l.contains("CHILD-STARTED") {
            started = true;
            break;
        }
    }
    assert!(started);
    let st = s.stats("0.0.0100");
    assert!(st.contains(" irqfds=2 "), "{st}");
    assert!(!st.contains(" pinned=0 "), "{st}");
    child.kill().unwrap();
    child.wait().unwrap();
    s.wait_stats(
        "0.0.0100",
        &["mappings=0", "pinned=0", "irqfds=0", "shadows=0"],
    );
    assert!(s.alive());
    // The next client works, and the server holds no more fds than before.
    run_guest(&s.dasd, &WorkloadOptions::default(), &mut Vec::new()).unwrap();
    let t0 = Instant::now();
    while s.fd_count() > fds_before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "server fds {} > {fds_before}",
            s.fd_count()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn second_client_on_a_device_is_refused_with_ebusy() {
    let s = Server::start();
    let first = CcwClient::connect(&s.dasd).unwrap();
    let e = Client::connect(&s.dasd, ClientConfig::default()).unwrap_err();
    assert!(matches!(e, ClientError::Remote(libc::EBUSY)), "{e:?}");
    // The other device is independent.
    let _t = CcwClient::connect(&s.tape).unwrap();
    drop(first);
    // Once the first is gone, a new client gets the device.
    let t0 = Instant::now();
    loop {
        match CcwClient::connect(&s.dasd) {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.errno(), libc::EBUSY);
                assert!(t0.elapsed() < Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Connects and negotiates by hand; retries while the previous client is still being
/// torn down (EBUSY).
fn raw_connect(path: &Path) -> UnixStream {
    let t0 = Instant::now();
    loop {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let v = Version {
            major: 0,
            minor: 0,
            caps: None,
        }
        .encode();
        send_message(&s, &Header::command(1, VCmd::Version, v.len()), &v, &[]).unwrap();
        let r = recv_message(&s, limits()).unwrap().unwrap();
        assert!(r.header.is_reply(), "{:?}", r.header);
        if !r.header.is_error() {
            return s;
        }
        assert_eq!(r.header.error, libc::EBUSY as u32);
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn limits() -> RecvLimits {
    RecvLimits {
        max_fds: 8,
        max_msg_size: 1 << 21,
    }
}

/// Sends a raw message; returns the reply's errno (0 for success), or None if the server
/// closed the connection instead.
fn raw(
    s: &UnixStream,
    h: Header,
    payload: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Option<u32> {
    send_message(s, &h, payload, fds).ok()?;
    match recv_message(s, limits()) {
        Ok(Some(m)) => {
            assert_eq!(m.header.id, h.id);
            Some(if m.header.is_error() {
                m.header.error
            } else {
                0
            })
        }
        _ => None,
    }
}

#[test]
fn malformed_messages_are_answered_and_the_server_survives() {
    let mut s = Server::start();
    let c = raw_connect(&s.dasd);
    let info = DeviceInfo {
        argsz: DeviceInfo::SIZE as u32,
        ..Default::default()
    }
    .encode();
    // A good one first.
    assert_eq!(
        raw(
            &c,
            Header::command(2, VCmd::DeviceGetInfo, info.len()),
            &info,
            &[]
        ),
        Some(0)
    );
    // Unknown command.
    let h = Header {
        id: 3,
        command: 0x7777,
        size: 16,
        flags: 0,
        error: 0,
    };
    assert_eq!(raw(&c, h, &[], &[]), Some(libc::ENOSYS as u32));
    // Bad argsz.
    let bad = DeviceInfo {
        argsz: 4,
        ..Default::default()
    }
    .encode();
    assert_eq!(
        raw(
            &c,
            Header::command(4, VCmd::DeviceGetInfo, bad.len()),
            &bad,
            &[]
        ),
        Some(libc::EINVAL as u32)
    );
    // An fd where none belongs.
    let efd = nix::sys::eventfd::EventFd::new().unwrap();
    assert_eq!(
        raw(
            &c,
            Header::command(5, VCmd::DeviceGetInfo, info.len()),
            &info,
            &[efd.as_fd()]
        ),
        Some(libc::EINVAL as u32)
    );
    // Region access out of bounds, and an unknown region.
    let rd = |region: u32, offset: u64, count: u32| {
        RegionAccess {
            offset,
            region,
            count,
            data: Vec::new(),
        }
        .encode()
    };
    let p = rd(0, 120, 8);
    assert_eq!(
        raw(&c, Header::command(6, VCmd::RegionRead, p.len()), &p, &[]),
        Some(libc::EINVAL as u32)
    );
    let p = rd(9, 0, 4);
    assert_eq!(
        raw(&c, Header::command(7, VCmd::RegionRead, p.len()), &p, &[]),
        Some(libc::EINVAL as u32)
    );
    // Oversize: answered with an error or the connection closed, never a hang.
    let h = Header {
        id: 8,
        command: VCmd::RegionWrite as u16,
        size: 1 << 30,
        flags: 0,
        error: 0,
    };
    let r = raw(&c, h, &[], &[]);
    assert!(r.is_none() || r.unwrap() != 0, "{r:?}");
    drop(c);
    // A short header, then EOF.
    let c = raw_connect(&s.dasd);
    use std::io::Write;
    (&c).write_all(&[1, 0, 2, 0]).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(recv_message(&c, limits()).ok().flatten().is_none());
    drop(c);
    // The server is alive and serves the next client.
    assert!(s.alive());
    let t0 = Instant::now();
    let dev = loop {
        match CcwClient::connect(&s.dasd) {
            Ok(d) => break d,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(dev.schib().unwrap().pmcw.devno, 0x0100);
    drop(dev);
    assert!(s.stop().success());
}

#[test]
fn sigterm_stops_cleanly_and_removes_sockets() {
    let mut s = Server::start();
    // A client connected with I/O in flight when the signal arrives.
    let dev = CcwClient::connect(&s.tape).unwrap();
    let mem = GuestMemory::new(64 * 1024).unwrap();
    dev.map_memory(&mem, 0).unwrap();
    endless(&mem, 0x1000);
    dev.start(&orb(0x1000)).unwrap();
    let status = s.stop();
    assert!(status.success(), "{status}");
    assert!(!s.dasd.exists() && !s.tape.exists());
    let log = s.stderr.lock().unwrap().join("\n");
    assert!(log.contains("images flushed"), "{log}");
}

#[test]
fn memory_mapped_without_fd_goes_through_dma_read_and_write() {
    use vccw::vfio_user::client::{DmaMemory, VecMemory};
    let s = Server::start();
    // Memory without an fd needs the threaded transport (the synchronous one refuses it).
    let dev = CcwClient::connect_with(&s.dasd, ClientConfig::default()).unwrap();
    assert!(!dev.transport().is_sync());
    let mem = Arc::new(VecMemory::new(16 * 1024));
    let prog: Vec<u8> = ccw(0xE4, 0x20, 7, 0x2000).to_bytes().to_vec();
    mem.write(0x1000, &prog).unwrap();
    mem.write(0x2000, &[0xAA; 8]).unwrap();
    dev.transport()
        .dma_map_memory(0, mem.clone(), (true, true))
        .unwrap();
    assert!(s.stats("0.0.0100").contains(" shadows=1 "));
    let irb = dev.run(&orb(0x1000), Duration::from_secs(5)).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (0x0C, 0));
    // Written back by DMA_WRITE before the IRB read was answered.
    let mut id = [0u8; 8];
    mem.read(0x2000, &mut id).unwrap();
    assert_eq!(id, [0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90, 0x02, 0xAA]);
    // A second program sees memory the client changed since (DMA_READ before the start).
    mem.write(0x2000, &[0; 8]).unwrap();
    mem.write(0x1000, &ccw(0xE4, 0x20, 4, 0x2004).to_bytes())
        .unwrap();
    dev.run(&orb(0x1000), Duration::from_secs(5)).unwrap();
    mem.read(0x2000, &mut id).unwrap();
    assert_eq!(id, [0, 0, 0, 0, 0xFF, 0x39, 0x90, 0xE9]);
    dev.transport().dma_unmap(0, 16 * 1024).unwrap();
    assert!(s.stats("0.0.0100").contains(" shadows=0 "));
}

#[test]
fn serve_given_images_in_a_socket_dir_with_private_sockets() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("my.ckd");
    vccw::image::ckd::CkdImage::create_3390(&img, 3, Some("MINE01")).unwrap();
    let tape = dir.path().join("my.aws");
    vccw::image::awstape::AwsTape::create(&tape).unwrap();
    let socks = dir.path().join("socks");
    let (i, t, sd) = (
        img.to_string_lossy().to_string(),
        tape.to_string_lossy().to_string(),
        socks.to_string_lossy().to_string(),
    );
    let (child, ready) = vccw::service::demo::start_server(
        Path::new(EXE),
        &[
            "--dasd",
            &i,
            "--tape",
            &t,
            "--socket-dir",
            &sd,
            "--data-dir",
            "/nonexistent",
        ],
    )
    .unwrap();
    let mut s = Server {
        child: Some(child),
        dasd: ready[0].socket.clone(),
        tape: ready[1].socket.clone(),
        stderr: Arc::new(Mutex::new(Vec::new())),
        _dir: dir,
    };
    assert_eq!(ready.len(), 2);
    assert_eq!(s.dasd, socks.join("dasd0.sock"));
    for p in [&s.dasd, &s.tape] {
        let mode = std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", p.display());
    }
    let mut out = Vec::new();
    let sum = run_guest(&s.dasd, &WorkloadOptions::default(), &mut out).unwrap();
    assert_eq!(sum.identity.dev_type, 0x3390);
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("volume serial MINE01"), "{text}");
    assert!(
        text.contains("  2 cylinders") || text.contains("  3 cylinders"),
        "{text}"
    );
    assert!(s.stop().success());
    assert!(!s.dasd.exists());
    // A file that is not an image is refused, not overwritten.
    let bad = socks.join("bad.ckd");
    std::fs::write(&bad, b"not an image").unwrap();
    let out = common::command(EXE)
        .args(["serve", "--dasd"])
        .arg(&bad)
        .arg("--socket-dir")
        .arg(&socks)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&bad).unwrap(), b"not an image");
}

#[test]
fn fd_less_maps_are_bounded() {
    use vccw::vfio_user::client::VecMemory;
    let s = Server::start();
    let dev = CcwClient::connect_with(&s.tape, ClientConfig::default()).unwrap();
    // 128 MiB without an fd would be copied on every I/O: refused with ENOSPC. (The client
    // side only needs the length: VecMemory of that size is not allocated by the server.)
    struct Huge;
    impl vccw::vfio_user::client::DmaMemory for Huge {
        fn len(&self) -> u64 {
            128 << 20
        }
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), i32> {
            Err(libc::EIO)
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), i32> {
            Err(libc::EIO)
        }
    }
    let e = dev
        .transport()
        .dma_map_memory(0, Arc::new(Huge), (true, true))
        .unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC);
    dev.transport()
        .dma_map_memory(0, Arc::new(VecMemory::new(8192)), (true, true))
        .unwrap();
}

/// Formats record 1 of (1, 0) with 4 KiB of `pattern(0, 3)` and reads it back into 0x20000:
/// two real DASD channel programs. Returns the IRB of the read.
fn dasd_write_then_read(dev: &CcwClient, mem: &GuestMemory) -> vccw::orb::Irb {
    use vccw::client::workload::{define_extent, locate_record, pattern};
    mem.write(0x4000, &define_extent(0xC0, (1, 0), (1, 0), 4096))
        .unwrap();
    mem.write(0x4010, &locate_record(0x03, 1, 1, 0, 0, 4096))
        .unwrap();
    mem.write(0x10000, &[0, 1, 0, 0, 1, 0, 0x10, 0]).unwrap();
    mem.write(0x10008, &pattern(0, 3, 4096)).unwrap();
    mem.write_ccws(
        0x1000,
        &[
            ccw(0x63, 0x40, 16, 0x4000),
            ccw(0x47, 0x40, 16, 0x4010),
            ccw(0x1D, 0, 4104, 0x10000),
        ],
    )
    .unwrap();
    let irb = dev.run(&orb(0x1000), Duration::from_secs(10)).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (0x0C, 0), "{irb:?}");
    mem.write(0x4000, &define_extent(0x40, (1, 0), (1, 0), 4096))
        .unwrap();
    mem.write(0x4010, &locate_record(0x06, 1, 1, 0, 1, 4096))
        .unwrap();
    mem.write_ccws(
        0x1000,
        &[
            ccw(0x63, 0x40, 16, 0x4000),
            ccw(0x47, 0x40, 16, 0x4010),
            ccw(0x86, 0, 4096, 0x20000),
        ],
    )
    .unwrap();
    let irb = dev.run(&orb(0x1000), Duration::from_secs(10)).unwrap();
    assert_eq!((irb.scsw.dstat, irb.scsw.cstat), (0x0C, 0), "{irb:?}");
    let mut got = vec![0u8; 4096];
    mem.read(0x20000, &mut got).unwrap();
    assert_eq!(got, pattern(0, 3, 4096));
    irb
}

#[test]
fn io_region_mirror_matches_region_read_and_is_read_only() {
    use vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP;
    let s = Server::start();
    let dev = CcwClient::connect(&s.dasd).unwrap();
    // The synchronous transport, with the IRB read from the mapping.
    assert!(dev.transport().is_sync());
    assert!(dev.io_region_mapped());
    let t = dev.transport();
    let (info, fd) = t.region_info_fd(0).unwrap();
    let fd = fd.expect("the I/O region comes with its mirror fd");
    assert_eq!(info.size, 124);
    assert_ne!(info.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert!(info
        .caps
        .contains(&vccw::vfio_user::protocol::RegionCap::SparseMmap(vec![(
            0, 124
        )])));
    let mem = GuestMemory::new(256 * 1024).unwrap();
    dev.map_memory(&mem, 0).unwrap();
    let irb = dasd_write_then_read(&dev, &mem);
    // The whole region, through the mapping and by REGION_READ: byte for byte the same.
    let map = t.map_region(0).unwrap().unwrap();
    let mut mapped = [0u8; 124];
    map.read(0, &mut mapped).unwrap();
    let mut read = [0u8; 124];
    assert_eq!(t.region_read(0, 0, &mut read).unwrap(), 124);
    assert_eq!(mapped, read);
    assert_eq!(&irb.to_bytes()[..], &read[24..120]);
    // Word 0 of the SCSW: fctl start (0x40), stctl primary|secondary|pending (0x07); ret_code 0.
    assert_eq!(read[24 + 2], 0x40);
    assert_eq!(read[24 + 3], 0x07);
    assert_eq!(&read[120..], &0i32.to_ne_bytes());
    assert_eq!(dev.irb().unwrap(), irb);
    // The client cannot write the mirror: no shared writable mapping, no write(2), no
    // resize; a read-only mapping cannot be made writable.
    let len = std::num::NonZeroUsize::new(4096).unwrap();
    // SAFETY: a fresh mapping of our own fd at a kernel-chosen address; it is unmapped
    // below if it (wrongly) succeeds, and nothing else refers to it.
    let w = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &fd,
            0,
        )
    };
    if let Ok(p) = w {
        // SAFETY: `p` is the mapping just made, of `len` bytes, used by nothing.
        let _ = unsafe { nix::sys::mman::munmap(p, len.get()) };
        panic!("a writable shared mapping of the mirror was allowed");
    }
    assert_eq!(w.unwrap_err(), nix::errno::Errno::EPERM);
    assert_eq!(
        nix::unistd::write(&fd, &[0u8]).unwrap_err(),
        nix::errno::Errno::EPERM
    );
    assert_eq!(
        nix::unistd::ftruncate(&fd, 0).unwrap_err(),
        nix::errno::Errno::EPERM
    );
    // SAFETY: a read-only shared mapping of our own fd at a kernel-chosen address, unmapped
    // below; only mprotect is tried on it.
    let r = unsafe {
        nix::sys::mman::mmap(
            None,
            len,
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &fd,
            0,
        )
    }
    .unwrap();
    // SAFETY: `r` is the mapping just made, `len` bytes; PROT_WRITE is what is refused.
    let e =
        unsafe { nix::sys::mman::mprotect(r, len.get(), nix::sys::mman::ProtFlags::PROT_WRITE) };
    // SAFETY: as above; the mapping is used by nothing else.
    unsafe { nix::sys::mman::munmap(r, len.get()) }.unwrap();
    assert_eq!(e.unwrap_err(), nix::errno::Errno::EACCES);
    // A refused start updates the mirror too (ret_code), and REGION_READ agrees.
    mem.write_ccws(0x1000, &[ccw(0xE4, 0x20, 7, 0x0100_0000)])
        .unwrap();
    let e = dev.start(&orb(0x1000)).unwrap_err();
    map.read(0, &mut mapped).unwrap();
    t.region_read(0, 0, &mut read).unwrap();
    assert_eq!(mapped, read);
    assert_eq!(&read[120..], &(-e.errno()).to_ne_bytes());
}

#[test]
fn a_new_client_gets_its_own_mirror() {
    let s = Server::start();
    let mem = GuestMemory::new(256 * 1024).unwrap();
    mem.write_ccws(0x1000, &[ccw(0xE4, 0x20, 7, 0x2000)])
        .unwrap();
    let first = CcwClient::connect(&s.dasd).unwrap();
    first.map_memory(&mem, 0).unwrap();
    first.run(&orb(0x1000), Duration::from_secs(5)).unwrap();
    let old = first.transport().map_region(0).unwrap().unwrap();
    let mut before = [0u8; 124];
    old.read(0, &mut before).unwrap();
    assert_eq!(before[24 + 2], 0x40);
    drop(first);
    // The device was reset for the next client; its I/O must not show in the old mapping.
    let second = loop {
        match CcwClient::connect(&s.dasd) {
            Ok(c) => break c,
            Err(e) if e.errno() == libc::EBUSY => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    };
    second.map_memory(&mem, 0).unwrap();
    // A NOP-like program with another CPA, so the IRB differs.
    mem.write_ccws(0x3000, &[ccw(0xE4, 0x20, 7, 0x2000)])
        .unwrap();
    let irb = second.run(&orb(0x3000), Duration::from_secs(5)).unwrap();
    assert_eq!(irb.scsw.cpa, 0x3008);
    let mut after = [0u8; 124];
    old.read(0, &mut after).unwrap();
    assert_eq!(before, after);
    assert!(second.io_region_mapped());
    assert_eq!(second.irb().unwrap(), irb);
}
