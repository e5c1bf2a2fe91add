//! The Hercules CKD DASD image format (uncompressed, one file per volume).
//!
//! Layout (as Hercules' `dasdinit` writes it and `ckddasd.c` reads it):
//!
//! * a 512-byte device header: `CKD_P370` (ASCII), heads per cylinder (LE u32), track slot
//!   size (LE u32), the low byte of the device type (0x90 for a 3390), the file sequence
//!   number (0 = the only file), the highest cylinder in this file (LE u16, 0 for the last
//!   or only file), a 12-byte serial number and reserved zeros;
//! * then one fixed-size slot per track, cylinder-major: a 5-byte home address (flag/bin
//!   byte 0, CC, HH big-endian), then records as an 8-byte count field (CC HH R KL DL, big
//!   endian) followed by the key and the data, ended by the end-of-track marker of eight
//!   0xFF bytes; the rest of the slot is unused.
//!
//! This module knows the format only; positioning and channel commands live in
//! [`crate::devices::dasd3390`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use thiserror::Error;

use super::file::ImageFile;
use super::map::ReadMap;

/// Size of the device header at the start of the image.
pub const DEVHDR_SIZE: usize = 512;
/// Size of the home address (flag byte + CCHH) at the start of every track slot.
pub const HA_SIZE: usize = 5;
/// Size of a count field (CC HH R KL DL).
pub const COUNT_SIZE: usize = 8;
/// The end-of-track marker that follows the last record of a track.
pub const END_OF_TRACK: [u8; 8] = [0xFF; 8];
/// Device header identifier of an uncompressed CKD image.
pub const CKD_P370_MAGIC: [u8; 8] = *b"CKD_P370";
/// Device-type byte of a 3390 in the header.
pub const DEVTYPE_3390: u8 = 0x90;
/// Heads (tracks per cylinder) of a 3390.
pub const HEADS_3390: u32 = 15;
/// Largest record (R1 data) a 3390 track holds.
pub const TRACK_CAPACITY_3390: u32 = 56664;
/// Size of a 3390 track slot in the image: HA + R0 (count + 8 data) + the largest record's
/// count + the end marker, rounded up to 512 as Hercules does (56701 -> 56832).
pub const TRACK_SIZE_3390: u32 = 56832;
/// Primary cylinders of a 3390 model 1.
pub const CYLINDERS_3390_1: u32 = 1113;

/// Smallest usable track slot: HA, R0 count and 8 data bytes, end marker.
const MIN_TRACK_SIZE: u32 = (HA_SIZE + COUNT_SIZE + 8 + COUNT_SIZE) as u32;
/// Largest track slot accepted (no CKD device comes near it).
const MAX_TRACK_SIZE: u32 = 1 << 20;

/// Why an image could not be opened, created, read or written.
#[derive(Debug, Error)]
pub enum CkdError {
    /// An operating-system call on the image failed (errno: that of the call).
    #[error("{op} on the CKD image failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error the system returned.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than the device header plus one cylinder (EINVAL).
    #[error("CKD image is truncated: {len} bytes")]
    Truncated {
        /// The file length.
        len: u64,
    },
    /// The device header does not start with a known identifier (EINVAL).
    #[error("not a CKD image: header id {0:02x?}")]
    BadMagic([u8; 8]),
    /// A compressed or shadow image (`CKD_C370`, `CKD_S370`, ...), not supported (EOPNOTSUPP).
    #[error("unsupported CKD image kind {0:?} (only uncompressed CKD_P370)")]
    Unsupported(String),
    /// Heads or track size out of range (EINVAL).
    #[error("bad CKD geometry: {heads} heads, track size {track_size}")]
    BadGeometry {
        /// Heads per cylinder in the header.
        heads: u32,
        /// Track slot size in the header.
        track_size: u32,
    },
    /// The image is not a whole number of cylinders: truncated or padded (EINVAL).
    #[error(
        "CKD image data ({data_len} bytes) is not a whole number of {cyl_size}-byte cylinders"
    )]
    PartialCylinder {
        /// Bytes after the device header.
        data_len: u64,
        /// Bytes per cylinder.
        cyl_size: u64,
    },
    /// One file of a multi-file volume (EOPNOTSUPP).
    #[error("multi-file CKD volumes are not supported (file sequence {file_seq}, high cylinder {high_cyl})")]
    MultiFile {
        /// File sequence number in the header.
        file_seq: u8,
        /// High cylinder in the header.
        high_cyl: u16,
    },
    /// A track address outside the volume (EINVAL).
    #[error("track cyl {cyl} head {head} is outside the volume")]
    TrackOutOfRange {
        /// Cylinder.
        cyl: u32,
        /// Head.
        head: u32,
    },
    /// A track slot whose home address is not that of its position (EIO: media damage).
    #[error("track cyl {cyl} head {head}: home address {found:02x?} does not match")]
    BadHomeAddress {
        /// Cylinder.
        cyl: u32,
        /// Head.
        head: u32,
        /// The 5 bytes found.
        found: [u8; 5],
    },
    /// A record runs past the slot or the end-of-track marker is missing (EIO).
    #[error("track cyl {cyl} head {head}: record at offset {offset} overflows the track slot")]
    TrackOverflow {
        /// Cylinder.
        cyl: u32,
        /// Head.
        head: u32,
        /// Offset of the offending count field.
        offset: usize,
    },
    /// A write to an image opened read-only (EROFS).
    #[error("CKD image is read-only")]
    ReadOnly,
    /// A buffer or range that does not fit the track slot (EINVAL).
    #[error("{len} bytes at offset {offset} do not fit a {track_size}-byte track slot")]
    BadRange {
        /// Offset in the slot.
        offset: usize,
        /// Length.
        len: usize,
        /// Slot size.
        track_size: u32,
    },
    /// A volume serial that is not 1-6 characters of A-Z, 0-9, @, #, $ (EINVAL).
    #[error("bad volume serial {0:?}")]
    BadVolser(String),
}

impl CkdError {
    /// The errno a caller reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            CkdError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            CkdError::Unsupported(_) | CkdError::MultiFile { .. } => libc::EOPNOTSUPP,
            CkdError::BadHomeAddress { .. } | CkdError::TrackOverflow { .. } => libc::EIO,
            CkdError::ReadOnly => libc::EROFS,
            _ => libc::EINVAL,
        }
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> CkdError {
    move |source| CkdError::Io { op, source }
}

/// The 512-byte device header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceHeader {
    /// Heads (tracks) per cylinder.
    pub heads: u32,
    /// Size of each track slot in bytes.
    pub track_size: u32,
    /// Low byte of the device type (0x90 = 3390).
    pub dev_type: u8,
    /// File sequence number (0 = only file).
    pub file_seq: u8,
    /// Highest cylinder in this file, 0 for the last or only file.
    pub high_cyl: u16,
    /// Serial number (ASCII; zeros when unset, as older `dasdinit` leaves it).
    pub serial: [u8; 12],
}

impl DeviceHeader {
    /// The header of a single-file uncompressed 3390 image.
    pub fn new_3390() -> Self {
        DeviceHeader {
            heads: HEADS_3390,
            track_size: TRACK_SIZE_3390,
            dev_type: DEVTYPE_3390,
            file_seq: 0,
            high_cyl: 0,
            serial: [0; 12],
        }
    }

    /// Parses and checks a device header (identifier and geometry ranges).
    pub fn parse(bytes: &[u8]) -> Result<Self, CkdError> {
        if bytes.len() < DEVHDR_SIZE {
            return Err(CkdError::Truncated {
                len: bytes.len() as u64,
            });
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[0..8]);
        if id != CKD_P370_MAGIC {
            // Other Hercules image kinds share the `CKD_?370` / `CKD_?064` shape.
            if id.starts_with(b"CKD_") || id.starts_with(b"CKD64_") {
                return Err(CkdError::Unsupported(String::from_utf8_lossy(&id).into()));
            }
            return Err(CkdError::BadMagic(id));
        }
        let heads = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let track_size = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        if heads == 0 || heads > 255 || !(MIN_TRACK_SIZE..=MAX_TRACK_SIZE).contains(&track_size) {
            return Err(CkdError::BadGeometry { heads, track_size });
        }
        let mut serial = [0u8; 12];
        serial.copy_from_slice(&bytes[20..32]);
        Ok(DeviceHeader {
            heads,
            track_size,
            dev_type: bytes[16],
            file_seq: bytes[17],
            high_cyl: u16::from_le_bytes([bytes[18], bytes[19]]),
            serial,
        })
    }

    /// The 512 header bytes.
    pub fn to_bytes(&self) -> [u8; DEVHDR_SIZE] {
        let mut b = [0u8; DEVHDR_SIZE];
        b[0..8].copy_from_slice(&CKD_P370_MAGIC);
        b[8..12].copy_from_slice(&self.heads.to_le_bytes());
        b[12..16].copy_from_slice(&self.track_size.to_le_bytes());
        b[16] = self.dev_type;
        b[17] = self.file_seq;
        b[18..20].copy_from_slice(&self.high_cyl.to_le_bytes());
        b[20..32].copy_from_slice(&self.serial);
        b
    }
}

/// A count field: the record's identifier (CCHHR), key length and data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountField {
    /// Cylinder (CC).
    pub cyl: u16,
    /// Head (HH).
    pub head: u16,
    /// Record number (R).
    pub rec: u8,
    /// Key length (KL).
    pub key_len: u8,
    /// Data length (DL).
    pub data_len: u16,
}

impl CountField {
    /// Decodes the 8 big-endian bytes.
    pub fn from_bytes(b: &[u8; COUNT_SIZE]) -> Self {
        CountField {
            cyl: u16::from_be_bytes([b[0], b[1]]),
            head: u16::from_be_bytes([b[2], b[3]]),
            rec: b[4],
            key_len: b[5],
            data_len: u16::from_be_bytes([b[6], b[7]]),
        }
    }

    /// Encodes the 8 big-endian bytes.
    pub fn to_bytes(&self) -> [u8; COUNT_SIZE] {
        let c = self.cyl.to_be_bytes();
        let h = self.head.to_be_bytes();
        let d = self.data_len.to_be_bytes();
        [c[0], c[1], h[0], h[1], self.rec, self.key_len, d[0], d[1]]
    }

    /// Count + key + data bytes the record occupies in the track image.
    pub fn total_len(&self) -> usize {
        COUNT_SIZE + self.key_len as usize + self.data_len as usize
    }
}

/// One record found in a track image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLoc {
    /// Offset of the count field in the track slot.
    pub offset: usize,
    /// The count field.
    pub count: CountField,
}

/// The records of a checked track image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackLayout {
    /// Records in track order (R0 first on a formatted track).
    pub records: Vec<RecordLoc>,
    /// Offset of the end-of-track marker.
    pub end: usize,
}

/// The home address bytes of a track: flag 0, CC, HH.
pub fn home_address(cyl: u16, head: u16) -> [u8; HA_SIZE] {
    let c = cyl.to_be_bytes();
    let h = head.to_be_bytes();
    [0, c[0], c[1], h[0], h[1]]
}

/// Checks a track image read from slot (`cyl`, `head`): the home address matches the slot and
/// every record, plus the end-of-track marker, lies inside the slot.
pub fn parse_track(buf: &[u8], cyl: u32, head: u32) -> Result<TrackLayout, CkdError> {
    let mut records = Vec::new();
    let end = scan_track(buf, cyl, head, |r| records.push(r))?;
    Ok(TrackLayout { records, end })
}

/// [`parse_track`]'s checks, handing each record to `each` (no allocation); returns the offset
/// of the end-of-track marker.
fn scan_track(
    buf: &[u8],
    cyl: u32,
    head: u32,
    mut each: impl FnMut(RecordLoc),
) -> Result<usize, CkdError> {
    let (Ok(c16), Ok(h16)) = (u16::try_from(cyl), u16::try_from(head)) else {
        return Err(CkdError::TrackOutOfRange { cyl, head });
    };
    if buf.len() < HA_SIZE + COUNT_SIZE {
        return Err(CkdError::TrackOverflow {
            cyl,
            head,
            offset: HA_SIZE,
        });
    }
    let mut ha = [0u8; HA_SIZE];
    ha.copy_from_slice(&buf[..HA_SIZE]);
    if ha != home_address(c16, h16) {
        return Err(CkdError::BadHomeAddress {
            cyl,
            head,
            found: ha,
        });
    }
    let mut off = HA_SIZE;
    loop {
        let Some(raw) = buf.get(off..off + COUNT_SIZE) else {
            return Err(CkdError::TrackOverflow {
                cyl,
                head,
                offset: off,
            });
        };
        let raw: &[u8; COUNT_SIZE] = raw.try_into().expect("slice of COUNT_SIZE");
        if *raw == END_OF_TRACK {
            return Ok(off);
        }
        let count = CountField::from_bytes(raw);
        let next = off + count.total_len();
        // The record and the end marker after it must both fit.
        if next + COUNT_SIZE > buf.len() {
            return Err(CkdError::TrackOverflow {
                cyl,
                head,
                offset: off,
            });
        }
        each(RecordLoc { offset: off, count });
        off = next;
    }
}

/// How to open an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CkdOpenOptions {
    /// Open read-only: writes fail with [`CkdError::ReadOnly`].
    pub read_only: bool,
    /// fsync (fdatasync) after every write, so a write is on stable storage before the
    /// device presents status.
    pub sync_writes: bool,
}

/// An open uncompressed CKD image.
#[derive(Debug)]
pub struct CkdImage {
    file: Box<dyn ImageFile>,
    header: DeviceHeader,
    cylinders: u32,
    options: CkdOpenOptions,
    /// A read-only shared mapping of the whole file (images opened from a `File`): reads
    /// copy from it with no intermediate buffer; writes stay `pwrite` (coherent with it).
    map: Option<ReadMap>,
    /// One bit per track slot (cylinder-major): set once [`Self::verify_mapped_track`] found
    /// the slot well formed, cleared by any write to it through this image, so a track
    /// switch in a read-only sequence is a bit test, not a parse. Empty when not mapped.
    checked: Vec<u64>,
}

impl CkdImage {
    /// Opens and checks an image: header, geometry, and that the file holds a whole number
    /// of cylinders (at least one).
    pub fn open(path: impl AsRef<Path>, options: CkdOpenOptions) -> Result<Self, CkdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(path.as_ref())
            .map_err(io_err("open"))?;
        Self::from_file(file, options)
    }

    /// Checks an already open image file (opened for writing unless `options.read_only`)
    /// and maps it read-only for reads (see [`Self::mapped_slot`]). The mapping covers the
    /// size checked at open; if it cannot be made, reads fall back to `pread`.
    pub fn from_file(file: File, options: CkdOpenOptions) -> Result<Self, CkdError> {
        let len = file.metadata().map_err(io_err("fstat"))?.len();
        // Map only what `from_backing` will accept: a bad image fails there, unmapped.
        let map = ReadMap::new(&file, len).ok();
        let mut img = Self::from_backing(Box::new(file), options)?;
        let slots = slot_offset(&img.header, img.cylinders, 0);
        img.map = map.filter(|m| m.len() as u64 >= slots);
        if img.map.is_some() {
            let tracks = img.cylinders as usize * img.header.heads as usize;
            img.checked = vec![0; tracks.div_ceil(64)];
        }
        Ok(img)
    }

    /// Checks an image behind any [`ImageFile`] (a `File`, or a test's fault injector).
    pub fn from_backing(
        file: Box<dyn ImageFile>,
        options: CkdOpenOptions,
    ) -> Result<Self, CkdError> {
        let len = file.size().map_err(io_err("fstat"))?;
        if len < DEVHDR_SIZE as u64 {
            return Err(CkdError::Truncated { len });
        }
        let mut hdr = [0u8; DEVHDR_SIZE];
        file.pread_exact(&mut hdr, 0)
            .map_err(io_err("read header"))?;
        let header = DeviceHeader::parse(&hdr)?;
        if header.file_seq != 0 || header.high_cyl != 0 {
            return Err(CkdError::MultiFile {
                file_seq: header.file_seq,
                high_cyl: header.high_cyl,
            });
        }
        let cyl_size = header.heads as u64 * header.track_size as u64;
        let data_len = len - DEVHDR_SIZE as u64;
        if data_len == 0 {
            return Err(CkdError::Truncated { len });
        }
        if data_len % cyl_size != 0 {
            return Err(CkdError::PartialCylinder { data_len, cyl_size });
        }
        let cylinders = data_len / cyl_size;
        // CC in a home address is 16 bits.
        let Ok(cylinders) = u32::try_from(cylinders) else {
            return Err(CkdError::PartialCylinder { data_len, cyl_size });
        };
        if cylinders > 0x1_0000 {
            return Err(CkdError::BadGeometry {
                heads: header.heads,
                track_size: header.track_size,
            });
        }
        Ok(CkdImage {
            file,
            header,
            cylinders,
            options,
            map: None,
            checked: Vec::new(),
        })
    }

    /// Creates a new single-file 3390 image of `cylinders` cylinders as Hercules `dasdinit`
    /// (3.13) builds it: every track formatted with R0 (8 zero data bytes); unless `volser`
    /// is `None` (a "raw" volume), track 0 also holds IPL1 (24 bytes: a wait PSW and a NOP
    /// CCW), IPL2 (144 zero bytes) and the VOL1 label. Fails if the file exists.
    pub fn create_3390(
        path: impl AsRef<Path>,
        cylinders: u32,
        volser: Option<&str>,
    ) -> Result<Self, CkdError> {
        let header = DeviceHeader::new_3390();
        if cylinders == 0 || cylinders > 0xFFF0 {
            return Err(CkdError::BadGeometry {
                heads: header.heads,
                track_size: header.track_size,
            });
        }
        let vol1 = match volser {
            Some(v) => Some(vol1_label(v)?),
            None => None,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path.as_ref())
            .map_err(io_err("create"))?;
        file.write_all_at(&header.to_bytes(), 0)
            .map_err(io_err("write header"))?;
        let ts = header.track_size as usize;
        let mut track = vec![0u8; ts];
        for cyl in 0..cylinders {
            for head in 0..header.heads {
                track.fill(0);
                let (c, h) = (cyl as u16, head as u16);
                let mut w = TrackWriter::new(&mut track, c, h);
                w.record(0, &[], &[0u8; 8]);
                if cyl == 0 && head == 0 {
                    if let Some(vol1) = &vol1 {
                        w.record(1, &ebcdic_label("IPL1"), &IPL1_DATA);
                        w.record(2, &ebcdic_label("IPL2"), &[0u8; 144]);
                        w.record(3, &ebcdic_label("VOL1"), vol1);
                    }
                }
                w.finish();
                let off = slot_offset(&header, cyl, head);
                file.write_all_at(&track, off)
                    .map_err(io_err("write track"))?;
            }
        }
        file.sync_all().map_err(io_err("fsync"))?;
        Self::from_file(file, CkdOpenOptions::default())
    }

    /// The device header.
    pub fn header(&self) -> &DeviceHeader {
        &self.header
    }

    /// Number of cylinders in the image.
    pub fn cylinders(&self) -> u32 {
        self.cylinders
    }

    /// Heads (tracks per cylinder).
    pub fn heads(&self) -> u32 {
        self.header.heads
    }

    /// Size of each track slot.
    pub fn track_size(&self) -> usize {
        self.header.track_size as usize
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.options.read_only
    }

    fn check_track(&self, cyl: u32, head: u32) -> Result<u64, CkdError> {
        if cyl >= self.cylinders || head >= self.header.heads {
            return Err(CkdError::TrackOutOfRange { cyl, head });
        }
        Ok(slot_offset(&self.header, cyl, head))
    }

    /// Reads track slot (`cyl`, `head`) into `buf` (exactly one slot long) and checks it.
    pub fn read_track(&self, cyl: u32, head: u32, buf: &mut [u8]) -> Result<TrackLayout, CkdError> {
        let off = self.check_track(cyl, head)?;
        if buf.len() != self.track_size() {
            return Err(CkdError::BadRange {
                offset: 0,
                len: buf.len(),
                track_size: self.header.track_size,
            });
        }
        self.file
            .pread_exact(buf, off)
            .map_err(io_err("read track"))?;
        parse_track(buf, cyl, head)
    }

    /// Whether reads come from a read-only mapping of the file ([`Self::mapped_slot`]).
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }

    /// Checks track slot (`cyl`, `head`) in the mapping, as [`Self::read_track`] checks a
    /// slot it reads; `Ok(None)` if the image is not mapped (use `read_track` then).
    pub fn check_mapped_track(&self, cyl: u32, head: u32) -> Result<Option<TrackLayout>, CkdError> {
        let off = self.check_track(cyl, head)?;
        let Some(map) = &self.map else {
            return Ok(None);
        };
        let slot = map
            .get(off as usize, self.track_size())
            .ok_or(CkdError::TrackOutOfRange { cyl, head })?;
        parse_track(slot, cyl, head).map(Some)
    }

    /// [`Self::check_mapped_track`] remembered: checks slot (`cyl`, `head`) in the mapping
    /// unless it was found well formed before and not written through this image since.
    /// Returns the slot's offset in the mapping (for [`Self::mapped_bytes`]), or `Ok(None)`
    /// if the image is not mapped. A malformed slot is never remembered: it fails each time.
    /// (Another process writing the file is not seen by the memory; the bytes themselves
    /// are always read live, and every reader bounds-checks them.)
    pub fn verify_mapped_track(&mut self, cyl: u32, head: u32) -> Result<Option<usize>, CkdError> {
        let off = self.check_track(cyl, head)? as usize;
        let Some(map) = &self.map else {
            return Ok(None);
        };
        let t = cyl as usize * self.header.heads as usize + head as usize;
        let (word, bit) = (t / 64, 1u64 << (t % 64));
        if self.checked[word] & bit == 0 {
            let slot = map
                .get(off, self.track_size())
                .ok_or(CkdError::TrackOutOfRange { cyl, head })?;
            scan_track(slot, cyl, head, |_| {})?;
            self.checked[word] |= bit;
        }
        Ok(Some(off))
    }

    /// `len` bytes at `offset` of the read-only mapping (offsets as
    /// [`Self::verify_mapped_track`] returns them): `None` if not mapped or out of range.
    pub fn mapped_bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        self.map.as_ref()?.get(offset, len)
    }

    /// Forgets that slot (`cyl`, `head`) was found well formed (it is about to change).
    fn uncheck(&mut self, cyl: u32, head: u32) {
        let t = cyl as usize * self.header.heads as usize + head as usize;
        if let Some(w) = self.checked.get_mut(t / 64) {
            *w &= !(1u64 << (t % 64));
        }
    }

    /// The bytes of track slot (`cyl`, `head`) in the read-only mapping: `None` if the image
    /// is not mapped or the track is outside the volume. No copy is made; the slice shows
    /// this image's own writes once they return (writes take `&mut self`, so none runs while
    /// the slice is alive). Another process writing the file may change it (see the module
    /// docs of `image::map` for truncation).
    pub fn mapped_slot(&self, cyl: u32, head: u32) -> Option<&[u8]> {
        let off = self.check_track(cyl, head).ok()?;
        self.map.as_ref()?.get(off as usize, self.track_size())
    }

    /// Writes `data` at `offset` within track slot (`cyl`, `head`) with one positioned write,
    /// then fdatasync if the image was opened with `sync_writes`.
    pub fn write_track_range(
        &mut self,
        cyl: u32,
        head: u32,
        offset: usize,
        data: &[u8],
    ) -> Result<(), CkdError> {
        self.write_track_parts(cyl, head, &[(offset, data)])
    }

    /// Writes `parts` (offset in the slot, bytes) in the order given, one positioned write
    /// each, then one fdatasync if the image was opened with `sync_writes`. The order is the
    /// caller's crash ordering: a failure leaves the earlier parts written, the later ones
    /// untouched (the failing one possibly in part). Every part is checked before any write.
    pub fn write_track_parts(
        &mut self,
        cyl: u32,
        head: u32,
        parts: &[(usize, &[u8])],
    ) -> Result<(), CkdError> {
        if self.options.read_only {
            return Err(CkdError::ReadOnly);
        }
        let slot = self.check_track(cyl, head)?;
        for &(offset, data) in parts {
            if !matches!(offset.checked_add(data.len()), Some(end) if end <= self.track_size()) {
                return Err(CkdError::BadRange {
                    offset,
                    len: data.len(),
                    track_size: self.header.track_size,
                });
            }
        }
        // Before any byte changes: even a failed write may have left the slot half written.
        self.uncheck(cyl, head);
        for &(offset, data) in parts {
            self.file
                .pwrite_all(data, slot + offset as u64)
                .map_err(io_err("write track"))?;
        }
        if self.options.sync_writes {
            self.file.datasync().map_err(io_err("fdatasync"))?;
        }
        Ok(())
    }

    /// Writes a whole track slot.
    pub fn write_track(&mut self, cyl: u32, head: u32, buf: &[u8]) -> Result<(), CkdError> {
        if buf.len() != self.track_size() {
            return Err(CkdError::BadRange {
                offset: 0,
                len: buf.len(),
                track_size: self.header.track_size,
            });
        }
        self.write_track_range(cyl, head, 0, buf)
    }

    /// Flushes written data to stable storage.
    pub fn sync(&self) -> Result<(), CkdError> {
        self.file.datasync().map_err(io_err("fdatasync"))
    }
}

fn slot_offset(h: &DeviceHeader, cyl: u32, head: u32) -> u64 {
    DEVHDR_SIZE as u64 + (cyl as u64 * h.heads as u64 + head as u64) * h.track_size as u64
}

/// IPL1 data `dasdinit` writes: a disabled-wait PSW, then a NOP CCW (count 1), then zeros.
const IPL1_DATA: [u8; 24] = [
    0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0F, // PSW
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, // CCW: NOP, count 1
    0, 0, 0, 0, 0, 0, 0, 0,
];

/// Builds records into a zeroed track buffer.
struct TrackWriter<'a> {
    buf: &'a mut [u8],
    cyl: u16,
    head: u16,
    pos: usize,
}

impl<'a> TrackWriter<'a> {
    fn new(buf: &'a mut [u8], cyl: u16, head: u16) -> Self {
        buf[..HA_SIZE].copy_from_slice(&home_address(cyl, head));
        TrackWriter {
            buf,
            cyl,
            head,
            pos: HA_SIZE,
        }
    }

    fn record(&mut self, rec: u8, key: &[u8], data: &[u8]) {
        let count = CountField {
            cyl: self.cyl,
            head: self.head,
            rec,
            key_len: key.len() as u8,
            data_len: data.len() as u16,
        };
        let p = self.pos;
        self.buf[p..p + COUNT_SIZE].copy_from_slice(&count.to_bytes());
        let k = p + COUNT_SIZE;
        self.buf[k..k + key.len()].copy_from_slice(key);
        let d = k + key.len();
        self.buf[d..d + data.len()].copy_from_slice(data);
        self.pos = d + data.len();
    }

    fn finish(self) {
        self.buf[self.pos..self.pos + COUNT_SIZE].copy_from_slice(&END_OF_TRACK);
    }
}

/// The 80-byte VOL1 label data `dasdinit` (3.13) writes: "VOL1", the volser, security byte
/// 0x40, VTOC pointer CCHHR 0000 0001 01, owner "HERCULES" at byte 41, blanks elsewhere.
pub fn vol1_label(volser: &str) -> Result<[u8; 80], CkdError> {
    let bad = || CkdError::BadVolser(volser.to_string());
    if volser.is_empty() || volser.len() > 6 {
        return Err(bad());
    }
    let upper = volser.to_ascii_uppercase();
    if !upper
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"@#$".contains(&c))
    {
        return Err(bad());
    }
    let mut l = [0x40u8; 80];
    l[0..4].copy_from_slice(&ebcdic_label("VOL1"));
    let v = ebcdic_label(&format!("{upper:<6}"));
    l[4..10].copy_from_slice(&v);
    l[10] = 0x40;
    l[11..16].copy_from_slice(&[0x00, 0x00, 0x00, 0x01, 0x01]);
    l[41..49].copy_from_slice(&ebcdic_label("HERCULES"));
    Ok(l)
}

/// Encodes label text (A-Z, 0-9, blank, @ # $) in EBCDIC (code page 037); anything else
/// becomes a blank.
pub fn ebcdic_label(s: &str) -> Vec<u8> {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'I' => 0xC1 + (c - b'A'),
            b'J'..=b'R' => 0xD1 + (c - b'J'),
            b'S'..=b'Z' => 0xE2 + (c - b'S'),
            b'0'..=b'9' => 0xF0 + (c - b'0'),
            b'@' => 0x7C,
            b'#' => 0x7B,
            b'$' => 0x5B,
            _ => 0x40,
        })
        .collect()
}

/// Decodes EBCDIC label text (the inverse of [`ebcdic_label`]; unknown bytes become '?').
pub fn ascii_label(b: &[u8]) -> String {
    b.iter()
        .map(|&c| match c {
            0xC1..=0xC9 => (b'A' + (c - 0xC1)) as char,
            0xD1..=0xD9 => (b'J' + (c - 0xD1)) as char,
            0xE2..=0xE9 => (b'S' + (c - 0xE2)) as char,
            0xF0..=0xF9 => (b'0' + (c - 0xF0)) as char,
            0x7C => '@',
            0x7B => '#',
            0x5B => '$',
            0x40 => ' ',
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 20 header bytes `dasdinit t.ckd 3390 VOL001 3` (Hercules 3.13) wrote.
    const DASDINIT_HDR: [u8; 20] = [
        0x43, 0x4b, 0x44, 0x5f, 0x50, 0x33, 0x37, 0x30, 0x0f, 0x00, 0x00, 0x00, 0x00, 0xde, 0x00,
        0x00, 0x90, 0x00, 0x00, 0x00,
    ];

    /// Track 0 of that image up to the end marker (offset 305), as dumped from the file.
    fn dasdinit_track0() -> Vec<u8> {
        let mut t = vec![0, 0, 0, 0, 0];
        t.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 8]);
        t.extend_from_slice(&[0; 8]);
        t.extend_from_slice(&[0, 0, 0, 0, 1, 4, 0, 0x18]);
        t.extend_from_slice(&[0xc9, 0xd7, 0xd3, 0xf1]);
        t.extend_from_slice(&[
            0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x03, 0, 0, 0, 0, 0, 0, 0x01,
        ]);
        t.extend_from_slice(&[0; 8]);
        t.extend_from_slice(&[0, 0, 0, 0, 2, 4, 0, 0x90]);
        t.extend_from_slice(&[0xc9, 0xd7, 0xd3, 0xf2]);
        t.extend_from_slice(&[0; 144]);
        t.extend_from_slice(&[0, 0, 0, 0, 3, 4, 0, 0x50]);
        t.extend_from_slice(&[0xe5, 0xd6, 0xd3, 0xf1]);
        // VOL1 data: e5d6d3f1 e5d6d3f0f0f1 40 0000000101 40*25 c8c5d9c3e4d3c5e2 40*31
        t.extend_from_slice(&[0xe5, 0xd6, 0xd3, 0xf1, 0xe5, 0xd6, 0xd3, 0xf0, 0xf0, 0xf1]);
        t.push(0x40);
        t.extend_from_slice(&[0, 0, 0, 1, 1]);
        t.extend_from_slice(&[0x40; 25]);
        t.extend_from_slice(&[0xc8, 0xc5, 0xd9, 0xc3, 0xe4, 0xd3, 0xc5, 0xe2]);
        t.extend_from_slice(&[0x40; 31]);
        t.extend_from_slice(&END_OF_TRACK);
        t
    }

    #[test]
    fn header_bytes_match_dasdinit() {
        let h = DeviceHeader::new_3390().to_bytes();
        assert_eq!(&h[..20], &DASDINIT_HDR);
        assert!(h[20..].iter().all(|&b| b == 0));
        let p = DeviceHeader::parse(&h).unwrap();
        assert_eq!(p.heads, 15);
        assert_eq!(p.track_size, 56832);
        assert_eq!(p.dev_type, 0x90);
    }

    #[test]
    fn track_size_is_hercules_rounding() {
        let raw = (HA_SIZE + COUNT_SIZE + 8 + COUNT_SIZE + TRACK_CAPACITY_3390 as usize + 8) as u32;
        assert_eq!(raw, 56701);
        assert_eq!(raw.div_ceil(512) * 512, TRACK_SIZE_3390);
    }

    #[test]
    fn count_field_encoding() {
        let c = CountField {
            cyl: 0x0102,
            head: 0x000e,
            rec: 3,
            key_len: 4,
            data_len: 0x1000,
        };
        assert_eq!(
            c.to_bytes(),
            [0x01, 0x02, 0x00, 0x0e, 0x03, 0x04, 0x10, 0x00]
        );
        assert_eq!(CountField::from_bytes(&c.to_bytes()), c);
        assert_eq!(c.total_len(), 8 + 4 + 0x1000);
    }

    #[test]
    fn create_matches_dasdinit_track0() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.ckd");
        let img = CkdImage::create_3390(&p, 2, Some("vol001")).unwrap();
        assert_eq!(img.cylinders(), 2);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len(), 512 + 2 * 15 * 56832);
        assert_eq!(&bytes[..20], &DASDINIT_HDR);
        let t0 = dasdinit_track0();
        assert_eq!(&bytes[512..512 + t0.len()], &t0[..]);
        assert!(bytes[512 + t0.len()..512 + 56832].iter().all(|&b| b == 0));
        // Track (1, 14): HA 00 0001 000e, R0, end marker.
        let off = 512 + 29 * 56832;
        assert_eq!(
            &bytes[off..off + 29],
            &[
                0, 0, 1, 0, 14, 0, 1, 0, 14, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0xff, 0xff
            ]
        );
        let mut buf = vec![0u8; img.track_size()];
        let lay = img.read_track(0, 0, &mut buf).unwrap();
        assert_eq!(lay.records.len(), 4);
        assert_eq!(lay.end, 305);
        assert_eq!(ascii_label(&buf[305 - 80..305 - 74]), "VOL1VO");
    }

    #[test]
    fn create_refuses_bad_volser_and_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.ckd");
        assert!(matches!(
            CkdImage::create_3390(&p, 1, Some("TOOLONG")),
            Err(CkdError::BadVolser(_))
        ));
        assert!(matches!(
            CkdImage::create_3390(&p, 1, Some("a b")),
            Err(CkdError::BadVolser(_))
        ));
        CkdImage::create_3390(&p, 1, None).unwrap();
        let e = CkdImage::create_3390(&p, 1, None).unwrap_err();
        assert_eq!(e.errno(), libc::EEXIST);
    }

    fn image_with(dir: &tempfile::TempDir, f: impl FnOnce(&mut Vec<u8>)) -> std::path::PathBuf {
        let p = dir.path().join("src.ckd");
        if !p.exists() {
            CkdImage::create_3390(&p, 1, Some("X")).unwrap();
        }
        let mut bytes = std::fs::read(&p).unwrap();
        f(&mut bytes);
        let q = dir.path().join("bad.ckd");
        std::fs::write(&q, &bytes).unwrap();
        q
    }

    #[test]
    fn open_refuses_malformed_images() {
        let dir = tempfile::tempdir().unwrap();
        let ro = CkdOpenOptions::default();
        let p = image_with(&dir, |b| b.truncate(100));
        assert!(matches!(
            CkdImage::open(&p, ro),
            Err(CkdError::Truncated { len: 100 })
        ));
        let p = image_with(&dir, |b| b.truncate(512));
        assert!(matches!(
            CkdImage::open(&p, ro),
            Err(CkdError::Truncated { .. })
        ));
        let p = image_with(&dir, |b| b.truncate(512 + 56832 * 15 - 1));
        assert!(matches!(
            CkdImage::open(&p, ro),
            Err(CkdError::PartialCylinder { .. })
        ));
        let p = image_with(&dir, |b| b[0..8].copy_from_slice(b"NOTACKD!"));
        let e = CkdImage::open(&p, ro).unwrap_err();
        assert!(matches!(e, CkdError::BadMagic(_)));
        assert_eq!(e.errno(), libc::EINVAL);
        let p = image_with(&dir, |b| b[0..8].copy_from_slice(b"CKD_C370"));
        let e = CkdImage::open(&p, ro).unwrap_err();
        assert!(matches!(e, CkdError::Unsupported(_)));
        assert_eq!(e.errno(), libc::EOPNOTSUPP);
        let p = image_with(&dir, |b| b[12..16].copy_from_slice(&7u32.to_le_bytes()));
        assert!(matches!(
            CkdImage::open(&p, ro),
            Err(CkdError::BadGeometry { track_size: 7, .. })
        ));
        let p = image_with(&dir, |b| b[8..12].copy_from_slice(&0u32.to_le_bytes()));
        assert!(matches!(
            CkdImage::open(&p, ro),
            Err(CkdError::BadGeometry { heads: 0, .. })
        ));
        let p = image_with(&dir, |b| b[17] = 1);
        assert!(matches!(
            CkdImage::open(&p, ro),
            Err(CkdError::MultiFile { .. })
        ));
    }

    #[test]
    fn read_track_refuses_damaged_tracks() {
        let dir = tempfile::tempdir().unwrap();
        let ro = CkdOpenOptions::default();
        // R0 data length 0xFFFF overflows the slot.
        let p = image_with(&dir, |b| {
            b[512 + 56832 + 11] = 0xff;
            b[512 + 56832 + 12] = 0xff;
        });
        let img = CkdImage::open(&p, ro).unwrap();
        let mut buf = vec![0u8; img.track_size()];
        let e = img.read_track(0, 1, &mut buf).unwrap_err();
        assert!(matches!(
            e,
            CkdError::TrackOverflow {
                cyl: 0,
                head: 1,
                offset: 5
            }
        ));
        assert_eq!(e.errno(), libc::EIO);
        // Home address of track 2 claims head 3.
        let p = image_with(&dir, |b| b[512 + 2 * 56832 + 4] = 3);
        let img = CkdImage::open(&p, ro).unwrap();
        assert!(matches!(
            img.read_track(0, 2, &mut buf),
            Err(CkdError::BadHomeAddress { head: 2, .. })
        ));
        // No end marker anywhere: records run to the end of the slot.
        let p = image_with(&dir, |b| {
            let s = 512 + 3 * 56832;
            for i in (s + 21..s + 56832).step_by(8) {
                let end = (i + 8).min(s + 56832);
                b[i..end].fill(0);
            }
        });
        let img = CkdImage::open(&p, ro).unwrap();
        assert!(matches!(
            img.read_track(0, 3, &mut buf),
            Err(CkdError::TrackOverflow { .. })
        ));
        assert!(matches!(
            img.read_track(1, 0, &mut buf),
            Err(CkdError::TrackOutOfRange { cyl: 1, head: 0 })
        ));
        assert!(matches!(
            img.read_track(0, 0, &mut buf[..10]),
            Err(CkdError::BadRange { .. })
        ));
    }

    #[test]
    fn write_range_is_positioned_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.ckd");
        drop(CkdImage::create_3390(&p, 1, None).unwrap());
        let mut img = CkdImage::open(
            &p,
            CkdOpenOptions {
                read_only: false,
                sync_writes: true,
            },
        )
        .unwrap();
        img.write_track_range(0, 4, 13, &[1, 2, 3]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            &bytes[512 + 4 * 56832 + 13..512 + 4 * 56832 + 16],
            &[1, 2, 3]
        );
        assert!(matches!(
            img.write_track_range(0, 4, 56830, &[1, 2, 3]),
            Err(CkdError::BadRange { .. })
        ));
        assert!(matches!(
            img.write_track_range(0, 15, 0, &[1]),
            Err(CkdError::TrackOutOfRange { .. })
        ));
        let mut ro = CkdImage::open(
            &p,
            CkdOpenOptions {
                read_only: true,
                sync_writes: false,
            },
        )
        .unwrap();
        let e = ro.write_track_range(0, 0, 0, &[0]).unwrap_err();
        assert!(matches!(e, CkdError::ReadOnly));
        assert_eq!(e.errno(), libc::EROFS);
    }

    #[test]
    fn mapped_reads_match_pread_and_see_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.ckd");
        drop(CkdImage::create_3390(&p, 1, Some("MAP001")).unwrap());
        let mut img = CkdImage::open(&p, CkdOpenOptions::default()).unwrap();
        assert!(img.is_mapped());
        let mut buf = vec![0u8; img.track_size()];
        let layout = img.read_track(0, 0, &mut buf).unwrap();
        assert_eq!(img.check_mapped_track(0, 0).unwrap(), Some(layout));
        assert_eq!(img.mapped_slot(0, 0).unwrap(), &buf[..]);
        // Slot 3 starts at 512 + 3 * 56832 in the file.
        let file = std::fs::read(&p).unwrap();
        let at = 512 + 3 * 56832;
        assert_eq!(img.mapped_slot(0, 3).unwrap(), &file[at..at + 56832]);
        assert!(img.mapped_slot(0, 15).is_none());
        assert!(img.mapped_slot(1, 0).is_none());
        assert!(matches!(
            img.check_mapped_track(1, 0),
            Err(CkdError::TrackOutOfRange { cyl: 1, head: 0 })
        ));
        // A write through the image shows in the mapping at once.
        img.write_track_range(0, 3, 100, &[7, 8, 9]).unwrap();
        assert_eq!(&img.mapped_slot(0, 3).unwrap()[100..103], &[7, 8, 9]);
        // A damaged slot is refused as read_track refuses it.
        img.write_track_range(0, 2, 4, &[3]).unwrap();
        assert!(matches!(
            img.check_mapped_track(0, 2),
            Err(CkdError::BadHomeAddress {
                cyl: 0,
                head: 2,
                ..
            })
        ));
        // Images behind another ImageFile are not mapped.
        let f = std::fs::File::open(&p).unwrap();
        let img = CkdImage::from_backing(Box::new(f), CkdOpenOptions::default()).unwrap();
        assert!(!img.is_mapped());
        assert_eq!(img.check_mapped_track(0, 0).unwrap(), None);
        assert!(img.mapped_slot(0, 0).is_none());
    }

    #[test]
    fn verified_tracks_are_remembered_until_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.ckd");
        drop(CkdImage::create_3390(&p, 1, Some("VER001")).unwrap());
        let mut img = CkdImage::open(&p, CkdOpenOptions::default()).unwrap();
        let at = 512 + 2 * 56832;
        assert_eq!(img.verify_mapped_track(0, 2).unwrap(), Some(at));
        assert_eq!(img.mapped_bytes(at, 5).unwrap(), &[0, 0, 0, 0, 2]);
        assert!(img.mapped_bytes(at, 57 * 56832).is_none());
        // A write through the image forgets the check: the damage is found next time...
        img.write_track_range(0, 2, 4, &[3]).unwrap();
        let bad = |r: Result<Option<usize>, CkdError>| {
            matches!(
                r,
                Err(CkdError::BadHomeAddress {
                    cyl: 0,
                    head: 2,
                    ..
                })
            )
        };
        assert!(bad(img.verify_mapped_track(0, 2)));
        // ... and every time after: a malformed slot is never remembered.
        assert!(bad(img.verify_mapped_track(0, 2)));
        // Other slots keep their bit; the repaired slot passes again.
        assert_eq!(img.verify_mapped_track(0, 3).unwrap(), Some(at + 56832));
        img.write_track_range(0, 2, 4, &[2]).unwrap();
        assert_eq!(img.verify_mapped_track(0, 2).unwrap(), Some(at));
        // A write refused by its range check changes nothing: the slot is still well formed.
        assert!(img.write_track_range(0, 2, 56832, &[1]).is_err());
        assert_eq!(img.verify_mapped_track(0, 2).unwrap(), Some(at));
        assert!(matches!(
            img.verify_mapped_track(1, 0),
            Err(CkdError::TrackOutOfRange { cyl: 1, head: 0 })
        ));
        // Not mapped: None, as check_mapped_track.
        let f = std::fs::File::open(&p).unwrap();
        let mut img = CkdImage::from_backing(Box::new(f), CkdOpenOptions::default()).unwrap();
        assert_eq!(img.verify_mapped_track(0, 0).unwrap(), None);
    }

    #[test]
    fn ebcdic_label_round_trip() {
        assert_eq!(ebcdic_label("VOL1"), [0xe5, 0xd6, 0xd3, 0xf1]);
        assert_eq!(ebcdic_label("A9 @#$"), [0xc1, 0xf9, 0x40, 0x7c, 0x7b, 0x5b]);
        assert_eq!(ascii_label(&ebcdic_label("HERCULES")), "HERCULES");
    }
}
