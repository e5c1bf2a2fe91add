//! The interruption-response block (IRB, 96 bytes): SCSW, ESW, ECW and EMW, as TSCH stores
//! it and as the vfio-ccw I/O region's `irb_area` carries it.

use super::esw::{Erw, Esw, ESW_SIZE};
use super::scsw::{Scsw, SCSW_SIZE};

/// Size of the IRB image.
pub const IRB_SIZE: usize = 96;
/// Size of the extended-control word (ECW): model-dependent data, or concurrent-sense bytes.
pub const ECW_SIZE: usize = 32;
/// Size of the extended-measurement word (EMW).
pub const EMW_SIZE: usize = 32;

const ESW_OFFSET: usize = SCSW_SIZE;
const ECW_OFFSET: usize = ESW_OFFSET + ESW_SIZE;
const EMW_OFFSET: usize = ECW_OFFSET + ECW_SIZE;

/// An interruption-response block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Irb {
    /// Subchannel-status word (bytes 0-11).
    pub scsw: Scsw,
    /// Extended-status word (bytes 12-31).
    pub esw: Esw,
    /// Extended-control word (bytes 32-63): with concurrent sense, the sense bytes.
    pub ecw: [u8; ECW_SIZE],
    /// Extended-measurement word (bytes 64-95).
    pub emw: [u8; EMW_SIZE],
}

impl Irb {
    /// An IRB carrying `scsw`, a format-1 ESW naming `lpum` as the last path used (zero ERW),
    /// and zero ECW and EMW: what a channel stores for status without logout or sense.
    pub fn new(scsw: Scsw, lpum: u8) -> Self {
        Irb {
            scsw,
            esw: Esw::format1(lpum, Erw::new()),
            ecw: [0; ECW_SIZE],
            emw: [0; EMW_SIZE],
        }
    }

    /// Adds concurrent sense: copies `sense` (at most 32 bytes; more are dropped) into the
    /// ECW, sets ERW `cons` and `scnt` to the count stored, and the SCSW extended-control bit
    /// (E) that makes the ECW meaningful. An empty `sense` leaves the IRB unchanged.
    ///
    /// The SCSW L bit is left as the caller set it: concurrent sense fits a format-1 ESW.
    pub fn with_concurrent_sense(mut self, sense: &[u8]) -> Self {
        let n = sense.len().min(ECW_SIZE);
        if n == 0 {
            return self;
        }
        self.ecw = [0; ECW_SIZE];
        self.ecw[..n].copy_from_slice(&sense[..n]);
        // n <= 32 fits the 6-bit field.
        self.esw.erw = self.esw.erw.with_cons(true).with_scnt(n as u8);
        self.scsw.flags.set_extended_control(true);
        self
    }

    /// The concurrent-sense bytes, when the ERW says the ECW holds them (`cons`); the count
    /// is clamped to the ECW size so a hostile `scnt` cannot reach past it.
    pub fn concurrent_sense(&self) -> Option<&[u8]> {
        if !self.esw.erw.cons() {
            return None;
        }
        let n = usize::from(self.esw.erw.scnt()).min(ECW_SIZE);
        Some(&self.ecw[..n])
    }

    /// Decodes the 96-byte big-endian image.
    pub fn from_bytes(b: &[u8; IRB_SIZE]) -> Self {
        let mut scsw = [0u8; SCSW_SIZE];
        scsw.copy_from_slice(&b[..ESW_OFFSET]);
        let mut esw = [0u8; ESW_SIZE];
        esw.copy_from_slice(&b[ESW_OFFSET..ECW_OFFSET]);
        let mut ecw = [0u8; ECW_SIZE];
        ecw.copy_from_slice(&b[ECW_OFFSET..EMW_OFFSET]);
        let mut emw = [0u8; EMW_SIZE];
        emw.copy_from_slice(&b[EMW_OFFSET..]);
        Irb {
            scsw: Scsw::from_bytes(&scsw),
            esw: Esw::from_bytes(&esw),
            ecw,
            emw,
        }
    }

    /// Encodes the 96-byte big-endian image.
    pub fn to_bytes(&self) -> [u8; IRB_SIZE] {
        let mut b = [0u8; IRB_SIZE];
        b[..ESW_OFFSET].copy_from_slice(&self.scsw.to_bytes());
        b[ESW_OFFSET..ECW_OFFSET].copy_from_slice(&self.esw.to_bytes());
        b[ECW_OFFSET..EMW_OFFSET].copy_from_slice(&self.ecw);
        b[EMW_OFFSET..].copy_from_slice(&self.emw);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orb::scsw::{dstat, fctl, stctl, ScswFlags};

    fn final_scsw(ds: u8) -> Scsw {
        Scsw {
            flags: ScswFlags::new()
                .with_format1(true)
                .with_prefetch(true)
                .with_fctl(fctl::START)
                .with_stctl(stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING),
            cpa: 0x0020_0010,
            dstat: ds,
            cstat: 0,
            count: 0,
        }
    }

    #[test]
    fn final_status_bytes() {
        let irb = Irb::new(final_scsw(dstat::CHANNEL_END | dstat::DEVICE_END), 0x80);
        let mut want = [0u8; IRB_SIZE];
        want[..12].copy_from_slice(&[
            0x00, 0xC0, 0x40, 0x07, 0x00, 0x20, 0x00, 0x10, 0x0C, 0x00, 0x00, 0x00,
        ]);
        want[13] = 0x80; // ESW byte 1: LPUM
        assert_eq!(irb.to_bytes(), want);
        assert_eq!(Irb::from_bytes(&want), irb);
        assert_eq!(irb.concurrent_sense(), None);
    }

    #[test]
    fn concurrent_sense_bytes() {
        // Unit check with 24 sense bytes (a 3390's sense: byte 0 = 0x10 command reject).
        let mut sense = [0u8; 24];
        sense[0] = 0x10;
        sense[23] = 0xAB;
        let mut scsw = final_scsw(dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_CHECK);
        scsw.flags.set_stctl(scsw.flags.stctl() | stctl::ALERT);
        let irb = Irb::new(scsw, 0x80).with_concurrent_sense(&sense);
        let b = irb.to_bytes();
        // SCSW word 0: E (bit 14) now set; stctl alert+primary+secondary+pending.
        assert_eq!(&b[0..4], &[0x00, 0xC2, 0x40, 0x17]);
        assert_eq!(b[8], 0x0E);
        // ESW: LPUM, then ERW byte 0 = S (bit 7), byte 1 = SCNT 24.
        assert_eq!(
            &b[12..20],
            &[0x00, 0x80, 0x00, 0x00, 0x01, 0x18, 0x00, 0x00]
        );
        assert_eq!(&b[32..56], &sense);
        assert!(b[56..].iter().all(|&x| x == 0));
        let d = Irb::from_bytes(&b);
        assert_eq!(d, irb);
        assert_eq!(d.concurrent_sense(), Some(&sense[..]));
    }

    #[test]
    fn concurrent_sense_clamps() {
        let long = [0x5Au8; 40];
        let irb = Irb::new(Scsw::default(), 0).with_concurrent_sense(&long);
        assert_eq!(irb.esw.erw.scnt(), 32);
        assert_eq!(irb.ecw, [0x5A; 32]);
        assert_eq!(
            Irb::new(Scsw::default(), 0)
                .with_concurrent_sense(&[])
                .esw
                .erw,
            Erw::new()
        );
        // A hostile scnt of 63 yields at most the 32 ECW bytes.
        let mut b = [0u8; IRB_SIZE];
        b[16] = 0x01;
        b[17] = 0x3F;
        assert_eq!(
            Irb::from_bytes(&b).concurrent_sense().map(<[u8]>::len),
            Some(32)
        );
    }

    #[test]
    fn round_trip_every_byte() {
        let mut b = [0u8; IRB_SIZE];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37).wrapping_add(1);
        }
        let irb = Irb::from_bytes(&b);
        assert_eq!(irb.emw[0], b[64]);
        assert_eq!(irb.ecw[31], b[63]);
        assert_eq!(irb.to_bytes(), b);
    }

    proptest::proptest! {
        #[test]
        fn any_image_round_trips(v in proptest::collection::vec(proptest::prelude::any::<u8>(), IRB_SIZE)) {
            let b: [u8; IRB_SIZE] = v.try_into().unwrap();
            proptest::prop_assert_eq!(Irb::from_bytes(&b).to_bytes(), b);
        }
    }
}
