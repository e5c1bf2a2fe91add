//! A vfio-ccw client a VMM can embed: [`CcwClient`] drives one vccw device over vfio-user
//! (the service's sockets), with guest memory from a memfd ([`GuestMemory`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use vccw::ccw::{Ccw1, CcwFlags};
//! use vccw::client::{CcwClient, GuestMemory};
//! use vccw::orb::{Orb, OrbControls};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mem = GuestMemory::new(1 << 20)?;
//! let dev = CcwClient::connect("vccw-data/dasd0.sock")?;
//! dev.map_memory(&mem, 0)?;
//! // SENSE ID into 0x2000, CCW at 0x1000.
//! mem.write_ccws(0x1000, &[Ccw1 { cmd: 0xE4, flags: CcwFlags::from_bits(0x20), count: 7,
//!                                 cda: 0x2000 }])?;
//! let orb = Orb { intparm: 1, ctl: OrbControls::new().with_format1(true).with_lpm(0xff),
//!                 cpa: 0x1000 };
//! let irb = dev.run(&orb, Duration::from_secs(5))?;
//! println!("dstat {:#04x}", irb.scsw.dstat);
//! # Ok(()) }
//! ```

pub mod workload;

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use thiserror::Error;
use vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::ccw::Ccw1;
use crate::driver::regions::{
    CcwCmdRegion, CcwIoRegion, CCW_CRW_REGION_SIZE, CCW_IO_REGION_SIZE, CCW_SCHIB_REGION_SIZE,
    IO_IRB_OFFSET, VFIO_CCW_ASYNC_CMD_CSCH, VFIO_CCW_ASYNC_CMD_HSCH,
};
use crate::driver::{
    IrqIndex, ASYNC_REGION_INDEX, CRW_REGION_INDEX, IO_REGION_INDEX, SCHIB_REGION_INDEX,
};
use crate::orb::{fctl, Crw, Irb, Orb, Schib, Scsw, ScswFlags, IRB_SIZE, SCHIB_SIZE};
use crate::vfio_user::client::{Client, ClientConfig, ClientError, RegionMap};

/// Why a client operation failed.
#[derive(Debug, Error)]
pub enum CcwClientError {
    /// The vfio-user transport or the server refused; [`ClientError::errno`] gives the errno
    /// (a refused start carries the region's `ret_code`: EBUSY, EINVAL, EFAULT, ...).
    #[error(transparent)]
    Transport(#[from] ClientError),
    /// A local system call failed (memfd, mmap, eventfd, poll).
    #[error("{0}")]
    Sys(#[from] nix::errno::Errno),
    /// A guest address range outside the guest memory (EFAULT).
    #[error("guest range {addr:#x}+{len:#x} outside memory")]
    OutOfRange {
        /// Start.
        addr: u64,
        /// Length.
        len: usize,
    },
    /// No I/O interrupt within the timeout (ETIMEDOUT).
    #[error("no interrupt within {0:?}")]
    Timeout(Duration),
    /// The server's answer was short or malformed (EIO).
    #[error("short or malformed answer: {0}")]
    Short(&'static str),
}

impl CcwClientError {
    /// The errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            CcwClientError::Transport(e) => e.errno(),
            CcwClientError::Sys(e) => *e as i32,
            CcwClientError::OutOfRange { .. } => libc::EFAULT,
            CcwClientError::Timeout(_) => libc::ETIMEDOUT,
            CcwClientError::Short(_) => libc::EIO,
        }
    }
}

/// Guest memory in a memfd: this process maps it (shared) and hands the fd to the server,
/// so both see the same pages.
pub struct GuestMemory {
    fd: OwnedFd,
    map: MmapRegion,
    len: usize,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("len", &self.len)
            .finish()
    }
}

impl GuestMemory {
    /// `len` zero bytes (rounded up to a page) in a new memfd, sealed against shrinking so
    /// the server's mapping can never fault past the end of the file.
    pub fn new(len: usize) -> Result<GuestMemory, CcwClientError> {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let len = len.div_ceil(4096).max(1) * 4096;
        let fd = memfd_create(
            "vccw-guest",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        nix::unistd::ftruncate(&fd, len as i64)?;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK))?;
        let file = std::fs::File::from(fd.try_clone().map_err(|_| nix::errno::Errno::EMFILE)?);
        let map = MmapRegion::from_file(FileOffset::new(file, 0), len)
            .map_err(|_| nix::errno::Errno::ENOMEM)?;
        Ok(GuestMemory { fd, map, len })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd (what DMA_MAP sends).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn range(&self, addr: u64, len: usize) -> Result<usize, CcwClientError> {
        let oor = CcwClientError::OutOfRange { addr, len };
        let a = usize::try_from(addr).map_err(|_| CcwClientError::OutOfRange { addr, len })?;
        match a.checked_add(len) {
            Some(end) if end <= self.len => Ok(a),
            _ => Err(oor),
        }
    }

    /// Writes `data` at guest address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), CcwClientError> {
        let a = self.range(addr, data.len())?;
        let s = self
            .map
            .get_slice(a, data.len())
            .map_err(|_| CcwClientError::OutOfRange {
                addr,
                len: data.len(),
            })?;
        s.copy_from(data);
        Ok(())
    }

    /// Reads `buf.len()` bytes at guest address `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), CcwClientError> {
        let a = self.range(addr, buf.len())?;
        let s = self
            .map
            .get_slice(a, buf.len())
            .map_err(|_| CcwClientError::OutOfRange {
                addr,
                len: buf.len(),
            })?;
        s.copy_to(buf);
        Ok(())
    }

    /// Writes format-1 CCWs back to back from `addr` (big-endian images).
    pub fn write_ccws(&self, addr: u64, ccws: &[Ccw1]) -> Result<(), CcwClientError> {
        let bytes: Vec<u8> = ccws.iter().flat_map(|c| c.to_bytes()).collect();
        self.write(addr, &bytes)
    }
}

/// How [`CcwClient::wait_io`] waits for the I/O interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitMode {
    /// Block in poll(2) on the eventfd.
    #[default]
    Block,
    /// Spin reading the (non-blocking) eventfd: lowest latency, one core busy.
    Spin,
}

/// How long a start, halt or clear is retried while the device answers EAGAIN.
pub const EAGAIN_RETRY: Duration = Duration::from_secs(1);

/// A connected vfio-ccw device: regions, interrupts, memory.
///
/// Its memory is always mapped by fd, so [`CcwClient::connect`] uses the transport's
/// synchronous mode (no reader thread: each call sends and receives on the calling thread).
/// When the server offers the I/O region for mmap, the IRB is read from that read-only
/// mapping instead of by REGION_READ: one round trip per I/O (the start) instead of two.
pub struct CcwClient {
    client: Client,
    io_map: Option<RegionMap>,
    io_irq: EventFd,
    crw_irq: EventFd,
    wait: WaitMode,
}

impl std::fmt::Debug for CcwClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CcwClient")
            .field("wait", &self.wait)
            .finish()
    }
}

impl CcwClient {
    /// Connects to a device socket in synchronous mode, negotiates, installs eventfds for
    /// the I/O and CRW interrupts and maps the I/O region if the server offers it.
    pub fn connect(path: impl AsRef<Path>) -> Result<CcwClient, CcwClientError> {
        Self::connect_with(
            path,
            ClientConfig {
                sync: true,
                ..ClientConfig::default()
            },
        )
    }

    /// As [`CcwClient::connect`] with transport settings (threaded or synchronous as
    /// `config.sync` says).
    pub fn connect_with(
        path: impl AsRef<Path>,
        config: ClientConfig,
    ) -> Result<CcwClient, CcwClientError> {
        let client = Client::connect(path, config)?;
        let io_irq = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        let crw_irq = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        client.set_irqs_eventfd(
            IrqIndex::Io as u32,
            VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            &[io_irq.as_fd()],
        )?;
        client.set_irqs_eventfd(
            IrqIndex::Crw as u32,
            VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            &[crw_irq.as_fd()],
        )?;
        // Any refusal of the offer (or none) leaves the REGION_READ path.
        let io_map = match client.map_region(IO_REGION_INDEX) {
            Ok(Some(m))
                if m.offset() <= IO_IRB_OFFSET as u64
                    && m.offset() + m.len() as u64 >= (IO_IRB_OFFSET + IRB_SIZE) as u64 =>
            {
                Some(m)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%e, "I/O region not mapped; IRBs by REGION_READ");
                None
            }
        };
        Ok(CcwClient {
            client,
            io_map,
            io_irq,
            crw_irq,
            wait: WaitMode::Block,
        })
    }

    /// The vfio-user client underneath (region info, raw requests).
    pub fn transport(&self) -> &Client {
        &self.client
    }

    /// How [`CcwClient::wait_io`] waits.
    pub fn set_wait_mode(&mut self, mode: WaitMode) {
        self.wait = mode;
    }

    /// DMA_MAP all of `mem` at guest address `iova`, read-write, by fd.
    pub fn map_memory(&self, mem: &GuestMemory, iova: u64) -> Result<(), CcwClientError> {
        self.client
            .dma_map_fd(iova, mem.len() as u64, mem.fd().as_fd(), 0, (true, true))?;
        Ok(())
    }

    /// DMA_UNMAP of a previous [`CcwClient::map_memory`].
    pub fn unmap_memory(&self, mem: &GuestMemory, iova: u64) -> Result<(), CcwClientError> {
        self.client.dma_unmap(iova, mem.len() as u64)?;
        Ok(())
    }

    /// Starts `orb`'s channel program (START in the SCSW's function control). Refusals
    /// come back as [`CcwClientError::Transport`] carrying the region's `ret_code` errno.
    pub fn start(&self, orb: &Orb) -> Result<(), CcwClientError> {
        // Drop a stale interrupt so the next wait sees this program's.
        let _ = self.io_irq.read();
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(fctl::START),
            ..Default::default()
        };
        let region = CcwIoRegion::request(orb, &scsw).to_bytes();
        let n = self.region_write_retry(IO_REGION_INDEX, &region)?;
        if n != CCW_IO_REGION_SIZE {
            return Err(CcwClientError::Short("I/O region write"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the I/O interrupt (blocking or spinning, see
    /// [`CcwClient::set_wait_mode`]).
    pub fn wait_io(&self, timeout: Duration) -> Result<(), CcwClientError> {
        wait_eventfd(&self.io_irq, timeout, self.wait)
    }

    /// Waits up to `timeout` for a CRW interrupt.
    pub fn wait_crw(&self, timeout: Duration) -> Result<(), CcwClientError> {
        wait_eventfd(&self.crw_irq, timeout, WaitMode::Block)
    }

    /// Whether IRBs are read from the mapped I/O region (else by REGION_READ).
    pub fn io_region_mapped(&self) -> bool {
        self.io_map.is_some()
    }

    /// Reads the IRB the last interrupt stored: from the mapped I/O region when the server
    /// offered it, else by REGION_READ.
    ///
    /// With memory mapped without an fd ([`Client::dma_map_memory`] on the transport) the
    /// IRB is always read by REGION_READ: that read is what makes the server copy the
    /// program's data back.
    ///
    /// The server updates the mapping while it holds the device lock, but this process
    /// does not: a read racing a new interrupt could see a mix of two IRBs. The bytes are
    /// therefore read until two reads in a row agree (a new interrupt also signals the
    /// eventfd again, so its status is not lost either way).
    pub fn irb(&self) -> Result<Irb, CcwClientError> {
        let mut b = [0u8; IRB_SIZE];
        if let Some(m) = self
            .io_map
            .as_ref()
            .filter(|_| !self.client.has_fdless_maps())
        {
            let mut again = [0u8; IRB_SIZE];
            m.read(IO_IRB_OFFSET as u64, &mut b)?;
            for _ in 0..16 {
                m.read(IO_IRB_OFFSET as u64, &mut again)?;
                if again == b {
                    return Ok(Irb::from_bytes(&b));
                }
                b = again;
            }
            return Err(CcwClientError::Short("IRB keeps changing in the mapping"));
        }
        let n = self
            .client
            .region_read(IO_REGION_INDEX, IO_IRB_OFFSET as u64, &mut b)?;
        if n != IRB_SIZE {
            return Err(CcwClientError::Short("IRB read"));
        }
        Ok(Irb::from_bytes(&b))
    }

    /// Start, wait for the interrupt, read the IRB; repeats the wait while the status is
    /// intermediate only (not final).
    pub fn run(&self, orb: &Orb, timeout: Duration) -> Result<Irb, CcwClientError> {
        self.start(orb)?;
        // The clock only for a second wait (intermediate status): the first has all of
        // `timeout`.
        let mut deadline = None;
        loop {
            let left = match deadline {
                None => {
                    deadline = Some(Instant::now() + timeout);
                    timeout
                }
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            self.wait_io(left)?;
            let irb = self.irb()?;
            let a = irb.scsw.flags.actl();
            if a & (crate::orb::actl::SUBCHANNEL_ACTIVE | crate::orb::actl::DEVICE_ACTIVE) == 0 {
                return Ok(irb);
            }
        }
    }

    fn async_cmd(&self, command: u32) -> Result<(), CcwClientError> {
        let r = CcwCmdRegion {
            command,
            ret_code: 0,
        };
        self.region_write_retry(ASYNC_REGION_INDEX, &r.to_bytes())?;
        Ok(())
    }

    /// A region write, repeated while the device answers EAGAIN: it is still finishing the
    /// interrupt this client may already have seen (the device signals the eventfd before
    /// it lets go of its state, as Linux does; QEMU retries the same way). Bounded by
    /// [`EAGAIN_RETRY`].
    fn region_write_retry(&self, index: u32, data: &[u8]) -> Result<usize, CcwClientError> {
        // The clock only once the device said EAGAIN.
        let mut deadline = None;
        loop {
            match self.client.region_write(index, 0, data) {
                Err(ClientError::Remote(libc::EAGAIN))
                    if Instant::now()
                        < *deadline.get_or_insert_with(|| Instant::now() + EAGAIN_RETRY) =>
                {
                    std::thread::yield_now()
                }
                r => return Ok(r?),
            }
        }
    }

    /// HALT SUBCHANNEL through the async region (its interrupt arrives on the I/O eventfd).
    pub fn halt(&self) -> Result<(), CcwClientError> {
        self.async_cmd(VFIO_CCW_ASYNC_CMD_HSCH)
    }

    /// CLEAR SUBCHANNEL through the async region.
    pub fn clear(&self) -> Result<(), CcwClientError> {
        self.async_cmd(VFIO_CCW_ASYNC_CMD_CSCH)
    }

    /// STORE SUBCHANNEL through the SCHIB region.
    pub fn schib(&self) -> Result<Schib, CcwClientError> {
        let mut b = [0u8; CCW_SCHIB_REGION_SIZE];
        let n = self.client.region_read(SCHIB_REGION_INDEX, 0, &mut b)?;
        if n != SCHIB_SIZE {
            return Err(CcwClientError::Short("SCHIB read"));
        }
        Ok(Schib::from_bytes(&b))
    }

    /// Pops one CRW from the CRW region (`None` when the queue is empty: all-zero CRW).
    pub fn crw(&self) -> Result<Option<Crw>, CcwClientError> {
        let mut b = [0u8; CCW_CRW_REGION_SIZE];
        let n = self.client.region_read(CRW_REGION_INDEX, 0, &mut b)?;
        if n != CCW_CRW_REGION_SIZE {
            return Err(CcwClientError::Short("CRW read"));
        }
        let w = [b[0], b[1], b[2], b[3]];
        if w == [0; 4] {
            return Ok(None);
        }
        Ok(Some(Crw::from_bytes(&w)))
    }

    /// DEVICE_RESET.
    pub fn reset(&self) -> Result<(), CcwClientError> {
        self.client.reset()?;
        Ok(())
    }
}

fn wait_eventfd(fd: &EventFd, timeout: Duration, mode: WaitMode) -> Result<(), CcwClientError> {
    crate::driver::wait_eventfd(fd, timeout, mode == WaitMode::Spin)
        .map(|_| ())
        .map_err(|e| match e {
            crate::driver::EventfdWaitError::TimedOut => CcwClientError::Timeout(timeout),
            crate::driver::EventfdWaitError::Sys(e) => e.into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_bounds_and_ccw_images() {
        let m = GuestMemory::new(5000).unwrap();
        assert_eq!(m.len(), 8192);
        m.write(8190, &[1, 2]).unwrap();
        assert!(matches!(
            m.write(8191, &[1, 2]),
            Err(CcwClientError::OutOfRange { .. })
        ));
        assert_eq!(
            m.read(u64::MAX, &mut [0u8; 2]).unwrap_err().errno(),
            libc::EFAULT
        );
        m.write_ccws(
            0x100,
            &[Ccw1 {
                cmd: 0xE4,
                flags: crate::ccw::CcwFlags::from_bits(0x20),
                count: 7,
                cda: 0x0000_2000,
            }],
        )
        .unwrap();
        let mut b = [0u8; 8];
        m.read(0x100, &mut b).unwrap();
        // Format-1 CCW: command, flags (SLI), count 7, address 0x2000, big-endian.
        assert_eq!(b, [0xE4, 0x20, 0x00, 0x07, 0x00, 0x00, 0x20, 0x00]);
    }
}
