//! The translator: guest channel program (guest-physical addresses) -> host program.
//!
//! Three passes, none recursive and each bounded:
//! 1. *Walk*: fetch the chain segments the program can reach (CC/CD chaining, TICs, and the
//!    CCW a status-modifier skip can reach), validating each CCW as a channel would.
//! 2. *Data*: for every data-transferring CCW, list the guest storage it touches (direct
//!    address, format-1/2 IDAL, MIDAL), pin those pages and describe them as a host format-2
//!    IDAL; a MIDAW list that no single IDAL can express becomes data-chained IDA CCWs placed
//!    out of line behind a TIC, so every guest CCW keeps exactly one slot (status-modifier
//!    skips and CCW addresses stay right).
//! 3. *Layout*: place segments, expansions and IDALs in the arena and encode them.
//!
//! CCWs a status modifier could reach but that are invalid become *trap* slots (command code
//! 0): a channel that reaches one presents a program check, as it would for the guest's CCW.
//!
//! Most programs are one chain segment of command-chained CCWs whose data one host IDAL per
//! CCW describes. A fast path translates exactly those in one walk and one build loop, with no
//! intermediate host-CCW list: the CCW image is written as it goes, pages are pinned as runs
//! and IDAWs converted through the pinned extents. Anything else, and any error, is left to
//! the three passes, so every rejection (errno, channel status) is theirs; a differential
//! test checks that both give the same program, byte for byte. All guest storage is read
//! through one store snapshot per translation.

use std::collections::VecDeque;

use crate::ccw::error::TranslateError as E;
use crate::ccw::program::{
    key_allows, HostProgram, Origin, Origins, Pins, ScswMapper, SegmentInfo, Segments,
};
use crate::ccw::{
    command, Ccw0, Ccw1, CcwFlags, CommandKind, CommandSet, Idaw, IdawFormat, Midaw, CCW_SIZE,
    MIDAW_SIZE,
};
use crate::iommu_store::{IommuStore, Perm, StoreError, StoreView, MAX_PIN_PAGES, PAGE_SIZE};
use crate::orb::Orb;

/// Limits of the translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslateConfig {
    /// CCWs in one chain segment (Linux: 256).
    pub max_segment_ccws: usize,
    /// Chain segments in one program (Linux, 2026: 16).
    pub max_segments: usize,
    /// Channel address of the arena the host program is placed in (below 2 GiB).
    pub arena_base: u32,
    /// Largest host program, in bytes.
    pub arena_size: u32,
    /// Commands after which the device may present status modifier. The slot after a
    /// chain's end is reachable (through a status-modifier skip) only when the CCW before
    /// it holds one of these; otherwise it is neither fetched nor translated. Default: every
    /// command (an unknown device); the emulated devices declare theirs (a 3390: its search
    /// commands; a 3490: none), and the channel holds them to it.
    pub status_modifier: CommandSet,
}

impl Default for TranslateConfig {
    fn default() -> Self {
        TranslateConfig {
            max_segment_ccws: 256,
            max_segments: 16,
            arena_base: 0x7000_0000,
            arena_size: 16 << 20,
            status_modifier: CommandSet::ALL,
        }
    }
}

/// Consecutive CCWs without data transfer a channel accepts (QEMU and Hercules).
const MAX_NO_DATA_CCWS: usize = 255;

/// One guest CCW as fetched, converted to format 1.
#[derive(Debug, Clone, Copy)]
struct GuestCcw {
    addr: u64,
    ccw: Ccw1,
    /// The command in effect: the CCW's own, or for data chaining the command it continues.
    cmd: u8,
    /// Reached by data chaining (its command field is ignored unless it is a TIC).
    data_chained: bool,
    /// Reached only through a status-modifier skip: problems make it a trap, not an error.
    speculative: bool,
    /// Invalid but only speculatively reachable: becomes a trap slot.
    trap: bool,
    /// A trap because the CCW could not be fetched (address invalid, unmapped, protected).
    unfetched: bool,
}

struct Segment {
    head: u64,
    ccws: Vec<GuestCcw>,
}

/// What the host CCW's data address designates, resolved at layout.
#[derive(Debug, Clone, Copy)]
enum Cda {
    Fixed(u32),
    /// Index of the first IDAW in the IDAL area.
    Idal(usize),
    /// Index of a host CCW.
    Ccw(usize),
    /// The guest slot with this index, entered as a channel would: through the TIC there
    /// (TIC to TIC is a program check), else the slot itself.
    Slot(usize),
}

#[derive(Debug, Clone, Copy)]
struct HostCcw {
    ccw: Ccw1,
    cda: Cda,
    guest: u64,
    residual_extra: u32,
}

/// A run of guest storage in transfer order: `addr` is the first byte transferred (for read
/// backward the highest one, bytes going downward).
#[derive(Debug, Clone, Copy, Default)]
struct Piece {
    addr: u64,
    len: u32,
    skip: bool,
}

/// Translates the guest program an ORB designates into a host program.
///
/// Guest storage is read (unpinned) through `store` for CCWs and lists; every page a data
/// transfer touches is pinned. On error everything pinned so far is released.
///
/// ```
/// use vccw::ccw::{translate, Ccw1, CcwFlags, TranslateConfig};
/// use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
/// use vccw::orb::{Orb, OrbControls};
///
/// let store = IommuStore::new(StoreConfig::default());
/// store.map_dma(0x10000, 0x10000, Perm::READ_WRITE, Backing::Anonymous).unwrap();
/// // SENSE ID, 32 bytes into 0x11000.
/// let ccw = Ccw1 { cmd: 0xE4, flags: CcwFlags::new().with_sli(true), count: 32, cda: 0x11000 };
/// store.write(0x10000, &ccw.to_bytes()).unwrap();
/// let orb = Orb { intparm: 1, ctl: OrbControls::new().with_format1(true), cpa: 0x10000 };
/// let prog = translate(&orb, &store, &TranslateConfig::default()).unwrap();
/// assert_eq!(prog.pin_count(), 1);
/// assert!(prog.orb().ctl.format2_idaw());
/// ```
pub fn translate(orb: &Orb, store: &IommuStore, cfg: &TranslateConfig) -> Result<HostProgram, E> {
    translate_with(orb, store, cfg, true)
}

/// [`translate`], with or without the fast paths (tests compare them).
fn translate_with(
    orb: &Orb,
    store: &IommuStore,
    cfg: &TranslateConfig,
    fast: bool,
) -> Result<HostProgram, E> {
    translate_in(orb, store, cfg, fast, fast)
}

/// [`translate`], with or without [`translate_short`] (`short`) and the other fast path
/// (`fast`).
fn translate_in(
    orb: &Orb,
    store: &IommuStore,
    cfg: &TranslateConfig,
    short: bool,
    fast: bool,
) -> Result<HostProgram, E> {
    let ctl = &orb.ctl;
    if ctl.transport_mode() {
        return Err(E::TransportMode);
    }
    if ctl.reserved() != 0 {
        return Err(E::InvalidOrb("reserved bits 26-30 set"));
    }
    let fmt1 = ctl.format1();
    check_ccw_address(orb.cpa as u64, fmt1)?;

    // One store snapshot for the whole translation (a failed lookup retries on a fresh one).
    let store = &store.view();
    // 2K guest IDAWs can only be carried by 2K host IDAWs; everything else goes in 4K ones.
    let guest_fmt = IdawFormat::from_orb(ctl.format2_idaw(), ctl.idaw_2k());
    if short {
        if let Some(p) = translate_short(orb, store, cfg) {
            return Ok(p);
        }
    }
    if let Some(chain) = walk_simple(orb, store, cfg).filter(|_| fast) {
        let uses_2k = guest_fmt.block_size() == 2048 && chain.ccws.iter().any(|c| c.flags.ida());
        let mut b = Builder::new(
            orb,
            store,
            cfg,
            guest_fmt,
            if uses_2k { 2048 } else { 4096 },
        );
        if let Some(p) = b.build_simple(&chain) {
            return Ok(p);
        }
    }
    let segments = walk(orb, store, cfg)?;
    let uses_2k = guest_fmt.block_size() == 2048
        && segments
            .iter()
            .flat_map(|s| &s.ccws)
            .any(|g| !g.trap && !is_tic(&g.ccw) && g.ccw.flags.ida());
    Builder::new(
        orb,
        store,
        cfg,
        guest_fmt,
        if uses_2k { 2048 } else { 4096 },
    )
    .build(segments)
}

fn ccw_address_ok(addr: u64, fmt1: bool) -> bool {
    let mask: u64 = if fmt1 {
        0xffff_ffff_8000_0007
    } else {
        0xffff_ffff_ff00_0007
    };
    addr != 0 && addr & mask == 0
}

fn check_ccw_address(addr: u64, fmt1: bool) -> Result<(), E> {
    if ccw_address_ok(addr, fmt1) {
        Ok(())
    } else {
        Err(E::CcwAddress(addr))
    }
}

fn unmapped(addr: u64) -> impl Fn(StoreError) -> E {
    move |_| E::Unmapped(addr)
}

/// Reads storage the channel itself fetches (CCWs, IDAWs, MIDAWs). As for data, the ORB key
/// must allow fetching from every page: a fetch-protected page with another key is a
/// protection check. Pages are checked in address order, each for mapping then key, as a
/// channel meets them.
fn fetch(store: &StoreView, addr: u64, buf: &mut [u8], key: u8) -> Result<(), E> {
    if key != 0 && !buf.is_empty() {
        let last = addr.saturating_add(buf.len() as u64 - 1);
        let mut page = addr - addr % PAGE_SIZE;
        loop {
            let at = page.max(addr);
            let sk = store.storage_key(page).map_err(unmapped(at))?;
            if !key_allows(key, sk, false) {
                return Err(E::Protection(at));
            }
            match page.checked_add(PAGE_SIZE) {
                Some(next) if next <= last => page = next,
                _ => break,
            }
        }
    }
    store.read(addr, buf).map_err(unmapped(addr))
}

/// Bytes of list storage (IDAWs, MIDAWs) fetched at once, at most to the end of the page.
const LIST_CHUNK: usize = 512;

/// Bytes of list storage the first fetch of a translation takes.
const LIST_FIRST: usize = 64;

/// The last stretch of guest list storage fetched: IDALs and MIDALs of consecutive CCWs
/// usually sit together, so one store read serves many of them.
///
/// Exact: a list entry never crosses a page (entries are aligned to their size), mapping,
/// permission and storage key are per page, and the stretch is fetched from the entry's own
/// address on, so the fetch that fills it fails exactly when fetching the entry alone would,
/// with the same error. Each entry is still copied out once and used as copied.
struct ListCache {
    /// Guest address of `buf[0]`; `len` 0 means empty.
    at: u64,
    len: usize,
    buf: [u8; LIST_CHUNK],
}

impl Default for ListCache {
    fn default() -> Self {
        ListCache {
            at: 0,
            len: 0,
            buf: [0; LIST_CHUNK],
        }
    }
}

impl ListCache {
    /// The `N`-byte list entry at `addr` (aligned to `N`, so within a page), fetched as
    /// [`fetch`] would fetch it.
    #[inline]
    fn get<const N: usize>(&mut self, store: &StoreView, addr: u64, key: u8) -> Result<[u8; N], E> {
        let mut out = [0u8; N];
        let off = addr.wrapping_sub(self.at);
        if off < self.len as u64 && self.len - (off as usize) >= N {
            let off = off as usize;
            out.copy_from_slice(&self.buf[off..off + N]);
        } else {
            self.fetch(store, addr, &mut out, key)?;
        }
        Ok(out)
    }

    /// Fetches the list entry at `addr` (`out.len()` bytes, not crossing a page) as
    /// [`fetch`] would.
    #[cold]
    fn fetch(&mut self, store: &StoreView, addr: u64, out: &mut [u8], key: u8) -> Result<(), E> {
        let n = out.len();
        if let Some(off) = addr.checked_sub(self.at) {
            if off < self.len as u64 && off as usize + n <= self.len {
                let off = off as usize;
                out.copy_from_slice(&self.buf[off..off + n]);
                return Ok(());
            }
        }
        let to_page_end = (PAGE_SIZE - addr % PAGE_SIZE) as usize;
        if n > to_page_end {
            // Not a list entry's shape: fetch it alone.
            return fetch(store, addr, out, key);
        }
        // A first fetch takes a small stretch (a small program has a few entries); later
        // ones the whole chunk.
        let chunk = if self.at == 0 && self.len == 0 {
            LIST_FIRST
        } else {
            LIST_CHUNK
        };
        let len = to_page_end.min(chunk);
        self.len = 0;
        fetch(store, addr, &mut self.buf[..len], key)?;
        self.at = addr;
        self.len = len;
        out.copy_from_slice(&self.buf[..n]);
        Ok(())
    }
}

/// Reads CCWs from `addr` up to the end of its page (one store lookup for many CCWs).
fn fetch_ccws(
    store: &StoreView,
    addr: u64,
    max: usize,
    buf: &mut Vec<u8>,
    key: u8,
) -> Result<(), E> {
    let in_page = ((PAGE_SIZE - (addr % PAGE_SIZE)) / CCW_SIZE) as usize;
    let n = in_page.min(max).max(1);
    buf.resize(n * CCW_SIZE as usize, 0);
    fetch(store, addr, buf, key)
}

#[inline]
fn decode(raw: &[u8], fmt1: bool) -> Ccw1 {
    let mut b = [0u8; 8];
    b.copy_from_slice(raw);
    if fmt1 {
        Ccw1::from_bytes(b)
    } else {
        Ccw0::from_bytes(b).to_format1()
    }
}

/// Whether a fetched guest CCW (format-0 ones already converted) is a TIC. In format 1 only
/// command code 0x08 is a TIC; other `xxxx1000` codes are invalid commands (Hercules, and
/// vccw's channel), so `Ccw1::is_tic` (any `xxxx1000`) is too wide here.
#[inline]
fn is_tic(c: &Ccw1) -> bool {
    c.cmd == command::TIC
}

/// The ORB controls CCW validation depends on, read once per translation.
#[derive(Debug, Clone, Copy)]
struct Rules {
    fmt1: bool,
    midaw: bool,
    suspend: bool,
}

impl Rules {
    fn of(orb: &Orb) -> Self {
        Rules {
            fmt1: orb.ctl.format1(),
            midaw: orb.ctl.midaw(),
            suspend: orb.ctl.suspend(),
        }
    }
}

/// [`CommandKind::of`] for each value of a command code's low four bits, the only bits it
/// looks at.
const KIND: [CommandKind; 16] = {
    let mut t = [CommandKind::Invalid; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = CommandKind::of(i as u8);
        i += 1;
    }
    t
};

/// [`CommandKind::of`] by table.
#[inline]
fn kind_of(cmd: u8) -> CommandKind {
    KIND[(cmd & 0x0f) as usize]
}

/// Validates one CCW as a channel would on fetching it (`data_chained`: reached by data
/// chaining, where only a TIC's command code counts).
#[inline]
fn validate(c: &Ccw1, addr: u64, rules: &Rules, data_chained: bool) -> Result<(), E> {
    let fmt1 = rules.fmt1;
    if is_tic(c) {
        if fmt1 && (c.flags.into_bits() != 0 || c.count != 0) {
            return Err(E::TicFlags(addr));
        }
        return check_ccw_address(c.cda as u64, fmt1);
    }
    if !data_chained && matches!(kind_of(c.cmd), CommandKind::Invalid | CommandKind::Tic) {
        return Err(E::InvalidCommand {
            at: addr,
            cmd: c.cmd,
        });
    }
    if !fmt1 && c.count == 0 {
        return Err(E::ZeroCount(addr));
    }
    if c.count == 0 && (c.flags.cd() || data_chained) {
        return Err(E::ZeroCountDataChain(addr));
    }
    // MIDAWs carry their own skip flags: MIDA with IDA or SKP is a program check (Hercules).
    if c.flags.mida() && (!rules.midaw || c.flags.ida() || c.flags.skp()) {
        return Err(E::MidaNotAllowed(addr));
    }
    if c.flags.s() && !rules.suspend {
        return Err(E::SuspendNotAllowed(addr));
    }
    Ok(())
}

/// Pass 1: find and validate the reachable chain segments.
fn walk(orb: &Orb, store: &StoreView, cfg: &TranslateConfig) -> Result<Vec<Segment>, E> {
    let fmt1 = orb.ctl.format1();
    let rules = Rules::of(orb);
    let mut segments: Vec<Segment> = Vec::new();
    // (guest address, reached only speculatively, command continued by data chaining)
    let mut queue: VecDeque<(u64, bool, Option<u8>)> =
        VecDeque::from([(orb.cpa as u64, false, None)]);
    let mut raw = Vec::with_capacity(PAGE_SIZE as usize);

    while let Some((head, spec_head, dc_head)) = queue.pop_front() {
        // Already fetched: reuse it, unless a certain path reaches a slot so far only
        // reached speculatively (e.g. `TIC *+8` after a CC CCW): a speculative copy may end
        // in a trap at the segment limit, so the certain path gets a segment of its own.
        if let Some((si, ci)) = find_in(&segments, head) {
            if spec_head || !segments[si].ccws[ci].speculative {
                continue;
            }
        }
        if segments.len() == cfg.max_segments {
            if spec_head {
                continue; // the TIC that leads here becomes a trap
            }
            return Err(E::TooManySegments(cfg.max_segments));
        }
        let mut ccws: Vec<GuestCcw> = Vec::new();
        let mut speculative = spec_head;
        let mut dc_cmd = dc_head;
        let mut no_data_run = 0usize;
        let mut raw_at = 0u64;
        raw.clear();
        loop {
            let addr = head + CCW_SIZE * ccws.len() as u64;
            // The CCW as fetched, if it could be: a trap made of it presents its count.
            let mut fetched: Option<Ccw1> = None;
            let step = (|| {
                // (trap slots may sit past the limit: `>=`)
                if ccws.len() >= cfg.max_segment_ccws {
                    return Err(E::SegmentTooLong(head, cfg.max_segment_ccws));
                }
                let off = addr.wrapping_sub(raw_at) as usize;
                if raw.is_empty() || off + CCW_SIZE as usize > raw.len() {
                    check_ccw_address(addr, fmt1)?;
                    fetch_ccws(
                        store,
                        addr,
                        cfg.max_segment_ccws - ccws.len(),
                        &mut raw,
                        orb.ctl.key(),
                    )?;
                    raw_at = addr;
                }
                let off = (addr - raw_at) as usize;
                let ccw = decode(&raw[off..off + CCW_SIZE as usize], fmt1);
                fetched = Some(ccw);
                validate(&ccw, addr, &rules, dc_cmd.is_some())?;
                let transfers = !is_tic(&ccw) && ccw.count != 0 && ccw.cmd != command::NOOP;
                no_data_run = if transfers { 0 } else { no_data_run + 1 };
                if no_data_run > MAX_NO_DATA_CCWS {
                    return Err(E::NoDataLoop(addr));
                }
                Ok(ccw)
            })();
            let ccw = match step {
                Ok(c) => c,
                Err(_) if speculative => {
                    ccws.push(GuestCcw {
                        addr,
                        ccw: fetched.map_or(Ccw1::default(), |c| trap_of(&c)),
                        cmd: 0,
                        data_chained: false,
                        speculative: true,
                        trap: true,
                        unfetched: fetched.is_none(),
                    });
                    // A status-modifier skip from a command-chaining CCW before the trap
                    // jumps over it: the slot after must exist too (else the channel would
                    // run into whatever the arena holds next).
                    let n = ccws.len();
                    let prev_cc = n >= 2 && {
                        let p = &ccws[n - 2];
                        !p.trap && !is_tic(&p.ccw) && p.ccw.flags.cc() && !p.ccw.flags.cd()
                    };
                    if !prev_cc {
                        break;
                    }
                    dc_cmd = None;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let tic = is_tic(&ccw);
            let cmd = match (tic, dc_cmd) {
                (false, Some(c)) => c,
                _ => ccw.cmd,
            };
            ccws.push(GuestCcw {
                addr,
                ccw,
                cmd,
                data_chained: dc_cmd.is_some() && !tic,
                speculative,
                trap: false,
                unfetched: false,
            });
            if tic {
                // Data chaining carries through a TIC to its target.
                queue.push_back((ccw.cda as u64, speculative, dc_cmd));
            } else if ccw.flags.cd() {
                dc_cmd = Some(cmd);
                continue;
            } else if ccw.flags.cc() {
                dc_cmd = None;
                continue;
            }
            // The chain ends here, unless a status-modifier skip from the CCW before (when it
            // command-chains) reaches the next slot: the CKD "Search; TIC *-8; Read" idiom.
            // Such a skip is possible, never certain, so what follows is speculative.
            let n = ccws.len();
            let prev_cc = n >= 2 && {
                let p = &ccws[n - 2];
                !is_tic(&p.ccw)
                    && p.ccw.flags.cc()
                    && !p.ccw.flags.cd()
                    && cfg.status_modifier.contains(p.cmd)
            };
            if !prev_cc {
                break;
            }
            speculative = true;
            dc_cmd = None;
        }
        segments.push(Segment { head, ccws });
    }
    Ok(segments)
}

/// CCWs at most in a [`translate_short`] program.
const SHORT_CCWS: usize = 8;

/// IDAWs at most in a [`translate_short`] program.
const SHORT_IDAWS: usize = 16;

// A short program can never hold too many no-data CCWs in a row, nor pin too many pages in
// one run (each CCW touches at most 17 pages).
const _: () = assert!(SHORT_CCWS <= MAX_NO_DATA_CCWS && SHORT_CCWS * 17 <= MAX_PIN_PAGES);

/// The shortest fast path, for the commonest program: one segment of at most
/// [`SHORT_CCWS`] command-chained CCWs in one page (no TIC, no data chaining, no trap slot
/// after it), each one without data, direct, or with a one-IDAW IDAL of 4K IDAWs. Its host
/// program is the one [`Builder::build_simple`] builds for it (the same bytes, pins and
/// maps), made in one pass over fixed-size state on the stack: no [`SimpleChain`], no
/// [`Builder`], no list cache. `None` (nothing kept pinned) for anything else, every error
/// included: the other paths then decide.
fn translate_short(orb: &Orb, store: &StoreView, cfg: &TranslateConfig) -> Option<HostProgram> {
    let ctl = &orb.ctl;
    let (fmt1, key) = (ctl.format1(), ctl.key());
    let guest_fmt = IdawFormat::from_orb(ctl.format2_idaw(), ctl.idaw_2k());
    let head = orb.cpa as u64;
    // At most what the general walk may hold in one segment, within the page.
    let in_page = ((PAGE_SIZE - head % PAGE_SIZE) / CCW_SIZE) as usize;
    let fetched = in_page.min(cfg.max_segment_ccws).min(SHORT_CCWS);
    if cfg.max_segments == 0 || fetched == 0 {
        return None;
    }
    let mut raw = [0u8; SHORT_CCWS * CCW_SIZE as usize];
    fetch(store, head, &mut raw[..fetched * CCW_SIZE as usize], key).ok()?;
    let rules = Rules::of(orb);
    // Host CCWs: a data CCW's `cda` the index of its first IDAW until the IDAWs are placed.
    let mut host = [Ccw1::default(); SHORT_CCWS];
    // IDAWs (guest addresses until pinned); page runs (first, last, access), as
    // [`Builder::push_run`] records them.
    let mut idaws = [0u64; SHORT_IDAWS];
    let mut nidaws = 0usize;
    let mut runs = [(0u64, 0u64, 0u8); SHORT_CCWS];
    let mut nruns = 0usize;
    let mut n = 0usize;
    let mut prev_cmd = 0u8;
    for (i, (raw, h)) in raw
        .chunks_exact(CCW_SIZE as usize)
        .zip(&mut host)
        .take(fetched)
        .enumerate()
    {
        let addr = head + CCW_SIZE * i as u64;
        let c = decode(raw, fmt1);
        if is_tic(&c) || c.flags.cd() || validate(&c, addr, &rules, false).is_err() {
            return None;
        }
        // 2K guest IDAWs make a program of 2K host ones (even for a CCW without data): the
        // other paths.
        if c.flags.ida() && guest_fmt != IdawFormat::Format2 {
            return None;
        }
        let kind = kind_of(c.cmd);
        let input = kind.is_input();
        let flags = c.flags.with_ida(false).with_mida(false);
        *h = Ccw1 {
            cmd: c.cmd,
            flags,
            count: c.count,
            cda: 0,
        };
        // (A NOOP with a count is checked by the other paths; MIDAWs are theirs too.)
        if c.count != 0 && !(input && c.flags.skp()) {
            if c.cmd == command::NOOP || c.flags.mida() {
                return None;
            }
            let backward = kind == CommandKind::ReadBackward;
            let piece = if c.flags.ida() {
                let list = one_idaw_list(&c, guest_fmt, fmt1)?;
                let mut b = [0u8; 8];
                fetch(store, list, &mut b, key).ok()?;
                one_idaw_piece_of(&c, guest_fmt, backward, Idaw(u64::from_be_bytes(b)))?
            } else {
                direct_piece(fmt1, addr, &c, backward).ok()?
            };
            h.flags = flags.with_ida(true);
            h.cda = nidaws as u32;
            let (lo, hi) = piece_bounds(&piece, backward);
            // One IDAW a 4K block: the first byte transferred there (see [`push_idaws`]).
            let (first, last) = (lo >> PAGE_SHIFT, hi >> PAGE_SHIFT);
            let blocks = (last - first + 1) as usize;
            let ws = idaws.get_mut(nidaws..nidaws + blocks)?;
            ws[0] = piece.addr;
            for (k, w) in ws[1..].iter_mut().enumerate() {
                *w = if backward {
                    ((last - 1 - k as u64) << PAGE_SHIFT) + (PAGE_SIZE - 1)
                } else {
                    (first + 1 + k as u64) << PAGE_SHIFT
                };
            }
            nidaws += blocks;
            let (first, last, acc) = (first << PAGE_SHIFT, last << PAGE_SHIFT, access(input));
            match runs[..nruns].last_mut() {
                // (The same page again, or the next one.)
                Some(r) if r.2 == acc && first >= r.1 && first - r.1 <= PAGE_SIZE => r.1 = last,
                _ => {
                    runs[nruns] = (first, last, acc);
                    nruns += 1;
                }
            }
        }
        n = i + 1;
        if !c.flags.cc() {
            break;
        }
        prev_cmd = c.cmd;
    }
    // The chain goes on past what was fetched, or a status-modifier skip from the CCW before
    // the last reaches the slot after it (a trap slot, for the other fast path).
    if n == 0 || host[n - 1].flags.cc() || (n >= 2 && cfg.status_modifier.contains(prev_cmd)) {
        return None;
    }
    let ccw_bytes = n * CCW_SIZE as usize;
    let size = ccw_bytes + nidaws * 8;
    if size as u64 > cfg.arena_size as u64 {
        return None;
    }
    // Pinned as [`Builder::pin_runs`] pins them: ascending, disjoint runs (each of at most
    // 512 pages here) in one call; a program touching no data pins nothing.
    let pins = if nruns == 0 {
        Pins::default()
    } else {
        let mut runs = &runs[..nruns];
        let sorted;
        if !(1..nruns).all(|k| runs[k - 1].1 < runs[k].0) {
            sorted = sorted_runs(runs)?;
            runs = &sorted;
        }
        let mut calls = [(0u64, 0u64, Perm::default()); SHORT_CCWS];
        for (call, &(first, last, acc)) in calls.iter_mut().zip(runs) {
            let perm = Perm {
                read: acc & 1 != 0,
                write: acc & 2 != 0,
            };
            *call = (first, ((last - first) >> PAGE_SHIFT) + 1, perm);
        }
        let pinned = store.pin_runs(&calls[..runs.len()]).ok()?;
        // Guest -> host through the pinned runs (guest page, pages, host page): a page is
        // in one of them (they are disjoint, each pinned once).
        let mut ext = [(0u64, 0u64, 0u64); SHORT_CCWS];
        let mut next = 0;
        for (iova, host, n, _) in pinned.runs() {
            *ext.get_mut(next)? = (iova, n, host);
            next += 1;
        }
        let ext = &ext[..next];
        let mut cur = 0;
        for w in &mut idaws[..nidaws] {
            let page = *w & !(PAGE_SIZE - 1);
            let hit =
                |&(iova, n, _): &(u64, u64, u64)| page >= iova && (page - iova) >> PAGE_SHIFT < n;
            if !ext.get(cur).is_some_and(hit) {
                cur = ext.iter().position(hit)?;
            }
            let (iova, _, host) = ext[cur];
            *w = host + (*w - iova);
        }
        Pins::one(pinned)
    };
    let base = cfg.arena_base;
    let idaw_base = base.wrapping_add(ccw_bytes as u32);
    let mut image = Vec::with_capacity(size);
    for h in &host[..n] {
        let mut h = *h;
        if h.flags.ida() {
            h.cda = idaw_base.wrapping_add(h.cda * 8);
        }
        image.extend_from_slice(&h.to_bytes());
    }
    for w in &idaws[..nidaws] {
        image.extend_from_slice(&Idaw(*w).to_format2_bytes());
    }
    let host_orb = host_orb(orb, 4096, base);
    Some(HostProgram {
        orb: host_orb,
        guest_orb: *orb,
        base,
        image,
        ccw_bytes,
        segments: Segments::One(SegmentInfo {
            guest: head,
            host: base,
            len: n,
        }),
        mapper: ScswMapper {
            host_cpa: host_orb.cpa,
            guest_orb: *orb,
            origins: Origins::One(Origin {
                host: base,
                guest: head as u32,
                residual_extra: 0,
                len: n as u32,
            }),
        },
        pages: Default::default(),
        pins,
    })
}

/// The common program shape, translated by a fast path: chain segments of command-chained
/// CCWs without data chaining (and whose IDALs and MIDALs each make one host IDAL), every
/// CCW valid, each segment but the last ending in a TIC to the next, which starts at a CCW
/// no earlier segment holds; after the last one's end at most a trap slot (an invalid CCW
/// only a status-modifier skip reaches). Anything else, and every error, goes to the general
/// passes, which then decide (so each rejection is theirs).
struct SimpleChain {
    /// The certainly reachable CCWs, converted to format 1, segment after segment.
    ccws: InlineVec<Ccw1, 8>,
    /// The segments: (guest address of the head, CCWs in `ccws`), in walk order.
    segs: InlineVec<(u64, usize), 2>,
    /// The trap slot after the last one, in its host form.
    trap: Option<Ccw1>,
}

/// CCWs the fast path fetches at once: fewer than [`walk`] may (it fetches to the end of
/// the page), which fails exactly as often, with the same error (one page either way).
const READ_AHEAD: usize = 64;

/// CCWs the fast path's first fetch takes.
const FIRST_AHEAD: usize = 8;

/// CCWs fetched ahead, in one page, at most to the segment limit.
struct CcwReader {
    raw: [u8; READ_AHEAD * CCW_SIZE as usize],
    at: u64,
    len: usize,
}

impl CcwReader {
    /// The slot after a segment of `n` CCWs at `head` that only a status-modifier skip
    /// reaches, for the fast path: its trap form if it holds no valid CCW (unreadable, past
    /// the segment limit, invalid, or one no-data CCW too many after `no_data_run`), `None`
    /// if it does (a valid chain goes on there: the general passes follow it).
    #[allow(clippy::too_many_arguments)]
    fn trap_slot(
        &mut self,
        store: &StoreView,
        head: u64,
        n: usize,
        max: usize,
        orb: &Orb,
        rules: &Rules,
        no_data_run: usize,
    ) -> Option<Ccw1> {
        if n >= max {
            return Some(Ccw1::default());
        }
        let addr = head + CCW_SIZE * n as u64;
        let Ok(c) = self.read(store, addr, max - n, orb) else {
            return Some(Ccw1::default());
        };
        let transfers = !is_tic(&c) && c.count != 0 && c.cmd != command::NOOP;
        let run = if transfers { 0 } else { no_data_run + 1 };
        if validate(&c, addr, rules, false).is_ok() && run <= MAX_NO_DATA_CCWS {
            return None;
        }
        Some(trap_of(&c))
    }

    /// The CCW at `addr` (`left`: CCWs the segment may still hold), fetched as [`walk`]
    /// fetches it; addresses only go up.
    #[inline]
    fn read(&mut self, store: &StoreView, addr: u64, left: usize, orb: &Orb) -> Result<Ccw1, E> {
        let fmt1 = orb.ctl.format1();
        let off = addr.wrapping_sub(self.at);
        if self.len == 0 || off >= self.len as u64 {
            self.refill(store, addr, left, orb)?;
        }
        let off = (addr - self.at) as usize;
        Ok(decode(&self.raw[off..off + CCW_SIZE as usize], fmt1))
    }

    #[cold]
    fn refill(&mut self, store: &StoreView, addr: u64, left: usize, orb: &Orb) -> Result<(), E> {
        check_ccw_address(addr, orb.ctl.format1())?;
        let in_page = ((PAGE_SIZE - (addr % PAGE_SIZE)) / CCW_SIZE) as usize;
        // The first fetch takes a few CCWs (most programs are short), later ones more.
        let ahead = if self.len == 0 {
            FIRST_AHEAD
        } else {
            READ_AHEAD
        };
        let n = in_page.min(left).clamp(1, ahead) * CCW_SIZE as usize;
        self.len = 0;
        fetch(store, addr, &mut self.raw[..n], orb.ctl.key())?;
        self.at = addr;
        self.len = n;
        Ok(())
    }
}

/// Walks a [`SimpleChain`], or says `None` when the program is not one (see there). Each
/// step mirrors [`walk`] exactly for this shape.
fn walk_simple(orb: &Orb, store: &StoreView, cfg: &TranslateConfig) -> Option<SimpleChain> {
    if cfg.max_segments == 0 {
        return None;
    }
    let max = cfg.max_segment_ccws;
    let rules = Rules::of(orb);
    let mut head = orb.cpa as u64;
    let mut reader = CcwReader {
        raw: [0; READ_AHEAD * CCW_SIZE as usize],
        at: head,
        len: 0,
    };
    let mut ccws: InlineVec<Ccw1, 8> = InlineVec::default();
    let mut segs: InlineVec<(u64, usize), 2> = InlineVec::default();
    // CCWs of the segments before this one.
    let mut before = 0usize;
    loop {
        let mut no_data_run = 0usize;
        let mut tic_to = None;
        loop {
            let i = ccws.len() - before;
            if i >= max {
                return None;
            }
            let addr = head + CCW_SIZE * i as u64;
            let c = reader.read(store, addr, max - i, orb).ok()?;
            if validate(&c, addr, &rules, false).is_err() || c.flags.cd() {
                return None;
            }
            let tic = is_tic(&c);
            let transfers = !tic && c.count != 0 && c.cmd != command::NOOP;
            no_data_run = if transfers { 0 } else { no_data_run + 1 };
            if no_data_run > MAX_NO_DATA_CCWS {
                return None;
            }
            // A TIC first in a segment is a TIC to TIC (or the program's first CCW).
            if tic && i == 0 {
                return None;
            }
            if ccws.len() == 8 {
                // A long chain: room for a segment at once, not doubling from 16.
                ccws.reserve(max.min(1024));
            }
            ccws.push(c);
            if tic {
                tic_to = Some(c.cda as u64);
                break;
            }
            if !c.flags.cc() {
                break;
            }
        }
        let n = ccws.len() - before;
        // The chain ended (at its end, or at a TIC) at a CCW that the one before command-
        // chains to: a status-modifier skip from that one reaches the next slot.
        let sm = n >= 2 && {
            let p = &ccws[ccws.len() - 2];
            !is_tic(p) && cfg.status_modifier.contains(p.cmd)
        };
        segs.push((head, n));
        let Some(target) = tic_to else {
            // Only a trap there keeps the shape simple.
            let trap = match sm {
                false => None,
                true => Some(reader.trap_slot(store, head, n, max, orb, &rules, no_data_run)?),
            };
            return Some(SimpleChain { ccws, segs, trap });
        };
        // A skip over the TIC, a target some segment already holds, or one segment too
        // many: the general passes.
        if sm
            || segs.len() == cfg.max_segments
            || segs
                .iter()
                .any(|&(h, n)| target >= h && target - h < CCW_SIZE * n as u64)
        {
            return None;
        }
        before = ccws.len();
        head = target;
    }
}

/// The slot holding the CCW at `addr`: one reached with certainty if there is one (see the
/// walk), else a speculative one.
fn find_in(segments: &[Segment], addr: u64) -> Option<(usize, usize)> {
    let mut found = None;
    for (i, s) in segments.iter().enumerate() {
        let Some(off) = addr.checked_sub(s.head) else {
            continue;
        };
        let ci = (off / CCW_SIZE) as usize;
        if off % CCW_SIZE == 0 && ci < s.ccws.len() {
            if !s.ccws[ci].speculative {
                return Some((i, ci));
            }
            found = found.or(Some((i, ci)));
        }
    }
    found
}

/// Passes 2 and 3.
struct Builder<'a> {
    orb: &'a Orb,
    store: &'a StoreView<'a>,
    /// The last stretch of IDAL/MIDAL storage fetched.
    lists: ListCache,
    cfg: &'a TranslateConfig,
    guest_fmt: IdawFormat,
    host_block: u64,
    ccws: Vec<HostCcw>,
    expansions: Vec<HostCcw>,
    /// IDAWs as *guest* addresses until every page is pinned, then host addresses.
    idaws: InlineVec<u64, 8>,
    pins: Pins,
    /// Pages the certainly-reachable CCWs need, (guest page, access: 1 fetch, 2 store),
    /// pinned together at the end in as few calls as possible.
    wanted: Vec<(u64, u8)>,
    /// The fast path's pages: runs (first page, last page, access bits) in CCW order.
    runs: InlineVec<(u64, u64, u8), 4>,
    /// The pinned pages as extents, in pin order (see [`add_to_extents`]).
    extents: Extents,
}

impl<'a> Builder<'a> {
    fn new(
        orb: &'a Orb,
        store: &'a StoreView<'a>,
        cfg: &'a TranslateConfig,
        guest_fmt: IdawFormat,
        host_block: u64,
    ) -> Self {
        Builder {
            orb,
            store,
            lists: ListCache::default(),
            cfg,
            guest_fmt,
            host_block,
            ccws: Vec::new(),
            expansions: Vec::new(),
            idaws: InlineVec::default(),
            pins: Pins::default(),
            wanted: Vec::new(),
            runs: InlineVec::default(),
            extents: InlineVec::default(),
        }
    }

    fn build(mut self, segments: Vec<Segment>) -> Result<HostProgram, E> {
        let total: usize = segments.iter().map(|s| s.ccws.len()).sum();
        self.ccws.reserve(total);
        self.idaws.reserve(total);
        self.wanted.reserve(total);
        // Host index of each segment's head: segments are laid out in order.
        let mut heads = Vec::with_capacity(segments.len());
        let mut n = 0;
        for s in &segments {
            heads.push(n);
            n += s.ccws.len();
        }
        for (si, seg) in segments.iter().enumerate() {
            let seg_end = heads[si] + seg.ccws.len();
            for g in &seg.ccws {
                let host = if g.trap {
                    Ok(trap_ccw(g))
                } else if is_tic(&g.ccw) {
                    self.tic(g, &segments, &heads)
                } else {
                    let slot = self.ccws.len();
                    self.data_ccw(g, slot, seg_end, total)
                };
                let host = match host {
                    Ok(h) => h,
                    Err(_) if g.speculative => trap_ccw(g),
                    Err(e) => return Err(e),
                };
                self.ccws.push(host);
            }
        }
        let wanted = std::mem::take(&mut self.wanted);
        self.pin_pages(wanted, 0)?;
        self.idaws_to_host()?;
        self.layout(segments, heads)
    }

    /// The fast path: the host program of a [`SimpleChain`], the same bytes, pins and maps
    /// the general passes build for it; `None` (nothing kept pinned) to leave it to them.
    fn build_simple(&mut self, chain: &SimpleChain) -> Option<HostProgram> {
        let n = chain.ccws.len();
        let nslots = n + chain.trap.is_some() as usize;
        let base = self.cfg.arena_base;
        let ccw_bytes = nslots * CCW_SIZE as usize;
        let idaw_base = base.wrapping_add(ccw_bytes as u32);
        // Room for the IDAWs too (typically one or two a CCW): no copy when they are added.
        let mut image = Vec::with_capacity(ccw_bytes + 2 * n * 8);
        self.idaws.reserve(n);
        // Appended, not zeroed and then overwritten. Segments are laid out in walk order, so
        // a segment's TIC leads to the slot right after it.
        let mut ccws = chain.ccws.iter();
        let mut slot = 0usize;
        for &(head, len) in chain.segs.iter() {
            for (i, c) in ccws.by_ref().take(len).enumerate() {
                let h = if is_tic(c) {
                    Ccw1 {
                        cmd: command::TIC,
                        flags: CcwFlags::new(),
                        count: 0,
                        cda: base.wrapping_add(((slot + len) * CCW_SIZE as usize) as u32),
                    }
                } else {
                    self.simple_ccw(head + CCW_SIZE * i as u64, c, idaw_base)?
                };
                image.extend_from_slice(&h.to_bytes());
            }
            slot += len;
        }
        if let Some(t) = &chain.trap {
            image.extend_from_slice(&t.to_bytes());
        }
        self.pin_runs().ok()?;
        self.idaws_to_host().ok()?;
        let size = ccw_bytes + self.idaws.len() * 8;
        if size as u64 > self.cfg.arena_size as u64 {
            return None;
        }
        image.reserve_exact(size - ccw_bytes);
        for w in self.idaws.iter() {
            image.extend_from_slice(&Idaw(*w).to_format2_bytes());
        }
        // Slot i at base + 8i stands for the guest CCW at head + 8i within each segment (the
        // last one's trap slot included): a run each, joined where they continue each other.
        let (segments, origins) = if let [(head, _)] = *chain.segs {
            let one = Origin {
                host: base,
                guest: head as u32,
                residual_extra: 0,
                len: nslots as u32,
            };
            let seg = SegmentInfo {
                guest: head,
                host: base,
                len: nslots,
            };
            (Segments::One(seg), Origins::One(one))
        } else {
            let mut infos = Vec::with_capacity(chain.segs.len());
            let mut runs: Vec<Origin> = Vec::with_capacity(chain.segs.len());
            let mut host = base;
            let last = chain.segs.len() - 1;
            for (k, &(head, len)) in chain.segs.iter().enumerate() {
                let len = len + (k == last && chain.trap.is_some()) as usize;
                infos.push(SegmentInfo {
                    guest: head,
                    host,
                    len,
                });
                let bytes = (len * CCW_SIZE as usize) as u32;
                match runs.last_mut() {
                    Some(r)
                        if r.host.wrapping_add(r.len * CCW_SIZE as u32) == host
                            && r.guest.wrapping_add(r.len * CCW_SIZE as u32) == head as u32 =>
                    {
                        r.len += len as u32
                    }
                    _ => runs.push(Origin {
                        host,
                        guest: head as u32,
                        residual_extra: 0,
                        len: len as u32,
                    }),
                }
                host = host.wrapping_add(bytes);
            }
            (Segments::Many(infos), Origins::from(runs))
        };
        let host_orb = host_orb(self.orb, self.host_block, base);
        Some(HostProgram {
            orb: host_orb,
            guest_orb: *self.orb,
            base,
            image,
            ccw_bytes,
            segments,
            mapper: ScswMapper {
                host_cpa: host_orb.cpa,
                guest_orb: *self.orb,
                origins,
            },
            pages: Default::default(),
            pins: std::mem::take(&mut self.pins),
        })
    }

    /// One CCW of a [`SimpleChain`] at `addr`, as [`Builder::data_ccw`] makes it, with its
    /// IDAL placed from `idaw_base` on; `None` where that would fail or need an expansion.
    fn simple_ccw(&mut self, addr: u64, c: &Ccw1, idaw_base: u32) -> Option<Ccw1> {
        let kind = kind_of(c.cmd);
        let input = kind.is_input();
        let flags = c.flags.with_ida(false).with_mida(false);
        let skips = input && c.flags.skp();
        // (No data chaining here: a NOOP is always one.)
        if c.count == 0 || c.cmd == command::NOOP || skips {
            if c.count != 0 && !skips {
                self.check_noop(addr, c).ok()?;
            }
            return Some(Ccw1 {
                cmd: c.cmd,
                flags,
                count: c.count,
                cda: 0,
            });
        }
        let backward = kind == CommandKind::ReadBackward;
        let acc = access(input);
        let first = self.idaws.len();
        let mut flags = flags;
        if !c.flags.ida() && !c.flags.mida() {
            let piece = self.direct_piece(addr, c, backward).ok()?;
            self.push_run(&piece, backward, acc);
            push_idaws(&mut self.idaws, &piece, self.host_block, backward);
        } else if let Some(piece) = self.one_idaw_piece(c, backward) {
            self.push_run(&piece, backward, acc);
            push_idaws(&mut self.idaws, &piece, self.host_block, backward);
        } else {
            let g = GuestCcw {
                addr,
                ccw: *c,
                cmd: c.cmd,
                data_chained: false,
                speculative: false,
                trap: false,
                unfetched: false,
            };
            // (Fresh inline storage: cheaper than moving a kept one in and out.)
            let mut pieces = Scratch::default();
            // One run unless the list's blocks do not join (or skip flags differ): then the
            // general passes expand it.
            let ok = self.pieces(&g, backward, &mut pieces).is_ok()
                && single_run(&pieces, self.host_block, backward, input);
            // Input the MIDAWs skip: no data moves, nothing is pinned.
            let skip = ok && input && pieces[0].skip;
            if ok && !skip {
                for p in pieces.iter() {
                    self.push_run(p, backward, acc);
                    push_idaws(&mut self.idaws, p, self.host_block, backward);
                }
            }
            if !ok {
                return None;
            }
            if skip {
                flags = flags.with_skp(true);
                return Some(Ccw1 {
                    cmd: c.cmd,
                    flags,
                    count: c.count,
                    cda: 0,
                });
            }
        }
        Some(Ccw1 {
            cmd: c.cmd,
            flags: flags.with_ida(true),
            count: c.count,
            cda: idaw_base.wrapping_add(first as u32 * 8),
        })
    }

    /// The one piece of an IDA CCW whose first IDAW covers its count (the common one-IDAW
    /// IDAL), as [`Builder::pieces`] finds it; `None` for anything else (then `pieces`
    /// decides, errors included).
    #[inline]
    fn one_idaw_piece(&mut self, c: &Ccw1, backward: bool) -> Option<Piece> {
        let fmt = self.guest_fmt;
        let list = one_idaw_list(c, fmt, self.orb.ctl.format1())?;
        let key = self.orb.ctl.key();
        let idaw = if fmt.idaw_size() == 4 {
            Idaw(u32::from_be_bytes(self.lists.get::<4>(self.store, list, key).ok()?) as u64)
        } else {
            Idaw(u64::from_be_bytes(
                self.lists.get::<8>(self.store, list, key).ok()?,
            ))
        };
        one_idaw_piece_of(c, fmt, backward, idaw)
    }

    /// Records the guest pages a piece touches as a run of pages, joined to the last run when
    /// it continues it (or its last page) with the same access (sequential programs make one
    /// run; a page in a run is pinned once, as the page list would pin it).
    #[inline(always)]
    fn push_run(&mut self, p: &Piece, backward: bool, acc: u8) {
        push_run_to(&mut self.runs, p, backward, acc);
    }

    /// Pins the pages of `runs` as [`Builder::pin_pages`] would pin them as a page list:
    /// ascending, disjoint runs directly (at most 512 pages a call), anything else through
    /// the page list.
    fn pin_runs(&mut self) -> Result<(), E> {
        let mut runs = std::mem::take(&mut self.runs);
        if !runs.windows(2).all(|w| w[0].1 < w[1].0) {
            // Out of order (a chain's second segment reading its parameters from the page
            // the first one did): the runs sorted and joined are the page list's runs,
            // unless runs with different access share a page.
            match sorted_runs(&runs) {
                Some(r) => runs = r,
                None => {
                    let mut pages = Vec::new();
                    for &(first, last, acc) in runs.iter() {
                        let (a, b) = (first >> PAGE_SHIFT, last >> PAGE_SHIFT);
                        pages.extend((a..=b).map(|n| (n << PAGE_SHIFT, acc)));
                    }
                    return self.pin_pages(pages, 0);
                }
            }
        }
        let calls = pin_calls(&runs);
        let Some(&(head, _, _)) = calls.first() else {
            // No data: nothing to pin.
            return Ok(());
        };
        let pinned = self
            .store
            .pin_runs(&calls)
            .map_err(|e| pin_error(e, head, 0))?;
        for (iova, host, n, _) in pinned.runs() {
            add_run_to_extents(&mut self.extents, iova, host, n);
        }
        self.pins.push(pinned);
        Ok(())
    }

    /// Pins `n` pages from `first` for access `acc` (1 fetch, 2 store) and records them.
    fn pin_run(&mut self, first: u64, n: usize, acc: u8, at: u64) -> Result<(), E> {
        let perm = Perm {
            read: acc & 1 != 0,
            write: acc & 2 != 0,
        };
        let pinned = self
            .store
            .pin(first, n, perm)
            .map_err(|e| pin_error(e, first, at))?;
        for (iova, host, n, _) in pinned.runs() {
            add_run_to_extents(&mut self.extents, iova, host, n);
        }
        self.pins.push(pinned);
        Ok(())
    }

    /// Guest -> host for every IDAW, through the pinned pages sorted by guest address. IDAWs
    /// mostly follow each other page by page, so the page after the last one found is tried
    /// before a binary search.
    fn idaws_to_host(&mut self) -> Result<(), E> {
        // The extents recorded while pinning serve when they are ascending and disjoint
        // (pages pinned in order, each once); else they are rebuilt from the sorted pages.
        let rebuilt: Extents;
        let ext: &[(u64, u64, u64)] = if self.extents.windows(2).all(|w| w[0].1 < w[1].0) {
            &self.extents
        } else {
            // From the runs (a pin's own page list would cost allocations per pin).
            let mut pages: Vec<(u64, u64)> =
                Vec::with_capacity(self.pins.iter().map(|p| p.len()).sum());
            for (iova, host, n, _) in self.pins.iter().flat_map(|p| p.runs()) {
                pages.extend((0..n).map(|k| (iova + k * PAGE_SIZE, host + k * PAGE_SIZE)));
            }
            pages.sort_unstable_by_key(|p| p.0);
            let mut v = Extents::default();
            for &(iova, host) in &pages {
                add_to_extents(&mut v, iova, host);
            }
            rebuilt = v;
            &rebuilt
        };
        idaws_through(&mut self.idaws, ext)
    }

    /// A TIC: its target is a slot of some segment (the walk fetched it).
    fn tic(&self, g: &GuestCcw, segments: &[Segment], heads: &[usize]) -> Result<HostCcw, E> {
        let target = g.ccw.cda as u64;
        let (si, ci) = find_in(segments, target).ok_or(E::CcwAddress(target))?;
        let t = &segments[si].ccws[ci];
        if !t.trap && is_tic(&t.ccw) {
            return Err(E::TicToTic(g.addr));
        }
        if t.unfetched {
            // A channel reports a CCW address a TIC leads to that cannot be fetched at the
            // TIC (CPA = TIC + 8, count 0), not at the target: the TIC's slot is the trap.
            return Ok(HostCcw {
                ccw: Ccw1::default(),
                cda: Cda::Fixed(0),
                guest: g.addr,
                residual_extra: 0,
            });
        }
        Ok(HostCcw {
            ccw: Ccw1 {
                cmd: command::TIC,
                flags: CcwFlags::new(),
                count: 0,
                cda: 0,
            },
            // Through the slot: if it was expanded out of line, straight to the expansion.
            cda: Cda::Slot(heads[si] + ci),
            guest: g.addr,
            residual_extra: 0,
        })
    }

    /// A command CCW (or a data-chained continuation): pins and describes its data.
    /// `slot` is this CCW's host index, `seg_end` the end of its segment's slots and `total`
    /// the number of slots (expansions follow them).
    fn data_ccw(
        &mut self,
        g: &GuestCcw,
        slot: usize,
        seg_end: usize,
        total: usize,
    ) -> Result<HostCcw, E> {
        let c = g.ccw;
        let cmd = g.cmd;
        let kind = kind_of(cmd);
        let input = kind.is_input();
        let flags = c.flags.with_ida(false).with_mida(false);
        let no_data = c.count == 0
            || (cmd == command::NOOP && !g.data_chained && !c.flags.cd())
            || (input && c.flags.skp());
        if no_data {
            if c.count != 0 && !(input && c.flags.skp()) {
                self.check_noop(g.addr, &c)?;
            }
            return Ok(HostCcw {
                ccw: Ccw1 {
                    cmd: c.cmd,
                    flags,
                    count: c.count,
                    cda: 0,
                },
                cda: Cda::Fixed(0),
                guest: g.addr,
                residual_extra: 0,
            });
        }
        let backward = kind == CommandKind::ReadBackward;
        if !c.flags.ida() && !c.flags.mida() {
            // Direct data: one piece, which one IDAL always describes (no skip: a skipping
            // input CCW moves no data, handled above).
            let piece = self.direct_piece(g.addr, &c, backward)?;
            let first = self.idal(std::slice::from_ref(&piece), backward, g, input)?;
            return Ok(HostCcw {
                ccw: Ccw1 {
                    cmd: c.cmd,
                    flags: flags.with_ida(true),
                    count: c.count,
                    cda: 0,
                },
                cda: Cda::Idal(first),
                guest: g.addr,
                residual_extra: 0,
            });
        }
        let mut pieces = Scratch::default();
        self.pieces(g, backward, &mut pieces)?;
        self.describe(g, c, flags, &pieces, backward, input, slot, seg_end, total)
    }

    /// The host CCW(s) for a data CCW whose storage is `pieces`.
    #[allow(clippy::too_many_arguments)]
    fn describe(
        &mut self,
        g: &GuestCcw,
        c: Ccw1,
        mut flags: CcwFlags,
        pieces: &[Piece],
        backward: bool,
        input: bool,
        slot: usize,
        seg_end: usize,
        total: usize,
    ) -> Result<HostCcw, E> {
        // The common case, one run a single IDAL expresses, without building run lists.
        if single_run(pieces, self.host_block, backward, input) {
            let skip = input && pieces[0].skip;
            let cda = if skip {
                flags = flags.with_skp(true);
                Cda::Fixed(0)
            } else {
                flags = flags.with_ida(true);
                Cda::Idal(self.idal(pieces, backward, g, input)?)
            };
            return Ok(HostCcw {
                ccw: Ccw1 {
                    cmd: c.cmd,
                    flags,
                    count: c.count,
                    cda: 0,
                },
                cda,
                guest: g.addr,
                residual_extra: 0,
            });
        }
        // Out of line: slot = TIC to data-chained IDA CCWs (+ TIC back when chaining on).
        let runs = split_runs(pieces, self.host_block, backward, input);
        let first_exp = total + self.expansions.len();
        let counts: Vec<u32> = runs
            .iter()
            .map(|(_, ps)| ps.iter().map(|p| p.len).sum())
            .collect();
        let mut rest: u32 = counts.iter().sum();
        for (i, (skip, ps)) in runs.iter().enumerate() {
            let last = i + 1 == runs.len();
            rest -= counts[i];
            let mut f = c
                .flags
                .with_ida(false)
                .with_mida(false)
                .with_skp(*skip)
                .with_cd(!last || c.flags.cd())
                .with_cc(last && c.flags.cc());
            if i > 0 {
                f = f.with_pci(false).with_s(false);
            }
            let cda = if *skip && input {
                Cda::Fixed(0)
            } else {
                f = f.with_ida(true);
                Cda::Idal(self.idal(ps, backward, g, input)?)
            };
            self.expansions.push(HostCcw {
                ccw: Ccw1 {
                    cmd: c.cmd,
                    flags: f,
                    count: counts[i] as u16,
                    cda: 0,
                },
                cda,
                guest: g.addr,
                residual_extra: rest,
            });
        }
        if c.flags.cc() || c.flags.cd() {
            // Back to the next slot; and, for a status-modifier skip from the expanded
            // command, a second TIC to the slot after that.
            let tic = |cda| HostCcw {
                ccw: Ccw1 {
                    cmd: command::TIC,
                    ..Default::default()
                },
                cda,
                guest: g.addr,
                residual_extra: 0,
            };
            self.expansions.push(tic(Cda::Slot(slot + 1)));
            if c.flags.cc() && !c.flags.cd() && slot + 2 < seg_end {
                self.expansions.push(tic(Cda::Slot(slot + 2)));
            }
        }
        Ok(HostCcw {
            ccw: Ccw1 {
                cmd: command::TIC,
                flags: CcwFlags::new(),
                count: 0,
                cda: 0,
            },
            cda: Cda::Ccw(first_exp),
            guest: g.addr,
            residual_extra: 0,
        })
    }

    /// A NOOP moves nothing, but a channel still checks its data (or list) address against
    /// the format's limit before starting it.
    fn check_noop(&self, at: u64, c: &Ccw1) -> Result<(), E> {
        let limit: u64 = if self.orb.ctl.format1() {
            0x7fff_ffff
        } else {
            0x00ff_ffff
        };
        let a = c.cda as u64;
        if c.flags.ida() || c.flags.mida() {
            let align = if c.flags.ida() {
                self.guest_fmt.idaw_size()
            } else {
                MIDAW_SIZE
            };
            if a % align != 0 || a > limit {
                return Err(E::ListAddress(at));
            }
        } else if a + c.count as u64 - 1 > limit {
            return Err(E::DataAddress(at));
        }
        Ok(())
    }

    /// The storage of a direct-addressed data CCW (count not zero), within the format's
    /// addressing limit.
    fn direct_piece(&self, at: u64, c: &Ccw1, backward: bool) -> Result<Piece, E> {
        direct_piece(self.orb.ctl.format1(), at, c, backward)
    }

    /// The guest storage a data CCW designates, in transfer order.
    fn pieces(&mut self, g: &GuestCcw, backward: bool, pieces: &mut Scratch) -> Result<(), E> {
        let c = g.ccw;
        let count = c.count as u64;
        let fmt1 = self.orb.ctl.format1();
        if c.flags.mida() {
            return self.midaw_pieces(g, backward, pieces);
        }
        if !c.flags.ida() {
            pieces.push(self.direct_piece(g.addr, &c, backward)?);
            return Ok(());
        }
        // IDA: the IDAL address is 31-bit and aligned to the IDAW size.
        let fmt = self.guest_fmt;
        let list = c.cda as u64;
        if list & (fmt.idaw_size() - 1) != 0 || list > 0x7fff_ffff || (!fmt1 && list > 0xff_ffff) {
            return Err(E::ListAddress(g.addr));
        }
        // Block sizes are powers of two: offsets by mask.
        let bs = fmt.block_size();
        let mask = bs - 1;
        let size = fmt.idaw_size();
        let key = self.orb.ctl.key();
        let first_len = |a: u64| {
            if backward {
                (a & mask) + 1
            } else {
                bs - (a & mask)
            }
        };
        let mut rest = count;
        let mut i = 0u64;
        while rest > 0 {
            let at = list + i * size;
            // Each IDAW is read exactly once; the value used is the value checked.
            let idaw = if size == 4 {
                Idaw(u32::from_be_bytes(self.lists.get::<4>(self.store, at, key)?) as u64)
            } else {
                Idaw(u64::from_be_bytes(
                    self.lists.get::<8>(self.store, at, key)?,
                ))
            };
            if !idaw.is_valid(fmt) {
                return Err(E::Idaw(g.addr, idaw.0));
            }
            let boundary_ok = if backward {
                idaw.0 & mask == mask
            } else {
                idaw.0 & mask == 0
            };
            if i > 0 && !boundary_ok {
                return Err(E::Idaw(g.addr, idaw.0));
            }
            let len = first_len(idaw.0).min(rest);
            pieces.push(Piece {
                addr: idaw.0,
                len: len as u32,
                skip: false,
            });
            rest -= len;
            i += 1;
        }
        Ok(())
    }

    fn midaw_pieces(
        &mut self,
        g: &GuestCcw,
        backward: bool,
        pieces: &mut Scratch,
    ) -> Result<(), E> {
        let list = g.ccw.cda as u64;
        if list % MIDAW_SIZE != 0 || list > 0x7fff_ffff {
            return Err(E::ListAddress(g.addr));
        }
        let count = g.ccw.count as u64;
        let mut sum = 0u64;
        let key = self.orb.ctl.key();
        let mut at = list;
        loop {
            let m = Midaw::from_bytes(self.lists.get::<16>(self.store, at, key)?);
            if !m.reserved_ok() {
                return Err(E::Midaw(g.addr, "reserved bits set"));
            }
            // The channel does not do data-transfer interruptions: DTIC is a program check.
            if m.flags.dtic() {
                return Err(E::Midaw(g.addr, "DTIC flag set"));
            }
            if m.count == 0 {
                return Err(E::Midaw(g.addr, "count zero"));
            }
            let len = m.count as u64;
            let crosses = if backward {
                m.data % PAGE_SIZE + 1 < len
            } else {
                m.data % PAGE_SIZE + len > PAGE_SIZE
            };
            if crosses {
                return Err(E::Midaw(g.addr, "crosses a page boundary"));
            }
            sum += len;
            if sum > count {
                return Err(E::Midaw(g.addr, "counts exceed the CCW count"));
            }
            pieces.push(Piece {
                addr: m.data,
                len: m.count as u32,
                skip: m.flags.skip(),
            });
            if m.flags.last() {
                break;
            }
            if sum == count {
                return Err(E::Midaw(
                    g.addr,
                    "CCW count exhausted before the last MIDAW",
                ));
            }
            at += MIDAW_SIZE;
            // A MIDAL may not run into another page after its first MIDAW (Hercules).
            if at % PAGE_SIZE == 0 {
                return Err(E::Midaw(g.addr, "list crosses a page boundary"));
            }
        }
        if sum != count {
            return Err(E::Midaw(g.addr, "counts short of the CCW count"));
        }
        Ok(())
    }

    /// Appends the IDAL for `pieces` (in guest addresses, converted once everything is
    /// pinned) and returns its first IDAW index. Pages of a speculative CCW are pinned now, so
    /// that a failure can still turn the CCW into a trap; the others are pinned in one batch.
    fn idal(
        &mut self,
        pieces: &[Piece],
        backward: bool,
        g: &GuestCcw,
        input: bool,
    ) -> Result<usize, E> {
        let acc = access(input);
        if g.speculative {
            let mut pages = Vec::new();
            push_pages(&mut pages, pieces, backward, acc);
            self.pin_pages(pages, g.addr)?;
        } else {
            push_pages(&mut self.wanted, pieces, backward, acc);
        }
        let first = self.idaws.len();
        for p in pieces {
            push_idaws(&mut self.idaws, p, self.host_block, backward);
        }
        Ok(first)
    }

    /// Pins `pages` (guest page, access bits): sorted, merged, and pinned in runs of
    /// contiguous pages with the same access, at most 512 pages a call.
    fn pin_pages(&mut self, mut pages: Vec<(u64, u8)>, at: u64) -> Result<(), E> {
        // Sequential programs already list their pages in order, each once.
        if !pages.windows(2).all(|w| w[0].0 < w[1].0) {
            // Mostly a few ascending stretches (a chain's second segment reading its
            // parameters from the page the first one did): sort those, not every page.
            let mut runs: InlineVec<(u64, u64, u8), 4> = InlineVec::default();
            for &(page, acc) in &pages {
                match runs.last_mut() {
                    Some(r) if r.2 == acc && page >= r.1 && page - r.1 <= PAGE_SIZE => r.1 = page,
                    _ => runs.push((page, page, acc)),
                }
            }
            if let Some(runs) = sorted_runs(&runs) {
                for &(first, last, acc) in runs.iter() {
                    let mut page = first;
                    let mut left = ((last - first) >> PAGE_SHIFT) + 1;
                    loop {
                        let n = left.min(MAX_PIN_PAGES as u64);
                        self.pin_run(page, n as usize, acc, at)?;
                        left -= n;
                        if left == 0 {
                            break;
                        }
                        page += n << PAGE_SHIFT;
                    }
                }
                return Ok(());
            }
            pages.sort_unstable();
            // One entry per page; a page needed for input and output is pinned for both.
            pages.dedup_by(|b, a| {
                let same = a.0 == b.0;
                if same {
                    a.1 |= b.1;
                }
                same
            });
        }
        let mut i = 0;
        while i < pages.len() {
            let (first, acc) = pages[i];
            let mut j = i + 1;
            while j < pages.len()
                && j - i < MAX_PIN_PAGES
                && pages[j] == (pages[j - 1].0 + PAGE_SIZE, acc)
            {
                j += 1;
            }
            self.pin_run(first, j - i, acc, at)?;
            i = j;
        }
        Ok(())
    }

    fn layout(self, segments: Vec<Segment>, heads: Vec<usize>) -> Result<HostProgram, E> {
        let Builder {
            orb,
            cfg,
            host_block,
            mut ccws,
            expansions,
            idaws,
            pins,
            ..
        } = self;
        let nslots = ccws.len();
        ccws.extend(expansions);
        let ccw_bytes = ccws.len() * CCW_SIZE as usize;
        let size = ccw_bytes + idaws.len() * 8;
        if size as u64 > cfg.arena_size as u64 {
            return Err(E::ArenaFull);
        }
        let base = cfg.arena_base;
        let ccw_addr = |i: usize| base + (i * CCW_SIZE as usize) as u32;
        let idaw_addr = |i: usize| base + (ccw_bytes + i * 8) as u32;
        let mut image = vec![0u8; size];
        let (ccw_area, idaw_area) = image.split_at_mut(ccw_bytes);
        for (dst, h) in ccw_area.chunks_exact_mut(CCW_SIZE as usize).zip(&ccws) {
            let mut c = h.ccw;
            c.cda = match h.cda {
                Cda::Fixed(a) => a,
                Cda::Idal(k) => idaw_addr(k),
                Cda::Ccw(k) => ccw_addr(k),
                Cda::Slot(k) => ccw_addr(resolve_slot(&ccws[..nslots], k)),
            };
            dst.copy_from_slice(&c.to_bytes());
        }
        for (dst, w) in idaw_area.chunks_exact_mut(8).zip(idaws.iter()) {
            dst.copy_from_slice(&Idaw(*w).to_format2_bytes());
        }
        let mut runs = Vec::new();
        for (i, h) in ccws.iter().enumerate() {
            Origin::push(&mut runs, ccw_addr(i), h.guest as u32, h.residual_extra);
        }
        let origins = Origins::from(runs);
        let host_orb = host_orb(orb, host_block, ccw_addr(heads[0]));
        let seg_info = segments
            .iter()
            .zip(&heads)
            .map(|(s, &h)| SegmentInfo {
                guest: s.head,
                host: ccw_addr(h),
                len: s.ccws.len(),
            })
            .collect();
        Ok(HostProgram {
            orb: host_orb,
            guest_orb: *orb,
            base,
            image,
            ccw_bytes,
            segments: Segments::Many(seg_info),
            mapper: ScswMapper {
                host_cpa: host_orb.cpa,
                guest_orb: *orb,
                origins,
            },
            pages: Default::default(),
            pins,
        })
    }
}

/// Page runs (first page, last page, access bits) sorted, with runs of the same access that
/// overlap or abut joined: the runs of contiguous pages with the same access that
/// [`Builder::pin_pages`] finds in the sorted, deduplicated page list. `None` when runs with
/// different access share a page (the page list gives it both).
fn sorted_runs(runs: &[(u64, u64, u8)]) -> Option<InlineVec<(u64, u64, u8), 4>> {
    let mut sorted = runs.to_vec();
    sorted.sort_unstable();
    let mut out: InlineVec<(u64, u64, u8), 4> = InlineVec::default();
    out.reserve(sorted.len());
    for &(first, last, acc) in &sorted {
        if let Some(m) = out.last_mut() {
            if first <= m.1 {
                if m.2 != acc {
                    return None;
                }
                m.1 = m.1.max(last);
                continue;
            }
            if first - m.1 == PAGE_SIZE && m.2 == acc {
                m.1 = last;
                continue;
            }
        }
        out.push((first, last, acc));
    }
    Some(out)
}

/// Adds a run of `n` pinned pages (contiguous in both spaces) to extents: the run extends the
/// last extent when it continues it in both spaces, else starts one (a repeated page then
/// leaves the extents unordered, and [`Builder::idaws_to_host`] rebuilds them).
#[inline(always)]
fn add_run_to_extents(ext: &mut Extents, iova: u64, host: u64, n: u64) {
    let last = iova + (n - 1) * PAGE_SIZE;
    if let Some(e) = ext.last_mut() {
        if iova > e.1 && iova - e.1 == PAGE_SIZE && host.wrapping_sub(e.2) == iova - e.0 {
            e.1 = last;
            return;
        }
    }
    ext.push((iova, last, host));
}

/// Adds a pinned page to extents (first page, last page, host address of the first): a page
/// that continues the last extent in both spaces extends it, the same page again is skipped.
#[inline(always)]
fn add_to_extents(ext: &mut Extents, iova: u64, host: u64) {
    if let Some(e) = ext.last_mut() {
        if iova == e.1 {
            return;
        }
        if iova > e.1 && iova - e.1 == PAGE_SIZE && host.wrapping_sub(e.2) == iova - e.0 {
            e.1 = iova;
            return;
        }
    }
    ext.push((iova, iova, host));
}

/// The ORB that starts the host program at `cpa`: format 1, format-2 IDAWs of
/// `host_block` bytes, no MIDAWs, the guest's other controls.
fn host_orb(orb: &Orb, host_block: u64, cpa: u32) -> Orb {
    Orb {
        intparm: orb.intparm,
        ctl: orb
            .ctl
            .with_format1(true)
            // Incorrect-length-suppression mode applies to format-1 CCWs only: a
            // format-0 guest program must not gain it by becoming format 1.
            .with_incorrect_length_suppression(
                orb.ctl.format1() && orb.ctl.incorrect_length_suppression(),
            )
            .with_format2_idaw(true)
            .with_idaw_2k(host_block == 2048)
            .with_midaw(false)
            .with_orb_extension(false)
            .with_lpm(if orb.ctl.lpm() == 0 {
                0xff
            } else {
                orb.ctl.lpm()
            }),
        cpa,
    }
}

/// The host CCW a channel should be sent to for slot `k`: through a TIC there, since TIC to
/// TIC is a program check. Guest TIC-to-TIC is refused, so only an expansion TIC can sit behind
/// a guest TIC: the walk is at most two TICs long.
fn resolve_slot(slots: &[HostCcw], mut k: usize) -> usize {
    for _ in 0..2 {
        match slots.get(k) {
            Some(h) if h.ccw.is_tic() => match h.cda {
                Cda::Ccw(t) => return t,
                Cda::Slot(j) => k = j,
                _ => return k,
            },
            _ => return k,
        }
    }
    k
}

/// The trap form of a guest CCW: command code 0 (a program check when reached), keeping the
/// count and PCI flag the guest's channel would present with that program check.
#[inline]
fn trap_of(c: &Ccw1) -> Ccw1 {
    Ccw1 {
        cmd: 0,
        flags: CcwFlags::new().with_pci(c.flags.pci()),
        count: c.count,
        cda: 0,
    }
}

fn trap_ccw(g: &GuestCcw) -> HostCcw {
    HostCcw {
        ccw: trap_of(&g.ccw),
        cda: Cda::Fixed(0),
        guest: g.addr,
        residual_extra: 0,
    }
}

fn pin_error(e: StoreError, page: u64, _at: u64) -> E {
    match e.errno() {
        libc::EPERM => E::Protection(page),
        libc::EBUSY => E::Busy(page),
        _ => E::Unmapped(page),
    }
}

/// Access bits of a data transfer: input stores (2), output fetches (1).
#[inline]
fn access(input: bool) -> u8 {
    if input {
        2
    } else {
        1
    }
}

/// Appends the guest pages `pieces` touch (may repeat), with access bits `acc`.
#[inline]
fn push_pages(out: &mut Vec<(u64, u8)>, pieces: &[Piece], backward: bool, acc: u8) {
    for p in pieces {
        let (lo, hi) = piece_bounds(p, backward);
        // Page numbers, not addresses: the last page of the 64-bit space has no successor
        // address (`page + PAGE_SIZE` would wrap; found by fuzzing).
        let (first, last) = (lo >> PAGE_SHIFT, hi >> PAGE_SHIFT);
        out.push((first << PAGE_SHIFT, acc));
        if last > first {
            out.extend((first + 1..=last).map(|n| (n << PAGE_SHIFT, acc)));
        }
    }
}

/// log2 of [`PAGE_SIZE`].
const PAGE_SHIFT: u32 = PAGE_SIZE.trailing_zeros();

/// The storage of a direct-addressed data CCW at `at` (count not zero), within the
/// addressing limit of its format (`fmt1`).
#[inline]
fn direct_piece(fmt1: bool, at: u64, c: &Ccw1, backward: bool) -> Result<Piece, E> {
    let count = c.count as u64;
    let limit: u64 = if fmt1 { 0x7fff_ffff } else { 0x00ff_ffff };
    let a = c.cda as u64;
    let ok = if backward {
        a <= limit && a + 1 >= count
    } else {
        a <= limit && a + count - 1 <= limit
    };
    if !ok {
        return Err(E::DataAddress(at));
    }
    Ok(Piece {
        addr: a,
        len: c.count as u32,
        skip: false,
    })
}

/// The IDAL address of an IDA CCW whose list [`Builder::pieces`] could read without an
/// error of its own (aligned, addressable); `None` for anything else.
#[inline]
fn one_idaw_list(c: &Ccw1, fmt: IdawFormat, fmt1: bool) -> Option<u64> {
    let list = c.cda as u64;
    let bad = !c.flags.ida()
        || list & (fmt.idaw_size() - 1) != 0
        || list > 0x7fff_ffff
        || (!fmt1 && list > 0xff_ffff);
    (!bad).then_some(list)
}

/// The one piece of an IDA CCW whose first IDAW, `idaw`, covers its count (the common
/// one-IDAW IDAL), as [`Builder::pieces`] finds it; `None` for anything else.
#[inline]
fn one_idaw_piece_of(c: &Ccw1, fmt: IdawFormat, backward: bool, idaw: Idaw) -> Option<Piece> {
    if !idaw.is_valid(fmt) {
        return None;
    }
    let mask = fmt.block_size() - 1;
    let first_len = if backward {
        (idaw.0 & mask) + 1
    } else {
        fmt.block_size() - (idaw.0 & mask)
    };
    let count = c.count as u64;
    (count <= first_len).then_some(Piece {
        addr: idaw.0,
        len: c.count as u32,
        skip: false,
    })
}

/// Records the guest pages a piece touches as a run of pages, joined to the last run when
/// it continues it (or its last page) with the same access (sequential programs make one
/// run; a page in a run is pinned once, as the page list would pin it).
#[inline(always)]
fn push_run_to(runs: &mut InlineVec<(u64, u64, u8), 4>, p: &Piece, backward: bool, acc: u8) {
    let (lo, hi) = piece_bounds(p, backward);
    let (first, last) = (lo & !(PAGE_SIZE - 1), hi & !(PAGE_SIZE - 1));
    if let Some(r) = runs.last_mut() {
        // (The same page again, or the next one.)
        if r.2 == acc && first >= r.1 && first - r.1 <= PAGE_SIZE {
            r.1 = last;
            return;
        }
    }
    runs.push((first, last, acc));
}

/// The pin calls for ascending, disjoint page runs: every run in one pin call (one snapshot
/// lookup per mapping, one value to keep), each run as its own calls of at most 512 pages
/// would pin it.
#[inline]
fn pin_calls(runs: &[(u64, u64, u8)]) -> InlineVec<(u64, u64, Perm), 4> {
    let mut calls: InlineVec<(u64, u64, Perm), 4> = InlineVec::default();
    for &(first, last, acc) in runs.iter() {
        let perm = Perm {
            read: acc & 1 != 0,
            write: acc & 2 != 0,
        };
        let mut page = first;
        let mut left = ((last - first) >> PAGE_SHIFT) + 1;
        while left > 0 {
            let n = left.min(MAX_PIN_PAGES as u64);
            calls.push((page, n, perm));
            left -= n;
            if left > 0 {
                page += n << PAGE_SHIFT;
            }
        }
    }
    calls
}

/// Guest -> host for every IDAW, through pinned extents ascending and disjoint. IDAWs
/// mostly follow each other page by page, so the extent of the last one found is tried
/// before a binary search.
#[inline]
fn idaws_through(idaws: &mut [u64], ext: &[(u64, u64, u64)]) -> Result<(), E> {
    let mut cur = 0usize;
    for w in idaws.iter_mut() {
        let page = *w & !(PAGE_SIZE - 1);
        let hit = |e: &(u64, u64, u64)| e.0 <= page && page <= e.1;
        if !ext.get(cur).is_some_and(hit) {
            cur = ext.partition_point(|e| e.1 < page);
            // Every IDAW's page was pinned; never build an IDAW from a guess.
            if !ext.get(cur).is_some_and(hit) {
                return Err(E::Unmapped(page));
            }
        }
        let e = ext[cur];
        *w = e.2 + (*w - e.0);
    }
    Ok(())
}

/// Lowest and highest byte of a piece (in transfer order `addr` is the first byte: the
/// highest for read backward). The walk and the data checks keep pieces inside the space.
#[inline]
fn piece_bounds(p: &Piece, backward: bool) -> (u64, u64) {
    let len = p.len as u64;
    if backward {
        (p.addr + 1 - len, p.addr)
    } else {
        (p.addr, p.addr + len - 1)
    }
}

/// Appends one IDAW per `bs`-byte block (a power of two) the piece touches: the first byte
/// transferred in that block (the piece's first byte, then each block's first byte, or its
/// last byte going backward), as guest addresses.
#[inline(always)]
fn push_idaws<const N: usize>(out: &mut InlineVec<u64, N>, p: &Piece, bs: u64, backward: bool) {
    let (lo, hi) = piece_bounds(p, backward);
    let shift = bs.trailing_zeros();
    let (first, last) = (lo >> shift, hi >> shift);
    out.push(p.addr);
    if last > first {
        if backward {
            out.extend((first..last).rev().map(|b| (b << shift) + (bs - 1)));
        } else {
            out.extend((first + 1..=last).map(|b| b << shift));
        }
    }
}

/// Whether `p` continues `prev` within one IDAL: contiguous in transfer order, or leaving
/// one block at its boundary and entering another at its boundary.
fn joins(prev: &Piece, p: &Piece, bs: u64, backward: bool) -> bool {
    if backward {
        let prev_low = prev.addr + 1 - prev.len as u64;
        p.addr + 1 == prev_low || (prev_low % bs == 0 && p.addr % bs == bs - 1)
    } else {
        let prev_end = prev.addr + prev.len as u64;
        p.addr == prev_end || (prev_end % bs == 0 && p.addr % bs == 0)
    }
}

/// Whether all of `pieces` form one run (see [`split_runs`]).
fn single_run(pieces: &[Piece], bs: u64, backward: bool, input: bool) -> bool {
    pieces
        .windows(2)
        .all(|w| (!input || w[0].skip == w[1].skip) && joins(&w[0], &w[1], bs, backward))
}

/// Splits pieces into runs that one IDAL with `bs`-byte blocks can describe (and that share
/// a skip flag, which only matters for input).
fn split_runs(pieces: &[Piece], bs: u64, backward: bool, input: bool) -> Vec<(bool, Vec<Piece>)> {
    let mut runs: Vec<(bool, Vec<Piece>)> = Vec::new();
    for p in pieces {
        let skip = input && p.skip;
        if let Some((rskip, rp)) = runs.last_mut() {
            let prev = rp.last().expect("runs are never empty");
            if *rskip == skip && joins(prev, p, bs, backward) {
                rp.push(*p);
                continue;
            }
        }
        runs.push((skip, vec![*p]));
    }
    runs
}

/// Extents of pinned pages: (first page, last page, host address of the first).
type Extents = InlineVec<(u64, u64, u64), 4>;

/// A CCW's storage pieces.
type Scratch = InlineVec<Piece, 4>;

/// A list whose first `N` elements live inline: the few pages, runs and IDAWs of a small
/// program cost no allocation. Past `N` every element moves to the heap.
#[derive(Clone)]
struct InlineVec<T: Copy + Default, const N: usize> {
    /// Elements inline (only while `heap` is empty).
    len: usize,
    inline: [T; N],
    heap: Vec<T>,
}

impl<T: Copy + Default, const N: usize> Default for InlineVec<T, N> {
    fn default() -> Self {
        InlineVec {
            len: 0,
            inline: [T::default(); N],
            heap: Vec::new(),
        }
    }
}

impl<T: Copy + Default, const N: usize> InlineVec<T, N> {
    #[inline]
    fn push(&mut self, v: T) {
        if self.heap.capacity() != 0 {
            self.heap.push(v);
        } else if self.len < N {
            self.inline[self.len] = v;
            self.len += 1;
        } else {
            self.spill(1);
            self.heap.push(v);
        }
    }

    /// Moves the inline elements to the heap with room for `more`.
    #[cold]
    fn spill(&mut self, more: usize) {
        if self.heap.capacity() == 0 {
            self.heap.reserve((2 * N).max(self.len + more));
            self.heap.extend_from_slice(&self.inline[..self.len]);
            self.len = 0;
        } else {
            self.heap.reserve(more);
        }
    }

    /// Room for `more` elements without reallocating.
    #[inline]
    fn reserve(&mut self, more: usize) {
        if self.heap.capacity() != 0 || self.len + more > N {
            self.spill(more);
        }
    }

    #[inline]
    fn extend(&mut self, it: impl IntoIterator<Item = T>) {
        let mut it = it.into_iter();
        while self.heap.capacity() == 0 {
            match it.next() {
                Some(v) => self.push(v),
                None => return,
            }
        }
        self.heap.extend(it);
    }
}

impl<T: Copy + Default, const N: usize> std::ops::Deref for InlineVec<T, N> {
    type Target = [T];
    #[inline]
    fn deref(&self) -> &[T] {
        if self.heap.capacity() == 0 {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }
}

impl<T: Copy + Default, const N: usize> std::ops::DerefMut for InlineVec<T, N> {
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        if self.heap.capacity() == 0 {
            &mut self.inline[..self.len]
        } else {
            &mut self.heap
        }
    }
}

/// The fast path against the general passes: for programs of every shape (most of them
/// simple), the same result, byte for byte, or the same error.
#[cfg(test)]
mod fast_path {
    use super::*;
    use crate::ccw::MidawFlags;
    use crate::iommu_store::{Backing, StoreConfig};
    use crate::orb::OrbControls;
    use proptest::prelude::*;

    const MEM: u64 = 0x4_0000;
    const PROG: u64 = 0x1000;
    const LISTS: u64 = 0x8000;

    /// A store with `MEM` bytes of guest memory mapped at 0.
    fn mem_store() -> IommuStore {
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0, MEM, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        store
    }

    fn same(a: &Result<HostProgram, E>, b: &Result<HostProgram, E>) -> Result<(), String> {
        match (a, b) {
            (Err(x), Err(y)) if x == y => Ok(()),
            (Ok(x), Ok(y)) => {
                let ok = x.orb == y.orb
                    && x.guest_orb == y.guest_orb
                    && x.base == y.base
                    && x.image == y.image
                    && x.ccw_bytes == y.ccw_bytes
                    && x.segments() == y.segments()
                    && x.pages() == y.pages()
                    && x.mapper.host_cpa == y.mapper.host_cpa
                    && x.mapper.origins.as_slice() == y.mapper.origins.as_slice()
                    && x.pin_count() == y.pin_count();
                if ok {
                    Ok(())
                } else {
                    Err(format!("fast:\n{x}\ngeneral:\n{y}"))
                }
            }
            _ => Err(format!(
                "fast: {:?}\ngeneral: {:?}",
                a.as_ref().err(),
                b.as_ref().err()
            )),
        }
    }

    /// One CCW: command, flags, count, data address choice.
    fn ccw() -> impl Strategy<Value = (u8, u8, u16, u32)> {
        let cmd = prop_oneof![
            8 => Just(0x02u8),
            4 => Just(0x01),
            1 => Just(0x03),
            1 => Just(0x04),
            1 => Just(0x0c),
            1 => Just(0x07),
            1 => Just(0x08),
            1 => Just(0x00),
            1 => any::<u8>(),
        ];
        // Mostly command chaining; sometimes anything.
        let flags = prop_oneof![
            12 => Just(0x40u8),
            4 => Just(0x44),
            3 => Just(0x41),
            1 => Just(0x60),
            1 => Just(0x50),
            1 => Just(0x48),
            1 => Just(0x00),
            1 => any::<u8>(),
        ];
        let count = prop_oneof![
            1 => Just(0u16),
            1 => Just(1),
            2 => Just(100),
            2 => Just(2048),
            4 => Just(4096),
            2 => Just(5000),
            1 => any::<u16>(),
        ];
        let cda = prop_oneof![
            4 => 0x1_0000u32..0x3_0000,
            2 => (0u32..0x40).prop_map(|i| 0x1_0000 + i * 0x1000),
            1 => (0u32..0x100).prop_map(|i| LISTS as u32 + i * 8),
            1 => any::<u32>(),
            1 => Just(0x3_ff00u32),
        ];
        (cmd, flags, count, cda)
    }

    #[allow(clippy::type_complexity)]
    fn case() -> impl Strategy<
        Value = (
            Vec<(u8, u8, u16, u32)>,
            bool,
            u8,
            u8,
            Vec<u64>,
            Option<(u32, u8)>,
            u32,
        ),
    > {
        (
            prop_oneof![
                proptest::collection::vec(ccw(), 1..6),
                proptest::collection::vec(ccw(), 1..24)
            ],
            prop_oneof![4 => Just(true), 1 => Just(false)],
            0u8..3,
            prop_oneof![3 => Just(0u8), 1 => 0u8..16],
            proptest::collection::vec(
                prop_oneof![
                    (0x10u64..0x3f).prop_map(|p| p << 12),
                    0x1_0000u64..0x3_f000,
                    any::<u64>()
                ],
                0..64,
            ),
            proptest::option::of((0u32..0x30, any::<u8>())),
            prop_oneof![3 => Just(0u32), 1 => 1u32..4],
        )
            .prop_flat_map(|c| (Just(c), any::<bool>()))
            .prop_map(|(mut c, end)| {
                // Mostly end the chain where the program ends.
                if end {
                    if let Some(last) = c.0.last_mut() {
                        last.1 &= !0xc0;
                    }
                }
                c
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn fast_path_matches_the_general_passes(
            (ccws, fmt1, idaw, key, idaws, skey, max) in case()
        ) {
            let store = mem_store();
            let mut list = Vec::new();
            let midal = idaws.len() % 2 == 1;
            let mut prev_end: Option<u64> = None;
            for (i, w) in idaws.iter().enumerate() {
                if midal {
                    // Mostly valid MIDAWs: within a page, some last, some skipping, some
                    // continuing the one before (so that one host IDAL can carry them).
                    let count = 1 + (w >> 32) % 2048;
                    let mut data = 0x1_0000 + (w & 0x1_f000) + (w >> 20) % (4096 - count + 1);
                    if let Some(end) = prev_end.filter(|_| w & 4 != 0) {
                        data = if end % 4096 + count <= 4096 { end } else { (end + 4095) & !4095 };
                    }
                    prev_end = Some(data + count);
                    let m = Midaw {
                        reserved: 0,
                        flags: MidawFlags::from_bits(
                            (if i % 3 == 2 || w & 1 != 0 { 0x80 } else { 0 })
                                | (if w & 0x10 != 0 { 0x40 } else { 0 })
                                | (if w & 0xf00 == 0 { 0x20 } else { 0 }),
                        ),
                        count: count as u16,
                        data,
                    };
                    list.extend(m.to_bytes());
                } else if idaw == 0 {
                    list.extend((*w as u32).to_be_bytes());
                } else {
                    list.extend(w.to_be_bytes());
                }
            }
            store.write(LISTS, &list).unwrap();
            // A MIDA CCW's count: its MIDAL's total (to the last MIDAW), where there is one.
            let midal_total = |cda: u32| -> Option<u16> {
                let at = (cda as u64).checked_sub(LISTS)?;
                if !midal || at % 16 != 0 {
                    return None;
                }
                let mut sum = 0u64;
                for m in list.get(at as usize..)?.chunks_exact(16) {
                    let m = Midaw::from_bytes(m.try_into().unwrap());
                    sum += m.count as u64;
                    if m.flags.last() {
                        return u16::try_from(sum).ok();
                    }
                }
                None
            };
            let mut prog = Vec::new();
            for &(cmd, mut flags, mut count, cda) in &ccws {
                if cmd == 0x08 && cda % 3 != 0 {
                    // Mostly a valid format-1 TIC.
                    (flags, count) = (0, 0);
                }
                // MIDA CCWs mostly designate one of the first MIDAWs.
                let cda = if flags & 1 != 0 && cda % 8 != 0 {
                    LISTS as u32 + (cda % 4) * 16
                } else if cmd == 0x08 && cda % 4 != 0 {
                    // TICs mostly lead into the program (chains of several segments).
                    PROG as u32 + (cda % 32) * 8
                } else {
                    cda
                };
                let count = if flags & 1 != 0 { midal_total(cda).unwrap_or(count) } else { count };
                if fmt1 {
                    prog.extend(Ccw1 { cmd, flags: CcwFlags::from_bits(flags), count, cda }.to_bytes());
                } else {
                    prog.extend(Ccw0 {
                        cmd,
                        cda: cda & 0xff_ffff,
                        flags: CcwFlags::from_bits(flags),
                        count,
                    }.to_bytes());
                }
            }
            store.write(PROG, &prog).unwrap();
            if let Some((page, k)) = skey {
                store.set_storage_key((0x10 + page as u64) << 12, k & 0xfe).unwrap();
            }
            let ctl = OrbControls::new()
                .with_format1(fmt1)
                .with_format2_idaw(idaw != 0)
                .with_idaw_2k(idaw == 2)
                .with_key(key)
                .with_midaw(midal || key == 1)
                .with_suspend(key % 2 == 1);
            let orb = Orb { intparm: 7, ctl, cpa: PROG as u32 };
            let cfg = TranslateConfig {
                max_segment_ccws: [256, 4, 2, 1][max as usize],
                // Now and then a device that never presents status modifier: no slot
                // after the end, on either path.
                status_modifier: if key % 3 == 2 { CommandSet::EMPTY } else { CommandSet::ALL },
                ..TranslateConfig::default()
            };
            let fast = translate_with(&orb, &store, &cfg, true);
            let general = translate_with(&orb, &store, &cfg, false);
            if let Err(e) = same(&fast, &general) {
                prop_assert!(false, "{}", e);
            }
            // Each fast path alone, too (the short one takes the short programs first).
            let simple = translate_in(&orb, &store, &cfg, false, true);
            if let Err(e) = same(&simple, &general) {
                prop_assert!(false, "simple: {}", e);
            }
            if let Some(short) = translate_short(&orb, &store.view(), &cfg) {
                if let Err(e) = same(&Ok(short), &general) {
                    prop_assert!(false, "short: {}", e);
                }
            }
            drop((fast, general, simple));
            prop_assert_eq!(store.stats().pinned_pages, 0);
        }
    }

    /// The short path takes the commonest programs (the 4 KiB DASD read: DE, LR, Read Data
    /// through a one-IDAW IDAL; direct, backward, multi-page, no-data and skipping CCWs) and
    /// leaves every other shape to the other paths; either way the result is the general
    /// passes' one, byte for byte, and nothing stays pinned.
    #[test]
    fn the_short_path_takes_short_chains_only() {
        let store = mem_store();
        let ccw = |cmd, flags: CcwFlags, count, cda| Ccw1 {
            cmd,
            flags,
            count,
            cda,
        };
        let cc = CcwFlags::new().with_cc(true);
        let end = CcwFlags::new();
        // One IDAW into the middle of a page, one crossing into the next page.
        let mut list = Vec::new();
        list.extend(0x1_2000u64.to_be_bytes());
        list.extend(0x1_3800u64.to_be_bytes());
        store.write(LISTS, &list).unwrap();
        let searches = TranslateConfig {
            status_modifier: CommandSet::of(&[0x31, 0x39]),
            ..TranslateConfig::default()
        };
        let orb = |fmt2: bool, i2k: bool| Orb {
            intparm: 3,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_format2_idaw(fmt2)
                .with_idaw_2k(i2k),
            cpa: PROG as u32,
        };
        let dasd = [
            ccw(0x63, cc, 16, 0x1_0000),
            ccw(0x47, cc, 16, 0x1_0010),
            ccw(0x86, end.with_ida(true), 4096, LISTS as u32),
        ];
        let ida = end.with_ida(true);
        // (program, config, ORB: format-2 IDAWs, 2K; the short path takes it)
        type Case<'a> = (Vec<Ccw1>, &'a TranslateConfig, (bool, bool), bool);
        let any = TranslateConfig::default();
        let two = TranslateConfig {
            max_segment_ccws: 2,
            ..searches
        };
        let cases: Vec<Case> = vec![
            (dasd.to_vec(), &searches, (true, false), true),
            // Direct: a read across three pages, a read backward ending in a page.
            (
                vec![ccw(0x02, end, 0x2001, 0x1_0fff)],
                &any,
                (true, false),
                true,
            ),
            (
                vec![ccw(0x0c, end, 0x1800, 0x1_27ff)],
                &any,
                (true, false),
                true,
            ),
            // No data: count 0, and input the skip flag suppresses; then a write.
            (
                vec![
                    ccw(0x03, cc, 0, 0),
                    ccw(0x02, cc.with_skp(true).with_sli(true), 80, 0x1_5000),
                    ccw(0x01, end, 80, 0x1_5000),
                ],
                &searches,
                (true, false),
                true,
            ),
            // Format-1 IDAWs, but no CCW using them.
            (
                vec![ccw(0x02, end, 64, 0x1_6000)],
                &any,
                (false, false),
                true,
            ),
            // A device whose every command may skip: a trap slot after the end.
            (dasd.to_vec(), &any, (true, false), false),
            // 2K IDAWs, even on a CCW without data.
            (
                vec![ccw(0x03, ida, 0, LISTS as u32)],
                &any,
                (true, true),
                false,
            ),
            // An IDAL of two IDAWs; a NOOP with a count; a TIC; data chaining.
            (
                vec![ccw(0x02, ida, 4096, LISTS as u32 + 8)],
                &any,
                (true, false),
                false,
            ),
            (
                vec![ccw(0x03, end, 8, 0x1_5000)],
                &any,
                (true, false),
                false,
            ),
            (
                vec![
                    ccw(0x02, cc, 8, 0x1_5000),
                    ccw(0x08, end, 0, PROG as u32 + 16),
                    ccw(0x02, end, 8, 0x1_5000),
                ],
                &searches,
                (true, false),
                false,
            ),
            (
                vec![
                    ccw(0x02, end.with_cd(true), 8, 0x1_5000),
                    ccw(0x02, end, 8, 0x1_5008),
                ],
                &searches,
                (true, false),
                false,
            ),
            // Nine CCWs; a chain longer than a segment may be.
            (
                (0..9)
                    .map(|i| ccw(0x02, if i < 8 { cc } else { end }, 8, 0x1_5000))
                    .collect(),
                &searches,
                (true, false),
                false,
            ),
            (dasd.to_vec(), &two, (true, false), false),
        ];
        for (i, (prog, cfg, (fmt2, i2k), short)) in cases.iter().enumerate() {
            let bytes: Vec<u8> = prog.iter().flat_map(|c| c.to_bytes()).collect();
            store.write(PROG, &bytes).unwrap();
            let orb = orb(*fmt2, *i2k);
            let general = translate_with(&orb, &store, cfg, false);
            let taken = translate_short(&orb, &store.view(), cfg);
            assert_eq!(taken.is_some(), *short, "case {i}");
            if let Some(p) = taken {
                assert_eq!(
                    p.pin_count(),
                    general.as_ref().unwrap().pin_count(),
                    "case {i}"
                );
                same(&Ok(p), &general).unwrap_or_else(|e| panic!("case {i}: {e}"));
            }
            let fast = translate_with(&orb, &store, cfg, true);
            same(&fast, &general).unwrap_or_else(|e| panic!("case {i}: {e}"));
            drop((fast, general));
            assert_eq!(store.stats().pinned_pages, 0, "case {i}");
        }
        // Format 0 too.
        let bytes: Vec<u8> = dasd
            .iter()
            .flat_map(|c| {
                Ccw0 {
                    cmd: c.cmd,
                    cda: c.cda,
                    flags: c.flags,
                    count: c.count,
                }
                .to_bytes()
            })
            .collect();
        store.write(PROG, &bytes).unwrap();
        let orb0 = Orb {
            ctl: orb(true, false).ctl.with_format1(false),
            ..orb(true, false)
        };
        let p = translate_short(&orb0, &store.view(), &searches).expect("short");
        same(&Ok(p), &translate_with(&orb0, &store, &searches, false)).unwrap();
        assert_eq!(store.stats().pinned_pages, 0);
    }

    /// The fast path does take the common shapes (else the comparison above proves little).
    #[test]
    fn the_slot_after_the_end_only_after_a_command_that_can_skip() {
        // DE, LR, Read (command-chained), then a leftover valid chain of two reads: a
        // status-modifier skip from LR would reach it, so for a device that may end LR
        // that way the general passes translate it (speculatively, its pages pinned); for
        // a device that declares only its searches, LR cannot skip: the fast path, three
        // CCWs, nothing after them fetched or pinned.
        let store = mem_store();
        let c = |cmd, cc: bool, count, cda: u32| {
            Ccw1 {
                cmd,
                flags: CcwFlags::new().with_cc(cc),
                count,
                cda,
            }
            .to_bytes()
        };
        let mut prog = Vec::new();
        prog.extend(c(0x63, true, 16, 0x1_0000));
        prog.extend(c(0x47, true, 16, 0x1_0010));
        prog.extend(c(0x86, false, 4096, 0x1_2000));
        prog.extend(c(0x86, true, 4096, 0x1_3000));
        prog.extend(c(0x86, false, 4096, 0x1_4000));
        store.write(PROG, &prog).unwrap();
        let orb = Orb {
            intparm: 1,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_format2_idaw(true),
            cpa: PROG as u32,
        };
        let any = TranslateConfig::default();
        assert!(walk_simple(&orb, &store.view(), &any).is_none());
        let p = translate(&orb, &store, &any).unwrap();
        // The five, and a trap after the leftover chain's end.
        assert_eq!(p.ccws().count(), 6);
        assert!(p.pages().iter().any(|pg| pg.iova == 0x1_4000));
        drop(p);
        let searches = TranslateConfig {
            status_modifier: CommandSet::of(&[0x31, 0x39]),
            ..TranslateConfig::default()
        };
        let chain = walk_simple(&orb, &store.view(), &searches).expect("simple");
        assert_eq!((chain.ccws.len(), chain.trap), (3, None));
        let p = translate(&orb, &store, &searches).unwrap();
        assert_eq!(p.ccws().count(), 3);
        assert!(p.pages().iter().all(|pg| pg.iova < 0x1_3000));
        // Fast and general agree on it.
        let general = translate_with(&orb, &store, &searches, false).unwrap();
        assert_eq!(general.image(), p.image());
        // After a search (it may skip), the slot is prepared again.
        let mut lr_is_search = prog.clone();
        lr_is_search[8] = 0x31;
        store.write(PROG, &lr_is_search).unwrap();
        assert!(walk_simple(&orb, &store.view(), &searches).is_none());
        // (No trap after the leftover chain this time: its CCW before the end is a read.)
        assert_eq!(
            translate(&orb, &store, &searches).unwrap().ccws().count(),
            5
        );
        drop((p, general));
        assert_eq!(store.stats().pinned_pages, 0);
    }

    #[test]
    fn common_chains_take_the_fast_path() {
        let store = mem_store();
        let mut prog = Vec::new();
        for i in 0..8u32 {
            let flags = CcwFlags::new().with_cc(i < 7).with_ida(i % 2 == 1);
            let cda = if i % 2 == 1 {
                LISTS as u32
            } else {
                0x1_0000 + i * 0x1000
            };
            prog.extend(
                Ccw1 {
                    cmd: 0x02,
                    flags,
                    count: 4096,
                    cda,
                }
                .to_bytes(),
            );
        }
        store.write(PROG, &prog).unwrap();
        store.write(LISTS, &0x2_0000u64.to_be_bytes()).unwrap();
        let orb = Orb {
            intparm: 1,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_format2_idaw(true),
            cpa: PROG as u32,
        };
        let cfg = TranslateConfig::default();
        let chain = walk_simple(&orb, &store.view(), &cfg).expect("simple");
        assert_eq!(chain.ccws.len(), 8);
        // The slot after the last CCW holds zeros: a trap a status-modifier skip reaches.
        assert_eq!(chain.trap, Some(Ccw1::default()));
        let p = Builder::new(&orb, &store.view(), &cfg, IdawFormat::Format2, 4096)
            .build_simple(&chain)
            .expect("built");
        assert_eq!(p.segments().len(), 1);
        assert_eq!(p.segments()[0].len, 9);
        assert_eq!(p.pin_count(), 5);
        // A MIDAW list one host IDAL carries: the second half of a page and the first half
        // of the next.
        let midaws = [(0x2_0800u64, 0u8), (0x2_1000, 0x80)];
        for (i, (data, flags)) in midaws.into_iter().enumerate() {
            let m = Midaw {
                reserved: 0,
                flags: MidawFlags::from_bits(flags),
                count: 2048,
                data,
            };
            store
                .write(LISTS + 0x100 + 16 * i as u64, &m.to_bytes())
                .unwrap();
        }
        let mida = Ccw1 {
            cmd: 0x02,
            flags: CcwFlags::new().with_mida(true),
            count: 4096,
            cda: LISTS as u32 + 0x100,
        };
        store.write(PROG + 7 * 8, &mida.to_bytes()).unwrap();
        let orb_m = Orb {
            ctl: orb.ctl.with_midaw(true),
            ..orb
        };
        let chain = walk_simple(&orb_m, &store.view(), &cfg).expect("simple with a MIDAW");
        let p = Builder::new(&orb_m, &store.view(), &cfg, IdawFormat::Format2, 4096)
            .build_simple(&chain)
            .expect("one IDAL carries it");
        let (_, last) = p.ccws().nth(7).unwrap();
        assert!(last.flags.ida() && !last.flags.mida());
        let g = translate_with(&orb_m, &store, &cfg, false).unwrap();
        assert_eq!((p.image(), p.pages()), (g.image(), g.pages()));
        let idaws: Vec<u64> = p.idaws().map(|(_, w)| w).collect();
        assert_eq!(
            idaws[idaws.len() - 2..],
            [p.pages()[4].host + 0x800, p.pages()[5].host]
        );
        drop((p, g));
        // A TIC or data chaining leaves it to the general passes.
        for flags in [0x80u8, 0x04 | 0x80] {
            let c = Ccw1 {
                cmd: 0x02,
                flags: CcwFlags::from_bits(flags),
                count: 8,
                cda: 0x1_0000,
            };
            store.write(PROG + 8, &c.to_bytes()).unwrap();
            assert!(
                walk_simple(&orb, &store.view(), &cfg).is_none(),
                "flags {flags:#x}"
            );
        }
    }
    proptest! {
        /// Sorted and joined runs are the runs of the sorted, deduplicated page list (what
        /// `pin_pages` pins), or `None` exactly when pages with different access coincide.
        #[test]
        fn sorted_runs_are_the_page_lists_runs(
            raw in proptest::collection::vec((0u64..24, 0u64..4, 1u8..3), 0..8)
        ) {
            let runs: Vec<(u64, u64, u8)> = raw
                .iter()
                .map(|&(p, n, acc)| (p << PAGE_SHIFT, (p + n) << PAGE_SHIFT, acc))
                .collect();
            let mut pages: Vec<(u64, u8)> = Vec::new();
            for &(first, last, acc) in &runs {
                pages.extend((first >> PAGE_SHIFT..=last >> PAGE_SHIFT).map(|n| (n << PAGE_SHIFT, acc)));
            }
            pages.sort_unstable();
            let clash = pages.windows(2).any(|w| w[0].0 == w[1].0 && w[0].1 != w[1].1);
            pages.dedup();
            let mut want: Vec<(u64, u64, u8)> = Vec::new();
            for &(page, acc) in &pages {
                match want.last_mut() {
                    Some(r) if r.2 == acc && r.1 + PAGE_SIZE == page => r.1 = page,
                    _ => want.push((page, page, acc)),
                }
            }
            match sorted_runs(&runs) {
                Some(got) => {
                    prop_assert!(!clash);
                    prop_assert_eq!(&*got, &want[..]);
                }
                None => prop_assert!(clash),
            }
        }
    }

    /// Chains of segments joined by TICs take the fast path, with the general passes' result;
    /// a TIC back into a segment, or a skip that can jump over the TIC, does not.
    #[test]
    fn tic_chains_take_the_fast_path() {
        let store = mem_store();
        let read = |i: u32, cc: bool| Ccw1 {
            cmd: 0x86,
            flags: CcwFlags::new().with_cc(cc).with_ida(true),
            count: 4096,
            cda: LISTS as u32 + 8 * i,
        };
        let tic = |to: u64| Ccw1 {
            cmd: command::TIC,
            flags: CcwFlags::new(),
            count: 0,
            cda: to as u32,
        };
        for i in 0..8u64 {
            store
                .write(LISTS + 8 * i, &(0x1_0000 + i * 0x1000).to_be_bytes())
                .unwrap();
        }
        // Three segments: TIC *+8, then a TIC to another page.
        let far = PROG + 0x2000;
        let at = |i: u64| PROG + 8 * i;
        let prog = [read(0, true), read(1, true), tic(at(3)), read(2, true)];
        for (i, c) in prog.iter().enumerate() {
            store.write(at(i as u64), &c.to_bytes()).unwrap();
        }
        store.write(at(4), &tic(far).to_bytes()).unwrap();
        store.write(far, &read(3, true).to_bytes()).unwrap();
        store.write(far + 8, &read(4, false).to_bytes()).unwrap();
        let orb = Orb {
            intparm: 1,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_format2_idaw(true),
            cpa: PROG as u32,
        };
        // A device whose reads never present status modifier (a 3390's).
        let cfg = TranslateConfig {
            status_modifier: CommandSet::EMPTY,
            ..TranslateConfig::default()
        };
        let chain = walk_simple(&orb, &store.view(), &cfg).expect("simple");
        assert_eq!(*chain.segs, [(PROG, 3), (at(3), 2), (far, 2)]);
        let fast = translate_with(&orb, &store, &cfg, true);
        let general = translate_with(&orb, &store, &cfg, false);
        same(&fast, &general).unwrap();
        let p = fast.unwrap();
        assert_eq!(p.segments().len(), 3);
        // The first two segments continue each other in guest storage: two origin runs.
        assert_eq!(p.mapper.origins.as_slice().len(), 2);
        let (_, t) = p.ccws().nth(4).unwrap();
        assert_eq!((t.cmd, t.cda), (command::TIC, cfg.arena_base + 5 * 8));
        drop((p, general));
        // Status modifier after a read: a skip could pass over the TIC.
        assert!(walk_simple(&orb, &store.view(), &TranslateConfig::default()).is_none());
        // A TIC back into a segment already walked.
        store.write(far + 8, &tic(at(1)).to_bytes()).unwrap();
        assert!(walk_simple(&orb, &store.view(), &cfg).is_none());
        same(
            &translate_with(&orb, &store, &cfg, true),
            &translate_with(&orb, &store, &cfg, false),
        )
        .unwrap();
        // More segments than allowed.
        store.write(far + 8, &read(4, false).to_bytes()).unwrap();
        let two = TranslateConfig {
            max_segments: 2,
            ..cfg
        };
        assert!(walk_simple(&orb, &store.view(), &two).is_none());
        assert_eq!(
            translate_with(&orb, &store, &two, true).err(),
            Some(E::TooManySegments(2))
        );
        assert_eq!(store.stats().pinned_pages, 0);
    }
}

#[cfg(test)]
mod fuzz_regressions {
    use super::*;
    use crate::css::{run_to_completion, LoopbackDevice};
    use crate::iommu_store::{Backing, StoreConfig};
    use crate::orb::{cstat, OrbControls};

    fn store(base: u64, size: u64) -> IommuStore {
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(base, size, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        store
    }

    fn orb_at_1000() -> Orb {
        Orb {
            intparm: 1,
            ctl: OrbControls::new().with_format1(true),
            cpa: 0x1000,
        }
    }

    /// Runs `p` on the reference channel with a device answering Search ID Equal (0x31) with
    /// status modifier; the final status as the guest sees it.
    fn run_with_sm(p: &HostProgram) -> crate::orb::Scsw {
        let mut dev = LoopbackDevice::new();
        dev.status_modifier_on = Some(0x31);
        let s = run_to_completion(p.orb(), p, &mut dev, 100);
        p.to_guest_scsw(s.last().unwrap())
    }

    /// Found by the `translate` fuzz target: a trap slot (an invalid CCW only a
    /// status-modifier skip reaches) presented residual count 0, where the guest's channel
    /// presents the invalid CCW's own count (and PCI) with the program check.
    #[test]
    fn trap_slot_presents_the_guest_ccws_count() {
        let store = store(0x1000, 0x8000);
        let ccw = |cmd, flags: CcwFlags, count, cda| Ccw1 {
            cmd,
            flags,
            count,
            cda,
        };
        let f = CcwFlags::new;
        let mut prog = Vec::new();
        // Search (CC), TIC back; the slot after the TIC has the suspend flag, which the ORB
        // does not allow: invalid, reachable only when the search ends with SM.
        prog.extend(ccw(0x31, f().with_cc(true), 5, 0x2000).to_bytes());
        prog.extend(ccw(0x08, f(), 0, 0x1000).to_bytes());
        prog.extend(ccw(0x06, f().with_s(true).with_pci(true), 80, 0x3000).to_bytes());
        store.write(0x1000, &prog).unwrap();
        let orb = orb_at_1000();
        let p = translate(&orb, &store, &TranslateConfig::default()).unwrap();
        let trap = p.ccws().nth(2).unwrap().1;
        assert_eq!((trap.cmd, trap.count, trap.flags.pci()), (0, 80, true));

        let g = run_with_sm(&p);
        assert_eq!(g.cstat, cstat::PROGRAM_CHECK | cstat::PCI);
        assert_eq!((g.cpa, g.count), (0x1000 + 24, 80));
    }

    /// Found by the `translate` fuzz target: CCWs (and IDAWs, MIDAWs) in a fetch-protected
    /// page were fetched whatever the ORB key, where a channel presents a protection check.
    #[test]
    fn ccw_and_idaw_fetches_obey_fetch_protection() {
        let store = store(0x1000, 0x8000);
        // A Sense (IDA) at 0x1000 whose IDAL is at 0x2000, data at 0x3000.
        let sense = Ccw1 {
            cmd: 0x04,
            flags: CcwFlags::new().with_ida(true),
            count: 32,
            cda: 0x2000,
        };
        store.write(0x1000, &sense.to_bytes()).unwrap();
        store.write(0x2000, &0x3000u32.to_be_bytes()).unwrap();
        let orb = |key| Orb {
            intparm: 1,
            ctl: OrbControls::new().with_format1(true).with_key(key),
            cpa: 0x1000,
        };
        let cfg = TranslateConfig::default();
        store.set_storage_key(0x1000, 0x58).unwrap(); // key 5, fetch protected
        assert_eq!(
            translate(&orb(3), &store, &cfg).unwrap_err(),
            E::Protection(0x1000)
        );
        // Key 0 and the matching key may fetch; an unprotected page anyone may.
        assert!(translate(&orb(0), &store, &cfg).is_ok());
        store.set_storage_key(0x3000, 0x50).unwrap();
        assert!(translate(&orb(5), &store, &cfg).is_ok());
        store.set_storage_key(0x1000, 0x50).unwrap();
        store.set_storage_key(0x2000, 0x48).unwrap(); // the IDAL: key 4, fetch protected
        assert_eq!(
            translate(&orb(5), &store, &cfg).unwrap_err(),
            E::Protection(0x2000)
        );
        assert_eq!(store.stats().pinned_pages, 0);
    }

    /// Found by the `translate` fuzz target: a format-2 IDAW in the last page of the 64-bit
    /// space overflowed the page walk (a panic in debug builds, an endless loop in release).
    #[test]
    fn idaw_in_the_last_page_of_the_address_space() {
        let store = store(0x1000, 0x2000);
        let read = Ccw1 {
            cmd: 0x02,
            flags: CcwFlags::new().with_ida(true),
            count: 0x80,
            cda: 0x2000,
        };
        store.write(0x1000, &read.to_bytes()).unwrap();
        store
            .write(0x2000, &0xffff_ffff_ffff_ff00u64.to_be_bytes())
            .unwrap();
        let orb = Orb {
            intparm: 1,
            ctl: OrbControls::new()
                .with_format1(true)
                .with_format2_idaw(true),
            cpa: 0x1000,
        };
        assert_eq!(
            translate(&orb, &store, &TranslateConfig::default()).unwrap_err(),
            E::Unmapped(0xffff_ffff_ffff_f000)
        );
    }

    /// Found by the `translate` fuzz target: the ORB's incorrect-length-suppression mode
    /// (which the channel applies to format-1 CCWs only) was kept for a format-0 guest
    /// program, so its host (format-1) program suppressed incorrect length on an immediate
    /// operation where the guest's channel ends the chain with it.
    #[test]
    fn format0_program_does_not_gain_incorrect_length_suppression() {
        let store = store(0x1000, 0x2000);
        // NOOP with count 1 (an immediate operation), command-chained to a Sense.
        let noop = Ccw0 {
            cmd: 0x03,
            cda: 0,
            flags: CcwFlags::new().with_cc(true),
            count: 1,
        };
        let sense = Ccw0 {
            cmd: 0x04,
            cda: 0x2000,
            flags: CcwFlags::new(),
            count: 32,
        };
        let mut prog = noop.to_bytes().to_vec();
        prog.extend(sense.to_bytes());
        store.write(0x1000, &prog).unwrap();
        for fmt1 in [false, true] {
            let ctl = OrbControls::new()
                .with_format1(fmt1)
                .with_incorrect_length_suppression(true);
            let orb = Orb {
                intparm: 1,
                ctl,
                cpa: 0x1000,
            };
            if fmt1 {
                let c = Ccw1 {
                    cmd: 0x03,
                    flags: CcwFlags::new().with_cc(true),
                    count: 1,
                    cda: 0,
                };
                store.write(0x1000, &c.to_bytes()).unwrap();
                let s = Ccw1 {
                    cmd: 0x04,
                    flags: CcwFlags::new(),
                    count: 32,
                    cda: 0x2000,
                };
                store.write(0x1008, &s.to_bytes()).unwrap();
            }
            let p = translate(&orb, &store, &TranslateConfig::default()).unwrap();
            assert_eq!(p.orb().ctl.incorrect_length_suppression(), fmt1);
            let st = run_to_completion(p.orb(), &p, &mut LoopbackDevice::new(), 100);
            let g = p.to_guest_scsw(st.last().unwrap());
            // Format 0: the NOOP ends the chain with incorrect length; format 1: suppressed.
            let ended_at = if fmt1 { 0x1010 } else { 0x1008 };
            assert_eq!(g.cpa, ended_at);
            assert_eq!(g.cstat & cstat::INCORRECT_LENGTH != 0, !fmt1);
        }
    }

    /// Found by the `translate` fuzz target: a NOOP's data address was not checked against
    /// the addressing limit (a channel presents a program check before starting it).
    #[test]
    fn noop_data_address_is_checked_against_the_limit() {
        let store = store(0x1000, 0x1000);
        let orb = orb_at_1000();
        let noop = |count, cda| Ccw1 {
            cmd: 0x03,
            flags: CcwFlags::new().with_sli(true),
            count,
            cda,
        };
        let cfg = TranslateConfig::default();
        // Past 2 GiB: refused. In range (even unmapped) or count 0: accepted, nothing pinned.
        store
            .write(0x1000, &noop(0x4000, 0x7fff_f000).to_bytes())
            .unwrap();
        assert_eq!(
            translate(&orb, &store, &cfg).unwrap_err(),
            E::DataAddress(0x1000)
        );
        store
            .write(0x1000, &noop(0x1000, 0x7fff_f000).to_bytes())
            .unwrap();
        assert_eq!(translate(&orb, &store, &cfg).unwrap().pin_count(), 0);
        store
            .write(0x1000, &noop(0, 0xc800_0000).to_bytes())
            .unwrap();
        assert!(translate(&orb, &store, &cfg).is_ok());
    }

    /// Found by the `translate` fuzz target: Search (CC), then [skip], Search (CC), then an
    /// invalid slot (a trap): a status-modifier skip from the second Search jumps over the
    /// trap, and the slot it lands on was not in the program, so the channel ran into the
    /// IDAL area behind the CCWs.
    #[test]
    fn skip_over_a_trap_slot_lands_in_the_program() {
        let store = store(0x1000, 0x2000);
        let search = Ccw1 {
            cmd: 0x31,
            flags: CcwFlags::new().with_cc(true),
            count: 5,
            cda: 0x2000,
        };
        let ctl = Ccw1 {
            cmd: 0xf7,
            flags: CcwFlags::new(),
            count: 0,
            cda: 0,
        };
        let mut prog = Vec::new();
        prog.extend(search.to_bytes());
        prog.extend(ctl.to_bytes());
        prog.extend(search.to_bytes());
        prog.extend([0u8; 8]); // invalid: a trap; 0x1020 (zeros) is invalid too
        store.write(0x1000, &prog).unwrap();
        let orb = orb_at_1000();
        let p = translate(&orb, &store, &TranslateConfig::default()).unwrap();
        assert_eq!(p.segments()[0].len, 5);
        let g = run_with_sm(&p);
        assert_eq!((g.cstat, g.cpa, g.count), (cstat::PROGRAM_CHECK, 0x1028, 0));
    }

    /// Found by the `translate` fuzz target: a format-1 CCW with command code 0x28 (low
    /// bits 1000 but not 0x08) was translated as a TIC, where a channel presents a program
    /// check for an invalid command.
    #[test]
    fn format1_tic_is_only_command_code_08() {
        let store = store(0x1000, 0x1000);
        let tic28 = Ccw1 {
            cmd: 0x28,
            flags: CcwFlags::new(),
            count: 0,
            cda: 0x1000,
        };
        store.write(0x1008, &tic28.to_bytes()).unwrap();
        let orb = |cpa, fmt1| Orb {
            intparm: 1,
            ctl: OrbControls::new().with_format1(fmt1),
            cpa,
        };
        let cfg = TranslateConfig::default();
        assert_eq!(
            translate(&orb(0x1008, true), &store, &cfg).unwrap_err(),
            E::InvalidCommand {
                at: 0x1008,
                cmd: 0x28
            }
        );
        // Format 0: any xxxx1000 code is a TIC (here to 0x1000, a NOOP).
        let tic0 = Ccw0 {
            cmd: 0x28,
            cda: 0x1000,
            flags: CcwFlags::new(),
            count: 0,
        };
        let noop0 = Ccw0 {
            cmd: 0x03,
            cda: 0,
            flags: CcwFlags::new().with_sli(true),
            count: 1,
        };
        store.write(0x1000, &noop0.to_bytes()).unwrap();
        store.write(0x1008, &tic0.to_bytes()).unwrap();
        assert!(translate(&orb(0x1008, false), &store, &cfg).is_ok());
    }

    /// Found by the `translate` fuzz target: a speculative TIC to an unmapped CCW address
    /// put the trap at the target, so the program check carried the target's address + 8;
    /// a channel reports the TIC's address + 8.
    #[test]
    fn tic_to_an_unfetchable_ccw_traps_at_the_tic() {
        let store = store(0x1000, 0x2000);
        let search = Ccw1 {
            cmd: 0x31,
            flags: CcwFlags::new().with_cc(true),
            count: 5,
            cda: 0x2000,
        };
        let ctl = Ccw1 {
            cmd: 0xf7,
            flags: CcwFlags::new(),
            count: 0,
            cda: 0,
        };
        let tic = Ccw1 {
            cmd: 0x08,
            flags: CcwFlags::new(),
            count: 0,
            cda: 0xe8, // not mapped
        };
        let mut prog = Vec::new();
        for c in [search, ctl, tic] {
            prog.extend(c.to_bytes());
        }
        store.write(0x1000, &prog).unwrap();
        let orb = orb_at_1000();
        let p = translate(&orb, &store, &TranslateConfig::default()).unwrap();
        let g = run_with_sm(&p);
        assert_eq!((g.cstat, g.cpa, g.count), (cstat::PROGRAM_CHECK, 0x1018, 0));
    }

    /// Found by the `translate` fuzz target: a MIDAW with the DTIC flag was translated; the
    /// channel presents a program check for it.
    #[test]
    fn midaw_with_dtic_is_refused() {
        let store = store(0x1000, 0x4000);
        let write = Ccw1 {
            cmd: 0x01,
            flags: CcwFlags::new().with_mida(true),
            count: 100,
            cda: 0x1800,
        };
        store.write(0x1000, &write.to_bytes()).unwrap();
        let orb = Orb {
            intparm: 1,
            ctl: OrbControls::new().with_format1(true).with_midaw(true),
            cpa: 0x1000,
        };
        let cfg = TranslateConfig::default();
        for (flags, ok) in [(0x80u8, true), (0xa0, false)] {
            let mut m = [0u8; 16];
            m[5] = flags; // last (0x80), DTIC (0x20)
            m[6..8].copy_from_slice(&100u16.to_be_bytes());
            m[8..].copy_from_slice(&0x3000u64.to_be_bytes());
            store.write(0x1800, &m).unwrap();
            assert_eq!(
                translate(&orb, &store, &cfg).is_ok(),
                ok,
                "flags {flags:#x}"
            );
        }
    }
}

#[cfg(test)]
mod small_storage {
    use super::*;
    use crate::css::ChannelMemory;
    use crate::iommu_store::{Backing, StoreConfig};
    use crate::orb::OrbControls;

    /// Inline elements, then a spill to the heap keeping order; reserve past `N` spills too.
    #[test]
    fn inline_vec_spills_in_order() {
        let mut v: InlineVec<u64, 2> = InlineVec::default();
        assert!(v.is_empty());
        v.push(1);
        v.push(2);
        assert_eq!(v.heap.capacity(), 0, "two fit inline");
        v.push(3);
        v.extend([4, 5]);
        assert!(v.heap.capacity() >= 5, "spilled");
        assert_eq!(&v[..], &[1, 2, 3, 4, 5]);
        v[0] = 9;
        assert_eq!(v.first(), Some(&9));
        let mut w: InlineVec<u64, 2> = InlineVec::default();
        w.push(7);
        w.reserve(4);
        assert!(w.heap.capacity() >= 5);
        w.extend([8]);
        assert_eq!(&w[..], &[7, 8]);
    }

    /// A page two CCWs use, for output then for input (pinned once, for both): the
    /// program's accesses (which scan the pinned runs) and its page list (built on request)
    /// agree: one page, writable.
    #[test]
    fn page_lookups_before_and_after_the_page_list() {
        let store = IommuStore::new(StoreConfig::default());
        store
            .map_dma(0x1000, 0x8000, Perm::READ_WRITE, Backing::Anonymous)
            .unwrap();
        let ccw = |cmd, cc: bool, count, cda: u32| Ccw1 {
            cmd,
            flags: CcwFlags::new().with_cc(cc),
            count,
            cda,
        };
        // WRITE 16 bytes from 0x3000, READ 16 bytes into 0x3010, then an invalid slot.
        let prog = [ccw(0x01, true, 16, 0x3000), ccw(0x02, false, 16, 0x3010)];
        for (i, c) in prog.iter().enumerate() {
            store.write(0x2000 + 8 * i as u64, &c.to_bytes()).unwrap();
        }
        store.write(0x3000, &[0x5a; 16]).unwrap();
        let orb = Orb {
            intparm: 0,
            ctl: OrbControls::new().with_format1(true),
            cpa: 0x2000,
        };
        let p = translate(&orb, &store, &TranslateConfig::default()).unwrap();
        assert_eq!(p.pin_count(), 1, "pinned once for both accesses");
        assert!(p.pages.get().is_none(), "no page list yet");
        let host = p.idaws().next().unwrap().1;
        let mut b = [0u8; 16];
        p.read(host, &mut b, 0).unwrap();
        assert_eq!(b, [0x5a; 16]);
        p.write(host + 0x10, &[1; 4], 0).unwrap();
        assert_eq!(p.host_to_guest(host + 0x10), Some(0x3010));
        assert_eq!(
            p.read(host + 0x1000, &mut b, 0),
            Err(crate::css::AccessFault::Addressing(host + 0x1000))
        );
        assert!(p.pages.get().is_none(), "scanned, not listed");
        let pages = p.pages();
        assert_eq!(pages.len(), 1);
        assert_eq!(
            (pages[0].iova, pages[0].host, pages[0].writable),
            (0x3000, host, true)
        );
        // The same answers through the list.
        p.write(host + 0x10, &[2; 4], 0).unwrap();
        assert_eq!(p.host_to_guest(host + 0x10), Some(0x3010));
        drop(p);
        let mut g = [0u8; 4];
        store.read(0x3010, &mut g).unwrap();
        assert_eq!(g, [2; 4]);
        assert_eq!(store.stats().pinned_pages, 0);
    }
}
