//! Why a guest channel program cannot be translated.
//!
//! Each error names both faces it has: the errno the kernel's vfio-ccw returns from the I/O
//! region write, and the status a channel presents to the guest for the same program
//! (program check for architectural violations, as QEMU's and Hercules' channels do; unit
//! exception for limits of the mediator itself, as QEMU presents an unexpected errno).

use thiserror::Error;

use crate::orb::{cstat, dstat};

/// Where in the guest program a problem was found.
pub type GuestAddr = u64;

/// A guest channel program that vccw refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TranslateError {
    /// The ORB asks for transport mode, which vccw does not support.
    #[error("transport-mode ORB is not supported")]
    TransportMode,
    /// The ORB's reserved bits or the CPA's bit 0 are set.
    #[error("invalid ORB: {0}")]
    InvalidOrb(&'static str),
    /// A CCW address is zero, not doubleword aligned, or beyond the format's address limit.
    #[error("invalid CCW address {0:#x}")]
    CcwAddress(GuestAddr),
    /// Guest storage the program refers to is not mapped (or not readable).
    #[error("guest address {0:#x} is not mapped")]
    Unmapped(GuestAddr),
    /// The command code's low four bits are zero.
    #[error("invalid command code {cmd:#04x} at {at:#x}")]
    InvalidCommand {
        /// The CCW's guest address.
        at: GuestAddr,
        /// The command code.
        cmd: u8,
    },
    /// A TIC designates another TIC.
    #[error("TIC at {0:#x} designates a TIC")]
    TicToTic(GuestAddr),
    /// A format-1 TIC has flags or a count (QEMU and Hercules refuse it).
    #[error("TIC at {0:#x} has flags or a count")]
    TicFlags(GuestAddr),
    /// A format-0 CCW other than a TIC has a count of zero.
    #[error("format-0 CCW at {0:#x} has a count of zero")]
    ZeroCount(GuestAddr),
    /// A data-chained run reaches a CCW of count zero.
    #[error("CCW at {0:#x}: count zero with data chaining")]
    ZeroCountDataChain(GuestAddr),
    /// A direct data address (or its area) is beyond the CCW format's addressing limit.
    #[error("CCW at {0:#x}: data area beyond the addressing limit")]
    DataAddress(GuestAddr),
    /// An IDAL or MIDAL address is misaligned or beyond 31 bits.
    #[error("CCW at {0:#x}: misaligned or out-of-range indirect list address")]
    ListAddress(GuestAddr),
    /// An IDAW is invalid: format-1 with bit 0 set, or a later IDAW not on a block boundary.
    #[error("CCW at {0:#x}: invalid IDAW {1:#x}")]
    Idaw(GuestAddr, u64),
    /// A MIDAW is invalid (count zero, reserved bits, page crossing, counts not matching).
    #[error("CCW at {0:#x}: invalid MIDAW list: {1}")]
    Midaw(GuestAddr, &'static str),
    /// A CCW has the MIDA flag while the ORB does not allow MIDAWs, or MIDA with IDA or SKP.
    #[error("CCW at {0:#x}: MIDA flag not allowed here")]
    MidaNotAllowed(GuestAddr),
    /// A CCW has the suspend flag while the ORB does not allow suspension.
    #[error("CCW at {0:#x}: suspend flag without ORB suspend control")]
    SuspendNotAllowed(GuestAddr),
    /// More than 255 consecutive CCWs transfer no data (a channel would loop).
    #[error("more than 255 CCWs without data transfer at {0:#x}")]
    NoDataLoop(GuestAddr),
    /// A chain segment is longer than the limit (256 CCWs).
    #[error("chain segment at {0:#x} is longer than {1} CCWs")]
    SegmentTooLong(GuestAddr, usize),
    /// The program has more chain segments than the limit.
    #[error("channel program has more than {0} chain segments")]
    TooManySegments(usize),
    /// Pinning guest pages failed because the access is not permitted (read-only mapping).
    #[error("guest page {0:#x} does not permit the transfer")]
    Protection(GuestAddr),
    /// The store refused to pin (busy: its translation is being replaced or unmapped).
    #[error("guest page {0:#x} is busy")]
    Busy(GuestAddr),
    /// The host program would not fit the arena.
    #[error("host program too large for the arena")]
    ArenaFull,
}

/// The status a channel presents for a refused program: device status and subchannel status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelStatus {
    /// Device status (SCSW byte 8).
    pub dstat: u8,
    /// Subchannel status (SCSW byte 9).
    pub cstat: u8,
}

impl TranslateError {
    /// The errno the kernel's vfio-ccw returns for this program.
    pub fn errno(&self) -> i32 {
        match self {
            TranslateError::TransportMode => libc::EOPNOTSUPP,
            TranslateError::Unmapped(_) => libc::EFAULT,
            TranslateError::Protection(_) => libc::EPERM,
            TranslateError::Busy(_) => libc::EBUSY,
            TranslateError::ArenaFull => libc::ENOMEM,
            _ => libc::EINVAL,
        }
    }

    /// The status a channel presents to the guest for this program.
    pub fn channel_status(&self) -> ChannelStatus {
        let program_check = ChannelStatus {
            dstat: 0,
            cstat: cstat::PROGRAM_CHECK,
        };
        match self {
            TranslateError::Protection(_) => ChannelStatus {
                dstat: 0,
                cstat: cstat::PROTECTION_CHECK,
            },
            // Limits of the mediator, not of the architecture.
            TranslateError::SegmentTooLong(..)
            | TranslateError::TooManySegments(_)
            | TranslateError::Busy(_)
            | TranslateError::ArenaFull => ChannelStatus {
                dstat: dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_EXCEPTION,
                cstat: 0,
            },
            _ => program_check,
        }
    }
}
