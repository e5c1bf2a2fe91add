//! Modified indirect-data-address words (MIDAWs, 16 bytes each).
//!
//! Bits 0-39 are reserved, 40-47 are flags, 48-63 the count, 64-127 the data address.

use bitfield_struct::bitfield;

/// Size in bytes of one MIDAW; a MIDAL must be quadword aligned.
pub const MIDAW_SIZE: u64 = 16;

/// The MIDAW flag byte.
#[bitfield(u8, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct MidawFlags {
    /// Last MIDAW of the list.
    pub last: bool,
    /// Skip: transfer no data to storage for this MIDAW.
    pub skip: bool,
    /// Data-transfer interruption control.
    pub dtic: bool,
    /// Reserved: must be zero.
    #[bits(5)]
    pub reserved: u8,
}

/// One MIDAW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Midaw {
    /// Reserved bits 0-39 (must be zero).
    pub reserved: u64,
    /// Flags.
    pub flags: MidawFlags,
    /// Byte count (zero is invalid).
    pub count: u16,
    /// 64-bit data address.
    pub data: u64,
}

impl Midaw {
    /// Decodes the 16-byte big-endian image.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        let mut hi = [0u8; 8];
        hi.copy_from_slice(&b[..8]);
        let w0 = u64::from_be_bytes(hi);
        let mut lo = [0u8; 8];
        lo.copy_from_slice(&b[8..]);
        Midaw {
            reserved: w0 >> 24,
            flags: MidawFlags::from_bits((w0 >> 16) as u8),
            count: w0 as u16,
            data: u64::from_be_bytes(lo),
        }
    }

    /// Encodes the 16-byte big-endian image.
    pub fn to_bytes(self) -> [u8; 16] {
        let w0 = (self.reserved & 0xff_ffff_ffff) << 24
            | (self.flags.into_bits() as u64) << 16
            | self.count as u64;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&w0.to_be_bytes());
        b[8..].copy_from_slice(&self.data.to_be_bytes());
        b
    }

    /// Whether the reserved fields are zero, as the channel requires.
    pub fn reserved_ok(&self) -> bool {
        self.reserved == 0 && self.flags.reserved() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        let b = [
            0, 0, 0, 0, 0, 0xC0, 0x02, 0x00, 0, 0, 0, 0x01, 0x23, 0x45, 0x60, 0x00,
        ];
        let m = Midaw::from_bytes(b);
        assert!(m.flags.last() && m.flags.skip() && !m.flags.dtic());
        assert_eq!(m.count, 0x200);
        assert_eq!(m.data, 0x1_2345_6000);
        assert!(m.reserved_ok());
        assert_eq!(m.to_bytes(), b);
        let mut r = b;
        r[0] = 1;
        assert!(!Midaw::from_bytes(r).reserved_ok());
        let mut r = b;
        r[5] = 0x81;
        assert!(!Midaw::from_bytes(r).reserved_ok());
        assert_eq!(Midaw::from_bytes(r).to_bytes(), r);
    }
}
