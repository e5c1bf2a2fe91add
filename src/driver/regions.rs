//! The vfio-ccw uAPI regions (`include/uapi/linux/vfio_ccw.h`), as byte images.
//!
//! Endianness: the ORB, SCSW, IRB, SCHIB and CRW *contents* are s390 data and always
//! big-endian; `ret_code`, `command` and `pad` are plain `__u32` fields of the kernel structs
//! and so are in the host's byte order. vfio-bindings 0.7 defines the region/IRQ indexes and
//! the region type/subtypes (re-exported here) but not the region structs, the area sizes or
//! the async command bits, which are defined below.

use crate::orb::{Crw, Irb, Orb, Schib, Scsw, CRW_SIZE, IRB_SIZE, ORB_SIZE, SCHIB_SIZE, SCSW_SIZE};

pub use vfio_bindings::bindings::vfio::{
    VFIO_CCW_CONFIG_REGION_INDEX, VFIO_CCW_CRW_IRQ_INDEX, VFIO_CCW_IO_IRQ_INDEX, VFIO_CCW_NUM_IRQS,
    VFIO_CCW_NUM_REGIONS, VFIO_CCW_REQ_IRQ_INDEX, VFIO_DEVICE_FLAGS_CCW,
    VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD, VFIO_REGION_SUBTYPE_CCW_CRW, VFIO_REGION_SUBTYPE_CCW_SCHIB,
    VFIO_REGION_TYPE_CCW,
};

/// `ORB_AREA_SIZE`: the ORB image in the I/O region.
pub const ORB_AREA_SIZE: usize = 12;
/// `SCSW_AREA_SIZE`: the SCSW image in the I/O region.
pub const SCSW_AREA_SIZE: usize = 12;
/// `IRB_AREA_SIZE`: the IRB image in the I/O region.
pub const IRB_AREA_SIZE: usize = 96;
/// `SCHIB_AREA_SIZE`: the SCHIB image in the SCHIB region.
pub const SCHIB_AREA_SIZE: usize = 52;

/// Offset of `orb_area` in the I/O region.
pub const IO_ORB_OFFSET: usize = 0;
/// Offset of `scsw_area` in the I/O region.
pub const IO_SCSW_OFFSET: usize = IO_ORB_OFFSET + ORB_AREA_SIZE;
/// Offset of `irb_area` in the I/O region.
pub const IO_IRB_OFFSET: usize = IO_SCSW_OFFSET + SCSW_AREA_SIZE;
/// Offset of `ret_code` in the I/O region.
pub const IO_RET_CODE_OFFSET: usize = IO_IRB_OFFSET + IRB_AREA_SIZE;

/// `sizeof(struct ccw_io_region)` (packed).
pub const CCW_IO_REGION_SIZE: usize = IO_RET_CODE_OFFSET + 4;
/// `sizeof(struct ccw_cmd_region)`.
pub const CCW_CMD_REGION_SIZE: usize = 8;
/// `sizeof(struct ccw_schib_region)`.
pub const CCW_SCHIB_REGION_SIZE: usize = SCHIB_AREA_SIZE;
/// `sizeof(struct ccw_crw_region)`.
pub const CCW_CRW_REGION_SIZE: usize = 8;

/// `VFIO_CCW_ASYNC_CMD_HSCH`: the async region's `command` asking for HALT SUBCHANNEL.
pub const VFIO_CCW_ASYNC_CMD_HSCH: u32 = 1 << 0;
/// `VFIO_CCW_ASYNC_CMD_CSCH`: the async region's `command` asking for CLEAR SUBCHANNEL.
pub const VFIO_CCW_ASYNC_CMD_CSCH: u32 = 1 << 1;

/// The kernel's region-offset shift on the device fd (offset = index << 10). Kernel-internal
/// (`vfio_ccw_private.h`), not uAPI: clients must use the offsets REGION_INFO reports.
pub const VFIO_CCW_OFFSET_SHIFT: u32 = 10;

// The areas are exactly the wire types they carry.
const _: () = assert!(ORB_AREA_SIZE == ORB_SIZE);
const _: () = assert!(SCSW_AREA_SIZE == SCSW_SIZE);
const _: () = assert!(IRB_AREA_SIZE == IRB_SIZE);
const _: () = assert!(SCHIB_AREA_SIZE == SCHIB_SIZE);
const _: () = assert!(CCW_IO_REGION_SIZE == 124);

fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `struct ccw_io_region` (124 bytes): the client writes ORB + SCSW to start I/O; the device
/// returns the IRB and a `ret_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CcwIoRegion {
    /// The ORB image (big-endian), bytes 0-11.
    pub orb_area: [u8; ORB_AREA_SIZE],
    /// The SCSW image (big-endian), bytes 12-23: its function control selects the request.
    pub scsw_area: [u8; SCSW_AREA_SIZE],
    /// The IRB image (big-endian), bytes 24-119.
    pub irb_area: [u8; IRB_AREA_SIZE],
    /// Bytes 120-123, host order: 0 or a negative errno (the kernel field is `__u32`; the
    /// bits are the same).
    pub ret_code: i32,
}

impl Default for CcwIoRegion {
    fn default() -> Self {
        CcwIoRegion {
            orb_area: [0; ORB_AREA_SIZE],
            scsw_area: [0; SCSW_AREA_SIZE],
            irb_area: [0; IRB_AREA_SIZE],
            ret_code: 0,
        }
    }
}

impl CcwIoRegion {
    /// A start request as a client writes it: `orb` and `scsw` images, empty IRB, ret_code 0.
    pub fn request(orb: &Orb, scsw: &Scsw) -> Self {
        CcwIoRegion {
            orb_area: orb.to_bytes(),
            scsw_area: scsw.to_bytes(),
            ..Default::default()
        }
    }

    /// Decodes the 124-byte region image.
    pub fn from_bytes(b: &[u8; CCW_IO_REGION_SIZE]) -> Self {
        let mut r = CcwIoRegion::default();
        r.orb_area
            .copy_from_slice(&b[IO_ORB_OFFSET..IO_SCSW_OFFSET]);
        r.scsw_area
            .copy_from_slice(&b[IO_SCSW_OFFSET..IO_IRB_OFFSET]);
        r.irb_area
            .copy_from_slice(&b[IO_IRB_OFFSET..IO_RET_CODE_OFFSET]);
        r.ret_code = ne_u32(b, IO_RET_CODE_OFFSET) as i32;
        r
    }

    /// Encodes the 124-byte region image.
    pub fn to_bytes(&self) -> [u8; CCW_IO_REGION_SIZE] {
        let mut b = [0u8; CCW_IO_REGION_SIZE];
        b[IO_ORB_OFFSET..IO_SCSW_OFFSET].copy_from_slice(&self.orb_area);
        b[IO_SCSW_OFFSET..IO_IRB_OFFSET].copy_from_slice(&self.scsw_area);
        b[IO_IRB_OFFSET..IO_RET_CODE_OFFSET].copy_from_slice(&self.irb_area);
        b[IO_RET_CODE_OFFSET..].copy_from_slice(&self.ret_code.to_ne_bytes());
        b
    }

    /// The ORB in `orb_area`.
    pub fn orb(&self) -> Orb {
        Orb::from_bytes(&self.orb_area)
    }

    /// The SCSW in `scsw_area`.
    pub fn scsw(&self) -> Scsw {
        Scsw::from_bytes(&self.scsw_area)
    }

    /// The IRB in `irb_area`.
    pub fn irb(&self) -> Irb {
        Irb::from_bytes(&self.irb_area)
    }

    /// Stores `irb` into `irb_area`.
    pub fn set_irb(&mut self, irb: &Irb) {
        self.irb_area = irb.to_bytes();
    }
}

/// `struct ccw_cmd_region` (8 bytes): the async region for HSCH/CSCH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CcwCmdRegion {
    /// Bytes 0-3, host order: [`VFIO_CCW_ASYNC_CMD_HSCH`] or [`VFIO_CCW_ASYNC_CMD_CSCH`].
    pub command: u32,
    /// Bytes 4-7, host order: 0 or a negative errno.
    pub ret_code: i32,
}

impl CcwCmdRegion {
    /// Decodes the 8-byte region image.
    pub fn from_bytes(b: &[u8; CCW_CMD_REGION_SIZE]) -> Self {
        CcwCmdRegion {
            command: ne_u32(b, 0),
            ret_code: ne_u32(b, 4) as i32,
        }
    }

    /// Encodes the 8-byte region image.
    pub fn to_bytes(&self) -> [u8; CCW_CMD_REGION_SIZE] {
        let mut b = [0u8; CCW_CMD_REGION_SIZE];
        b[0..4].copy_from_slice(&self.command.to_ne_bytes());
        b[4..8].copy_from_slice(&self.ret_code.to_ne_bytes());
        b
    }
}

/// `struct ccw_schib_region` (52 bytes): the SCHIB as STSCH stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CcwSchibRegion {
    /// The SCHIB image (big-endian).
    pub schib_area: [u8; SCHIB_AREA_SIZE],
}

impl Default for CcwSchibRegion {
    fn default() -> Self {
        CcwSchibRegion {
            schib_area: [0; SCHIB_AREA_SIZE],
        }
    }
}

impl CcwSchibRegion {
    /// The region holding `schib`.
    pub fn new(schib: &Schib) -> Self {
        CcwSchibRegion {
            schib_area: schib.to_bytes(),
        }
    }

    /// Decodes the 52-byte region image.
    pub fn from_bytes(b: &[u8; CCW_SCHIB_REGION_SIZE]) -> Self {
        CcwSchibRegion { schib_area: *b }
    }

    /// Encodes the 52-byte region image.
    pub fn to_bytes(&self) -> [u8; CCW_SCHIB_REGION_SIZE] {
        self.schib_area
    }

    /// The SCHIB in `schib_area`.
    pub fn schib(&self) -> Schib {
        Schib::from_bytes(&self.schib_area)
    }
}

/// `struct ccw_crw_region` (8 bytes): one popped CRW (zero when none is queued), then padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CcwCrwRegion {
    /// Bytes 0-3: the CRW, big-endian (the kernel copies the s390 CRW into its `__u32`).
    pub crw: Crw,
    /// Bytes 4-7, host order: padding, zero.
    pub pad: u32,
}

impl CcwCrwRegion {
    /// The region holding `crw`.
    pub fn new(crw: Crw) -> Self {
        CcwCrwRegion { crw, pad: 0 }
    }

    /// Decodes the 8-byte region image.
    pub fn from_bytes(b: &[u8; CCW_CRW_REGION_SIZE]) -> Self {
        CcwCrwRegion {
            crw: Crw::from_bytes(&[b[0], b[1], b[2], b[3]]),
            pad: ne_u32(b, CRW_SIZE),
        }
    }

    /// Encodes the 8-byte region image.
    pub fn to_bytes(&self) -> [u8; CCW_CRW_REGION_SIZE] {
        let mut b = [0u8; CCW_CRW_REGION_SIZE];
        b[..CRW_SIZE].copy_from_slice(&self.crw.to_bytes());
        b[CRW_SIZE..].copy_from_slice(&self.pad.to_ne_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orb::{dstat, fctl, stctl, OrbControls, ScswFlags};

    #[test]
    fn uapi_constants() {
        assert_eq!(VFIO_CCW_CONFIG_REGION_INDEX, 0);
        assert_eq!(VFIO_CCW_NUM_REGIONS, 1);
        assert_eq!(
            (
                VFIO_CCW_IO_IRQ_INDEX,
                VFIO_CCW_CRW_IRQ_INDEX,
                VFIO_CCW_REQ_IRQ_INDEX
            ),
            (0, 1, 2)
        );
        assert_eq!(VFIO_CCW_NUM_IRQS, 3);
        assert_eq!(VFIO_REGION_TYPE_CCW, 2);
        assert_eq!(
            (
                VFIO_REGION_SUBTYPE_CCW_ASYNC_CMD,
                VFIO_REGION_SUBTYPE_CCW_SCHIB,
                VFIO_REGION_SUBTYPE_CCW_CRW
            ),
            (1, 2, 3)
        );
        assert_eq!((VFIO_CCW_ASYNC_CMD_HSCH, VFIO_CCW_ASYNC_CMD_CSCH), (1, 2));
        assert_eq!(VFIO_DEVICE_FLAGS_CCW, 1 << 4);
        assert_eq!(
            (
                CCW_IO_REGION_SIZE,
                CCW_CMD_REGION_SIZE,
                CCW_SCHIB_REGION_SIZE,
                CCW_CRW_REGION_SIZE
            ),
            (124, 8, 52, 8)
        );
        assert_eq!(
            (
                IO_ORB_OFFSET,
                IO_SCSW_OFFSET,
                IO_IRB_OFFSET,
                IO_RET_CODE_OFFSET
            ),
            (0, 12, 24, 120)
        );
    }

    #[test]
    fn io_region_request_bytes() {
        // The probe's request: ORB intparm 0x12345678, fmt 1 + prefetch, LPM 0xFF, CPA
        // 0x00200000; SCSW with the start function.
        let orb = Orb {
            intparm: 0x1234_5678,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_prefetch(true)
                .with_lpm(0xff),
            cpa: 0x0020_0000,
        };
        let scsw = Scsw {
            flags: ScswFlags::new().with_fctl(fctl::START),
            ..Default::default()
        };
        let r = CcwIoRegion::request(&orb, &scsw);
        let mut want = [0u8; CCW_IO_REGION_SIZE];
        want[..12].copy_from_slice(&[
            0x12, 0x34, 0x56, 0x78, 0x00, 0xC0, 0xFF, 0x00, 0x00, 0x20, 0x00, 0x00,
        ]);
        want[12..16].copy_from_slice(&[0x00, 0x00, 0x40, 0x00]);
        assert_eq!(r.to_bytes(), want);
        let d = CcwIoRegion::from_bytes(&want);
        assert_eq!((d.orb(), d.scsw()), (orb, scsw));
        assert_eq!(d.ret_code, 0);
    }

    #[test]
    fn io_region_result_and_ret_code() {
        let mut r = CcwIoRegion::default();
        let scsw = Scsw {
            flags: ScswFlags::new()
                .with_fctl(fctl::START)
                .with_stctl(stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING),
            cpa: 0x0020_0010,
            dstat: dstat::CHANNEL_END | dstat::DEVICE_END,
            ..Default::default()
        };
        let irb = Irb::new(scsw, 0x80);
        r.set_irb(&irb);
        r.ret_code = -16; // -EBUSY
        let b = r.to_bytes();
        assert_eq!(&b[24..28], &[0x00, 0x00, 0x40, 0x07]);
        assert_eq!(b[32], 0x0C); // SCSW dstat at IRB byte 8
        assert_eq!(b[37], 0x80); // ESW LPUM at IRB byte 13
        assert_eq!(&b[24..120], &irb.to_bytes());
        assert_eq!(&b[120..], &(-16i32).to_ne_bytes());
        #[cfg(target_endian = "little")]
        assert_eq!(&b[120..], &[0xF0, 0xFF, 0xFF, 0xFF]);
        #[cfg(target_endian = "big")]
        assert_eq!(&b[120..], &[0xFF, 0xFF, 0xFF, 0xF0]);
        let d = CcwIoRegion::from_bytes(&b);
        assert_eq!(d, r);
        assert_eq!(d.irb(), irb);
    }

    #[test]
    fn cmd_region_bytes() {
        let c = CcwCmdRegion {
            command: VFIO_CCW_ASYNC_CMD_CSCH,
            ret_code: -19, // -ENODEV
        };
        let b = c.to_bytes();
        assert_eq!(&b[..4], &2u32.to_ne_bytes());
        assert_eq!(&b[4..], &(-19i32).to_ne_bytes());
        #[cfg(target_endian = "little")]
        assert_eq!(b, [0x02, 0, 0, 0, 0xED, 0xFF, 0xFF, 0xFF]);
        assert_eq!(CcwCmdRegion::from_bytes(&b), c);
    }

    #[test]
    fn schib_region_bytes() {
        let mut img = [0u8; SCHIB_AREA_SIZE];
        img[4..8].copy_from_slice(&[0x18, 0x81, 0x00, 0x05]);
        img[8..16].copy_from_slice(&[0x80, 0x00, 0x00, 0x80, 0x00, 0x00, 0x80, 0x80]);
        img[16] = 0xFE;
        let r = CcwSchibRegion::from_bytes(&img);
        let s = r.schib();
        assert_eq!(s.pmcw.devno, 5);
        assert_eq!(s.pmcw.chpid[0], 0xFE);
        assert_eq!(CcwSchibRegion::new(&s).to_bytes(), img);
    }

    #[test]
    fn crw_region_bytes() {
        // The CRW is big-endian whatever the host: channel path 0x42 gone.
        let r = CcwCrwRegion::new(Crw::channel_path_offline(0x42));
        assert_eq!(r.to_bytes(), [0x04, 0x06, 0x00, 0x42, 0, 0, 0, 0]);
        assert_eq!(CcwCrwRegion::from_bytes(&r.to_bytes()), r);
        // An empty queue reads as all zeros.
        assert_eq!(CcwCrwRegion::default().to_bytes(), [0; 8]);
    }

    proptest::proptest! {
        #[test]
        fn any_io_image_round_trips(v in proptest::collection::vec(proptest::prelude::any::<u8>(), CCW_IO_REGION_SIZE)) {
            let b: [u8; CCW_IO_REGION_SIZE] = v.try_into().unwrap();
            proptest::prop_assert_eq!(CcwIoRegion::from_bytes(&b).to_bytes(), b);
        }

        #[test]
        fn any_small_region_round_trips(b in proptest::prelude::any::<[u8; 8]>()) {
            proptest::prop_assert_eq!(CcwCmdRegion::from_bytes(&b).to_bytes(), b);
            proptest::prop_assert_eq!(CcwCrwRegion::from_bytes(&b).to_bytes(), b);
        }
    }
}
