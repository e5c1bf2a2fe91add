//! The path-management-control word (PMCW, 28 bytes) and the subchannel-information block
//! (SCHIB, 52 bytes = PMCW + SCSW + 12-byte model-dependent area), as STSCH stores and MSCH
//! takes them, and as the vfio-ccw SCHIB region carries them.

use bitfield_struct::bitfield;

use super::scsw::{Scsw, SCSW_SIZE};

/// Size of the PMCW image.
pub const PMCW_SIZE: usize = 28;
/// Size of the SCHIB image.
pub const SCHIB_SIZE: usize = 52;
/// Size of the SCHIB's model-dependent area (after the SCSW).
pub const SCHIB_MDA_SIZE: usize = 12;

/// Subchannel types (PMCW word 6 bits 8-10), as values of [`PmcwChars::subchannel_type`].
pub mod subchannel_type {
    /// I/O subchannel.
    pub const IO: u8 = 0;
    /// CHSC subchannel.
    pub const CHSC: u8 = 1;
    /// Message subchannel.
    pub const MESSAGE: u8 = 2;
    /// Asynchronous-data-mover (EADM) subchannel.
    pub const ADM: u8 = 3;
}

/// PMCW word 1, bits 0-15 (the device number, bits 16-31, is [`Pmcw::devno`]).
#[bitfield(u16, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct PmcwFlags {
    /// QDIO facility (Q), bit 0.
    pub qdio: bool,
    /// Bit 1 (W): reserved for the program's use.
    pub w: bool,
    /// Interruption subclass (ISC), bits 2-4.
    #[bits(3)]
    pub isc: u8,
    /// Reserved, bits 5-7 (must be zero).
    #[bits(3)]
    pub reserved: u8,
    /// Enabled (E), bit 8: the subchannel accepts I/O.
    pub enabled: bool,
    /// Limit mode (LM), bits 9-10.
    #[bits(2)]
    pub limit_mode: u8,
    /// Measurement-mode enable (MM), bits 11-12.
    #[bits(2)]
    pub measurement_mode: u8,
    /// Multipath mode (D), bit 13.
    pub multipath: bool,
    /// Timing facility (T), bit 14.
    pub timing: bool,
    /// Device number valid (V), bit 15.
    pub devno_valid: bool,
}

/// PMCW word 6: the subchannel characteristics.
#[bitfield(u32, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct PmcwChars {
    /// Reserved, bits 0-7.
    #[bits(8)]
    pub reserved0: u8,
    /// Subchannel type (ST), bits 8-10 (see [`subchannel_type`]).
    #[bits(3)]
    pub subchannel_type: u8,
    /// Reserved, bits 11-28.
    #[bits(18)]
    pub reserved1: u32,
    /// Measurement-block-format control (F, MBFC), bit 29.
    pub measurement_block_format: bool,
    /// Extended-measurement-word-mode enable (X, XMWME), bit 30.
    pub extended_measurement_word: bool,
    /// Concurrent sense (S), bit 31: unit-check status comes with sense in the ECW.
    pub concurrent_sense: bool,
}

/// A path-management-control word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pmcw {
    /// Interruption parameter (word 0).
    pub intparm: u32,
    /// Word 1 bits 0-15.
    pub flags: PmcwFlags,
    /// Device number (word 1 bits 16-31), meaningful when `flags.devno_valid`.
    pub devno: u16,
    /// Logical-path mask (byte 8).
    pub lpm: u8,
    /// Path-not-operational mask (byte 9).
    pub pnom: u8,
    /// Last-path-used mask (byte 10).
    pub lpum: u8,
    /// Path-installed mask (byte 11).
    pub pim: u8,
    /// Measurement-block index (bytes 12-13).
    pub mbi: u16,
    /// Path-operational mask (byte 14).
    pub pom: u8,
    /// Path-available mask (byte 15).
    pub pam: u8,
    /// Channel-path identifiers 0-7 (bytes 16-23), one per PIM bit.
    pub chpid: [u8; 8],
    /// Word 6: the characteristics.
    pub chars: PmcwChars,
}

impl Pmcw {
    /// Decodes the 28-byte big-endian image.
    pub fn from_bytes(b: &[u8; PMCW_SIZE]) -> Self {
        let mut chpid = [0u8; 8];
        chpid.copy_from_slice(&b[16..24]);
        Pmcw {
            intparm: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            flags: PmcwFlags::from_bits(u16::from_be_bytes([b[4], b[5]])),
            devno: u16::from_be_bytes([b[6], b[7]]),
            lpm: b[8],
            pnom: b[9],
            lpum: b[10],
            pim: b[11],
            mbi: u16::from_be_bytes([b[12], b[13]]),
            pom: b[14],
            pam: b[15],
            chpid,
            chars: PmcwChars::from_bits(u32::from_be_bytes([b[24], b[25], b[26], b[27]])),
        }
    }

    /// Encodes the 28-byte big-endian image.
    pub fn to_bytes(&self) -> [u8; PMCW_SIZE] {
        let mut b = [0u8; PMCW_SIZE];
        b[0..4].copy_from_slice(&self.intparm.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.into_bits().to_be_bytes());
        b[6..8].copy_from_slice(&self.devno.to_be_bytes());
        b[8] = self.lpm;
        b[9] = self.pnom;
        b[10] = self.lpum;
        b[11] = self.pim;
        b[12..14].copy_from_slice(&self.mbi.to_be_bytes());
        b[14] = self.pom;
        b[15] = self.pam;
        b[16..24].copy_from_slice(&self.chpid);
        b[24..28].copy_from_slice(&self.chars.into_bits().to_be_bytes());
        b
    }
}

/// A subchannel-information block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Schib {
    /// Path-management-control word (bytes 0-27).
    pub pmcw: Pmcw,
    /// Subchannel-status word (bytes 28-39).
    pub scsw: Scsw,
    /// Model-dependent area (bytes 40-51); with the extended-measurement-block facility,
    /// bytes 0-7 are the measurement-block address (see [`Schib::measurement_block_address`]).
    pub mda: [u8; SCHIB_MDA_SIZE],
}

const SCSW_OFFSET: usize = PMCW_SIZE;
const MDA_OFFSET: usize = PMCW_SIZE + SCSW_SIZE;

impl Schib {
    /// Decodes the 52-byte big-endian image.
    pub fn from_bytes(b: &[u8; SCHIB_SIZE]) -> Self {
        let mut pmcw = [0u8; PMCW_SIZE];
        pmcw.copy_from_slice(&b[..SCSW_OFFSET]);
        let mut scsw = [0u8; SCSW_SIZE];
        scsw.copy_from_slice(&b[SCSW_OFFSET..MDA_OFFSET]);
        let mut mda = [0u8; SCHIB_MDA_SIZE];
        mda.copy_from_slice(&b[MDA_OFFSET..]);
        Schib {
            pmcw: Pmcw::from_bytes(&pmcw),
            scsw: Scsw::from_bytes(&scsw),
            mda,
        }
    }

    /// Encodes the 52-byte big-endian image.
    pub fn to_bytes(&self) -> [u8; SCHIB_SIZE] {
        let mut b = [0u8; SCHIB_SIZE];
        b[..SCSW_OFFSET].copy_from_slice(&self.pmcw.to_bytes());
        b[SCSW_OFFSET..MDA_OFFSET].copy_from_slice(&self.scsw.to_bytes());
        b[MDA_OFFSET..].copy_from_slice(&self.mda);
        b
    }

    /// Bytes 40-47 as a big-endian doubleword: the measurement-block address (QEMU's `mba`)
    /// where the extended-measurement-block facility defines it.
    pub fn measurement_block_address(&self) -> u64 {
        let mut d = [0u8; 8];
        d.copy_from_slice(&self.mda[..8]);
        u64::from_be_bytes(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SCHIB a real, idle, enabled DASD subchannel reports after Linux enabled it for
    /// ISC 3: devno 0x0005 valid, one path (PIM/PAM/POM/LPM 0x80) on CHPID 0xFE, type I/O.
    const DASD_SCHIB: [u8; SCHIB_SIZE] = [
        0x00, 0x00, 0x00, 0x00, // intparm
        0x18, 0x81, 0x00, 0x05, // ISC 3, E, V; devno 0x0005
        0x80, 0x00, 0x00, 0x80, // LPM, PNOM, LPUM, PIM
        0x00, 0x00, 0x80, 0x80, // MBI, POM, PAM
        0xFE, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // CHPIDs 0-7
        0x00, 0x00, 0x00, 0x00, // word 6: ST 0 (I/O)
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // SCSW
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // MDA
    ];

    #[test]
    fn real_dasd_schib() {
        let s = Schib::from_bytes(&DASD_SCHIB);
        let p = &s.pmcw;
        assert!(p.flags.enabled() && p.flags.devno_valid());
        assert_eq!(p.flags.isc(), 3);
        assert_eq!(p.devno, 0x0005);
        assert_eq!((p.lpm, p.pim, p.pam, p.pom), (0x80, 0x80, 0x80, 0x80));
        assert_eq!((p.pnom, p.lpum, p.mbi), (0, 0, 0));
        assert_eq!(p.chpid, [0xFE, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(p.chars.subchannel_type(), subchannel_type::IO);
        assert_eq!(s.scsw, Scsw::default());
        assert_eq!(s.measurement_block_address(), 0);

        // Built field by field, it encodes to the same 52 bytes.
        let built = Schib {
            pmcw: Pmcw {
                flags: PmcwFlags::new()
                    .with_isc(3)
                    .with_enabled(true)
                    .with_devno_valid(true),
                devno: 0x0005,
                lpm: 0x80,
                pim: 0x80,
                pom: 0x80,
                pam: 0x80,
                chpid: [0xFE, 0, 0, 0, 0, 0, 0, 0],
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(built.to_bytes(), DASD_SCHIB);
        assert_eq!(built, s);
    }

    #[test]
    fn every_pmcw_flag_bit() {
        let bit = |n: u32| 1u16 << (15 - n);
        let cases: [(PmcwFlags, u16); 11] = [
            (PmcwFlags::new().with_qdio(true), bit(0)),
            (PmcwFlags::new().with_w(true), bit(1)),
            (PmcwFlags::new().with_isc(7), 0x3800),
            (PmcwFlags::new().with_reserved(7), 0x0700),
            (PmcwFlags::new().with_enabled(true), bit(8)),
            (PmcwFlags::new().with_limit_mode(3), 0x0060),
            (PmcwFlags::new().with_measurement_mode(3), 0x0018),
            (PmcwFlags::new().with_multipath(true), bit(13)),
            (PmcwFlags::new().with_timing(true), bit(14)),
            (PmcwFlags::new().with_devno_valid(true), bit(15)),
            (PmcwFlags::new().with_isc(1), 0x0800),
        ];
        for (f, v) in cases {
            assert_eq!(f.into_bits(), v, "{f:?}");
        }
    }

    #[test]
    fn every_chars_bit() {
        let bit = |n: u32| 1u32 << (31 - n);
        let cases: [(PmcwChars, u32); 7] = [
            (PmcwChars::new().with_reserved0(0xff), 0xFF00_0000),
            (PmcwChars::new().with_subchannel_type(7), 0x00E0_0000),
            (
                PmcwChars::new().with_subchannel_type(subchannel_type::ADM),
                0x0060_0000,
            ),
            (PmcwChars::new().with_reserved1(0x3_ffff), 0x001F_FFF8),
            (
                PmcwChars::new().with_measurement_block_format(true),
                bit(29),
            ),
            (
                PmcwChars::new().with_extended_measurement_word(true),
                bit(30),
            ),
            (PmcwChars::new().with_concurrent_sense(true), bit(31)),
        ];
        for (c, v) in cases {
            assert_eq!(c.into_bits(), v, "{c:?}");
        }
    }

    #[test]
    fn every_pmcw_byte_position() {
        // Distinct values in every field land at their documented offsets.
        let p = Pmcw {
            intparm: 0x0102_0304,
            flags: PmcwFlags::from_bits(0x0506),
            devno: 0x0708,
            lpm: 0x09,
            pnom: 0x0A,
            lpum: 0x0B,
            pim: 0x0C,
            mbi: 0x0D0E,
            pom: 0x0F,
            pam: 0x10,
            chpid: [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18],
            chars: PmcwChars::from_bits(0x191A_1B1C),
        };
        let want: [u8; PMCW_SIZE] = core::array::from_fn(|i| i as u8 + 1);
        assert_eq!(p.to_bytes(), want);
        assert_eq!(Pmcw::from_bytes(&want), p);

        let mut s = [0u8; SCHIB_SIZE];
        for (i, x) in s.iter_mut().enumerate() {
            *x = 0xFF - i as u8;
        }
        let d = Schib::from_bytes(&s);
        assert_eq!(d.scsw.to_bytes()[..], s[28..40]);
        assert_eq!(d.mda[..], s[40..]);
        assert_eq!(d.measurement_block_address(), 0xD7D6_D5D4_D3D2_D1D0);
        assert_eq!(d.to_bytes(), s);
    }

    proptest::proptest! {
        #[test]
        fn any_image_round_trips(v in proptest::collection::vec(proptest::prelude::any::<u8>(), SCHIB_SIZE)) {
            let b: [u8; SCHIB_SIZE] = v.try_into().unwrap();
            proptest::prop_assert_eq!(Schib::from_bytes(&b).to_bytes(), b);
        }
    }
}
