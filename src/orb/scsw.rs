//! The subchannel-status word (SCSW), command mode (12 bytes).

use bitfield_struct::bitfield;

/// Size of the SCSW image.
pub const SCSW_SIZE: usize = 12;

/// Function-control bits (SCSW bits 17-19), as values of [`ScswFlags::fctl`].
pub mod fctl {
    /// Start function.
    pub const START: u8 = 0x4;
    /// Halt function.
    pub const HALT: u8 = 0x2;
    /// Clear function.
    pub const CLEAR: u8 = 0x1;
}

/// Activity-control bits (SCSW bits 20-26), as values of [`ScswFlags::actl`].
pub mod actl {
    /// Resume pending.
    pub const RESUME_PENDING: u8 = 0x40;
    /// Start pending.
    pub const START_PENDING: u8 = 0x20;
    /// Halt pending.
    pub const HALT_PENDING: u8 = 0x10;
    /// Clear pending.
    pub const CLEAR_PENDING: u8 = 0x08;
    /// Subchannel active.
    pub const SUBCHANNEL_ACTIVE: u8 = 0x04;
    /// Device active.
    pub const DEVICE_ACTIVE: u8 = 0x02;
    /// Suspended.
    pub const SUSPENDED: u8 = 0x01;
}

/// Status-control bits (SCSW bits 27-31), as values of [`ScswFlags::stctl`].
pub mod stctl {
    /// Alert status.
    pub const ALERT: u8 = 0x10;
    /// Intermediate status.
    pub const INTERMEDIATE: u8 = 0x08;
    /// Primary status.
    pub const PRIMARY: u8 = 0x04;
    /// Secondary status.
    pub const SECONDARY: u8 = 0x02;
    /// Status pending.
    pub const STATUS_PENDING: u8 = 0x01;
}

/// Device-status (unit-status) bits, SCSW byte 8.
pub mod dstat {
    /// Attention.
    pub const ATTENTION: u8 = 0x80;
    /// Status modifier.
    pub const STATUS_MODIFIER: u8 = 0x40;
    /// Control-unit end.
    pub const CONTROL_UNIT_END: u8 = 0x20;
    /// Busy.
    pub const BUSY: u8 = 0x10;
    /// Channel end.
    pub const CHANNEL_END: u8 = 0x08;
    /// Device end.
    pub const DEVICE_END: u8 = 0x04;
    /// Unit check.
    pub const UNIT_CHECK: u8 = 0x02;
    /// Unit exception.
    pub const UNIT_EXCEPTION: u8 = 0x01;
}

/// Subchannel-status bits, SCSW byte 9.
pub mod cstat {
    /// Program-controlled interruption.
    pub const PCI: u8 = 0x80;
    /// Incorrect length.
    pub const INCORRECT_LENGTH: u8 = 0x40;
    /// Program check.
    pub const PROGRAM_CHECK: u8 = 0x20;
    /// Protection check.
    pub const PROTECTION_CHECK: u8 = 0x10;
    /// Channel-data check.
    pub const CHANNEL_DATA_CHECK: u8 = 0x08;
    /// Channel-control check.
    pub const CHANNEL_CONTROL_CHECK: u8 = 0x04;
    /// Interface-control check.
    pub const INTERFACE_CONTROL_CHECK: u8 = 0x02;
    /// Chaining check.
    pub const CHAINING_CHECK: u8 = 0x01;
}

/// SCSW word 0 (command mode).
#[bitfield(u32, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct ScswFlags {
    /// Subchannel key, bits 0-3.
    #[bits(4)]
    pub key: u8,
    /// Suspend control (S), bit 4.
    pub suspend: bool,
    /// ESW format (L), bit 5.
    pub esw_format: bool,
    /// Deferred condition code, bits 6-7.
    #[bits(2)]
    pub deferred_cc: u8,
    /// CCW format (F), bit 8.
    pub format1: bool,
    /// Prefetch (P), bit 9.
    pub prefetch: bool,
    /// Initial-status-interruption control (I), bit 10.
    pub initial_status_interrupt: bool,
    /// Address-limit-checking control (A), bit 11.
    pub address_limit_checking: bool,
    /// Suppress-suspended interruption (U), bit 12.
    pub suppress_suspended_interrupt: bool,
    /// Zero condition code (Z), bit 13.
    pub zero_cc: bool,
    /// Extended control (E), bit 14.
    pub extended_control: bool,
    /// Path not operational (N), bit 15.
    pub path_not_operational: bool,
    /// Reserved, bit 16 (in transport mode: the format flag).
    pub reserved: bool,
    /// Function control, bits 17-19 (see [`fctl`]).
    #[bits(3)]
    pub fctl: u8,
    /// Activity control, bits 20-26 (see [`actl`]).
    #[bits(7)]
    pub actl: u8,
    /// Status control, bits 27-31 (see [`stctl`]).
    #[bits(5)]
    pub stctl: u8,
}

impl ScswFlags {
    /// The word-0 bits a channel copies from the ORB that started the program (key, suspend
    /// control, format, prefetch, initial-status, address-limit and suppress-suspended).
    pub fn from_orb(c: &crate::orb::OrbControls) -> Self {
        ScswFlags::new()
            .with_key(c.key())
            .with_suspend(c.suspend())
            .with_format1(c.format1())
            .with_prefetch(c.prefetch())
            .with_initial_status_interrupt(c.initial_status_interrupt())
            .with_address_limit_checking(c.address_limit_checking())
            .with_suppress_suspended_interrupt(c.suppress_suspended_interrupt())
    }
}

/// A command-mode SCSW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scsw {
    /// Word 0.
    pub flags: ScswFlags,
    /// CCW address: the CCW after the last one executed (or as the status defines).
    pub cpa: u32,
    /// Device status (see [`dstat`]).
    pub dstat: u8,
    /// Subchannel status (see [`cstat`]).
    pub cstat: u8,
    /// Residual byte count of the last CCW executed.
    pub count: u16,
}

impl Scsw {
    /// Decodes the 12-byte big-endian image.
    pub fn from_bytes(b: &[u8; SCSW_SIZE]) -> Self {
        Scsw {
            flags: ScswFlags::from_bits(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            cpa: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            dstat: b[8],
            cstat: b[9],
            count: u16::from_be_bytes([b[10], b[11]]),
        }
    }

    /// Encodes the 12-byte big-endian image.
    pub fn to_bytes(&self) -> [u8; SCSW_SIZE] {
        let mut b = [0u8; SCSW_SIZE];
        b[0..4].copy_from_slice(&self.flags.into_bits().to_be_bytes());
        b[4..8].copy_from_slice(&self.cpa.to_be_bytes());
        b[8] = self.dstat;
        b[9] = self.cstat;
        b[10..12].copy_from_slice(&self.count.to_be_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_function_word() {
        // What a client writes to request a start: word 0 = 0x00004000.
        let s = Scsw {
            flags: ScswFlags::new().with_fctl(fctl::START),
            ..Default::default()
        };
        assert_eq!(s.to_bytes(), [0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn every_flag_bit() {
        // Bit n (PoP numbering) of word 0 is 1 << (31 - n).
        let bit = |n: u32| 1u32 << (31 - n);
        let cases: [(ScswFlags, u32); 16] = [
            (ScswFlags::new().with_key(0xF), 0xF000_0000),
            (ScswFlags::new().with_suspend(true), bit(4)),
            (ScswFlags::new().with_esw_format(true), bit(5)),
            (ScswFlags::new().with_deferred_cc(3), 0x0300_0000),
            (ScswFlags::new().with_format1(true), bit(8)),
            (ScswFlags::new().with_prefetch(true), bit(9)),
            (
                ScswFlags::new().with_initial_status_interrupt(true),
                bit(10),
            ),
            (ScswFlags::new().with_address_limit_checking(true), bit(11)),
            (
                ScswFlags::new().with_suppress_suspended_interrupt(true),
                bit(12),
            ),
            (ScswFlags::new().with_zero_cc(true), bit(13)),
            (ScswFlags::new().with_extended_control(true), bit(14)),
            (ScswFlags::new().with_path_not_operational(true), bit(15)),
            (ScswFlags::new().with_reserved(true), bit(16)),
            (ScswFlags::new().with_fctl(0x7), 0x0000_7000),
            (ScswFlags::new().with_actl(0x7f), 0x0000_0FE0),
            (ScswFlags::new().with_stctl(0x1f), 0x0000_001F),
        ];
        for (f, v) in cases {
            assert_eq!(f.into_bits(), v, "{f:?}");
        }
        // The named control values sit where QEMU's masks put them.
        let w = |f: ScswFlags| f.into_bits() & 0xFFFF;
        assert_eq!(w(ScswFlags::new().with_fctl(fctl::HALT)), 0x2000);
        assert_eq!(w(ScswFlags::new().with_actl(actl::SUSPENDED)), 0x0020);
        assert_eq!(w(ScswFlags::new().with_actl(actl::RESUME_PENDING)), 0x0800);
        assert_eq!(w(ScswFlags::new().with_stctl(stctl::ALERT)), 0x0010);
    }

    #[test]
    fn every_field_position() {
        let b = [
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C,
        ];
        let s = Scsw::from_bytes(&b);
        assert_eq!(s.flags.into_bits(), 0x0102_0304);
        assert_eq!(s.cpa, 0x0506_0708);
        assert_eq!((s.dstat, s.cstat, s.count), (0x09, 0x0A, 0x0B0C));
        assert_eq!(s.to_bytes(), b);
    }

    #[test]
    fn final_status_bytes() {
        // The reference probe's result: CE+DE, residual 0, CPA 0x00200010, start function,
        // primary+secondary+status pending, format 1 and prefetch.
        let b = [
            0x00, 0xC0, 0x40, 0x07, 0x00, 0x20, 0x00, 0x10, 0x0C, 0x00, 0x00, 0x00,
        ];
        let s = Scsw::from_bytes(&b);
        assert!(s.flags.format1() && s.flags.prefetch());
        assert_eq!(s.flags.fctl(), fctl::START);
        assert_eq!(s.flags.actl(), 0);
        assert_eq!(
            s.flags.stctl(),
            stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING
        );
        assert_eq!(s.cpa, 0x0020_0010);
        assert_eq!(s.dstat, dstat::CHANNEL_END | dstat::DEVICE_END);
        assert_eq!(s.to_bytes(), b);
    }
}
