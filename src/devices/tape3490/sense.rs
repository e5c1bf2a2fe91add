//! 3480/3490 sense bytes (32 bytes, format 0x20) and the conditions that produce them.
//!
//! Byte values follow what Hercules presents for an emulated 3490 (tapedev.h / tapeccws.c)
//! and what Linux `tape_34xx` interprets: byte 0 unit-check reasons, byte 1 drive state,
//! byte 2 reporting channel, byte 3 the error-recovery action (ERA) code, byte 7 the format.

use crate::orb::dstat::{CHANNEL_END, DEVICE_END, UNIT_CHECK, UNIT_EXCEPTION};

/// Number of sense bytes a 3490 returns.
pub const SENSE_LEN: usize = 32;

/// Byte 0: command reject.
pub const SNS0_CMDREJ: u8 = 0x80;
/// Byte 0: intervention required.
pub const SNS0_INTVREQ: u8 = 0x40;
/// Byte 0: equipment check.
pub const SNS0_EQUIPCHK: u8 = 0x10;
/// Byte 0: data check.
pub const SNS0_DATACHK: u8 = 0x08;
/// Byte 1: drive online to the control unit.
pub const SNS1_ONLINE: u8 = 0x40;
/// Byte 1: at beginning of tape (load point).
pub const SNS1_BOT: u8 = 0x08;
/// Byte 1: file protected (write-protected volume).
pub const SNS1_FILEPROT: u8 = 0x02;
/// Byte 2: reporting channel A.
pub const SNS2_CHAN_A: u8 = 0x20;
/// Byte 7: format 0x20 (drive and control-unit error information).
pub const FMT_20: u8 = 0x20;
/// Byte 7: format 0x22 (end-of-volume statistics, after Rewind Unload).
pub const FMT_22: u8 = 0x22;

/// ERA codes (sense byte 3).
pub mod era {
    /// Unsolicited sense (no error).
    pub const UNSOLICITED: u8 = 0x00;
    /// Read data check.
    pub const READ_DATA_CHECK: u8 = 0x23;
    /// Command reject.
    pub const COMMAND_REJECT: u8 = 0x27;
    /// Environmental data present (Rewind Unload complete).
    pub const ENVIRONMENTAL_DATA: u8 = 0x2B;
    /// Permanent equipment check.
    pub const PERMANENT_EQUIPMENT_CHECK: u8 = 0x2C;
    /// Write protected.
    pub const WRITE_PROTECTED: u8 = 0x30;
    /// Tape void: no recorded data where a block was expected.
    pub const TAPE_VOID: u8 = 0x31;
    /// End of data (block ends short).
    pub const END_OF_DATA: u8 = 0x36;
    /// Physical end of tape.
    pub const PHYSICAL_END_OF_TAPE: u8 = 0x38;
    /// Backward motion at the beginning of tape.
    pub const BACKWARD_AT_BOT: u8 = 0x39;
    /// Drive not ready (no tape).
    pub const DRIVE_NOT_READY: u8 = 0x43;
    /// Locate block failed.
    pub const LOCATE_FAILED: u8 = 0x44;
    /// Maximum block size exceeded.
    pub const MAX_BLOCKSIZE_EXCEEDED: u8 = 0x4E;
}

/// A condition the device reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// No tape loaded (unit check alone, ERA 0x43).
    NotLoaded,
    /// Rewind Unload completed (CE DE UC, ERA 0x2B, as Hercules and real 3490s do).
    UnloadComplete,
    /// Unreadable block or host read error (data check, ERA 0x23).
    ReadFail,
    /// Host write or sync error (equipment check, ERA 0x2C).
    WriteFail,
    /// Command not supported or bad parameters (unit check alone, ERA 0x27).
    CommandReject,
    /// Write to a write-protected volume (command reject, ERA 0x30).
    WriteProtect,
    /// Read or space past the end of recorded data (data check, ERA 0x31).
    TapeVoid,
    /// The file ends inside a block (equipment check, ERA 0x36).
    BlockShort,
    /// Write past the configured tape size or host disk full (equipment check, ERA 0x38).
    PhysicalEnd,
    /// Backward motion at the load point (ERA 0x39).
    BackwardAtBot,
    /// Locate Block could not reach the block (equipment check, ERA 0x44).
    LocateFail,
    /// Block larger than the device handles (command reject, ERA 0x4E).
    BlockTooLong,
    /// No error: sense requested without a pending unit check (ERA 0).
    Unsolicited,
}

impl Condition {
    /// Sense byte 0, ERA, format and the unit status presented with it.
    fn parts(self) -> (u8, u8, u8, u8) {
        let ce_de_uc = CHANNEL_END | DEVICE_END | UNIT_CHECK;
        match self {
            Condition::NotLoaded => (SNS0_INTVREQ, era::DRIVE_NOT_READY, FMT_20, UNIT_CHECK),
            Condition::UnloadComplete => (SNS0_INTVREQ, era::ENVIRONMENTAL_DATA, FMT_22, ce_de_uc),
            Condition::ReadFail => (SNS0_DATACHK, era::READ_DATA_CHECK, FMT_20, ce_de_uc),
            Condition::WriteFail => (
                SNS0_EQUIPCHK,
                era::PERMANENT_EQUIPMENT_CHECK,
                FMT_20,
                ce_de_uc,
            ),
            Condition::CommandReject => (SNS0_CMDREJ, era::COMMAND_REJECT, FMT_20, UNIT_CHECK),
            Condition::WriteProtect => (SNS0_CMDREJ, era::WRITE_PROTECTED, FMT_20, ce_de_uc),
            Condition::TapeVoid => (SNS0_DATACHK, era::TAPE_VOID, FMT_20, ce_de_uc),
            Condition::BlockShort => (SNS0_EQUIPCHK, era::END_OF_DATA, FMT_20, ce_de_uc),
            Condition::PhysicalEnd => (SNS0_EQUIPCHK, era::PHYSICAL_END_OF_TAPE, FMT_20, ce_de_uc),
            Condition::BackwardAtBot => (0, era::BACKWARD_AT_BOT, FMT_20, ce_de_uc),
            Condition::LocateFail => (SNS0_EQUIPCHK, era::LOCATE_FAILED, FMT_20, ce_de_uc),
            Condition::BlockTooLong => (SNS0_CMDREJ, era::MAX_BLOCKSIZE_EXCEEDED, FMT_20, ce_de_uc),
            Condition::Unsolicited => (0, era::UNSOLICITED, FMT_20, CHANNEL_END | DEVICE_END),
        }
    }

    /// The unit status presented with this condition.
    pub fn status(self) -> u8 {
        self.parts().3
    }
}

/// Drive state that sense bytes 1 and 28-30 reflect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriveState {
    /// A tape is loaded.
    pub loaded: bool,
    /// The tape is at the load point.
    pub at_load_point: bool,
    /// The tape is write-protected.
    pub read_only: bool,
    /// Device number (the serial in bytes 28-30 is derived from it).
    pub dev_num: u16,
}

/// Builds the 32 sense bytes for `cond` in `state`.
pub fn build(cond: Condition, state: DriveState) -> [u8; SENSE_LEN] {
    let (b0, era, fmt, _) = cond.parts();
    let mut s = [0u8; SENSE_LEN];
    s[0] = b0;
    s[3] = era;
    s[7] = fmt;
    if fmt == FMT_20 {
        // IDRC installed, upgraded buffer.
        s[25] = 0x06;
    }
    // 3490 model indicator and a serial number made from the device number.
    s[27] = 0xE0 | 0x0C;
    let n = state.dev_num;
    s[28] = (n >> 12) as u8;
    s[29] = (n >> 4) as u8;
    s[30] = ((n & 0xF) as u8) | (((n & 0xF) as u8) << 4);
    if state.loaded {
        s[0] &= !SNS0_INTVREQ;
        if state.at_load_point {
            s[1] |= SNS1_BOT;
        }
        if state.read_only {
            s[1] |= SNS1_FILEPROT;
        }
    } else {
        s[0] |= SNS0_INTVREQ;
        s[1] |= SNS1_FILEPROT;
    }
    s[1] |= SNS1_ONLINE;
    s[2] |= SNS2_CHAN_A;
    s
}

/// Unit status for a tape mark crossed by a read or a block space.
pub const STATUS_TAPE_MARK: u8 = CHANNEL_END | DEVICE_END | UNIT_EXCEPTION;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_at_bot_sense_bytes() {
        let s = build(
            Condition::BackwardAtBot,
            DriveState {
                loaded: true,
                at_load_point: true,
                read_only: false,
                dev_num: 0x0181,
            },
        );
        let mut want = [0u8; 32];
        want[1] = 0x48; // online, BOT
        want[2] = 0x20;
        want[3] = 0x39;
        want[7] = 0x20;
        want[25] = 0x06;
        want[27] = 0xEC;
        want[28] = 0x00;
        want[29] = 0x18;
        want[30] = 0x11;
        assert_eq!(s, want);
        assert_eq!(Condition::BackwardAtBot.status(), 0x0E);
    }

    #[test]
    fn not_loaded_and_unload_sense() {
        let st = DriveState {
            loaded: false,
            at_load_point: false,
            read_only: false,
            dev_num: 0,
        };
        let s = build(Condition::NotLoaded, st);
        assert_eq!(&s[..4], &[0x40, 0x42, 0x20, 0x43]);
        assert_eq!(Condition::NotLoaded.status(), UNIT_CHECK);
        let s = build(Condition::UnloadComplete, st);
        assert_eq!(&s[..8], &[0x40, 0x42, 0x20, 0x2B, 0, 0, 0, 0x22]);
        assert_eq!(s[25], 0);
        let s = build(
            Condition::WriteProtect,
            DriveState {
                loaded: true,
                read_only: true,
                ..st
            },
        );
        assert_eq!(&s[..4], &[0x80, 0x42, 0x20, 0x30]);
    }
}
