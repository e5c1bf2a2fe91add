//! Channel programs: CCW formats 0 and 1, IDAWs, MIDAWs, and the translator that turns a
//! guest channel program into one a channel can run.

#[allow(clippy::module_inception)]
mod ccw;
mod idaw;
mod midaw;

pub use ccw::{command, Ccw0, Ccw1, CcwFlags, CommandKind, CommandSet, CCW_SIZE};
pub use idaw::{Idaw, IdawFormat};
pub use midaw::{Midaw, MidawFlags, MIDAW_SIZE};
mod error;
mod program;
mod translate;

pub use error::{ChannelStatus, TranslateError};
pub use program::{HostProgram, PageRef, ScswMapper, SegmentInfo};
pub use translate::{translate, TranslateConfig};
