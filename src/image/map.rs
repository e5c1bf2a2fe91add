//! A read-only shared mapping of an image file, so reads copy from the page cache straight
//! into their destination (one copy) instead of `pread` into a buffer first.
//!
//! The mapping is `MAP_SHARED`: writes made with `pwrite(2)` on the same file are visible
//! through it at once (Linux keeps the page cache and shared mappings coherent). Caveats,
//! documented in `docs/architecture.md` ("Known limits"): a read error of the backing store
//! raises SIGBUS instead of returning EIO, and so does a page past the end of a file that
//! another process truncated after the mapping was made.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// A `PROT_READ`, `MAP_SHARED` mapping of the first `len` bytes of a file.
#[derive(Debug)]
pub struct ReadMap {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only, owned by this value and unmapped only in Drop; moving it
// to another thread or reading it from several threads at once is what any read-only memory
// allows.
unsafe impl Send for ReadMap {}
// SAFETY: as above: `&ReadMap` only ever reads.
unsafe impl Sync for ReadMap {}

impl ReadMap {
    /// Maps the first `len` bytes (`len` > 0) of `file`, which must be open for reading.
    /// The caller checked that the file is at least `len` bytes long.
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        let Ok(len) = usize::try_from(len) else {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        };
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL), of a valid open fd;
        // nothing of ours is overwritten. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ReadMap {
            ptr: p as *const u8,
            len,
        })
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `new` refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes `[offset, offset + len)`, or `None` if the range is not all mapped.
    ///
    /// The file may change under the slice only through a `pwrite` of another process (or
    /// another open image of the same file): the owner of this map takes `&mut self` for its
    /// own writes, so none of them can run while a slice it handed out is alive.
    pub fn get(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: [offset, end) lies inside our live mapping (checked above), which stays
        // mapped while `self` is borrowed; the memory is readable (PROT_READ) and u8 has no
        // invalid values. See the method docs for who may change the bytes.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) })
    }
}

impl Drop for ReadMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; no slice of it outlives `self`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn maps_and_sees_later_writes() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(b"hello world", 0).unwrap();
        let m = ReadMap::new(&f, 11).unwrap();
        assert_eq!(m.len(), 11);
        assert!(!m.is_empty());
        assert_eq!(m.get(6, 5), Some(&b"world"[..]));
        assert_eq!(m.get(0, 0), Some(&b""[..]));
        assert_eq!(m.get(6, 6), None);
        assert_eq!(m.get(usize::MAX, 2), None);
        // pwrite through the file is coherent with the shared mapping.
        f.write_all_at(b"W", 6).unwrap();
        assert_eq!(m.get(6, 5), Some(&b"World"[..]));
    }

    #[test]
    fn refuses_empty_and_unreadable() {
        let f = tempfile::tempfile().unwrap();
        assert!(ReadMap::new(&f, 0).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w");
        std::fs::write(&p, b"abc").unwrap();
        let wo = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        assert_eq!(
            ReadMap::new(&wo, 3).unwrap_err().raw_os_error(),
            Some(libc::EACCES)
        );
    }
}
