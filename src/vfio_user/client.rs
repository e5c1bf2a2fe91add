//! A vfio-user client a VMM (or a test) can embed.
//!
//! A background thread reads the socket: replies wake the caller waiting on their message id,
//! and the server's DMA_READ/DMA_WRITE requests are answered from the memory the client
//! registered without an fd ([`Client::dma_map_memory`]). All methods are blocking, take
//! `&self` and may be called from several threads; each waits at most the configured timeout.
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
use std::time::Duration;

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
};

use super::protocol::{
    Capabilities, Command, DeviceInfo, DmaAccess, DmaMap, DmaUnmap, Header, IrqInfo, IrqSet,
    ProtoError, RegionAccess, RegionInfo, Version, HEADER_SIZE, MAX_VERSION_DATA, VERSION_MAJOR,
    VERSION_MINOR,
};
use super::socket::{recv_message, send_message, Message, RecvLimits};

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
        }
    }
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
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream.try_clone()?),
            pending: Mutex::new(Pending {
                waiters: HashMap::new(),
                closed: false,
            }),
            next_id: AtomicU16::new(0),
            maps: Mutex::new(Vec::new()),
            timeout: config.timeout,
            our_max_xfer,
        });
        let limits = RecvLimits {
            max_fds: config.caps.max_msg_fds() as usize,
            max_msg_size: (HEADER_SIZE + DmaAccess::SIZE + our_max_xfer as usize)
                .max(HEADER_SIZE + 4 + MAX_VERSION_DATA),
        };
        let rs = stream.try_clone()?;
        let rshared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("vfio-user-client".into())
            .spawn(move || reader_loop(&rs, limits, &rshared))?;
        let mut client = Client {
            shared,
            stream,
            reader: Some(reader),
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

    fn transact(
        &self,
        command: u16,
        flags: u32,
        payload: &[u8],
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
            size: (HEADER_SIZE + payload.len()) as u32,
            flags,
            error: 0,
        };
        if let Err(e) = send_message(&lock(&self.shared.writer), &header, payload, fds) {
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

    fn call(
        &self,
        cmd: Command,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Vec<u8>, ClientError> {
        let m = self.transact(cmd as u16, 0, payload, fds)?;
        if !m.fds.is_empty() {
            return Err(ClientError::Protocol(ProtoError::Invalid {
                what: "reply",
                detail: "unexpected fds",
            }));
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
        const MAX_ARGSZ: u32 = 64 * 1024;
        let mut argsz = argsz.max(RegionInfo::SIZE as u32);
        for _ in 0..2 {
            let p = self.call(
                Command::DeviceGetRegionInfo,
                &RegionInfo::request(index, argsz),
                &[],
            )?;
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
                return Ok(r);
            }
            argsz = r.argsz;
        }
        Err(ClientError::Protocol(ProtoError::Invalid {
            what: "region_info reply",
            detail: "argsz keeps growing",
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
            let req = RegionAccess {
                offset: offset + done as u64,
                region: index,
                count: chunk.len() as u32,
                data: chunk.to_vec(),
            };
            let p = self.call(Command::RegionWrite, &req.encode(), &[])?;
            let r = RegionAccess::decode(&p, false, chunk.len() as u32)?;
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
    /// which this client answers.
    pub fn dma_map_memory(
        &self,
        iova: u64,
        mem: Arc<dyn DmaMemory>,
        prot: (bool, bool),
    ) -> Result<(), ClientError> {
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

fn reader_loop(stream: &UnixStream, limits: RecvLimits, shared: &Shared) {
    loop {
        match recv_message(stream, limits) {
            Ok(Some(msg)) if msg.header.is_reply() => {
                let tx = lock(&shared.pending).waiters.remove(&msg.header.id);
                if let Some(tx) = tx {
                    let _ = tx.try_send(msg);
                }
            }
            Ok(Some(msg)) => {
                let h = msg.header;
                let r = serve_request(shared, msg);
                if h.no_reply() {
                    continue;
                }
                let sent = match r {
                    Ok(p) => send_message(&lock(&shared.writer), &h.reply(p.len()), &p, &[]),
                    Err(e) => send_message(&lock(&shared.writer), &h.error_reply(e), &[], &[]),
                };
                if sent.is_err() {
                    break;
                }
            }
            Err(e) => match e.reply_errno() {
                Some((h, errno)) if !h.is_reply() => {
                    if send_message(&lock(&shared.writer), &h.error_reply(errno), &[], &[]).is_err()
                    {
                        break;
                    }
                }
                Some(_) => {}
                None => break,
            },
            Ok(None) => break,
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
