//! The vfio-ccw device as Linux defines it to user space: the regions, the IRQs, the state
//! machine, reset, and the [`Subchannel`] backend trait it drives.
//!
//! One file per concern, like the kernel: [`fsm`] (state machine), `io` (I/O region),
//! `async_cmd` (HSCH/CSCH), `chp` (SCHIB and CRW regions), [`irq`] (eventfd triggers),
//! [`subchannel`] (backend trait), `device` (the [`VfioCcwDevice`] facade and locking).

mod async_cmd;
mod chp;
mod device;
pub mod fsm;
mod io;
pub mod irq;
pub mod regions;
pub mod subchannel;

pub use device::{
    DeviceConfig, DeviceError, DeviceInfo, IoRegionMirror, IrqInfo, RegionInfo, RegionType,
    VfioCcwDevice, ASYNC_REGION_INDEX, CRW_REGION_INDEX, IO_REGION_INDEX, NUM_REGIONS,
    SCHIB_REGION_INDEX,
};
pub use fsm::State;
pub use irq::{
    wait_eventfd, EventfdWaitError, IrqIndex, IrqLatch, IrqNotify, IrqSet, IrqSetData, IrqTriggers,
};
pub use subchannel::{Subchannel, SubchannelEvents};
