//! [`CcwBackend`]: one vccw device (a [`VfioCcwDevice`] and its [`IommuStore`]) served over
//! vfio-user.
//!
//! The vfio-user server ([`crate::vfio_user::server`]) validates every message; this backend
//! maps the validated requests onto the device and the store:
//!
//! * DEVICE_GET_INFO / REGION_INFO / IRQ_INFO / SET_IRQS / REGION_READ / REGION_WRITE /
//!   DEVICE_RESET: straight to the device (its errnos are the kernel's).
//! * DMA_MAP with an fd: the store mmaps it ([`Backing::File`]); the store refuses a range
//!   past the end of the file (EINVAL), so a short file cannot SIGBUS the server.
//! * DMA_MAP without an fd (the slow path): the store gets an anonymous *shadow* mapping of
//!   the range. Before an I/O-region write (which may start a program) the shadow is filled
//!   with DMA_READ from the client; after the program ended, the first I/O-region read (the
//!   client reading the IRB) first copies the writable shadows back with DMA_WRITE. The
//!   cost is a full copy of every shadowed range in each direction per I/O, plus one
//!   socket round trip per `max_data_xfer_size` bytes: use fd-backed memory for anything but
//!   tiny guests.
//! * DMA_UNMAP: the store's unmap; pinned pages make the device reset first (the store's
//!   unmap listener does that) so the pins go before the unmap returns.
//! * The I/O region is offered for mmap: each connection gets a fresh sealed, read-only
//!   [`IoMirror`] the device keeps up to date (IRB stored before the IO eventfd is
//!   signalled), so a client reads the IRB without a REGION_READ. A client with fd-less
//!   memory must still REGION_READ the IRB: that read is what copies the shadows back.
//! * Disconnect: unmap everything, drop the mirror, close the client's IRQ eventfds, reset the device. The
//!   device stays open and usable for the next client.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK,
};
use vm_memory::VolatileMemory;

use crate::driver::regions::CCW_IO_REGION_SIZE;
use crate::driver::{IrqIndex, IrqSet, IrqSetData, VfioCcwDevice, IO_REGION_INDEX};
use crate::iommu_store::{Backing, IommuStore, Perm, StoreMmapRegion};
use crate::vfio_user::server::{
    DeviceDesc, DmaBacking, DmaChannel, IrqDesc, RegionDesc, RegionMmap, VfioUserBackend,
};

use super::mirror::IoMirror;

/// Most bytes mapped without an fd at once (the slow path copies all of it per I/O).
pub const MAX_SHADOW_BYTES: u64 = 64 << 20;

/// Copy pieces of a shadow: (offset, length), at most 1 MiB each.
fn chunks(size: u64) -> impl Iterator<Item = (u64, usize)> {
    const CHUNK: u64 = 1 << 20;
    (0..size.div_ceil(CHUNK)).map(move |i| (i * CHUNK, (size - i * CHUNK).min(CHUNK) as usize))
}

/// A DMA_MAP without fd: the store sees `region`; the client's bytes reach it by DMA.
struct Shadow {
    iova: u64,
    size: u64,
    prot: (bool, bool),
    region: Arc<StoreMmapRegion>,
}

#[derive(Default)]
struct ConnState {
    dma: Option<DmaChannel>,
    shadows: Vec<Shadow>,
    /// A program was started since the shadows were last written back.
    write_back: bool,
    /// When the program in flight was started (for the I/O latency log).
    started: Option<Instant>,
    /// IRQ indexes with a client eventfd installed.
    irq_fds: [bool; 3],
    /// This connection's I/O region mirror (none if it could not be made).
    mirror: Option<Arc<IoMirror>>,
}

/// Counters for the stats line (see [`CcwBackend::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Connections served so far (ended ones included).
    pub connections: u64,
    /// Store mappings now.
    pub mappings: usize,
    /// Pinned guest pages now.
    pub pinned_pages: u64,
    /// Client IRQ eventfds held now.
    pub irq_fds: usize,
    /// Slow-path (fd-less) mappings now.
    pub shadows: usize,
    /// I/O starts accepted so far.
    pub starts: u64,
}

impl std::fmt::Display for BackendStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connections={} mappings={} pinned={} irqfds={} shadows={} starts={}",
            self.connections,
            self.mappings,
            self.pinned_pages,
            self.irq_fds,
            self.shadows,
            self.starts
        )
    }
}

/// One vfio-ccw device as a [`VfioUserBackend`].
pub struct CcwBackend {
    dev: VfioCcwDevice,
    store: IommuStore,
    name: String,
    conn: Mutex<ConnState>,
    connections: AtomicU64,
    starts: AtomicU64,
}

impl std::fmt::Debug for CcwBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CcwBackend")
            .field("name", &self.name)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CcwBackend {
    /// Serves `dev`, whose guest memory is `store` (the store the device translates
    /// through). Opens the device; EINVAL (as the device's errno) if it cannot be opened.
    pub fn new(dev: VfioCcwDevice, store: IommuStore, name: &str) -> Result<Self, i32> {
        dev.open().map_err(|e| e.errno())?;
        Ok(CcwBackend {
            dev,
            store,
            name: name.to_string(),
            conn: Mutex::new(ConnState::default()),
            connections: AtomicU64::new(0),
            starts: AtomicU64::new(0),
        })
    }

    /// The device.
    pub fn device(&self) -> &VfioCcwDevice {
        &self.dev
    }

    /// The name used in logs (the device number).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counters: what a SIGUSR1 stats dump prints.
    pub fn stats(&self) -> BackendStats {
        let s = self.store.stats();
        let c = lock(&self.conn);
        BackendStats {
            connections: self.connections.load(Ordering::Relaxed),
            mappings: s.mappings,
            pinned_pages: s.pinned_pages,
            irq_fds: c.irq_fds.iter().filter(|b| **b).count(),
            shadows: c.shadows.len(),
            starts: self.starts.load(Ordering::Relaxed),
        }
    }

    /// Copies every readable shadow in from the client (before a possible start).
    fn shadows_in(&self, c: &ConnState) -> Result<(), i32> {
        let Some(dma) = c.dma.as_ref() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        for s in c.shadows.iter().filter(|s| s.prot.0) {
            for (off, n) in chunks(s.size) {
                buf.resize(n, 0);
                dma.read(s.iova + off, &mut buf).map_err(|e| e.errno())?;
                let slice = s
                    .region
                    .get_slice(off as usize, n)
                    .map_err(|_| libc::EFAULT)?;
                slice.copy_from(&buf);
            }
        }
        Ok(())
    }

    /// Copies every writable shadow back to the client (after the program ended).
    fn shadows_out(&self, c: &ConnState) -> Result<(), i32> {
        let Some(dma) = c.dma.as_ref() else {
            return Ok(());
        };
        let mut buf = Vec::new();
        for s in c.shadows.iter().filter(|s| s.prot.1) {
            for (off, n) in chunks(s.size) {
                buf.resize(n, 0);
                let slice = s
                    .region
                    .get_slice(off as usize, n)
                    .map_err(|_| libc::EFAULT)?;
                slice.copy_to(&mut buf);
                dma.write(s.iova + off, &buf).map_err(|e| e.errno())?;
            }
        }
        Ok(())
    }

    /// The store frees unmapped memory (and closes a mapped memfd) when its lookup
    /// snapshot is next rebuilt, at the next lookup; one is forced here so the client's fd
    /// and pages go now, not at the next client's first I/O.
    fn release_unmapped(&self) {
        let _ = self.store.storage_key(0);
    }

    fn is_start(data: &[u8], offset: u64) -> bool {
        // The SCSW's function control is byte 1 of the SCSW area's word 0 (bits 17-19 of
        // the word): offset 12 + 2 in the region.
        const FCTL_BYTE: u64 = (crate::driver::regions::IO_SCSW_OFFSET + 2) as u64;
        FCTL_BYTE >= offset
            && FCTL_BYTE < offset + data.len() as u64
            && data[(FCTL_BYTE - offset) as usize] & (crate::orb::fctl::START << 4) != 0
    }
}

impl VfioUserBackend for CcwBackend {
    fn device_info(&self) -> DeviceDesc {
        let d = self.dev.device_info();
        DeviceDesc {
            flags: d.flags,
            num_regions: d.num_regions,
            num_irqs: d.num_irqs,
        }
    }

    fn region_info(&self, index: u32) -> Result<RegionDesc, i32> {
        let r = self.dev.region_info(index).map_err(|e| e.errno())?;
        Ok(RegionDesc {
            size: r.size,
            flags: r.flags,
            cap_type: r.cap_type.map(|t| (t.ty, t.subtype)),
        })
    }

    fn irq_info(&self, index: u32) -> Result<IrqDesc, i32> {
        let i = self.dev.irq_info(index).map_err(|e| e.errno())?;
        Ok(IrqDesc {
            flags: i.flags,
            count: i.count,
        })
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, i32> {
        if index == IO_REGION_INDEX {
            let mut c = lock(&self.conn);
            if (c.write_back || c.started.is_some()) && !self.dev.has_program() {
                if let Some(t) = c.started.take() {
                    tracing::debug!(
                        dev = %self.name,
                        latency_us = t.elapsed().as_micros() as u64,
                        "I/O completed (start -> IRB read)"
                    );
                }
                if c.write_back {
                    self.shadows_out(&c)?;
                    c.write_back = false;
                }
            }
        }
        self.dev
            .read_region(index, offset, buf)
            .map_err(|e| e.errno())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, i32> {
        if index != IO_REGION_INDEX {
            return self
                .dev
                .write_region(index, offset, data)
                .map_err(|e| e.errno());
        }
        let start = Self::is_start(data, offset);
        let span = tracing::debug_span!("io", dev = %self.name, start);
        let _e = span.enter();
        // The clock only for the debug log's latencies.
        let t0 = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
        let mut c = lock(&self.conn);
        if start && !c.shadows.is_empty() && !self.dev.has_program() {
            self.shadows_in(&c)?;
        }
        let r = self.dev.write_region(index, offset, data);
        if start && r.is_ok() {
            self.starts.fetch_add(1, Ordering::Relaxed);
            c.write_back = !c.shadows.is_empty();
            c.started = t0;
            if let Some(t0) = t0 {
                tracing::debug!(
                    submit_us = t0.elapsed().as_micros() as u64,
                    "start accepted"
                );
            }
        } else if let Err(e) = &r {
            tracing::debug!(errno = e.errno(), "I/O region write refused");
        }
        r.map_err(|e| e.errno())
    }

    fn set_irqs(
        &self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
        bools: &[u8],
    ) -> Result<(), i32> {
        let data = match flags & VFIO_IRQ_SET_DATA_TYPE_MASK {
            VFIO_IRQ_SET_DATA_NONE => IrqSetData::None,
            VFIO_IRQ_SET_DATA_BOOL => IrqSetData::Bool(bools.iter().map(|b| *b != 0).collect()),
            VFIO_IRQ_SET_DATA_EVENTFD if fds.is_empty() => {
                IrqSetData::Eventfd((0..count).map(|_| None).collect())
            }
            VFIO_IRQ_SET_DATA_EVENTFD => IrqSetData::Eventfd(fds.into_iter().map(Some).collect()),
            _ => return Err(libc::EINVAL),
        };
        let installs = match &data {
            IrqSetData::Eventfd(v) => Some(v.iter().any(|f| f.is_some())),
            IrqSetData::None if count == 0 => Some(false),
            _ => None,
        };
        self.dev
            .set_irqs(IrqSet {
                flags,
                index,
                start,
                count,
                data,
            })
            .map_err(|e| e.errno())?;
        if let (Some(on), Some(i)) = (installs, IrqIndex::from_raw(index)) {
            lock(&self.conn).irq_fds[i as usize] = on;
        }
        Ok(())
    }

    fn reset(&self) -> Result<(), i32> {
        let mut c = lock(&self.conn);
        c.write_back = false;
        c.started = None;
        self.dev.reset().map_err(|e| e.errno())
    }

    fn dma_map(
        &self,
        iova: u64,
        size: u64,
        prot: (bool, bool),
        backing: DmaBacking,
    ) -> Result<(), i32> {
        let perm = Perm {
            read: prot.0,
            write: prot.1,
        };
        match backing {
            DmaBacking::Fd { fd, offset } => self
                .store
                .map_dma(
                    iova,
                    size,
                    perm,
                    Backing::File {
                        file: std::fs::File::from(fd),
                        offset,
                    },
                )
                .map_err(|e| e.errno()),
            DmaBacking::Client => {
                // Each I/O copies every shadow both ways: bound the total (ENOSPC, as a map
                // past the store's entry limit).
                let total: u64 = lock(&self.conn).shadows.iter().map(|s| s.size).sum();
                if total.saturating_add(size) > MAX_SHADOW_BYTES {
                    return Err(libc::ENOSPC);
                }
                let len = usize::try_from(size).map_err(|_| libc::ENOMEM)?;
                let region = StoreMmapRegion::build(
                    None,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                )
                .map_err(|_| libc::ENOMEM)?;
                let region = Arc::new(region);
                self.store
                    .map_dma(
                        iova,
                        size,
                        perm,
                        Backing::Region {
                            region: region.clone(),
                            offset: 0,
                        },
                    )
                    .map_err(|e| e.errno())?;
                lock(&self.conn).shadows.push(Shadow {
                    iova,
                    size,
                    prot,
                    region,
                });
                Ok(())
            }
        }
    }

    fn dma_unmap(&self, iova: u64, size: u64, all: bool) -> Result<u64, i32> {
        let n = self
            .store
            .unmap_dma(iova, size, all)
            .map_err(|e| e.errno())?;
        self.release_unmapped();
        let mut c = lock(&self.conn);
        if all {
            c.shadows.clear();
        } else {
            let end = iova.saturating_add(size);
            c.shadows
                .retain(|s| !(s.iova >= iova && s.iova.saturating_add(s.size) <= end));
        }
        Ok(n)
    }

    fn disconnected(&self) {
        // Unmapping first: pinned pages make the store's listener reset the device, which
        // clears the I/O in flight and drops its pins.
        if let Err(e) = self.store.unmap_dma(0, 0, true) {
            tracing::warn!(dev = %self.name, %e, "unmap on disconnect failed");
        }
        self.release_unmapped();
        for i in IrqIndex::ALL {
            if let Err(e) = self.dev.set_irqs(IrqSet::eventfd(i, None)) {
                tracing::warn!(dev = %self.name, ?i, %e, "IRQ teardown failed");
            }
        }
        if let Err(e) = self.dev.reset() {
            tracing::warn!(dev = %self.name, %e, "reset on disconnect failed");
        }
        // The old client may keep its mapping: it must not see the next client's I/O.
        self.dev.set_io_mirror(None);
        // A program that was not pinned (e.g. it held no guest page) is cleared by the reset.
        *lock(&self.conn) = ConnState::default();
        tracing::info!(dev = %self.name, stats = %self.stats(), "client disconnected");
    }

    fn region_mmap(&self, index: u32) -> Option<RegionMmap> {
        if index != IO_REGION_INDEX {
            return None;
        }
        let fd = lock(&self.conn).mirror.as_ref()?.client_fd();
        match fd {
            Ok(fd) => Some(RegionMmap {
                fd,
                offset: 0,
                areas: vec![(0, CCW_IO_REGION_SIZE as u64)],
            }),
            Err(e) => {
                tracing::warn!(dev = %self.name, %e, "I/O region mirror fd: not offered");
                None
            }
        }
    }

    fn connected(&self) {
        match IoMirror::new() {
            Ok(m) => {
                let m = Arc::new(m);
                self.dev.set_io_mirror(Some(m.clone()));
                lock(&self.conn).mirror = Some(m);
            }
            Err(e) => tracing::warn!(
                dev = %self.name,
                %e,
                "no I/O region mirror: the IRB is read by REGION_READ"
            ),
        }
    }

    fn attach_dma(&self, channel: DmaChannel) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        lock(&self.conn).dma = Some(channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_chunks_cover_the_range() {
        let v: Vec<_> = chunks((2 << 20) + 4096).collect();
        assert_eq!(v, vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 4096)]);
        assert_eq!(chunks(0).count(), 0);
    }

    #[test]
    fn start_detection_reads_the_fctl_byte() {
        let mut region = [0u8; 124];
        assert!(!CcwBackend::is_start(&region, 0));
        // SCSW word 0 byte 2 holds fctl in bits 1-3 (0x40 = start).
        region[14] = 0x40;
        assert!(CcwBackend::is_start(&region, 0));
        assert!(CcwBackend::is_start(&region[14..15], 14));
        assert!(!CcwBackend::is_start(&region[..14], 0));
        region[14] = 0x20; // halt
        assert!(!CcwBackend::is_start(&region, 0));
    }
}
