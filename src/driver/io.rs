//! The I/O region (`struct ccw_io_region`): start requests and their results (Linux
//! `vfio_ccw_mdev_{read,write}_io_region` and `fsm_io_request` / `fsm_io_helper`).

use std::sync::Arc;

use super::device::{region_range, DeviceError, Inner, Shared};
use super::fsm::State;
use super::regions::{CCW_IO_REGION_SIZE, IO_ORB_OFFSET, IO_RET_CODE_OFFSET, IO_SCSW_OFFSET};
use crate::ccw::{translate, ChannelStatus};
use crate::orb::{fctl, stctl, Irb, Orb, Scsw, ScswFlags};
use crate::orb::{IRB_SIZE, ORB_SIZE, SCSW_SIZE};

/// Stores `ret` (0 or a negative errno) in the region's host-order `ret_code`.
pub(super) fn set_ret_code(region: &mut [u8; CCW_IO_REGION_SIZE], ret: i32) {
    region[IO_RET_CODE_OFFSET..].copy_from_slice(&ret.to_ne_bytes());
}

/// The region's `ret_code`.
pub(super) fn ret_code(region: &[u8; CCW_IO_REGION_SIZE]) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&region[IO_RET_CODE_OFFSET..]);
    i32::from_ne_bytes(b)
}

/// The 12-byte ORB or SCSW area at `at` (both areas are 12 bytes).
fn area(region: &[u8; CCW_IO_REGION_SIZE], at: usize) -> &[u8; ORB_SIZE] {
    const _: () = assert!(ORB_SIZE == SCSW_SIZE);
    region[at..at + ORB_SIZE]
        .try_into()
        .expect("12-byte area inside the 124-byte region")
}

/// What a write returns: the byte count, or the request's `ret_code`.
pub(super) fn write_result(ret: i32, len: usize) -> Result<usize, DeviceError> {
    if ret != 0 {
        // A positive ret_code never comes from this device; treat it as an errno anyway.
        Err(DeviceError::Refused(ret.unsigned_abs() as i32))
    } else {
        Ok(len)
    }
}

/// The status a channel presents for a program it refuses (errors_as_status): the start
/// function ended with primary and secondary status, alert when the subchannel status
/// reports an error, the CPA the guest gave.
pub(super) fn refused_program_irb(orb: &Orb, cs: ChannelStatus, lpm: u8) -> Irb {
    let mut st = stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING;
    if cs.cstat != 0 {
        st |= stctl::ALERT;
    }
    let c = &orb.ctl;
    let flags = ScswFlags::new()
        .with_key(c.key())
        .with_format1(c.format1())
        .with_prefetch(c.prefetch())
        .with_initial_status_interrupt(c.initial_status_interrupt())
        .with_address_limit_checking(c.address_limit_checking())
        .with_suppress_suspended_interrupt(c.suppress_suspended_interrupt())
        .with_fctl(fctl::START)
        .with_stctl(st);
    let scsw = Scsw {
        flags,
        cpa: orb.cpa,
        dstat: cs.dstat,
        cstat: cs.cstat,
        count: 0,
    };
    // The last path used: the first one both the ORB and the device allow.
    let paths = if c.lpm() == 0 { 0xff } else { c.lpm() } & lpm;
    let lpum = if paths == 0 {
        0
    } else {
        0x80 >> paths.leading_zeros()
    };
    Irb::new(scsw, lpum)
}

impl Shared {
    pub(super) fn read_io_region(&self, offset: u64, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let r = region_range(offset, buf.len(), CCW_IO_REGION_SIZE)?;
        let st = self.lock();
        let src = &st.io_region[r];
        // The usual read (the IRB) as a fixed-size copy: no call.
        match (
            <&mut [u8; IRB_SIZE]>::try_from(&mut *buf),
            <&[u8; IRB_SIZE]>::try_from(src),
        ) {
            (Ok(d), Ok(s)) => *d = *s,
            _ => buf.copy_from_slice(src),
        }
        Ok(buf.len())
    }

    pub(super) fn write_io_region(&self, offset: u64, data: &[u8]) -> Result<usize, DeviceError> {
        let r = region_range(offset, data.len(), CCW_IO_REGION_SIZE)?;
        let mut st = self.try_lock().ok_or(DeviceError::Again)?;
        // The usual write (the whole region, as QEMU writes it) as a fixed-size copy.
        match <&[u8; CCW_IO_REGION_SIZE]>::try_from(data) {
            Ok(all) => st.io_region = *all,
            Err(_) => st.io_region[r].copy_from_slice(data),
        }
        self.fsm_event(&mut st, super::fsm::Event::IoReq);
        self.mirror_io(&st);
        write_result(ret_code(&st.io_region), data.len())
    }

    /// Hands the current region image to the mirror, if one is installed.
    pub(super) fn mirror_io(&self, st: &Inner) {
        if let Some(m) = st.io_mirror.as_ref() {
            m.update(&st.io_region);
        }
    }

    /// Linux `fsm_io_request` + `fsm_io_helper`.
    pub(super) fn io_request(&self, st: &mut Inner) {
        st.state = State::CpProcessing;
        // Only the function control and the ORB are needed: decode them in place rather
        // than copy the whole 124-byte image.
        let f = Scsw::from_bytes(area(&st.io_region, IO_SCSW_OFFSET))
            .flags
            .fctl();
        let ret = if f & fctl::START != 0 {
            let orb = Orb::from_bytes(area(&st.io_region, IO_ORB_OFFSET));
            Some(self.start_request(st, &orb))
        } else if f & (fctl::HALT | fctl::CLEAR) != 0 {
            // Halt and clear go through the async region.
            Some(-libc::EOPNOTSUPP)
        } else {
            // No function: Linux leaves ret_code as the client wrote it.
            None
        };
        if let Some(ret) = ret {
            self.set_io_ret(st, ret);
        }
        if ret != Some(0) {
            // Any error frees the program (start_request already dropped it).
            st.program = None;
            st.state = State::Idle;
        }
    }

    /// Translates and starts; 0 (state CP_PENDING) or a negative errno.
    fn start_request(&self, st: &mut Inner, orb: &Orb) -> i32 {
        // Linux refuses transport mode before building anything.
        if orb.ctl.transport_mode() {
            return -libc::EOPNOTSUPP;
        }
        let program = match translate(orb, &self.store, &self.cfg.translate) {
            Ok(p) => Arc::new(p),
            Err(e) if self.cfg.errors_as_status => {
                tracing::debug!(%e, "refused program presented as channel status");
                self.push_local(refused_program_irb(orb, e.channel_status(), st.lpm));
                st.state = State::CpPending;
                return 0;
            }
            Err(e) => {
                tracing::debug!(%e, "channel program refused");
                return -e.errno();
            }
        };
        let host_lpm = program.orb().ctl.lpm();
        st.last_mapper = Some(program.scsw_mapper());
        st.program = Some(Arc::clone(&program));
        let cc = self.start_backend(st, program);
        match cc {
            0 => {
                st.state = State::CpPending;
                0
            }
            1 | 2 => -libc::EBUSY,
            3 => {
                // Linux: drop the ORB's paths from the logical path mask; other paths left
                // means this path set failed (EACCES), none means the device is gone.
                if host_lpm != 0 {
                    st.lpm &= !host_lpm;
                } else {
                    st.lpm = 0;
                }
                match self.backend.store_schib() {
                    Ok(_) if st.lpm != 0 => -libc::EACCES,
                    _ => -libc::ENODEV,
                }
            }
            _ => -libc::EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orb::{cstat, dstat, OrbControls};

    #[test]
    fn refused_program_irb_bytes() {
        // Guest ORB: key 3, format 1, prefetch, LPM 0x60, CPA 0x00012340.
        let orb = Orb {
            intparm: 1,
            ctl: OrbControls::new()
                .with_key(3)
                .with_format1(true)
                .with_prefetch(true)
                .with_lpm(0x60),
            cpa: 0x0001_2340,
        };
        let pc = ChannelStatus {
            dstat: 0,
            cstat: cstat::PROGRAM_CHECK,
        };
        let b = refused_program_irb(&orb, pc, 0xff).to_bytes();
        // SCSW word 0: key 3 (0x30), F+P (0xC0), fctl start (0x40), stctl alert|primary|
        // secondary|pending (0x17).
        assert_eq!(
            &b[..12],
            &[0x30, 0xC0, 0x40, 0x17, 0x00, 0x01, 0x23, 0x40, 0x00, 0x20, 0, 0]
        );
        // ESW format 1: LPUM = first path of 0x60 & 0xff = 0x40, at byte 13.
        assert_eq!(b[13], 0x40);
        assert!(b[32..].iter().all(|&x| x == 0));
        // Unit exception (a limit of the mediator): not alert.
        let ue = ChannelStatus {
            dstat: dstat::CHANNEL_END | dstat::DEVICE_END | dstat::UNIT_EXCEPTION,
            cstat: 0,
        };
        let b = refused_program_irb(&orb, ue, 0x80).to_bytes();
        assert_eq!(b[3], 0x07);
        assert_eq!((b[8], b[9]), (0x0D, 0));
        // No common path: LPUM 0.
        assert_eq!(b[13], 0);
    }

    #[test]
    fn ret_code_is_host_order() {
        let mut r = [0u8; CCW_IO_REGION_SIZE];
        set_ret_code(&mut r, -libc::EBUSY);
        assert_eq!(&r[120..], &(-16i32).to_ne_bytes());
        assert_eq!(ret_code(&r), -16);
        assert_eq!(write_result(0, 124), Ok(124));
        assert_eq!(write_result(-16, 124), Err(DeviceError::Refused(16)));
    }
}
