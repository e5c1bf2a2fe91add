//! The operation-request block (ORB), command mode, as SSCH takes it (12 bytes; the
//! vfio-ccw I/O region carries no ORB extension words).

use bitfield_struct::bitfield;

/// Size of the ORB image in the vfio-ccw I/O region.
pub const ORB_SIZE: usize = 12;

/// ORB word 1: the controls (bit 0 = most significant, as the Principles of Operation number them).
#[bitfield(u32, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct OrbControls {
    /// Subchannel (storage) key, bits 0-3.
    #[bits(4)]
    pub key: u8,
    /// Suspend control (S), bit 4.
    pub suspend: bool,
    /// Streaming-mode control, bit 5.
    pub streaming: bool,
    /// Modification control (M), bit 6.
    pub modification: bool,
    /// Synchronization control (Y), bit 7.
    pub synchronization: bool,
    /// Format control (F), bit 8: CCWs are format 1.
    pub format1: bool,
    /// Prefetch control (P), bit 9.
    pub prefetch: bool,
    /// Initial-status-interruption control (I), bit 10.
    pub initial_status_interrupt: bool,
    /// Address-limit-checking control (A), bit 11.
    pub address_limit_checking: bool,
    /// Suppress-suspended-interruption control (U), bit 12.
    pub suppress_suspended_interrupt: bool,
    /// Transport-mode bit (B), bit 13: a transport-mode ORB (refused by vccw).
    pub transport_mode: bool,
    /// Format-2-IDAW control (H), bit 14.
    pub format2_idaw: bool,
    /// 2K-IDAW control (T), bit 15.
    pub idaw_2k: bool,
    /// Logical-path mask (LPM), bits 16-23.
    #[bits(8)]
    pub lpm: u8,
    /// Incorrect-length-suppression mode (L), bit 24.
    pub incorrect_length_suppression: bool,
    /// Modified-CCW-indirect-data-addressing control (D), bit 25.
    pub midaw: bool,
    /// Reserved, bits 26-30 (must be zero).
    #[bits(5)]
    pub reserved: u8,
    /// ORB-extension control (X), bit 31.
    pub orb_extension: bool,
}

/// A command-mode ORB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Orb {
    /// Interruption parameter, returned in the IRB's subchannel-status word context.
    pub intparm: u32,
    /// Word 1 controls.
    pub ctl: OrbControls,
    /// Channel-program address (word 2, bit 0 must be zero).
    pub cpa: u32,
}

impl Orb {
    /// Decodes the 12-byte big-endian image.
    pub fn from_bytes(b: &[u8; ORB_SIZE]) -> Self {
        let w = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Orb {
            intparm: w(0),
            ctl: OrbControls::from_bits(w(4)),
            cpa: w(8),
        }
    }

    /// Encodes the 12-byte big-endian image.
    pub fn to_bytes(&self) -> [u8; ORB_SIZE] {
        let mut b = [0u8; ORB_SIZE];
        b[0..4].copy_from_slice(&self.intparm.to_be_bytes());
        b[4..8].copy_from_slice(&self.ctl.into_bits().to_be_bytes());
        b[8..12].copy_from_slice(&self.cpa.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_orb_bytes() {
        // The ORB of the s390x reference probe: intparm 0x12345678, fmt=1, pfch, lpm 0xff, cpa 0x200000.
        let b = [
            0x12, 0x34, 0x56, 0x78, 0x00, 0xC0, 0xFF, 0x00, 0x00, 0x20, 0x00, 0x00,
        ];
        let orb = Orb::from_bytes(&b);
        assert_eq!(orb.intparm, 0x1234_5678);
        assert!(orb.ctl.format1() && orb.ctl.prefetch());
        assert_eq!(orb.ctl.lpm(), 0xff);
        assert_eq!(orb.ctl.key(), 0);
        assert_eq!(orb.cpa, 0x0020_0000);
        assert_eq!(orb.to_bytes(), b);
    }

    #[test]
    fn every_control_bit() {
        // (setter, expected word-1 value): bit n (PoP numbering) is 1 << (31 - n).
        let bit = |n: u32| 1u32 << (31 - n);
        let cases: [(OrbControls, u32); 16] = [
            (OrbControls::new().with_key(0xA), 0xA000_0000),
            (OrbControls::new().with_suspend(true), bit(4)),
            (OrbControls::new().with_streaming(true), bit(5)),
            (OrbControls::new().with_modification(true), bit(6)),
            (OrbControls::new().with_synchronization(true), bit(7)),
            (OrbControls::new().with_format1(true), bit(8)),
            (OrbControls::new().with_prefetch(true), bit(9)),
            (
                OrbControls::new().with_initial_status_interrupt(true),
                bit(10),
            ),
            (
                OrbControls::new().with_address_limit_checking(true),
                bit(11),
            ),
            (
                OrbControls::new().with_suppress_suspended_interrupt(true),
                bit(12),
            ),
            (OrbControls::new().with_transport_mode(true), bit(13)),
            (OrbControls::new().with_format2_idaw(true), bit(14)),
            (OrbControls::new().with_idaw_2k(true), bit(15)),
            (OrbControls::new().with_lpm(0x81), 0x0000_8100),
            (
                OrbControls::new().with_incorrect_length_suppression(true),
                bit(24),
            ),
            (OrbControls::new().with_midaw(true), bit(25)),
        ];
        for (c, v) in cases {
            assert_eq!(c.into_bits(), v, "{c:?}");
        }
        assert_eq!(OrbControls::new().with_orb_extension(true).into_bits(), 1);
        assert_eq!(OrbControls::new().with_reserved(0x1f).into_bits(), 0x3e);
    }
}
