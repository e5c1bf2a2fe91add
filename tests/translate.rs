//! The translator's rules, one test each: chaining, TICs, limits, data addressing, and every
//! rejection with its errno and channel status.

use vccw::ccw::{
    translate, Ccw0, Ccw1, CcwFlags, HostProgram, Midaw, MidawFlags, TranslateConfig,
    TranslateError as E,
};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
use vccw::orb::{cstat, dstat, stctl, Orb, OrbControls, Scsw, ScswFlags};

const PROG: u64 = 0x10000;

fn store() -> IommuStore {
    let s = IommuStore::new(StoreConfig::default());
    // 1 MiB of guest memory at 0, read-write; 64 KiB read-only at 16 MiB.
    s.map_dma(0, 0x10_0000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    s.map_dma(0x100_0000, 0x1_0000, Perm::READ, Backing::Anonymous)
        .unwrap();
    s
}

fn ccw(cmd: u8, flags: CcwFlags, count: u16, cda: u32) -> Ccw1 {
    Ccw1 {
        cmd,
        flags,
        count,
        cda,
    }
}

fn f() -> CcwFlags {
    CcwFlags::new()
}

fn put(s: &IommuStore, at: u64, ccws: &[Ccw1]) {
    for (i, c) in ccws.iter().enumerate() {
        s.write(at + 8 * i as u64, &c.to_bytes()).unwrap();
    }
}

fn orb1(cpa: u64) -> Orb {
    Orb {
        intparm: 0xfeed,
        ctl: OrbControls::new().with_format1(true).with_prefetch(true),
        cpa: cpa as u32,
    }
}

fn tr(s: &IommuStore, orb: &Orb) -> Result<HostProgram, E> {
    translate(orb, s, &TranslateConfig::default())
}

fn host_ccws(p: &HostProgram) -> Vec<Ccw1> {
    p.ccws().map(|(_, c)| c).collect()
}

fn idaws_of(p: &HostProgram, c: &Ccw1, n: usize) -> Vec<u64> {
    let all: Vec<(u32, u64)> = p.idaws().collect();
    let i = all
        .iter()
        .position(|(a, _)| *a == c.cda)
        .expect("IDAL in arena");
    all[i..i + n].iter().map(|(_, w)| *w).collect()
}

fn program_check(e: &E) {
    assert_eq!(e.channel_status().cstat, cstat::PROGRAM_CHECK, "{e:?}");
    assert_eq!(e.errno(), libc::EINVAL, "{e:?}");
}

#[test]
fn single_read_becomes_ida_with_format2_idal() {
    let s = store();
    put(&s, PROG, &[ccw(0x02, f().with_sli(true), 100, 0x2_0010)]);
    let p = tr(&s, &orb1(PROG)).unwrap();
    let o = p.orb();
    assert!(o.ctl.format1() && o.ctl.format2_idaw() && !o.ctl.idaw_2k() && !o.ctl.midaw());
    assert_eq!(o.intparm, 0xfeed);
    assert_eq!(o.cpa, p.base());
    let c = host_ccws(&p);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].cmd, 0x02);
    assert!(c[0].flags.ida() && c[0].flags.sli());
    assert_eq!(c[0].count, 100);
    let w = idaws_of(&p, &c[0], 1);
    assert_eq!(p.host_to_guest(w[0]), Some(0x2_0010));
    assert_eq!(p.pin_count(), 1);
    assert!(p.pages()[0].writable, "input pins for writing");
    assert_eq!(s.stats().pinned_pages, 1);
    drop(p);
    assert_eq!(s.stats().pinned_pages, 0, "dropping the program unpins");
}

#[test]
fn direct_area_across_pages_gets_one_idaw_per_block() {
    let s = store();
    put(&s, PROG, &[ccw(0x01, f(), 0x2000, 0x2_0800)]);
    let p = tr(&s, &orb1(PROG)).unwrap();
    let c = host_ccws(&p);
    let w = idaws_of(&p, &c[0], 3);
    let g: Vec<u64> = w.iter().map(|a| p.host_to_guest(*a).unwrap()).collect();
    assert_eq!(g, vec![0x2_0800, 0x2_1000, 0x2_2000]);
    assert_eq!(p.pin_count(), 3);
    assert!(!p.pages()[0].writable, "output pins for reading");
}

#[test]
fn format0_program_is_converted_to_format1() {
    let s = store();
    let c0 = Ccw0 {
        cmd: 0x02,
        cda: 0x3_0000,
        flags: f().with_cc(true),
        count: 16,
    };
    let tic0 = Ccw0 {
        cmd: 0xF8, // format-0 TIC: high nibble ignored
        cda: PROG as u32 + 16,
        flags: f(),
        count: 0,
    };
    let c2 = Ccw0 {
        cmd: 0x03,
        cda: 0,
        flags: f(),
        count: 1,
    };
    for (i, c) in [c0, tic0, c2].iter().enumerate() {
        s.write(PROG + 8 * i as u64, &c.to_bytes()).unwrap();
    }
    let mut orb = orb1(PROG);
    orb.ctl.set_format1(false);
    let p = tr(&s, &orb).unwrap();
    let c = host_ccws(&p);
    assert!(p.orb().ctl.format1());
    assert_eq!(c[0].cmd, 0x02);
    assert!(c[0].flags.cc() && c[0].flags.ida());
    assert_eq!(c[1].cmd, 0x08);
    // The TIC's target is also the slot after it (speculatively fetched in segment 0); the
    // certain path gets its own segment, as Linux chains a forward TIC.
    assert_eq!(
        c[1].cda,
        p.segments()[1].host,
        "TIC rewritten to the host copy"
    );
    assert_eq!(p.guest_ccw_address(c[1].cda), Some(PROG as u32 + 16));
    assert_eq!(c[2].cmd, 0x03);
}

#[test]
fn format0_limits() {
    let s = store();
    let c0 = Ccw0 {
        cmd: 0x02,
        cda: 0xff_fff0,
        flags: f(),
        count: 32,
    };
    s.write(PROG, &c0.to_bytes()).unwrap();
    let mut orb = orb1(PROG);
    orb.ctl.set_format1(false);
    let e = tr(&s, &orb).unwrap_err();
    assert_eq!(e, E::DataAddress(PROG));
    program_check(&e);
    // count 0 on a format-0 command
    let c0 = Ccw0 {
        cmd: 0x02,
        cda: 0x100,
        flags: f(),
        count: 0,
    };
    s.write(PROG, &c0.to_bytes()).unwrap();
    assert_eq!(tr(&s, &orb).unwrap_err(), E::ZeroCount(PROG));
    // CPA beyond 24 bits
    let mut orb = orb1(0x100_0000);
    orb.ctl.set_format1(false);
    assert_eq!(tr(&s, &orb).unwrap_err(), E::CcwAddress(0x100_0000));
}

#[test]
fn ccw_address_checks() {
    let s = store();
    for cpa in [0u64, PROG + 4, 0x8000_0000] {
        let e = tr(&s, &orb1(cpa)).unwrap_err();
        assert_eq!(e, E::CcwAddress(cpa));
        program_check(&e);
    }
    let e = tr(&s, &orb1(0x20_0000)).unwrap_err();
    assert_eq!(e, E::Unmapped(0x20_0000));
    assert_eq!(e.errno(), libc::EFAULT);
    assert_eq!(e.channel_status().cstat, cstat::PROGRAM_CHECK);
}

#[test]
fn transport_mode_and_reserved_orb_bits_are_refused() {
    let s = store();
    let mut orb = orb1(PROG);
    orb.ctl.set_transport_mode(true);
    let e = tr(&s, &orb).unwrap_err();
    assert_eq!(e, E::TransportMode);
    assert_eq!(e.errno(), libc::EOPNOTSUPP);
    let mut orb = orb1(PROG);
    orb.ctl.set_reserved(1);
    assert!(matches!(tr(&s, &orb).unwrap_err(), E::InvalidOrb(_)));
}

#[test]
fn invalid_command_code() {
    let s = store();
    put(
        &s,
        PROG,
        &[ccw(0x03, f().with_cc(true), 0, 0), ccw(0x10, f(), 4, 0x100)],
    );
    let e = tr(&s, &orb1(PROG)).unwrap_err();
    assert_eq!(
        e,
        E::InvalidCommand {
            at: PROG + 8,
            cmd: 0x10
        }
    );
    program_check(&e);
}

#[test]
fn tic_into_own_segment_creates_no_segment() {
    let s = store();
    // CKD idiom: Search ID Equal (CC); TIC *-8; Read Data (CC); NOOP
    put(
        &s,
        PROG,
        &[
            ccw(0x31, f().with_cc(true), 5, 0x3_0000),
            ccw(0x08, f(), 0, PROG as u32),
            ccw(0x06, f().with_cc(true), 512, 0x3_1000),
            ccw(0x03, f(), 0, 0),
        ],
    );
    let p = tr(&s, &orb1(PROG)).unwrap();
    assert_eq!(p.segments().len(), 1);
    // The CCW after the TIC is reachable by SM; so is the (trap) slot after the NOOP.
    assert_eq!(p.segments()[0].len, 5);
    let c = host_ccws(&p);
    assert_eq!(c[4].cmd, 0);
    assert_eq!(c[1].cda, p.base());
    assert_eq!(c[2].cmd, 0x06);
    assert!(c[2].flags.ida());
}

#[test]
fn tic_to_another_area_starts_a_segment() {
    let s = store();
    put(
        &s,
        PROG,
        &[
            ccw(0x01, f().with_cc(true), 8, 0x3_0000),
            ccw(0x08, f(), 0, 0x4_0000),
        ],
    );
    put(&s, 0x4_0000, &[ccw(0x02, f(), 8, 0x3_0100)]);
    let p = tr(&s, &orb1(PROG)).unwrap();
    assert_eq!(p.segments().len(), 2);
    assert_eq!(p.segments()[1].guest, 0x4_0000);
    let c = host_ccws(&p);
    assert_eq!(c[1].cda, p.segments()[1].host);
    assert_eq!(p.guest_ccw_address(p.segments()[1].host), Some(0x4_0000));
}

#[test]
fn tic_to_tic_and_tic_flags_are_program_checks() {
    let s = store();
    put(
        &s,
        PROG,
        &[
            ccw(0x01, f().with_cc(true), 8, 0x3_0000),
            ccw(0x08, f(), 0, 0x4_0000),
        ],
    );
    put(&s, 0x4_0000, &[ccw(0x08, f(), 0, PROG as u32)]);
    let e = tr(&s, &orb1(PROG)).unwrap_err();
    assert_eq!(e, E::TicToTic(PROG + 8));
    program_check(&e);
    put(&s, PROG + 8, &[ccw(0x08, f().with_cc(true), 0, 0x4_0000)]);
    assert_eq!(tr(&s, &orb1(PROG)).unwrap_err(), E::TicFlags(PROG + 8));
    put(&s, PROG + 8, &[ccw(0x08, f(), 4, 0x4_0000)]);
    assert_eq!(tr(&s, &orb1(PROG)).unwrap_err(), E::TicFlags(PROG + 8));
}

#[test]
fn segment_limit_is_256_ccws() {
    let s = store();
    let mut chain: Vec<Ccw1> = (0..256)
        .map(|i| ccw(0x01, f().with_cc(true), 4, 0x3_0000 + 4 * i))
        .collect();
    chain[255].flags.set_cc(false);
    put(&s, PROG, &chain);
    let p = tr(&s, &orb1(PROG)).unwrap();
    let c = host_ccws(&p);
    // 256 CCWs and the trap slot a status-modifier skip from CCW 254 could reach.
    assert_eq!(c.len(), 257);
    assert_eq!((c[255].cmd, c[256].cmd), (0x01, 0));
    drop(p);
    chain[255].flags.set_cc(true);
    chain.push(ccw(0x01, f(), 4, 0x3_1000));
    put(&s, PROG, &chain);
    let e = tr(&s, &orb1(PROG)).unwrap_err();
    assert_eq!(e, E::SegmentTooLong(PROG, 256));
    assert_eq!(e.errno(), libc::EINVAL);
    assert_eq!(
        e.channel_status().dstat & dstat::UNIT_EXCEPTION,
        dstat::UNIT_EXCEPTION
    );
    assert_eq!(s.stats().pinned_pages, 0, "error path releases every pin");
}

#[test]
fn segment_count_is_capped() {
    let s = store();
    // 17 segments, each one write + TIC to the next.
    for i in 0..17u64 {
        let at = 0x4_0000 + i * 0x100;
        put(
            &s,
            at,
            &[
                ccw(0x01, f().with_cc(true), 4, 0x3_0000),
                ccw(0x08, f(), 0, (at + 0x100) as u32),
            ],
        );
    }
    put(&s, 0x4_0000 + 17 * 0x100, &[ccw(0x03, f(), 0, 0)]);
    let e = tr(&s, &orb1(0x4_0000)).unwrap_err();
    assert_eq!(e, E::TooManySegments(16));
    assert_eq!(s.stats().pinned_pages, 0);
}

#[test]
fn tic_loop_without_data_is_bounded() {
    let s = store();
    let chain: Vec<Ccw1> = (0..256)
        .map(|_| ccw(0x03, f().with_cc(true), 0, 0))
        .collect();
    put(&s, PROG, &chain);
    let e = tr(&s, &orb1(PROG)).unwrap_err();
    assert_eq!(e, E::NoDataLoop(PROG + 255 * 8));
    program_check(&e);
    // A TIC to itself: one segment, no loop in the translator.
    put(
        &s,
        PROG,
        &[
            ccw(0x03, f().with_cc(true), 0, 0),
            ccw(0x08, f(), 0, PROG as u32),
        ],
    );
    let p = tr(&s, &orb1(PROG)).unwrap();
    assert_eq!(p.segments().len(), 1);
}

#[test]
fn no_pinning_for_count_zero_noop_and_skip() {
    let s = store();
    put(
        &s,
        PROG,
        &[
            ccw(0x03, f().with_cc(true), 16, 0x7ff0_0000), // NOOP: address never used
            ccw(0x02, f().with_cc(true).with_skp(true), 64, 0x7ff0_0000), // skip on read
            ccw(0x04, f(), 0, 0x7ff0_0000),                // sense, count 0
        ],
    );
    let p = tr(&s, &orb1(PROG)).unwrap();
    assert_eq!(p.pin_count(), 0);
    let c = host_ccws(&p);
    assert!(c.iter().all(|c| !c.flags.ida() && c.cda == 0));
    assert!(c[1].flags.skp());
    assert_eq!(c[0].count, 16, "counts kept: residuals stay the guest's");
}

#[test]
fn zero_count_with_data_chaining_is_refused() {
    let s = store();
    put(
        &s,
        PROG,
        &[
            ccw(0x02, f().with_cd(true), 0, 0x3_0000),
            ccw(0x00, f(), 8, 0x3_0100),
        ],
    );
    assert_eq!(
        tr(&s, &orb1(PROG)).unwrap_err(),
        E::ZeroCountDataChain(PROG)
    );
    // A data-chained CCW's command code is ignored (0x00 is fine), but count 0 is not.
    put(
        &s,
        PROG,
        &[
            ccw(0x02, f().with_cd(true), 8, 0x3_0000),
            ccw(0x00, f(), 8, 0x3_0100),
        ],
    );
    let p = tr(&s, &orb1(PROG)).unwrap();
    assert!(
        p.pages()[0].writable,
        "continuation of a read pins for writing"
    );
    put(
        &s,
        PROG,
        &[
            ccw(0x02, f().with_cd(true), 8, 0x3_0000),
            ccw(0x00, f(), 0, 0x3_0100),
        ],
    );
    assert_eq!(
        tr(&s, &orb1(PROG)).unwrap_err(),
        E::ZeroCountDataChain(PROG + 8)
    );
}

#[test]
fn guest_format1_idal_becomes_2k_format2() {
    let s = store();
    // 5000 bytes: first IDAW mid-block, then two 2K blocks.
    s.write(0x5_0000, &0x0003_0400u32.to_be_bytes()).unwrap();
    s.write(0x5_0004, &0x0004_0800u32.to_be_bytes()).unwrap();
    s.write(0x5_0008, &0x0006_0000u32.to_be_bytes()).unwrap();
    s.write(0x5_000c, &0x0006_0800u32.to_be_bytes()).unwrap();
    put(&s, PROG, &[ccw(0x02, f().with_ida(true), 5000, 0x5_0000)]);
    let p = tr(&s, &orb1(PROG)).unwrap();
    assert!(p.orb().ctl.idaw_2k() && p.orb().ctl.format2_idaw());
    let c = host_ccws(&p);
    let w = idaws_of(&p, &c[0], 3);
    let g: Vec<u64> = w.iter().map(|a| p.host_to_guest(*a).unwrap()).collect();
    // 1024 + 2048 + 1928 = 5000: three IDAWs used.
    assert_eq!(&g[..3], &[0x3_0400, 0x4_0800, 0x6_0000]);
    assert_eq!(p.idaws().count(), 3);
    // bit 0 set
    s.write(0x5_0004, &0x8004_0800u32.to_be_bytes()).unwrap();
    let e = tr(&s, &orb1(PROG)).unwrap_err();
    assert_eq!(e, E::Idaw(PROG, 0x8004_0800));
    program_check(&e);
    // later IDAW off a block boundary
    s.write(0x5_0004, &0x0004_0900u32.to_be_bytes()).unwrap();
    assert_eq!(tr(&s, &orb1(PROG)).unwrap_err(), E::Idaw(PROG, 0x4_0900));
    // misaligned IDAL
    put(&s, PROG, &[ccw(0x02, f().with_ida(true), 5000, 0x5_0002)]);
    assert_eq!(tr(&s, &orb1(PROG)).unwrap_err(), E::ListAddress(PROG));
}

#[test]
fn guest_format2_idals_4k_and_2k() {
    let s = store();
    s.write(0x5_0000, &0x3_0f00u64.to_be_bytes()).unwrap();
    s.write(0x5_0008, &0x8_0000u64.to_be_bytes()).unwrap();
    put(&s, PROG, &[ccw(0x01, f().with_ida(true), 0x200, 0x5_0000)]);
    let mut orb = orb1(PROG);
    orb.ctl.set_format2_idaw(true);
    let p = tr(&s, &orb).unwrap();
    assert!(!p.orb().ctl.idaw_2k());
    let c = host_ccws(&p);
    let g: Vec<u64> = idaws_of(&p, &c[0], 2)
        .iter()
        .map(|a| p.host_to_guest(*a).unwrap())
        .collect();
    assert_eq!(g, vec![0x3_0f00, 0x8_0000]);
    // 2K blocks: 0x3_0f00 has 0x100 left in its block, the next IDAW must be 2K aligned.
    s.write(0x5_0008, &0x8_0800u64.to_be_bytes()).unwrap();
    orb.ctl.set_idaw_2k(true);
    let p = tr(&s, &orb).unwrap();
    assert!(p.orb().ctl.idaw_2k());
    orb.ctl.set_idaw_2k(false);
    assert_eq!(tr(&s, &orb).unwrap_err(), E::Idaw(PROG, 0x8_0800));
}

fn midaw(data: u64, count: u16, last: bool, skip: bool) -> Midaw {
    Midaw {
        reserved: 0,
        flags: MidawFlags::new().with_last(last).with_skip(skip),
        count,
        data,
    }
}

fn put_midal(s: &IommuStore, at: u64, list: &[Midaw]) {
    for (i, m) in list.iter().enumerate() {
        s.write(at + 16 * i as u64, &m.to_bytes()).unwrap();
    }
}

fn midaw_orb() -> Orb {
    let mut o = orb1(PROG);
    o.ctl.set_midaw(true);
    o
}

#[test]
fn midaw_list_that_fits_one_idal_stays_in_line() {
    let s = store();
    put_midal(
        &s,
        0x5_0000,
        &[
            midaw(0x3_0800, 0x800, false, false),
            midaw(0x7_0000, 0x100, true, false),
        ],
    );
    put(&s, PROG, &[ccw(0x02, f().with_mida(true), 0x900, 0x5_0000)]);
    let p = tr(&s, &midaw_orb()).unwrap();
    let c = host_ccws(&p);
    assert_eq!(c.len(), 1);
    assert!(c[0].flags.ida() && !c[0].flags.mida());
    assert!(!p.orb().ctl.midaw());
    let g: Vec<u64> = idaws_of(&p, &c[0], 2)
        .iter()
        .map(|a| p.host_to_guest(*a).unwrap())
        .collect();
    assert_eq!(g, vec![0x3_0800, 0x7_0000]);
}

#[test]
fn scattered_midaw_list_becomes_data_chained_ccws_out_of_line() {
    let s = store();
    // Three 512-byte blocks in the middle of pages, the second skipped: no IDAL expresses it.
    put_midal(
        &s,
        0x5_0000,
        &[
            midaw(0x3_0200, 512, false, false),
            midaw(0x4_0400, 512, false, true),
            midaw(0x6_0600, 512, true, false),
        ],
    );
    put(
        &s,
        PROG,
        &[
            ccw(0x02, f().with_mida(true).with_cc(true), 1536, 0x5_0000),
            ccw(0x03, f(), 0, 0),
        ],
    );
    let p = tr(&s, &midaw_orb()).unwrap();
    let c = host_ccws(&p);
    // slot 0: TIC to the expansion; slot 1: NOOP; slot 2: trap (reachable by SM from slot
    // 0 only); expansion: 3 CCWs, TIC back.
    assert_eq!(c[0].cmd, 0x08);
    let exp = ((c[0].cda - p.base()) / 8) as usize;
    assert_eq!(exp, 3);
    assert_eq!(p.segments()[0].len, 3);
    let e = &c[exp..];
    assert_eq!((e[0].count, e[1].count, e[2].count), (512, 512, 512));
    assert!(e[0].flags.cd() && e[1].flags.cd() && !e[2].flags.cd());
    assert!(
        e[1].flags.skp() && !e[1].flags.ida(),
        "skipped input needs no pin"
    );
    assert!(e[2].flags.cc());
    assert_eq!(e[3].cmd, 0x08);
    assert_eq!(e[3].cda, p.base() + 8, "back to the slot after");
    assert_eq!(p.pin_count(), 2);
    // Residual of the guest CCW: a final status after the first piece with 12 bytes left
    // counts the 1024 bytes of the later pieces too.
    let host = Scsw {
        flags: ScswFlags::new().with_stctl(stctl::PRIMARY | stctl::STATUS_PENDING),
        cpa: c[0].cda + 8,
        count: 12,
        ..Default::default()
    };
    let g = p.to_guest_scsw(&host);
    assert_eq!(g.cpa, PROG as u32 + 8);
    assert_eq!(g.count, 12 + 1024);
}

#[test]
fn midaw_rejections() {
    let s = store();
    let cases: Vec<(Vec<Midaw>, u16, &str)> = vec![
        (vec![midaw(0x3_0000, 0, true, false)], 1, "count zero"),
        (
            vec![midaw(0x3_0f00, 0x200, true, false)],
            0x200,
            "crosses a page boundary",
        ),
        (
            vec![midaw(0x3_0000, 0x100, true, false)],
            0x200,
            "counts short of the CCW count",
        ),
        (
            vec![
                midaw(0x3_0000, 0x100, false, false),
                midaw(0x4_0000, 0x200, true, false),
            ],
            0x200,
            "counts exceed the CCW count",
        ),
    ];
    for (list, count, why) in cases {
        put_midal(&s, 0x5_0000, &list);
        put(&s, PROG, &[ccw(0x02, f().with_mida(true), count, 0x5_0000)]);
        let e = tr(&s, &midaw_orb()).unwrap_err();
        assert_eq!(e, E::Midaw(PROG, why));
        program_check(&e);
    }
    let mut bad = midaw(0x3_0000, 0x10, true, false);
    bad.reserved = 1;
    put_midal(&s, 0x5_0000, &[bad]);
    put(&s, PROG, &[ccw(0x02, f().with_mida(true), 0x10, 0x5_0000)]);
    assert_eq!(
        tr(&s, &midaw_orb()).unwrap_err(),
        E::Midaw(PROG, "reserved bits set")
    );
    put(&s, PROG, &[ccw(0x02, f().with_mida(true), 0x10, 0x5_0008)]);
    assert_eq!(tr(&s, &midaw_orb()).unwrap_err(), E::ListAddress(PROG));
    put(&s, PROG, &[ccw(0x02, f().with_mida(true), 0x10, 0x5_0000)]);
    assert_eq!(tr(&s, &orb1(PROG)).unwrap_err(), E::MidaNotAllowed(PROG));
    put(
        &s,
        PROG,
        &[ccw(
            0x02,
            f().with_mida(true).with_ida(true),
            0x10,
            0x5_0000,
        )],
    );
    assert_eq!(tr(&s, &midaw_orb()).unwrap_err(), E::MidaNotAllowed(PROG));
}

#[test]
fn suspend_flag_needs_orb_suspend_and_is_carried() {
    let s = store();
    put(
        &s,
        PROG,
        &[
            ccw(0x03, f().with_cc(true), 0, 0),
            ccw(0x02, f().with_s(true), 8, 0x3_0000),
        ],
    );
    assert_eq!(
        tr(&s, &orb1(PROG)).unwrap_err(),
        E::SuspendNotAllowed(PROG + 8)
    );
    let mut orb = orb1(PROG);
    orb.ctl.set_suspend(true);
    let p = tr(&s, &orb).unwrap();
    assert!(p.orb().ctl.suspend());
    assert!(host_ccws(&p)[1].flags.s());
}

#[test]
fn unmapped_data_fails_and_releases_pins() {
    let s = store();
    put(
        &s,
        PROG,
        &[
            ccw(0x01, f().with_cc(true), 0x3000, 0x3_0000),
            ccw(0x01, f(), 0x10, 0x20_0000),
        ],
    );
    let e = tr(&s, &orb1(PROG)).unwrap_err();
    assert_eq!(e, E::Unmapped(0x20_0000));
    assert_eq!(s.stats().pinned_pages, 0);
}

#[test]
fn input_into_read_only_memory_is_a_protection_check() {
    let s = store();
    put(&s, PROG, &[ccw(0x02, f(), 0x10, 0x100_0000)]);
    let e = tr(&s, &orb1(PROG)).unwrap_err();
    assert_eq!(e, E::Protection(0x100_0000));
    assert_eq!(e.errno(), libc::EPERM);
    assert_eq!(e.channel_status().cstat, cstat::PROTECTION_CHECK);
    // output from it is fine
    put(&s, PROG, &[ccw(0x01, f(), 0x10, 0x100_0000)]);
    assert!(tr(&s, &orb1(PROG)).is_ok());
}

#[test]
fn cpa_back_translation_includes_one_past_the_end() {
    let s = store();
    put(
        &s,
        PROG,
        &[
            ccw(0x01, f().with_cc(true), 8, 0x3_0000),
            ccw(0x01, f(), 8, 0x3_0000),
        ],
    );
    let p = tr(&s, &orb1(PROG)).unwrap();
    let b = p.base();
    for (host, guest) in [(b + 8, PROG + 8), (b + 16, PROG + 16), (b, PROG)] {
        let g = p.to_guest_scsw(&Scsw {
            cpa: host,
            ..Default::default()
        });
        assert_eq!(g.cpa as u64, guest, "host {host:#x}");
    }
    // An address outside the program is left alone.
    let g = p.to_guest_scsw(&Scsw {
        cpa: 0x1234_5678,
        ..Default::default()
    });
    assert_eq!(g.cpa, 0x1234_5678);
}

#[test]
fn invalid_ccw_reachable_only_by_status_modifier_becomes_a_trap() {
    let s = store();
    // Write (CC); Write (end); then zeros: a channel reaches slot 2 only if slot 0 ends with SM.
    put(
        &s,
        PROG,
        &[
            ccw(0x01, f().with_cc(true), 8, 0x3_0000),
            ccw(0x01, f(), 8, 0x3_0000),
            ccw(0x00, f(), 0, 0),
        ],
    );
    let p = tr(&s, &orb1(PROG)).unwrap();
    let c = host_ccws(&p);
    assert_eq!(c.len(), 3);
    assert_eq!(
        c[2].cmd, 0,
        "trap: a channel reaching it presents a program check"
    );
    assert_eq!(p.guest_ccw_address(p.base() + 16), Some(PROG as u32 + 16));
}

#[test]
fn read_backward_direct_area_ends_at_the_address() {
    let s = store();
    // 0x20 bytes ending at 0x3_1007 (crossing into the page below).
    put(&s, PROG, &[ccw(0x0C, f(), 0x20, 0x3_1007)]);
    let p = tr(&s, &orb1(PROG)).unwrap();
    let c = host_ccws(&p);
    let w = idaws_of(&p, &c[0], 2);
    let g: Vec<u64> = w.iter().map(|a| p.host_to_guest(*a).unwrap()).collect();
    assert_eq!(g, vec![0x3_1007, 0x3_0fff]);
    assert_eq!(p.pin_count(), 2);
}

#[test]
fn tic_to_the_next_slot_past_the_segment_limit_runs_to_the_end() {
    // 200 CCWs, `TIC *+8`, 100 more: 301 CCWs in one guest area. The slot after the TIC is
    // also reachable by status modifier (speculative); the certain path through the TIC must
    // get its own segment instead of inheriting the speculative copy cut at 256 slots.
    let s = store();
    let mut chain: Vec<Ccw1> = (0..200)
        .map(|i| ccw(0x01, f().with_cc(true), 4, 0x3_0000 + 4 * i))
        .collect();
    chain.push(ccw(0x08, f(), 0, (PROG + 8 * 201) as u32));
    chain.extend((0..100).map(|i| ccw(0x01, f().with_cc(i < 99), 4, 0x3_1000 + 4 * i)));
    put(&s, PROG, &chain);
    let p = tr(&s, &orb1(PROG)).unwrap();
    let mut dev = vccw::css::LoopbackDevice::new();
    let st = vccw::css::run_to_completion(p.orb(), &p, &mut dev, 1000);
    let g = p.to_guest_scsw(st.last().unwrap());
    assert_eq!(
        (g.dstat, g.cstat),
        (dstat::CHANNEL_END | dstat::DEVICE_END, 0),
        "{g:?}"
    );
    assert_eq!(g.cpa as u64, PROG + 8 * 301);
    assert_eq!(dev.written().len(), 300 * 4);
}
