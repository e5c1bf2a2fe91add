//! A vfio-user client a VMM (or a test) can embed.
//!
//! Two modes ([`ClientConfig::sync`]):
//!
//! * **threaded** (the default): a background thread reads the socket; replies wake the
//!   caller waiting on their message id, and the server's DMA_READ/DMA_WRITE requests are
//!   answered from the memory the client registered without an fd
//!   ([`Client::dma_map_memory`]) at any time. Several calls may be in flight at once.
//! * **synchronous**: no reader thread. The calling thread sends its request and receives
//!   its own reply (one request in flight, behind a mutex), which saves two thread hand-offs
//!   per call. A server request arriving while a call waits is answered inline. What it
//!   cannot do: answer the server when no call is in flight, so memory without an fd is
//!   refused ([`Client::dma_map_memory`] fails with [`ClientError::Unsupported`], ENOTSUP).
//!   Use it when all memory is mapped by fd, as [`crate::client::CcwClient`] does.
//!
//! All methods are blocking, take `&self` and may be called from several threads; each
//! waits about the configured timeout at most.
//!
//! A region the server offers for mmap (`VFIO_REGION_INFO_FLAG_MMAP` and an fd) can be
//! mapped read-only with [`Client::map_region`].
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use vccw::vfio_user::client::{Client, ClientConfig};
//! use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("/run/vccw/0.0.0100.sock", ClientConfig::default())?;
//! let dev = client.device_info()?;
//! for i in 0..dev.num_regions {
//!     let r = client.region_info(i)?;
//!     println!("region {i}: {} bytes, type {:?}", r.size, r.cap_type());
//! }
//! // Guest memory from a memfd, shared by fd.
//! let mem = nix::sys::memfd::memfd_create("guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
//! nix::unistd::ftruncate(&mem, 1 << 20)?;
//! client.dma_map_fd(0, 1 << 20, mem.as_fd(), 0, (true, true))?;
//! // The I/O interrupt on an eventfd.
//! let irq = nix::sys::eventfd::EventFd::new()?;
//! client.set_irqs_eventfd(0, VFIO_IRQ_SET_ACTION_TRIGGER | VFIO_IRQ_SET_DATA_EVENTFD, 0,
//!                         &[irq.as_fd()])?;
//! let mut buf = [0u8; 4];
//! client.region_read(0, 0, &mut buf)?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_REGION_INFO_FLAG_MMAP,
};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use super::protocol::{
    Capabilities, Command, DeviceInfo, DmaAccess, DmaMap, DmaUnmap, Header, IrqInfo, IrqSet,
    ProtoError, RegionAccess, RegionCap, RegionInfo, Version, HEADER_SIZE, MAX_VERSION_DATA,
    VERSION_MAJOR, VERSION_MINOR,
};
use super::socket::{
    send_message, send_message_parts, Message, MessageReader, RecvError, RecvLimits,
};

/// Client failure.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket failure (EIO).
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server's reply is malformed.
    #[error("bad reply: {0}")]
    Protocol(#[from] ProtoError),
    /// The server answered with an error reply carrying this errno.
    #[error("server error {0}")]
    Remote(i32),
    /// The connection is closed (ENOTCONN).
    #[error("disconnected")]
    Disconnected,
    /// No reply in time (ETIMEDOUT).
    #[error("timed out")]
    Timeout,
    /// Version negotiation failed (EPROTO).
    #[error("version: {0}")]
    Version(String),
    /// Not possible in this client's mode (ENOTSUP).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
}

impl ClientError {
    /// An errno for the failure.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            ClientError::Protocol(p) => p.errno(),
            ClientError::Remote(e) => *e,
            ClientError::Disconnected => libc::ENOTCONN,
            ClientError::Timeout => libc::ETIMEDOUT,
            ClientError::Version(_) => libc::EPROTO,
            ClientError::Unsupported(_) => libc::ENOTSUP,
        }
    }
}

/// Client memory the server reaches by DMA_READ/DMA_WRITE (mapped without an fd).
pub trait DmaMemory: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Is it empty?
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Read at `offset` (checked to lie inside) into `buf`; errno on failure.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Write `data` at `offset` (checked to lie inside); errno on failure.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), i32>;
}

/// [`DmaMemory`] over a byte vector.
#[derive(Debug, Default)]
pub struct VecMemory(pub Mutex<Vec<u8>>);

impl VecMemory {
    /// `len` zero bytes.
    pub fn new(len: usize) -> VecMemory {
        VecMemory(Mutex::new(vec![0; len]))
    }
}

impl DmaMemory for VecMemory {
    fn len(&self) -> u64 {
        lock(&self.0).len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), i32> {
        let v = lock(&self.0);
        let o = usize::try_from(offset).map_err(|_| libc::EFAULT)?;
        let src = v.get(o..o + buf.len()).ok_or(libc::EFAULT)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), i32> {
        let mut v = lock(&self.0);
        let o = usize::try_from(offset).map_err(|_| libc::EFAULT)?;
        let dst = v.get_mut(o..o + data.len()).ok_or(libc::EFAULT)?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Capabilities proposed in VERSION (what this client can receive).
    pub caps: Capabilities,
    /// How long to wait for each reply.
    pub timeout: Duration,
    /// Synchronous mode: no reader thread, the caller receives its own reply (see the
    /// module documentation); memory without an fd is then refused.
    pub sync: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            caps: Capabilities {
                max_msg_fds: Some(16),
                max_data_xfer_size: Some(1 << 20),
                pgsizes: Some(4096),
                max_dma_maps: Some(65535),
                write_multiple: Some(false),
            },
            timeout: Duration::from_secs(5),
            sync: false,
        }
    }
}

/// A read-only shared mapping of (part of) a server region, from [`Client::map_region`].
/// The server may change the bytes at any time; reads are volatile copies.
pub struct RegionMap {
    map: MmapRegion,
    offset: u64,
    len: usize,
}

impl std::fmt::Debug for RegionMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionMap")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl RegionMap {
    /// Offset of the mapped area in the region.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the mapped area.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the area is empty (never: empty areas are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes at region offset `offset`; [`ClientError::Protocol`] (EINVAL)
    /// when the range is not inside the area.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let outside = || {
            ClientError::Protocol(ProtoError::Invalid {
                what: "region map read",
                detail: "outside the mapped area",
            })
        };
        let rel = offset.checked_sub(self.offset).ok_or_else(outside)?;
        let rel = usize::try_from(rel).map_err(|_| outside())?;
        match rel.checked_add(buf.len()) {
            Some(end) if end <= self.len => {}
            _ => return Err(outside()),
        }
        let s = self.map.get_slice(rel, buf.len()).map_err(|_| outside())?;
        s.copy_to(buf);
        Ok(())
    }
}

fn unexpected_fds() -> ClientError {
    ClientError::Protocol(ProtoError::Invalid {
        what: "reply",
        detail: "unexpected fds",
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct ClientMap {
    iova: u64,
    size: u64,
    prot: (bool, bool),
    mem: Arc<dyn DmaMemory>,
}

struct Pending {
    waiters: HashMap<u16, SyncSender<Message>>,
    closed: bool,
}

struct Shared {
    writer: Mutex<UnixStream>,
    /// Synchronous mode: the receiving side, locked for a whole call (send + reply).
    sync: Option<Mutex<(UnixStream, MessageReader)>>,
    limits: RecvLimits,
    pending: Mutex<Pending>,
    next_id: AtomicU16,
    maps: Mutex<Vec<ClientMap>>,
    timeout: Duration,
    our_max_xfer: u32,
}

/// A connected, negotiated vfio-user client.
pub struct Client {
    shared: Arc<Shared>,
    stream: UnixStream,
    reader: Option<JoinHandle<()>>,
    server_caps: Capabilities,
    minor: u16,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server_caps", &self.server_caps)
            .field("minor", &self.minor)
            .finish()
    }
}

impl Client {
    /// Connect to a server socket and negotiate VERSION.
    pub fn connect(path: impl AsRef<Path>, config: ClientConfig) -> Result<Client, ClientError> {
        Client::from_stream(UnixStream::connect(path)?, config)
    }

    /// Use a connected stream and negotiate VERSION.
    pub fn from_stream(stream: UnixStream, config: ClientConfig) -> Result<Client, ClientError> {
        let our_max_xfer = config.caps.max_data_xfer_size();
        let limits = RecvLimits {
            max_fds: config.caps.max_msg_fds() as usize,
            max_msg_size: (HEADER_SIZE + DmaAccess::SIZE + our_max_xfer as usize)
                .max(HEADER_SIZE + 4 + MAX_VERSION_DATA),
        };
        let sync = if config.sync {
            // Each receive waits at most the timeout; a call re-checks its own deadline
            // whenever a wait ends (zero would mean "no timeout" to the kernel).
            stream.set_read_timeout(Some(config.timeout.max(Duration::from_millis(1))))?;
            Some(Mutex::new((stream.try_clone()?, MessageReader::new())))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream.try_clone()?),
            sync,
            limits,
            pending: Mutex::new(Pending {
                waiters: HashMap::new(),
                closed: false,
            }),
            next_id: AtomicU16::new(0),
            maps: Mutex::new(Vec::new()),
            timeout: config.timeout,
            our_max_xfer,
        });
        let reader = if config.sync {
            None
        } else {
            let rs = stream.try_clone()?;
            let rshared = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("vfio-user-client".into())
                    .spawn(move || reader_loop(&rs, &rshared))?,
            )
        };
        let mut client = Client {
            shared,
            stream,
            reader,
            server_caps: Capabilities::default(),
            minor: 0,
        };
        let v = Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            caps: Some(config.caps.clone()),
        };
        let reply = client.transact(Command::Version as u16, 0, &v.encode(), &[])?;
        let sv = Version::decode(&reply.payload)?;
        if sv.major != VERSION_MAJOR || sv.minor > VERSION_MINOR {
            return Err(ClientError::Version(format!(
                "server speaks {}.{}",
                sv.major, sv.minor
            )));
        }
        client.server_caps = sv.caps.unwrap_or_default();
        client.minor = sv.minor;
        Ok(client)
    }

    /// Capabilities the server announced.
    pub fn server_caps(&self) -> &Capabilities {
        &self.server_caps
    }

    /// Negotiated minor version.
    pub fn minor_version(&self) -> u16 {
        self.minor
    }

    /// Send any command and wait for its reply: (reply header, payload, fds). An error reply
    /// is returned as `Err(Remote(errno))`. Meant for tools and tests.
    pub fn request(
        &self,
        command: u16,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Header, Vec<u8>, Vec<OwnedFd>), ClientError> {
        let m = self.transact(command, 0, payload, fds)?;
        Ok((m.header, m.payload, m.fds))
    }

    /// Synchronous mode: hands a reply's payload buffer back to the receiver for the next
    /// reply (no allocation per call). Skipped if another call holds the receiver.
    fn recycle(&self, payload: Vec<u8>) {
        if let Some(rx) = &self.shared.sync {
            if let Ok(mut g) = rx.try_lock() {
                g.1.recycle(payload);
            }
        }
    }

    /// Whether this client runs in synchronous mode.
    pub fn is_sync(&self) -> bool {
        self.shared.sync.is_some()
    }

    fn transact(
        &self,
        command: u16,
        flags: u32,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, ClientError> {
        self.transact_parts(command, flags, (payload, &[]), fds)
    }

    /// As `transact` with the payload in two parts sent as one (no copy into one buffer).
    fn transact_parts(
        &self,
        command: u16,
        flags: u32,
        payload: (&[u8], &[u8]),
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, ClientError> {
        let reply = match &self.shared.sync {
            Some(rx) => self.transact_sync(rx, command, flags, payload, fds)?,
            None => self.transact_threaded(command, flags, payload, fds)?,
        };
        if reply.header.command != command {
            return Err(ClientError::Protocol(ProtoError::Invalid {
                what: "reply",
                detail: "command differs from the request",
            }));
        }
        if reply.header.is_error() {
            return Err(ClientError::Remote(reply.header.error as i32));
        }
        Ok(reply)
    }

    /// Synchronous mode: send, then receive on this thread until our reply, answering any
    /// server request on the way. Replies with another id (late ones from a call that timed
    /// out) are dropped.
    fn transact_sync(
        &self,
        rx: &Mutex<(UnixStream, MessageReader)>,
        command: u16,
        flags: u32,
        payload: (&[u8], &[u8]),
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, ClientError> {
        let mut rx = lock(rx);
        let (stream, reader) = &mut *rx;
        if lock(&self.shared.pending).closed {
            return Err(ClientError::Disconnected);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let header = Header {
            id,
            command,
            size: (HEADER_SIZE + payload.0.len() + payload.1.len()) as u32,
            flags,
            error: 0,
        };
        send_message_parts(
            &lock(&self.shared.writer),
            &header,
            payload.0,
            payload.1,
            fds,
        )?;
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            match receive_one(stream, reader, &self.shared) {
                Incoming::Reply(m) if m.header.id == id => return Ok(m),
                Incoming::Reply(m) => {
                    tracing::debug!(id = m.header.id, "vfio-user client: stale reply dropped")
                }
                Incoming::Handled | Incoming::Idle => {}
                Incoming::Closed => {
                    lock(&self.shared.pending).closed = true;
                    return Err(ClientError::Disconnected);
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
        }
    }

    fn transact_threaded(
        &self,
        command: u16,
        flags: u32,
        payload: (&[u8], &[u8]),
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, ClientError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let id = {
            let mut p = lock(&self.shared.pending);
            if p.closed {
                return Err(ClientError::Disconnected);
            }
            let mut id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            while p.waiters.contains_key(&id) {
                id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            }
            p.waiters.insert(id, tx);
            id
        };
        let header = Header {
            id,
            command,
            size: (HEADER_SIZE + payload.0.len() + payload.1.len()) as u32,
            flags,
            error: 0,
        };
        let sent = send_message_parts(
            &lock(&self.shared.writer),
            &header,
            payload.0,
            payload.1,
            fds,
        );
        if let Err(e) = sent {
            lock(&self.shared.pending).waiters.remove(&id);
            return Err(ClientError::Io(e));
        }
        let reply = match rx.recv_timeout(self.shared.timeout) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&self.shared.pending).waiters.remove(&id);
                return Err(ClientError::Timeout);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ClientError::Disconnected),
        };
        Ok(reply)
    }

    fn call(
        &self,
        cmd: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Vec<u8>, ClientError> {
        let m = self.transact(cmd as u16, 0, payload, fds)?;
        if !m.fds.is_empty() {
            return Err(unexpected_fds());
        }
        Ok(m.payload)
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&self) -> Result<DeviceInfo, ClientError> {
        let req = DeviceInfo {
            argsz: DeviceInfo::SIZE as u32,
            ..Default::default()
        };
        Ok(DeviceInfo::decode(&self.call(
            Command::DeviceGetInfo,
            &req.encode(),
            &[],
        )?)?)
    }

    /// DEVICE_GET_REGION_INFO, asking first for the fixed part and retrying once with the
    /// argsz the server says it needs when the region has capabilities.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, ClientError> {
        self.region_info_with_argsz(index, RegionInfo::SIZE as u32)
    }

    /// DEVICE_GET_REGION_INFO starting with a given argsz (then as [`Client::region_info`]).
    pub fn region_info_with_argsz(
        &self,
        index: u32,
        argsz: u32,
    ) -> Result<RegionInfo, ClientError> {
        Ok(self.region_info_fd_with_argsz(index, argsz)?.0)
    }

    /// DEVICE_GET_REGION_INFO as [`Client::region_info`], with the fd of a mappable region
    /// if the server sent one (more than one fd is a malformed reply).
    pub fn region_info_fd(&self, index: u32) -> Result<(RegionInfo, Option<OwnedFd>), ClientError> {
        self.region_info_fd_with_argsz(index, RegionInfo::SIZE as u32)
    }

    fn region_info_fd_with_argsz(
        &self,
        index: u32,
        argsz: u32,
    ) -> Result<(RegionInfo, Option<OwnedFd>), ClientError> {
        const MAX_ARGSZ: u32 = 64 * 1024;
        let mut argsz = argsz.max(RegionInfo::SIZE as u32);
        for _ in 0..2 {
            let m = self.transact(
                Command::DeviceGetRegionInfo as u16,
                0,
                &RegionInfo::request(index, argsz),
                &[],
            )?;
            let (p, mut fds) = (m.payload, m.fds);
            if fds.len() > 1 {
                return Err(ClientError::Protocol(ProtoError::Invalid {
                    what: "region_info reply",
                    detail: "more than one fd",
                }));
            }
            if p.len() > argsz as usize {
                return Err(ClientError::Protocol(ProtoError::SizeMismatch {
                    what: "region_info reply",
                    expected: argsz as usize,
                    got: p.len(),
                }));
            }
            let r = RegionInfo::decode_reply(&p)?;
            if r.index != index {
                return Err(ClientError::Protocol(ProtoError::Invalid {
                    what: "region_info reply",
                    detail: "index differs from the request",
                }));
            }
            if r.argsz <= argsz || r.argsz > MAX_ARGSZ {
                return Ok((r, fds.pop()));
            }
            argsz = r.argsz;
        }
        Err(ClientError::Protocol(ProtoError::Invalid {
            what: "region_info reply",
            detail: "argsz keeps growing",
        }))
    }

    /// Maps the first mmap area of region `index` read-only, if the server offers one
    /// (`VFIO_REGION_INFO_FLAG_MMAP` and an fd; without a sparse-mmap capability the whole
    /// region is the area). `Ok(None)`: not offered. The offer is checked before anything is
    /// mapped, so a hostile server cannot make this process fault: the area lies inside the
    /// region, its file offset is page-aligned, and the fd is a memfd sealed against
    /// shrinking whose size covers the area (a plain file could be truncated under the
    /// mapping, and reading it would then raise SIGBUS).
    pub fn map_region(&self, index: u32) -> Result<Option<RegionMap>, ClientError> {
        let (info, fd) = self.region_info_fd(index)?;
        let Some(fd) = fd else { return Ok(None) };
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Ok(None);
        }
        let bad = |detail| {
            ClientError::Protocol(ProtoError::Invalid {
                what: "region mmap offer",
                detail,
            })
        };
        let area = info
            .caps
            .iter()
            .find_map(|c| match c {
                RegionCap::SparseMmap(a) => Some(a.first().copied()),
                _ => None,
            })
            .unwrap_or(Some((0, info.size)))
            .ok_or_else(|| bad("no mmap area"))?;
        let (aoff, alen) = area;
        match aoff.checked_add(alen) {
            Some(end) if alen != 0 && end <= info.size => {}
            _ => return Err(bad("area outside the region")),
        }
        let len = usize::try_from(alen).map_err(|_| bad("area too large"))?;
        let file_off = info
            .offset
            .checked_add(aoff)
            .ok_or_else(|| bad("offset overflows"))?;
        // SAFETY: sysconf only reads a system constant; no memory is passed.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as u64,
            _ => 4096,
        };
        if file_off % page != 0 {
            return Err(bad("area not page-aligned in the fd"));
        }
        let seals = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|_| bad("fd is not a sealable memfd"))?;
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad("memfd not sealed against shrinking"));
        }
        let file = std::fs::File::from(fd);
        let flen = file.metadata()?.len();
        if file_off.checked_add(alen).is_none_or(|end| end > flen) {
            return Err(bad("area past the end of the fd"));
        }
        let map = MmapRegion::build(
            Some(FileOffset::new(file, file_off)),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
        )
        .map_err(|e| match e {
            vm_memory::mmap::MmapRegionError::Mmap(io) => ClientError::Io(io),
            _ => bad("mmap refused"),
        })?;
        Ok(Some(RegionMap {
            map,
            offset: aoff,
            len,
        }))
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, ClientError> {
        let req = IrqInfo {
            argsz: IrqInfo::SIZE as u32,
            index,
            ..Default::default()
        };
        Ok(IrqInfo::decode(&self.call(
            Command::DeviceGetIrqInfo,
            &req.encode(),
            &[],
        )?)?)
    }

    /// DEVICE_SET_IRQS with DATA_EVENTFD: one eventfd per sub-index from `start`, sent in
    /// batches of the server's `max_msg_fds`. An empty `fds` with `count` sub-indexes is done
    /// with [`Client::set_irqs`] instead (de-assign).
    pub fn set_irqs_eventfd(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let batch = (self.server_caps.max_msg_fds() as usize).max(1);
        for (i, chunk) in fds.chunks(batch).enumerate() {
            let s = IrqSet {
                argsz: IrqSet::SIZE as u32,
                flags: flags | VFIO_IRQ_SET_DATA_EVENTFD,
                index,
                start: start + (i * batch) as u32,
                count: chunk.len() as u32,
                data: Vec::new(),
            };
            self.call(Command::DeviceSetIrqs, &s.encode(), chunk)?;
        }
        Ok(())
    }

    /// DEVICE_SET_IRQS without fds: DATA_NONE (`bools` empty), DATA_BOOL (one byte per
    /// sub-index), or DATA_EVENTFD with no fds (de-assign `count` sub-indexes).
    pub fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        bools: &[u8],
    ) -> Result<(), ClientError> {
        let data = if flags & VFIO_IRQ_SET_DATA_BOOL != 0 {
            bools.to_vec()
        } else {
            Vec::new()
        };
        let s = IrqSet {
            argsz: (IrqSet::SIZE + data.len()) as u32,
            flags,
            index,
            start,
            count,
            data,
        };
        self.call(Command::DeviceSetIrqs, &s.encode(), &[])?;
        Ok(())
    }

    /// REGION_READ into `buf` (in chunks of the server's `max_data_xfer_size`); returns bytes
    /// read (short if the server returned less).
    pub fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, ClientError> {
        let max = (self.server_caps.max_data_xfer_size() as usize).max(1);
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let req = RegionAccess {
                offset: offset + done as u64,
                region: index,
                count: n as u32,
                data: Vec::new(),
            };
            let p = self.call(Command::RegionRead, &req.encode(), &[])?;
            let r = RegionAccess::decode(&p, true, n as u32)?;
            buf[done..done + r.data.len()].copy_from_slice(&r.data);
            done += r.data.len();
            if r.data.len() < n {
                break;
            }
        }
        Ok(done)
    }

    /// REGION_WRITE of `data` (in chunks of the server's `max_data_xfer_size`); returns bytes
    /// written.
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, ClientError> {
        let max = (self.server_caps.max_data_xfer_size() as usize).max(1);
        let mut done = 0;
        for chunk in data.chunks(max) {
            let fixed = RegionAccess::encode_fixed(offset + done as u64, index, chunk.len() as u32);
            let m = self.transact_parts(Command::RegionWrite as u16, 0, (&fixed, chunk), &[])?;
            if !m.fds.is_empty() {
                return Err(unexpected_fds());
            }
            let r = RegionAccess::decode(&m.payload, false, chunk.len() as u32);
            self.recycle(m.payload);
            let r = r?;
            done += r.count as usize;
            if (r.count as usize) < chunk.len() {
                break;
            }
        }
        Ok(done)
    }

    fn map_flags(prot: (bool, bool)) -> u32 {
        (if prot.0 { VFIO_DMA_MAP_FLAG_READ } else { 0 })
            | (if prot.1 { VFIO_DMA_MAP_FLAG_WRITE } else { 0 })
    }

    /// DMA_MAP `[iova, iova + size)` backed by `fd` at `offset` (e.g. a memfd).
    pub fn dma_map_fd(
        &self,
        iova: u64,
        size: u64,
        fd: BorrowedFd<'_>,
        offset: u64,
        prot: (bool, bool),
    ) -> Result<(), ClientError> {
        let m = DmaMap {
            argsz: DmaMap::SIZE as u32,
            flags: Self::map_flags(prot),
            offset,
            address: iova,
            size,
        };
        self.call(Command::DmaMap, &m.encode(), &[fd])?;
        Ok(())
    }

    /// DMA_MAP `mem` at `iova` without an fd: the server reaches it by DMA_READ/DMA_WRITE,
    /// which this client answers. Refused in synchronous mode ([`ClientError::Unsupported`]):
    /// nobody would answer a server request that arrives while no call is in flight.
    pub fn dma_map_memory(
        &self,
        iova: u64,
        mem: Arc<dyn DmaMemory>,
        prot: (bool, bool),
    ) -> Result<(), ClientError> {
        if self.is_sync() {
            return Err(ClientError::Unsupported(
                "memory without an fd needs the threaded client (ClientConfig::sync = false)",
            ));
        }
        let size = mem.len();
        let m = DmaMap {
            argsz: DmaMap::SIZE as u32,
            flags: Self::map_flags(prot),
            offset: 0,
            address: iova,
            size,
        };
        // Registered first: the server may access it as soon as it has accepted the map.
        lock(&self.shared.maps).push(ClientMap {
            iova,
            size,
            prot,
            mem,
        });
        let r = self.call(Command::DmaMap, &m.encode(), &[]);
        if r.is_err() {
            lock(&self.shared.maps).retain(|c| !(c.iova == iova && c.size == size));
        }
        r.map(|_| ())
    }

    /// Whether memory mapped without an fd is registered (the server reaches it only
    /// through this connection).
    pub fn has_fdless_maps(&self) -> bool {
        !lock(&self.shared.maps).is_empty()
    }

    /// DMA_UNMAP exactly a previous map.
    pub fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), ClientError> {
        self.unmap(DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: 0,
            address: iova,
            size,
        })
    }

    /// DMA_UNMAP with `VFIO_DMA_UNMAP_FLAG_ALL`.
    pub fn dma_unmap_all(&self) -> Result<(), ClientError> {
        self.unmap(DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: VFIO_DMA_UNMAP_FLAG_ALL,
            address: 0,
            size: 0,
        })
    }

    fn unmap(&self, u: DmaUnmap) -> Result<(), ClientError> {
        self.call(Command::DmaUnmap, &u.encode(), &[])?;
        // The server has dropped its references; only now may the memory go.
        let mut maps = lock(&self.shared.maps);
        if u.all() {
            maps.clear();
        } else {
            maps.retain(|c| !(c.iova == u.address && c.size == u.size));
        }
        Ok(())
    }

    /// DEVICE_RESET.
    pub fn reset(&self) -> Result<(), ClientError> {
        self.call(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    /// Close the connection and wait for the reader thread.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What one receive brought.
enum Incoming {
    /// A reply, for whoever waits on its id.
    Reply(Message),
    /// A server request (answered) or a refused message (answered or dropped).
    Handled,
    /// The receive timeout passed with nothing received (synchronous mode).
    Idle,
    /// The connection is gone or out of step.
    Closed,
}

/// Receives one message; answers it if it is a server request.
fn receive_one(stream: &UnixStream, reader: &mut MessageReader, shared: &Shared) -> Incoming {
    let answer = |h: &Header, r: Result<Vec<u8>, i32>| {
        let w = lock(&shared.writer);
        let sent = match r {
            Ok(p) => send_message(&w, &h.reply(p.len()), &p, &[]),
            Err(e) => send_message(&w, &h.error_reply(e), &[], &[]),
        };
        if sent.is_ok() {
            Incoming::Handled
        } else {
            Incoming::Closed
        }
    };
    match reader.recv(stream, shared.limits) {
        Ok(Some(msg)) if msg.header.is_reply() => Incoming::Reply(msg),
        Ok(Some(msg)) => {
            let h = msg.header;
            let r = serve_request(shared, msg);
            if h.no_reply() {
                return Incoming::Handled;
            }
            answer(&h, r)
        }
        Err(RecvError::TimedOut) => Incoming::Idle,
        Err(e) => match e.reply_errno() {
            Some((h, errno)) if !h.is_reply() => answer(&h, Err(errno)),
            Some(_) => Incoming::Handled,
            None => Incoming::Closed,
        },
        Ok(None) => Incoming::Closed,
    }
}

fn reader_loop(stream: &UnixStream, shared: &Shared) {
    let mut reader = MessageReader::new();
    loop {
        match receive_one(stream, &mut reader, shared) {
            Incoming::Reply(msg) => {
                let tx = lock(&shared.pending).waiters.remove(&msg.header.id);
                if let Some(tx) = tx {
                    let _ = tx.try_send(msg);
                }
            }
            Incoming::Handled | Incoming::Idle => {}
            Incoming::Closed => break,
        }
    }
    let mut p = lock(&shared.pending);
    p.closed = true;
    p.waiters.clear();
}

/// Answer a server-to-client command: DMA_READ/DMA_WRITE within one registered map that
/// allows the access.
fn serve_request(shared: &Shared, msg: Message) -> Result<Vec<u8>, i32> {
    if !msg.fds.is_empty() {
        return Err(libc::EINVAL);
    }
    let write = match Command::from_u16(msg.header.command) {
        Some(Command::DmaRead) => false,
        Some(Command::DmaWrite) => true,
        Some(_) => return Err(libc::EINVAL),
        None => return Err(libc::ENOSYS),
    };
    let a = DmaAccess::decode(&msg.payload, write, shared.our_max_xfer).map_err(|e| e.errno())?;
    let maps = lock(&shared.maps);
    let m = maps
        .iter()
        .find(|m| {
            a.address >= m.iova && a.count <= m.size && a.address - m.iova <= m.size - a.count
        })
        .ok_or(libc::EFAULT)?;
    let off = a.address - m.iova;
    if write {
        if !m.prot.1 {
            return Err(libc::EPERM);
        }
        m.mem.write(off, &a.data)?;
        Ok(DmaAccess {
            address: a.address,
            count: a.count,
            data: Vec::new(),
        }
        .encode())
    } else {
        if !m.prot.0 {
            return Err(libc::EPERM);
        }
        let mut buf = vec![0u8; a.count as usize];
        m.mem.read(off, &mut buf)?;
        Ok(DmaAccess {
            address: a.address,
            count: a.count,
            data: buf,
        }
        .encode())
    }
}
