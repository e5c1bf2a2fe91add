//! The async command region (`struct ccw_cmd_region`): HALT and CLEAR SUBCHANNEL (Linux
//! `vfio_ccw_async.c` and `fsm_async_request` / `fsm_do_halt` / `fsm_do_clear`).

use super::device::{region_range, DeviceError, Inner, Shared};
use super::io::write_result;
use super::regions::{CCW_CMD_REGION_SIZE, VFIO_CCW_ASYNC_CMD_CSCH, VFIO_CCW_ASYNC_CMD_HSCH};

/// Offset of `ret_code` in the command region.
const CMD_RET_CODE_OFFSET: usize = 4;

impl Shared {
    pub(super) fn read_cmd_region(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, DeviceError> {
        let r = region_range(offset, buf.len(), CCW_CMD_REGION_SIZE)?;
        let st = self.lock();
        buf.copy_from_slice(&st.cmd_region[r]);
        Ok(buf.len())
    }

    pub(super) fn write_cmd_region(&self, offset: u64, data: &[u8]) -> Result<usize, DeviceError> {
        let r = region_range(offset, data.len(), CCW_CMD_REGION_SIZE)?;
        let mut st = self.try_lock().ok_or(DeviceError::Again)?;
        st.cmd_region[r].copy_from_slice(data);
        self.fsm_event(&mut st, super::fsm::Event::AsyncReq);
        write_result(cmd_ret_code(&st.cmd_region), data.len())
    }

    pub(super) fn set_cmd_ret(&self, st: &mut Inner, ret: i32) {
        st.cmd_region[CMD_RET_CODE_OFFSET..].copy_from_slice(&ret.to_ne_bytes());
    }

    /// Linux `fsm_async_request`.
    pub(super) fn async_request(&self, st: &mut Inner) {
        let mut b = [0u8; 4];
        b.copy_from_slice(&st.cmd_region[..4]);
        let ret = match u32::from_ne_bytes(b) {
            VFIO_CCW_ASYNC_CMD_HSCH => match self.backend.halt() {
                0 => {
                    st.async_pending = true;
                    0
                }
                1 | 2 => -libc::EBUSY,
                3 => -libc::ENODEV,
                _ => -libc::EIO,
            },
            VFIO_CCW_ASYNC_CMD_CSCH => match self.backend.clear() {
                0 => {
                    st.async_pending = true;
                    0
                }
                3 => -libc::ENODEV,
                // CSCH sets only cc 0 or 3; Linux would pass a stray cc up as a positive
                // "byte count". Busy is the honest answer.
                _ => -libc::EBUSY,
            },
            _ => -libc::EINVAL,
        };
        self.set_cmd_ret(st, ret);
    }
}

fn cmd_ret_code(region: &[u8; CCW_CMD_REGION_SIZE]) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&region[CMD_RET_CODE_OFFSET..]);
    i32::from_ne_bytes(b)
}
