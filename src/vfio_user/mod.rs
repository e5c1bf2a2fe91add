//! vfio-user transport: the protocol vccw serves its vfio-ccw device over (QEMU
//! `docs/interop/vfio-user.rst`), in host byte order over a UNIX stream socket.
//!
//! - [`protocol`]: header, command numbers, every payload with strict encode/decode.
//! - [`socket`]: whole messages with `SCM_RIGHTS` fds, size and fd limits; a buffered
//!   [`socket::MessageReader`] (one `recvmsg` per message).
//! - [`server`]: one connection's server over a [`server::VfioUserBackend`]: commands handled
//!   on the reader thread unless fd-less DMA mappings need the dispatcher, the server side of
//!   DMA_READ/DMA_WRITE ([`server::DmaChannel`]), mmappable regions ([`server::RegionMmap`]).
//! - [`client`]: a client library for a VMM (threaded or synchronous), which answers
//!   DMA_READ/DMA_WRITE and maps regions the server offers read-only.
//!
//! This is vccw's own implementation rather than the rust-vmm `vfio-user` crate because that
//! crate's server and client hard-code PCI (`VFIO_DEVICE_FLAGS_PCI` and the PCI region/IRQ
//! layout); a vfio-ccw device reports `VFIO_DEVICE_FLAGS_CCW`, one config region plus
//! capability-typed regions (async, SCHIB, CRW) and the I/O, CRW and REQ IRQ indexes. The shared
//! VFIO constants and structure sizes come from `vfio-bindings`.
//!
//! Interoperability notes (QEMU's `hw/vfio-user` client, checked against its source): it
//! proposes version 0.0, sends `argsz` 20 with DATA_EVENTFD SET_IRQS (fds only in the ancillary
//! data), writes a 32-bit DMA count followed by padding in DMA_READ replies, and replies to
//! DMA_WRITE with no payload; the server accepts all of these. Twin-socket mode, migration,
//! dirty-page logging, DEVICE_FEATURE and REGION_IO_FDS are not offered (ENOTSUP).

pub mod client;
pub mod protocol;
pub mod server;
pub mod socket;
