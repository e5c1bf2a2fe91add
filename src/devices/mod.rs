//! Device models driven by the emulated channel.

pub mod tape3490;
