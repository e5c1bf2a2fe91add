//! Helpers shared by the vccw fuzz targets: a byte reader that never fails (missing bytes
//! read as zero, so every input decodes to *something*) and a scratch directory on tmpfs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Reads fixed-size fields from the front of the fuzz input; past the end every field is 0.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps the fuzz input.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        let r = self.data;
        self.data = &[];
        r
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let s = self.bytes(2);
        b[..s.len()].copy_from_slice(s);
        u16::from_be_bytes(b)
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let s = self.bytes(4);
        b[..s.len()].copy_from_slice(s);
        u32::from_be_bytes(b)
    }
}

/// A fresh, empty directory for this process on tmpfs (`/dev/shm` when present), so image
/// files cost no disk I/O. Each call returns a new directory; the caller removes it.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!(
        "vccw-fuzz-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// An anonymous in-memory file (memfd) holding `bytes`, positioned at 0.
pub fn memfd_with(bytes: &[u8]) -> std::fs::File {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"vccw-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(bytes).expect("write memfd");
    f
}

/// A path that opens `file` again (`/proc/self/fd/N`), for APIs that take paths.
pub fn fd_path(file: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Most commands one input may issue.
pub const MAX_COMMANDS: usize = 48;
/// Largest count a command is offered (one CCW's count; a data chain could offer more).
pub const MAX_COUNT: usize = 0x1_0000;

/// Decodes commands from `inp` and runs them on `dev`, checking each outcome:
/// `transferred <= count`, only CE, DE, UC, UX, SM in the status, CE and DE present unless
/// the status is unit check alone (initial status: nothing transferred), sense bytes
/// available after a unit check.
///
/// Each command is `code u8, flags u8, count u16, dlen u16, data[dlen]`: flags bit 0 starts
/// a new channel program first (not chained), bit 1 adds 0x10000 to the count (a data chain
/// longer than one CCW); output data is `data` padded with zeros to `count`.
pub fn run_commands(inp: &mut Input, dev: &mut dyn vccw::css::DeviceModel) {
    use vccw::ccw::CommandKind;
    use vccw::css::Command;
    use vccw::orb::dstat;

    dev.start_program();
    let mut prev: Option<u8> = None;
    let mut seq = 0u32;
    let mut buf = Vec::new();
    for _ in 0..MAX_COMMANDS {
        if inp.is_empty() {
            break;
        }
        let code = inp.u8();
        let flags = inp.u8();
        let mut count = inp.u16() as usize;
        if flags & 2 != 0 {
            count += MAX_COUNT;
        }
        let dlen = inp.u16() as usize;
        let d = inp.bytes(dlen);
        if flags & 1 != 0 {
            dev.start_program();
            prev = None;
            seq = 0;
        }
        let kind = CommandKind::of(code);
        if matches!(kind, CommandKind::Invalid | CommandKind::Tic) {
            // The channel never hands these to a device.
            continue;
        }
        buf.clear();
        buf.resize(count, 0);
        if matches!(kind, CommandKind::Write | CommandKind::Control) {
            let n = d.len().min(count);
            buf[..n].copy_from_slice(&d[..n]);
        }
        let cmd = Command {
            code,
            kind,
            count,
            chained: prev.is_some(),
            prev_code: prev,
            seq,
        };
        let out = dev.execute(&cmd, &mut buf);
        assert!(
            out.transferred <= count,
            "{cmd:?}: transferred {} > count",
            out.transferred
        );
        let allowed = dstat::CHANNEL_END
            | dstat::DEVICE_END
            | dstat::UNIT_CHECK
            | dstat::UNIT_EXCEPTION
            | dstat::STATUS_MODIFIER;
        assert_eq!(
            out.status & !allowed,
            0,
            "{cmd:?}: status {:#04x}",
            out.status
        );
        // Unit check alone is initial status (command rejected before any data moved);
        // everything else ends the command with channel end and device end.
        if out.status == dstat::UNIT_CHECK {
            assert_eq!(
                out.transferred, 0,
                "{cmd:?}: data moved with initial unit check"
            );
        } else {
            assert_eq!(
                out.status & (dstat::CHANNEL_END | dstat::DEVICE_END),
                dstat::CHANNEL_END | dstat::DEVICE_END,
                "{cmd:?}: status {:#04x} without CE DE",
                out.status
            );
        }
        if out.status & dstat::UNIT_CHECK != 0 {
            let s = dev.sense();
            assert!(!s.is_empty() && s.len() <= 32, "{cmd:?}: sense {s:02x?}");
        }
        prev = Some(code);
        seq += 1;
    }
}
