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

/// The path of a Hercules tool (Debian package `hercules`); fails the test, never skips it,
/// when the tool is missing.
#[allow(dead_code)]
pub fn tool(name: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "Hercules tool `{name}` not found in PATH: install it with `apt-get install -y hercules`"
            )
        })
}

/// `dasdinit <path> 3390 <volser> <cyls>`: an uncompressed 3390 with IPL records and VOL1.
#[allow(dead_code)]
pub fn dasdinit(path: &Path, volser: &str, cyls: u32) {
    let out = Command::new(tool("dasdinit"))
        .arg(path)
        .arg("3390")
        .arg(volser)
        .arg(cyls.to_string())
        .output()
        .expect("run dasdinit");
    assert!(
        out.status.success(),
        "dasdinit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
