//! The channel-report word (CRW, 4 bytes), as STCRW stores it and as the vfio-ccw CRW region
//! carries it (big-endian, whatever the host).

use bitfield_struct::bitfield;

/// Size of the CRW image.
pub const CRW_SIZE: usize = 4;

/// Reporting-source codes (CRW bits 4-7), as values of [`Crw::rsc`].
pub mod rsc {
    /// Monitoring facility.
    pub const MONITOR: u8 = 0x2;
    /// Subchannel: the RSID is the subchannel number.
    pub const SUBCHANNEL: u8 = 0x3;
    /// Channel path: the RSID is the CHPID (in its low byte).
    pub const CHANNEL_PATH: u8 = 0x4;
    /// Configuration-alert facility.
    pub const CONFIG_ALERT: u8 = 0x9;
    /// Channel subsystem.
    pub const CSS: u8 = 0xB;
}

/// Error-recovery codes (CRW bits 10-15), as values of [`Crw::erc`].
pub mod erc {
    /// Event information pending.
    pub const EVENT: u8 = 0x00;
    /// Available.
    pub const AVAILABLE: u8 = 0x01;
    /// Initialized: for a channel path, the path came (back) online.
    pub const INITIALIZED: u8 = 0x02;
    /// Temporary error.
    pub const TEMPORARY_ERROR: u8 = 0x03;
    /// Installed parameters initialized (what QEMU reports for a subchannel that appeared).
    pub const INSTALLED_PARAMS_INITIALIZED: u8 = 0x04;
    /// Terminal.
    pub const TERMINAL: u8 = 0x05;
    /// Permanent error, facility not initialized: for a channel path, the path is gone.
    pub const PERMANENT_ERROR_NOT_INITIALIZED: u8 = 0x06;
    /// Permanent error, facility initialized.
    pub const PERMANENT_ERROR_INITIALIZED: u8 = 0x07;
    /// Installed parameters modified.
    pub const INSTALLED_PARAMS_MODIFIED: u8 = 0x08;
}

/// A channel-report word (bit 0 = most significant).
#[bitfield(u32, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct Crw {
    /// Reserved, bit 0.
    pub reserved0: bool,
    /// Solicited (S), bit 1.
    pub solicited: bool,
    /// Overflow (R), bit 2: CRWs were lost before this one.
    pub overflow: bool,
    /// Chaining (C), bit 3: more CRWs of the same report follow.
    pub chaining: bool,
    /// Reporting-source code (RSC), bits 4-7 (see [`rsc`]).
    #[bits(4)]
    pub rsc: u8,
    /// Ancillary report (A), bit 8.
    pub ancillary: bool,
    /// Reserved, bit 9.
    pub reserved1: bool,
    /// Error-recovery code (ERC), bits 10-15 (see [`erc`]).
    #[bits(6)]
    pub erc: u8,
    /// Reporting-source ID (RSID), bits 16-31.
    #[bits(16)]
    pub rsid: u16,
}

impl Crw {
    /// The CRW vfio-ccw queues when channel path `chpid` becomes available (CHP_ONLINE):
    /// RSC channel path, ERC initialized.
    pub fn channel_path_online(chpid: u8) -> Self {
        Crw::new()
            .with_rsc(rsc::CHANNEL_PATH)
            .with_erc(erc::INITIALIZED)
            .with_rsid(u16::from(chpid))
    }

    /// The CRW vfio-ccw queues when channel path `chpid` is gone (CHP_OFFLINE):
    /// RSC channel path, ERC permanent error / not initialized.
    pub fn channel_path_offline(chpid: u8) -> Self {
        Crw::new()
            .with_rsc(rsc::CHANNEL_PATH)
            .with_erc(erc::PERMANENT_ERROR_NOT_INITIALIZED)
            .with_rsid(u16::from(chpid))
    }

    /// A subchannel report for subchannel number `schno` with error-recovery code `erc`
    /// (only its low 6 bits are kept).
    pub fn subchannel(erc: u8, schno: u16) -> Self {
        Crw::new()
            .with_rsc(rsc::SUBCHANNEL)
            .with_erc(erc & 0x3f)
            .with_rsid(schno)
    }

    /// Decodes the 4-byte big-endian image.
    pub fn from_bytes(b: &[u8; CRW_SIZE]) -> Self {
        Crw::from_bits(u32::from_be_bytes(*b))
    }

    /// Encodes the 4-byte big-endian image.
    pub fn to_bytes(&self) -> [u8; CRW_SIZE] {
        self.into_bits().to_be_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bit() {
        let bit = |n: u32| 1u32 << (31 - n);
        let cases: [(Crw, u32); 9] = [
            (Crw::new().with_reserved0(true), bit(0)),
            (Crw::new().with_solicited(true), bit(1)),
            (Crw::new().with_overflow(true), bit(2)),
            (Crw::new().with_chaining(true), bit(3)),
            (Crw::new().with_rsc(0xf), 0x0F00_0000),
            (Crw::new().with_ancillary(true), bit(8)),
            (Crw::new().with_reserved1(true), bit(9)),
            (Crw::new().with_erc(0x3f), 0x003F_0000),
            (Crw::new().with_rsid(0xffff), 0x0000_FFFF),
        ];
        for (c, v) in cases {
            assert_eq!(c.into_bits(), v, "{c:?}");
        }
    }

    #[test]
    fn channel_path_reports() {
        // CHPID 0xFE online: RSC 4, ERC 2, RSID 0x00FE.
        let on = Crw::channel_path_online(0xFE);
        assert_eq!(on.to_bytes(), [0x04, 0x02, 0x00, 0xFE]);
        // Offline: ERC 6.
        let off = Crw::channel_path_offline(0xFE);
        assert_eq!(off.to_bytes(), [0x04, 0x06, 0x00, 0xFE]);
        assert_eq!(Crw::from_bytes(&[0x04, 0x06, 0x00, 0xFE]), off);
    }

    #[test]
    fn subchannel_report() {
        // Subchannel 0x0005, installed parameters initialized, chained and solicited.
        let c = Crw::subchannel(erc::INSTALLED_PARAMS_INITIALIZED, 0x0005)
            .with_chaining(true)
            .with_solicited(true);
        let b = c.to_bytes();
        assert_eq!(b, [0x53, 0x04, 0x00, 0x05]);
        let d = Crw::from_bytes(&b);
        assert_eq!((d.rsc(), d.erc(), d.rsid()), (rsc::SUBCHANNEL, 4, 5));
        assert!(d.chaining() && d.solicited() && !d.overflow());
        // The ERC argument cannot spill into the neighbouring bits.
        assert_eq!(
            Crw::subchannel(0xff, 1).to_bytes(),
            [0x03, 0x3F, 0x00, 0x01]
        );
    }

    proptest::proptest! {
        #[test]
        fn any_image_round_trips(b in proptest::prelude::any::<[u8; CRW_SIZE]>()) {
            proptest::prop_assert_eq!(Crw::from_bytes(&b).to_bytes(), b);
        }
    }
}
