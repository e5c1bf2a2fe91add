//! Channel-command words, formats 0 and 1 (SA22-7832, "Channel-Command Word").
//!
//! The translator reads guest CCWs in either format and always writes format 1, so
//! [`Ccw1`] is the one in-memory model; [`Ccw0`] exists to decode the guest's image.

use bitfield_struct::bitfield;

/// Size in bytes of a CCW of either format.
pub const CCW_SIZE: u64 = 8;

/// The CCW flag byte (bits 8-15 of a format-1 CCW, 32-39 of a format-0 CCW).
#[bitfield(u8, order = Msb)]
#[derive(PartialEq, Eq)]
pub struct CcwFlags {
    /// Chain data (CD): the next CCW continues this operation's data.
    pub cd: bool,
    /// Chain command (CC): the next CCW is a new command.
    pub cc: bool,
    /// Suppress incorrect length (SLI).
    pub sli: bool,
    /// Skip (SKP): transfer no data to storage.
    pub skp: bool,
    /// Program-controlled interruption (PCI).
    pub pci: bool,
    /// Indirect data addressing (IDA): the data address designates an IDAL.
    pub ida: bool,
    /// Suspend (S): suspend before executing this CCW when the ORB allows it.
    pub s: bool,
    /// Modified indirect data addressing (MIDA): the data address designates a MIDAL.
    pub mida: bool,
}

/// Command codes with a fixed meaning for every device.
pub mod command {
    /// Transfer in channel (low four bits; the high four bits are ignored).
    pub const TIC: u8 = 0x08;
    /// Control no-operation.
    pub const NOOP: u8 = 0x03;
    /// Basic sense.
    pub const SENSE: u8 = 0x04;
    /// Sense ID.
    pub const SENSE_ID: u8 = 0xE4;
}

/// What a command code asks the channel to do, from its low-order bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    /// `xxxx0000`: invalid in every format (program check).
    Invalid,
    /// `xxxxxx01`: data flows from storage to the device.
    Write,
    /// `xxxxxx10`: data flows from the device to storage.
    Read,
    /// `xxxx1100`: device to storage, stored in descending addresses.
    ReadBackward,
    /// `xxxxxx11`: storage to device (orders and parameters).
    Control,
    /// `xxxx0100`: device to storage (sense data).
    Sense,
    /// `xxxx1000`: transfer in channel.
    Tic,
}

impl CommandKind {
    /// Classifies a command code.
    pub const fn of(cmd: u8) -> Self {
        match cmd & 0x0f {
            0x00 => CommandKind::Invalid,
            0x04 => CommandKind::Sense,
            0x08 => CommandKind::Tic,
            0x0c => CommandKind::ReadBackward,
            _ => match cmd & 0x03 {
                0x01 => CommandKind::Write,
                0x02 => CommandKind::Read,
                _ => CommandKind::Control,
            },
        }
    }

    /// Whether data moves from the device into storage.
    pub const fn is_input(self) -> bool {
        matches!(
            self,
            CommandKind::Read | CommandKind::ReadBackward | CommandKind::Sense
        )
    }
}

/// A set of command codes (one bit per code).
///
/// Used for the commands after which a device may present *status modifier*: a channel
/// that sees it on a command-chained CCW skips the next CCW, so a translator must prepare
/// the slot after a chain's end only when the CCW before it can end that way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandSet([u64; 4]);

impl CommandSet {
    /// Every command code.
    pub const ALL: CommandSet = CommandSet([u64::MAX; 4]);
    /// No command code.
    pub const EMPTY: CommandSet = CommandSet([0; 4]);

    /// The set of `codes`.
    pub const fn of(codes: &[u8]) -> Self {
        let mut w = [0u64; 4];
        let mut i = 0;
        while i < codes.len() {
            let c = codes[i] as usize;
            w[c / 64] |= 1 << (c % 64);
            i += 1;
        }
        CommandSet(w)
    }

    /// The codes in both sets.
    pub const fn intersection(self, other: CommandSet) -> CommandSet {
        let (a, b) = (self.0, other.0);
        CommandSet([a[0] & b[0], a[1] & b[1], a[2] & b[2], a[3] & b[3]])
    }

    /// Whether `code` is in the set.
    pub const fn contains(&self, code: u8) -> bool {
        self.0[code as usize / 64] & (1 << (code as usize % 64)) != 0
    }
}

impl Default for CommandSet {
    /// Every command code (the safe assumption about an unknown device).
    fn default() -> Self {
        CommandSet::ALL
    }
}

/// A format-1 CCW: command, flags, count, 31-bit data address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ccw1 {
    /// Command code.
    pub cmd: u8,
    /// Flags.
    pub flags: CcwFlags,
    /// Byte count.
    pub count: u16,
    /// Data address (bit 0 must be zero: 31-bit addressing).
    pub cda: u32,
}

/// A format-0 CCW: command, 24-bit data address, flags, count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ccw0 {
    /// Command code.
    pub cmd: u8,
    /// Data address (24 bits).
    pub cda: u32,
    /// Flags.
    pub flags: CcwFlags,
    /// Byte count.
    pub count: u16,
}

impl Ccw1 {
    /// Decodes the 8-byte big-endian image.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Ccw1 {
            cmd: b[0],
            flags: CcwFlags::from_bits(b[1]),
            count: u16::from_be_bytes([b[2], b[3]]),
            cda: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Encodes the 8-byte big-endian image.
    pub fn to_bytes(self) -> [u8; 8] {
        let c = self.count.to_be_bytes();
        let a = self.cda.to_be_bytes();
        [
            self.cmd,
            self.flags.into_bits(),
            c[0],
            c[1],
            a[0],
            a[1],
            a[2],
            a[3],
        ]
    }

    /// The kind of command this CCW carries.
    pub fn kind(&self) -> CommandKind {
        CommandKind::of(self.cmd)
    }

    /// Whether this is a transfer-in-channel.
    pub fn is_tic(&self) -> bool {
        self.kind() == CommandKind::Tic
    }
}

impl Ccw0 {
    /// Decodes the 8-byte big-endian image.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Ccw0 {
            cmd: b[0],
            cda: u32::from_be_bytes([0, b[1], b[2], b[3]]),
            flags: CcwFlags::from_bits(b[4]),
            count: u16::from_be_bytes([b[6], b[7]]),
        }
    }

    /// Encodes the 8-byte big-endian image (byte 5 is reserved and written as zero).
    pub fn to_bytes(self) -> [u8; 8] {
        let a = self.cda.to_be_bytes();
        let c = self.count.to_be_bytes();
        [
            self.cmd,
            a[1],
            a[2],
            a[3],
            self.flags.into_bits(),
            0,
            c[0],
            c[1],
        ]
    }

    /// The equivalent format-1 CCW. A format-0 TIC (any high nibble) becomes `0x08`.
    pub fn to_format1(self) -> Ccw1 {
        let cmd = if CommandKind::of(self.cmd) == CommandKind::Tic {
            command::TIC
        } else {
            self.cmd
        };
        Ccw1 {
            cmd,
            flags: self.flags,
            count: self.count,
            cda: self.cda,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_sets() {
        let s = CommandSet::of(&[0x00, 0x31, 0x3F, 0x40, 0xB1, 0xFF]);
        for c in 0..=255u8 {
            assert_eq!(
                s.contains(c),
                matches!(c, 0x00 | 0x31 | 0x3F | 0x40 | 0xB1 | 0xFF),
                "{c:#x}"
            );
            assert!(CommandSet::ALL.contains(c));
            assert!(!CommandSet::EMPTY.contains(c));
        }
        assert_eq!(CommandSet::default(), CommandSet::ALL);
        assert_eq!(s.intersection(CommandSet::ALL), s);
        assert_eq!(s.intersection(CommandSet::EMPTY), CommandSet::EMPTY);
        assert_eq!(
            s.intersection(CommandSet::of(&[0x31, 0x32, 0xFF])),
            CommandSet::of(&[0x31, 0xFF])
        );
    }

    #[test]
    fn format1_bytes() {
        // SENSE ID, CC|SLI, 32 bytes at 0x00200100 (the probe program of the s390x reference).
        let ccw = Ccw1 {
            cmd: 0xE4,
            flags: CcwFlags::new().with_cc(true).with_sli(true),
            count: 32,
            cda: 0x0020_0100,
        };
        let b = [0xE4, 0x60, 0x00, 0x20, 0x00, 0x20, 0x01, 0x00];
        assert_eq!(ccw.to_bytes(), b);
        assert_eq!(Ccw1::from_bytes(b), ccw);
    }

    #[test]
    fn format0_bytes() {
        // READ (0x02) 0x123456, CD|IDA, count 0x0102.
        let b = [0x02, 0x12, 0x34, 0x56, 0x84, 0x00, 0x01, 0x02];
        let ccw = Ccw0::from_bytes(b);
        assert_eq!(ccw.cmd, 0x02);
        assert_eq!(ccw.cda, 0x12_3456);
        assert!(ccw.flags.cd() && ccw.flags.ida() && !ccw.flags.cc());
        assert_eq!(ccw.count, 0x0102);
        assert_eq!(ccw.to_bytes(), b);
    }

    #[test]
    fn flag_bits_follow_pop_numbering() {
        let all = [
            (CcwFlags::new().with_cd(true), 0x80),
            (CcwFlags::new().with_cc(true), 0x40),
            (CcwFlags::new().with_sli(true), 0x20),
            (CcwFlags::new().with_skp(true), 0x10),
            (CcwFlags::new().with_pci(true), 0x08),
            (CcwFlags::new().with_ida(true), 0x04),
            (CcwFlags::new().with_s(true), 0x02),
            (CcwFlags::new().with_mida(true), 0x01),
        ];
        for (f, bits) in all {
            assert_eq!(f.into_bits(), bits);
        }
    }

    #[test]
    fn format0_tic_any_high_nibble() {
        let ccw = Ccw0::from_bytes([0xF8, 0, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(ccw.to_format1().cmd, command::TIC);
        assert!(ccw.to_format1().is_tic());
    }

    #[test]
    fn command_kinds() {
        assert_eq!(CommandKind::of(0x00), CommandKind::Invalid);
        assert_eq!(CommandKind::of(0xF0), CommandKind::Invalid);
        assert_eq!(CommandKind::of(0x01), CommandKind::Write);
        assert_eq!(CommandKind::of(0x05), CommandKind::Write);
        assert_eq!(CommandKind::of(0x06), CommandKind::Read);
        assert_eq!(CommandKind::of(0x86), CommandKind::Read);
        assert_eq!(CommandKind::of(0x0C), CommandKind::ReadBackward);
        assert_eq!(CommandKind::of(0x03), CommandKind::Control);
        assert_eq!(CommandKind::of(0x63), CommandKind::Control);
        assert_eq!(CommandKind::of(0x04), CommandKind::Sense);
        assert_eq!(CommandKind::of(0xE4), CommandKind::Sense);
        assert_eq!(CommandKind::of(0x08), CommandKind::Tic);
        assert_eq!(CommandKind::of(0x18), CommandKind::Tic);
        assert!(CommandKind::ReadBackward.is_input() && !CommandKind::Control.is_input());
    }
}
