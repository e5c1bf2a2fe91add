//! vfio-user wire messages: the 16-byte header, command numbers and every payload vccw uses,
//! each with explicit encode/decode and strict validation.
//!
//! All header and payload fields are in the host's byte order (the spec: "all data is in the
//! endianness of the host system"), so this module uses `to_ne_bytes`/`from_ne_bytes`. Nothing is
//! transmuted from client bytes. Layouts follow QEMU `docs/interop/vfio-user.rst`; the VFIO
//! structures they mirror (`vfio_region_info`, `vfio_irq_set`, ...) come from `vfio-bindings`.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_info_cap_header, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_irq_info, vfio_irq_set, vfio_region_info, vfio_region_info_cap_type,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_DMA_UNMAP_FLAG_ALL,
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_CAP_TYPE, VFIO_REGION_INFO_FLAG_CAPS,
};

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;
/// Header flags: mask of the message type (bits 0-3).
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Header message type: command.
pub const TYPE_COMMAND: u32 = 0;
/// Header message type: reply.
pub const TYPE_REPLY: u32 = 1;
/// Header flag: the command wants no reply.
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flag: the reply reports an error (the header's error field holds the errno).
pub const FLAG_ERROR: u32 = 1 << 5;
const FLAGS_KNOWN: u32 = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR;

/// Protocol major version vccw speaks (QEMU and libvfio-user both send 0).
pub const VERSION_MAJOR: u16 = 0;
/// Highest protocol minor version vccw speaks (libvfio-user 0.1).
pub const VERSION_MINOR: u16 = 1;
/// Longest JSON capability string accepted in VERSION (NUL included).
pub const MAX_VERSION_DATA: usize = 4096;
/// Spec default for `max_msg_fds` when absent.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Spec default for `max_data_xfer_size` when absent.
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Spec default for `pgsizes` when absent (4 KiB pages only).
pub const DEFAULT_PGSIZES: u64 = 4096;
/// Spec default for `max_dma_maps` when absent.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Most writes one REGION_WRITE_MULTI may carry (QEMU's `VFIO_USER_MULTI_MAX`).
pub const MAX_WRITE_MULTI: u64 = 200;

/// `VFIO_DEVICE_FEATURE_MASK`: the feature index bits of DEVICE_FEATURE flags.
const DEVICE_FEATURE_KNOWN: u32 = 0xffff | (1 << 16) | (1 << 17) | (1 << 18);

/// vfio-user command numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation.
    Version = 1,
    /// Share client memory with the server.
    DmaMap = 2,
    /// Withdraw client memory.
    DmaUnmap = 3,
    /// Device flags and counts.
    DeviceGetInfo = 4,
    /// One region's description.
    DeviceGetRegionInfo = 5,
    /// ioeventfd/ioregionfd sub-regions (not supported by vccw).
    DeviceGetRegionIoFds = 6,
    /// One IRQ index's description.
    DeviceGetIrqInfo = 7,
    /// Configure interrupts (eventfds by SCM_RIGHTS).
    DeviceSetIrqs = 8,
    /// Read a device region.
    RegionRead = 9,
    /// Write a device region.
    RegionWrite = 10,
    /// Server reads client memory mapped without an fd.
    DmaRead = 11,
    /// Server writes client memory mapped without an fd.
    DmaWrite = 12,
    /// Reset the device.
    DeviceReset = 13,
    /// Coalesced small region writes.
    RegionWriteMulti = 15,
    /// `VFIO_DEVICE_FEATURE` (migration features; not supported by vccw).
    DeviceFeature = 16,
    /// Migration data out (not supported by vccw).
    MigDataRead = 17,
    /// Migration data in (not supported by vccw).
    MigDataWrite = 18,
}

impl Command {
    /// The command for a wire number, if it is one the spec defines.
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// A malformed or unacceptable message; each maps to the errno the peer is told.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// Fewer bytes than the structure needs (EINVAL).
    #[error("{what}: {got} bytes, need {need}")]
    Short {
        /// Structure being decoded.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// The payload size disagrees with what its fields describe (EINVAL).
    #[error("{what}: payload is {got} bytes, fields describe {expected}")]
    SizeMismatch {
        /// Structure being decoded.
        what: &'static str,
        /// Size the fields imply.
        expected: usize,
        /// Size present.
        got: usize,
    },
    /// `argsz` is too small or inconsistent (EINVAL).
    #[error("{what}: bad argsz {argsz}")]
    BadArgsz {
        /// Structure being decoded.
        what: &'static str,
        /// The offending argsz.
        argsz: u32,
    },
    /// Unknown or inconsistent flag bits (EINVAL).
    #[error("{what}: bad flags {flags:#x}")]
    BadFlags {
        /// Structure being decoded.
        what: &'static str,
        /// The offending flags.
        flags: u32,
    },
    /// A field the spec says must be zero is not (EINVAL).
    #[error("{what}: reserved field {field} is not zero")]
    Reserved {
        /// Structure being decoded.
        what: &'static str,
        /// Field name.
        field: &'static str,
    },
    /// A transfer larger than the negotiated `max_data_xfer_size` (E2BIG).
    #[error("{what}: transfer of {count} bytes exceeds {max}")]
    TooBig {
        /// Structure being decoded.
        what: &'static str,
        /// Requested count.
        count: u64,
        /// Limit.
        max: u64,
    },
    /// A field value out of range (EINVAL).
    #[error("{what}: {detail}")]
    Invalid {
        /// Structure being decoded.
        what: &'static str,
        /// What is wrong.
        detail: &'static str,
    },
    /// The VERSION capability string is not acceptable JSON (EINVAL).
    #[error("version capabilities: {0}")]
    Json(String),
    /// An operation the protocol defines but vccw does not support (ENOTSUP).
    #[error("{0} is not supported")]
    Unsupported(&'static str),
}

impl ProtoError {
    /// The errno sent in the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            ProtoError::TooBig { .. } => libc::E2BIG,
            ProtoError::Unsupported(_) => libc::ENOTSUP,
            _ => libc::EINVAL,
        }
    }
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() < n {
        return Err(ProtoError::Short {
            what,
            need: n,
            got: b.len(),
        });
    }
    Ok(())
}

fn exact(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() != n {
        return Err(ProtoError::SizeMismatch {
            what,
            expected: n,
            got: b.len(),
        });
    }
    Ok(())
}

// Callers check lengths first; these read fixed-width host-order fields.
fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_ne_bytes(a)
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_ne_bytes(a)
}

/// The 16-byte message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    /// Message id, chosen by the sender of a command and echoed in its reply.
    pub id: u16,
    /// Command number (also set in replies).
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Type (bits 0-3), NO_REPLY (bit 4), ERROR (bit 5).
    pub flags: u32,
    /// errno of an error reply; reserved (zero) in commands.
    pub error: u32,
}

impl Header {
    /// A command header for `payload_len` bytes of payload.
    pub fn command(id: u16, command: Command, payload_len: usize) -> Header {
        Header {
            id,
            command: command as u16,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: TYPE_COMMAND,
            error: 0,
        }
    }

    /// The reply header to `self` carrying `payload_len` bytes.
    pub fn reply(&self, payload_len: usize) -> Header {
        Header {
            id: self.id,
            command: self.command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: TYPE_REPLY,
            error: 0,
        }
    }

    /// The error reply header to `self` (an error reply carries the header only).
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            id: self.id,
            command: self.command,
            size: HEADER_SIZE as u32,
            flags: TYPE_REPLY | FLAG_ERROR,
            error: errno as u32,
        }
    }

    /// Is this a reply?
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == TYPE_REPLY
    }

    /// Does this command ask for no reply?
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// Is this an error reply?
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    /// Payload size (message size less the header); the caller has checked `size >= 16`.
    pub fn payload_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }

    /// Wire image.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.command.to_ne_bytes());
        b[4..8].copy_from_slice(&self.size.to_ne_bytes());
        b[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        b[12..16].copy_from_slice(&self.error.to_ne_bytes());
        b
    }

    /// Parse a header without judging it (see [`Header::validate`]).
    pub fn decode(b: &[u8]) -> Result<Header, ProtoError> {
        need("header", b, HEADER_SIZE)?;
        Ok(Header {
            id: u16_at(b, 0),
            command: u16_at(b, 2),
            size: u32_at(b, 4),
            flags: u32_at(b, 8),
            error: u32_at(b, 12),
        })
    }

    /// Check the fields every message must satisfy: size covers the header, type is command or
    /// reply, no unknown flag bits, ERROR only on replies, error field zero in commands.
    pub fn validate(&self) -> Result<(), ProtoError> {
        if (self.size as usize) < HEADER_SIZE {
            return Err(ProtoError::Invalid {
                what: "header",
                detail: "message size smaller than the header",
            });
        }
        let ty = self.flags & FLAG_TYPE_MASK;
        if self.flags & !FLAGS_KNOWN != 0 || (ty != TYPE_COMMAND && ty != TYPE_REPLY) {
            return Err(ProtoError::BadFlags {
                what: "header",
                flags: self.flags,
            });
        }
        if ty == TYPE_COMMAND && (self.flags & FLAG_ERROR != 0) {
            return Err(ProtoError::BadFlags {
                what: "header",
                flags: self.flags,
            });
        }
        if ty == TYPE_COMMAND && self.error != 0 {
            return Err(ProtoError::Reserved {
                what: "header",
                field: "error",
            });
        }
        Ok(())
    }
}

/// VERSION capabilities (the `capabilities` object of the JSON version data). Absent fields
/// take the spec defaults through the accessor methods. Unknown members are ignored, as the
/// spec adds capabilities in minor versions; `migration` and `twin_socket` are never produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Most fds the sender can receive in one message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    /// Largest `count` the sender accepts in REGION/DMA read/write messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u32>,
    /// Page sizes supported for DMA maps, or'ed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    /// Most DMA windows valid at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    /// REGION_WRITE_MULTI supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
}

impl Capabilities {
    /// `max_msg_fds` or its default.
    pub fn max_msg_fds(&self) -> u32 {
        self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS)
    }
    /// `max_data_xfer_size` or its default.
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_data_xfer_size
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE)
    }
    /// `pgsizes` or its default.
    pub fn pgsizes(&self) -> u64 {
        self.pgsizes.unwrap_or(DEFAULT_PGSIZES)
    }
    /// `max_dma_maps` or its default.
    pub fn max_dma_maps(&self) -> u32 {
        self.max_dma_maps.unwrap_or(DEFAULT_MAX_DMA_MAPS)
    }
}

#[derive(Serialize, Deserialize)]
struct VersionJson {
    #[serde(default)]
    capabilities: Option<Capabilities>,
}

/// VERSION request and reply payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Capabilities (`None`: no version data, or no `capabilities` object).
    pub caps: Option<Capabilities>,
}

impl Version {
    /// Wire image: major, minor, then the JSON object and its terminating NUL.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&self.major.to_ne_bytes());
        b.extend_from_slice(&self.minor.to_ne_bytes());
        if let Some(caps) = &self.caps {
            let json = serde_json::to_string(&VersionJson {
                capabilities: Some(caps.clone()),
            })
            .unwrap_or_default();
            b.extend_from_slice(json.as_bytes());
            b.push(0);
        }
        b
    }

    /// Parse; the version data, when present, must be NUL-terminated UTF-8 JSON of at most
    /// [`MAX_VERSION_DATA`] bytes whose top level is an object.
    pub fn decode(b: &[u8]) -> Result<Version, ProtoError> {
        need("version", b, 4)?;
        let data = &b[4..];
        let caps = if data.is_empty() {
            None
        } else {
            if data.len() > MAX_VERSION_DATA {
                return Err(ProtoError::TooBig {
                    what: "version data",
                    count: data.len() as u64,
                    max: MAX_VERSION_DATA as u64,
                });
            }
            let Some((&0, body)) = data.split_last() else {
                return Err(ProtoError::Json("not NUL-terminated".into()));
            };
            if body.contains(&0) {
                return Err(ProtoError::Json("embedded NUL".into()));
            }
            let text =
                std::str::from_utf8(body).map_err(|_| ProtoError::Json("not UTF-8".into()))?;
            let v: VersionJson =
                serde_json::from_str(text).map_err(|e| ProtoError::Json(e.to_string()))?;
            v.capabilities
        };
        Ok(Version {
            major: u16_at(b, 0),
            minor: u16_at(b, 2),
            caps,
        })
    }
}

/// DMA_MAP request (`struct vfio_iommu_type1_dma_map` with `vaddr` as the fd offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// Size of this structure (32).
    pub argsz: u32,
    /// READ (bit 0) / WRITE (bit 1).
    pub flags: u32,
    /// Offset into the fd (zero when no fd is sent).
    pub offset: u64,
    /// Base DMA address (IOVA).
    pub address: u64,
    /// Length in bytes.
    pub size: u64,
}

impl DmaMap {
    /// Payload size.
    pub const SIZE: usize = std::mem::size_of::<vfio_iommu_type1_dma_map>();

    /// Wire image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        b.extend_from_slice(&self.argsz.to_ne_bytes());
        b.extend_from_slice(&self.flags.to_ne_bytes());
        b.extend_from_slice(&self.offset.to_ne_bytes());
        b.extend_from_slice(&self.address.to_ne_bytes());
        b.extend_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// Parse and validate: exact size, argsz 32, only READ/WRITE flags, non-empty range that
    /// does not wrap.
    pub fn decode(b: &[u8]) -> Result<DmaMap, ProtoError> {
        const W: &str = "dma_map";
        exact(W, b, Self::SIZE)?;
        let m = DmaMap {
            argsz: u32_at(b, 0),
            flags: u32_at(b, 4),
            offset: u64_at(b, 8),
            address: u64_at(b, 16),
            size: u64_at(b, 24),
        };
        if m.argsz as usize != Self::SIZE {
            return Err(ProtoError::BadArgsz {
                what: W,
                argsz: m.argsz,
            });
        }
        if m.flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0 {
            return Err(ProtoError::BadFlags {
                what: W,
                flags: m.flags,
            });
        }
        if m.size == 0 || m.address.checked_add(m.size - 1).is_none() {
            return Err(ProtoError::Invalid {
                what: W,
                detail: "empty or wrapping range",
            });
        }
        if m.offset.checked_add(m.size).is_none() {
            return Err(ProtoError::Invalid {
                what: W,
                detail: "fd offset + size wraps",
            });
        }
        Ok(m)
    }

    /// (readable, writeable).
    pub fn prot(&self) -> (bool, bool) {
        (
            self.flags & VFIO_DMA_MAP_FLAG_READ != 0,
            self.flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
        )
    }
}

/// DMA_UNMAP request and reply (`struct vfio_iommu_type1_dma_unmap`, no bitmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    /// Request: room for the reply (at least 24). Reply: 24.
    pub argsz: u32,
    /// Only `VFIO_DMA_UNMAP_FLAG_ALL` is accepted.
    pub flags: u32,
    /// Base DMA address (zero with ALL).
    pub address: u64,
    /// Length (zero with ALL).
    pub size: u64,
}

impl DmaUnmap {
    /// Payload size.
    pub const SIZE: usize = std::mem::size_of::<vfio_iommu_type1_dma_unmap>();

    /// Wire image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        b.extend_from_slice(&self.argsz.to_ne_bytes());
        b.extend_from_slice(&self.flags.to_ne_bytes());
        b.extend_from_slice(&self.address.to_ne_bytes());
        b.extend_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// Parse and validate a request: exact size, argsz >= 24, flags ALL or none (dirty bitmaps
    /// are ENOTSUP), ALL with a zero range, otherwise a non-empty non-wrapping range.
    pub fn decode(b: &[u8]) -> Result<DmaUnmap, ProtoError> {
        const W: &str = "dma_unmap";
        exact(W, b, Self::SIZE)?;
        let u = DmaUnmap {
            argsz: u32_at(b, 0),
            flags: u32_at(b, 4),
            address: u64_at(b, 8),
            size: u64_at(b, 16),
        };
        if (u.argsz as usize) < Self::SIZE {
            return Err(ProtoError::BadArgsz {
                what: W,
                argsz: u.argsz,
            });
        }
        if u.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(ProtoError::Unsupported("dirty bitmap on unmap"));
        }
        if u.flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(ProtoError::BadFlags {
                what: W,
                flags: u.flags,
            });
        }
        if u.all() {
            if u.address != 0 || u.size != 0 {
                return Err(ProtoError::Invalid {
                    what: W,
                    detail: "ALL with a non-zero range",
                });
            }
        } else if u.size == 0 || u.address.checked_add(u.size - 1).is_none() {
            return Err(ProtoError::Invalid {
                what: W,
                detail: "empty or wrapping range",
            });
        }
        Ok(u)
    }

    /// Is the ALL flag set?
    pub fn all(&self) -> bool {
        self.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0
    }
}

/// DEVICE_GET_INFO request and reply (the first 16 bytes of `struct vfio_device_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    /// Request: room for the reply. Reply: 16.
    pub argsz: u32,
    /// `VFIO_DEVICE_FLAGS_*` (vccw: CCW | RESET).
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Payload size (vfio-user omits the kernel struct's `cap_offset` and pad).
    pub const SIZE: usize = std::mem::offset_of!(vfio_device_info, cap_offset);

    /// Wire image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        for v in [self.argsz, self.flags, self.num_regions, self.num_irqs] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b
    }

    /// Parse without judging.
    pub fn decode(b: &[u8]) -> Result<DeviceInfo, ProtoError> {
        exact("device_info", b, Self::SIZE)?;
        Ok(DeviceInfo {
            argsz: u32_at(b, 0),
            flags: u32_at(b, 4),
            num_regions: u32_at(b, 8),
            num_irqs: u32_at(b, 12),
        })
    }

    /// Parse and validate a request: argsz >= 16, other fields zero.
    pub fn decode_request(b: &[u8]) -> Result<DeviceInfo, ProtoError> {
        const W: &str = "device_info";
        let d = Self::decode(b)?;
        if (d.argsz as usize) < Self::SIZE {
            return Err(ProtoError::BadArgsz {
                what: W,
                argsz: d.argsz,
            });
        }
        if d.flags != 0 || d.num_regions != 0 || d.num_irqs != 0 {
            return Err(ProtoError::Reserved {
                what: W,
                field: "flags/num_regions/num_irqs",
            });
        }
        Ok(d)
    }
}

/// One region capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionCap {
    /// `VFIO_REGION_INFO_CAP_TYPE` (id 2, version 1): device-specific region type.
    Type {
        /// Region type (vfio-ccw: `VFIO_REGION_TYPE_CCW` = 2).
        type_: u32,
        /// Subtype (vfio-ccw: 1 async, 2 SCHIB, 3 CRW).
        subtype: u32,
    },
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP` (id 1, version 1): (offset, size) areas.
    SparseMmap(Vec<(u64, u64)>),
    /// A capability vccw does not interpret (client side only).
    Unknown {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
    },
}

impl RegionCap {
    fn encoded_len(&self) -> usize {
        match self {
            RegionCap::Type { .. } => std::mem::size_of::<vfio_region_info_cap_type>(),
            RegionCap::SparseMmap(a) => 16 + 16 * a.len(),
            RegionCap::Unknown { .. } => 8,
        }
    }

    fn encode_into(&self, b: &mut Vec<u8>, next: u32) {
        let (id, version) = match self {
            RegionCap::Type { .. } => (VFIO_REGION_INFO_CAP_TYPE as u16, 1u16),
            RegionCap::SparseMmap(_) => (VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16, 1),
            RegionCap::Unknown { id, version } => (*id, *version),
        };
        b.extend_from_slice(&id.to_ne_bytes());
        b.extend_from_slice(&version.to_ne_bytes());
        b.extend_from_slice(&next.to_ne_bytes());
        match self {
            RegionCap::Type { type_, subtype } => {
                b.extend_from_slice(&type_.to_ne_bytes());
                b.extend_from_slice(&subtype.to_ne_bytes());
            }
            RegionCap::SparseMmap(areas) => {
                b.extend_from_slice(&(areas.len() as u32).to_ne_bytes());
                b.extend_from_slice(&0u32.to_ne_bytes());
                for (o, s) in areas {
                    b.extend_from_slice(&o.to_ne_bytes());
                    b.extend_from_slice(&s.to_ne_bytes());
                }
            }
            RegionCap::Unknown { .. } => {}
        }
    }
}

/// DEVICE_GET_REGION_INFO request and reply (`struct vfio_region_info` + capability chain).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// Request: room for the reply. Reply: size of the full reply payload.
    pub argsz: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this structure (0: none here).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// mmap offset (vccw regions are not mappable: 0).
    pub offset: u64,
    /// Capabilities, in chain order.
    pub caps: Vec<RegionCap>,
}

impl RegionInfo {
    /// Size of the fixed part.
    pub const SIZE: usize = std::mem::size_of::<vfio_region_info>();
    const HDR: usize = std::mem::size_of::<vfio_info_cap_header>();
    /// Longest capability chain a client accepts (guards a hostile server).
    pub const MAX_CAPS: usize = 16;

    fn fixed(&self, argsz: u32, flags: u32, cap_offset: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        for v in [argsz, flags, self.index, cap_offset] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&self.size.to_ne_bytes());
        b.extend_from_slice(&self.offset.to_ne_bytes());
        b
    }

    /// A request for region `index` with room for `argsz` reply bytes.
    pub fn request(index: u32, argsz: u32) -> Vec<u8> {
        RegionInfo {
            index,
            ..Default::default()
        }
        .fixed(argsz, 0, 0)
    }

    /// Size of the full reply payload (fixed part plus every capability).
    pub fn full_len(&self) -> usize {
        Self::SIZE + self.caps.iter().map(RegionCap::encoded_len).sum::<usize>()
    }

    /// Reply image for a request that allowed `max` bytes. If the full reply fits, it carries
    /// the capability chain (`cap_offset` and each `next` relative to the start of the region
    /// info, last `next` 0, CAPS flag set). If not, it carries only the fixed part with `argsz`
    /// set to the size needed, CAPS set and `cap_offset` 0, as the kernel does.
    pub fn encode_reply(&self, max: u32) -> Vec<u8> {
        let full = self.full_len();
        let mut flags = self.flags & !VFIO_REGION_INFO_FLAG_CAPS;
        if self.caps.is_empty() {
            return self.fixed(Self::SIZE as u32, flags, 0);
        }
        flags |= VFIO_REGION_INFO_FLAG_CAPS;
        if full > max as usize {
            return self.fixed(full as u32, flags, 0);
        }
        let mut b = self.fixed(full as u32, flags, Self::SIZE as u32);
        let mut off = Self::SIZE;
        for (i, cap) in self.caps.iter().enumerate() {
            let end = off + cap.encoded_len();
            let next = if i + 1 == self.caps.len() { 0 } else { end };
            cap.encode_into(&mut b, next as u32);
            off = end;
        }
        b
    }

    /// Parse and validate a request: exactly 32 bytes, argsz >= 32, only `index` set.
    pub fn decode_request(b: &[u8]) -> Result<(u32, u32), ProtoError> {
        const W: &str = "region_info";
        exact(W, b, Self::SIZE)?;
        let argsz = u32_at(b, 0);
        if (argsz as usize) < Self::SIZE {
            return Err(ProtoError::BadArgsz { what: W, argsz });
        }
        if u32_at(b, 4) != 0 || u32_at(b, 12) != 0 || u64_at(b, 16) != 0 || u64_at(b, 24) != 0 {
            return Err(ProtoError::Reserved {
                what: W,
                field: "flags/cap_offset/size/offset",
            });
        }
        Ok((u32_at(b, 8), argsz))
    }

    /// Parse a reply (client side), walking the capability chain defensively: each capability
    /// lies after the fixed part and inside the payload, offsets strictly increase (no loops),
    /// at most [`RegionInfo::MAX_CAPS`] entries.
    pub fn decode_reply(b: &[u8]) -> Result<RegionInfo, ProtoError> {
        const W: &str = "region_info reply";
        need(W, b, Self::SIZE)?;
        let mut r = RegionInfo {
            argsz: u32_at(b, 0),
            flags: u32_at(b, 4),
            index: u32_at(b, 8),
            cap_offset: u32_at(b, 12),
            size: u64_at(b, 16),
            offset: u64_at(b, 24),
            caps: Vec::new(),
        };
        if r.flags & VFIO_REGION_INFO_FLAG_CAPS == 0 || r.cap_offset == 0 {
            return Ok(r);
        }
        let mut off = r.cap_offset as usize;
        let mut prev = Self::SIZE - 1;
        loop {
            if off <= prev || off + Self::HDR > b.len() || r.caps.len() >= Self::MAX_CAPS {
                return Err(ProtoError::Invalid {
                    what: W,
                    detail: "capability chain out of bounds or looping",
                });
            }
            let id = u16_at(b, off);
            let version = u16_at(b, off + 2);
            let next = u32_at(b, off + 4) as usize;
            let body = &b[off + Self::HDR..];
            let cap = match (id as u32, version) {
                (VFIO_REGION_INFO_CAP_TYPE, 1) => {
                    need(W, body, 8)?;
                    RegionCap::Type {
                        type_: u32_at(body, 0),
                        subtype: u32_at(body, 4),
                    }
                }
                (VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1) => {
                    need(W, body, 8)?;
                    let n = u32_at(body, 0) as usize;
                    let len = n.checked_mul(16).and_then(|x| x.checked_add(8));
                    match len {
                        Some(len) if len <= body.len() => {}
                        _ => {
                            return Err(ProtoError::Invalid {
                                what: W,
                                detail: "sparse mmap areas exceed the reply",
                            })
                        }
                    }
                    let areas = (0..n)
                        .map(|i| (u64_at(body, 8 + 16 * i), u64_at(body, 16 + 16 * i)))
                        .collect();
                    RegionCap::SparseMmap(areas)
                }
                _ => RegionCap::Unknown { id, version },
            };
            r.caps.push(cap);
            if next == 0 {
                return Ok(r);
            }
            prev = off;
            off = next;
        }
    }

    /// The `VFIO_REGION_INFO_CAP_TYPE` (type, subtype), if present.
    pub fn cap_type(&self) -> Option<(u32, u32)> {
        self.caps.iter().find_map(|c| match c {
            RegionCap::Type { type_, subtype } => Some((*type_, *subtype)),
            _ => None,
        })
    }
}

/// DEVICE_GET_IRQ_INFO request and reply (`struct vfio_irq_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IrqInfo {
    /// Request: room for the reply. Reply: 16.
    pub argsz: u32,
    /// `VFIO_IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Number of interrupts (sub-indexes) of this index.
    pub count: u32,
}

impl IrqInfo {
    /// Payload size.
    pub const SIZE: usize = std::mem::size_of::<vfio_irq_info>();

    /// Wire image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE);
        for v in [self.argsz, self.flags, self.index, self.count] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b
    }

    /// Parse without judging.
    pub fn decode(b: &[u8]) -> Result<IrqInfo, ProtoError> {
        exact("irq_info", b, Self::SIZE)?;
        Ok(IrqInfo {
            argsz: u32_at(b, 0),
            flags: u32_at(b, 4),
            index: u32_at(b, 8),
            count: u32_at(b, 12),
        })
    }

    /// Parse and validate a request: argsz >= 16, flags and count zero.
    pub fn decode_request(b: &[u8]) -> Result<IrqInfo, ProtoError> {
        const W: &str = "irq_info";
        let i = Self::decode(b)?;
        if (i.argsz as usize) < Self::SIZE {
            return Err(ProtoError::BadArgsz {
                what: W,
                argsz: i.argsz,
            });
        }
        if i.flags != 0 || i.count != 0 {
            return Err(ProtoError::Reserved {
                what: W,
                field: "flags/count",
            });
        }
        Ok(i)
    }
}

/// DEVICE_SET_IRQS request (`struct vfio_irq_set`; eventfds travel as SCM_RIGHTS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IrqSet {
    /// Size of the request payload, data included.
    pub argsz: u32,
    /// One DATA flag and one ACTION flag.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes.
    pub count: u32,
    /// DATA_BOOL: one byte per sub-index.
    pub data: Vec<u8>,
}

impl IrqSet {
    /// Size of the fixed part.
    pub const SIZE: usize = std::mem::size_of::<vfio_irq_set>();

    /// Wire image (argsz is written as given).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE + self.data.len());
        for v in [self.argsz, self.flags, self.index, self.start, self.count] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&self.data);
        b
    }

    /// Parse and validate: exactly one DATA and one ACTION flag and nothing else; argsz equal
    /// to the payload size; the payload is 20 bytes (+ `count` bytes for DATA_BOOL);
    /// `start + count` does not wrap.
    pub fn decode(b: &[u8]) -> Result<IrqSet, ProtoError> {
        const W: &str = "irq_set";
        need(W, b, Self::SIZE)?;
        let s = IrqSet {
            argsz: u32_at(b, 0),
            flags: u32_at(b, 4),
            index: u32_at(b, 8),
            start: u32_at(b, 12),
            count: u32_at(b, 16),
            data: b[Self::SIZE..].to_vec(),
        };
        let data = s.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = s.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if s.flags & !(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) != 0
            || data.count_ones() != 1
            || action.count_ones() != 1
        {
            return Err(ProtoError::BadFlags {
                what: W,
                flags: s.flags,
            });
        }
        let want = if data == VFIO_IRQ_SET_DATA_BOOL {
            Self::SIZE + s.count as usize
        } else {
            Self::SIZE
        };
        exact(W, b, want)?;
        if s.argsz as usize != b.len() {
            return Err(ProtoError::BadArgsz {
                what: W,
                argsz: s.argsz,
            });
        }
        if s.start.checked_add(s.count).is_none() {
            return Err(ProtoError::Invalid {
                what: W,
                detail: "start + count wraps",
            });
        }
        Ok(s)
    }

    /// DATA_NONE?
    pub fn data_none(&self) -> bool {
        self.flags & VFIO_IRQ_SET_DATA_NONE != 0
    }
    /// DATA_EVENTFD?
    pub fn data_eventfd(&self) -> bool {
        self.flags & VFIO_IRQ_SET_DATA_EVENTFD != 0
    }
}

/// REGION_READ / REGION_WRITE request and reply: offset, region, count, optional data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes to transfer / transferred.
    pub count: u32,
    /// Data (write request, read reply).
    pub data: Vec<u8>,
}

impl RegionAccess {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;

    /// Wire image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE + self.data.len());
        b.extend_from_slice(&self.offset.to_ne_bytes());
        b.extend_from_slice(&self.region.to_ne_bytes());
        b.extend_from_slice(&self.count.to_ne_bytes());
        b.extend_from_slice(&self.data);
        b
    }

    /// Parse; `with_data`: the payload must carry exactly `count` data bytes, otherwise none.
    /// `count` must not exceed `max_xfer` (E2BIG).
    pub fn decode(b: &[u8], with_data: bool, max_xfer: u32) -> Result<RegionAccess, ProtoError> {
        let (a, data) = Self::decode_ref(b, with_data, max_xfer)?;
        Ok(RegionAccess {
            data: data.to_vec(),
            ..a
        })
    }

    /// As [`RegionAccess::decode`] (same checks and errors), with the data borrowed from `b`
    /// instead of copied (the returned access has empty `data`).
    pub fn decode_ref(
        b: &[u8],
        with_data: bool,
        max_xfer: u32,
    ) -> Result<(RegionAccess, &[u8]), ProtoError> {
        const W: &str = "region access";
        need(W, b, Self::SIZE)?;
        let count = u32_at(b, 12);
        if count > max_xfer {
            return Err(ProtoError::TooBig {
                what: W,
                count: count as u64,
                max: max_xfer as u64,
            });
        }
        let want = Self::SIZE + if with_data { count as usize } else { 0 };
        exact(W, b, want)?;
        Ok((
            RegionAccess {
                offset: u64_at(b, 0),
                region: u32_at(b, 8),
                count,
                data: Vec::new(),
            },
            &b[Self::SIZE..],
        ))
    }

    /// The fixed part alone (a write request's data, or a write reply): `offset`, `region`,
    /// `count`, host byte order like the rest of the protocol.
    pub fn encode_fixed(offset: u64, region: u32, count: u32) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&offset.to_ne_bytes());
        b[8..12].copy_from_slice(&region.to_ne_bytes());
        b[12..].copy_from_slice(&count.to_ne_bytes());
        b
    }
}

/// DMA_READ / DMA_WRITE request (server to client): address, count, optional data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaAccess {
    /// Client DMA address.
    pub address: u64,
    /// Bytes to transfer.
    pub count: u64,
    /// Data (write request, read reply).
    pub data: Vec<u8>,
}

impl DmaAccess {
    /// Size of the fixed part.
    pub const SIZE: usize = 16;

    /// Wire image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::SIZE + self.data.len());
        b.extend_from_slice(&self.address.to_ne_bytes());
        b.extend_from_slice(&self.count.to_ne_bytes());
        b.extend_from_slice(&self.data);
        b
    }

    /// Parse a request; `with_data` as for [`RegionAccess::decode`].
    pub fn decode(b: &[u8], with_data: bool, max_xfer: u32) -> Result<DmaAccess, ProtoError> {
        const W: &str = "dma access";
        need(W, b, Self::SIZE)?;
        let count = u64_at(b, 8);
        if count > max_xfer as u64 {
            return Err(ProtoError::TooBig {
                what: W,
                count,
                max: max_xfer as u64,
            });
        }
        let want = Self::SIZE + if with_data { count as usize } else { 0 };
        exact(W, b, want)?;
        Ok(DmaAccess {
            address: u64_at(b, 0),
            count,
            data: b[Self::SIZE..].to_vec(),
        })
    }

    /// Check a DMA_READ reply to a request for `count` bytes at `address` and return its data.
    /// The spec puts a u64 count at offset 8; QEMU's client writes a u32 there followed by
    /// padding, so a count equal to the request in either width is accepted.
    pub fn check_read_reply(b: &[u8], address: u64, count: usize) -> Result<&[u8], ProtoError> {
        const W: &str = "dma_read reply";
        exact(W, b, Self::SIZE + count)?;
        if u64_at(b, 0) != address {
            return Err(ProtoError::Invalid {
                what: W,
                detail: "address differs from the request",
            });
        }
        if u64_at(b, 8) != count as u64 && u32_at(b, 8) as usize != count {
            return Err(ProtoError::Invalid {
                what: W,
                detail: "count differs from the request",
            });
        }
        Ok(&b[Self::SIZE..])
    }

    /// Check a DMA_WRITE reply: the spec's address + count (12 bytes: its count is 4 bytes
    /// wide), libvfio-user's 16, or QEMU's empty payload.
    pub fn check_write_reply(b: &[u8], address: u64) -> Result<(), ProtoError> {
        const W: &str = "dma_write reply";
        match b.len() {
            0 => Ok(()),
            12 | 16 if u64_at(b, 0) == address => Ok(()),
            12 | 16 => Err(ProtoError::Invalid {
                what: W,
                detail: "address differs from the request",
            }),
            n => Err(ProtoError::SizeMismatch {
                what: W,
                expected: 16,
                got: n,
            }),
        }
    }
}

/// One write of a REGION_WRITE_MULTI (at most 8 data bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOne {
    /// Offset into the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes to write (1..=8).
    pub count: u32,
    /// Data; bytes past `count` are ignored.
    pub data: [u8; 8],
}

/// REGION_WRITE_MULTI request payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteMulti {
    /// The writes, in order.
    pub writes: Vec<WriteOne>,
}

impl WriteMulti {
    const ONE: usize = 24;

    /// Wire image.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + Self::ONE * self.writes.len());
        b.extend_from_slice(&(self.writes.len() as u64).to_ne_bytes());
        for w in &self.writes {
            b.extend_from_slice(&w.offset.to_ne_bytes());
            b.extend_from_slice(&w.region.to_ne_bytes());
            b.extend_from_slice(&w.count.to_ne_bytes());
            b.extend_from_slice(&w.data);
        }
        b
    }

    /// Parse: wr_cnt in 1..=200, payload exactly 8 + 24 * wr_cnt, each count in 1..=8.
    pub fn decode(b: &[u8]) -> Result<WriteMulti, ProtoError> {
        const W: &str = "region_write_multi";
        need(W, b, 8)?;
        let n = u64_at(b, 0);
        if n == 0 || n > MAX_WRITE_MULTI {
            return Err(ProtoError::Invalid {
                what: W,
                detail: "wr_cnt out of range",
            });
        }
        exact(W, b, 8 + Self::ONE * n as usize)?;
        let mut writes = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let o = 8 + Self::ONE * i;
            let count = u32_at(b, o + 12);
            if count == 0 || count > 8 {
                return Err(ProtoError::Invalid {
                    what: W,
                    detail: "write count not in 1..=8",
                });
            }
            let mut data = [0u8; 8];
            data.copy_from_slice(&b[o + 16..o + 24]);
            writes.push(WriteOne {
                offset: u64_at(b, o),
                region: u32_at(b, o + 8),
                count,
                data,
            });
        }
        Ok(WriteMulti { writes })
    }
}

/// DEVICE_FEATURE request fixed part (argsz, flags); vccw supports no feature.
pub fn decode_device_feature(b: &[u8]) -> Result<(u32, u32), ProtoError> {
    const W: &str = "device_feature";
    need(W, b, 8)?;
    let flags = u32_at(b, 4);
    if flags & !DEVICE_FEATURE_KNOWN != 0 {
        return Err(ProtoError::BadFlags { what: W, flags });
    }
    Ok((u32_at(b, 0), flags))
}

/// Read a u64 reply field (REGION_WRITE_MULTI reply's wr_cnt), host order.
pub fn decode_u64(b: &[u8]) -> Result<u64, ProtoError> {
    exact("u64", b, 8)?;
    Ok(u64_at(b, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::{
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
        VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD, VFIO_REGION_TYPE_CCW,
    };

    /// Expected bytes written from a spec table: (value, field size) in offset order, each in
    /// host byte order.
    fn fields(f: &[(u64, usize)]) -> Vec<u8> {
        let mut b = Vec::new();
        for &(v, n) in f {
            match n {
                2 => b.extend_from_slice(&(v as u16).to_ne_bytes()),
                4 => b.extend_from_slice(&(v as u32).to_ne_bytes()),
                8 => b.extend_from_slice(&v.to_ne_bytes()),
                _ => unreachable!(),
            }
        }
        b
    }

    #[test]
    fn header_layout() {
        let h = Header {
            id: 0x1234,
            command: 5,
            size: 48,
            flags: TYPE_REPLY | FLAG_ERROR,
            error: 22,
        };
        let want = fields(&[(0x1234, 2), (5, 2), (48, 4), (0x21, 4), (22, 4)]);
        assert_eq!(h.encode().to_vec(), want);
        assert_eq!(Header::decode(&want).unwrap(), h);
        h.validate().unwrap();
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn header_literal_little_endian() {
        let h = Header::command(7, Command::DeviceGetInfo, 16);
        assert_eq!(
            h.encode(),
            [7, 0, 4, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn header_validation() {
        let ok = Header::command(1, Command::Version, 0);
        ok.validate().unwrap();
        let small = Header { size: 15, ..ok };
        assert!(small.validate().is_err());
        let ty = Header { flags: 2, ..ok };
        assert!(ty.validate().is_err());
        let unknown = Header {
            flags: 1 << 6,
            ..ok
        };
        assert!(unknown.validate().is_err());
        let err_in_cmd = Header { error: 1, ..ok };
        assert_eq!(err_in_cmd.validate().unwrap_err().errno(), libc::EINVAL);
        let err_flag_cmd = Header {
            flags: FLAG_ERROR,
            ..ok
        };
        assert!(err_flag_cmd.validate().is_err());
        let r = ok.error_reply(libc::ENOSYS);
        assert!(r.is_reply() && r.is_error() && r.size == 16 && r.error == libc::ENOSYS as u32);
        assert!(Header::decode(&[0u8; 15]).is_err());
    }

    #[test]
    fn command_numbers() {
        assert_eq!(Command::from_u16(1), Some(Command::Version));
        assert_eq!(Command::from_u16(13), Some(Command::DeviceReset));
        assert_eq!(Command::from_u16(14), None);
        assert_eq!(Command::from_u16(15), Some(Command::RegionWriteMulti));
        assert_eq!(Command::from_u16(18), Some(Command::MigDataWrite));
        assert_eq!(Command::from_u16(19), None);
        assert_eq!(Command::DmaWrite as u16, 12);
    }

    #[test]
    fn version_encoding() {
        let v = Version {
            major: 0,
            minor: 1,
            caps: Some(Capabilities {
                max_msg_fds: Some(8),
                max_data_xfer_size: Some(4096),
                ..Default::default()
            }),
        };
        let mut want = fields(&[(0, 2), (1, 2)]);
        want.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096}}"#);
        want.push(0);
        assert_eq!(v.encode(), want);
        assert_eq!(Version::decode(&want).unwrap(), v);
        // No version data at all.
        let bare = Version::decode(&fields(&[(0, 2), (0, 2)])).unwrap();
        assert_eq!(bare.caps, None);
    }

    #[test]
    fn version_parses_qemu_caps_and_rejects_junk() {
        let mut b = fields(&[(0, 2), (0, 2)]);
        b.extend_from_slice(
            br#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#,
        );
        b.push(0);
        let v = Version::decode(&b).unwrap();
        let c = v.caps.unwrap();
        assert_eq!(c.max_msg_fds(), 16);
        assert_eq!(c.pgsizes(), 4096);
        assert_eq!(c.write_multiple, Some(true));
        let bad = |s: &[u8]| {
            let mut b = fields(&[(0, 2), (0, 2)]);
            b.extend_from_slice(s);
            Version::decode(&b).unwrap_err()
        };
        assert!(matches!(bad(b"{}"), ProtoError::Json(_))); // no NUL
        assert!(matches!(bad(b"{\0}\0"), ProtoError::Json(_)));
        assert!(matches!(bad(b"[1]\0"), ProtoError::Json(_)));
        assert!(matches!(
            bad(b"{\"capabilities\":{\"max_msg_fds\":-1}}\0"),
            ProtoError::Json(_)
        ));
        assert!(matches!(bad(b"\xff\0"), ProtoError::Json(_)));
        let mut huge = vec![b' '; MAX_VERSION_DATA];
        huge.push(0);
        assert_eq!(bad(&huge).errno(), libc::E2BIG);
        assert!(Version::decode(&[0, 0, 0]).is_err());
    }

    #[test]
    fn dma_map_encoding() {
        let m = DmaMap {
            argsz: 32,
            flags: 3,
            offset: 0x1000,
            address: 0x8000_0000,
            size: 0x10_0000,
        };
        let want = fields(&[
            (32, 4),
            (3, 4),
            (0x1000, 8),
            (0x8000_0000, 8),
            (0x10_0000, 8),
        ]);
        assert_eq!(m.encode(), want);
        assert_eq!(DmaMap::decode(&want).unwrap(), m);
        assert_eq!(m.prot(), (true, true));
        let with = |f: &[(u64, usize)]| DmaMap::decode(&fields(f));
        assert!(with(&[(24, 4), (3, 4), (0, 8), (0, 8), (4096, 8)]).is_err()); // argsz
        assert!(with(&[(32, 4), (4, 4), (0, 8), (0, 8), (4096, 8)]).is_err()); // VADDR flag
        assert!(with(&[(32, 4), (1, 4), (0, 8), (0, 8), (0, 8)]).is_err()); // empty
        assert!(with(&[(32, 4), (1, 4), (0, 8), (u64::MAX, 8), (2, 8)]).is_err()); // wraps
        assert!(DmaMap::decode(&want[..31]).is_err());
    }

    #[test]
    fn dma_unmap_encoding() {
        let u = DmaUnmap {
            argsz: 24,
            flags: 0,
            address: 0x2000,
            size: 0x1000,
        };
        let want = fields(&[(24, 4), (0, 4), (0x2000, 8), (0x1000, 8)]);
        assert_eq!(u.encode(), want);
        assert_eq!(DmaUnmap::decode(&want).unwrap(), u);
        let all = DmaUnmap::decode(&fields(&[(24, 4), (2, 4), (0, 8), (0, 8)])).unwrap();
        assert!(all.all());
        let e = |f: &[(u64, usize)]| DmaUnmap::decode(&fields(f)).unwrap_err().errno();
        assert_eq!(e(&[(24, 4), (2, 4), (4096, 8), (0, 8)]), libc::EINVAL);
        assert_eq!(e(&[(24, 4), (1, 4), (0, 8), (4096, 8)]), libc::ENOTSUP);
        assert_eq!(e(&[(16, 4), (0, 4), (0, 8), (4096, 8)]), libc::EINVAL);
        assert_eq!(e(&[(24, 4), (8, 4), (0, 8), (4096, 8)]), libc::EINVAL);
    }

    #[test]
    fn device_and_irq_info_encoding() {
        let d = DeviceInfo {
            argsz: 16,
            flags: 0x11,
            num_regions: 4,
            num_irqs: 3,
        };
        let want = fields(&[(16, 4), (0x11, 4), (4, 4), (3, 4)]);
        assert_eq!(d.encode(), want);
        assert_eq!(DeviceInfo::decode(&want).unwrap(), d);
        assert!(DeviceInfo::decode_request(&fields(&[(16, 4), (0, 4), (0, 4), (0, 4)])).is_ok());
        assert!(DeviceInfo::decode_request(&fields(&[(8, 4), (0, 4), (0, 4), (0, 4)])).is_err());
        assert!(DeviceInfo::decode_request(&fields(&[(16, 4), (1, 4), (0, 4), (0, 4)])).is_err());

        let i = IrqInfo {
            argsz: 16,
            flags: 1,
            index: 2,
            count: 1,
        };
        let want = fields(&[(16, 4), (1, 4), (2, 4), (1, 4)]);
        assert_eq!(i.encode(), want);
        assert_eq!(IrqInfo::decode(&want).unwrap(), i);
        assert!(IrqInfo::decode_request(&fields(&[(16, 4), (0, 4), (2, 4), (0, 4)])).is_ok());
        assert!(IrqInfo::decode_request(&fields(&[(16, 4), (0, 4), (2, 4), (5, 4)])).is_err());
    }

    #[test]
    fn region_info_with_cap_type_and_argsz_negotiation() {
        let r = RegionInfo {
            flags: VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
            index: 1,
            size: 0x50,
            caps: vec![RegionCap::Type {
                type_: VFIO_REGION_TYPE_CCW,
                subtype: VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD,
            }],
            ..Default::default()
        };
        // Full reply: fixed part with cap_offset 32, then {id 2, version 1, next 0, type 2, subtype 1}.
        let mut want = fields(&[(48, 4), (0xb, 4), (1, 4), (32, 4), (0x50, 8), (0, 8)]);
        want.extend(fields(&[(2, 2), (1, 2), (0, 4), (2, 4), (1, 4)]));
        assert_eq!(r.encode_reply(48), want);
        let back = RegionInfo::decode_reply(&want).unwrap();
        assert_eq!(back.cap_type(), Some((2, 1)));
        assert_eq!(back.size, 0x50);
        // argsz too small: fixed part only, argsz = needed, cap_offset 0, CAPS still set.
        let short = fields(&[(48, 4), (0xb, 4), (1, 4), (0, 4), (0x50, 8), (0, 8)]);
        assert_eq!(r.encode_reply(32), short);
        assert_eq!(RegionInfo::decode_reply(&short).unwrap().caps, vec![]);
        // No caps: argsz 32, no CAPS flag.
        let plain = RegionInfo {
            caps: vec![],
            ..r.clone()
        };
        assert_eq!(
            plain.encode_reply(1024),
            fields(&[(32, 4), (3, 4), (1, 4), (0, 4), (0x50, 8), (0, 8)])
        );
        // Request: only index set.
        let req = RegionInfo::request(3, 64);
        assert_eq!(
            req,
            fields(&[(64, 4), (0, 4), (3, 4), (0, 4), (0, 8), (0, 8)])
        );
        assert_eq!(RegionInfo::decode_request(&req).unwrap(), (3, 64));
        assert!(RegionInfo::decode_request(&RegionInfo::request(3, 16)).is_err());
        let mut dirty = req.clone();
        dirty[16] = 1;
        assert!(RegionInfo::decode_request(&dirty).is_err());
    }

    #[test]
    fn region_info_chain_and_hostile_chains() {
        let r = RegionInfo {
            flags: 1,
            index: 0,
            size: 4096,
            caps: vec![
                RegionCap::SparseMmap(vec![(0x1000, 0x2000)]),
                RegionCap::Type {
                    type_: 2,
                    subtype: 3,
                },
            ],
            ..Default::default()
        };
        let b = r.encode_reply(4096);
        let mut want = fields(&[(80, 4), (9, 4), (0, 4), (32, 4), (4096, 8), (0, 8)]);
        want.extend(fields(&[
            (1, 2),
            (1, 2),
            (64, 4),
            (1, 4),
            (0, 4),
            (0x1000, 8),
            (0x2000, 8),
        ]));
        want.extend(fields(&[(2, 2), (1, 2), (0, 4), (2, 4), (3, 4)]));
        assert_eq!(b, want);
        assert_eq!(RegionInfo::decode_reply(&b).unwrap().caps, r.caps);
        // A loop (next points back) and an out-of-bounds offset are refused.
        let mut looped = b.clone();
        looped[64 + 4..64 + 8].copy_from_slice(&32u32.to_ne_bytes());
        assert!(RegionInfo::decode_reply(&looped).is_err());
        let mut oob = b.clone();
        oob[12..16].copy_from_slice(&200u32.to_ne_bytes());
        assert!(RegionInfo::decode_reply(&oob).is_err());
        let mut areas = b.clone();
        areas[40..44].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(RegionInfo::decode_reply(&areas).is_err());
    }

    #[test]
    fn irq_set_encoding_and_validation() {
        let s = IrqSet {
            argsz: 20,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: 0,
            start: 0,
            count: 1,
            data: vec![],
        };
        let want = fields(&[(20, 4), (0x24, 4), (0, 4), (0, 4), (1, 4)]);
        assert_eq!(s.encode(), want);
        assert_eq!(IrqSet::decode(&want).unwrap(), s);
        let mut b = fields(&[(22, 4), (0x22, 4), (0, 4), (0, 4), (2, 4)]);
        b.extend_from_slice(&[1, 0]);
        let bools = IrqSet::decode(&b).unwrap();
        assert_eq!(bools.data, vec![1, 0]);
        let e = |f: &[(u64, usize)]| IrqSet::decode(&fields(f)).is_err();
        assert!(e(&[(20, 4), (0x20, 4), (0, 4), (0, 4), (1, 4)])); // no DATA flag
        assert!(e(&[(20, 4), (0x25, 4), (0, 4), (0, 4), (1, 4)])); // two DATA flags
        assert!(e(&[(20, 4), (0x64, 4), (0, 4), (0, 4), (1, 4)])); // unknown bit
        assert!(e(&[(24, 4), (0x21, 4), (0, 4), (0, 4), (1, 4)])); // argsz != size
        assert!(e(&[(20, 4), (0x22, 4), (0, 4), (0, 4), (2, 4)])); // BOOL without data
        assert!(e(&[
            (20, 4),
            (0x21, 4),
            (0, 4),
            (u32::MAX as u64, 4),
            (2, 4)
        ])); // wraps
    }

    #[test]
    fn region_and_dma_access_encoding() {
        let w = RegionAccess {
            offset: 0x10,
            region: 1,
            count: 4,
            data: vec![1, 2, 3, 4],
        };
        let mut want = fields(&[(0x10, 8), (1, 4), (4, 4)]);
        want.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(w.encode(), want);
        assert_eq!(RegionAccess::decode(&want, true, 4096).unwrap(), w);
        assert!(RegionAccess::decode(&want, false, 4096).is_err()); // read carries no data
        assert_eq!(
            RegionAccess::decode(&want, true, 2).unwrap_err().errno(),
            libc::E2BIG
        );
        // The borrowed decode: same fields, data in place, same refusals.
        let (a, data) = RegionAccess::decode_ref(&want, true, 4096).unwrap();
        assert_eq!((a.offset, a.region, a.count, a.data.len()), (0x10, 1, 4, 0));
        assert_eq!(data, &[1, 2, 3, 4]);
        assert_eq!(
            RegionAccess::decode_ref(&want, true, 2)
                .unwrap_err()
                .errno(),
            libc::E2BIG
        );
        assert!(RegionAccess::decode_ref(&want, false, 4096).is_err());
        assert!(RegionAccess::decode_ref(&want[..19], true, 4096).is_err()); // short data
        assert!(RegionAccess::decode_ref(&want[..15], false, 4096).is_err()); // short header
                                                                              // The fixed part alone is the first 16 bytes of the full image.
        assert_eq!(RegionAccess::encode_fixed(0x10, 1, 4)[..], want[..16]);
        assert_eq!(
            RegionAccess::encode_fixed(0x0102_0304_0506_0708, 0x0A0B_0C0D, 0x11)[..],
            fields(&[(0x0102_0304_0506_0708, 8), (0x0A0B_0C0D, 4), (0x11, 4)])[..]
        );
        let d = DmaAccess {
            address: 0x4000,
            count: 2,
            data: vec![9, 8],
        };
        let mut want = fields(&[(0x4000, 8), (2, 8)]);
        want.extend_from_slice(&[9, 8]);
        assert_eq!(d.encode(), want);
        assert_eq!(DmaAccess::decode(&want, true, 16).unwrap(), d);
        assert_eq!(
            DmaAccess::check_read_reply(&want, 0x4000, 2).unwrap(),
            &[9, 8]
        );
        assert!(DmaAccess::check_read_reply(&want, 0x4001, 2).is_err());
        assert!(DmaAccess::check_read_reply(&want, 0x4000, 3).is_err());
        // QEMU's layout: u32 count + 4 bytes of padding.
        let mut qemu = fields(&[(0x4000, 8), (2, 4), (0, 4)]);
        qemu.extend_from_slice(&[9, 8]);
        assert!(DmaAccess::check_read_reply(&qemu, 0x4000, 2).is_ok());
        assert!(DmaAccess::check_write_reply(&[], 0x4000).is_ok());
        assert!(DmaAccess::check_write_reply(&fields(&[(0x4000, 8), (2, 4)]), 0x4000).is_ok());
        assert!(DmaAccess::check_write_reply(&fields(&[(0x4000, 8), (2, 8)]), 0x5000).is_err());
        assert!(DmaAccess::check_write_reply(&[0; 5], 0x4000).is_err());
    }

    #[test]
    fn write_multi_encoding() {
        let m = WriteMulti {
            writes: vec![WriteOne {
                offset: 8,
                region: 0,
                count: 4,
                data: [1, 2, 3, 4, 0, 0, 0, 0],
            }],
        };
        let mut want = fields(&[(1, 8), (8, 8), (0, 4), (4, 4)]);
        want.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0]);
        assert_eq!(m.encode(), want);
        assert_eq!(WriteMulti::decode(&want).unwrap(), m);
        let mut bad = want.clone();
        bad[20..24].copy_from_slice(&9u32.to_ne_bytes());
        assert!(WriteMulti::decode(&bad).is_err());
        assert!(WriteMulti::decode(&fields(&[(0, 8)])).is_err());
        assert!(WriteMulti::decode(&fields(&[(201, 8)])).is_err());
        assert_eq!(decode_u64(&fields(&[(7, 8)])).unwrap(), 7);
    }

    #[test]
    fn struct_sizes_match_vfio_bindings() {
        assert_eq!(DmaMap::SIZE, 32);
        assert_eq!(DmaUnmap::SIZE, 24);
        assert_eq!(DeviceInfo::SIZE, 16);
        assert_eq!(RegionInfo::SIZE, 32);
        assert_eq!(IrqInfo::SIZE, 16);
        assert_eq!(IrqSet::SIZE, 20);
        assert!(decode_device_feature(&fields(&[(8, 4), (1 << 19, 4)])).is_err());
        assert!(decode_device_feature(&fields(&[(8, 4), (1 | 1 << 16, 4)])).is_ok());
    }
}
