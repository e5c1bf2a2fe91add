//! The emulated channel subsystem: a channel that runs translated programs against device
//! models, touching storage only through [`ChannelMemory`].

pub mod channel;
pub mod device;
pub mod guest;
pub mod memory;
pub mod subchannel;
pub mod testdev;

pub use channel::{run_to_completion, ChannelRun, ResumeError, Step, Transfer};
pub use device::{Command, DataArea, DeviceIdentity, DeviceModel, Outcome};
pub use guest::GuestChannelMemory;
pub use memory::{AccessFault, ChannelMemory};
pub use subchannel::{
    EmulatedSubchannel, EventSink, HandoffStats, InlinePolicy, SpinPolicy, SubchannelConfig,
    SubchannelEvent,
};
pub use testdev::LoopbackDevice;
