//! The host file under an image: positioned reads and writes, sync, truncate, size.
//!
//! [`CkdImage`](super::ckd::CkdImage) and [`AwsTape`](super::awstape::AwsTape) do all their
//! I/O through this trait, so a test can put a file that fails (EIO, ENOSPC, a short write)
//! under a real device model; `std::fs::File` is the one production implementation.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positioned I/O on the file behind an image. Methods are named apart from
/// `std::os::unix::fs::FileExt` so both traits can be in scope for a `File`.
pub trait ImageFile: Send + Sync + Debug {
    /// `pread(2)`: reads up to `buf.len()` bytes at `offset`; 0 at end of file.
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `pwrite(2)`: writes up to `buf.len()` bytes at `offset`.
    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync(2)`.
    fn datasync(&self) -> io::Result<()>;
    /// `ftruncate(2)`.
    fn truncate(&self, len: u64) -> io::Result<()>;
    /// The file's length (`fstat(2)`).
    fn size(&self) -> io::Result<u64>;

    /// Reads exactly `buf.len()` bytes at `offset`; `UnexpectedEof` if the file ends first.
    fn pread_exact(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.pread(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`, continuing after short writes; the first error ends
    /// it (bytes before it may have been written).
    fn pwrite_all(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.pwrite(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ImageFile for File {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.read_at(buf, offset)
    }
    fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.write_at(buf, offset)
    }
    fn datasync(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn truncate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Writes at most 3 bytes per call, and fails the call after `fail_after` calls.
    #[derive(Debug, Default)]
    struct Dribble {
        data: std::sync::Mutex<Vec<u8>>,
        calls: AtomicUsize,
        fail_after: usize,
    }

    impl ImageFile for Dribble {
        fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let d = self.data.lock().unwrap();
            let off = offset as usize;
            let n = buf.len().min(3).min(d.len().saturating_sub(off));
            buf[..n].copy_from_slice(&d[off..off + n]);
            Ok(n)
        }
        fn pwrite(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
            if self.calls.fetch_add(1, Ordering::SeqCst) >= self.fail_after {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let mut d = self.data.lock().unwrap();
            let off = offset as usize;
            let n = buf.len().min(3);
            if d.len() < off + n {
                d.resize(off + n, 0);
            }
            d[off..off + n].copy_from_slice(&buf[..n]);
            Ok(n)
        }
        fn datasync(&self) -> io::Result<()> {
            Ok(())
        }
        fn truncate(&self, len: u64) -> io::Result<()> {
            self.data.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
    }

    #[test]
    fn short_transfers_are_continued_and_errors_stop_them() {
        let f = Dribble {
            fail_after: 4,
            ..Default::default()
        };
        f.pwrite_all(b"abcdefg", 0).unwrap();
        let mut b = [0u8; 7];
        f.pread_exact(&mut b, 0).unwrap();
        assert_eq!(&b, b"abcdefg");
        // Calls 1-3 wrote 7 bytes; call 4 writes 3 of the 5, call 5 fails with ENOSPC.
        let e = f.pwrite_all(b"vwxyz", 7).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(f.size().unwrap(), 10);
        let mut b = [0u8; 4];
        let e = f.pread_exact(&mut b, 8).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn file_implementation() {
        let t = tempfile::tempfile().unwrap();
        ImageFile::pwrite_all(&t, b"hello", 2).unwrap();
        assert_eq!(ImageFile::size(&t).unwrap(), 7);
        let mut b = [0u8; 7];
        t.pread_exact(&mut b, 0).unwrap();
        assert_eq!(&b, b"\0\0hello");
        ImageFile::truncate(&t, 3).unwrap();
        assert_eq!(ImageFile::size(&t).unwrap(), 3);
        ImageFile::datasync(&t).unwrap();
    }
}
