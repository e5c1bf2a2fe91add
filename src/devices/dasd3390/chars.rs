//! What a 3390 on a 3990-6 control unit reports about itself: Sense ID, Read Device
//! Characteristics and Read Configuration Data, with the values Hercules uses (`dasdtab.c`
//! rows "3990-6" and "3390-n").

use crate::image::ckd::ebcdic_label;

/// Control-unit type.
pub const CU_TYPE: u16 = 0x3990;
/// Control-unit model (3990-6, enhanced mode; bits 0-1 set = ECKD commands available).
pub const CU_MODEL: u8 = 0xE9;
/// Device type.
pub const DEV_TYPE: u16 = 0x3390;
/// Maximum R0 data length of a 3390 (RDC bytes 44-45).
pub const R0_MAX: u16 = 57326;
/// Sectors per track (Locate Record sector numbers are below this, or 0xFF).
pub const SECTORS: u8 = 224;

/// The CIWs of the Sense ID answer (3990-6 row): RCD 0xFA (256 bytes), SII 0x27 (4 bytes),
/// RNI 0x3E (96 bytes).
pub const CIWS: [u32; 3] = [0x40FA_0100, 0x4127_0004, 0x423E_0060];

/// The device model byte Hercules picks for a volume of `cylinders` cylinders: the first
/// 3390 model (1, 2, 3, 9) whose primary plus alternate cylinders hold it.
pub fn model_for(cylinders: u32) -> u8 {
    match cylinders {
        0..=1114 => 0x02,
        1115..=2227 => 0x06,
        2228..=3340 => 0x0A,
        _ => 0x0C,
    }
}

/// The Sense ID answer: FF, CU type/model, device type/model, 0, then the CIWs (20 bytes).
pub fn sense_id(dev_model: u8) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0] = 0xFF;
    b[1..3].copy_from_slice(&CU_TYPE.to_be_bytes());
    b[3] = CU_MODEL;
    b[4..6].copy_from_slice(&DEV_TYPE.to_be_bytes());
    b[6] = dev_model;
    for (i, c) in CIWS.iter().enumerate() {
        b[8 + 4 * i..12 + 4 * i].copy_from_slice(&c.to_be_bytes());
    }
    b
}

/// The 64 Read Device Characteristics bytes, as Hercules' `dasd_build_ckd_devchar` builds
/// them for a 3390 on a 3990-6, except byte 6 also has bit 6 (Prefix supported) since this
/// model implements Prefix.
pub fn device_characteristics(dev_model: u8, cylinders: u32) -> [u8; 64] {
    let mut d = [0u8; 64];
    d[0..2].copy_from_slice(&CU_TYPE.to_be_bytes());
    d[2] = CU_MODEL;
    d[3..5].copy_from_slice(&DEV_TYPE.to_be_bytes());
    d[5] = dev_model;
    // Facilities: 3990-6 row 0x50001096, plus Prefix (byte 6 bit 6).
    d[6..10].copy_from_slice(&0x5200_1096u32.to_be_bytes());
    d[10] = 0x20; // device class: DASD
    d[11] = 0x26; // device type code (3390)
    let primary = cylinders.min(0xFFFF) as u16;
    d[12..14].copy_from_slice(&primary.to_be_bytes());
    d[14..16].copy_from_slice(&15u16.to_be_bytes()); // tracks per cylinder
    d[16] = SECTORS;
    d[18..20].copy_from_slice(&58786u16.to_be_bytes()); // track length
    d[20..22].copy_from_slice(&1428u16.to_be_bytes()); // HA + R0 length
    d[22] = 2; // track capacity formula 2: factors 34, 19, 9, 6, 116
    d[23..28].copy_from_slice(&[34, 19, 9, 6, 116]);
    d[40] = 0x26; // MDR record id
    d[41] = 0x26; // OBR record id
    d[42] = 0x15; // CU type code (3990-6)
    d[43] = 0x02; // parameter length
    d[44..46].copy_from_slice(&R0_MAX.to_be_bytes());
    d[47] = 0x01; // track set
    d[48] = 6; // F6
    d[49..51].copy_from_slice(&0x7708u16.to_be_bytes()); // RPS factor
    d[51] = 0x0F; // feature buffer lower limit (3990-6)
    d[53] = 0x7F; // feature buffer upper limit
    d[54] = 0x40; // CU functions/features
    d[57] = 0xFF; // real device type: disk array (no alternate tracks)
    d[60..64].copy_from_slice(&cylinders.to_be_bytes());
    d
}

/// The 256 Read Configuration Data bytes (four NEDs and a NEQ) as Hercules builds them.
/// `serial` is the 12-character volume serial number (ASCII), `devnum` the device number.
pub fn configuration_data(dev_model: u8, serial: &[u8; 12], devnum: u16) -> [u8; 256] {
    let mut b = [0u8; 256];
    // NED 1: the device. Non-alphanumerics in the token become '0' (as Hercules does).
    b[0..4].copy_from_slice(&0xDC01_0100u32.to_be_bytes());
    let mut tok = format!("  {:04X}0{:02X}HRCZZ", DEV_TYPE, dev_model).into_bytes();
    tok.extend_from_slice(serial);
    let tok: String = tok
        .iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() {
                c as char
            } else {
                '0'
            }
        })
        .collect();
    b[4..30].copy_from_slice(&ebcdic_label(&tok));
    b[30..32].copy_from_slice(&devnum.to_be_bytes());
    // NED 2: the string.
    b[32..36].copy_from_slice(&0xD402_0000u32.to_be_bytes());
    let s = format!("  {:04X}0{:02X}HRCZZ000000000003", DEV_TYPE, dev_model);
    b[36..62].copy_from_slice(&ebcdic_label(&s));
    // NED 3: the storage director.
    b[64..68].copy_from_slice(&0xD000_0000u32.to_be_bytes());
    let s = format!("  {:04X}0{:02X}HRCZZ000000000002", CU_TYPE, CU_MODEL);
    b[68..94].copy_from_slice(&ebcdic_label(&s));
    b[95] = (devnum >> 8) as u8;
    // NED 4: the subsystem.
    b[96..100].copy_from_slice(&0xF000_0001u32.to_be_bytes());
    let s = format!("  {:04X}   HRCZZ000000000001", CU_TYPE);
    b[100..126].copy_from_slice(&ebcdic_label(&s));
    // NEQ.
    let ssid = devnum & 0xFF00;
    let ifid = (ssid >> 8) & 0x7;
    b[224] = 0x80;
    b[226..228].copy_from_slice(&ifid.to_be_bytes());
    b[230] = 0x1E;
    b[232..234].copy_from_slice(&ssid.to_be_bytes());
    b[234] = 0x80;
    b[235] = devnum as u8;
    b[236] = devnum as u8;
    b[237] = devnum as u8;
    b[238] = b[227];
    b[241] = 0x80;
    b[242] = 0x80;
    b[243] = devnum as u8;
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_id_bytes() {
        assert_eq!(
            sense_id(0x0C),
            [
                0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90, 0x0C, 0x00, 0x40, 0xFA, 0x01, 0x00, 0x41, 0x27,
                0x00, 0x04, 0x42, 0x3E, 0x00, 0x60
            ]
        );
    }

    #[test]
    fn models_follow_hercules_table() {
        assert_eq!(model_for(3), 0x02);
        assert_eq!(model_for(1113), 0x02);
        assert_eq!(model_for(2226), 0x06);
        assert_eq!(model_for(3339), 0x0A);
        assert_eq!(model_for(10017), 0x0C);
    }

    #[test]
    fn rdc_bytes() {
        let d = device_characteristics(0x02, 3);
        let want: [u8; 64] = [
            0x39, 0x90, 0xE9, 0x33, 0x90, 0x02, 0x52, 0x00, 0x10, 0x96, 0x20, 0x26, 0x00, 0x03,
            0x00, 0x0F, 0xE0, 0x00, 0xE5, 0xA2, 0x05, 0x94, 0x02, 0x22, 0x13, 0x09, 0x06, 0x74, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x26, 0x26, 0x15, 0x02, 0xDF, 0xEE, 0x00, 0x01, 0x06,
            0x77, 0x08, 0x0F, 0x00, 0x7F, 0x40, 0x00, 0x00, 0xFF, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x03,
        ];
        assert_eq!(d, want);
    }

    #[test]
    fn rcd_neds() {
        let b = configuration_data(0x02, b"000000000000", 0x0190);
        assert_eq!(&b[0..4], &[0xDC, 0x01, 0x01, 0x00]);
        // "  3390002HRCZZ" with blanks as '0': F0 F0 F3 F3 F9 F0 F0 F0 F2 C8 D9 C3 E9 E9
        assert_eq!(
            &b[4..18],
            &[0xF0, 0xF0, 0xF3, 0xF3, 0xF9, 0xF0, 0xF0, 0xF0, 0xF2, 0xC8, 0xD9, 0xC3, 0xE9, 0xE9]
        );
        assert_eq!(&b[30..32], &[0x01, 0x90]);
        assert_eq!(&b[36..38], &[0x40, 0x40]);
        assert_eq!(&b[68..77], &ebcdic_label("  39900E9")[..]);
        assert_eq!(b[95], 0x01);
        assert_eq!(
            &b[224..244],
            &[
                0x80, 0, 0x00, 0x01, 0, 0, 0x1E, 0, 0x01, 0x00, 0x80, 0x90, 0x90, 0x90, 0x01, 0, 0,
                0x80, 0x80, 0x90
            ]
        );
    }
}
