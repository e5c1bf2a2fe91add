//! vfio-user server and client over a socket pair, with a small in-test vfio-ccw-like backend.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::eventfd::EventFd;
use nix::sys::memfd::{memfd_create, MFdFlags};
use vccw::vfio_user::client::{Client, ClientConfig, ClientError, DmaMemory, VecMemory};
use vccw::vfio_user::protocol::{Command, DeviceInfo, Header, RegionInfo, Version};
use vccw::vfio_user::server::{
    serve_connection, DeviceDesc, DmaBacking, DmaChannel, IrqDesc, RegionDesc, RegionMmap,
    ServerConfig, ServerError, VfioUserBackend,
};
use vccw::vfio_user::socket::{recv_message, send_message, Message, RecvLimits};
use vfio_bindings::bindings::vfio::*;

/// /proc/self/fd counts are process-wide: the tests here run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// What the process's fds point to (for a failing fd check).
fn fd_list() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let t = std::fs::read_link(e.path()).ok()?;
            Some(format!(
                "{}->{}",
                e.file_name().to_string_lossy(),
                t.display()
            ))
        })
        .collect();
    v.sort();
    v
}

/// A region mmap offer: (fd, offset in the fd, areas).
type MmapOffer = (OwnedFd, u64, Vec<(u64, u64)>);

/// Region 0: 64-byte register file (RW). Writing u32 1 at offset 0 signals IRQ 0's eventfd.
/// Writing a u64 address at offset 8 makes the handler DMA-read 16 bytes there and DMA-write
/// them reversed at address + 16 (from inside the handler).
/// Region 1: 16 bytes RW, CAP_TYPE (2, 1). Region 2: 12 bytes read-only, CAP_TYPE (2, 2).
#[derive(Default)]
struct TestBackend {
    regs: Mutex<Vec<u8>>,
    irqs: Mutex<HashMap<u32, OwnedFd>>,
    maps: Mutex<Vec<(u64, u64, DmaBacking)>>,
    dma: Mutex<Option<DmaChannel>>,
    disconnects: AtomicUsize,
    resets: AtomicUsize,
    /// Which thread handled each region write.
    writers: Mutex<Vec<std::thread::ThreadId>>,
    /// Region 0's mmap offer: (fd, offset in the fd, areas).
    mmap: Mutex<Option<MmapOffer>>,
    connects: AtomicUsize,
}

impl TestBackend {
    fn new() -> Arc<TestBackend> {
        let b = TestBackend::default();
        *b.regs.lock().unwrap() = vec![0; 64];
        Arc::new(b)
    }
}

impl VfioUserBackend for TestBackend {
    fn device_info(&self) -> DeviceDesc {
        DeviceDesc {
            flags: VFIO_DEVICE_FLAGS_CCW | VFIO_DEVICE_FLAGS_RESET,
            num_regions: 3,
            num_irqs: 3,
        }
    }
    fn region_info(&self, index: u32) -> Result<RegionDesc, i32> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        Ok(match index {
            0 => RegionDesc {
                size: 64,
                flags: rw,
                cap_type: None,
            },
            1 => RegionDesc {
                size: 16,
                flags: rw,
                cap_type: Some((2, 1)),
            },
            2 => RegionDesc {
                size: 12,
                flags: VFIO_REGION_INFO_FLAG_READ,
                cap_type: Some((2, 2)),
            },
            _ => return Err(libc::EINVAL),
        })
    }
    fn irq_info(&self, _index: u32) -> Result<IrqDesc, i32> {
        Ok(IrqDesc {
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: 1,
        })
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, i32> {
        if index != 0 {
            buf.fill(0xee);
            return Ok(buf.len());
        }
        let r = self.regs.lock().unwrap();
        buf.copy_from_slice(&r[offset as usize..offset as usize + buf.len()]);
        Ok(buf.len())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, i32> {
        self.writers
            .lock()
            .unwrap()
            .push(std::thread::current().id());
        if index != 0 {
            return Ok(data.len());
        }
        self.regs.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        if offset == 0 && data == 1u32.to_ne_bytes() {
            if let Some(fd) = self.irqs.lock().unwrap().get(&0) {
                nix::unistd::write(fd, &1u64.to_ne_bytes()).map_err(|e| e as i32)?;
            }
        }
        if offset == 8 && data.len() == 8 {
            let addr = u64::from_ne_bytes(data.try_into().unwrap());
            let dma = self.dma.lock().unwrap().clone().ok_or(libc::EIO)?;
            let mut buf = [0u8; 16];
            dma.read(addr, &mut buf).map_err(|e| e.errno())?;
            buf.reverse();
            dma.write(addr + 16, &buf).map_err(|e| e.errno())?;
        }
        Ok(data.len())
    }
    fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        _start: u32,
        _count: u32,
        mut fds: Vec<OwnedFd>,
        _bools: &[u8],
    ) -> Result<(), i32> {
        let mut irqs = self.irqs.lock().unwrap();
        if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 && !fds.is_empty() {
            irqs.insert(index, fds.remove(0));
        } else if flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 {
            irqs.remove(&index);
        }
        Ok(())
    }
    fn reset(&self) -> Result<(), i32> {
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn dma_map(
        &self,
        iova: u64,
        size: u64,
        _prot: (bool, bool),
        backing: DmaBacking,
    ) -> Result<(), i32> {
        let mut maps = self.maps.lock().unwrap();
        if maps
            .iter()
            .any(|(a, s, _)| iova < a + s && *a < iova + size)
        {
            return Err(libc::EEXIST);
        }
        maps.push((iova, size, backing));
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, size: u64, all: bool) -> Result<u64, i32> {
        let mut maps = self.maps.lock().unwrap();
        if all {
            let n = maps.iter().map(|m| m.1).sum();
            maps.clear();
            return Ok(n);
        }
        let i = maps
            .iter()
            .position(|m| m.0 == iova && m.1 == size)
            .ok_or(libc::EINVAL)?;
        maps.remove(i);
        Ok(size)
    }
    fn disconnected(&self) {
        self.maps.lock().unwrap().clear();
        self.irqs.lock().unwrap().clear();
        *self.dma.lock().unwrap() = None;
        self.disconnects.fetch_add(1, Ordering::SeqCst);
    }
    fn attach_dma(&self, channel: DmaChannel) {
        *self.dma.lock().unwrap() = Some(channel);
    }
    fn connected(&self) {
        self.connects.fetch_add(1, Ordering::SeqCst);
    }
    fn region_mmap(&self, index: u32) -> Option<RegionMmap> {
        let m = self.mmap.lock().unwrap();
        let (fd, offset, areas) = m.as_ref().filter(|_| index == 0)?;
        Some(RegionMmap {
            fd: fd.try_clone().unwrap(),
            offset: *offset,
            areas: areas.clone(),
        })
    }
}

fn small_config() -> ServerConfig {
    ServerConfig {
        max_msg_fds: 2,
        max_data_xfer_size: 4096,
        dma_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

fn start(
    backend: &Arc<TestBackend>,
    config: ServerConfig,
) -> (UnixStream, JoinHandle<Result<(), ServerError>>) {
    let (c, s) = UnixStream::pair().unwrap();
    let b = backend.clone();
    let h = std::thread::spawn(move || serve_connection(&*b, s, &config));
    (c, h)
}

fn client_config() -> ClientConfig {
    ClientConfig {
        timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn sync_config() -> ClientConfig {
    ClientConfig {
        sync: true,
        ..client_config()
    }
}

// Raw helpers for malformed input.
const LIMITS: RecvLimits = RecvLimits {
    max_fds: 8,
    max_msg_size: 1 << 21,
};

fn raw(s: &UnixStream, id: u16, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Message {
    let h = Header {
        id,
        command: cmd,
        size: 16 + payload.len() as u32,
        flags: 0,
        error: 0,
    };
    send_message(s, &h, payload, fds).unwrap();
    recv_message(s, LIMITS).unwrap().expect("reply")
}

/// The server closed: EOF, or a reset when it left our bytes unread.
fn closed(s: &UnixStream) -> bool {
    matches!(recv_message(s, LIMITS), Ok(None) | Err(_))
}

fn errno_of(m: &Message) -> Option<i32> {
    assert!(m.header.is_reply());
    m.header.is_error().then_some(m.header.error as i32)
}

fn raw_version(s: &UnixStream) {
    let v = Version {
        major: 0,
        minor: 0,
        caps: None,
    }
    .encode();
    let r = raw(s, 1, Command::Version as u16, &v, &[]);
    assert_eq!(errno_of(&r), None);
    let v = Version::decode(&r.payload).unwrap();
    assert_eq!((v.major, v.minor), (0, 0));
}

fn remote(e: ClientError) -> i32 {
    match e {
        ClientError::Remote(n) => n,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn negotiation_and_device_info() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    let client = Client::from_stream(c, client_config()).unwrap();
    // The server answers only with capabilities the client proposed, with its own values.
    let caps = client.server_caps();
    assert_eq!(caps.max_msg_fds, Some(2));
    assert_eq!(caps.max_data_xfer_size, Some(4096));
    assert_eq!(caps.pgsizes, Some(4096));
    assert_eq!(client.minor_version(), 1);
    let d = client.device_info().unwrap();
    assert_eq!(d.argsz, 16);
    assert_eq!(d.flags, VFIO_DEVICE_FLAGS_CCW | VFIO_DEVICE_FLAGS_RESET);
    assert_eq!((d.num_regions, d.num_irqs), (3, 3));
    let i = client.irq_info(2).unwrap();
    assert_eq!((i.index, i.count, i.flags), (2, 1, VFIO_IRQ_INFO_EVENTFD));
    assert_eq!(remote(client.irq_info(3).unwrap_err()), libc::EINVAL);
    client.reset().unwrap();
    assert_eq!(b.resets.load(Ordering::SeqCst), 1);
    client.close();
    h.join().unwrap().unwrap();
    assert_eq!(b.disconnects.load(Ordering::SeqCst), 1);
}

#[test]
fn region_info_argsz_negotiation() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    raw_version(&c);
    // argsz 32 for a region with a CAP_TYPE: fixed part only, argsz = 48 needed, CAPS set.
    let r = raw(
        &c,
        2,
        Command::DeviceGetRegionInfo as u16,
        &RegionInfo::request(1, 32),
        &[],
    );
    assert_eq!(errno_of(&r), None);
    assert_eq!(r.payload.len(), 32);
    let info = RegionInfo::decode_reply(&r.payload).unwrap();
    assert_eq!(info.argsz, 48);
    assert_eq!(info.cap_offset, 0);
    assert_ne!(info.flags & VFIO_REGION_INFO_FLAG_CAPS, 0);
    // Retry with 48: the capability chain.
    let r = raw(
        &c,
        3,
        Command::DeviceGetRegionInfo as u16,
        &RegionInfo::request(1, 48),
        &[],
    );
    assert_eq!(r.payload.len(), 48);
    let info = RegionInfo::decode_reply(&r.payload).unwrap();
    assert_eq!(info.cap_offset, 32);
    assert_eq!(
        info.cap_type(),
        Some((VFIO_REGION_TYPE_CCW, VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD))
    );
    drop(c);
    h.join().unwrap().unwrap();

    let (c, h) = start(&b, small_config());
    let client = Client::from_stream(c, client_config()).unwrap();
    let r0 = client.region_info(0).unwrap();
    assert_eq!((r0.size, r0.argsz, r0.caps.len()), (64, 32, 0));
    let r2 = client.region_info(2).unwrap();
    assert_eq!(r2.cap_type(), Some((2, 2)));
    assert_eq!(
        r2.flags,
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_CAPS
    );
    assert_eq!(remote(client.region_info(3).unwrap_err()), libc::EINVAL);
    client.close();
    h.join().unwrap().unwrap();
}

#[test]
fn region_read_write_bounds() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    let client = Client::from_stream(c, client_config()).unwrap();
    assert_eq!(client.region_write(0, 16, &[1, 2, 3, 4]).unwrap(), 4);
    let mut buf = [0u8; 6];
    assert_eq!(client.region_read(0, 15, &mut buf).unwrap(), 6);
    assert_eq!(buf, [0, 1, 2, 3, 4, 0]);
    // Exactly to the end is fine; one byte past is not.
    let mut end = [0u8; 4];
    client.region_read(0, 60, &mut end).unwrap();
    let mut past = [0u8; 8];
    assert_eq!(
        remote(client.region_read(0, 60, &mut past).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        remote(client.region_write(0, u64::MAX, &[1]).unwrap_err()),
        libc::EINVAL
    );
    assert_eq!(
        remote(client.region_write(2, 0, &[1]).unwrap_err()),
        libc::EPERM
    );
    assert_eq!(
        remote(client.region_read(7, 0, &mut end).unwrap_err()),
        libc::EINVAL
    );
    client.close();
    h.join().unwrap().unwrap();
}

#[test]
fn set_irqs_eventfd_is_signalled() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    let client = Client::from_stream(c, client_config()).unwrap();
    let efd = EventFd::new().unwrap();
    client
        .set_irqs_eventfd(0, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[efd.as_fd()])
        .unwrap();
    client.region_write(0, 0, &1u32.to_ne_bytes()).unwrap();
    let v = efd.read().unwrap();
    // qemu-user translates eventfd counters only for fds it created: one that crossed a
    // socket is written untranslated, so a big-endian guest's 1 reads back byte-swapped.
    let under_qemu = std::env::var_os("VCCW_UNDER_QEMU").is_some();
    assert!(v == 1 || (under_qemu && v == 1u64.swap_bytes()), "{v:#x}");
    // count 1 with two eventfds: inconsistent.
    let e2 = EventFd::new().unwrap();
    let set = vccw::vfio_user::protocol::IrqSet {
        argsz: 20,
        flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: 0,
        start: 0,
        count: 1,
        data: vec![],
    };
    let err = client
        .request(
            Command::DeviceSetIrqs as u16,
            &set.encode(),
            &[efd.as_fd(), e2.as_fd()],
        )
        .unwrap_err();
    assert_eq!(remote(err), libc::EINVAL);
    // Out of the index's range.
    let err = client
        .set_irqs(
            0,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            1,
            1,
            &[],
        )
        .unwrap_err();
    assert_eq!(remote(err), libc::EINVAL);
    // De-assign (DATA_EVENTFD, no fds), DATA_BOOL, and disable-all are accepted.
    client
        .set_irqs(
            0,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[],
        )
        .unwrap();
    assert!(b.irqs.lock().unwrap().is_empty());
    client
        .set_irqs(
            0,
            VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[1],
        )
        .unwrap();
    client
        .set_irqs(
            0,
            VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            &[],
        )
        .unwrap();
    client.close();
    h.join().unwrap().unwrap();
}

#[test]
fn dma_map_memfd_and_unmap() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    let client = Client::from_stream(c, client_config()).unwrap();
    let mem = memfd_create("guest", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&mem, 8192).unwrap();
    nix::sys::uio::pwrite(&mem, b"channel program", 4096).unwrap();
    client
        .dma_map_fd(0x10_0000, 4096, mem.as_fd(), 4096, (true, true))
        .unwrap();
    {
        let maps = b.maps.lock().unwrap();
        let (iova, size, backing) = &maps[0];
        assert_eq!((*iova, *size), (0x10_0000, 4096));
        let DmaBacking::Fd { fd, offset } = backing else {
            panic!("fd backing expected")
        };
        assert_eq!(*offset, 4096);
        let mut buf = [0u8; 15];
        nix::sys::uio::pread(fd, &mut buf, *offset as i64).unwrap();
        assert_eq!(&buf, b"channel program");
    }
    // Overlap -> EEXIST from the backend; misaligned -> EINVAL from the server.
    assert_eq!(
        remote(
            client
                .dma_map_fd(0x10_0000, 4096, mem.as_fd(), 0, (true, false))
                .unwrap_err()
        ),
        libc::EEXIST
    );
    assert_eq!(
        remote(
            client
                .dma_map_fd(0x20_0001, 4096, mem.as_fd(), 0, (true, false))
                .unwrap_err()
        ),
        libc::EINVAL
    );
    assert_eq!(
        remote(client.dma_unmap(0x10_0000, 8192).unwrap_err()),
        libc::EINVAL
    );
    client.dma_unmap(0x10_0000, 4096).unwrap();
    assert!(b.maps.lock().unwrap().is_empty());
    client
        .dma_map_fd(0, 8192, mem.as_fd(), 0, (true, true))
        .unwrap();
    client.dma_unmap_all().unwrap();
    assert!(b.maps.lock().unwrap().is_empty());
    client.close();
    h.join().unwrap().unwrap();
}

#[test]
fn dma_read_write_round_trip() {
    let _g = serial();
    let b = TestBackend::new();
    // A tiny client max_data_xfer_size forces the DmaChannel to split transfers.
    let (c, h) = start(&b, small_config());
    let mut cc = client_config();
    cc.caps.max_data_xfer_size = Some(8);
    let client = Client::from_stream(c, cc).unwrap();
    let mem = Arc::new(VecMemory::new(4096));
    mem.write(0x100, &(1..=16).collect::<Vec<u8>>()).unwrap();
    client
        .dma_map_memory(0x40_0000, mem.clone(), (true, true))
        .unwrap();
    assert!(matches!(b.maps.lock().unwrap()[0].2, DmaBacking::Client));
    // The handler itself DMA-reads 16 bytes and DMA-writes them back reversed.
    client
        .region_write(0, 8, &(0x40_0100u64).to_ne_bytes())
        .unwrap();
    let mut out = [0u8; 16];
    mem.read(0x110, &mut out).unwrap();
    assert_eq!(out.to_vec(), (1..=16).rev().collect::<Vec<u8>>());
    // From another thread, and an unmapped address gets the client's EFAULT.
    let dma = b.dma.lock().unwrap().clone().unwrap();
    let mut got = [0u8; 4];
    dma.read(0x40_0110, &mut got).unwrap();
    assert_eq!(got, [16, 15, 14, 13]);
    assert_eq!(
        dma.read(0x80_0000, &mut got).unwrap_err().errno(),
        libc::EFAULT
    );
    client.dma_unmap(0x40_0000, 4096).unwrap();
    assert_eq!(
        dma.write(0x40_0000, &[1]).unwrap_err().errno(),
        libc::EFAULT
    );
    client.close();
    h.join().unwrap().unwrap();
    assert_eq!(
        dma.read(0x40_0000, &mut got).unwrap_err().errno(),
        libc::ENOTCONN
    );
}

#[test]
fn malformed_messages_get_errnos_and_server_survives() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    raw_version(&c);
    let info = |argsz: u32| {
        DeviceInfo {
            argsz,
            ..Default::default()
        }
        .encode()
    };
    let get_info = Command::DeviceGetInfo as u16;
    // Size mismatch: 12-byte DEVICE_GET_INFO payload.
    assert_eq!(
        errno_of(&raw(&c, 2, get_info, &info(16)[..12], &[])),
        Some(libc::EINVAL)
    );
    // Bad argsz.
    assert_eq!(
        errno_of(&raw(&c, 3, get_info, &info(8), &[])),
        Some(libc::EINVAL)
    );
    let r = raw(
        &c,
        4,
        Command::DeviceGetRegionInfo as u16,
        &RegionInfo::request(0, 16),
        &[],
    );
    assert_eq!(errno_of(&r), Some(libc::EINVAL));
    // Unknown commands.
    assert_eq!(errno_of(&raw(&c, 5, 99, &[], &[])), Some(libc::ENOSYS));
    assert_eq!(errno_of(&raw(&c, 6, 14, &[], &[])), Some(libc::ENOSYS));
    // Known but unsupported, and wrong direction.
    assert_eq!(errno_of(&raw(&c, 7, 16, &[0; 8], &[])), Some(libc::ENOTSUP));
    assert_eq!(
        errno_of(&raw(&c, 8, Command::DmaRead as u16, &[0; 16], &[])),
        Some(libc::EINVAL)
    );
    // VERSION again.
    let v = Version {
        major: 0,
        minor: 0,
        caps: None,
    }
    .encode();
    assert_eq!(errno_of(&raw(&c, 9, 1, &v, &[])), Some(libc::EINVAL));
    // Oversize: larger than 16 + 16 + max_data_xfer_size; drained, answered E2BIG.
    let big = vec![0u8; 8192];
    assert_eq!(
        errno_of(&raw(&c, 10, Command::RegionWrite as u16, &big, &[])),
        Some(libc::E2BIG)
    );
    // Region access out of bounds, and a count over max_data_xfer_size.
    let rd = |off: u64, count: u32| {
        let mut p = off.to_ne_bytes().to_vec();
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(&count.to_ne_bytes());
        p
    };
    let read = Command::RegionRead as u16;
    assert_eq!(
        errno_of(&raw(&c, 11, read, &rd(60, 8), &[])),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno_of(&raw(&c, 12, read, &rd(0, 8192), &[])),
        Some(libc::E2BIG)
    );
    // Too many fds (limit 2): all closed, EINVAL. And fds on a command that takes none.
    let before = fd_count();
    {
        let e: Vec<EventFd> = (0..3).map(|_| EventFd::new().unwrap()).collect();
        let fds: Vec<BorrowedFd<'_>> = e.iter().map(|x| x.as_fd()).collect();
        assert_eq!(
            errno_of(&raw(&c, 13, get_info, &info(16), &fds)),
            Some(libc::EINVAL)
        );
        assert_eq!(
            errno_of(&raw(&c, 14, get_info, &info(16), &fds[..1])),
            Some(libc::EINVAL)
        );
    }
    assert_eq!(fd_count(), before, "refused fds must be closed");
    // A non-zero error field in a command: EINVAL... the header itself is checked, and a
    // type of 2 is unusable: the server closes the connection.
    let r = raw(&c, 15, get_info, &info(16), &[]);
    assert_eq!(errno_of(&r), None);
    assert_eq!(DeviceInfo::decode(&r.payload).unwrap().num_regions, 3);
    let bad = Header {
        id: 16,
        command: 4,
        size: 32,
        flags: 2,
        error: 0,
    };
    send_message(&c, &bad, &info(16), &[]).unwrap();
    assert!(closed(&c), "server closes on a bad header");
    assert!(matches!(h.join().unwrap(), Err(ServerError::BadHeader(_))));
    assert_eq!(b.disconnects.load(Ordering::SeqCst), 1);

    // Short header (size < 16): closed as well.
    let (c, h) = start(&b, small_config());
    raw_version(&c);
    let short = Header {
        id: 2,
        command: 4,
        size: 8,
        flags: 0,
        error: 0,
    };
    send_message(&c, &short, &[], &[]).unwrap();
    assert!(closed(&c));
    assert!(h.join().unwrap().is_err());
}

#[test]
fn version_must_come_first() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    let r = raw(
        &c,
        1,
        Command::DeviceGetInfo as u16,
        &DeviceInfo {
            argsz: 16,
            ..Default::default()
        }
        .encode(),
        &[],
    );
    assert_eq!(errno_of(&r), Some(libc::EINVAL));
    assert!(recv_message(&c, LIMITS).unwrap().is_none());
    assert!(matches!(
        h.join().unwrap(),
        Err(ServerError::Negotiation(_))
    ));

    let (c, h) = start(&b, small_config());
    let v = Version {
        major: 1,
        minor: 0,
        caps: None,
    }
    .encode();
    assert_eq!(errno_of(&raw(&c, 1, 1, &v, &[])), Some(libc::ENOTSUP));
    assert!(h.join().unwrap().is_err());

    let (c, h) = start(&b, small_config());
    let mut junk = vec![0u8, 0, 0, 0];
    junk.extend_from_slice(b"{not json\0");
    assert_eq!(errno_of(&raw(&c, 1, 1, &junk, &[])), Some(libc::EINVAL));
    assert!(h.join().unwrap().is_err());
}

#[test]
fn disconnect_mid_stream_releases_everything() {
    let _g = serial();
    let before = fd_count();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    {
        let client = Client::from_stream(c.try_clone().unwrap(), client_config()).unwrap();
        let mem = memfd_create("guest", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&mem, 4096).unwrap();
        client
            .dma_map_fd(0, 4096, mem.as_fd(), 0, (true, true))
            .unwrap();
        let efd = EventFd::new().unwrap();
        client
            .set_irqs_eventfd(0, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[efd.as_fd()])
            .unwrap();
        assert_eq!(b.maps.lock().unwrap().len(), 1);
        assert_eq!(b.irqs.lock().unwrap().len(), 1);
        // Half a message (header says 100 bytes, with an fd), then the client is gone.
        let hdr = Header {
            id: 99,
            command: 2,
            size: 100,
            flags: 0,
            error: 0,
        };
        let e = EventFd::new().unwrap();
        let mut bytes = hdr.encode().to_vec();
        bytes.extend_from_slice(&[0; 8]);
        nix::sys::socket::sendmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(&c),
            &[std::io::IoSlice::new(&bytes)],
            &[nix::sys::socket::ControlMessage::ScmRights(&[
                std::os::fd::AsRawFd::as_raw_fd(&e),
            ])],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(client);
        drop(c);
    }
    h.join().unwrap().unwrap();
    assert_eq!(b.disconnects.load(Ordering::SeqCst), 1);
    assert!(b.maps.lock().unwrap().is_empty());
    assert!(b.irqs.lock().unwrap().is_empty());
    drop(b);
    // Threads of an earlier test may still be closing their fds (slow under qemu-user):
    // give the count a moment to settle before calling anything a leak.
    let t0 = std::time::Instant::now();
    while fd_count() != before && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        fd_count(),
        before,
        "no fd may outlive the connection: {:?}",
        fd_list()
    );
}

/// A one-page memfd holding `fill`, sealed as the service seals its mirror (or with only
/// `seals`).
fn sealed_memfd(fill: u8, seals: nix::fcntl::SealFlag) -> OwnedFd {
    use nix::fcntl::{fcntl, FcntlArg};
    let fd = memfd_create(
        "mirror",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap();
    nix::unistd::ftruncate(&fd, 4096).unwrap();
    nix::sys::uio::pwrite(&fd, &[fill; 4096], 0).unwrap();
    fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
    fd
}

#[test]
fn commands_run_on_the_reader_until_a_fd_less_map_then_on_the_dispatcher() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, s) = UnixStream::pair().unwrap();
    let bb = b.clone();
    let cfg = small_config();
    let h = std::thread::spawn(move || serve_connection(&*bb, s, &cfg));
    let dispatcher = h.thread().id();
    let client = Client::from_stream(c, client_config()).unwrap();
    assert_eq!(b.connects.load(Ordering::SeqCst), 1);
    // fd-backed only: handled by the reader, not the thread that called serve_connection.
    client.region_write(0, 16, &[1]).unwrap();
    let mem = memfd_create("guest", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&mem, 4096).unwrap();
    client
        .dma_map_fd(0x10_0000, 4096, mem.as_fd(), 0, (true, true))
        .unwrap();
    client.region_write(0, 16, &[2]).unwrap();
    // A map without an fd: from now on the dispatcher, and DMA from inside a handler works.
    let vm = Arc::new(VecMemory::new(4096));
    vm.write(0, &(0u8..16).collect::<Vec<_>>()).unwrap();
    client.dma_map_memory(0, vm.clone(), (true, true)).unwrap();
    client.region_write(0, 8, &0u64.to_ne_bytes()).unwrap();
    let mut back = [0u8; 16];
    vm.read(16, &mut back).unwrap();
    assert_eq!(back.to_vec(), (0u8..16).rev().collect::<Vec<_>>());
    // Unmapped: back on the reader. The dispatcher counts a command done only after its
    // reply is sent (order first), so the next command or two may still be queued to it
    // when the client is quick (qemu-user); soon one is handled by the reader again.
    client.dma_unmap(0, 4096).unwrap();
    let mut n = 3;
    loop {
        client.region_write(0, 16, &[3]).unwrap();
        n += 1;
        let last = *b.writers.lock().unwrap().last().unwrap();
        if last != dispatcher || n > 1000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let w = b.writers.lock().unwrap().clone();
    assert_eq!(w.len(), n, "{w:?}");
    assert!(w[0] != dispatcher && w[1] == w[0], "{w:?}");
    assert_eq!(w[2], dispatcher);
    assert!(w[n - 1] != dispatcher && w[n - 1] == w[0], "{w:?}");
    client.close();
    h.join().unwrap().unwrap();
}

#[test]
fn pipelined_commands_keep_their_order_across_mode_switches() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, h) = start(&b, small_config());
    raw_version(&c);
    // Everything sent before any reply is read: writes and reads of one register
    // interleaved with a fd-less map, a DMA-using write and the unmap.
    let mut reqs: Vec<(u16, u16, Vec<u8>)> = Vec::new();
    let access = |off: u64, data: &[u8], count: u32| {
        let mut p = off.to_ne_bytes().to_vec();
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(&count.to_ne_bytes());
        p.extend_from_slice(data);
        p
    };
    let map = vccw::vfio_user::protocol::DmaMap {
        argsz: 32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        offset: 0,
        address: 0,
        size: 4096,
    }
    .encode();
    let unmap = vccw::vfio_user::protocol::DmaUnmap {
        argsz: 24,
        flags: 0,
        address: 0,
        size: 4096,
    }
    .encode();
    let (w, r) = (Command::RegionWrite as u16, Command::RegionRead as u16);
    for round in 0..3u8 {
        let base = 10 * round;
        reqs.push((w, 0, access(32, &[base + 1], 1)));
        reqs.push((r, 0, access(32, &[], 1)));
        reqs.push((Command::DmaMap as u16, 0, map.clone()));
        reqs.push((w, 0, access(32, &[base + 2], 1)));
        reqs.push((w, 0, access(8, &0u64.to_ne_bytes(), 8)));
        reqs.push((r, 0, access(32, &[], 1)));
        reqs.push((Command::DmaUnmap as u16, 0, unmap.clone()));
        reqs.push((w, 0, access(32, &[base + 3], 1)));
        reqs.push((r, 0, access(32, &[], 1)));
    }
    for (i, (cmd, _, p)) in reqs.iter().enumerate() {
        let hd = Header {
            id: 100 + i as u16,
            command: *cmd,
            size: 16 + p.len() as u32,
            flags: 0,
            error: 0,
        };
        send_message(&c, &hd, p, &[]).unwrap();
    }
    // Replies come back in request order; the server's DMA requests are answered from a
    // 4 KiB buffer (bytes 0..16 = 0..16) as they come.
    let mut guest = [0u8; 4096];
    for (i, b) in guest.iter_mut().take(16).enumerate() {
        *b = i as u8;
    }
    let mut next = 0usize;
    let mut reads = Vec::new();
    while next < reqs.len() {
        let m = recv_message(&c, LIMITS).unwrap().unwrap();
        if !m.header.is_reply() {
            let a = vccw::vfio_user::protocol::DmaAccess::decode(
                &m.payload,
                m.header.command == Command::DmaWrite as u16,
                4096,
            )
            .unwrap();
            let (o, n) = (a.address as usize, a.count as usize);
            let reply = if m.header.command == Command::DmaRead as u16 {
                vccw::vfio_user::protocol::DmaAccess {
                    data: guest[o..o + n].to_vec(),
                    ..a
                }
                .encode()
            } else {
                guest[o..o + n].copy_from_slice(&a.data);
                vccw::vfio_user::protocol::DmaAccess { data: vec![], ..a }.encode()
            };
            send_message(&c, &m.header.reply(reply.len()), &reply, &[]).unwrap();
            continue;
        }
        assert_eq!(m.header.id, 100 + next as u16, "reply out of order");
        assert_eq!(errno_of(&m), None, "request {next}");
        if reqs[next].0 == r {
            reads.push(*m.payload.last().unwrap());
        }
        next += 1;
    }
    assert_eq!(reads, vec![1, 2, 3, 11, 12, 13, 21, 22, 23]);
    let want: Vec<u8> = (0u8..16).rev().collect();
    assert_eq!(&guest[16..32], &want[..]);
    drop(c);
    h.join().unwrap().unwrap();
}

#[test]
fn sync_client_end_to_end() {
    let _g = serial();
    let b = TestBackend::new();
    let (c, s) = UnixStream::pair().unwrap();
    let bb = b.clone();
    let cfg = small_config();
    let h = std::thread::spawn(move || serve_connection(&*bb, s, &cfg));
    let before = fd_count();
    let client = Client::from_stream(c, sync_config()).unwrap();
    assert!(client.is_sync());
    // No reader thread: the process has one more fd (the stream clone), and the client has
    // no thread to own.
    assert_eq!(client.device_info().unwrap().num_regions, 3);
    assert_eq!(client.region_info(1).unwrap().cap_type(), Some((2, 1)));
    client.region_write(0, 16, &[9, 8, 7]).unwrap();
    let mut buf = [0u8; 3];
    client.region_read(0, 16, &mut buf).unwrap();
    assert_eq!(buf, [9, 8, 7]);
    let efd = EventFd::new().unwrap();
    client
        .set_irqs_eventfd(0, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[efd.as_fd()])
        .unwrap();
    client.region_write(0, 0, &1u32.to_ne_bytes()).unwrap();
    assert_ne!(efd.read().unwrap(), 0);
    let mem = memfd_create("guest", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&mem, 4096).unwrap();
    client
        .dma_map_fd(0x10_0000, 4096, mem.as_fd(), 0, (true, true))
        .unwrap();
    // Memory without an fd is refused in this mode, before anything is sent.
    let e = client
        .dma_map_memory(0, Arc::new(VecMemory::new(4096)), (true, true))
        .unwrap_err();
    assert!(matches!(e, ClientError::Unsupported(_)), "{e:?}");
    assert_eq!(e.errno(), libc::ENOTSUP);
    assert_eq!(b.maps.lock().unwrap().len(), 1);
    // Without a fd-less map the server runs the handler on its reader, where a DMA
    // request could never be answered: it fails at once with EDEADLK, no timeout.
    let t0 = std::time::Instant::now();
    let e = client.region_write(0, 8, &0u64.to_ne_bytes()).unwrap_err();
    assert_eq!(remote(e), libc::EDEADLK);
    // A fd-less DMA_MAP sent raw (the client API refuses it): the server now uses its
    // dispatcher, sends DMA_READ while our call waits, and this thread answers it inline
    // (EFAULT: no such memory here), so the handler fails with that errno.
    let map = vccw::vfio_user::protocol::DmaMap {
        argsz: 32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        offset: 0,
        address: 0,
        size: 4096,
    };
    client
        .request(Command::DmaMap as u16, &map.encode(), &[])
        .unwrap();
    let e = client.region_write(0, 8, &0u64.to_ne_bytes()).unwrap_err();
    assert_eq!(remote(e), libc::EFAULT);
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Calls from several threads take turns.
    std::thread::scope(|sc| {
        for t in 0..4u8 {
            let cl = &client;
            sc.spawn(move || {
                for i in 0..50u8 {
                    cl.region_write(0, 40 + t as u64, &[i]).unwrap();
                    let mut one = [0u8; 1];
                    cl.region_read(0, 40 + t as u64, &mut one).unwrap();
                    assert_eq!(one[0], i);
                }
            });
        }
    });
    client.close();
    h.join().unwrap().unwrap();
    assert_eq!(b.disconnects.load(Ordering::SeqCst), 1);
    assert!(fd_count() <= before + 1);
}

#[test]
fn sync_client_times_out_and_drops_the_late_reply() {
    let _g = serial();
    let (c, s) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        // VERSION, answered.
        let m = recv_message(&s, LIMITS).unwrap().unwrap();
        let v = Version {
            major: 0,
            minor: 0,
            caps: None,
        }
        .encode();
        send_message(&s, &m.header.reply(v.len()), &v, &[]).unwrap();
        // DEVICE_RESET: answered only after the client gave up.
        let late = recv_message(&s, LIMITS).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        send_message(&s, &late.header.reply(0), &[], &[]).unwrap();
        // The next one: an error reply, so the client can tell it from the late one.
        let m = recv_message(&s, LIMITS).unwrap().unwrap();
        assert_ne!(m.header.id, late.header.id);
        send_message(&s, &m.header.error_reply(libc::ENOTTY), &[], &[]).unwrap();
        // Then the client goes away.
        assert!(matches!(recv_message(&s, LIMITS), Ok(None)));
    });
    let client = Client::from_stream(
        c,
        ClientConfig {
            timeout: Duration::from_millis(150),
            ..sync_config()
        },
    )
    .unwrap();
    assert!(matches!(client.reset(), Err(ClientError::Timeout)));
    std::thread::sleep(Duration::from_millis(400));
    let e = client
        .request(Command::DeviceReset as u16, &[], &[])
        .unwrap_err();
    assert_eq!(remote(e), libc::ENOTTY);
    client.close();
    server.join().unwrap();
}

#[test]
fn region_mmap_offer_reply_and_client_checks() {
    use nix::fcntl::SealFlag;
    let _g = serial();
    let b = TestBackend::new();
    let all = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_FUTURE_WRITE
        | SealFlag::F_SEAL_SEAL;
    *b.mmap.lock().unwrap() = Some((sealed_memfd(0x42, all), 0, vec![(0, 64)]));
    let (c, h) = start(&b, small_config());
    let client = Client::from_stream(c, sync_config()).unwrap();
    // The fixed part alone: MMAP and CAPS set, argsz says how much the chain needs, no fd.
    let (hd, p, fds) = client
        .request(
            Command::DeviceGetRegionInfo as u16,
            &RegionInfo::request(0, 32),
            &[],
        )
        .unwrap();
    assert!(hd.is_reply());
    assert!(fds.is_empty());
    // argsz 32 + 32 (sparse mmap header 16 + one area 16), flags R|W|MMAP|CAPS = 0xf.
    assert_eq!(
        &p[..8],
        &[64u32.to_ne_bytes(), 0xfu32.to_ne_bytes()].concat()[..]
    );
    // With room: the capability chain and the fd.
    let (info, fd) = client.region_info_fd(0).unwrap();
    assert!(fd.is_some());
    let (_, p, fds) = client
        .request(
            Command::DeviceGetRegionInfo as u16,
            &RegionInfo::request(0, 64),
            &[],
        )
        .unwrap();
    assert_eq!(fds.len(), 1);
    let mut want = Vec::new();
    for v in [64u32, 0xf, 0, 32] {
        want.extend_from_slice(&v.to_ne_bytes());
    }
    want.extend_from_slice(&64u64.to_ne_bytes()); // size
    want.extend_from_slice(&0u64.to_ne_bytes()); // mmap offset
    want.extend_from_slice(&1u16.to_ne_bytes()); // VFIO_REGION_INFO_CAP_SPARSE_MMAP
    want.extend_from_slice(&1u16.to_ne_bytes()); // version 1
    want.extend_from_slice(&0u32.to_ne_bytes()); // next: none
    want.extend_from_slice(&1u32.to_ne_bytes()); // nr_areas
    want.extend_from_slice(&0u32.to_ne_bytes()); // reserved
    want.extend_from_slice(&0u64.to_ne_bytes()); // area offset
    want.extend_from_slice(&64u64.to_ne_bytes()); // area size
    assert_eq!(p, want);
    assert_eq!(
        info.flags & VFIO_REGION_INFO_FLAG_MMAP,
        VFIO_REGION_INFO_FLAG_MMAP
    );
    // Region 1 is not offered.
    assert_eq!(
        client.region_info(1).unwrap().flags & VFIO_REGION_INFO_FLAG_MMAP,
        0
    );
    assert!(client.map_region(1).unwrap().is_none());
    // The client maps it read-only and reads through it; outside the area is refused.
    let m = client.map_region(0).unwrap().unwrap();
    assert_eq!((m.offset(), m.len()), (0, 64));
    let mut buf = [0u8; 8];
    m.read(56, &mut buf).unwrap();
    assert_eq!(buf, [0x42; 8]);
    assert!(m.read(60, &mut buf).is_err());
    assert!(m.read(u64::MAX, &mut buf).is_err());
    // A memfd not sealed against shrinking is refused (it could SIGBUS the client).
    *b.mmap.lock().unwrap() = Some((sealed_memfd(0, SealFlag::F_SEAL_GROW), 0, vec![(0, 64)]));
    let e = client.map_region(0).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL, "{e:?}");
    // An offset the fd does not cover is refused too.
    *b.mmap.lock().unwrap() = Some((sealed_memfd(0, all), 8192, vec![(0, 64)]));
    assert!(client.map_region(0).is_err());
    // A backend offering an area outside the region: the server does not offer it at all.
    *b.mmap.lock().unwrap() = Some((sealed_memfd(0, all), 0, vec![(32, 64)]));
    let (info, fd) = client.region_info_fd(0).unwrap();
    assert_eq!(info.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert!(fd.is_none());
    // The first mapping still reads (it does not depend on the connection's later offers).
    m.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0x42; 8]);
    client.close();
    h.join().unwrap().unwrap();
}
