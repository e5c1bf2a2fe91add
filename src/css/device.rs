//! The interface between the channel and a device model (3390 DASD, 3490 tape, test devices).
//!
//! The channel owns chaining, addressing and storage access; a device model sees one command
//! at a time with its data as one [`DataArea`]. For a data-chained run of CCWs the channel
//! gathers (output) or scatters (input) across all of them, so `count` is the total the run
//! offers, as a device on a real channel would see it.
//!
//! Output data is fetched into a buffer before the device runs (a fetch fault must shorten
//! the offer). Input can go two ways: a device that produces its bytes in order calls
//! [`DataArea::put`], and the channel stores them straight into storage (one copy, no bounce
//! buffer); any other device gets a zeroed buffer through [`DataArea::with_buffer`] (the
//! default [`DeviceModel::execute_area`]), and the channel stores what it transferred after.

use crate::ccw::{CommandKind, CommandSet};

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

/// Where a command's input goes once [`DataArea::put`] hands it over: the channel's scatter
/// into storage. Bytes arrive at increasing transfer offsets; the sink drops what it may not
/// store (skip, past a chain error, after a storage fault).
pub(crate) trait InputSink {
    /// Stores `src` at transfer offset `off`.
    fn store(&mut self, off: usize, src: &[u8]);
    /// A reusable buffer for [`DataArea::with_buffer`] (returned by `give_back`).
    fn take_buffer(&mut self) -> Vec<u8>;
    /// Returns the buffer from `take_buffer`.
    fn give_back(&mut self, buf: Vec<u8>);
}

enum Target<'a> {
    /// A buffer of exactly `count` bytes: output data, or input collected for the caller.
    Buffer(&'a mut [u8]),
    /// Input stored through the channel as it is put.
    Store(&'a mut dyn InputSink),
}

/// The data area of one command, as the device sees it: `count` bytes in transfer order.
///
/// * Output (write, control): [`Self::output`] holds the bytes fetched from storage.
/// * Input (read, sense, read backward): the device either [`put`](Self::put)s its bytes in
///   transfer order, exactly the ones it transfers (no more: what is put is stored at once),
///   or fills a zeroed buffer inside [`Self::with_buffer`]. If the outcome reports more
///   bytes transferred than were put, the channel stores zeros for the rest, as the buffer
///   path would. For read backward, transfer order starts with the last byte of the block
///   on the medium, which the channel stores at the highest address.
///
/// The area never exposes guest storage as a Rust slice: guest memory is shared with the
/// guest and may change at any time, so input goes through the channel's checked copies.
pub struct DataArea<'a> {
    count: usize,
    put: usize,
    target: Target<'a>,
}

impl std::fmt::Debug for DataArea<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataArea")
            .field("count", &self.count)
            .field("put", &self.put)
            .field("direct", &matches!(self.target, Target::Store(_)))
            .finish()
    }
}

impl<'a> DataArea<'a> {
    /// An area over a plain buffer of `buf.len()` bytes: output data to consume, or (zeroed)
    /// room for input, which `put` fills from the start. Tests and adapters use it; the
    /// channel uses it for output.
    pub fn buffer(buf: &'a mut [u8]) -> Self {
        DataArea {
            count: buf.len(),
            put: 0,
            target: Target::Buffer(buf),
        }
    }

    /// An input area whose bytes the channel stores as they are put.
    pub(crate) fn direct(count: usize, sink: &'a mut dyn InputSink) -> Self {
        DataArea {
            count,
            put: 0,
            target: Target::Store(sink),
        }
    }

    /// Bytes offered (the `count` of the command).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes put so far (input).
    pub fn put_len(&self) -> usize {
        self.put
    }

    /// Room left for [`Self::put`].
    pub fn remaining(&self) -> usize {
        self.count - self.put
    }

    /// Output data fetched from storage: `count` bytes. Empty for a direct input area.
    pub fn output(&self) -> &[u8] {
        match &self.target {
            Target::Buffer(b) => b,
            Target::Store(_) => &[],
        }
    }

    /// Appends input bytes in transfer order, as many as fit; returns how many were taken.
    #[inline]
    pub fn put(&mut self, src: &[u8]) -> usize {
        let n = src.len().min(self.remaining());
        if n == 0 {
            return 0;
        }
        match &mut self.target {
            Target::Buffer(b) => b[self.put..self.put + n].copy_from_slice(&src[..n]),
            Target::Store(s) => s.store(self.put, &src[..n]),
        }
        self.put += n;
        n
    }

    /// Runs `f` over a buffer of the area (`count` bytes: the output data, or zeros for
    /// input) and, for a direct input area, has the channel store the first
    /// `transferred` bytes after. For input, use either this or `put`, not both.
    pub fn with_buffer(&mut self, f: impl FnOnce(&mut [u8]) -> Outcome) -> Outcome {
        match &mut self.target {
            Target::Buffer(b) => f(b),
            Target::Store(s) => {
                let mut buf = s.take_buffer();
                buf.clear();
                buf.resize(self.count, 0);
                let o = f(&mut buf);
                let t = o.transferred.min(self.count);
                if t > 0 {
                    s.store(0, &buf[..t]);
                }
                s.give_back(buf);
                self.put = t;
                o
            }
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

    /// Executes one command over a [`DataArea`]; this is what the channel calls. The
    /// default runs [`Self::execute`] over a buffer; a device that produces input in order
    /// overrides it to [`DataArea::put`] its bytes straight to storage.
    fn execute_area(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Outcome {
        data.with_buffer(|buf| self.execute(cmd, buf))
    }

    /// The sense bytes the device would return to a Sense command now (for concurrent sense).
    fn sense(&self) -> Vec<u8>;

    /// Control-unit type, model, device type, model (as Sense ID reports them).
    fn identity(&self) -> DeviceIdentity;

    /// The device is halted or cleared mid-program: drop any operation in progress.
    fn reset_operation(&mut self) {}

    /// The commands after which this device may present status modifier (see
    /// [`TranslateConfig::status_modifier`](crate::ccw::TranslateConfig)). The default,
    /// every command, is always safe; a narrower set spares the translator the slot after a
    /// chain's end. The channel drops status modifier from any other command.
    fn status_modifier_commands(&self) -> CommandSet {
        CommandSet::ALL
    }
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
