//! The vfio-user server for one client connection, dispatching to a [`VfioUserBackend`].
//!
//! A reader thread receives every message. Replies (to the server's DMA_READ/DMA_WRITE
//! requests) go to the waiting [`DmaChannel`] caller by message id. Commands are handled by
//! the reader itself whenever that cannot need a DMA reply from the client, i.e. while the
//! connection has no DMA mapping without an fd: one thread, no hand-off, the lowest
//! latency. Otherwise they go, in order, through a bounded queue to the dispatcher (the
//! thread that called [`serve_connection`]), so the reader stays free to receive the
//! replies a backend waits for when it uses its `DmaChannel` inside a handler. The reader
//! switches back to handling commands itself only once the dispatcher has answered all it
//! was given, so commands are always answered in arrival order. Every DMA request has a
//! timeout, so a silent client cannot hang the device. Both directions share the one
//! socket, as the spec's single-socket mode has it (twin-socket mode is not offered).
//!
//! A backend may offer a region for mmap ([`VfioUserBackend::region_mmap`]): REGION_INFO
//! then reports `VFIO_REGION_INFO_FLAG_MMAP`, a sparse-mmap capability and the fd.
//!
//! When the client goes away (EOF, socket error, unusable header), the connection's queued
//! messages and their fds are dropped, pending DMA requests fail with ENOTCONN and
//! [`VfioUserBackend::disconnected`] is called: the backend unmaps all client memory and drops
//! the client's fds, keeping the device state, as the spec asks.

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_RESET, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

use super::protocol::{
    Capabilities, Command, DeviceInfo, DmaAccess, DmaMap, DmaUnmap, Header, IrqInfo, IrqSet,
    ProtoError, RegionAccess, RegionCap, RegionInfo, Version, WriteMulti, HEADER_SIZE,
    MAX_VERSION_DATA, VERSION_MAJOR, VERSION_MINOR,
};
use super::socket::{send_message, Message, MessageReader, RecvError, RecvLimits, SCM_MAX_FD};

/// What the backend reports for DEVICE_GET_INFO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceDesc {
    /// `VFIO_DEVICE_FLAGS_*` (vccw: `VFIO_DEVICE_FLAGS_CCW | VFIO_DEVICE_FLAGS_RESET`).
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

/// What the backend reports for one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionDesc {
    /// Size in bytes.
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_READ`/`WRITE` (MMAP and CAPS are managed by the server).
    pub flags: u32,
    /// `VFIO_REGION_INFO_CAP_TYPE` (type, subtype) for device-specific regions.
    pub cap_type: Option<(u32, u32)>,
}

/// What the backend reports for one IRQ index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqDesc {
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// Number of sub-indexes.
    pub count: u32,
}

/// How the server reaches the memory of a DMA_MAP.
#[derive(Debug)]
pub enum DmaBacking {
    /// The client sent an fd: mapping it (and checking it is large enough) is the backend's job.
    Fd {
        /// The client's descriptor.
        fd: OwnedFd,
        /// Offset of the window in the file.
        offset: u64,
    },
    /// No fd: the memory is reached through [`DmaChannel`] (DMA_READ/DMA_WRITE).
    Client,
}

/// A mappable region as the backend offers it.
#[derive(Debug)]
pub struct RegionMmap {
    /// What the client maps (sent with the REGION_INFO reply; give a read-only-sealed memfd
    /// when the client must not write).
    pub fd: OwnedFd,
    /// Offset of the region's byte 0 in the fd (REGION_INFO `offset`).
    pub offset: u64,
    /// Mappable (offset, size) areas, relative to the region.
    pub areas: Vec<(u64, u64)>,
}

impl RegionMmap {
    /// Each area is non-empty and inside a region of `size` bytes, at most 16 of them;
    /// otherwise the region is reported as not mappable (a backend bug must not reach the
    /// client).
    fn fits(&self, size: u64) -> bool {
        let ok = !self.areas.is_empty()
            && self.areas.len() <= 16
            && self
                .areas
                .iter()
                .all(|&(o, n)| n != 0 && o.checked_add(n).is_some_and(|e| e <= size));
        if !ok {
            tracing::warn!(areas = ?self.areas, size, "vfio-user: bad mmap areas not offered");
        }
        ok
    }
}

/// The device side of a vfio-user server. Errors are positive errnos, sent to the client.
pub trait VfioUserBackend: Send + Sync {
    /// Device flags and counts.
    fn device_info(&self) -> DeviceDesc;
    /// One region (index already checked against `num_regions`).
    fn region_info(&self, index: u32) -> Result<RegionDesc, i32>;
    /// One IRQ index (index already checked against `num_irqs`).
    fn irq_info(&self, index: u32) -> Result<IrqDesc, i32>;
    /// Read `buf.len()` bytes at `offset` (bounds already checked); returns bytes read.
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, i32>;
    /// Write `data` at `offset` (bounds already checked); returns bytes written.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, i32>;
    /// DEVICE_SET_IRQS, validated: one DATA and one ACTION flag, range inside the index
    /// (or start = count = 0 with DATA_NONE), for DATA_EVENTFD either `count` fds or none
    /// (none: de-assign), `bools` has `count` bytes for DATA_BOOL.
    #[allow(clippy::too_many_arguments)]
    fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
        bools: &[u8],
    ) -> Result<(), i32>;
    /// DEVICE_RESET.
    fn reset(&self) -> Result<(), i32>;
    /// DMA_MAP of `[iova, iova + size)`, page-aligned and non-wrapping; `prot` is
    /// (readable, writeable). An overlapping map must fail with EEXIST.
    fn dma_map(
        &self,
        iova: u64,
        size: u64,
        prot: (bool, bool),
        backing: DmaBacking,
    ) -> Result<(), i32>;
    /// DMA_UNMAP of exactly a previous map (or everything with `all`); returns bytes unmapped.
    /// Must release every reference to the memory before returning.
    fn dma_unmap(&self, iova: u64, size: u64, all: bool) -> Result<u64, i32>;
    /// The client is gone: unmap all client memory, drop client fds, keep the device state.
    fn disconnected(&self);
    /// A region the client may mmap (`None`: not mappable, the default). The server checks
    /// the areas against the region size, sets `VFIO_REGION_INFO_FLAG_MMAP`, reports the
    /// areas as a sparse-mmap capability and sends the fd with the REGION_INFO reply; it
    /// never accesses the memory itself.
    fn region_mmap(&self, _index: u32) -> Option<RegionMmap> {
        None
    }
    /// A client negotiated VERSION (before [`VfioUserBackend::attach_dma`]); each
    /// connection gets one call, and later one [`VfioUserBackend::disconnected`].
    fn connected(&self) {}
    /// After VERSION: the handle for DMA_READ/DMA_WRITE on this connection. It fails with
    /// ENOTCONN once the connection ends.
    fn attach_dma(&self, _channel: DmaChannel) {}
}

/// Server limits and timeouts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most fds accepted per message (advertised as `max_msg_fds`).
    pub max_msg_fds: u32,
    /// Largest REGION read/write count accepted (advertised as `max_data_xfer_size`).
    pub max_data_xfer_size: u32,
    /// DMA page sizes (advertised as `pgsizes`); maps must be aligned to the smallest.
    pub pgsizes: u64,
    /// Advertised `max_dma_maps` (enforced by the backend).
    pub max_dma_maps: u32,
    /// How long a DMA_READ/DMA_WRITE waits for the client's reply.
    pub dma_timeout: Duration,
    /// Commands queued between the reader and the dispatcher.
    pub queue_depth: usize,
    /// How long a connection's reader busy-polls its socket after a message before it
    /// blocks in `recvmsg` (0: never). The poll is non-blocking `recvmsg` itself
    /// (`MSG_DONTWAIT`), so the try that finds the request has also read it: no `poll(2)`
    /// on the way. A request that comes within it is read without a
    /// scheduler wake-up, which is most of a round trip on a loaded host; the cost is that
    /// much CPU after each message, none while the client is idle. Default 50 us (as the
    /// emulated channel thread's default spin) when the machine has more than one CPU, else
    /// 0: on one CPU the client cannot send while the reader spins.
    pub poll: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_msg_fds: 16,
            max_data_xfer_size: 1 << 20,
            pgsizes: 4096,
            max_dma_maps: 65535,
            dma_timeout: Duration::from_secs(5),
            queue_depth: 64,
            poll: if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
                Duration::from_micros(50)
            } else {
                Duration::ZERO
            },
        }
    }
}

impl ServerConfig {
    fn limits(&self) -> RecvLimits {
        RecvLimits {
            max_fds: (self.max_msg_fds as usize).min(SCM_MAX_FD),
            // The largest legal command: a REGION_WRITE of max_data_xfer_size bytes, or the
            // VERSION JSON.
            max_msg_size: (HEADER_SIZE + RegionAccess::SIZE + self.max_data_xfer_size as usize)
                .max(HEADER_SIZE + 4 + MAX_VERSION_DATA),
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, Error)]
pub enum ServerError {
    /// Socket failure.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The client sent an unusable header; the connection was closed.
    #[error("unusable header: {0}")]
    BadHeader(ProtoError),
    /// The client did not start with an acceptable VERSION; the connection was closed.
    #[error("version negotiation failed: {0}")]
    Negotiation(String),
}

/// Failure of a server-initiated DMA access.
#[derive(Debug, Error)]
pub enum DmaError {
    /// The connection is gone (ENOTCONN).
    #[error("client disconnected")]
    Disconnected,
    /// The client did not answer in time (ETIMEDOUT).
    #[error("no reply from client")]
    Timeout,
    /// The client answered with an error (its errno).
    #[error("client error {0}")]
    Remote(i32),
    /// The client's reply is malformed (EINVAL).
    #[error("bad reply: {0}")]
    BadReply(ProtoError),
    /// Sending failed (EIO).
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// Called on the connection's reader thread, which alone could receive the reply
    /// (EDEADLK): a handler run inline, i.e. while the connection has no DMA mapping
    /// without an fd, must not use the channel.
    #[error("DMA request from the connection's reader thread")]
    OnReader,
}

impl DmaError {
    /// The errno a backend can pass on.
    pub fn errno(&self) -> i32 {
        match self {
            DmaError::Disconnected => libc::ENOTCONN,
            DmaError::Timeout => libc::ETIMEDOUT,
            DmaError::Remote(e) => *e,
            DmaError::BadReply(_) => libc::EINVAL,
            DmaError::Io(_) => libc::EIO,
            DmaError::OnReader => libc::EDEADLK,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the connection down with a poisoned lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Pending {
    waiters: HashMap<u16, SyncSender<Message>>,
    closed: bool,
}

struct DmaInner {
    writer: Arc<Mutex<UnixStream>>,
    pending: Mutex<Pending>,
    next_id: AtomicU16,
    max_xfer: usize,
    timeout: Duration,
    /// The thread that receives this connection's messages.
    reader: Option<ThreadId>,
}

/// Server-to-client memory access for memory the client mapped without an fd
/// (DMA_READ/DMA_WRITE on the connection's socket). Cheap to clone; usable from any thread,
/// including from inside a backend handler.
#[derive(Clone)]
pub struct DmaChannel {
    inner: Arc<DmaInner>,
}

impl std::fmt::Debug for DmaChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaChannel")
            .field("max_xfer", &self.inner.max_xfer)
            .finish()
    }
}

impl DmaChannel {
    fn new(
        writer: Arc<Mutex<UnixStream>>,
        max_xfer: u32,
        timeout: Duration,
        reader: Option<ThreadId>,
    ) -> DmaChannel {
        DmaChannel {
            inner: Arc::new(DmaInner {
                writer,
                pending: Mutex::new(Pending {
                    waiters: HashMap::new(),
                    closed: false,
                }),
                next_id: AtomicU16::new(0),
                max_xfer: (max_xfer as usize).max(1),
                timeout,
                reader,
            }),
        }
    }

    /// Read client memory at `address` into `buf` (split into `max_data_xfer_size` chunks).
    pub fn read(&self, address: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.inner.max_xfer);
            let addr = address
                .checked_add(done as u64)
                .ok_or(DmaError::Remote(libc::EFAULT))?;
            let req = DmaAccess {
                address: addr,
                count: n as u64,
                data: Vec::new(),
            };
            let reply = self.transact(Command::DmaRead, &req.encode())?;
            let data =
                DmaAccess::check_read_reply(&reply.payload, addr, n).map_err(DmaError::BadReply)?;
            buf[done..done + n].copy_from_slice(data);
            done += n;
        }
        Ok(())
    }

    /// Write `data` to client memory at `address` (split into `max_data_xfer_size` chunks).
    pub fn write(&self, address: u64, data: &[u8]) -> Result<(), DmaError> {
        for (i, chunk) in data.chunks(self.inner.max_xfer).enumerate() {
            let addr = address
                .checked_add((i * self.inner.max_xfer) as u64)
                .ok_or(DmaError::Remote(libc::EFAULT))?;
            let req = DmaAccess {
                address: addr,
                count: chunk.len() as u64,
                data: chunk.to_vec(),
            };
            let reply = self.transact(Command::DmaWrite, &req.encode())?;
            DmaAccess::check_write_reply(&reply.payload, addr).map_err(DmaError::BadReply)?;
        }
        Ok(())
    }

    fn transact(&self, cmd: Command, payload: &[u8]) -> Result<Message, DmaError> {
        // Waiting here would only end in a timeout: the reply can never be received.
        if self.inner.reader == Some(std::thread::current().id()) {
            return Err(DmaError::OnReader);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let id = {
            let mut p = lock(&self.inner.pending);
            if p.closed {
                return Err(DmaError::Disconnected);
            }
            // Ids are ours alone (the spec: they belong to the sender); skip any still waiting.
            let mut id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            while p.waiters.contains_key(&id) {
                id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            }
            p.waiters.insert(id, tx);
            id
        };
        let header = Header::command(id, cmd, payload.len());
        let sent = send_message(&lock(&self.inner.writer), &header, payload, &[]);
        if let Err(e) = sent {
            lock(&self.inner.pending).waiters.remove(&id);
            return Err(DmaError::Io(e));
        }
        let reply = match rx.recv_timeout(self.inner.timeout) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&self.inner.pending).waiters.remove(&id);
                return Err(DmaError::Timeout);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(DmaError::Disconnected),
        };
        if reply.header.command != cmd as u16 {
            return Err(DmaError::BadReply(ProtoError::Invalid {
                what: "dma reply",
                detail: "command differs from the request",
            }));
        }
        if reply.header.is_error() {
            return Err(DmaError::Remote(reply.header.error as i32));
        }
        if !reply.fds.is_empty() {
            return Err(DmaError::BadReply(ProtoError::Invalid {
                what: "dma reply",
                detail: "unexpected fds",
            }));
        }
        Ok(reply)
    }

    /// Route a reply to its waiter; replies nobody waits for (late, unknown) are dropped.
    fn complete(&self, msg: Message) {
        let tx = lock(&self.inner.pending).waiters.remove(&msg.header.id);
        if let Some(tx) = tx {
            let _ = tx.try_send(msg);
        } else {
            tracing::debug!(id = msg.header.id, "vfio-user: unexpected reply dropped");
        }
    }

    /// Fail every waiter and all later requests.
    fn close(&self) {
        let mut p = lock(&self.inner.pending);
        p.closed = true;
        p.waiters.clear();
    }
}

enum Item {
    Cmd(Message),
    /// A message the reader refused (too large, too many fds): answer with this errno.
    Refused(Header, i32),
}

enum Flow {
    Continue,
    Close,
}

/// One connection's state, shared by the reader and the dispatcher (whichever handles a
/// command; never both at once, see [`serve_connection`]).
struct Conn<'a, B: VfioUserBackend + ?Sized> {
    backend: &'a B,
    config: &'a ServerConfig,
    writer: Arc<Mutex<UnixStream>>,
    /// Set once by VERSION.
    client_caps: OnceLock<Capabilities>,
    dma: OnceLock<DmaChannel>,
    /// DMA_MAPs without an fd now in force (iova, size): while there is one, commands go
    /// to the dispatcher, since handling them may need DMA_READ/DMA_WRITE replies that
    /// only the reader can receive.
    fdless: Mutex<Vec<(u64, u64)>>,
    fdless_count: AtomicUsize,
    /// Commands handed to the dispatcher and not yet answered.
    queued: AtomicUsize,
    /// The reader thread (a DMA request from it could never get its reply).
    reader: OnceLock<ThreadId>,
}

/// Serve one client on `stream` until it disconnects. Returns `Ok(())` when the client
/// closed the connection (also mid-stream); errors report why the server closed it.
/// `disconnected` is called on the backend in every case once VERSION has been accepted
/// (and also if it had not, so the backend may rely on it after any connection).
///
/// Threads: a reader thread receives every message. It handles a command itself (the
/// fast path: no hand-off) unless the connection has a DMA mapping without an fd, the
/// command is such a DMA_MAP, or commands are still queued for the dispatcher; those go
/// in order to the dispatcher (the thread that called this function), so the reader stays
/// free to receive the client's DMA_READ/DMA_WRITE replies. Because the reader only
/// handles a command inline once the dispatcher has answered everything queued before it,
/// commands are handled and answered in the order they arrived in either mode.
pub fn serve_connection<B: VfioUserBackend + ?Sized>(
    backend: &B,
    stream: UnixStream,
    config: &ServerConfig,
) -> Result<(), ServerError> {
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let (tx, rx) = mpsc::sync_channel::<Item>(config.queue_depth.max(1));
    let limits = config.limits();
    let conn = Conn {
        backend,
        config,
        writer,
        client_caps: OnceLock::new(),
        dma: OnceLock::new(),
        fdless: Mutex::new(Vec::new()),
        fdless_count: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
        reader: OnceLock::new(),
    };

    let result = std::thread::scope(|s| {
        let reader_stream = &stream;
        let c = &conn;
        let reader = s.spawn(move || reader_loop(c, reader_stream, limits, tx));
        let r = conn.dispatch(&rx);
        // Unblock the reader (its recvmsg returns 0) and drop whatever is still queued,
        // closing the fds those messages carried.
        let _ = stream.shutdown(Shutdown::Both);
        drop(rx);
        let rr = reader.join().unwrap_or(Ok(()));
        r.and(rr)
    });
    if let Some(d) = conn.dma.get() {
        d.close();
    }
    backend.disconnected();
    result
}

fn reader_loop<B: VfioUserBackend + ?Sized>(
    conn: &Conn<'_, B>,
    stream: &UnixStream,
    limits: RecvLimits,
    tx: SyncSender<Item>,
) -> Result<(), ServerError> {
    let _ = conn.reader.set(std::thread::current().id());
    let mut rd = MessageReader::new();
    let mut backoff = PollBackoff::default();
    let r = loop {
        // The busy poll reads what arrives straight into the reader (no separate `poll`).
        if backoff.should_poll() {
            backoff.record(rd.poll(stream, conn.config.poll));
        }
        let item = match rd.recv(stream, limits) {
            Ok(None) => break Ok(()),
            Ok(Some(msg)) if msg.header.is_reply() => {
                match conn.dma.get() {
                    Some(d) => d.complete(msg),
                    None => tracing::debug!("vfio-user: reply before VERSION dropped"),
                }
                continue;
            }
            Ok(Some(msg)) => Item::Cmd(msg),
            Err(e) => match e.reply_errno() {
                Some((h, errno)) if !h.is_reply() => Item::Refused(h, errno),
                Some(_) => continue,
                None => {
                    break match e {
                        RecvError::BadHeader(p) => Err(ServerError::BadHeader(p)),
                        // EOF mid-message or a reset socket: the client is gone.
                        _ => Ok(()),
                    };
                }
            },
        };
        if conn.inline(&item) {
            match conn.process(item) {
                Ok(Some(spare)) => rd.recycle(spare),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
        } else {
            // Counted before it is queued: the dispatcher may answer it at once.
            conn.queued.fetch_add(1, Ordering::SeqCst);
            if tx.send(item).is_err() {
                break Ok(());
            }
        }
    };
    // Pending DMA requests cannot be answered any more.
    if let Some(d) = conn.dma.get() {
        d.close();
    }
    r
}

/// Adaptive back-off of the busy poll: a client that does not send its next request within
/// the window (an idle or slow one) would only burn the window's CPU after every message, so
/// after [`PollBackoff::FRUITLESS`] fruitless windows in a row the reader sleeps at once for
/// the next [`PollBackoff::SKIP`] messages, then tries again (as the emulated channel thread's
/// spin backs off).
#[derive(Debug, Default)]
struct PollBackoff {
    fruitless: u32,
    skip: u32,
}

impl PollBackoff {
    const FRUITLESS: u32 = 4;
    const SKIP: u32 = 64;

    fn should_poll(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    fn record(&mut self, found: bool) {
        if found {
            self.fruitless = 0;
        } else {
            self.fruitless += 1;
            if self.fruitless >= Self::FRUITLESS {
                self.fruitless = 0;
                self.skip = Self::SKIP;
            }
        }
    }
}

impl<B: VfioUserBackend + ?Sized> Conn<'_, B> {
    /// Whether the reader may handle `item` itself: nothing is queued for the dispatcher
    /// (order), and handling it cannot need a DMA_READ/DMA_WRITE reply (no fd-less map in
    /// force, and it is not a DMA_MAP without an fd, after which there would be one).
    fn inline(&self, item: &Item) -> bool {
        if self.queued.load(Ordering::SeqCst) != 0 || self.fdless_count.load(Ordering::SeqCst) != 0
        {
            return false;
        }
        match item {
            Item::Cmd(m) => !(m.header.command == Command::DmaMap as u16 && m.fds.is_empty()),
            Item::Refused(..) => true,
        }
    }

    fn dispatch(&self, rx: &Receiver<Item>) -> Result<(), ServerError> {
        while let Ok(item) = rx.recv() {
            let r = self.process(item);
            // Only now may the reader handle the next command itself.
            self.queued.fetch_sub(1, Ordering::SeqCst);
            r?;
        }
        Ok(())
    }

    /// Handles one command (or refusal) and sends its reply. An error ends the connection.
    /// Returns the request's payload buffer when it is free again (for
    /// [`MessageReader::recycle`]).
    fn process(&self, item: Item) -> Result<Option<Vec<u8>>, ServerError> {
        let msg = match item {
            Item::Refused(h, errno) => {
                if self.client_caps.get().is_none() {
                    self.send_error(&h, errno)?;
                    return Err(ServerError::Negotiation("refused first message".into()));
                }
                if !h.no_reply() {
                    self.send_error(&h, errno)?;
                }
                return Ok(None);
            }
            Item::Cmd(m) => m,
        };
        if self.client_caps.get().is_none() {
            return match self.negotiate(msg)? {
                Flow::Continue => Ok(None),
                Flow::Close => Err(ServerError::Negotiation("bad first message".into())),
            };
        }
        let header = msg.header;
        // The per-I/O command answered from a fixed-size reply, its payload buffer kept
        // for the next message. With fds it takes the general path (which refuses them).
        if header.command == Command::RegionWrite as u16 && msg.fds.is_empty() {
            let result = self.region_write(&msg.payload);
            self.answer(
                &header,
                result.as_ref().map(|r| &r[..]).map_err(|e| *e),
                &[],
            )?;
            return Ok(Some(msg.payload));
        }
        let mut fds = Vec::new();
        let result = self.handle(msg, &mut fds);
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        self.answer(&header, result.as_deref().map_err(|e| *e), &fds)?;
        Ok(None)
    }

    /// Answers the command `header` with `result` (its payload and `fds`, or an error reply
    /// with the errno), unless the client asked for no reply: then a failure is only logged.
    fn answer(
        &self,
        header: &Header,
        result: Result<&[u8], i32>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ServerError> {
        if header.no_reply() {
            if let Err(e) = result {
                tracing::debug!(
                    cmd = header.command,
                    errno = e,
                    "vfio-user: no-reply command failed"
                );
            }
            return Ok(());
        }
        match result {
            Ok(payload) => {
                send_message(
                    &lock(&self.writer),
                    &header.reply(payload.len()),
                    payload,
                    fds,
                )?;
                Ok(())
            }
            Err(errno) => self.send_error(header, errno),
        }
    }

    fn send(&self, h: &Header, payload: &[u8]) -> Result<(), ServerError> {
        send_message(&lock(&self.writer), h, payload, &[])?;
        Ok(())
    }

    fn send_error(&self, h: &Header, errno: i32) -> Result<(), ServerError> {
        self.send(&h.error_reply(errno), &[])
    }

    /// The first message must be VERSION with major 0; anything else gets an error reply and
    /// the connection is closed.
    fn negotiate(&self, msg: Message) -> Result<Flow, ServerError> {
        let h = msg.header;
        if h.command != Command::Version as u16 || !msg.fds.is_empty() {
            self.send_error(&h, libc::EINVAL)?;
            return Ok(Flow::Close);
        }
        let v = match Version::decode(&msg.payload) {
            Ok(v) => v,
            Err(e) => {
                self.send_error(&h, e.errno())?;
                return Ok(Flow::Close);
            }
        };
        if v.major != VERSION_MAJOR {
            self.send_error(&h, libc::ENOTSUP)?;
            return Ok(Flow::Close);
        }
        let theirs = v.caps.clone().unwrap_or_default();
        // Reply with the subset of the proposed capabilities that we have values for.
        let c = &self.config;
        let ours = Capabilities {
            max_msg_fds: theirs.max_msg_fds.map(|_| c.max_msg_fds),
            max_data_xfer_size: theirs.max_data_xfer_size.map(|_| c.max_data_xfer_size),
            pgsizes: theirs.pgsizes.map(|_| c.pgsizes),
            max_dma_maps: theirs.max_dma_maps.map(|_| c.max_dma_maps),
            write_multiple: theirs.write_multiple,
        };
        let reply = Version {
            major: VERSION_MAJOR,
            minor: v.minor.min(VERSION_MINOR),
            caps: Some(ours),
        }
        .encode();
        let _ = self.dma.set(DmaChannel::new(
            self.writer.clone(),
            theirs.max_data_xfer_size(),
            c.dma_timeout,
            self.reader.get().copied(),
        ));
        let _ = self.client_caps.set(theirs);
        // The backend is ready for this client before the client hears the answer.
        self.backend.connected();
        if let Some(d) = self.dma.get() {
            self.backend.attach_dma(d.clone());
        }
        self.send(&h.reply(reply.len()), &reply)?;
        Ok(Flow::Continue)
    }

    fn check_region(&self, index: u32) -> Result<RegionDesc, i32> {
        if index >= self.backend.device_info().num_regions {
            return Err(libc::EINVAL);
        }
        self.backend.region_info(index)
    }

    /// Bounds and permission of a region access.
    fn check_access(&self, index: u32, offset: u64, len: u64, flag: u32) -> Result<(), i32> {
        let r = self.check_region(index)?;
        match offset.checked_add(len) {
            Some(end) if end <= r.size => {}
            _ => return Err(libc::EINVAL),
        }
        if r.flags & flag == 0 {
            return Err(libc::EPERM);
        }
        Ok(())
    }

    /// REGION_WRITE: its reply payload (fixed size, no allocation: the per-I/O command).
    fn region_write(&self, p: &[u8]) -> Result<[u8; RegionAccess::SIZE], i32> {
        let max_xfer = self.config.max_data_xfer_size;
        let (a, data) = RegionAccess::decode_ref(p, true, max_xfer).map_err(|e| e.errno())?;
        self.check_access(
            a.region,
            a.offset,
            a.count as u64,
            VFIO_REGION_INFO_FLAG_WRITE,
        )?;
        let n = self
            .backend
            .region_write(a.region, a.offset, data)?
            .min(data.len());
        Ok(RegionAccess::encode_fixed(a.offset, a.region, n as u32))
    }

    fn handle(&self, msg: Message, reply_fds: &mut Vec<OwnedFd>) -> Result<Vec<u8>, i32> {
        let Message {
            header,
            payload,
            fds,
        } = msg;
        let p = &payload[..];
        let Some(cmd) = Command::from_u16(header.command) else {
            return Err(libc::ENOSYS);
        };
        if !fds.is_empty() && !matches!(cmd, Command::DmaMap | Command::DeviceSetIrqs) {
            return Err(libc::EINVAL);
        }
        let pe = |e: ProtoError| e.errno();
        let max_xfer = self.config.max_data_xfer_size;
        match cmd {
            Command::Version => Err(libc::EINVAL),
            Command::DeviceGetInfo => {
                DeviceInfo::decode_request(p).map_err(pe)?;
                let d = self.backend.device_info();
                Ok(DeviceInfo {
                    argsz: DeviceInfo::SIZE as u32,
                    flags: d.flags,
                    num_regions: d.num_regions,
                    num_irqs: d.num_irqs,
                }
                .encode())
            }
            Command::DeviceGetRegionInfo => {
                let (index, argsz) = RegionInfo::decode_request(p).map_err(pe)?;
                let r = self.check_region(index)?;
                let mut info = RegionInfo {
                    argsz: 0,
                    flags: r.flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE),
                    index,
                    cap_offset: 0,
                    size: r.size,
                    offset: 0,
                    caps: r
                        .cap_type
                        .map(|(type_, subtype)| RegionCap::Type { type_, subtype })
                        .into_iter()
                        .collect(),
                };
                let mmap = self.backend.region_mmap(index).filter(|m| m.fits(r.size));
                if let Some(m) = mmap {
                    info.flags |= VFIO_REGION_INFO_FLAG_MMAP;
                    info.offset = m.offset;
                    info.caps.insert(0, RegionCap::SparseMmap(m.areas.clone()));
                    // The fd rides only with the reply that carries the areas; a reply
                    // cut short by argsz makes the client ask again.
                    if info.full_len() <= argsz as usize {
                        reply_fds.push(m.fd);
                    }
                }
                Ok(info.encode_reply(argsz))
            }
            Command::DeviceGetIrqInfo => {
                let req = IrqInfo::decode_request(p).map_err(pe)?;
                if req.index >= self.backend.device_info().num_irqs {
                    return Err(libc::EINVAL);
                }
                let i = self.backend.irq_info(req.index)?;
                Ok(IrqInfo {
                    argsz: IrqInfo::SIZE as u32,
                    flags: i.flags,
                    index: req.index,
                    count: i.count,
                }
                .encode())
            }
            Command::DeviceSetIrqs => {
                let s = IrqSet::decode(p).map_err(pe)?;
                if s.index >= self.backend.device_info().num_irqs {
                    return Err(libc::EINVAL);
                }
                let info = self.backend.irq_info(s.index)?;
                let disable_all = s.data_none() && s.start == 0 && s.count == 0;
                if !disable_all
                    && (s.count == 0 || s.start as u64 + s.count as u64 > info.count as u64)
                {
                    return Err(libc::EINVAL);
                }
                if s.data_eventfd() {
                    if !fds.is_empty() && fds.len() != s.count as usize {
                        return Err(libc::EINVAL);
                    }
                } else if !fds.is_empty() {
                    return Err(libc::EINVAL);
                }
                self.backend
                    .set_irqs(s.index, s.flags, s.start, s.count, fds, &s.data)?;
                Ok(Vec::new())
            }
            Command::RegionRead => {
                let a = RegionAccess::decode(p, false, max_xfer).map_err(pe)?;
                self.check_access(
                    a.region,
                    a.offset,
                    a.count as u64,
                    VFIO_REGION_INFO_FLAG_READ,
                )?;
                let mut buf = vec![0u8; a.count as usize];
                let n = self
                    .backend
                    .region_read(a.region, a.offset, &mut buf)?
                    .min(buf.len());
                buf.truncate(n);
                Ok(RegionAccess {
                    offset: a.offset,
                    region: a.region,
                    count: n as u32,
                    data: buf,
                }
                .encode())
            }
            Command::RegionWrite => Ok(self.region_write(p)?.to_vec()),
            Command::RegionWriteMulti => {
                let negotiated = self
                    .client_caps
                    .get()
                    .and_then(|c| c.write_multiple)
                    .unwrap_or(false);
                if !negotiated {
                    return Err(libc::ENOTSUP);
                }
                let m = WriteMulti::decode(p).map_err(pe)?;
                for w in &m.writes {
                    let data = &w.data[..w.count as usize];
                    self.check_access(
                        w.region,
                        w.offset,
                        w.count as u64,
                        VFIO_REGION_INFO_FLAG_WRITE,
                    )?;
                    self.backend.region_write(w.region, w.offset, data)?;
                }
                Ok((m.writes.len() as u64).to_ne_bytes().to_vec())
            }
            Command::DmaMap => {
                let m = DmaMap::decode(p).map_err(pe)?;
                // Smallest advertised page size; maps must be aligned to it.
                let page = 1u64 << self.config.pgsizes.max(1).trailing_zeros();
                if (m.address | m.size | m.offset) & (page - 1) != 0 {
                    return Err(libc::EINVAL);
                }
                let mut fds = fds;
                let backing = match fds.len() {
                    0 => {
                        if m.offset != 0 {
                            return Err(libc::EINVAL);
                        }
                        DmaBacking::Client
                    }
                    1 => DmaBacking::Fd {
                        fd: fds.remove(0),
                        offset: m.offset,
                    },
                    _ => return Err(libc::EINVAL),
                };
                let fdless = matches!(backing, DmaBacking::Client);
                self.backend.dma_map(m.address, m.size, m.prot(), backing)?;
                if fdless {
                    let mut v = lock(&self.fdless);
                    v.push((m.address, m.size));
                    self.fdless_count.store(v.len(), Ordering::SeqCst);
                }
                Ok(Vec::new())
            }
            Command::DmaUnmap => {
                let u = DmaUnmap::decode(p).map_err(pe)?;
                self.backend.dma_unmap(u.address, u.size, u.all())?;
                {
                    let mut v = lock(&self.fdless);
                    if u.all() {
                        v.clear();
                    } else {
                        let end = u.address.saturating_add(u.size);
                        v.retain(|&(a, n)| !(a >= u.address && a.saturating_add(n) <= end));
                    }
                    self.fdless_count.store(v.len(), Ordering::SeqCst);
                }
                Ok(DmaUnmap {
                    argsz: DmaUnmap::SIZE as u32,
                    ..u
                }
                .encode())
            }
            Command::DeviceReset => {
                if !p.is_empty() {
                    return Err(libc::EINVAL);
                }
                if self.backend.device_info().flags & VFIO_DEVICE_FLAGS_RESET == 0 {
                    return Err(libc::ENOTSUP);
                }
                self.backend.reset()?;
                Ok(Vec::new())
            }
            Command::DeviceGetRegionIoFds
            | Command::DeviceFeature
            | Command::MigDataRead
            | Command::MigDataWrite => Err(libc::ENOTSUP),
            // Server-to-client commands sent the wrong way.
            Command::DmaRead | Command::DmaWrite => Err(libc::EINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_poll_backs_off_after_fruitless_windows() {
        let mut b = PollBackoff::default();
        // Found windows never back off; a fruitless run shorter than FRUITLESS is forgiven.
        for _ in 0..100 {
            assert!(b.should_poll());
            b.record(true);
        }
        for _ in 0..PollBackoff::FRUITLESS - 1 {
            assert!(b.should_poll());
            b.record(false);
        }
        b.record(true);
        for _ in 0..PollBackoff::FRUITLESS {
            assert!(b.should_poll());
            b.record(false);
        }
        // Then SKIP messages without a poll, then polling again.
        for _ in 0..PollBackoff::SKIP {
            assert!(!b.should_poll());
        }
        assert!(b.should_poll());
    }
    use std::time::Instant;

    /// The busy poll returns as soon as data arrives (keeping it, with its fds, for the next
    /// receive) or the peer hangs up, and on an idle socket once its budget is spent: it
    /// never hangs.
    #[test]
    fn busy_poll_ends_on_data_hangup_or_budget() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut rd = MessageReader::new();
        let t0 = Instant::now();
        assert!(!rd.poll(&a, Duration::from_millis(2)), "fruitless");
        assert!(t0.elapsed() >= Duration::from_millis(2));
        assert_eq!(rd.buffered(), 0);
        let f = nix::sys::memfd::memfd_create("polled", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
        let h = Header {
            id: 5,
            command: Command::DmaMap as u16,
            size: (HEADER_SIZE + 3) as u32,
            flags: 0,
            error: 0,
        };
        send_message(&b, &h, b"abc", &[f.as_fd()]).unwrap();
        let t0 = Instant::now();
        assert!(rd.poll(&a, Duration::from_secs(60)));
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "did not see the data"
        );
        assert_eq!(rd.buffered(), HEADER_SIZE + 3);
        // What the poll read is the next message, fd included.
        let lim = ServerConfig::default().limits();
        let m = rd.recv(&a, lim).unwrap().unwrap();
        assert_eq!(
            (m.header.id, &m.payload[..], m.fds.len()),
            (5, &b"abc"[..], 1)
        );
        drop(b);
        let t0 = Instant::now();
        assert!(rd.poll(&a, Duration::from_secs(60)));
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "did not see the hang-up"
        );
        assert!(rd.recv(&a, lim).unwrap().is_none());
    }
}
