//! [`IoMirror`]: a read-only shared-memory mirror of a device's I/O region, so a client
//! that saw the I/O eventfd reads the IRB from its own mapping instead of paying a
//! REGION_READ round trip.
//!
//! The mirror is a one-page memfd. The server maps it read-write, *then* seals it with
//! `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE | F_SEAL_SEAL`: the server's own
//! mapping stays writable, but every later `write(2)` or shared writable mmap of the fd
//! fails (EPERM), so the client can only map it read-only, cannot resize it (a shrunk file
//! would SIGBUS either side) and cannot lift the seals. The device writes every new region
//! image into it ([`IoRegionMirror`]) before it signals the IO eventfd. The server never
//! reads it: region writes still come as REGION_WRITE messages, and REGION_READ still works.
//!
//! `F_SEAL_FUTURE_WRITE` needs Linux 5.1; where it (or memfd sealing) is missing,
//! [`IoMirror::new`] fails and the region is simply not offered for mmap.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use thiserror::Error;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::driver::regions::CCW_IO_REGION_SIZE;
use crate::driver::IoRegionMirror;

/// Size of the mirror file (one page covers the 124-byte region on every s390/x86 host).
pub const MIRROR_FILE_SIZE: usize = 4096;

/// Why a mirror could not be made.
#[derive(Debug, Error)]
pub enum MirrorError {
    /// memfd_create, ftruncate or dup failed (its errno).
    #[error("memfd: {0}")]
    Memfd(Errno),
    /// The server's mapping failed.
    #[error("mmap: {0}")]
    Mmap(String),
    /// The seals could not be applied (EINVAL: a kernel without `F_SEAL_FUTURE_WRITE`).
    #[error("seal: {0}")]
    Seal(Errno),
}

/// The mirror of one connection's I/O region (see the module documentation).
pub struct IoMirror {
    fd: OwnedFd,
    map: MmapRegion,
}

impl std::fmt::Debug for IoMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoMirror").finish_non_exhaustive()
    }
}

impl IoMirror {
    /// A zeroed, sealed mirror with the server's writable mapping.
    pub fn new() -> Result<IoMirror, MirrorError> {
        let fd = memfd_create(
            "vccw-io-region",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(MirrorError::Memfd)?;
        nix::unistd::ftruncate(&fd, MIRROR_FILE_SIZE as i64).map_err(MirrorError::Memfd)?;
        let file = std::fs::File::from(
            fd.try_clone()
                .map_err(|_| MirrorError::Memfd(Errno::EMFILE))?,
        );
        // Mapped before sealing: F_SEAL_FUTURE_WRITE spares existing writable mappings only.
        let map = MmapRegion::from_file(FileOffset::new(file, 0), MIRROR_FILE_SIZE)
            .map_err(|e| MirrorError::Mmap(e.to_string()))?;
        let seals = SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_FUTURE_WRITE
            | SealFlag::F_SEAL_SEAL;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).map_err(MirrorError::Seal)?;
        Ok(IoMirror { fd, map })
    }

    /// A descriptor for the client (a dup of the sealed memfd).
    pub fn client_fd(&self) -> Result<OwnedFd, MirrorError> {
        self.fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| MirrorError::Memfd(Errno::from_raw(e.raw_os_error().unwrap_or(0))))
    }
}

impl IoRegionMirror for IoMirror {
    fn update(&self, image: &[u8; CCW_IO_REGION_SIZE]) {
        // In bounds by construction (124 <= one page); a failure cannot happen, so it is
        // only logged.
        match self.map.get_slice(0, CCW_IO_REGION_SIZE) {
            Ok(s) => s.copy_from(image),
            Err(e) => tracing::error!(%e, "I/O region mirror out of bounds"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_is_sealed_and_shows_updates() {
        let m = IoMirror::new().unwrap();
        let fd = m.client_fd().unwrap();
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).unwrap();
        let want =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want);
        // The client cannot write, resize or add seals through its fd.
        assert_eq!(nix::unistd::write(&fd, &[1u8]), Err(Errno::EPERM));
        assert_eq!(nix::unistd::ftruncate(&fd, 0), Err(Errno::EPERM));
        assert_eq!(
            fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_WRITE)),
            Err(Errno::EPERM)
        );
        let mut img = [0u8; CCW_IO_REGION_SIZE];
        for (i, b) in img.iter_mut().enumerate() {
            *b = i as u8 ^ 0x5A;
        }
        m.update(&img);
        // What another process sees through the file: the image, then zeros.
        let mut got = [0u8; MIRROR_FILE_SIZE];
        let n = nix::sys::uio::pread(&fd, &mut got, 0).unwrap();
        assert_eq!(n, MIRROR_FILE_SIZE);
        assert_eq!(&got[..CCW_IO_REGION_SIZE], &img[..]);
        assert!(got[CCW_IO_REGION_SIZE..].iter().all(|&b| b == 0));
    }
}
