//! A 3390 ECKD DASD on a 3990-6 control unit, over a Hercules CKD image.
//!
//! Behaviour follows Hercules `ckddasd.c` (facts, not code): a device keeps its position
//! (cylinder, head, offset in the track image, orientation to a count/key/data field) across
//! commands and programs; per-program state (Define Extent, Set File Mask, the Locate Record
//! domain, which positioning commands ran, the index-point mark) resets in
//! [`DeviceModel::start_program`]. The channel gathers data chaining, so every command gets
//! its whole data area in one `execute_area` call. Input is put into the area in order, so
//! it goes straight to storage; with the image mapped, a Read Data is one copy from the page
//! cache into the guest's pages.
//!
//! Writes update the cached track and `pwrite` the changed bytes before status is presented
//! (optionally followed by fdatasync, see [`CkdOpenOptions::sync_writes`]); a failed write is
//! a unit check with equipment-check sense, never success.
//!
//! Not modelled: track-overflow records, Write Key and Data, Read Sector, Search Key,
//! Locate Record Extended extended operations (Read/Write Any, Read Track Set), Prefix with
//! Perform Subsystem Function, PSF/RSSD, Suspend Multipath Reconnection, reserve/release.

pub mod chars;
pub mod sense;
#[cfg(test)]
mod tests;

pub use chars::{configuration_data, device_characteristics, model_for, sense_id};
use sense::*;

use crate::ccw::CommandSet;
use crate::css::device::{Command, DataArea, DeviceIdentity, DeviceModel, Outcome};
use crate::image::ckd::{
    CkdError, CkdImage, CkdOpenOptions, CountField, COUNT_SIZE, DEVTYPE_3390, END_OF_TRACK,
    HA_SIZE, HEADS_3390,
};
use crate::orb::dstat;
use thiserror::Error;

/// Why a CKD image cannot back a 3390.
#[derive(Debug, Error)]
pub enum DasdError {
    /// The image itself could not be opened or is malformed.
    #[error(transparent)]
    Image(#[from] CkdError),
    /// The image is not a 3390 volume (device type byte, heads, track size) (EINVAL).
    #[error("image is not a 3390 volume (type byte {dev_type:#04x}, {heads} heads, track size {track_size})")]
    NotA3390 {
        /// Device-type byte from the header.
        dev_type: u8,
        /// Heads per cylinder.
        heads: u32,
        /// Track slot size.
        track_size: u32,
    },
}

impl DasdError {
    /// The errno a caller reports.
    pub fn errno(&self) -> i32 {
        match self {
            DasdError::Image(e) => e.errno(),
            DasdError::NotA3390 { .. } => libc::EINVAL,
        }
    }
}

/// Locate Record operation byte: orientation bits.
const OPER_ORIENT_MASK: u8 = 0xC0;
const ORIENT_COUNT: u8 = 0x00;
const ORIENT_HOME: u8 = 0x40;
const ORIENT_DATA: u8 = 0x80;
const ORIENT_INDEX: u8 = 0xC0;
/// Locate Record operation codes (bits 2-7).
const OPER_CODE_MASK: u8 = 0x3F;
const OP_ORIENT: u8 = 0x00;
const OP_WRITE: u8 = 0x01;
const OP_FORMAT: u8 = 0x03;
const OP_READ: u8 = 0x06;
const OP_WRITE_TRACK: u8 = 0x0B;
const OP_READ_TRACKS: u8 = 0x0C;
const OP_READ16: u8 = 0x16;
const OP_EXTENDED: u8 = 0x3F;
/// Locate Record auxiliary byte.
const AUX_TLF_VALID: u8 = 0x80;
const AUX_RESERVED: u8 = 0x7E;
const AUX_READ_COUNT_SUFFIX: u8 = 0x01;
/// File mask bits.
const MASK_WRITE: u8 = 0xC0;
const MASK_INHIBIT_HA_R0: u8 = 0x00;
const MASK_INHIBIT_ALL: u8 = 0x40;
const MASK_ALLOW_ALL: u8 = 0xC0;
const MASK_RESERVED: u8 = 0x20;
const MASK_SEEK: u8 = 0x18;
const MASK_SEEK_ALL: u8 = 0x00;
const MASK_SEEK_CYL_HEAD: u8 = 0x08;
const MASK_INHIBIT_SEEK_MT: u8 = 0x18;
/// Define Extent global attributes: architecture mode bits, which must say ECKD.
const GATTR_ARCH: u8 = 0xC0;
const GATTR_CKD_CONVERSION: u8 = 0x20;
/// Prefix format and validity bytes.
const PFX_DX: u8 = 0x00;
const PFX_DX_LRE: u8 = 0x01;
const PFX_DX_VALID: u8 = 0x80;

/// Where the device is within the current track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Orient {
    /// Unknown (no track read yet).
    None,
    /// Just after the home address.
    Index,
    /// Just after a count field.
    Count,
    /// Just after a key field.
    Key,
    /// Just after a data field.
    Data,
    /// At the end-of-track marker.
    Eot,
}

/// The device presented unit check; its sense bytes are set.
struct Check;

type Res<T> = Result<T, Check>;

/// The active extent (whole volume unless Define Extent narrowed it), as [`track_key`]s.
#[derive(Debug, Clone, Copy)]
struct Extent {
    begin: u64,
    end: u64,
}

/// (cylinder, head) as one number ordered as the pair is (cylinder first): an extent check
/// is one comparison per bound instead of a tuple comparison.
#[inline]
fn track_key(cyl: u32, head: u32) -> u64 {
    (cyl as u64) << 32 | head as u64
}

impl Extent {
    fn new(bcyl: u32, bhead: u32, ecyl: u32, ehead: u32) -> Self {
        Extent {
            begin: track_key(bcyl, bhead),
            end: track_key(ecyl, ehead),
        }
    }
    fn outside(&self, cyl: u32, head: u32) -> bool {
        let k = track_key(cyl, head);
        k < self.begin || k > self.end
    }
}

/// State that lives for one channel program.
#[derive(Debug, Clone)]
struct Program {
    extent_defined: bool,
    file_mask_set: bool,
    fmask: u8,
    gattr: u8,
    blksize: u32,
    extent: Extent,
    seek: bool,
    locate: bool,
    read_ipl: bool,
    index_passed: bool,
    ha_equal: bool,
    id_equal: bool,
    wrote_ckd: bool,
    wrote_ha: bool,
    /// Sense/Set Path Group ID must end the chain: the next command is rejected.
    reject_next: bool,
    /// Commands left in the Locate Record domain.
    lcount: u8,
    loper: u8,
    laux: u8,
    tlf: u32,
}

impl Program {
    fn new(cylinders: u32, heads: u32) -> Self {
        Program {
            extent_defined: false,
            file_mask_set: false,
            fmask: 0,
            gattr: 0,
            blksize: 0,
            extent: Extent::new(0, 0, cylinders - 1, heads - 1),
            seek: false,
            locate: false,
            read_ipl: false,
            index_passed: false,
            ha_equal: false,
            id_equal: false,
            wrote_ckd: false,
            wrote_ha: false,
            reject_next: false,
            lcount: 0,
            loper: 0,
            laux: 0,
            tlf: 0,
        }
    }

    fn op(&self) -> u8 {
        self.loper & OPER_CODE_MASK
    }
}

/// Options for a 3390 device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dasd3390Options {
    /// How to open the image (read-only, fsync after each write).
    pub open: CkdOpenOptions,
    /// Device number, reported in Read Configuration Data.
    pub devnum: u16,
}

/// A 3390 DASD device model over a CKD image.
pub struct Dasd3390 {
    image: CkdImage,
    cylinders: u32,
    heads: u32,
    dev_model: u8,
    devnum: u16,
    serial: [u8; 12],
    sense: [u8; SENSE_LEN],
    ready: bool,
    /// Path group id set by Set Path Group ID (zeros: ungrouped).
    pgid: [u8; 11],
    /// Cached track image (unused when the image is mapped: the track is then read in
    /// place, and a Read Data copies from the page cache straight into storage).
    track: Vec<u8>,
    mapped: bool,
    /// Offset in the image's mapping of the slot `track()` shows when mapped (the last
    /// one loaded): found once per track switch, so reading the track is one bounds check.
    slot_off: usize,
    /// Track slot size.
    tsize: usize,
    loaded: Option<(u32, u32)>,
    cyl: u32,
    head: u32,
    pos: usize,
    orient: Orient,
    rec: u8,
    kl: usize,
    dl: usize,
    prog: Program,
}

impl std::fmt::Debug for Dasd3390 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dasd3390")
            .field("cylinders", &self.cylinders)
            .field("cyl", &self.cyl)
            .field("head", &self.head)
            .field("orient", &self.orient)
            .finish_non_exhaustive()
    }
}

fn is_mt(code: u8) -> bool {
    code & 0x80 != 0
}

fn is_search_id(code: u8) -> bool {
    matches!(code & 0x7F, 0x31 | 0x51 | 0x71)
}

impl Dasd3390 {
    /// Opens a CKD image as a 3390.
    pub fn open(
        path: impl AsRef<std::path::Path>,
        opts: Dasd3390Options,
    ) -> Result<Self, DasdError> {
        let image = CkdImage::open(path, opts.open)?;
        Self::new(image, opts.devnum)
    }

    /// Wraps an open image; it must be a 3390 volume (type byte 0x90, 15 heads, and slots
    /// large enough for a full 3390 track).
    pub fn new(image: CkdImage, devnum: u16) -> Result<Self, DasdError> {
        let h = *image.header();
        if h.dev_type != DEVTYPE_3390
            || h.heads != HEADS_3390
            || h.track_size < crate::image::ckd::TRACK_SIZE_3390 - 131
        {
            return Err(DasdError::NotA3390 {
                dev_type: h.dev_type,
                heads: h.heads,
                track_size: h.track_size,
            });
        }
        let cylinders = image.cylinders();
        let serial = if h.serial.iter().all(|b| b.is_ascii_alphanumeric()) {
            h.serial
        } else {
            *b"000000000000"
        };
        let mapped = image.is_mapped();
        Ok(Dasd3390 {
            track: if mapped {
                Vec::new()
            } else {
                vec![0; image.track_size()]
            },
            mapped,
            // Slot (0, 0), as before any load.
            slot_off: crate::image::ckd::DEVHDR_SIZE,
            tsize: image.track_size(),
            cylinders,
            heads: h.heads,
            dev_model: model_for(cylinders),
            devnum,
            serial,
            sense: [0; SENSE_LEN],
            ready: true,
            pgid: [0; 11],
            loaded: None,
            cyl: 0,
            head: 0,
            pos: HA_SIZE,
            orient: Orient::None,
            rec: 0,
            kl: 0,
            dl: 0,
            prog: Program::new(cylinders, h.heads),
            image,
        })
    }

    /// Cylinders on the volume.
    pub fn cylinders(&self) -> u32 {
        self.cylinders
    }

    /// The image behind the device.
    pub fn image(&self) -> &CkdImage {
        &self.image
    }

    /// Makes the device not ready (every command but Sense and Sense ID ends with
    /// intervention required) or ready again.
    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }

    // ----- sense -------------------------------------------------------------------------

    fn check(&mut self, s0: u8, s1: u8, format: u8, message: u8) -> Check {
        self.sense = sense::build(
            s0,
            s1,
            0,
            format,
            message,
            SenseWhere {
                cyl: self.cyl,
                head: self.head,
                rec: self.rec,
                cylinders: self.cylinders,
            },
        );
        Check
    }

    fn reject(&mut self, message: u8) -> Check {
        self.check(SENSE_CR, 0, FORMAT_0, message)
    }

    fn sequence(&mut self) -> Check {
        self.reject(MSG_INVALID_SEQUENCE)
    }

    fn file_protected(&mut self) -> Check {
        self.check(0, SENSE1_FP, 0, 0)
    }

    fn equipment_check(&mut self) -> Check {
        // The cached track may no longer match the file.
        self.loaded = None;
        self.orient = Orient::None;
        self.check(SENSE_EC, 0, FORMAT_1, 0)
    }

    // ----- positioning -------------------------------------------------------------------

    /// The current track image: the cache, or the slot in the image's mapping.
    fn track(&self) -> &[u8] {
        if self.mapped {
            self.image
                .mapped_bytes(self.slot_off, self.tsize)
                .unwrap_or_default()
        } else {
            &self.track
        }
    }

    fn load(&mut self, cyl: u32, head: u32) -> Res<()> {
        if self.loaded == Some((cyl, head)) {
            return Ok(());
        }
        self.loaded = None;
        let r = if self.mapped {
            // Checked once, then remembered until a write to it (a read-only sequence
            // crossing tracks pays a bit test per track, not a parse).
            self.image.verify_mapped_track(cyl, head)
        } else {
            self.image
                .read_track(cyl, head, &mut self.track)
                .map(|_| None)
        };
        match r {
            Ok(off) => {
                if let Some(off) = off {
                    self.slot_off = off;
                }
                self.loaded = Some((cyl, head));
                Ok(())
            }
            Err(CkdError::Io { .. }) => Err(self.equipment_check()),
            Err(_) => {
                // A damaged track image reads as a data check on that track.
                self.cyl = cyl;
                self.head = head;
                self.orient = Orient::None;
                Err(self.check(SENSE_DC, 0, FORMAT_4, 0))
            }
        }
    }

    fn seek(&mut self, cyl: u32, head: u32) -> Res<()> {
        self.load(cyl, head)?;
        self.cyl = cyl;
        self.head = head;
        self.rec = 0;
        self.kl = 0;
        self.dl = 0;
        self.pos = HA_SIZE;
        self.orient = Orient::Index;
        Ok(())
    }

    /// Re-reads the current track if a failed write dropped it.
    fn ensure_loaded(&mut self) -> Res<()> {
        if self.loaded != Some((self.cyl, self.head)) {
            self.seek(self.cyl, self.head)?;
        }
        Ok(())
    }

    fn skip_current(&mut self) {
        match self.orient {
            Orient::Count => self.pos += self.kl + self.dl,
            Orient::Key => self.pos += self.dl,
            _ => {}
        }
    }

    fn mt_advance(&mut self, trks: u32) -> Res<()> {
        let p = &self.prog;
        if p.lcount == 0 && p.fmask & MASK_SEEK == MASK_INHIBIT_SEEK_MT {
            return Err(self.file_protected());
        }
        if p.lcount == 0 && self.head + trks >= self.heads {
            return Err(self.check(0, SENSE1_EOC, 0, 0));
        }
        let t = self.cyl * self.heads + self.head + trks;
        let (cyl, head) = (t / self.heads, t % self.heads);
        if cyl >= self.cylinders || self.prog.extent.outside(cyl, head) {
            return Err(self.file_protected());
        }
        self.seek(cyl, head)
    }

    /// Reads the next count field (Hercules `ckd_read_count`): skips R0 unless `code` is one
    /// that addresses it, wraps once at the index point for single-track commands, and ends
    /// with no record found the second time round. Returns `None` at end of track only for
    /// Read Track and Read Multiple CKD.
    fn read_count(&mut self, code: u8) -> Res<Option<CountField>> {
        self.ensure_loaded()?;
        // Only asked when record 0 comes by (once per track pass at most).
        let keep_r0 = || {
            code == 0xDE
                || code & 0x7F == 0x16
                || is_search_id(code)
                || matches!(code, 0x47 | 0x4B | 0x9D | 0xE7)
        };
        if self.orient == Orient::Eot {
            self.mt_advance(1)?;
        }
        loop {
            self.skip_current();
            let Some(raw) = self.track().get(self.pos..self.pos + COUNT_SIZE) else {
                return Err(self.equipment_check());
            };
            let raw: [u8; COUNT_SIZE] = raw.try_into().expect("count slice");
            self.pos += COUNT_SIZE;
            if raw != END_OF_TRACK {
                let c = CountField::from_bytes(&raw);
                self.rec = c.rec;
                self.kl = c.key_len as usize;
                self.dl = c.data_len as usize;
                self.orient = Orient::Count;
                if c.rec == 0 && !keep_r0() {
                    continue;
                }
                return Ok(Some(c));
            }
            self.orient = Orient::Eot;
            self.kl = 0;
            self.dl = 0;
            if code == 0xDE || code == 0x5E {
                return Ok(None);
            }
            let mt_read_outside_domain = self.prog.lcount == 0
                && is_mt(code)
                && crate::ccw::CommandKind::of(code) == crate::ccw::CommandKind::Read;
            if matches!(code, 0x47 | 0x4B | 0xE7 | 0x9D)
                || (self.prog.index_passed && !mt_read_outside_domain)
            {
                return Err(self.check(0, SENSE1_NRF, 0, 0));
            }
            if !is_mt(code) {
                self.seek(self.cyl, self.head)?;
                self.prog.index_passed = true;
            } else {
                self.mt_advance(1)?;
                if !is_search_id(code) {
                    self.prog.index_passed = true;
                }
            }
        }
    }

    /// Locate Record's search for the count field starting with `search` (CCHHR), right
    /// after its seek: what `read_count` does for codes 0x47, 0x4B and 0xE7 (record 0 included,
    /// no index wrap: the end of the track is no record found), in one pass over the track
    /// with the device state stored once at the end (`read_count` per record costs a track
    /// lookup and its checks each time).
    fn search_count(&mut self, search: &[u8; 5]) -> Res<()> {
        debug_assert!(self.orient == Orient::Index && self.loaded == Some((self.cyl, self.head)));
        let track = self.track();
        // CCHHR as the top five bytes of a count word.
        let want = u64::from_be_bytes([
            search[0], search[1], search[2], search[3], search[4], 0, 0, 0,
        ]);
        let mut pos = self.pos;
        // The last count field read: (record, key length, data length).
        let mut last: Option<(u8, usize, usize)> = None;
        let end = loop {
            let Some(w) = count_word(track, pos) else {
                break None;
            };
            pos += COUNT_SIZE;
            if w == EOT_WORD {
                break Some(false);
            }
            let (rec, kl, dl) = count_parts(w);
            last = Some((rec, kl, dl));
            if w >> 24 == want >> 24 {
                break Some(true);
            }
            pos += kl + dl;
        };
        self.pos = pos;
        if let Some((rec, kl, dl)) = last {
            self.rec = rec;
            self.kl = kl;
            self.dl = dl;
            self.orient = Orient::Count;
        }
        match end {
            Some(true) => Ok(()),
            Some(false) => {
                self.orient = Orient::Eot;
                self.kl = 0;
                self.dl = 0;
                Err(self.check(0, SENSE1_NRF, 0, 0))
            }
            None => Err(self.equipment_check()),
        }
    }

    /// Reads the key of the current record (reading the next count first if needed).
    fn read_key(&mut self, code: u8) -> Res<Vec<u8>> {
        if self.orient != Orient::Count {
            self.read_count(code)?;
        }
        let key = self.field(self.pos, self.kl)?;
        self.pos += self.kl;
        self.orient = Orient::Key;
        Ok(key)
    }

    /// Reads the data of the current record (reading the next count first if needed).
    fn read_data(&mut self, code: u8) -> Res<Vec<u8>> {
        let r = self.data_span(code)?;
        Ok(self.track()[r].to_vec())
    }

    /// Moves past the data of the current record (reading the next count first if needed)
    /// and returns where it lies in the cached track: Read Data copies from there straight
    /// into the channel's buffer, with no per-record allocation.
    fn data_span(&mut self, code: u8) -> Res<std::ops::Range<usize>> {
        if self.orient != Orient::Count && self.orient != Orient::Key {
            self.read_count(code)?;
        }
        if self.orient == Orient::Count {
            self.pos += self.kl;
        }
        let r = self.pos..self.pos + self.dl;
        if r.end > self.track().len() {
            return Err(self.equipment_check());
        }
        self.pos += self.dl;
        self.orient = Orient::Data;
        Ok(r)
    }

    fn field(&mut self, at: usize, len: usize) -> Res<Vec<u8>> {
        match self.track().get(at..at + len) {
            Some(b) => Ok(b.to_vec()),
            None => Err(self.equipment_check()),
        }
    }

    // ----- writing -----------------------------------------------------------------------

    /// Stores `bytes` at `at` in the current track, in the cache and in the file.
    fn store(&mut self, at: usize, bytes: &[u8]) -> Res<()> {
        self.store_split(at, bytes, 0)
    }

    /// [`Self::store`], writing `bytes[split..]` to the file before `bytes[..split]`.
    fn store_split(&mut self, at: usize, bytes: &[u8], split: usize) -> Res<()> {
        if self.image.read_only() {
            return Err(self.check(SENSE_EC, SENSE1_WRI, FORMAT_0, MSG_INVALID_PARAMETER));
        }
        if at + bytes.len() > self.track().len() {
            return Err(self.check(0, SENSE1_ITF, 0, 0));
        }
        // A mapped track shows the write once pwrite returns (the page cache is shared).
        if !self.mapped {
            self.track[at..at + bytes.len()].copy_from_slice(bytes);
        }
        let (head, tail) = bytes.split_at(split.min(bytes.len()));
        let parts = [(at + head.len(), tail), (at, head)];
        let parts = if head.is_empty() {
            &parts[..1]
        } else {
            &parts[..]
        };
        match self.image.write_track_parts(self.cyl, self.head, parts) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(cyl = self.cyl, head = self.head, error = %e, "3390 write failed");
                Err(self.equipment_check())
            }
        }
    }

    /// Writes a record (count from `buf[..8]`, key and data after it, zero padded) after the
    /// current one and an end-of-track marker after it. Returns the record's length.
    fn write_ckd(&mut self, buf: &[u8]) -> Res<usize> {
        self.ensure_loaded()?;
        self.skip_current();
        let mut raw = [0u8; COUNT_SIZE];
        let n = buf.len().min(COUNT_SIZE);
        raw[..n].copy_from_slice(&buf[..n]);
        let c = CountField::from_bytes(&raw);
        let len = c.total_len();
        if self.pos + len + COUNT_SIZE >= self.track().len() {
            return Err(self.check(0, SENSE1_ITF, 0, 0));
        }
        let mut rec = vec![0u8; len + COUNT_SIZE];
        let n = buf.len().min(len);
        rec[..n].copy_from_slice(&buf[..n]);
        rec[len..].copy_from_slice(&END_OF_TRACK);
        // The count field goes to the file last: a write that fails before it leaves the
        // old end-of-track marker (or count) there, so the track still parses without the
        // new record instead of holding a count with no end marker after it.
        self.store_split(self.pos, &rec, COUNT_SIZE)?;
        self.pos += len;
        self.rec = c.rec;
        self.kl = c.key_len as usize;
        self.dl = c.data_len as usize;
        self.orient = Orient::Data;
        Ok(len)
    }

    /// Overwrites the data area of the current record (zero padded).
    fn write_data(&mut self, buf: &[u8]) -> Res<()> {
        if self.orient != Orient::Count && self.orient != Orient::Key {
            return Err(self.sequence());
        }
        self.ensure_loaded()?;
        if self.orient == Orient::Count {
            self.pos += self.kl;
        }
        let mut data = vec![0u8; self.dl];
        let n = buf.len().min(self.dl);
        data[..n].copy_from_slice(&buf[..n]);
        self.store(self.pos, &data)?;
        self.pos += self.dl;
        self.orient = Orient::Data;
        Ok(())
    }

    /// Erases the rest of the track after the current record.
    fn erase(&mut self, buf: &[u8]) -> Res<usize> {
        self.ensure_loaded()?;
        self.skip_current();
        let mut raw = [0u8; COUNT_SIZE];
        let n = buf.len().min(COUNT_SIZE);
        raw[..n].copy_from_slice(&buf[..n]);
        let len = CountField::from_bytes(&raw).total_len();
        if self.pos + len + COUNT_SIZE >= self.track().len() {
            return Err(self.check(0, SENSE1_ITF, 0, 0));
        }
        self.store(self.pos, &END_OF_TRACK)?;
        self.orient = Orient::Data;
        Ok(len)
    }

    // ----- checks shared by commands -----------------------------------------------------

    /// A 3990 rejects read/search commands not preceded by a positioning command.
    fn chaining_check(&mut self) -> Res<()> {
        let p = &self.prog;
        if !(p.seek || p.locate || p.read_ipl) {
            return Err(self.sequence());
        }
        Ok(())
    }

    fn in_domain(&self) -> bool {
        self.prog.lcount > 0
    }

    fn reject_in_domain(&mut self) -> Res<()> {
        if self.in_domain() {
            return Err(self.sequence());
        }
        Ok(())
    }

    fn domain_allows(&mut self, ok: bool) -> Res<()> {
        if self.in_domain() && !ok {
            return Err(self.sequence());
        }
        Ok(())
    }

    // ----- commands ----------------------------------------------------------------------

    fn dispatch(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Res<Outcome> {
        let code = cmd.code;
        if self.prog.reject_next {
            return Err(self.sequence());
        }
        match code {
            0x03 => {
                if self.in_domain() {
                    return Err(self.sequence());
                }
                Ok(Outcome::done(0))
            }
            0x04 => self.cmd_sense(data),
            0xE4 => {
                self.reject_in_domain()?;
                Ok(input(data, &sense_id(self.dev_model)))
            }
            0x64 => {
                self.reject_in_domain()?;
                Ok(input(
                    data,
                    &device_characteristics(self.dev_model, self.cylinders),
                ))
            }
            0xFA => {
                self.reject_in_domain()?;
                let rcd = configuration_data(self.dev_model, &self.serial, self.devnum);
                Ok(input(data, &rcd))
            }
            0x02 => self.cmd_read_ipl(code, data),
            0x63 => {
                self.define_extent(data.output())?;
                Ok(Outcome::done(16))
            }
            0x47 => {
                self.locate_record(data.output(), false)?;
                Ok(Outcome::done(16))
            }
            0x4B => {
                self.locate_record(data.output(), true)?;
                Ok(Outcome::done(20))
            }
            0xE7 => self.cmd_prefix(data.output()),
            0x1F => self.cmd_set_file_mask(data.output()),
            0x07 | 0x0B | 0x1B => self.cmd_seek(code, data.output()),
            0x31 | 0x51 | 0x71 | 0xB1 | 0xD1 | 0xF1 => self.cmd_search_id(code, data.output()),
            0x39 | 0xB9 => self.cmd_search_ha(code, data.output()),
            0x06 | 0x86 => self.cmd_read_data(code, data),
            0x0E | 0x8E => self.cmd_read_key_data(code, data),
            0x12 | 0x92 => self.cmd_read_count(code, data),
            0x16 | 0x96 => self.cmd_read_r0(code, data),
            0x1A | 0x9A => self.cmd_read_ha(code, data),
            0x1E | 0x9E => self.cmd_read_ckd(code, data),
            0x5E => self.cmd_read_multiple_ckd(code, data),
            0xDE => self.cmd_read_track(cmd, data),
            0x05 => self.cmd_write_data(data.output()),
            0x85 => self.cmd_write_update_data(code, data.output()),
            0x1D => self.cmd_write_ckd(data.output()),
            0x15 => self.cmd_write_r0(data.output()),
            0x19 => self.cmd_write_ha(data.output()),
            0x11 => self.cmd_erase(data.output()),
            0x9D => self.cmd_write_ckd_next_track(cmd, data.output()),
            0x34 | 0xAF => self.cmd_path_group(cmd, data),
            _ => Err(self.reject(MSG_INVALID_COMMAND)),
        }
    }

    fn cmd_sense(&mut self, data: &mut DataArea<'_>) -> Res<Outcome> {
        if self.in_domain() {
            return Err(self.sequence());
        }
        let s = self.current_sense();
        self.sense = [0; SENSE_LEN];
        Ok(input(data, &s))
    }

    /// The sense bytes now: the pending ones, or a "no error" image with the position.
    fn current_sense(&self) -> [u8; SENSE_LEN] {
        if self.sense[0] == 0 && self.sense[1] == 0 {
            sense::build(
                0,
                0,
                0,
                0,
                0,
                SenseWhere {
                    cyl: self.cyl,
                    head: self.head,
                    rec: self.rec,
                    cylinders: self.cylinders,
                },
            )
        } else {
            self.sense
        }
    }

    fn cmd_read_ipl(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        let p = &self.prog;
        if p.extent_defined || p.file_mask_set || p.lcount > 0 {
            return Err(self.sequence());
        }
        self.prog.extent_defined = true;
        self.prog.file_mask_set = true;
        self.prog.loper = ORIENT_DATA | OP_READ;
        self.prog.laux = 0;
        self.prog.lcount = 2;
        self.prog.tlf = 0;
        self.seek(0, 0)?;
        self.read_count(code)?;
        let d = self.read_data(code)?;
        self.prog.read_ipl = true;
        Ok(with_ux(input(data, &d), d.is_empty()))
    }

    fn cmd_set_file_mask(&mut self, data: &[u8]) -> Res<Outcome> {
        let p = &self.prog;
        if p.extent_defined || p.file_mask_set || p.lcount > 0 {
            return Err(self.sequence());
        }
        let Some(&mask) = data.first() else {
            return Err(self.reject(MSG_COUNT_TOO_SMALL));
        };
        if mask & MASK_RESERVED != 0 {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        self.prog.fmask = mask;
        self.prog.file_mask_set = true;
        Ok(Outcome::done(1))
    }

    fn define_extent(&mut self, data: &[u8]) -> Res<()> {
        if data.len() < 16 {
            return Err(self.reject(MSG_COUNT_TOO_SMALL));
        }
        let p = &self.prog;
        if p.lcount > 0 || p.file_mask_set || p.read_ipl {
            return Err(self.sequence());
        }
        let (fmask, gattr) = (data[0], data[1]);
        let mut blksize = u16::from_be_bytes([data[2], data[3]]) as u32;
        if blksize == 0 {
            blksize = chars::R0_MAX as u32 + 8;
        }
        // A second Define Extent may only narrow the extent, with the same mask and attributes.
        if p.extent_defined && (p.fmask != fmask || p.gattr != gattr || p.blksize != blksize) {
            return Err(self.sequence());
        }
        if gattr & GATTR_ARCH != GATTR_ARCH
            || fmask & MASK_RESERVED != 0
            || blksize > chars::R0_MAX as u32 + 8
            || data[4..7] != [0, 0, 0]
        {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        let be = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        let (bcyl, bhead, ecyl, ehead) = (be(8), be(10), be(12), be(14));
        let ext = self.prog.extent;
        if track_key(bcyl, bhead) > track_key(ecyl, ehead)
            || bhead >= self.heads
            || ehead >= self.heads
            || ext.outside(bcyl, bhead)
            || ext.outside(ecyl, ehead)
        {
            let msg = if self.prog.extent_defined {
                MSG_INVALID_SEQUENCE
            } else {
                MSG_INVALID_PARAMETER
            };
            return Err(self.reject(msg));
        }
        let p = &mut self.prog;
        p.fmask = fmask;
        p.gattr = gattr;
        p.blksize = blksize;
        p.extent = Extent::new(bcyl, bhead, ecyl, ehead);
        p.extent_defined = true;
        Ok(())
    }

    /// Locate Record (16 parameter bytes) or Locate Record Extended (20 or more).
    fn locate_record(&mut self, data: &[u8], extended: bool) -> Res<()> {
        let need = if extended { 20 } else { 16 };
        if data.len() < need {
            return Err(self.reject(MSG_COUNT_TOO_SMALL));
        }
        if self.prog.lcount > 0 || !(self.prog.extent_defined || self.prog.read_ipl) {
            return Err(self.sequence());
        }
        let oper = data[0];
        let op = oper & OPER_CODE_MASK;
        let orient = oper & OPER_ORIENT_MASK;
        let valid = if extended {
            // Extended operations (Read/Write Any, Read Track Set) are not modelled.
            matches!(
                oper,
                0x01 | 0x03
                    | 0x06
                    | 0x0B
                    | 0x0C
                    | 0x16
                    | 0x43
                    | 0x4C
                    | 0x56
                    | 0x81
                    | 0x96
                    | 0xC3
                    | 0xD6
            ) && data[16] == 0
                && data[17] == 0
                && data[18..20] == [0, 0]
        } else {
            let op_ok = matches!(
                op,
                OP_ORIENT
                    | OP_WRITE
                    | OP_FORMAT
                    | OP_READ
                    | OP_WRITE_TRACK
                    | OP_READ_TRACKS
                    | OP_READ16
            );
            let combo_ok = match orient {
                ORIENT_HOME => {
                    matches!(
                        op,
                        OP_ORIENT | OP_FORMAT | OP_READ | OP_READ_TRACKS | OP_READ16
                    )
                }
                ORIENT_DATA => matches!(op, OP_ORIENT | OP_WRITE | OP_READ | OP_READ16),
                ORIENT_INDEX => matches!(op, OP_FORMAT | OP_READ16),
                _ => true,
            };
            op_ok && combo_ok
        };
        if !valid || op == OP_EXTENDED {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        let writes = matches!(op, OP_WRITE | OP_FORMAT | OP_WRITE_TRACK);
        if writes && self.image.read_only() {
            return Err(self.check(SENSE_EC, SENSE1_WRI, FORMAT_0, MSG_INVALID_PARAMETER));
        }
        let aux = data[1];
        let count = data[3];
        if aux & AUX_RESERVED != 0
            || (aux & AUX_READ_COUNT_SUFFIX != 0 && !matches!(op, OP_WRITE | OP_READ16 | OP_READ))
            || data[2] != 0
            || (op == OP_ORIENT) != (count == 0)
            || (aux & AUX_READ_COUNT_SUFFIX != 0 && count < 2)
        {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        let cyl = u16::from_be_bytes([data[4], data[5]]) as u32;
        let head = u16::from_be_bytes([data[6], data[7]]) as u32;
        if cyl >= self.cylinders || head >= self.heads {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        if self.prog.extent.outside(cyl, head) {
            return Err(self.file_protected());
        }
        let search: [u8; 5] = data[8..13].try_into().expect("5 bytes");
        let sector = data[13];
        if sector != 0xFF && sector >= chars::SECTORS {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        let tlf = u16::from_be_bytes([data[14], data[15]]) as u32;
        if (aux & AUX_TLF_VALID == 0) != (tlf == 0) || tlf > self.prog.blksize {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        self.prog.loper = oper;
        self.prog.laux = aux;
        self.prog.tlf = if aux & AUX_TLF_VALID != 0 {
            tlf
        } else {
            self.prog.blksize
        };
        self.seek(cyl, head)?;
        match orient {
            ORIENT_HOME if self.track()[1..HA_SIZE] != search[..4] => {
                return Err(self.check(0, SENSE1_NRF, 0, 0));
            }
            ORIENT_COUNT | ORIENT_DATA => self.search_count(&search)?,
            _ => {}
        }
        if orient == ORIENT_DATA {
            self.skip_current();
            self.orient = Orient::Data;
        }
        // The domain opens only once the record was found.
        self.prog.lcount = count;
        self.prog.locate = true;
        Ok(())
    }

    fn cmd_prefix(&mut self, data: &[u8]) -> Res<Outcome> {
        if data.len() < 64 {
            return Err(self.reject(MSG_COUNT_TOO_SMALL));
        }
        let (format, validity) = (data[0], data[1]);
        if format != PFX_DX && format != PFX_DX_LRE {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        if validity & PFX_DX_VALID != 0 {
            self.define_extent(&data[12..44])?;
        }
        if format == PFX_DX_LRE {
            self.locate_record(&data[44..], true)?;
        }
        Ok(Outcome::done(data.len()))
    }

    fn cmd_seek(&mut self, code: u8, data: &[u8]) -> Res<Outcome> {
        self.reject_in_domain()?;
        if code == 0x1B && !(self.prog.seek || self.prog.locate || self.prog.read_ipl) {
            return Err(self.sequence());
        }
        let sk = self.prog.fmask & MASK_SEEK;
        let protected = match code {
            0x07 => sk != MASK_SEEK_ALL,
            0x0B => sk != MASK_SEEK_ALL && sk != MASK_SEEK_CYL_HEAD,
            _ => sk == MASK_INHIBIT_SEEK_MT,
        };
        if protected {
            return Err(self.file_protected());
        }
        if data.len() < 6 {
            return Err(self.reject(MSG_COUNT_TOO_SMALL));
        }
        let bin = u16::from_be_bytes([data[0], data[1]]);
        let mut cyl = u16::from_be_bytes([data[2], data[3]]) as u32;
        let head = u16::from_be_bytes([data[4], data[5]]) as u32;
        if code == 0x1B {
            cyl = self.cyl;
        }
        if bin != 0 || cyl >= self.cylinders || head >= self.heads {
            return Err(self.reject(MSG_INVALID_PARAMETER));
        }
        if self.prog.extent.outside(cyl, head) {
            return Err(self.file_protected());
        }
        self.seek(cyl, head)?;
        self.prog.seek = true;
        Ok(Outcome::done(6))
    }

    fn cmd_search_id(&mut self, code: u8, data: &[u8]) -> Res<Outcome> {
        self.chaining_check()?;
        self.reject_in_domain()?;
        let c = self
            .read_count(code)?
            .expect("search never returns the end marker");
        let id = c.to_bytes();
        let n = data.len().min(5);
        let ord = id[..n].cmp(&data[..n]);
        let hit = (code & 0x20 != 0 && ord.is_eq()) || (code & 0x40 != 0 && ord.is_gt());
        self.prog.id_equal = ord.is_eq() && n == 5 && code & 0x7F == 0x31;
        let mut o = Outcome::done(n);
        if hit {
            o.status |= dstat::STATUS_MODIFIER;
        }
        Ok(o)
    }

    fn cmd_search_ha(&mut self, code: u8, data: &[u8]) -> Res<Outcome> {
        self.chaining_check()?;
        self.reject_in_domain()?;
        if is_mt(code) {
            self.mt_advance(1)?;
        }
        self.seek(self.cyl, self.head)?;
        let n = data.len().min(4);
        let equal = self.track()[1..1 + n] == data[..n];
        self.prog.ha_equal = equal && n == 4;
        let mut o = Outcome::done(n);
        if equal {
            o.status |= dstat::STATUS_MODIFIER;
        }
        Ok(o)
    }

    fn read_domain_ok(&self) -> bool {
        matches!(self.prog.op(), OP_READ | OP_READ16)
    }

    fn cmd_read_data(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        self.chaining_check()?;
        let ok = self.read_domain_ok() && (self.prog.op() != OP_READ16 || is_mt(code));
        self.domain_allows(ok)?;
        let r = self.data_span(code)?;
        let empty = r.is_empty();
        Ok(with_ux(input(data, &self.track()[r]), empty))
    }

    fn cmd_read_key_data(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        self.chaining_check()?;
        let ok = self.read_domain_ok();
        self.domain_allows(ok)?;
        if self.orient != Orient::Count {
            self.read_count(code)?;
        }
        let mut kd = self.read_key(code)?;
        let d = self.read_data(code)?;
        let empty = d.is_empty();
        kd.extend_from_slice(&d);
        Ok(with_ux(input(data, &kd), empty))
    }

    fn cmd_read_count(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        self.chaining_check()?;
        let p = &self.prog;
        let ok = self.read_domain_ok()
            || (p.op() == OP_WRITE && p.laux & AUX_READ_COUNT_SUFFIX != 0 && p.lcount == 1);
        self.domain_allows(ok)?;
        let c = self.read_count(code)?.expect("only 0xDE/0x5E see the end");
        Ok(input(data, &c.to_bytes()))
    }

    fn cmd_read_r0(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        self.chaining_check()?;
        let o = self.prog.loper & OPER_ORIENT_MASK;
        let ok = self.prog.op() == OP_READ
            || (self.prog.op() == OP_READ16 && (o == ORIENT_HOME || o == ORIENT_INDEX));
        self.domain_allows(ok)?;
        if is_mt(code) && !self.in_domain() {
            self.mt_advance(1)?;
        }
        self.seek(self.cyl, self.head)?;
        let c = self.read_count(code)?.expect("R0 read never sees the end");
        let mut ckd = c.to_bytes().to_vec();
        ckd.extend(self.read_key(code)?);
        let d = self.read_data(code)?;
        let empty = d.is_empty();
        ckd.extend(d);
        Ok(with_ux(input(data, &ckd), empty))
    }

    fn cmd_read_ha(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        self.chaining_check()?;
        let ok = self.prog.op() == OP_READ
            || (self.prog.op() == OP_READ16 && self.prog.loper & OPER_ORIENT_MASK == ORIENT_INDEX);
        self.domain_allows(ok)?;
        if is_mt(code) && !self.in_domain() {
            self.mt_advance(1)?;
        }
        self.seek(self.cyl, self.head)?;
        let ha = self.track()[..HA_SIZE].to_vec();
        Ok(input(data, &ha))
    }

    fn cmd_read_ckd(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        self.chaining_check()?;
        let ok = self.read_domain_ok();
        self.domain_allows(ok)?;
        let c = self.read_count(code)?.expect("only 0xDE/0x5E see the end");
        let mut ckd = c.to_bytes().to_vec();
        ckd.extend(self.read_key(code)?);
        let d = self.read_data(code)?;
        let empty = d.is_empty();
        ckd.extend(d);
        Ok(with_ux(input(data, &ckd), empty))
    }

    /// Count, key and data of every record from the current position to the end of track.
    fn records_to_end(&mut self, code: u8, with_marker: bool) -> Res<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let Some(c) = self.read_count(code)? else {
                if with_marker {
                    out.extend_from_slice(&END_OF_TRACK);
                }
                return Ok(out);
            };
            out.extend_from_slice(&c.to_bytes());
            out.extend(self.read_key(code)?);
            out.extend(self.read_data(code)?);
        }
    }

    fn cmd_read_multiple_ckd(&mut self, code: u8, data: &mut DataArea<'_>) -> Res<Outcome> {
        self.chaining_check()?;
        self.reject_in_domain()?;
        let all = self.records_to_end(code, false)?;
        Ok(input(data, &all))
    }

    fn cmd_read_track(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Res<Outcome> {
        if !self.in_domain() || self.prog.op() != OP_READ_TRACKS {
            return Err(self.sequence());
        }
        let prev = cmd.prev_code.unwrap_or(0);
        if !cmd.chained || !matches!(prev, 0x47 | 0x4B | 0xDE | 0xE7) {
            return Err(self.sequence());
        }
        if prev == 0xDE {
            self.mt_advance(1)?;
        } else if self.orient != Orient::Index {
            self.seek(self.cyl, self.head)?;
        }
        let all = self.records_to_end(cmd.code, true)?;
        Ok(input(data, &all))
    }

    /// Write commands other than Write Data and Write HA: not on a read-only image, and the
    /// file mask must allow writing records.
    fn write_allowed(&mut self, r0: bool) -> Res<()> {
        let w = self.prog.fmask & MASK_WRITE;
        let ok = if r0 {
            w == MASK_ALLOW_ALL
        } else {
            w == MASK_ALLOW_ALL || w == MASK_INHIBIT_HA_R0
        };
        if !ok {
            return Err(self.sequence());
        }
        Ok(())
    }

    fn check_tlf(&mut self, record0_in_write_track: bool) -> Res<()> {
        if self.prog.gattr & GATTR_CKD_CONVERSION == 0 {
            let want = if record0_in_write_track {
                8
            } else {
                self.prog.tlf
            };
            if self.dl as u32 != want {
                return Err(self.check(0, SENSE1_ITF, 0, 0));
            }
        }
        Ok(())
    }

    fn cmd_write_data(&mut self, data: &[u8]) -> Res<Outcome> {
        if !self.in_domain() && !self.prog.id_equal {
            return Err(self.sequence());
        }
        if self.prog.fmask & MASK_WRITE == MASK_INHIBIT_ALL {
            return Err(self.sequence());
        }
        if self.in_domain() {
            let p = &self.prog;
            let last = if p.laux & AUX_READ_COUNT_SUFFIX != 0 {
                2
            } else {
                1
            };
            let ok = p.op() == OP_WRITE_TRACK || (p.op() == OP_WRITE && p.lcount == last);
            if !ok {
                return Err(self.sequence());
            }
            let r0 = self.prog.op() == OP_WRITE_TRACK && self.rec == 0;
            self.check_tlf(r0)?;
        }
        if self.dl == 0 && matches!(self.orient, Orient::Count | Orient::Key) {
            let mut o = Outcome::done(0);
            o.status |= dstat::UNIT_EXCEPTION;
            return Ok(o);
        }
        let size = self.dl;
        self.write_data(data)?;
        if self.in_domain()
            && self.prog.op() == OP_WRITE_TRACK
            && self.rec == 0
            && self.prog.lcount == 1
        {
            self.erase(&[])?;
        }
        Ok(output(data.len(), size))
    }

    fn cmd_write_update_data(&mut self, code: u8, data: &[u8]) -> Res<Outcome> {
        if !self.in_domain() || self.prog.op() != OP_WRITE {
            return Err(self.sequence());
        }
        if self.orient != Orient::Count || self.rec == 0 {
            self.read_count(code)?;
        }
        self.check_tlf(false)?;
        if self.dl == 0 {
            let mut o = Outcome::done(0);
            o.status |= dstat::UNIT_EXCEPTION;
            return Ok(o);
        }
        let size = self.dl;
        self.write_data(data)?;
        Ok(output(data.len(), size))
    }

    fn cmd_write_ckd(&mut self, data: &[u8]) -> Res<Outcome> {
        let p = &self.prog;
        if !self.in_domain() && !p.id_equal && !p.wrote_ckd {
            return Err(self.sequence());
        }
        self.write_allowed(false)?;
        let op = self.prog.op();
        self.domain_allows(op == OP_FORMAT || op == OP_WRITE_TRACK)?;
        let len = self.write_ckd(data)?;
        self.prog.wrote_ckd = !self.in_domain();
        Ok(output(data.len(), len))
    }

    fn cmd_write_r0(&mut self, data: &[u8]) -> Res<Outcome> {
        let p = &self.prog;
        if !self.in_domain() && !p.ha_equal && !p.wrote_ha {
            return Err(self.sequence());
        }
        self.write_allowed(true)?;
        let o = self.prog.loper & OPER_ORIENT_MASK;
        let ok = self.prog.op() == OP_FORMAT && (o == ORIENT_HOME || o == ORIENT_INDEX);
        self.domain_allows(ok)?;
        if self.orient != Orient::Index {
            self.seek(self.cyl, self.head)?;
        }
        let len = self.write_ckd(data)?;
        self.prog.wrote_ckd = !self.in_domain();
        Ok(output(data.len(), len))
    }

    /// Write Home Address: the image's HA is always flag 0 + CCHH, so the bytes are accepted
    /// and the track repositioned to its start, as Hercules does.
    fn cmd_write_ha(&mut self, data: &[u8]) -> Res<Outcome> {
        self.chaining_check()?;
        let o = self.prog.loper & OPER_ORIENT_MASK;
        let ok = self.prog.op() == OP_FORMAT && o == ORIENT_HOME;
        self.domain_allows(ok)?;
        if self.prog.fmask & MASK_WRITE != MASK_ALLOW_ALL {
            return Err(self.file_protected());
        }
        if self.image.read_only() {
            return Err(self.check(SENSE_EC, SENSE1_WRI, FORMAT_0, MSG_INVALID_PARAMETER));
        }
        self.seek(self.cyl, self.head)?;
        self.prog.wrote_ha = true;
        Ok(output(data.len(), HA_SIZE))
    }

    fn cmd_erase(&mut self, data: &[u8]) -> Res<Outcome> {
        let p = &self.prog;
        if !self.in_domain() && !p.id_equal && !p.wrote_ckd {
            return Err(self.sequence());
        }
        self.write_allowed(false)?;
        let op = self.prog.op();
        self.domain_allows(op == OP_WRITE_TRACK)?;
        let len = self.erase(data)?;
        Ok(output(data.len(), len))
    }

    fn cmd_write_ckd_next_track(&mut self, cmd: &Command, data: &[u8]) -> Res<Outcome> {
        if !self.in_domain() || self.prog.op() != OP_FORMAT {
            return Err(self.sequence());
        }
        if !cmd.chained || !matches!(cmd.prev_code, Some(0x1D | 0x9D)) {
            return Err(self.sequence());
        }
        self.mt_advance(1)?;
        self.read_count(cmd.code)?;
        let len = self.write_ckd(data)?;
        Ok(output(data.len(), len))
    }
}

impl Dasd3390 {
    /// Sense Path Group ID (0x34) and Set Path Group ID (0xAF), single-path as Hercules
    /// models them: both must be the only command of their chain (Suspend Multipath
    /// Reconnection aside), Sense reports the "reset" path state and the id, Set establishes
    /// (only the same id once one is set), disbands or resigns.
    fn cmd_path_group(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Res<Outcome> {
        if cmd.chained && cmd.prev_code != Some(0x5B) {
            return Err(self.sequence());
        }
        let out = if cmd.code == 0x34 {
            let mut b = [0u8; 12];
            b[1..].copy_from_slice(&self.pgid);
            input(data, &b)
        } else {
            let data = data.output();
            if data.len() < 12 {
                return Err(self.reject(MSG_COUNT_TOO_SMALL));
            }
            let (func, id) = (data[0], &data[1..12]);
            let grouped = self.pgid != [0; 11];
            if func & 0x60 == 0x60
                || func & 0x1F != 0
                || id == [0; 11]
                || (grouped && self.pgid[..] != id[..])
            {
                return Err(self.reject(MSG_INVALID_PARAMETER));
            }
            match func & 0x60 {
                0x00 => self.pgid.copy_from_slice(id),
                _ => self.pgid = [0; 11],
            }
            Outcome::done(12)
        };
        self.prog.reject_next = true;
        Ok(out)
    }
}

/// Per command code, what [`Dasd3390::execute_area`] does around it (one table lookup
/// rather than a chain of comparisons per command).
static CODE_FLAGS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = code_flags(i as u8);
        i += 1;
    }
    t
};
/// A search (write-kind command that does not reset the index point count).
const CF_SEARCH: u8 = 1;
/// Keeps a Search Home Address equal condition.
const CF_KEEP_HA: u8 = 2;
/// Keeps a Search ID equal condition.
const CF_KEEP_ID: u8 = 4;
/// Keeps the record-written-by-Write CKD/R0 condition.
const CF_KEEP_CKD: u8 = 8;
/// Does not count against a Locate Record domain.
const CF_NO_LCOUNT: u8 = 16;

const fn code_flags(code: u8) -> u8 {
    let c7 = code & 0x7F;
    let mut f = 0;
    if matches!(c7, 0x31 | 0x51 | 0x71 | 0x29 | 0x49 | 0x69) {
        f |= CF_SEARCH;
    }
    if c7 == 0x39 || c7 == 0x19 {
        f |= CF_KEEP_HA;
    }
    if matches!(c7, 0x31 | 0x0E | 0x0D | 0x06 | 0x05) {
        f |= CF_KEEP_ID;
    }
    if code == 0x15 || code == 0x1D {
        f |= CF_KEEP_CKD;
    }
    if matches!(code, 0x47 | 0x4B | 0xE7) {
        f |= CF_NO_LCOUNT;
    }
    f
}

/// Input transfer of `src`: as much as fits, put straight to storage (only the bytes
/// transferred are put); `more` if the device had more to give.
fn input(data: &mut DataArea<'_>, src: &[u8]) -> Outcome {
    let room = data.remaining();
    data.put(src);
    Outcome {
        status: dstat::CHANNEL_END | dstat::DEVICE_END,
        transferred: data.put_len(),
        more: src.len() > room,
    }
}

/// Output transfer of a field of `size` bytes from `offered`: `more` if it wanted more.
fn output(offered: usize, size: usize) -> Outcome {
    Outcome {
        status: dstat::CHANNEL_END | dstat::DEVICE_END,
        transferred: offered.min(size),
        more: size > offered,
    }
}

/// Adds unit exception (a record with no data) to an outcome.
fn with_ux(mut o: Outcome, ux: bool) -> Outcome {
    if ux {
        o.status |= dstat::UNIT_EXCEPTION;
    }
    o
}

impl Dasd3390 {
    /// `execute_area` for everything the Read Data fast path leaves (kept out of line so
    /// the fast path does not pay the general path's register saves).
    #[inline(never)]
    fn execute_general(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Outcome {
        let code = cmd.code;
        if !self.ready && code != 0x04 && code != 0xE4 {
            self.check(SENSE_IR, 0, FORMAT_0, 0);
            return Outcome::unit_check();
        }
        // The index point counts again after anything but a search or a single-track Read
        // Count (Hercules' rule): a Search + TIC loop sees it twice and ends.
        use crate::ccw::CommandKind;
        // The channel classified the code already (`Command::kind` is `CommandKind::of`).
        let kind = cmd.kind;
        let f = CODE_FLAGS[code as usize];
        if matches!(kind, CommandKind::Sense | CommandKind::Control)
            || (kind == CommandKind::Write && f & CF_SEARCH == 0)
            || (kind == CommandKind::Read && code != 0x12)
        {
            self.prog.index_passed = false;
        }
        let out = match self.dispatch(cmd, data) {
            Ok(o) => o,
            Err(Check) => Outcome::unit_check(),
        };
        self.end_command(f);
        out
    }

    /// Define Extent (0x63) and Locate Record (0x47), which start every ECKD chain:
    /// `execute_general` for them alone, in a frame of their own.
    #[inline(never)]
    fn execute_extent_locate(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Outcome {
        if !self.ready || self.prog.reject_next || cmd.kind != crate::ccw::CommandKind::Control {
            return self.execute_general(cmd, data);
        }
        // A control command: the index point counts again.
        self.prog.index_passed = false;
        let r = if cmd.code == 0x63 {
            self.define_extent(data.output()).map(|()| 16)
        } else {
            self.locate_record(data.output(), false).map(|()| 16)
        };
        let out = match r {
            Ok(n) => Outcome::done(n),
            Err(Check) => Outcome::unit_check(),
        };
        self.end_command(CODE_FLAGS[cmd.code as usize]);
        out
    }

    /// What every command does last, by its [`CODE_FLAGS`] entry.
    #[inline]
    fn end_command(&mut self, f: u8) {
        // What licenses a write outside a Locate Record domain lasts only until the next
        // command of another kind (checked by the commands, reset here, as Hercules does).
        let p = &mut self.prog;
        p.ha_equal &= f & CF_KEEP_HA != 0;
        p.id_equal &= f & CF_KEEP_ID != 0;
        p.wrote_ckd &= f & CF_KEEP_CKD != 0;
        if p.lcount > 0 && f & CF_NO_LCOUNT == 0 {
            p.lcount -= 1;
        }
    }

    /// Whether a Read Data (0x06, 0x86) may take the fast path at all: the device is ready
    /// and on its loaded track, and the command is allowed here (what `dispatch` and
    /// `cmd_read_data` check first).
    #[inline]
    fn read_data_licensed(&self, cmd: &Command) -> bool {
        let p = &self.prog;
        let op = p.op();
        self.ready
            && !p.reject_next
            && cmd.kind == crate::ccw::CommandKind::Read
            && (p.seek || p.locate || p.read_ipl)
            && (p.lcount == 0 || op == OP_READ || (op == OP_READ16 && is_mt(cmd.code)))
            && self.loaded == Some((self.cyl, self.head))
    }

    /// The data field a licensed Read Data reads in the common case of a long chain, with
    /// the state it leaves (data end, record, key and data lengths): the device is oriented
    /// after a data field with a user record (not R0) next, or at the count or key of the
    /// record to read, and the data lies inside the slot. The track is borrowed once.
    /// `None` leaves every other case (the end of the track, R0, a damaged slot) to
    /// [`Self::read_data_next_track`] or the general path, which does exactly what the fast
    /// path does in the cases it takes.
    #[inline]
    #[allow(clippy::type_complexity)]
    fn next_data_field(&self) -> Option<(&[u8], usize, u8, usize, usize)> {
        let track = self.track();
        let mut pos = self.pos;
        let (rec, kl, dl) = match self.orient {
            Orient::Data => {
                let w = count_word(track, pos)?;
                let (rec, kl, dl) = count_parts(w);
                // R0 is skipped, and the end of the track (record 0xFF) moves on, elsewhere.
                if rec == 0 || w == EOT_WORD {
                    return None;
                }
                pos += COUNT_SIZE + kl;
                (rec, kl, dl)
            }
            Orient::Count => {
                pos += self.kl;
                (self.rec, self.kl, self.dl)
            }
            Orient::Key => (self.rec, self.kl, self.dl),
            _ => return None,
        };
        let src = track.get(pos..pos + dl)?;
        Some((src, pos + dl, rec, kl, dl))
    }

    /// The fast path at the end of the track: a multitrack Read Data in a Locate
    /// Record domain on a mapped image moves on to the next track of the extent (what
    /// `read_count`'s `mt_advance` does there: no end-of-cylinder or file mask check in a
    /// domain, the index point not yet passed by this command), if that slot is well
    /// formed, and reads the first record after its R0. `None`, with nothing changed but
    /// the slot's remembered check, otherwise.
    #[inline(never)]
    fn read_data_next_track(&mut self, code: u8, data: &mut DataArea<'_>) -> Option<Outcome> {
        if !self.mapped
            || !is_mt(code)
            || self.prog.lcount == 0
            || self.orient != Orient::Data
            || count_word(self.track(), self.pos)? != EOT_WORD
        {
            return None;
        }
        let t = self.cyl * self.heads + self.head + 1;
        let (cyl, head) = (t / self.heads, t % self.heads);
        if cyl >= self.cylinders || self.prog.extent.outside(cyl, head) {
            return None;
        }
        let off = self.image.verify_mapped_track(cyl, head).ok()??;
        let track = self.image.mapped_bytes(off, self.tsize)?;
        let mut pos = HA_SIZE;
        let mut w = count_word(track, pos)?;
        if w != EOT_WORD && count_parts(w).0 == 0 {
            let (_, kl, dl) = count_parts(w);
            pos += COUNT_SIZE + kl + dl;
            w = count_word(track, pos)?;
        }
        let (rec, kl, dl) = count_parts(w);
        // A second end of track or R0 is the general path's business.
        if w == EOT_WORD || rec == 0 {
            return None;
        }
        pos += COUNT_SIZE + kl;
        let src = track.get(pos..pos + dl)?;
        let out = with_ux(input(data, src), dl == 0);
        (self.cyl, self.head) = (cyl, head);
        self.loaded = Some((cyl, head));
        self.slot_off = off;
        self.read_data_done(pos + dl, rec, kl, dl);
        // Passing the index point on the way is remembered, as `read_count` does.
        self.prog.index_passed = true;
        Some(out)
    }

    /// The state a Read Data leaves: after the data of record `rec` (`kl`, `dl`), data
    /// field ending at `end`; then the end of the command.
    #[inline]
    fn read_data_done(&mut self, end: usize, rec: u8, kl: usize, dl: usize) {
        self.pos = end;
        (self.rec, self.kl, self.dl) = (rec, kl, dl);
        self.orient = Orient::Data;
        self.end_command(READ_DATA_FLAGS);
    }
}

/// [`CODE_FLAGS`] of Read Data, both forms (checked in the tests).
const READ_DATA_FLAGS: u8 = code_flags(0x06);

/// The end-of-track marker as [`count_word`] reads it.
const EOT_WORD: u64 = u64::from_be_bytes(END_OF_TRACK);

/// The count field at `pos` of a track image as one big-endian word, if it lies inside.
#[inline]
fn count_word(track: &[u8], pos: usize) -> Option<u64> {
    let raw: [u8; COUNT_SIZE] = track
        .get(pos..pos.checked_add(COUNT_SIZE)?)?
        .try_into()
        .ok()?;
    Some(u64::from_be_bytes(raw))
}

/// Record number, key length and data length of a count word (CC HH R KL DL).
#[inline]
fn count_parts(w: u64) -> (u8, usize, usize) {
    ((w >> 24) as u8, (w >> 16) as u8 as usize, w as u16 as usize)
}

impl DeviceModel for Dasd3390 {
    /// Only the searches (Search ID Equal/High/Equal-or-High, Search Home Address, and
    /// their multitrack forms) end with status modifier, when they match.
    fn status_modifier_commands(&self) -> CommandSet {
        CommandSet::of(&[0x31, 0x51, 0x71, 0xB1, 0xD1, 0xF1, 0x39, 0xB9])
    }

    fn start_program(&mut self) {
        self.prog = Program::new(self.cylinders, self.heads);
    }

    fn execute(&mut self, cmd: &Command, data: &mut [u8]) -> Outcome {
        self.execute_area(cmd, &mut DataArea::buffer(data))
    }

    fn execute_area(&mut self, cmd: &Command, data: &mut DataArea<'_>) -> Outcome {
        if cmd.code & 0x7F == 0x06 && self.read_data_licensed(cmd) {
            if let Some((src, end, rec, kl, dl)) = self.next_data_field() {
                let out = with_ux(input(data, src), dl == 0);
                self.read_data_done(end, rec, kl, dl);
                self.prog.index_passed = false;
                return out;
            }
            if let Some(o) = self.read_data_next_track(cmd.code, data) {
                return o;
            }
        }
        if matches!(cmd.code, 0x63 | 0x47) {
            return self.execute_extent_locate(cmd, data);
        }
        self.execute_general(cmd, data)
    }

    fn sense(&self) -> Vec<u8> {
        self.current_sense().to_vec()
    }

    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            cu_type: chars::CU_TYPE,
            cu_model: chars::CU_MODEL,
            dev_type: chars::DEV_TYPE,
            dev_model: self.dev_model,
        }
    }

    fn reset_operation(&mut self) {
        self.prog.lcount = 0;
    }
}
