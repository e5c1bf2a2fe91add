//! The extended-status word (ESW, 20 bytes) of an IRB.
//!
//! Which format an ESW has follows from the SCSW it comes with (format 0 when the SCSW's
//! L bit is one: it carries a subchannel logout; formats 1-3 otherwise), so [`Esw`] keeps the
//! five words as they are and offers views: the format-0 fields, and the fields common to
//! formats 1-3 (LPUM, the format-2 device-connect-time interval). The extended-report word
//! ([`Erw`]) sits in word 1 in every format.

use bitfield_struct::bitfield;

/// Size of the ESW image.
pub const ESW_SIZE: usize = 20;

/// Word 0 of a format-0 ESW: the subchannel logout (bit 0 = most significant).
#[bitfield(u32, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct SubchannelLogout {
    /// Reserved, bit 0.
    pub reserved: bool,
    /// Extended-status flags (ESF), bits 1-7.
    #[bits(7)]
    pub extended_status_flags: u8,
    /// Last-path-used mask (LPUM), bits 8-15.
    #[bits(8)]
    pub lpum: u8,
    /// Ancillary report (A), bit 16.
    pub ancillary_report: bool,
    /// Field-validity flags (FVF), bits 17-21.
    #[bits(5)]
    pub field_validity: u8,
    /// Storage-access code (SA), bits 22-23.
    #[bits(2)]
    pub storage_access: u8,
    /// Termination code (TC), bits 24-25.
    #[bits(2)]
    pub termination_code: u8,
    /// Device-status check (D), bit 26.
    pub device_status_check: bool,
    /// Secondary error (E), bit 27.
    pub secondary_error: bool,
    /// I/O-error alert (A), bit 28.
    pub io_error_alert: bool,
    /// Sequence code (SC), bits 29-31.
    #[bits(3)]
    pub sequence_code: u8,
}

/// ESW word 1: the extended-report word (field names as in the Linux `struct erw`).
#[bitfield(u32, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct Erw {
    /// Reserved, bits 0-2.
    #[bits(3)]
    pub reserved0: u8,
    /// Authorization check (A), bit 3.
    pub auth: bool,
    /// Path-verification required (P), bit 4.
    pub pvrf: bool,
    /// Channel-path timeout (T), bit 5.
    pub cpt: bool,
    /// Failing-storage-address validity (F), bit 6.
    pub fsavf: bool,
    /// Concurrent sense (S), bit 7: the ECW holds `scnt` sense bytes.
    pub cons: bool,
    /// Secondary-CCW-address validity (C), bit 8.
    pub scavf: bool,
    /// Failing-storage-address format (R), bit 9: one = 64-bit address in words 2-3.
    pub fsaf: bool,
    /// Sense-data count (SCNT), bits 10-15, meaningful when `cons` is one.
    #[bits(6)]
    pub scnt: u8,
    /// Reserved, bits 16-31.
    #[bits(16)]
    pub reserved16: u16,
}

/// An extended-status word, as its five big-endian words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Esw {
    /// Word 0: the subchannel logout (format 0) or `0x00, LPUM, halfword` (formats 1-3).
    pub word0: u32,
    /// Word 1: the extended-report word.
    pub erw: Erw,
    /// Words 2-4: failing-storage address and secondary-CCW address (format 0), else zeros.
    pub words: [u32; 3],
}

impl Esw {
    /// Decodes the 20-byte big-endian image.
    pub fn from_bytes(b: &[u8; ESW_SIZE]) -> Self {
        let w = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Esw {
            word0: w(0),
            erw: Erw::from_bits(w(4)),
            words: [w(8), w(12), w(16)],
        }
    }

    /// Encodes the 20-byte big-endian image.
    pub fn to_bytes(&self) -> [u8; ESW_SIZE] {
        let mut b = [0u8; ESW_SIZE];
        b[0..4].copy_from_slice(&self.word0.to_be_bytes());
        b[4..8].copy_from_slice(&self.erw.into_bits().to_be_bytes());
        for (i, w) in self.words.iter().enumerate() {
            b[8 + 4 * i..12 + 4 * i].copy_from_slice(&w.to_be_bytes());
        }
        b
    }

    /// A format-0 ESW: subchannel logout, ERW, failing-storage address (words 2-3) and
    /// secondary-CCW address (word 4).
    pub fn format0(sublog: SubchannelLogout, erw: Erw, faddr: u64, saddr: u32) -> Self {
        Esw {
            word0: sublog.into_bits(),
            erw,
            // Split explicitly: word 2 is the high half of the 64-bit address.
            words: [(faddr >> 32) as u32, faddr as u32, saddr],
        }
    }

    /// A format-1 ESW (what a channel stores for non-alert status): LPUM in byte 1 and the ERW.
    pub fn format1(lpum: u8, erw: Erw) -> Self {
        Esw {
            word0: u32::from(lpum) << 16,
            erw,
            words: [0; 3],
        }
    }

    /// Word 0 read as a format-0 subchannel logout.
    pub fn sublog(&self) -> SubchannelLogout {
        SubchannelLogout::from_bits(self.word0)
    }

    /// The last-path-used mask: byte 1 of word 0 in every format.
    pub fn lpum(&self) -> u8 {
        (self.word0 >> 16) as u8
    }

    /// The device-connect-time interval of a format-2 ESW (bytes 2-3 of word 0).
    pub fn dcti(&self) -> u16 {
        self.word0 as u16
    }

    /// Words 2-3 as one 64-bit value: the format-0 failing-storage address field.
    pub fn failing_storage_field(&self) -> u64 {
        (u64::from(self.words[0]) << 32) | u64::from(self.words[1])
    }

    /// The format-0 failing-storage address, if the ERW marks it valid (F): a 64-bit address
    /// in words 2-3 when the ERW's R bit is one, else a 31-bit address in word 2.
    pub fn failing_storage_address(&self) -> Option<u64> {
        if !self.erw.fsavf() {
            return None;
        }
        Some(if self.erw.fsaf() {
            self.failing_storage_field()
        } else {
            u64::from(self.words[0] & 0x7fff_ffff)
        })
    }

    /// The format-0 secondary-CCW address (word 4), if the ERW marks it valid (C).
    pub fn secondary_ccw_address(&self) -> Option<u32> {
        self.erw.scavf().then_some(self.words[2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn bit(n: u32) -> u32 {
        1 << (31 - n)
    }

    #[test]
    fn every_erw_bit() {
        let cases: [(Erw, u32); 10] = [
            (Erw::new().with_reserved0(0x7), 0xE000_0000),
            (Erw::new().with_auth(true), bit(3)),
            (Erw::new().with_pvrf(true), bit(4)),
            (Erw::new().with_cpt(true), bit(5)),
            (Erw::new().with_fsavf(true), bit(6)),
            (Erw::new().with_cons(true), bit(7)),
            (Erw::new().with_scavf(true), bit(8)),
            (Erw::new().with_fsaf(true), bit(9)),
            (Erw::new().with_scnt(0x3f), 0x003F_0000),
            (Erw::new().with_reserved16(0xffff), 0x0000_FFFF),
        ];
        for (e, v) in cases {
            assert_eq!(e.into_bits(), v, "{e:?}");
        }
        // Concurrent sense of 32 bytes: byte 0 = 0x01 (S), byte 1 = 0x20 (SCNT 32).
        let e = Erw::new().with_cons(true).with_scnt(32);
        assert_eq!(e.into_bits().to_be_bytes(), [0x01, 0x20, 0x00, 0x00]);
    }

    #[test]
    fn every_sublog_bit() {
        let cases: [(SubchannelLogout, u32); 12] = [
            (SubchannelLogout::new().with_reserved(true), bit(0)),
            (
                SubchannelLogout::new().with_extended_status_flags(0x7f),
                0x7F00_0000,
            ),
            (SubchannelLogout::new().with_lpum(0x80), 0x0080_0000),
            (SubchannelLogout::new().with_ancillary_report(true), bit(16)),
            (
                SubchannelLogout::new().with_field_validity(0x1f),
                0x0000_7C00,
            ),
            (SubchannelLogout::new().with_storage_access(3), 0x0000_0300),
            (
                SubchannelLogout::new().with_termination_code(2),
                0x0000_0080,
            ),
            (
                SubchannelLogout::new().with_device_status_check(true),
                bit(26),
            ),
            (SubchannelLogout::new().with_secondary_error(true), bit(27)),
            (SubchannelLogout::new().with_io_error_alert(true), bit(28)),
            (SubchannelLogout::new().with_sequence_code(7), 0x0000_0007),
            (
                SubchannelLogout::new().with_termination_code(1),
                0x0000_0040,
            ),
        ];
        for (s, v) in cases {
            assert_eq!(s.into_bits(), v, "{s:?}");
        }
    }

    #[test]
    fn format0_bytes() {
        // Logout: LPUM 0x40, FVF all valid, TC 01, sequence code 3; ERW: F, C and R set;
        // failing address 0x00000001_23456780, secondary CCW 0x00201000.
        let sublog = SubchannelLogout::new()
            .with_lpum(0x40)
            .with_field_validity(0x1f)
            .with_termination_code(1)
            .with_sequence_code(3);
        let erw = Erw::new().with_fsavf(true).with_scavf(true).with_fsaf(true);
        let esw = Esw::format0(sublog, erw, 0x0000_0001_2345_6780, 0x0020_1000);
        let b = [
            0x00, 0x40, 0x7C, 0x43, // sublog
            0x02, 0xC0, 0x00, 0x00, // ERW: bit 6 (F), bits 8-9 (C, R)
            0x00, 0x00, 0x00, 0x01, 0x23, 0x45, 0x67, 0x80, // failing-storage address
            0x00, 0x20, 0x10, 0x00, // secondary-CCW address
        ];
        assert_eq!(esw.to_bytes(), b);
        let d = Esw::from_bytes(&b);
        assert_eq!(d, esw);
        assert_eq!(d.sublog(), sublog);
        assert_eq!(d.lpum(), 0x40);
        assert_eq!(d.failing_storage_address(), Some(0x0000_0001_2345_6780));
        assert_eq!(d.secondary_ccw_address(), Some(0x0020_1000));
    }

    #[test]
    fn failing_address_formats() {
        // R = 0: a 31-bit address in word 2; bit 0 of word 2 is not part of it.
        let mut esw = Esw::format0(
            SubchannelLogout::new(),
            Erw::new().with_fsavf(true),
            0x8012_3456_0000_0000,
            0,
        );
        assert_eq!(esw.failing_storage_address(), Some(0x0012_3456));
        assert_eq!(esw.secondary_ccw_address(), None);
        esw.erw.set_fsavf(false);
        assert_eq!(esw.failing_storage_address(), None);
    }

    #[test]
    fn format1_and_format2_views() {
        let esw = Esw::format1(0x80, Erw::new().with_cons(true).with_scnt(24));
        let b = esw.to_bytes();
        assert_eq!(
            b,
            [0, 0x80, 0, 0, 0x01, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(Esw::from_bytes(&b).lpum(), 0x80);
        // Format 2: byte 1 LPUM, bytes 2-3 the device-connect-time interval.
        let mut f2 = [0u8; ESW_SIZE];
        f2[..4].copy_from_slice(&[0x00, 0x20, 0x12, 0x34]);
        let e2 = Esw::from_bytes(&f2);
        assert_eq!((e2.lpum(), e2.dcti()), (0x20, 0x1234));
        assert_eq!(e2.to_bytes(), f2);
    }
}
