//! The interface between the channel and a device model (3390 DASD, 3490 tape, test devices).
//!
//! The channel owns chaining, addressing and storage access; a device model sees one command
//! at a time with its data as one contiguous buffer. For a data-chained run of CCWs the
//! channel gathers (output) or scatters (input) across all of them, so `count` is the total
//! the run offers, as a device on a real channel would see it.

use crate::ccw::CommandKind;

/// One command as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// The command code.
    pub code: u8,
    /// Its kind (write, read, read backward, control, sense).
    pub kind: CommandKind,
    /// Bytes offered: the sum of the counts of the data-chained CCWs of this command.
    pub count: usize,
    /// Whether the command was reached by command chaining (false for the first CCW of a
    /// channel program and after a resume from suspension, true otherwise).
    pub chained: bool,
    /// The previous command code in this chain, when `chained`.
    pub prev_code: Option<u8>,
    /// Position of this command in the channel program: 0 for the first.
    pub seq: u32,
}

/// What a device did with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Unit status (see [`crate::orb::dstat`]): normally CHANNEL_END | DEVICE_END, plus
    /// STATUS_MODIFIER, UNIT_CHECK, UNIT_EXCEPTION as the device decides.
    pub status: u8,
    /// Bytes the device consumed (output) or produced (input), at most `count`.
    pub transferred: usize,
    /// The device had more data to give, or wanted more than offered: with `transferred <
    /// count` this is what makes the channel report incorrect length (unless suppressed).
    pub more: bool,
}

impl Outcome {
    /// Channel end and device end with `transferred` bytes and nothing left over.
    pub fn done(transferred: usize) -> Self {
        Outcome {
            status: crate::orb::dstat::CHANNEL_END | crate::orb::dstat::DEVICE_END,
            transferred,
            more: false,
        }
    }

    /// Unit check (with channel end and device end), nothing transferred; the device has
    /// set its sense bytes.
    pub fn unit_check() -> Self {
        Outcome {
            status: crate::orb::dstat::CHANNEL_END
                | crate::orb::dstat::DEVICE_END
                | crate::orb::dstat::UNIT_CHECK,
            transferred: 0,
            more: false,
        }
    }
}

/// A device model driven by the emulated channel.
pub trait DeviceModel: Send {
    /// A new channel program starts (per-program state such as a Define Extent resets).
    fn start_program(&mut self) {}

    /// Executes one command.
    ///
    /// * Output (write, control): `data` holds the `count` bytes fetched from storage; the
    ///   device consumes the first `transferred`.
    /// * Input (read, sense): `data` is `count` zero bytes; the device fills
    ///   `data[..transferred]`.
    /// * Read backward: as input, in transfer order: `data[0]` is the last byte of the block
    ///   on the medium; the channel stores it at the highest address.
    fn execute(&mut self, cmd: &Command, data: &mut [u8]) -> Outcome;

    /// The sense bytes the device would return to a Sense command now (for concurrent sense).
    fn sense(&self) -> Vec<u8>;

    /// Control-unit type, model, device type, model (as Sense ID reports them).
    fn identity(&self) -> DeviceIdentity;

    /// The device is halted or cleared mid-program: drop any operation in progress.
    fn reset_operation(&mut self) {}
}

/// Device identity as Sense ID reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// Control-unit type (e.g. 0x3990).
    pub cu_type: u16,
    /// Control-unit model.
    pub cu_model: u8,
    /// Device type (e.g. 0x3390).
    pub dev_type: u16,
    /// Device model.
    pub dev_model: u8,
}

impl DeviceIdentity {
    /// The first 7 bytes of the Sense ID answer: 0xFF, CU type, CU model, device type, model.
    pub fn sense_id_bytes(&self) -> [u8; 7] {
        let cu = self.cu_type.to_be_bytes();
        let dt = self.dev_type.to_be_bytes();
        [
            0xFF,
            cu[0],
            cu[1],
            self.cu_model,
            dt[0],
            dt[1],
            self.dev_model,
        ]
    }
}
