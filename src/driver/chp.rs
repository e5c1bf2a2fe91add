//! The SCHIB and CRW regions and channel-path events (Linux `vfio_ccw_chp.c` and the CRW
//! queue of `vfio_ccw_drv.c`).

use super::device::{region_range, DeviceError, Inner, Shared};
use super::irq::IrqIndex;
use super::regions::{CCW_CRW_REGION_SIZE, CCW_SCHIB_REGION_SIZE};
use crate::orb::{erc, rsc, Crw, CRW_SIZE};

impl Shared {
    /// A read refreshes the SCHIB from the backend (STSCH); ENODEV when that fails.
    pub(super) fn read_schib_region(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, DeviceError> {
        let r = region_range(offset, buf.len(), CCW_SCHIB_REGION_SIZE)?;
        let mut st = self.lock();
        let schib = self.backend.store_schib().map_err(|errno| {
            tracing::debug!(errno, "STSCH failed");
            DeviceError::NoDevice
        })?;
        st.schib_region = schib.to_bytes();
        st.schib = Some(schib);
        buf.copy_from_slice(&st.schib_region[r]);
        Ok(buf.len())
    }

    /// Each read pops one CRW (the region reads as zeros when none is queued) and signals
    /// the CRW IRQ again while more remain.
    pub(super) fn read_crw_region(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, DeviceError> {
        let r = region_range(offset, buf.len(), CCW_CRW_REGION_SIZE)?;
        let mut st = self.lock();
        if let Some(crw) = st.crws.pop_front() {
            st.crw_region[..CRW_SIZE].copy_from_slice(&crw.to_bytes());
        }
        buf.copy_from_slice(&st.crw_region[r]);
        st.crw_region[..CRW_SIZE].fill(0);
        if !st.crws.is_empty() {
            self.irqs.signal(IrqIndex::Crw);
        }
        Ok(buf.len())
    }

    /// A channel-path event: track the logical path mask, queue the CRW, signal CRW.
    pub(super) fn queue_crw(&self, st: &mut Inner, crw: Crw) {
        if crw.rsc() == rsc::CHANNEL_PATH {
            if let Some(mask) = st.schib.as_ref().and_then(|s| {
                (0..8)
                    .map(|i| 0x80u8 >> i)
                    .zip(s.pmcw.chpid)
                    .find(|&(m, id)| u16::from(id) == crw.rsid() && s.pmcw.pim & m != 0)
                    .map(|(m, _)| m)
            }) {
                match crw.erc() {
                    erc::INITIALIZED => st.lpm |= mask,
                    erc::PERMANENT_ERROR_NOT_INITIALIZED => st.lpm &= !mask,
                    _ => {}
                }
            }
        }
        if st.crws.len() >= self.cfg.crw_queue_limit {
            st.crw_lost = true;
        } else {
            let crw = if std::mem::take(&mut st.crw_lost) {
                crw.with_overflow(true)
            } else {
                crw
            };
            st.crws.push_back(crw);
        }
        self.irqs.signal(IrqIndex::Crw);
    }
}
