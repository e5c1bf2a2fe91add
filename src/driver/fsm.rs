//! The device state machine (Linux `vfio_ccw_fsm.c`): states, events, and the state x event
//! table of actions. The table is data; the device (`device.rs`) performs the actions.

/// Device states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// The subchannel is gone or broken; only a new device can recover.
    NotOper,
    /// Created, not opened (or closed).
    Standby,
    /// Open, no channel program outstanding.
    Idle,
    /// A start request is being translated and started.
    CpProcessing,
    /// A channel program was started and its final interrupt has not arrived yet.
    CpPending,
}

/// Device events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// The subchannel became not operational.
    NotOper,
    /// A write to the I/O region.
    IoReq,
    /// A write to the async command region.
    AsyncReq,
    /// An I/O interruption from the subchannel.
    Interrupt,
    /// The device is opened.
    Open,
    /// The device is closed (or reset: close then open).
    Close,
}

/// What the table says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Nothing.
    Nop,
    /// Go NOT_OPER and free any channel program.
    NotOper,
    /// I/O region request refused: `ret_code` -EIO.
    IoError,
    /// I/O region request refused: `ret_code` -EAGAIN.
    IoRetry,
    /// I/O region request refused: `ret_code` -EBUSY.
    IoBusy,
    /// Handle the I/O region request (translate and start).
    IoRequest,
    /// Async region request refused: `ret_code` -EIO.
    AsyncError,
    /// Async region request refused: `ret_code` -EAGAIN.
    AsyncRetry,
    /// Handle the async request (HSCH / CSCH).
    AsyncRequest,
    /// An interrupt while the subchannel should be disabled: dropped.
    DisabledIrq,
    /// Handle the interrupt: store the IRB, signal the IO eventfd.
    Irq,
    /// Open: check the subchannel and go IDLE (NOT_OPER if it is gone).
    Open,
    /// Close: quiesce, free the program, go STANDBY (NOT_OPER if quiescing fails).
    Close,
}

/// All states, in table order.
pub const STATES: [State; 5] = [
    State::NotOper,
    State::Standby,
    State::Idle,
    State::CpProcessing,
    State::CpPending,
];

/// All events, in table order.
pub const EVENTS: [Event; 6] = [
    Event::NotOper,
    Event::IoReq,
    Event::AsyncReq,
    Event::Interrupt,
    Event::Open,
    Event::Close,
];

/// The state x event table, row per state, column per event (order of [`STATES`] and
/// [`EVENTS`]), exactly as Linux's `vfio_ccw_jumptable`.
pub const TABLE: [[Action; 6]; 5] = {
    use Action::*;
    [
        // NOT_OPER
        [Nop, IoError, AsyncError, DisabledIrq, Nop, Nop],
        // STANDBY
        [NotOper, IoError, AsyncError, DisabledIrq, Open, NotOper],
        // IDLE
        [NotOper, IoRequest, AsyncRequest, Irq, NotOper, Close],
        // CP_PROCESSING
        [NotOper, IoRetry, AsyncRetry, Irq, NotOper, Close],
        // CP_PENDING
        [NotOper, IoBusy, AsyncRequest, Irq, NotOper, Close],
    ]
};

/// The action for `event` in `state`.
pub const fn action(state: State, event: Event) -> Action {
    TABLE[state as usize][event as usize]
}

// ---- The actions (Linux fsm_* handlers and vfio_ccw_sch_io_todo). ----

use super::device::{Inner, Shared};
use super::irq::IrqIndex;
use super::regions::IO_IRB_OFFSET;
use crate::orb::{actl, stctl, Irb, Scsw};

/// Linux `scsw_is_solicited` (command mode): unsolicited is alert status alone with cc 0.
pub(super) fn is_solicited(scsw: &Scsw) -> bool {
    scsw.flags.deferred_cc() != 0 || scsw.flags.stctl() != (stctl::ALERT | stctl::STATUS_PENDING)
}

/// Linux's finality test: neither subchannel nor device active.
pub(super) fn is_final(scsw: &Scsw) -> bool {
    scsw.flags.actl() & (actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE) == 0
}

impl Shared {
    /// Runs the table's action for `event` (not INTERRUPT, see [`Shared::fsm_interrupt`]).
    pub(super) fn fsm_event(&self, st: &mut Inner, event: Event) {
        debug_assert!(event != Event::Interrupt);
        let act = action(st.state, event);
        tracing::trace!(state = ?st.state, ?event, ?act, "fsm");
        match act {
            Action::Nop | Action::DisabledIrq | Action::Irq => {}
            Action::NotOper => self.fsm_notoper(st),
            Action::IoError => self.set_io_ret(st, -libc::EIO),
            Action::IoRetry => self.set_io_ret(st, -libc::EAGAIN),
            Action::IoBusy => self.set_io_ret(st, -libc::EBUSY),
            Action::IoRequest => self.io_request(st),
            Action::AsyncError => self.set_cmd_ret(st, -libc::EIO),
            Action::AsyncRetry => self.set_cmd_ret(st, -libc::EAGAIN),
            Action::AsyncRequest => self.async_request(st),
            Action::Open => self.fsm_open(st),
            Action::Close => self.fsm_close(st),
        }
    }

    /// The INTERRUPT event with its IRB.
    pub(super) fn fsm_interrupt(&self, st: &mut Inner, irb: Irb) {
        match action(st.state, Event::Interrupt) {
            Action::Irq => self.io_todo(st, irb),
            // Linux tries to disable the subchannel again; there is nothing to disable here,
            // the status is dropped.
            _ => tracing::debug!(state = ?st.state, "interrupt while closed: dropped"),
        }
    }

    /// Linux `vfio_ccw_sch_io_todo`: rewrite solicited status for the guest, free a
    /// finished program, store the IRB, signal IO.
    fn io_todo(&self, st: &mut Inner, mut irb: Irb) {
        let fin = is_final(&irb.scsw);
        let mut finished = false;
        if is_solicited(&irb.scsw) {
            if let Some(p) = st.program.as_ref() {
                irb.scsw = p.to_guest_scsw(&irb.scsw);
            } else if let Some(m) = st.last_mapper.as_ref() {
                irb.scsw = m.to_guest_scsw(&irb.scsw);
            }
            if fin {
                st.async_pending = false;
                if st.state == State::CpPending {
                    // The backend dropped its clone before delivering this: this unpins.
                    st.program = None;
                    finished = true;
                }
            }
        }
        st.io_region[IO_IRB_OFFSET..IO_IRB_OFFSET + crate::orb::IRB_SIZE]
            .copy_from_slice(&irb.to_bytes());
        if finished {
            st.state = State::Idle;
        }
        // The mirror first: a client that saw the eventfd reads the IRB from it.
        self.mirror_io(st);
        self.irqs.signal(IrqIndex::Io);
    }

    /// Linux `fsm_notoper`.
    fn fsm_notoper(&self, st: &mut Inner) {
        st.state = State::NotOper;
        st.program = None;
        st.async_pending = false;
    }

    /// Linux `fsm_open`: the subchannel must answer STORE SUBCHANNEL (the enable).
    fn fsm_open(&self, st: &mut Inner) {
        match self.backend.store_schib() {
            Ok(schib) => {
                let p = &schib.pmcw;
                st.lpm = p.pim & p.pam & p.pom;
                st.schib = Some(schib);
                st.state = State::Idle;
            }
            Err(errno) => {
                tracing::warn!(errno, "open: subchannel not operational");
                self.fsm_event(st, Event::NotOper);
            }
        }
    }

    /// Linux `fsm_close`: quiesce, free the program, STANDBY; NOT_OPER when quiescing fails.
    fn fsm_close(&self, st: &mut Inner) {
        if self.quiesce(st) {
            st.state = State::Standby;
            st.program = None;
            st.async_pending = false;
        } else {
            tracing::warn!("could not quiesce the subchannel");
            self.fsm_event(st, Event::NotOper);
        }
    }

    /// Linux `vfio_ccw_sch_quiesce`, with CLEAR SUBCHANNEL as the only tool: nothing to do
    /// when no program or halt/clear is outstanding; otherwise clear and wait for the final
    /// interrupt (handling it like any other), at most `quiesce_retries` times.
    fn quiesce(&self, st: &mut Inner) -> bool {
        for _ in 0..self.cfg.quiesce_retries.max(1) {
            if st.program.is_none() && !st.async_pending {
                return true;
            }
            match self.backend.clear() {
                0 => st.async_pending = true,
                3 => return false,
                _ => continue,
            }
            while st.async_pending {
                match self.wait_event(self.cfg.quiesce_timeout) {
                    Some(ev) => self.handle(st, ev),
                    None => break,
                }
            }
            if !st.async_pending {
                // The clear ended the program whatever the state was.
                st.program = None;
                return true;
            }
        }
        st.program.is_none() && !st.async_pending
    }

    pub(super) fn set_io_ret(&self, st: &mut Inner, ret: i32) {
        super::io::set_ret_code(&mut st.io_region, ret);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_order_matches_table_order() {
        for (i, s) in STATES.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        for (i, e) in EVENTS.iter().enumerate() {
            assert_eq!(*e as usize, i);
        }
    }

    #[test]
    fn every_cell_matches_linux() {
        use Action as A;
        use Event as E;
        use State as S;
        let want = [
            (S::NotOper, E::NotOper, A::Nop),
            (S::NotOper, E::IoReq, A::IoError),
            (S::NotOper, E::AsyncReq, A::AsyncError),
            (S::NotOper, E::Interrupt, A::DisabledIrq),
            (S::NotOper, E::Open, A::Nop),
            (S::NotOper, E::Close, A::Nop),
            (S::Standby, E::NotOper, A::NotOper),
            (S::Standby, E::IoReq, A::IoError),
            (S::Standby, E::AsyncReq, A::AsyncError),
            (S::Standby, E::Interrupt, A::DisabledIrq),
            (S::Standby, E::Open, A::Open),
            (S::Standby, E::Close, A::NotOper),
            (S::Idle, E::NotOper, A::NotOper),
            (S::Idle, E::IoReq, A::IoRequest),
            (S::Idle, E::AsyncReq, A::AsyncRequest),
            (S::Idle, E::Interrupt, A::Irq),
            (S::Idle, E::Open, A::NotOper),
            (S::Idle, E::Close, A::Close),
            (S::CpProcessing, E::NotOper, A::NotOper),
            (S::CpProcessing, E::IoReq, A::IoRetry),
            (S::CpProcessing, E::AsyncReq, A::AsyncRetry),
            (S::CpProcessing, E::Interrupt, A::Irq),
            (S::CpProcessing, E::Open, A::NotOper),
            (S::CpProcessing, E::Close, A::Close),
            (S::CpPending, E::NotOper, A::NotOper),
            (S::CpPending, E::IoReq, A::IoBusy),
            (S::CpPending, E::AsyncReq, A::AsyncRequest),
            (S::CpPending, E::Interrupt, A::Irq),
            (S::CpPending, E::Open, A::NotOper),
            (S::CpPending, E::Close, A::Close),
        ];
        assert_eq!(want.len(), STATES.len() * EVENTS.len());
        for (s, e, a) in want {
            assert_eq!(action(s, e), a, "{s:?} x {e:?}");
        }
    }
}
