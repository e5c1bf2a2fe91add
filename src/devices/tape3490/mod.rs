//! An IBM 3490 tape drive over an AWSTAPE file.
//!
//! Command set and status follow the 3490 as Hercules emulates it and as Linux `tape_34xx`
//! drives it: a tape mark read or spaced over gives CE DE UX; a write that passes the
//! early-warning zone before the configured end of tape gives CE DE UX (Linux: ENOSPC); a
//! write that would pass the end, or hits a full host disk, gives unit check with
//! equipment check, ERA 0x38; a read at the end of recorded data gives unit check with
//! data check, ERA 0x31 (tape void); backward motion at the load point gives unit check
//! with ERA 0x39. Writes reach the file with `pwrite` (and `fdatasync` if configured or in
//! tape-write-immediate mode) before status is presented; a failed write is a unit check
//! with equipment check (ERA 0x2C), never success.

pub mod sense;

use crate::ccw::CommandSet;
use crate::css::device::{Command, DeviceIdentity, DeviceModel, Outcome};
use crate::image::awstape::{AwsError, AwsTape, Record};
use crate::orb::dstat::{CHANNEL_END, DEVICE_END, UNIT_EXCEPTION};
use sense::{Condition, DriveState, SENSE_LEN, STATUS_TAPE_MARK};

/// Command codes the drive knows.
pub mod cmd {
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read Forward.
    pub const READ_FORWARD: u8 = 0x02;
    /// No-operation.
    pub const NOP: u8 = 0x03;
    /// Sense.
    pub const SENSE: u8 = 0x04;
    /// Rewind.
    pub const REWIND: u8 = 0x07;
    /// Read Backward.
    pub const READ_BACKWARD: u8 = 0x0C;
    /// Rewind Unload.
    pub const REWIND_UNLOAD: u8 = 0x0F;
    /// Read Buffer.
    pub const READ_BUFFER: u8 = 0x12;
    /// Erase Gap.
    pub const ERASE_GAP: u8 = 0x17;
    /// Write Tape Mark.
    pub const WRITE_TAPE_MARK: u8 = 0x1F;
    /// Read Block ID.
    pub const READ_BLOCK_ID: u8 = 0x22;
    /// Read Buffered Log.
    pub const READ_BUFFERED_LOG: u8 = 0x24;
    /// Backspace Block.
    pub const BACKSPACE_BLOCK: u8 = 0x27;
    /// Backspace File.
    pub const BACKSPACE_FILE: u8 = 0x2F;
    /// Sense Path Group ID.
    pub const SENSE_PATH_GROUP_ID: u8 = 0x34;
    /// Forward Space Block.
    pub const FORWARD_SPACE_BLOCK: u8 = 0x37;
    /// Forward Space File.
    pub const FORWARD_SPACE_FILE: u8 = 0x3F;
    /// Synchronize.
    pub const SYNCHRONIZE: u8 = 0x43;
    /// Locate Block.
    pub const LOCATE: u8 = 0x4F;
    /// Suspend Multipath Reconnection.
    pub const SUSPEND_MULTIPATH: u8 = 0x5B;
    /// Data Security Erase.
    pub const DATA_SECURITY_ERASE: u8 = 0x97;
    /// Load Display.
    pub const LOAD_DISPLAY: u8 = 0x9F;
    /// Set Path Group ID.
    pub const SET_PATH_GROUP_ID: u8 = 0xAF;
    /// Assign.
    pub const ASSIGN: u8 = 0xB7;
    /// Set Tape-Write-Immediate.
    pub const SET_WRITE_IMMEDIATE: u8 = 0xC3;
    /// Unassign.
    pub const UNASSIGN: u8 = 0xC7;
    /// Mode Set (3480 and later).
    pub const MODE_SET: u8 = 0xDB;
    /// Sense ID.
    pub const SENSE_ID: u8 = 0xE4;
    /// Older mode-set and no-op codes a 3490 accepts and ignores (9-track densities etc.).
    pub const IGNORED_MODE_SETS: [u8; 16] = [
        0x13, 0x23, 0x2B, 0x33, 0x3B, 0x53, 0x63, 0x6B, 0x73, 0x7B, 0x93, 0xA3, 0xAB, 0xB3, 0xBB,
        0xD3,
    ];
}

/// Mode Set byte: tape-write-immediate.
const MSET_WRITE_IMMED: u8 = 0x20;
/// Mode Set byte: supervisor inhibit.
const MSET_SUPVR_INHIBIT: u8 = 0x10;

/// Drive configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tape3490Config {
    /// Maximum tape file size (physical end of tape); `None`: unlimited.
    pub max_size: Option<u64>,
    /// Early-warning zone before `max_size`: writes ending inside it get unit exception.
    pub eot_margin: u64,
    /// `fdatasync` after every write and tape mark.
    pub sync_writes: bool,
    /// Device number (the serial in sense bytes 28-30 comes from it).
    pub dev_num: u16,
    /// What Sense ID reports.
    pub identity: DeviceIdentity,
}

impl Default for Tape3490Config {
    fn default() -> Self {
        Tape3490Config {
            max_size: None,
            eot_margin: 128 * 1024,
            sync_writes: false,
            dev_num: 0,
            // As Hercules answers for a 3490 (model C10).
            identity: DeviceIdentity {
                cu_type: 0x3490,
                cu_model: 0x50,
                dev_type: 0x3490,
                dev_model: 0x50,
            },
        }
    }
}

/// A 3490 tape drive.
#[derive(Debug)]
pub struct Tape3490 {
    cfg: Tape3490Config,
    tape: Option<AwsTape>,
    sense: [u8; SENSE_LEN],
    sense_pending: bool,
    supvr_inhibit: bool,
    write_immed: bool,
    assigned: bool,
    path_group: [u8; 12],
    display: [u8; 17],
    buf: Vec<u8>,
}

fn ce_de() -> u8 {
    CHANNEL_END | DEVICE_END
}

impl Tape3490 {
    /// A drive with no tape loaded.
    pub fn new(cfg: Tape3490Config) -> Self {
        Tape3490 {
            cfg,
            tape: None,
            sense: [0; SENSE_LEN],
            sense_pending: false,
            supvr_inhibit: false,
            write_immed: false,
            assigned: false,
            path_group: [0; 12],
            display: [0; 17],
            buf: Vec::new(),
        }
    }

    /// A drive with `tape` loaded.
    pub fn with_tape(tape: AwsTape, cfg: Tape3490Config) -> Self {
        let mut d = Self::new(cfg);
        d.load(tape);
        d
    }

    /// Loads a tape (replacing any loaded one), applying the size limit and sync policy,
    /// positioned at the load point.
    pub fn load(&mut self, mut tape: AwsTape) {
        tape.set_max_size(self.cfg.max_size);
        tape.set_sync_writes(self.cfg.sync_writes);
        tape.rewind();
        self.tape = Some(tape);
    }

    /// Removes the tape, if any.
    pub fn unload(&mut self) -> Option<AwsTape> {
        self.tape.take()
    }

    /// The loaded tape.
    pub fn tape(&self) -> Option<&AwsTape> {
        self.tape.as_ref()
    }

    /// Whether an Assign is in effect.
    pub fn is_assigned(&self) -> bool {
        self.assigned
    }

    /// The last message sent with Load Display (17 bytes, EBCDIC).
    pub fn display(&self) -> &[u8; 17] {
        &self.display
    }

    fn state(&self) -> DriveState {
        DriveState {
            loaded: self.tape.is_some(),
            at_load_point: self.tape.as_ref().is_some_and(|t| t.at_load_point()),
            read_only: self.tape.as_ref().is_some_and(|t| t.is_read_only()),
            dev_num: self.cfg.dev_num,
        }
    }

    /// Records `cond` as the pending sense and returns its status.
    fn check(&mut self, cond: Condition) -> Outcome {
        self.sense = sense::build(cond, self.state());
        self.sense_pending = true;
        Outcome {
            status: cond.status(),
            transferred: 0,
            more: false,
        }
    }

    fn status(status: u8, transferred: usize, wanted: usize, count: usize) -> Outcome {
        Outcome {
            status,
            transferred,
            more: wanted > count,
        }
    }

    fn read_error(e: &AwsError) -> Condition {
        match e {
            AwsError::TruncatedBlock { .. } | AwsError::TruncatedHeader { .. } => {
                Condition::BlockShort
            }
            _ => Condition::ReadFail,
        }
    }

    fn write_error(e: &AwsError) -> Condition {
        match e {
            AwsError::EndOfTape { .. } => Condition::PhysicalEnd,
            AwsError::ReadOnly => Condition::WriteProtect,
            AwsError::BlockTooLong { .. } => Condition::BlockTooLong,
            AwsError::EmptyBlock => Condition::CommandReject,
            e if e.errno() == libc::ENOSPC => Condition::PhysicalEnd,
            _ => Condition::WriteFail,
        }
    }

    /// Whether the position is inside the early-warning zone before the end of tape.
    fn past_early_warning(&self, tape: &AwsTape) -> bool {
        match self.cfg.max_size {
            Some(max) => {
                !tape.at_load_point() && tape.position().saturating_add(self.cfg.eot_margin) > max
            }
            None => false,
        }
    }

    /// Completes a write-type command: sync in write-immediate mode, UX in the
    /// early-warning zone.
    fn finish_write(&mut self, transferred: usize) -> Outcome {
        let Some(tape) = self.tape.as_ref() else {
            return self.check(Condition::NotLoaded);
        };
        if self.write_immed {
            if let Err(e) = tape.sync() {
                let c = Self::write_error(&e);
                return self.check(c);
            }
        }
        let mut status = ce_de();
        if self.past_early_warning(tape) {
            status |= UNIT_EXCEPTION;
        }
        Outcome {
            status,
            transferred,
            more: false,
        }
    }

    fn copy_out(data: &mut [u8], src: &[u8], count: usize) -> Outcome {
        let n = src.len().min(count);
        data[..n].copy_from_slice(&src[..n]);
        Self::status(ce_de(), n, src.len(), count)
    }

    fn exec_tape(&mut self, code: u8, count: usize, data: &mut [u8]) -> Outcome {
        let Some(tape) = self.tape.as_mut() else {
            return self.check(Condition::NotLoaded);
        };
        match code {
            cmd::NOP => Outcome::done(0),
            cmd::WRITE => {
                if tape.is_read_only() {
                    return self.check(Condition::WriteProtect);
                }
                match tape.write_block(&data[..count]) {
                    Ok(()) => self.finish_write(count),
                    Err(e) => {
                        tracing::warn!(error = %e, "tape write failed");
                        let c = Self::write_error(&e);
                        self.check(c)
                    }
                }
            }
            cmd::WRITE_TAPE_MARK => {
                if tape.is_read_only() {
                    return self.check(Condition::WriteProtect);
                }
                match tape.write_tape_mark() {
                    Ok(()) => self.finish_write(0),
                    Err(e) => {
                        tracing::warn!(error = %e, "tape mark write failed");
                        let c = Self::write_error(&e);
                        self.check(c)
                    }
                }
            }
            cmd::ERASE_GAP | cmd::DATA_SECURITY_ERASE => {
                if tape.is_read_only() {
                    return self.check(Condition::WriteProtect);
                }
                if code == cmd::DATA_SECURITY_ERASE {
                    if let Err(e) = tape.erase_to_end() {
                        let c = Self::write_error(&e);
                        return self.check(c);
                    }
                }
                Outcome::done(0)
            }
            cmd::READ_FORWARD => match tape.read_forward(&mut self.buf) {
                Ok(Record::Block { len, .. }) => {
                    let n = len.min(count);
                    data[..n].copy_from_slice(&self.buf[..n]);
                    Self::status(ce_de(), n, len, count)
                }
                Ok(Record::TapeMark) => Self::status(STATUS_TAPE_MARK, 0, 0, count),
                Ok(_) => self.check(Condition::TapeVoid),
                Err(e) => {
                    let c = Self::read_error(&e);
                    self.check(c)
                }
            },
            cmd::READ_BACKWARD => match tape.read_backward(&mut self.buf) {
                Ok(Record::Block { len, .. }) => {
                    // Transfer order is the block's last byte first.
                    let n = len.min(count);
                    for (d, s) in data[..n].iter_mut().zip(self.buf[..len].iter().rev()) {
                        *d = *s;
                    }
                    Self::status(ce_de(), n, len, count)
                }
                Ok(Record::TapeMark) => Self::status(STATUS_TAPE_MARK, 0, 0, count),
                Ok(_) => self.check(Condition::BackwardAtBot),
                Err(e) => {
                    let c = Self::read_error(&e);
                    self.check(c)
                }
            },
            cmd::REWIND => {
                tape.rewind();
                Outcome::done(0)
            }
            cmd::REWIND_UNLOAD => {
                if let Some(t) = self.tape.take() {
                    if let Err(e) = t.sync() {
                        tracing::warn!(error = %e, "sync at unload failed");
                    }
                }
                self.check(Condition::UnloadComplete)
            }
            cmd::FORWARD_SPACE_BLOCK => match tape.skip_forward() {
                Ok(Record::Block { .. }) => Outcome::done(0),
                Ok(Record::TapeMark) => Self::status(STATUS_TAPE_MARK, 0, 0, 0),
                Ok(_) => self.check(Condition::TapeVoid),
                Err(e) => {
                    let c = Self::read_error(&e);
                    self.check(c)
                }
            },
            cmd::BACKSPACE_BLOCK => match tape.skip_backward() {
                Ok(Record::Block { .. }) => Outcome::done(0),
                Ok(Record::TapeMark) => Self::status(STATUS_TAPE_MARK, 0, 0, 0),
                Ok(_) => self.check(Condition::BackwardAtBot),
                Err(e) => {
                    let c = Self::read_error(&e);
                    self.check(c)
                }
            },
            cmd::FORWARD_SPACE_FILE => loop {
                match tape.skip_forward() {
                    Ok(Record::Block { .. }) => continue,
                    Ok(Record::TapeMark) => break Outcome::done(0),
                    Ok(_) => break self.check(Condition::TapeVoid),
                    Err(e) => {
                        let c = Self::read_error(&e);
                        break self.check(c);
                    }
                }
            },
            cmd::BACKSPACE_FILE => loop {
                match tape.skip_backward() {
                    Ok(Record::Block { .. }) => continue,
                    Ok(Record::TapeMark) => break Outcome::done(0),
                    Ok(_) => break self.check(Condition::BackwardAtBot),
                    Err(e) => {
                        let c = Self::read_error(&e);
                        break self.check(c);
                    }
                }
            },
            cmd::SYNCHRONIZE | cmd::READ_BUFFER => match tape.sync() {
                // Nothing stays buffered: Read Buffer has no data to return.
                Ok(()) => Outcome::done(0),
                Err(e) => {
                    let c = Self::write_error(&e);
                    self.check(c)
                }
            },
            cmd::READ_BLOCK_ID => {
                // Channel and device block IDs: wrap 0, segment 1, format 0, 22-bit block.
                let id = tape.block_id();
                let one = [0x01, ((id >> 16) & 0x3F) as u8, (id >> 8) as u8, id as u8];
                let mut both = [0u8; 8];
                both[..4].copy_from_slice(&one);
                both[4..].copy_from_slice(&one);
                Self::copy_out(data, &both, count)
            }
            cmd::LOCATE => {
                if count < 4 {
                    return self.check(Condition::CommandReject);
                }
                let v = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                // Format bits 0b11 are reserved.
                if v & 0x00C0_0000 == 0x00C0_0000 {
                    return self.check(Condition::CommandReject);
                }
                match tape.locate(v & 0x003F_FFFF) {
                    Ok(true) => Self::status(ce_de(), 4, 4, count),
                    Ok(false) => self.check(Condition::LocateFail),
                    Err(e) => {
                        tracing::warn!(error = %e, "locate failed");
                        self.check(Condition::LocateFail)
                    }
                }
            }
            _ => self.check(Condition::CommandReject),
        }
    }

    fn needs_tape(code: u8) -> bool {
        matches!(
            code,
            cmd::WRITE
                | cmd::READ_FORWARD
                | cmd::NOP
                | cmd::REWIND
                | cmd::READ_BACKWARD
                | cmd::REWIND_UNLOAD
                | cmd::READ_BUFFER
                | cmd::ERASE_GAP
                | cmd::WRITE_TAPE_MARK
                | cmd::READ_BLOCK_ID
                | cmd::BACKSPACE_BLOCK
                | cmd::BACKSPACE_FILE
                | cmd::FORWARD_SPACE_BLOCK
                | cmd::FORWARD_SPACE_FILE
                | cmd::SYNCHRONIZE
                | cmd::LOCATE
                | cmd::DATA_SECURITY_ERASE
        )
    }
}

impl DeviceModel for Tape3490 {
    /// No 3490 command ends with status modifier.
    fn status_modifier_commands(&self) -> CommandSet {
        CommandSet::EMPTY
    }

    fn start_program(&mut self) {
        // Mode Set settings last for one channel program.
        self.supvr_inhibit = false;
        self.write_immed = false;
    }

    fn execute(&mut self, command: &Command, data: &mut [u8]) -> Outcome {
        let code = command.code;
        // Never trust the count beyond the buffer actually given.
        let count = command.count.min(data.len());
        if code != cmd::SENSE && code != cmd::READ_BUFFERED_LOG {
            // A new command ends the contingent allegiance of an unsensed unit check.
            self.sense_pending = false;
        }
        let supervisor = matches!(
            code,
            cmd::MODE_SET
                | cmd::ASSIGN
                | cmd::UNASSIGN
                | cmd::LOAD_DISPLAY
                | cmd::SENSE_PATH_GROUP_ID
                | cmd::SET_PATH_GROUP_ID
                | cmd::SUSPEND_MULTIPATH
        );
        if supervisor && self.supvr_inhibit {
            return self.check(Condition::CommandReject);
        }
        if Self::needs_tape(code) {
            return self.exec_tape(code, count, data);
        }
        match code {
            cmd::SENSE => {
                if !self.sense_pending {
                    self.sense = sense::build(Condition::Unsolicited, self.state());
                }
                let s = self.sense;
                self.sense = [0; SENSE_LEN];
                self.sense_pending = false;
                Self::copy_out(data, &s, count)
            }
            cmd::READ_BUFFERED_LOG => {
                let s = self.sense();
                Self::copy_out(data, &s, count)
            }
            cmd::SENSE_ID => {
                let id = self.cfg.identity.sense_id_bytes();
                Self::copy_out(data, &id, count)
            }
            cmd::MODE_SET => {
                if count < 1 {
                    return self.check(Condition::CommandReject);
                }
                if data[0] & MSET_SUPVR_INHIBIT != 0 {
                    self.supvr_inhibit = true;
                }
                if data[0] & MSET_WRITE_IMMED != 0 {
                    self.write_immed = true;
                }
                Self::status(ce_de(), 1, 1, count)
            }
            cmd::SET_WRITE_IMMEDIATE => {
                self.write_immed = true;
                Outcome::done(0)
            }
            cmd::ASSIGN | cmd::UNASSIGN => {
                // 11 bytes of path-group ID (zeros from Linux); a single-host drive accepts any.
                if count < 11 {
                    return self.check(Condition::CommandReject);
                }
                self.assigned = code == cmd::ASSIGN;
                Self::status(ce_de(), 11, 11, count)
            }
            cmd::LOAD_DISPLAY => {
                let n = count.min(17);
                self.display = [0; 17];
                self.display[..n].copy_from_slice(&data[..n]);
                Self::status(ce_de(), n, 17, count)
            }
            cmd::SENSE_PATH_GROUP_ID => {
                let pg = self.path_group;
                Self::copy_out(data, &pg, count)
            }
            cmd::SET_PATH_GROUP_ID => {
                if count < 12 {
                    return self.check(Condition::CommandReject);
                }
                // Path state: grouped; the 11-byte ID follows the function byte.
                self.path_group[0] = 0xC0;
                self.path_group[1..].copy_from_slice(&data[1..12]);
                Self::status(ce_de(), 12, 12, count)
            }
            cmd::SUSPEND_MULTIPATH => Outcome::done(0),
            c if cmd::IGNORED_MODE_SETS.contains(&c) => Outcome::done(0),
            _ => self.check(Condition::CommandReject),
        }
    }

    fn sense(&self) -> Vec<u8> {
        if self.sense_pending {
            self.sense.to_vec()
        } else {
            sense::build(Condition::Unsolicited, self.state()).to_vec()
        }
    }

    fn identity(&self) -> DeviceIdentity {
        self.cfg.identity
    }
}

#[cfg(test)]
mod tests;
