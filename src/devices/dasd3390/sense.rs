//! ECKD sense data: 32 bytes whose first 24 are the 3990 "24-byte compatibility" format
//! (byte 27 bit 0 says so), laid out as Hercules' `ckd_build_sense` does for a 3390.

/// Sense byte 0: command reject.
pub const SENSE_CR: u8 = 0x80;
/// Sense byte 0: intervention required.
pub const SENSE_IR: u8 = 0x40;
/// Sense byte 0: equipment check.
pub const SENSE_EC: u8 = 0x10;
/// Sense byte 0: data check.
pub const SENSE_DC: u8 = 0x08;
/// Sense byte 0: operation incomplete.
pub const SENSE_OC: u8 = 0x01;
/// Sense byte 1: invalid track format.
pub const SENSE1_ITF: u8 = 0x40;
/// Sense byte 1: end of cylinder.
pub const SENSE1_EOC: u8 = 0x20;
/// Sense byte 1: no record found.
pub const SENSE1_NRF: u8 = 0x08;
/// Sense byte 1: file protected.
pub const SENSE1_FP: u8 = 0x04;
/// Sense byte 1: write inhibited.
pub const SENSE1_WRI: u8 = 0x02;

/// Sense format 0: program or system checks (byte 7 high nibble).
pub const FORMAT_0: u8 = 0;
/// Sense format 1: device equipment checks.
pub const FORMAT_1: u8 = 1;
/// Sense format 4: data checks (bytes 8-12 hold the CCHHR in error).
pub const FORMAT_4: u8 = 4;

/// Format-0 message 1: invalid command.
pub const MSG_INVALID_COMMAND: u8 = 1;
/// Format-0 message 2: invalid command sequence.
pub const MSG_INVALID_SEQUENCE: u8 = 2;
/// Format-0 message 3: CCW count less than required.
pub const MSG_COUNT_TOO_SMALL: u8 = 3;
/// Format-0 message 4: invalid parameter.
pub const MSG_INVALID_PARAMETER: u8 = 4;

/// Number of sense bytes a 3990 returns.
pub const SENSE_LEN: usize = 32;

/// What the sense bytes describe besides bytes 0-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenseWhere {
    /// Cylinder the device is positioned on.
    pub cyl: u32,
    /// Head the device is positioned on.
    pub head: u32,
    /// Current record number.
    pub rec: u8,
    /// Cylinders on the volume (bytes 5-6 become 0xFF above 4095).
    pub cylinders: u32,
}

/// Builds sense bytes: 0-2 as given, 5-6 the position in 3390 layout, 7 format and message,
/// 8-12 the CCHHR for data-check formats, 27 bit 0 (24-byte compatible), 29-31 CCHH.
pub fn build(s0: u8, s1: u8, s2: u8, format: u8, message: u8, at: SenseWhere) -> [u8; SENSE_LEN] {
    let mut s = [0u8; SENSE_LEN];
    s[0] = s0;
    s[1] = s1;
    s[2] = s2;
    if at.cylinders > 4095 {
        s[5] = 0xFF;
        s[6] = 0xFF;
    } else {
        s[5] = (at.cyl & 0xFF) as u8;
        s[6] = (((at.cyl >> 8) << 4) as u8) | (at.head & 0x1F) as u8;
    }
    s[7] = (format << 4) | (message & 0x0F);
    if format == FORMAT_4 || format == 5 {
        s[8..10].copy_from_slice(&(at.cyl as u16).to_be_bytes());
        s[10..12].copy_from_slice(&(at.head as u16).to_be_bytes());
        s[12] = at.rec;
    }
    s[27] = 0x80;
    s[29..31].copy_from_slice(&(at.cyl as u16).to_be_bytes());
    s[31] = at.head as u8;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_reject_layout() {
        let at = SenseWhere {
            cyl: 0x123,
            head: 14,
            rec: 3,
            cylinders: 3339,
        };
        let s = build(SENSE_CR, 0, 0, FORMAT_0, MSG_INVALID_SEQUENCE, at);
        let mut want = [0u8; 32];
        want[0] = 0x80;
        want[5] = 0x23;
        want[6] = 0x1E;
        want[7] = 0x02;
        want[27] = 0x80;
        want[29] = 0x01;
        want[30] = 0x23;
        want[31] = 14;
        assert_eq!(s, want);
    }

    #[test]
    fn data_check_carries_cchhr_and_big_volumes_hide_position() {
        let at = SenseWhere {
            cyl: 5000,
            head: 2,
            rec: 7,
            cylinders: 10017,
        };
        let s = build(SENSE_DC, 0, 0, FORMAT_4, 0, at);
        assert_eq!(s[0], 0x08);
        assert_eq!(&s[5..8], &[0xFF, 0xFF, 0x40]);
        assert_eq!(&s[8..13], &[0x13, 0x88, 0x00, 0x02, 0x07]);
        assert_eq!(&s[29..32], &[0x13, 0x88, 0x02]);
    }
}
