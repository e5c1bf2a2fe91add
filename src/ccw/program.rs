//! A translated (host) channel program: the bytes a channel runs, the pins that keep its data
//! pages in place, and the map back to guest addresses.

use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::ccw::{Ccw1, CCW_SIZE};
use crate::css::{AccessFault, ChannelMemory};
use crate::iommu_store::{PinnedPages, PAGE_SIZE};
use crate::orb::{actl, stctl, Orb, Scsw};

/// One guest page this program may transfer data to or from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Process-virtual address of the page (what the host IDAWs hold).
    pub host: u64,
    /// Guest-physical address (IOVA) of the page.
    pub iova: u64,
    /// The page was pinned for input (the channel may store into it).
    pub writable: bool,
    /// The page's storage key (ACC in bits 0-3, fetch protection in bit 4).
    pub key: u8,
}

/// Where a run of host CCWs came from: `len` host CCWs from `host` on stand for as many guest
/// CCWs from `guest` on (both addresses advancing by 8), all with the same `residual_extra`.
/// Runs are sorted by `host` and disjoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Channel address of the first host CCW.
    pub host: u32,
    /// Guest address of the CCW it stands for.
    pub guest: u32,
    /// Bytes of the same guest CCW carried by later host CCWs (MIDAW expansions), added to a
    /// residual count reported for this one.
    pub residual_extra: u32,
    /// Host CCWs in the run (at least 1).
    pub len: u32,
}

impl Origin {
    /// Appends the origin of the host CCW at `host` to `runs`, extending the last run when
    /// it continues it.
    pub(crate) fn push(runs: &mut Vec<Origin>, host: u32, guest: u32, residual_extra: u32) {
        if let Some(r) = runs.last_mut() {
            let n = r.len.wrapping_mul(CCW_SIZE as u32);
            if r.residual_extra == residual_extra
                && r.host.wrapping_add(n) == host
                && r.guest.wrapping_add(n) == guest
            {
                r.len += 1;
                return;
            }
        }
        runs.push(Origin {
            host,
            guest,
            residual_extra,
            len: 1,
        });
    }
}

/// The part of a host program that maps a channel's status back to the guest's view: small,
/// pin-free and cheap to clone, so a device can keep it after the program is freed (a halt's
/// status can arrive after the final one).
#[derive(Debug, Clone)]
pub struct ScswMapper {
    pub(crate) host_cpa: u32,
    pub(crate) guest_orb: Orb,
    pub(crate) origins: Origins,
}

/// The origin runs of a program: one run inline (every fast-path program: no allocation),
/// else shared so a clone stays cheap.
#[derive(Debug, Clone)]
pub(crate) enum Origins {
    One(Origin),
    Many(Arc<[Origin]>),
}

impl Origins {
    pub(crate) fn as_slice(&self) -> &[Origin] {
        match self {
            Origins::One(o) => std::slice::from_ref(o),
            Origins::Many(v) => v,
        }
    }
}

impl From<Vec<Origin>> for Origins {
    fn from(v: Vec<Origin>) -> Self {
        match v.as_slice() {
            [o] => Origins::One(*o),
            _ => Origins::Many(v.into()),
        }
    }
}

impl ScswMapper {
    /// Rewrites a status the channel stored for the host program into what the guest's
    /// program would have stored: the CCW address back to guest storage (the address
    /// designates the CCW after the last one executed, so "one past the end" of a segment
    /// counts), and the residual count of a MIDAW CCW the translator split, where the count
    /// means one (primary or suspended status: an intermediate status alone, such as a
    /// PCI's, carries no residual count, and the guest's channel stores zero there).
    pub fn to_guest_scsw(&self, host: &Scsw) -> Scsw {
        let mut s = *host;
        if host.cpa == self.host_cpa {
            s.cpa = self.guest_orb.cpa;
        } else if let Some(o) = host
            .cpa
            .checked_sub(CCW_SIZE as u32)
            .and_then(|a| self.origin(a))
        {
            s.cpa = o.guest.wrapping_add(CCW_SIZE as u32);
            let counted = host.flags.stctl() & stctl::PRIMARY != 0
                || host.flags.actl() & actl::SUSPENDED != 0;
            if counted {
                s.count = (host.count as u32 + o.residual_extra).min(u16::MAX as u32) as u16;
            }
        }
        s.flags = s
            .flags
            .with_format1(self.guest_orb.ctl.format1())
            .with_key(self.guest_orb.ctl.key());
        s
    }

    /// The origin of the host CCW at `host` (a run of one), if `host` is one.
    fn origin(&self, host: u32) -> Option<Origin> {
        let origins = self.origins.as_slice();
        let i = origins.partition_point(|o| o.host <= host);
        let r = origins.get(i.checked_sub(1)?)?;
        let off = host - r.host;
        (off % CCW_SIZE as u32 == 0 && off / (CCW_SIZE as u32) < r.len).then_some(Origin {
            host,
            guest: r.guest.wrapping_add(off),
            residual_extra: r.residual_extra,
            len: 1,
        })
    }
}

/// A host channel program built by [`crate::ccw::translate`].
///
/// Dropping it releases every page pin exactly once.
pub struct HostProgram {
    pub(crate) orb: Orb,
    pub(crate) guest_orb: Orb,
    pub(crate) base: u32,
    pub(crate) image: Vec<u8>,
    pub(crate) ccw_bytes: usize,
    pub(crate) segments: Segments,
    pub(crate) mapper: ScswMapper,
    /// The pinned pages as a sorted list, built on first request (see [`HostProgram::pages`]).
    pub(crate) pages: OnceLock<Vec<PageRef>>,
    pub(crate) pins: Pins,
}

/// The segments of a program: one inline (no allocation), else a list.
#[derive(Debug, Clone)]
pub(crate) enum Segments {
    One(SegmentInfo),
    Many(Vec<SegmentInfo>),
}

impl Segments {
    fn as_slice(&self) -> &[SegmentInfo] {
        match self {
            Segments::One(s) => std::slice::from_ref(s),
            Segments::Many(v) => v,
        }
    }
}

/// Pins held by a program, in pin order: the first inline (the fast path pins all its runs
/// in one call: small programs allocate nothing for them), the rest in a list.
#[derive(Default)]
pub(crate) struct Pins {
    first: Option<PinnedPages>,
    rest: Vec<PinnedPages>,
}

impl Pins {
    /// The pins of a program pinned in one call.
    pub(crate) fn one(p: PinnedPages) -> Self {
        Pins {
            first: Some(p),
            rest: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, p: PinnedPages) {
        if self.first.is_none() {
            self.first = Some(p);
        } else {
            self.rest.push(p);
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &PinnedPages> {
        self.first.iter().chain(&self.rest)
    }
}

/// Pinned runs at most which [`HostProgram`] looks up by scanning instead of building the
/// sorted page list.
const SCAN_RUNS: usize = 16;

/// A chain segment of the host program and the guest segment it was copied from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Guest address of the segment's first CCW.
    pub guest: u64,
    /// Channel address of its host copy.
    pub host: u32,
    /// Number of CCWs (including a trailing trap slot, if any).
    pub len: usize,
}

impl HostProgram {
    /// The ORB to start the host program with (format 1, format-2 IDAWs, no MIDAWs).
    pub fn orb(&self) -> &Orb {
        &self.orb
    }

    /// The guest's ORB this program was translated from.
    pub fn guest_orb(&self) -> &Orb {
        &self.guest_orb
    }

    /// Channel address of the first byte of [`HostProgram::image`].
    pub fn base(&self) -> u32 {
        self.base
    }

    /// The host program's bytes: format-1 CCWs, then format-2 IDALs, big-endian.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// The chain segments, in the order they were found.
    pub fn segments(&self) -> &[SegmentInfo] {
        self.segments.as_slice()
    }

    /// Every host CCW with its channel address.
    pub fn ccws(&self) -> impl Iterator<Item = (u32, Ccw1)> + '_ {
        self.image[..self.ccw_bytes]
            .chunks_exact(CCW_SIZE as usize)
            .enumerate()
            .map(move |(i, c)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                (
                    self.base + (i as u32) * CCW_SIZE as u32,
                    Ccw1::from_bytes(b),
                )
            })
    }

    /// Every format-2 IDAW with its channel address.
    pub fn idaws(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.image[self.ccw_bytes..]
            .chunks_exact(8)
            .enumerate()
            .map(move |(i, c)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                (
                    self.base + (self.ccw_bytes + i * 8) as u32,
                    u64::from_be_bytes(b),
                )
            })
    }

    /// The pages pinned for this program, sorted by host address.
    pub fn pages(&self) -> &[PageRef] {
        self.pages.get_or_init(|| {
            // From the runs (a pin's own page list would cost allocations per pin).
            let mut v: Vec<PageRef> = Vec::with_capacity(self.pin_count());
            for pin in self.pins.iter() {
                let mut i = 0usize;
                for (iova, host, n, writable) in pin.runs() {
                    for k in 0..n {
                        v.push(PageRef {
                            host: host + k * PAGE_SIZE,
                            iova: iova + k * PAGE_SIZE,
                            writable,
                            key: pin.key(i),
                        });
                        i += 1;
                    }
                }
            }
            // One entry per page, sorted by host address; writable if any CCW pinned it for
            // input. Pages pinned in ascending runs of one mapping are already in order.
            if !v.windows(2).all(|w| w[0].host < w[1].host) {
                v.sort_unstable_by_key(|p| (p.host, !p.writable));
                v.dedup_by_key(|p| p.host);
            }
            v
        })
    }

    /// Number of page pins held (a page pinned by two CCWs counts twice).
    pub fn pin_count(&self) -> usize {
        self.pins.iter().map(|p| p.len()).sum()
    }

    /// The guest address a host data address stands for, if it is in a pinned page.
    pub fn host_to_guest(&self, host: u64) -> Option<u64> {
        self.page_of(host).map(|p| p.iova + (host - p.host))
    }

    /// The guest address of the CCW whose host copy is at `host`.
    pub fn guest_ccw_address(&self, host: u32) -> Option<u32> {
        self.mapper.origin(host).map(|o| o.guest)
    }

    /// See [`ScswMapper::to_guest_scsw`].
    pub fn to_guest_scsw(&self, host: &Scsw) -> Scsw {
        self.mapper.to_guest_scsw(host)
    }

    /// The pin-free status mapper of this program.
    pub fn scsw_mapper(&self) -> ScswMapper {
        self.mapper.clone()
    }

    fn pin_runs(&self) -> usize {
        self.pins.iter().map(|p| p.runs().count()).sum()
    }

    /// The pinned page holding `host`, if any (writable if any pin of it is). A program of
    /// one pin (every small one) is answered inline; anything else out of line.
    #[inline(always)]
    fn page_of(&self, host: u64) -> Option<PageRef> {
        if let (Some(first), true) = (&self.pins.first, self.pins.rest.is_empty()) {
            // (`page_at` answers for a pin of at most two runs, which are disjoint.)
            if let Some(a) = first.page_at(host).filter(|_| self.pages.get().is_none()) {
                return a.map(|(iova, host, writable, key)| PageRef {
                    host,
                    iova,
                    writable,
                    key,
                });
            }
        }
        self.page_of_pins(host)
    }

    /// [`Self::page_of`] for everything but a one-pin program's usual lookup.
    #[inline(never)]
    fn page_of_pins(&self, host: u64) -> Option<PageRef> {
        if self.pins.rest.len() <= 1 && self.pages.get().is_none() {
            // At most two pins of at most two runs each (every small program, and the
            // general passes' usual control-data pin and data pin): ask them directly, as
            // the general scan below would. A pin's runs are disjoint: one holds the page.
            let Some(first) = &self.pins.first else {
                return None;
            };
            let page = |(iova, host, writable, key)| PageRef {
                host,
                iova,
                writable,
                key,
            };
            if let Some(a) = first.page_at(host) {
                let a = a.map(page);
                // The first writable pin of the page wins, else the last one.
                let Some(second) = self.pins.rest.first() else {
                    return a;
                };
                if a.is_some_and(|p| p.writable) {
                    return a;
                }
                if let Some(b) = second.page_at(host) {
                    return b.map(page).or(a);
                }
            }
        }
        self.page_of_general(host)
    }

    fn page_of_general(&self, host: u64) -> Option<PageRef> {
        if self.pages.get().is_none() && self.pin_runs() <= SCAN_RUNS {
            // A few runs: scan them rather than build the page list. The page as the list
            // would hold it: writable if any pin of it is.
            let mut found: Option<PageRef> = None;
            for pin in self.pins.iter() {
                let mut i = 0usize;
                for (iova, h, n, write) in pin.runs() {
                    let off = host.wrapping_sub(h);
                    if off < n * PAGE_SIZE && !found.is_some_and(|f| f.writable) {
                        let k = off / PAGE_SIZE;
                        found = Some(PageRef {
                            host: h + k * PAGE_SIZE,
                            iova: iova + k * PAGE_SIZE,
                            writable: write,
                            key: pin.key(i + k as usize),
                        });
                    }
                    i += n as usize;
                }
            }
            return found;
        }
        let pages = self.pages();
        let i = pages.partition_point(|p| p.host <= host);
        let p = pages.get(i.checked_sub(1)?)?;
        (host - p.host < PAGE_SIZE).then_some(*p)
    }

    /// Checks that every byte of `[addr, addr + len)` lies in a page this program pinned,
    /// for storing if `store`, with a storage key `key` may use. The usual piece (a CCW's
    /// data inside one page) is decided inline with one [`Self::page_of`]; a longer one page
    /// by page, out of line (so `read` and `write` save no registers for it).
    #[inline(always)]
    fn check_pages(&self, addr: u64, len: usize, key: u8, store: bool) -> Result<(), AccessFault> {
        if len != 0 && addr % PAGE_SIZE + len as u64 <= PAGE_SIZE {
            return self.check_page(addr, key, store).map(|_| ());
        }
        self.check_pages_walk(addr, len, key, store)
    }

    /// The page holding `a`, if the program may use it so (see [`Self::check_pages`]).
    #[inline(always)]
    fn check_page(&self, a: u64, key: u8, store: bool) -> Result<PageRef, AccessFault> {
        let p = self.page_of(a).ok_or(AccessFault::Addressing(a))?;
        if store && !p.writable {
            return Err(AccessFault::Addressing(a));
        }
        if !key_allows(key, p.key, store) {
            return Err(AccessFault::Protection(a));
        }
        Ok(p)
    }

    /// [`Self::check_pages`] page by page, for any piece.
    #[inline(never)]
    fn check_pages_walk(
        &self,
        addr: u64,
        len: usize,
        key: u8,
        store: bool,
    ) -> Result<(), AccessFault> {
        let mut a = addr;
        let end = addr
            .checked_add(len as u64)
            .ok_or(AccessFault::Addressing(addr))?;
        while a < end {
            a = self.check_page(a, key, store)?.host + PAGE_SIZE;
        }
        Ok(())
    }

    fn arena_range(&self, addr: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let off = addr.checked_sub(self.base as u64)? as usize;
        let end = off.checked_add(len)?;
        (end <= self.image.len()).then_some(off..end)
    }
}

/// Storage-key rule: key 0 matches everything; otherwise a store needs the access-control
/// bits to match, and so does a fetch from a fetch-protected page.
pub(crate) fn key_allows(orb_key: u8, storage_key: u8, store: bool) -> bool {
    let acc = storage_key >> 4;
    let fetch_protected = storage_key & 0x08 != 0;
    orb_key == 0 || acc == orb_key || (!store && !fetch_protected)
}

impl ChannelMemory for HostProgram {
    fn read(&self, addr: u64, buf: &mut [u8], key: u8) -> Result<(), AccessFault> {
        if let Some(r) = self.arena_range(addr, buf.len()) {
            let src = &self.image[r];
            // A CCW or an IDAW (the channel's usual fetch): a fixed-size copy, no call.
            match (
                <&mut [u8; 8]>::try_from(&mut *buf),
                <&[u8; 8]>::try_from(src),
            ) {
                (Ok(d), Ok(s)) => *d = *s,
                _ => buf.copy_from_slice(src),
            }
            return Ok(());
        }
        self.check_pages(addr, buf.len(), key, false)?;
        // The usual small sizes (control data) are fixed-size copies: no call.
        let (src, dst, n) = (addr as *const u8, buf.as_mut_ptr(), buf.len());
        // SAFETY: check_pages proved every byte of [addr, addr + len) lies in a page this
        // program holds a pin on; a pin keeps the page's mapping alive until the program is
        // dropped, and `buf` is ordinary memory of ours that cannot overlap a guest page.
        unsafe {
            match n {
                8 => std::ptr::copy_nonoverlapping(src, dst, 8),
                16 => std::ptr::copy_nonoverlapping(src, dst, 16),
                _ => std::ptr::copy_nonoverlapping(src, dst, n),
            }
        };
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8], key: u8) -> Result<(), AccessFault> {
        if self.arena_range(addr, data.len()).is_some() {
            // The channel never stores into its own program.
            return Err(AccessFault::Addressing(addr));
        }
        self.check_pages(addr, data.len(), key, true)?;
        // SAFETY: as in `read`, and every page was pinned for writing (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
        Ok(())
    }

    fn program_image(&self) -> Option<(u64, &[u8])> {
        // `read` answers a fetch inside the image from it, whatever the key.
        Some((self.base as u64, &self.image))
    }
}

impl fmt::Debug for HostProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostProgram")
            .field("orb", &self.orb)
            .field("segments", &self.segments())
            .field("ccws", &(self.ccw_bytes / CCW_SIZE as usize))
            .field("pins", &self.pin_count())
            .finish()
    }
}

impl fmt::Display for HostProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.orb;
        writeln!(
            f,
            "host ORB: {:02x?}  (cpa={:#010x} fmt1={} c64={} i2k={} key={} lpm={:#04x})",
            o.to_bytes(),
            o.cpa,
            o.ctl.format1() as u8,
            o.ctl.format2_idaw() as u8,
            o.ctl.idaw_2k() as u8,
            o.ctl.key(),
            o.ctl.lpm()
        )?;
        for s in self.segments() {
            writeln!(
                f,
                "segment: guest {:#010x} -> host {:#010x}, {} CCWs",
                s.guest, s.host, s.len
            )?;
        }
        writeln!(f, "CCWs:")?;
        for (addr, c) in self.ccws() {
            let guest = self
                .guest_ccw_address(addr)
                .map(|g| format!("{g:#010x}"))
                .unwrap_or_else(|| "-".into());
            writeln!(
                f,
                "  {addr:#010x}  {:02x?}  cmd={:#04x} flags={:#04x} count={:<5} cda={:#010x}  (guest {guest})",
                c.to_bytes(),
                c.cmd,
                c.flags.into_bits(),
                c.count,
                c.cda
            )?;
        }
        writeln!(f, "IDAWs:")?;
        for (addr, idaw) in self.idaws() {
            let guest = self
                .host_to_guest(idaw)
                .map(|g| format!("{g:#x}"))
                .unwrap_or_else(|| "-".into());
            writeln!(f, "  {addr:#010x}  {idaw:#018x}  (guest {guest})")?;
        }
        writeln!(f, "pinned pages ({} pins):", self.pin_count())?;
        for p in self.pages() {
            writeln!(
                f,
                "  guest {:#x} -> host {:#x} {}",
                p.iova,
                p.host,
                if p.writable { "rw" } else { "r" }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orb::OrbControls;

    /// Origins are kept as runs; a lookup still answers per host CCW, exactly.
    #[test]
    fn origin_runs_answer_per_ccw() {
        let mut runs = Vec::new();
        // Three CCWs of one segment, then an expansion (same guest CCW twice, residuals).
        Origin::push(&mut runs, 0x100, 0x2000, 0);
        Origin::push(&mut runs, 0x108, 0x2008, 0);
        Origin::push(&mut runs, 0x110, 0x2010, 0);
        Origin::push(&mut runs, 0x118, 0x2008, 300);
        Origin::push(&mut runs, 0x120, 0x2008, 100);
        assert_eq!(runs.len(), 3);
        assert_eq!(
            (runs[0].host, runs[0].guest, runs[0].len),
            (0x100, 0x2000, 3)
        );
        let m = ScswMapper {
            host_cpa: 0x100,
            guest_orb: Orb {
                intparm: 0,
                ctl: OrbControls::new().with_format1(true),
                cpa: 0x2000,
            },
            origins: Origins::Many(runs.into()),
        };
        let at = |h| m.origin(h).map(|o| (o.guest, o.residual_extra));
        assert_eq!(at(0x100), Some((0x2000, 0)));
        assert_eq!(at(0x110), Some((0x2010, 0)));
        assert_eq!(at(0x118), Some((0x2008, 300)));
        assert_eq!(at(0x120), Some((0x2008, 100)));
        // Not a CCW address of the program: before, between CCWs, one past the end.
        for h in [0xf8, 0x104, 0x128, 0] {
            assert_eq!(at(h), None, "{h:#x}");
        }
        // A final status stored after the expansion's first CCW: guest CPA after the guest
        // CCW, residual of the rest added; the same for a suspended CCW's count.
        let s = Scsw {
            cpa: 0x120,
            count: 5,
            ..Scsw::default()
        };
        let primary = Scsw {
            flags: s.flags.with_stctl(stctl::PRIMARY | stctl::STATUS_PENDING),
            ..s
        };
        let g = m.to_guest_scsw(&primary);
        assert_eq!((g.cpa, g.count), (0x2010, 305));
        let suspended = Scsw {
            flags: s
                .flags
                .with_actl(actl::SUSPENDED)
                .with_stctl(stctl::INTERMEDIATE | stctl::STATUS_PENDING),
            ..s
        };
        assert_eq!(m.to_guest_scsw(&suspended).count, 305);
        // A PCI's intermediate status has no residual count: it stays what the channel
        // stored (zero), as the guest's channel stores it (found by the translate fuzzer).
        let pci = Scsw {
            flags: s
                .flags
                .with_actl(actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE)
                .with_stctl(stctl::INTERMEDIATE | stctl::STATUS_PENDING),
            count: 0,
            ..s
        };
        let g = m.to_guest_scsw(&pci);
        assert_eq!((g.cpa, g.count), (0x2010, 0));
    }

    /// The one-page lookup of `read`/`write` answers as the general check does, for every
    /// kind of piece: in a read-only or a writable page, keyed or not, fetch-protected or not,
    /// crossing into an unpinned page, outside every pin, empty.
    #[test]
    fn one_page_accesses_answer_as_the_general_check() {
        use crate::ccw::{translate, CcwFlags, TranslateConfig};
        use crate::css::ChannelMemory;
        use crate::iommu_store::{Backing, IommuStore, Perm, StoreConfig};

        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0x1000, 0x10000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        // WRITE 16 bytes from 0x3000 (read-only pin), READ a page into 0x5000 (writable).
        let ccws = [
            Ccw1 {
                cmd: 0x01,
                flags: CcwFlags::new().with_cc(true),
                count: 16,
                cda: 0x3000,
            },
            Ccw1 {
                cmd: 0x02,
                flags: CcwFlags::new(),
                count: 0x1000,
                cda: 0x5000,
            },
        ];
        for (i, c) in ccws.iter().enumerate() {
            store.write(0x2000 + 8 * i as u64, &c.to_bytes()).unwrap();
        }
        // Both pages keyed 3; the data page fetch-protected too.
        store.set_storage_key(0x3000, 0x30).unwrap();
        store.set_storage_key(0x5000, 0x38).unwrap();
        store.write(0x3000, &[0x11; 16]).unwrap();
        let orb = Orb {
            intparm: 0,
            ctl: OrbControls::new().with_format1(true),
            cpa: 0x2000,
        };
        let p = translate(&orb, &store, &TranslateConfig::default()).unwrap();
        assert!(
            p.pins.rest.is_empty(),
            "one pin: the one-page lookup applies"
        );
        // The host addresses of the two pages (the IDAWs), found without building the page
        // list (which would turn the one-page lookup off).
        let hosts: Vec<u64> = p.idaws().map(|(_, h)| h).collect();
        let (out, inp) = (hosts[0], hosts[1]);
        assert_eq!(p.host_to_guest(out), Some(0x3000));
        assert_eq!(p.host_to_guest(inp), Some(0x5000));
        assert!(p.pages.get().is_none());
        let mut cases = 0;
        for base in [out, inp, inp + 0x1000, 0xffff_ffff_ffff_f000] {
            for off in [0u64, 8, 0xff0, 0xff8, 0xfff] {
                for len in [0usize, 1, 8, 16, 0x10] {
                    for key in [0u8, 3, 4] {
                        let a = base + off;
                        let mut buf = vec![0u8; len];
                        assert_eq!(
                            p.read(a, &mut buf, key),
                            p.check_pages_walk(a, len, key, false),
                            "read {a:#x}+{len} key {key}"
                        );
                        let data = vec![0x22u8; len];
                        assert_eq!(
                            p.write(a, &data, key),
                            p.check_pages_walk(a, len, key, true),
                            "write {a:#x}+{len} key {key}"
                        );
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 300);
        assert!(
            p.pages.get().is_none(),
            "every lookup above was the one-page one"
        );
        // The answers themselves, byte for byte where they succeed.
        let mut b = [0u8; 16];
        assert_eq!(p.read(out, &mut b, 4), Ok(()), "not fetch-protected");
        assert_eq!(b, [0x11; 16]);
        assert_eq!(p.write(out, &[1], 0), Err(AccessFault::Addressing(out)));
        assert_eq!(
            p.write(inp + 8, &[1], 4),
            Err(AccessFault::Protection(inp + 8))
        );
        assert_eq!(p.read(inp, &mut b, 4), Err(AccessFault::Protection(inp)));
        assert_eq!(
            p.write(inp + 0xff8, &[1; 16], 3),
            Err(AccessFault::Addressing(inp + 0x1000)),
            "crossing into an unpinned page"
        );
        p.write(inp + 0xff0, &[0x33; 16], 3).unwrap();
        drop(p);
        let mut g = [0u8; 16];
        store.read(0x5ff0, &mut g).unwrap();
        assert_eq!(g, [0x33; 16]);
    }
}
