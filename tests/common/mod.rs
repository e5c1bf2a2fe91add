//! Helpers shared by the integration tests.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// A command that runs `exe`, a binary of this build (through `qemu-s390x` in the big-endian
/// suite: see `vccw::service::demo::exe_command`).
#[allow(dead_code)]
pub fn command(exe: impl AsRef<OsStr>) -> Command {
    vccw::service::demo::exe_command(Path::new(exe.as_ref()))
}

/// Under qemu-user every instruction is emulated: time bounds that guard against hangs (not
/// measurements) are this many times wider there.
#[allow(dead_code)]
pub fn slowdown() -> u32 {
    if std::env::var_os("VCCW_UNDER_QEMU").is_some() {
        8
    } else {
        1
    }
}
