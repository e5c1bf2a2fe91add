//! A deterministic device for tests of the channel engine and the translator.
//!
//! Output commands (write, control other than NOOP) append the bytes they consume to a log;
//! input commands (read, read backward, sense other than the two below) produce a pattern
//! from a running counter, so every byte of a run is distinct modulo a long period and its
//! position can be checked. Basic Sense (0x04) returns the sense bytes, Sense ID (0xE4) the
//! configured identity, NOOP (0x03) transfers nothing.

use crate::ccw::{command, CommandSet};
use crate::css::device::{Command, DataArea, DeviceIdentity, DeviceModel, Outcome};
use crate::orb::dstat;

/// How many bytes the device moves for a data command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Length {
    /// Exactly the count offered (never incorrect length).
    #[default]
    AsOffered,
    /// A fixed record length: moves `min(n, count)` and reports `more` when `n > count`.
    Fixed(usize),
}

/// Sense byte 0 bit the device sets on a configured unit check (command reject).
pub const SENSE_COMMAND_REJECT: u8 = 0x80;

/// A loopback test device.
#[derive(Debug, Clone)]
pub struct LoopbackDevice {
    /// Bytes per data command.
    pub length: Length,
    /// A command code answered with unit check (command reject), nothing transferred.
    pub unit_check_on: Option<u8>,
    /// A command code answered with unit exception (after its normal transfer).
    pub unit_exception_on: Option<u8>,
    /// A command code answered with status modifier (after its normal transfer).
    pub status_modifier_on: Option<u8>,
    /// What [`DeviceModel::status_modifier_commands`] declares (default: every command).
    pub declared_status_modifier: CommandSet,
    /// What Sense ID reports.
    pub identity: DeviceIdentity,
    /// Input data commands [`DataArea::put`] their bytes in chunks of this size (straight
    /// to storage) instead of filling the channel's buffer; `None` (the default) fills the
    /// buffer. Both must give the same result: tests compare them.
    pub put_chunk: Option<usize>,
    counter: u32,
    written: Vec<u8>,
    produced: Vec<u8>,
    commands: Vec<Command>,
    sense: [u8; 32],
    programs: u32,
    resets: u32,
}

impl Default for LoopbackDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl LoopbackDevice {
    /// A device moving exactly what is offered, identity 3990-E9 / 3390-0C.
    pub fn new() -> Self {
        LoopbackDevice {
            length: Length::AsOffered,
            unit_check_on: None,
            unit_exception_on: None,
            status_modifier_on: None,
            declared_status_modifier: CommandSet::ALL,
            identity: DeviceIdentity {
                cu_type: 0x3990,
                cu_model: 0xE9,
                dev_type: 0x3390,
                dev_model: 0x0C,
            },
            put_chunk: None,
            counter: 0,
            written: Vec::new(),
            produced: Vec::new(),
            commands: Vec::new(),
            sense: [0; 32],
            programs: 0,
            resets: 0,
        }
    }

    /// The input pattern byte for running position `i`.
    pub fn pattern(i: u32) -> u8 {
        // A multiplicative hash: consecutive positions differ and the period is 2^32.
        (i.wrapping_mul(0x9E37_79B1) >> 24) as u8
    }

    /// Every byte output commands consumed, in order.
    pub fn written(&self) -> &[u8] {
        &self.written
    }

    /// Every byte input commands produced (in transfer order), in order.
    pub fn produced(&self) -> &[u8] {
        &self.produced
    }

    /// The commands executed, in order.
    pub fn commands(&self) -> &[Command] {
        &self.commands
    }

    /// How many programs started and how many halts/clears reset an operation.
    pub fn counts(&self) -> (u32, u32) {
        (self.programs, self.resets)
    }

    /// Unit exception and status modifier as configured for `code`.
    fn extra_status(&self, code: u8, out: &mut Outcome) {
        if Some(code) == self.unit_exception_on {
            out.status |= dstat::UNIT_EXCEPTION;
        }
        if Some(code) == self.status_modifier_on {
            out.status |= dstat::STATUS_MODIFIER;
        }
    }

    fn data_len(&self, count: usize) -> (usize, bool) {
        match self.length {
            Length::AsOffered => (count, false),
            Length::Fixed(n) => (n.min(count), n > count),
        }
    }
}

impl DeviceModel for LoopbackDevice {
    fn status_modifier_commands(&self) -> CommandSet {
        self.declared_status_modifier
    }

    fn start_program(&mut self) {
        self.programs += 1;
    }

    fn execute(&mut self, cmd: &Command, data: &mut [u8]) -> Outcome {
        self.commands.push(*cmd);
        let count = cmd.count.min(data.len());
        if Some(cmd.code) == self.unit_check_on {
            self.sense = [0; 32];
            self.sense[0] = SENSE_COMMAND_REJECT;
            return Outcome::unit_check();
        }
        let mut out = match cmd.code {
            command::NOOP => Outcome::done(0),
            command::SENSE | command::SENSE_ID => {
                let src: Vec<u8> = if cmd.code == command::SENSE {
                    let s = self.sense.to_vec();
                    self.sense = [0; 32];
                    s
                } else {
                    self.identity.sense_id_bytes().to_vec()
                };
                let n = src.len().min(count);
                data[..n].copy_from_slice(&src[..n]);
                Outcome {
                    more: src.len() > count,
                    ..Outcome::done(n)
                }
            }
            _ if cmd.kind.is_input() => {
                let (n, more) = self.data_len(count);
                for b in &mut data[..n] {
                    *b = Self::pattern(self.counter);
                    self.counter = self.counter.wrapping_add(1);
                }
                self.produced.extend_from_slice(&data[..n]);
                Outcome {
                    more,
                    ..Outcome::done(n)
                }
            }
            _ => {
                let (n, more) = self.data_len(count);
                self.written.extend_from_slice(&data[..n]);
                Outcome {
                    more,
                    ..Outcome::done(n)
                }
            }
        };
        self.extra_status(cmd.code, &mut out);
        out
    }

    fn execute_area(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Outcome {
        let chunk = match self.put_chunk {
            Some(c)
                if c > 0
                    && cmd.kind.is_input()
                    && !matches!(cmd.code, command::SENSE | command::SENSE_ID)
                    && Some(cmd.code) != self.unit_check_on =>
            {
                c
            }
            _ => return data.with_buffer(|b| self.execute(cmd, b)),
        };
        self.commands.push(*cmd);
        let (n, more) = self.data_len(data.count());
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                let b = Self::pattern(self.counter);
                self.counter = self.counter.wrapping_add(1);
                b
            })
            .collect();
        for c in bytes.chunks(chunk) {
            data.put(c);
        }
        self.produced.extend_from_slice(&bytes);
        let mut out = Outcome {
            more,
            ..Outcome::done(n)
        };
        self.extra_status(cmd.code, &mut out);
        out
    }

    fn sense(&self) -> Vec<u8> {
        self.sense.to_vec()
    }

    fn identity(&self) -> DeviceIdentity {
        self.identity
    }

    fn reset_operation(&mut self) {
        self.resets += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ccw::CommandKind;

    fn cmd(code: u8, count: usize) -> Command {
        Command {
            code,
            kind: CommandKind::of(code),
            count,
            chained: false,
            prev_code: None,
            seq: 0,
        }
    }

    #[test]
    fn loopback_behaviour() {
        let mut d = LoopbackDevice::new();
        let mut buf = *b"wxyz";
        assert_eq!(d.execute(&cmd(0x01, 4), &mut buf), Outcome::done(4));
        assert_eq!(d.written(), b"wxyz");
        let mut buf = [0u8; 3];
        d.execute(&cmd(0x02, 3), &mut buf);
        assert_eq!(
            buf,
            [
                LoopbackDevice::pattern(0),
                LoopbackDevice::pattern(1),
                LoopbackDevice::pattern(2)
            ]
        );
        assert_ne!(LoopbackDevice::pattern(0), LoopbackDevice::pattern(1));
        d.length = Length::Fixed(2);
        let o = d.execute(&cmd(0x02, 3), &mut buf);
        assert_eq!((o.transferred, o.more), (2, false));
        d.length = Length::Fixed(5);
        let o = d.execute(&cmd(0x02, 3), &mut buf);
        assert_eq!((o.transferred, o.more), (3, true));
        let mut id = [0u8; 7];
        assert_eq!(d.execute(&cmd(0xE4, 7), &mut id), Outcome::done(7));
        assert_eq!(id, [0xFF, 0x39, 0x90, 0xE9, 0x33, 0x90, 0x0C]);
        d.unit_check_on = Some(0x07);
        assert_eq!(d.execute(&cmd(0x07, 0), &mut []), Outcome::unit_check());
        let mut s = [0u8; 32];
        d.execute(&cmd(0x04, 32), &mut s);
        assert_eq!(s[0], SENSE_COMMAND_REJECT);
        d.status_modifier_on = Some(0x03);
        assert_eq!(
            d.execute(&cmd(0x03, 0), &mut []).status,
            dstat::CHANNEL_END | dstat::DEVICE_END | dstat::STATUS_MODIFIER
        );
    }

    #[test]
    fn put_chunks_fill_a_buffer_area_like_execute() {
        let mut a = LoopbackDevice::new();
        let mut b = LoopbackDevice::new();
        b.put_chunk = Some(3);
        b.length = Length::Fixed(7);
        a.length = Length::Fixed(7);
        let (mut x, mut y) = ([0u8; 10], [0u8; 10]);
        let oa = a.execute(&cmd(0x02, 10), &mut x);
        let mut area = DataArea::buffer(&mut y);
        let ob = b.execute_area(&cmd(0x02, 10), &mut area);
        assert_eq!((area.put_len(), area.remaining()), (7, 3));
        assert_eq!(oa, ob);
        assert_eq!(ob.transferred, 7);
        assert_eq!(x, y);
        assert_eq!(&y[7..], &[0, 0, 0]);
        // Output commands still see the buffer.
        b.length = Length::AsOffered;
        let mut w = *b"out!";
        assert_eq!(
            b.execute_area(&cmd(0x01, 4), &mut DataArea::buffer(&mut w)),
            Outcome::done(4)
        );
        assert_eq!(b.written(), b"out!");
    }
}
