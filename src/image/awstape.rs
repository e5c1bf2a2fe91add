//! AWSTAPE emulated-tape files (format only; no device logic).
//!
//! An AWSTAPE file is a sequence of *segments*, each preceded by a 6-byte header:
//!
//! | bytes | field |
//! |---|---|
//! | 0-1 | length of this segment's data, little-endian u16 |
//! | 2-3 | length of the previous segment's data, little-endian u16 (0 at the start) |
//! | 4 | flags: 0x80 first segment of a block, 0x40 tape mark, 0x20 last segment of a block |
//! | 5 | flags, second byte: 0 |
//!
//! A block is one or more segments (first has 0x80, last has 0x20); a tape mark is a single
//! zero-length segment with 0x40. The previous-length field lets a reader walk backward. The
//! end of the file is the end of recorded data. Hercules (`awstape.c`, `tapemap`, `hetmap`)
//! reads and writes the same layout; HET compression flags (0x03 in byte 4, byte 5 non-zero)
//! are not AWSTAPE and are refused.
//!
//! All I/O is positional (`pread`/`pwrite`), and every header is checked when it is crossed,
//! so a malformed or hostile file yields a typed [`AwsError`], never a panic or an unbounded
//! allocation.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::file::ImageFile;

/// Size of a segment header.
pub const HEADER_LEN: usize = 6;
/// Flags byte 1: first segment of a block ("new record").
pub const FLAG1_NEWREC: u8 = 0x80;
/// Flags byte 1: tape mark.
pub const FLAG1_TAPEMARK: u8 = 0x40;
/// Flags byte 1: last segment of a block ("end of record").
pub const FLAG1_ENDREC: u8 = 0x20;
/// Largest segment data length the 16-bit length field can hold.
pub const MAX_SEGMENT_LEN: usize = 0xFFFF;
/// Largest block this implementation reads or writes (Hercules' limit, 2 MiB); it bounds
/// the memory a hostile file can make a reader allocate.
pub const MAX_BLOCK_LEN: usize = 2 * 1024 * 1024;

/// One segment header, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Data length of this segment.
    pub cur_len: u16,
    /// Data length of the previous segment (0 at the start of the file).
    pub prev_len: u16,
    /// Flags byte 1 (`FLAG1_*`).
    pub flags1: u8,
    /// Flags byte 2 (0 in AWSTAPE).
    pub flags2: u8,
}

impl SegmentHeader {
    /// The 6-byte on-disk image.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let c = self.cur_len.to_le_bytes();
        let p = self.prev_len.to_le_bytes();
        [c[0], c[1], p[0], p[1], self.flags1, self.flags2]
    }

    /// Parses a 6-byte on-disk image (no validation).
    pub fn from_bytes(b: [u8; HEADER_LEN]) -> Self {
        SegmentHeader {
            cur_len: u16::from_le_bytes([b[0], b[1]]),
            prev_len: u16::from_le_bytes([b[2], b[3]]),
            flags1: b[4],
            flags2: b[5],
        }
    }

    /// Whether this header is a tape mark.
    pub fn is_tape_mark(&self) -> bool {
        self.flags1 & FLAG1_TAPEMARK != 0
    }

    /// Checks the flag bytes and the tape-mark length (position independent).
    fn check(&self, offset: u64) -> Result<(), AwsError> {
        let known = FLAG1_NEWREC | FLAG1_TAPEMARK | FLAG1_ENDREC;
        if self.flags2 != 0 || self.flags1 & !known != 0 {
            return Err(AwsError::BadFlags {
                offset,
                flags1: self.flags1,
                flags2: self.flags2,
            });
        }
        if self.is_tape_mark() && self.cur_len != 0 {
            return Err(AwsError::BadTapeMark {
                offset,
                len: self.cur_len,
            });
        }
        Ok(())
    }
}

/// Why an AWSTAPE operation failed.
#[derive(Debug, Error)]
pub enum AwsError {
    /// The host file operation failed (errno: the OS error, else EIO).
    #[error("{op} at offset {offset}: {source}")]
    Io {
        /// The operation (open, read, write, truncate, sync).
        op: &'static str,
        /// The file offset involved.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file ends inside a segment header (errno EINVAL: malformed file).
    #[error("truncated segment header at offset {offset}")]
    TruncatedHeader {
        /// Offset of the partial header.
        offset: u64,
    },
    /// The file ends inside a segment's data, or inside a block whose last segment is
    /// missing (errno EINVAL).
    #[error("truncated block at offset {offset}")]
    TruncatedBlock {
        /// Offset of the segment header concerned.
        offset: u64,
    },
    /// A flags byte holds bits AWSTAPE does not define (e.g. HET compression) (EINVAL).
    #[error("bad flags {flags1:#04x} {flags2:#04x} at offset {offset}")]
    BadFlags {
        /// Offset of the header.
        offset: u64,
        /// Flags byte 1.
        flags1: u8,
        /// Flags byte 2.
        flags2: u8,
    },
    /// A tape mark with a non-zero length (EINVAL).
    #[error("tape mark with length {len} at offset {offset}")]
    BadTapeMark {
        /// Offset of the header.
        offset: u64,
        /// Its length field.
        len: u16,
    },
    /// The previous-length field disagrees with the previous segment (EINVAL).
    #[error(
        "length chain broken at offset {offset}: previous length {found}, expected {expected}"
    )]
    ChainMismatch {
        /// Offset of the header holding the bad field.
        offset: u64,
        /// What the neighbouring segment says.
        expected: u16,
        /// What the header says.
        found: u16,
    },
    /// Segment flags out of order: a continuation without a first segment, a first segment
    /// inside a block, a tape mark inside a block (EINVAL).
    #[error("segment sequence error at offset {offset}")]
    SegmentSequence {
        /// Offset of the offending header.
        offset: u64,
    },
    /// A block longer than [`MAX_BLOCK_LEN`] (EFBIG).
    #[error("block of {len} bytes at offset {offset} exceeds the maximum")]
    BlockTooLong {
        /// Offset of the block.
        offset: u64,
        /// Its length (so far).
        len: usize,
    },
    /// A zero-length block cannot be written: it would read back as a tape mark (EINVAL).
    #[error("zero-length block")]
    EmptyBlock,
    /// The write would pass the configured maximum tape size (ENOSPC).
    #[error("end of tape: writing {len} bytes at offset {offset} passes the {max}-byte limit")]
    EndOfTape {
        /// Where the write would start.
        offset: u64,
        /// Bytes it would add (headers included).
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The tape is open read-only (EROFS).
    #[error("tape is read-only")]
    ReadOnly,
}

impl AwsError {
    /// The errno this error corresponds to.
    pub fn errno(&self) -> i32 {
        match self {
            AwsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            AwsError::BlockTooLong { .. } => libc::EFBIG,
            AwsError::EndOfTape { .. } => libc::ENOSPC,
            AwsError::ReadOnly => libc::EROFS,
            _ => libc::EINVAL,
        }
    }

    /// Whether this error means the file content is malformed (rather than a host failure
    /// or a limit).
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            AwsError::TruncatedHeader { .. }
                | AwsError::TruncatedBlock { .. }
                | AwsError::BadFlags { .. }
                | AwsError::BadTapeMark { .. }
                | AwsError::ChainMismatch { .. }
                | AwsError::SegmentSequence { .. }
                | AwsError::BlockTooLong { .. }
        )
    }
}

/// What a motion crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A data block of `len` bytes made of `segments` segments.
    Block {
        /// Total data length.
        len: usize,
        /// Number of segments.
        segments: u32,
    },
    /// A tape mark.
    TapeMark,
    /// Forward motion at the end of recorded data: nothing moved.
    EndOfData,
    /// Backward motion at the load point: nothing moved.
    LoadPoint,
}

/// One entry of [`AwsTape::map`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Offset of the first segment header.
    pub offset: u64,
    /// What is there ([`Record::Block`] or [`Record::TapeMark`]).
    pub record: Record,
}

/// How to open a tape file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Reads only; writes fail with [`AwsError::ReadOnly`].
    ReadOnly,
    /// Reads and writes.
    ReadWrite,
}

/// An open AWSTAPE file with a tape position.
#[derive(Debug)]
pub struct AwsTape {
    file: Box<dyn ImageFile>,
    path: PathBuf,
    read_only: bool,
    file_len: u64,
    /// Offset of the next segment header (the tape position).
    pos: u64,
    /// Offset and data length of the segment just before `pos`; None at the load point.
    prev_seg: Option<(u64, u16)>,
    /// Blocks and tape marks between the load point and `pos`.
    block_id: u32,
    max_size: Option<u64>,
    chunk_len: u16,
    sync_writes: bool,
}

/// A segment: header offset and data length.
type Seg = (u64, u16);

/// Result of walking one block forward without committing the position.
struct Walk {
    record: Record,
    end: u64,
    last: Option<(u64, u16)>,
}

impl AwsTape {
    /// Opens an existing tape file, checks every header in it (so a malformed file is
    /// refused here), and positions it at the load point.
    pub fn open(path: impl AsRef<Path>, mode: OpenMode) -> Result<Self, AwsError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::ReadWrite)
            .open(path)
            .map_err(|source| AwsError::Io {
                op: "open",
                offset: 0,
                source,
            })?;
        let mut tape = Self::from_file(file, path, mode == OpenMode::ReadOnly)?;
        tape.verify()?;
        Ok(tape)
    }

    /// Creates a new, empty tape file (fails if the path exists), positioned at the load
    /// point.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, AwsError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| AwsError::Io {
                op: "create",
                offset: 0,
                source,
            })?;
        Self::from_file(file, path, false)
    }

    fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, AwsError> {
        Self::new_unchecked(Box::new(file), path, read_only)
    }

    /// A tape over any [`ImageFile`] (a `File`, or a test's fault injector), checked like
    /// [`AwsTape::open`] (every header) and positioned at the load point. `path` is only
    /// what [`AwsTape::path`] reports.
    pub fn from_backing(
        file: Box<dyn ImageFile>,
        path: impl AsRef<Path>,
        mode: OpenMode,
    ) -> Result<Self, AwsError> {
        let mut tape = Self::new_unchecked(file, path.as_ref(), mode == OpenMode::ReadOnly)?;
        tape.verify()?;
        Ok(tape)
    }

    fn new_unchecked(
        file: Box<dyn ImageFile>,
        path: &Path,
        read_only: bool,
    ) -> Result<Self, AwsError> {
        let file_len = file.size().map_err(|source| AwsError::Io {
            op: "stat",
            offset: 0,
            source,
        })?;
        Ok(AwsTape {
            file,
            path: path.to_path_buf(),
            read_only,
            file_len,
            pos: 0,
            prev_seg: None,
            block_id: 0,
            max_size: None,
            chunk_len: MAX_SEGMENT_LEN as u16,
            sync_writes: false,
        })
    }

    /// The file this tape lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Limits the file size: a write that would pass it fails with
    /// [`AwsError::EndOfTape`] and writes nothing. `None`: no limit.
    pub fn set_max_size(&mut self, max: Option<u64>) {
        self.max_size = max;
    }

    /// The configured size limit.
    pub fn max_size(&self) -> Option<u64> {
        self.max_size
    }

    /// Sets the largest segment written (1..=65535; out-of-range values are clamped).
    /// Hercules writes 65535 by default and 4096 in "strict AWSTAPE" mode.
    pub fn set_chunk_len(&mut self, len: usize) {
        self.chunk_len = len.clamp(1, MAX_SEGMENT_LEN) as u16;
    }

    /// Makes every write and tape mark call `fdatasync` before returning.
    pub fn set_sync_writes(&mut self, on: bool) {
        self.sync_writes = on;
    }

    /// The file offset of the tape position (next segment header).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Blocks and tape marks between the load point and the position.
    pub fn block_id(&self) -> u32 {
        self.block_id
    }

    /// Whether the tape is at the load point.
    pub fn at_load_point(&self) -> bool {
        self.pos == 0
    }

    /// Whether the position is at the end of recorded data.
    pub fn at_end_of_data(&self) -> bool {
        self.pos >= self.file_len
    }

    /// Current length of the file (end of recorded data).
    pub fn len(&self) -> u64 {
        self.file_len
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.file_len == 0
    }

    /// Returns to the load point.
    pub fn rewind(&mut self) {
        self.pos = 0;
        self.prev_seg = None;
        self.block_id = 0;
    }

    fn read_header(&self, offset: u64) -> Result<SegmentHeader, AwsError> {
        let fits =
            matches!(offset.checked_add(HEADER_LEN as u64), Some(end) if end <= self.file_len);
        if !fits {
            return Err(AwsError::TruncatedHeader { offset });
        }
        let mut b = [0u8; HEADER_LEN];
        self.file
            .pread_exact(&mut b, offset)
            .map_err(|source| AwsError::Io {
                op: "read",
                offset,
                source,
            })?;
        let h = SegmentHeader::from_bytes(b);
        h.check(offset)?;
        Ok(h)
    }

    /// Walks one block or tape mark forward from `start` (whose previous segment is
    /// `prev`), appending the data to `buf` if given. Does not move the position.
    fn walk_forward(
        &self,
        start: u64,
        prev: Option<(u64, u16)>,
        mut buf: Option<&mut Vec<u8>>,
    ) -> Result<Walk, AwsError> {
        let mut off = start;
        let mut expect_prev = prev.map_or(0, |(_, l)| l);
        let mut total = 0usize;
        let mut segments = 0u32;
        loop {
            if off >= self.file_len {
                if segments == 0 {
                    return Ok(Walk {
                        record: Record::EndOfData,
                        end: start,
                        last: prev,
                    });
                }
                // The block's last segment is missing.
                return Err(AwsError::TruncatedBlock { offset: off });
            }
            let h = self.read_header(off)?;
            if h.prev_len != expect_prev {
                return Err(AwsError::ChainMismatch {
                    offset: off,
                    expected: expect_prev,
                    found: h.prev_len,
                });
            }
            if h.is_tape_mark() {
                if segments != 0 {
                    return Err(AwsError::SegmentSequence { offset: off });
                }
                return Ok(Walk {
                    record: Record::TapeMark,
                    end: off + HEADER_LEN as u64,
                    last: Some((off, 0)),
                });
            }
            let first = h.flags1 & FLAG1_NEWREC != 0;
            if first != (segments == 0) {
                return Err(AwsError::SegmentSequence { offset: off });
            }
            let data_off = off + HEADER_LEN as u64;
            let len = usize::from(h.cur_len);
            if data_off + len as u64 > self.file_len {
                return Err(AwsError::TruncatedBlock { offset: off });
            }
            total += len;
            if total > MAX_BLOCK_LEN {
                return Err(AwsError::BlockTooLong {
                    offset: start,
                    len: total,
                });
            }
            if let Some(b) = buf.as_deref_mut() {
                let at = b.len();
                b.resize(at + len, 0);
                self.file
                    .pread_exact(&mut b[at..], data_off)
                    .map_err(|source| AwsError::Io {
                        op: "read",
                        offset: data_off,
                        source,
                    })?;
            }
            segments += 1;
            expect_prev = h.cur_len;
            let seg_off = off;
            off = data_off + len as u64;
            if h.flags1 & FLAG1_ENDREC != 0 {
                return Ok(Walk {
                    record: Record::Block {
                        len: total,
                        segments,
                    },
                    end: off,
                    last: Some((seg_off, h.cur_len)),
                });
            }
        }
    }

    /// Finds the start of the block or tape mark ending at the position; returns its
    /// offset and the segment before it. Does not move the position.
    fn walk_backward(&self) -> Result<Option<(u64, Option<Seg>)>, AwsError> {
        let Some((mut off, mut len)) = self.prev_seg else {
            return Ok(None);
        };
        let mut segments = 0u32;
        loop {
            let h = self.read_header(off)?;
            if h.cur_len != len {
                // The header after this one named a different length.
                return Err(AwsError::ChainMismatch {
                    offset: off,
                    expected: len,
                    found: h.cur_len,
                });
            }
            let start = if h.is_tape_mark() {
                if segments != 0 {
                    return Err(AwsError::SegmentSequence { offset: off });
                }
                true
            } else {
                if segments == 0 && h.flags1 & FLAG1_ENDREC == 0 {
                    return Err(AwsError::SegmentSequence { offset: off });
                }
                h.flags1 & FLAG1_NEWREC != 0
            };
            segments += 1;
            let before = if off == 0 {
                if h.prev_len != 0 {
                    return Err(AwsError::ChainMismatch {
                        offset: off,
                        expected: 0,
                        found: h.prev_len,
                    });
                }
                None
            } else {
                let back = HEADER_LEN as u64 + u64::from(h.prev_len);
                match off.checked_sub(back) {
                    Some(p) => Some((p, h.prev_len)),
                    None => {
                        return Err(AwsError::ChainMismatch {
                            offset: off,
                            expected: 0,
                            found: h.prev_len,
                        })
                    }
                }
            };
            if start {
                return Ok(Some((off, before)));
            }
            match before {
                Some((p, l)) => {
                    off = p;
                    len = l;
                }
                // A continuation segment at the start of the file.
                None => return Err(AwsError::SegmentSequence { offset: off }),
            }
        }
    }

    /// Reads the next block forward into `buf` (replacing its contents) and moves past it.
    /// A tape mark is passed over; at the end of data nothing moves.
    pub fn read_forward(&mut self, buf: &mut Vec<u8>) -> Result<Record, AwsError> {
        buf.clear();
        let w = self.walk_forward(self.pos, self.prev_seg, Some(buf))?;
        self.commit_forward(&w);
        Ok(w.record)
    }

    /// Moves forward over the next block or tape mark without reading its data.
    pub fn skip_forward(&mut self) -> Result<Record, AwsError> {
        let w = self.walk_forward(self.pos, self.prev_seg, None)?;
        self.commit_forward(&w);
        Ok(w.record)
    }

    fn commit_forward(&mut self, w: &Walk) {
        if w.record != Record::EndOfData {
            self.pos = w.end;
            self.prev_seg = w.last;
            self.block_id = self.block_id.wrapping_add(1);
        }
    }

    /// Reads the block before the position into `buf` (in recorded order, replacing its
    /// contents) and moves to its start, as a tape's Read Backward leaves it. A tape mark
    /// is passed over backward; at the load point nothing moves.
    pub fn read_backward(&mut self, buf: &mut Vec<u8>) -> Result<Record, AwsError> {
        buf.clear();
        self.move_backward(Some(buf))
    }

    /// Moves backward over the previous block or tape mark without reading its data.
    pub fn skip_backward(&mut self) -> Result<Record, AwsError> {
        self.move_backward(None)
    }

    fn move_backward(&mut self, buf: Option<&mut Vec<u8>>) -> Result<Record, AwsError> {
        let Some((start, before)) = self.walk_backward()? else {
            return Ok(Record::LoadPoint);
        };
        // Re-walk forward from the start: it checks the chain again and gives the record.
        let w = self.walk_forward(start, before, buf)?;
        if w.end != self.pos {
            return Err(AwsError::SegmentSequence { offset: start });
        }
        self.pos = start;
        self.prev_seg = before;
        self.block_id = self.block_id.wrapping_sub(1);
        Ok(w.record)
    }

    /// Moves to the load point, then forward over `block_id` blocks and tape marks.
    /// Returns false (position at end of data) if the tape holds fewer.
    pub fn locate(&mut self, block_id: u32) -> Result<bool, AwsError> {
        self.rewind();
        while self.block_id < block_id {
            if self.skip_forward()? == Record::EndOfData {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn check_writable(&self, add: u64) -> Result<(), AwsError> {
        if self.read_only {
            return Err(AwsError::ReadOnly);
        }
        if let Some(max) = self.max_size {
            if self.pos.saturating_add(add) > max {
                return Err(AwsError::EndOfTape {
                    offset: self.pos,
                    len: add,
                    max,
                });
            }
        }
        Ok(())
    }

    /// Writes `image` at the position and makes it the end of the file, as a tape erases
    /// what follows a write. On failure the file is cut at the old position (best effort)
    /// and the position is unchanged.
    fn put(&mut self, image: &[u8], last: (u64, u16)) -> Result<(), AwsError> {
        let pos = self.pos;
        let end = pos + image.len() as u64;
        let res = self
            .file
            .pwrite_all(image, pos)
            .map_err(|source| AwsError::Io {
                op: "write",
                offset: pos,
                source,
            })
            .and_then(|()| {
                self.file.truncate(end).map_err(|source| AwsError::Io {
                    op: "truncate",
                    offset: end,
                    source,
                })
            })
            .and_then(|()| {
                if self.sync_writes {
                    self.sync()
                } else {
                    Ok(())
                }
            });
        if let Err(e) = res {
            // What followed the position is lost either way (a tape write erases it); cut
            // the partial write so the file stays well formed.
            if self.file.truncate(pos).is_ok() {
                self.file_len = pos;
            }
            return Err(e);
        }
        self.file_len = end;
        self.pos = end;
        self.prev_seg = Some(last);
        self.block_id = self.block_id.wrapping_add(1);
        Ok(())
    }

    /// Writes one block at the position (segmented by the chunk length), erasing
    /// everything after it.
    pub fn write_block(&mut self, data: &[u8]) -> Result<(), AwsError> {
        if data.is_empty() {
            return Err(AwsError::EmptyBlock);
        }
        if data.len() > MAX_BLOCK_LEN {
            return Err(AwsError::BlockTooLong {
                offset: self.pos,
                len: data.len(),
            });
        }
        let chunk = usize::from(self.chunk_len);
        let nseg = data.len().div_ceil(chunk);
        let total = data.len() + nseg * HEADER_LEN;
        self.check_writable(total as u64)?;
        let mut image = Vec::with_capacity(total);
        let mut prev = self.prev_seg.map_or(0, |(_, l)| l);
        let mut last = (0u64, 0u16);
        for (i, seg) in data.chunks(chunk).enumerate() {
            let mut flags1 = 0;
            if i == 0 {
                flags1 |= FLAG1_NEWREC;
            }
            if i + 1 == nseg {
                flags1 |= FLAG1_ENDREC;
            }
            // chunk <= 65535, so the segment length fits.
            let cur_len = seg.len() as u16;
            let h = SegmentHeader {
                cur_len,
                prev_len: prev,
                flags1,
                flags2: 0,
            };
            last = (self.pos + image.len() as u64, cur_len);
            image.extend_from_slice(&h.to_bytes());
            image.extend_from_slice(seg);
            prev = cur_len;
        }
        self.put(&image, last)
    }

    /// Writes a tape mark at the position, erasing everything after it.
    pub fn write_tape_mark(&mut self) -> Result<(), AwsError> {
        self.check_writable(HEADER_LEN as u64)?;
        let h = SegmentHeader {
            cur_len: 0,
            prev_len: self.prev_seg.map_or(0, |(_, l)| l),
            flags1: FLAG1_TAPEMARK,
            flags2: 0,
        };
        let at = self.pos;
        self.put(&h.to_bytes(), (at, 0))
    }

    /// Erases everything after the position (data security erase).
    pub fn erase_to_end(&mut self) -> Result<(), AwsError> {
        if self.read_only {
            return Err(AwsError::ReadOnly);
        }
        self.file
            .truncate(self.pos)
            .map_err(|source| AwsError::Io {
                op: "truncate",
                offset: self.pos,
                source,
            })?;
        self.file_len = self.pos;
        if self.sync_writes {
            self.sync()?;
        }
        Ok(())
    }

    /// Flushes written data to stable storage (`fdatasync`).
    pub fn sync(&self) -> Result<(), AwsError> {
        if self.read_only {
            return Ok(());
        }
        self.file.datasync().map_err(|source| AwsError::Io {
            op: "sync",
            offset: self.pos,
            source,
        })
    }

    /// Walks the whole tape from the load point, checking every header; the position is
    /// restored afterwards.
    pub fn verify(&mut self) -> Result<(), AwsError> {
        self.map().map(|_| ())
    }

    /// Lists every block and tape mark from the load point (checking every header); the
    /// position is restored afterwards.
    pub fn map(&mut self) -> Result<Vec<MapEntry>, AwsError> {
        let saved = (self.pos, self.prev_seg, self.block_id);
        self.rewind();
        let mut out = Vec::new();
        let res = loop {
            let offset = self.pos;
            match self.skip_forward() {
                Ok(Record::EndOfData) => break Ok(()),
                Ok(record) => out.push(MapEntry { offset, record }),
                Err(e) => break Err(e),
            }
        };
        (self.pos, self.prev_seg, self.block_id) = saved;
        res.map(|()| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.aws");
        (dir, p)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    #[test]
    fn header_bytes_are_little_endian() {
        let h = SegmentHeader {
            cur_len: 0x1234,
            prev_len: 0x0050,
            flags1: FLAG1_NEWREC | FLAG1_ENDREC,
            flags2: 0,
        };
        assert_eq!(h.to_bytes(), [0x34, 0x12, 0x50, 0x00, 0xA0, 0x00]);
        assert_eq!(SegmentHeader::from_bytes(h.to_bytes()), h);
    }

    #[test]
    fn block_and_tape_mark_layout_matches_hercules() {
        // hetinit -d writes VOL1 as `50 00 00 00 a0 00` + 80 bytes, and the tape mark after
        // an 80-byte block as `00 00 50 00 40 00`.
        let (_d, p) = scratch();
        let mut t = AwsTape::create(&p).unwrap();
        t.write_block(&[0xE5; 80]).unwrap();
        t.write_tape_mark().unwrap();
        let f = std::fs::read(&p).unwrap();
        assert_eq!(f.len(), 6 + 80 + 6);
        assert_eq!(&f[..6], &[0x50, 0x00, 0x00, 0x00, 0xA0, 0x00]);
        assert_eq!(&f[86..], &[0x00, 0x00, 0x50, 0x00, 0x40, 0x00]);
    }

    #[test]
    fn long_block_is_segmented() {
        let (_d, p) = scratch();
        let mut t = AwsTape::create(&p).unwrap();
        let data = pattern(70000, 3);
        t.write_block(&data).unwrap();
        let f = std::fs::read(&p).unwrap();
        assert_eq!(&f[..6], &[0xFF, 0xFF, 0x00, 0x00, 0x80, 0x00]);
        let second = 6 + 65535;
        // 70000 - 65535 = 4465 = 0x1171
        assert_eq!(
            &f[second..second + 6],
            &[0x71, 0x11, 0xFF, 0xFF, 0x20, 0x00]
        );
        assert_eq!(f.len(), 70000 + 12);
        t.rewind();
        let mut buf = Vec::new();
        assert_eq!(
            t.read_forward(&mut buf).unwrap(),
            Record::Block {
                len: 70000,
                segments: 2
            }
        );
        assert_eq!(buf, data);
        assert_eq!(
            t.read_backward(&mut buf).unwrap(),
            Record::Block {
                len: 70000,
                segments: 2
            }
        );
        assert_eq!(buf, data);
        assert!(t.at_load_point());
    }

    #[test]
    fn chunk_len_controls_segments() {
        let (_d, p) = scratch();
        let mut t = AwsTape::create(&p).unwrap();
        t.set_chunk_len(4096);
        t.write_block(&pattern(10000, 1)).unwrap();
        t.rewind();
        assert_eq!(
            t.skip_forward().unwrap(),
            Record::Block {
                len: 10000,
                segments: 3
            }
        );
    }

    #[test]
    fn motion_forward_and_backward() {
        let (_d, p) = scratch();
        let mut t = AwsTape::create(&p).unwrap();
        let a = pattern(100, 1);
        let b = pattern(4000, 2);
        t.write_block(&a).unwrap();
        t.write_block(&b).unwrap();
        t.write_tape_mark().unwrap();
        t.write_block(&a).unwrap();
        assert_eq!(t.block_id(), 4);
        drop(t);
        let mut t = AwsTape::open(&p, OpenMode::ReadOnly).unwrap();
        let mut buf = Vec::new();
        assert_eq!(t.skip_backward().unwrap(), Record::LoadPoint);
        assert_eq!(
            t.read_forward(&mut buf).unwrap(),
            Record::Block {
                len: 100,
                segments: 1
            }
        );
        assert_eq!(buf, a);
        t.read_forward(&mut buf).unwrap();
        assert_eq!(buf, b);
        assert_eq!(t.read_forward(&mut buf).unwrap(), Record::TapeMark);
        assert!(buf.is_empty());
        t.read_forward(&mut buf).unwrap();
        assert_eq!(t.read_forward(&mut buf).unwrap(), Record::EndOfData);
        assert_eq!(t.block_id(), 4);
        assert!(t.at_end_of_data());
        t.read_backward(&mut buf).unwrap();
        assert_eq!(buf, a);
        assert_eq!(t.skip_backward().unwrap(), Record::TapeMark);
        assert_eq!(t.block_id(), 2);
        t.read_backward(&mut buf).unwrap();
        assert_eq!(buf, b);
        assert_eq!(t.position(), 106);
        assert!(t.locate(3).unwrap());
        assert_eq!(t.position(), 106 + 4006 + 6);
        assert!(!t.locate(9).unwrap());
        assert!(t.at_end_of_data());
        assert_eq!(t.map().unwrap().len(), 4);
        assert!(matches!(t.write_block(&a), Err(AwsError::ReadOnly)));
        assert_eq!(AwsError::ReadOnly.errno(), libc::EROFS);
    }

    #[test]
    fn write_truncates_what_follows() {
        let (_d, p) = scratch();
        let mut t = AwsTape::create(&p).unwrap();
        for i in 0..5 {
            t.write_block(&pattern(500, i)).unwrap();
        }
        t.locate(2).unwrap();
        t.write_tape_mark().unwrap();
        assert_eq!(t.len(), 2 * 506 + 6);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * 506 + 6);
        let m = t.map().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[2].record, Record::TapeMark);
        // The tape mark's previous length names the block before it.
        let f = std::fs::read(&p).unwrap();
        assert_eq!(&f[1012..], &[0, 0, 0xF4, 0x01, 0x40, 0]);
        t.locate(1).unwrap();
        t.erase_to_end().unwrap();
        assert_eq!(t.map().unwrap().len(), 1);
    }

    #[test]
    fn max_size_refuses_without_writing() {
        let (_d, p) = scratch();
        let mut t = AwsTape::create(&p).unwrap();
        t.set_max_size(Some(1000));
        t.write_block(&[1; 900]).unwrap();
        let e = t.write_block(&[1; 100]).unwrap_err();
        assert!(matches!(e, AwsError::EndOfTape { offset: 906, .. }), "{e}");
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(t.len(), 906);
        t.write_tape_mark().unwrap();
        assert!(matches!(t.write_block(&[]), Err(AwsError::EmptyBlock)));
    }

    fn seg(out: &mut Vec<u8>, cur: u16, prev: u16, f1: u8, f2: u8) {
        out.extend_from_slice(&[
            cur as u8,
            (cur >> 8) as u8,
            prev as u8,
            (prev >> 8) as u8,
            f1,
            f2,
        ]);
        out.extend(std::iter::repeat_n(0x5A, cur as usize));
    }

    fn open_bytes(bytes: &[u8]) -> Result<AwsTape, AwsError> {
        let (d, p) = scratch();
        std::fs::write(&p, bytes).unwrap();
        let r = AwsTape::open(&p, OpenMode::ReadOnly);
        drop(d);
        r
    }

    #[test]
    fn malformed_files_are_refused() {
        let mut ok = Vec::new();
        seg(&mut ok, 10, 0, 0xA0, 0);
        seg(&mut ok, 0, 10, 0x40, 0);
        assert_eq!(open_bytes(&ok).unwrap().len(), 22);

        // Truncated header.
        let e = open_bytes(&ok[..20]).unwrap_err();
        assert!(matches!(e, AwsError::TruncatedHeader { offset: 16 }), "{e}");
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.is_malformed());
        // Truncated data.
        let e = open_bytes(&ok[..12]).unwrap_err();
        assert!(matches!(e, AwsError::TruncatedBlock { offset: 0 }), "{e}");

        // Bad previous length.
        let mut b = Vec::new();
        seg(&mut b, 10, 0, 0xA0, 0);
        seg(&mut b, 0, 9, 0x40, 0);
        let e = open_bytes(&b).unwrap_err();
        assert!(
            matches!(
                e,
                AwsError::ChainMismatch {
                    offset: 16,
                    expected: 10,
                    found: 9
                }
            ),
            "{e}"
        );
        // Non-zero previous length at the start.
        let mut b = Vec::new();
        seg(&mut b, 10, 3, 0xA0, 0);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::ChainMismatch { offset: 0, .. }
        ));

        // HET compression flag, and a non-zero second flags byte.
        let mut b = Vec::new();
        seg(&mut b, 10, 0, 0xA1, 0);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::BadFlags { flags1: 0xA1, .. }
        ));
        let mut b = Vec::new();
        seg(&mut b, 10, 0, 0xA0, 0x80);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::BadFlags { flags2: 0x80, .. }
        ));

        // Tape mark with a length.
        let mut b = Vec::new();
        seg(&mut b, 4, 0, 0x40, 0);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::BadTapeMark { len: 4, .. }
        ));

        // Continuation segment first; new record inside a block; tape mark inside a block;
        // block whose last segment is missing.
        let mut b = Vec::new();
        seg(&mut b, 4, 0, 0x20, 0);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::SegmentSequence { offset: 0 }
        ));
        let mut b = Vec::new();
        seg(&mut b, 4, 0, 0x80, 0);
        seg(&mut b, 4, 4, 0xA0, 0);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::SegmentSequence { offset: 10 }
        ));
        let mut b = Vec::new();
        seg(&mut b, 4, 0, 0x80, 0);
        seg(&mut b, 0, 4, 0x40, 0);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::SegmentSequence { offset: 10 }
        ));
        let mut b = Vec::new();
        seg(&mut b, 4, 0, 0x80, 0);
        assert!(matches!(
            open_bytes(&b).unwrap_err(),
            AwsError::TruncatedBlock { offset: 10 }
        ));
    }

    #[test]
    fn oversized_block_is_refused_without_unbounded_allocation() {
        // 40 segments of 65535 bytes with no end-of-record flag: over 2 MiB.
        let mut b = Vec::new();
        let mut prev = 0;
        for i in 0..40 {
            seg(&mut b, 0xFFFF, prev, if i == 0 { 0x80 } else { 0 }, 0);
            prev = 0xFFFF;
        }
        let e = open_bytes(&b).unwrap_err();
        assert!(matches!(e, AwsError::BlockTooLong { offset: 0, .. }), "{e}");
        assert_eq!(e.errno(), libc::EFBIG);
    }

    #[test]
    fn backward_walk_checks_the_chain() {
        // A file that is consistent forward but modified afterwards behind the reader's back:
        // the backward walk re-reads headers and refuses a broken chain.
        let (_d, p) = scratch();
        let mut t = AwsTape::create(&p).unwrap();
        t.write_block(&[1; 10]).unwrap();
        t.write_block(&[2; 20]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        // Corrupt the second header's length field (20 -> 21).
        std::os::unix::fs::FileExt::write_all_at(&f, &[21], 16).unwrap();
        let e = t.skip_backward().unwrap_err();
        assert!(
            matches!(
                e,
                AwsError::ChainMismatch {
                    offset: 16,
                    expected: 20,
                    found: 21
                }
            ),
            "{e}"
        );
    }
}
