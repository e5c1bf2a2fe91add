//! The emulated channel subsystem: a channel that runs translated programs against device
//! models, touching storage only through [`ChannelMemory`].

pub mod device;
pub mod memory;

pub use device::{Command, DeviceIdentity, DeviceModel, Outcome};
pub use memory::{AccessFault, ChannelMemory};
