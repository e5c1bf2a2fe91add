//! Channel-engine rules, each checked against guest memory and the loopback device.

use vccw::ccw::{Ccw0, Ccw1, CcwFlags, Midaw, MidawFlags};
use vccw::css::channel::{MAX_CCWS_WITHOUT_DATA, SUSPENDED_STCTL};
use vccw::css::testdev::Length;
use vccw::css::{
    run_to_completion, ChannelRun, GuestChannelMemory, LoopbackDevice, ResumeError, Step, Transfer,
};
use vccw::orb::{actl, cstat, dstat, fctl, stctl, Orb, OrbControls, Scsw};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestChannelMemory<GuestMemoryMmap<()>>;

const CEDE: u8 = dstat::CHANNEL_END | dstat::DEVICE_END;
const FINAL: u8 = stctl::PRIMARY | stctl::SECONDARY | stctl::STATUS_PENDING;
const FINAL_ALERT: u8 = FINAL | stctl::ALERT;
const PROG: u32 = 0x1000;

fn mem() -> Mem {
    // 1 MiB of guest memory at 0, nothing else.
    GuestChannelMemory::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
    )
}

fn put(m: &Mem, addr: u64, b: &[u8]) {
    m.memory().write_slice(b, GuestAddress(addr)).unwrap();
}

fn get(m: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    m.memory().read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn f() -> CcwFlags {
    CcwFlags::new()
}

fn c1(cmd: u8, flags: CcwFlags, count: u16, cda: u32) -> [u8; 8] {
    Ccw1 {
        cmd,
        flags,
        count,
        cda,
    }
    .to_bytes()
}

/// Writes format-1 CCWs consecutively from `at`.
fn prog(m: &Mem, at: u64, ccws: &[[u8; 8]]) {
    for (i, c) in ccws.iter().enumerate() {
        put(m, at + 8 * i as u64, c);
    }
}

fn ctl() -> OrbControls {
    OrbControls::new().with_format1(true)
}

fn orb(c: OrbControls) -> Orb {
    Orb {
        intparm: 0xdead_beef,
        ctl: c,
        cpa: PROG,
    }
}

fn pat(from: u32, n: usize) -> Vec<u8> {
    (0..n as u32)
        .map(|i| LoopbackDevice::pattern(from + i))
        .collect()
}

/// Runs to the end; returns the last status.
fn run(m: &Mem, d: &mut LoopbackDevice, c: OrbControls) -> Scsw {
    *run_to_completion(&orb(c), m, d, 1000).last().unwrap()
}

fn assert_pc(s: Scsw, cpa: u32) {
    assert_eq!(
        s.cstat & cstat::PROGRAM_CHECK,
        cstat::PROGRAM_CHECK,
        "{s:x?}"
    );
    assert_eq!(s.cpa, cpa, "{s:x?}");
    assert_eq!(s.flags.stctl(), FINAL_ALERT);
}

#[test]
fn single_write_final_scsw_bytes() {
    let m = mem();
    prog(&m, PROG as u64, &[c1(0x01, f(), 4, 0x2000)]);
    put(&m, 0x2000, b"abcd");
    let mut d = LoopbackDevice::new();
    let c = ctl().with_prefetch(true).with_key(0).with_lpm(0xff);
    let s = run(&m, &mut d, c);
    assert_eq!(d.written(), b"abcd");
    // Format 1 + prefetch, start function, primary+secondary+pending, CPA 0x1008, CE+DE.
    assert_eq!(
        s.to_bytes(),
        [0x00, 0xC0, 0x40, 0x07, 0x00, 0x00, 0x10, 0x08, 0x0C, 0x00, 0x00, 0x00]
    );
}

#[test]
fn orb_flags_copied_to_scsw() {
    let m = mem();
    prog(&m, PROG as u64, &[c1(0x03, f(), 0, 0)]);
    let mut d = LoopbackDevice::new();
    let c = ctl()
        .with_key(0x6)
        .with_suspend(true)
        .with_prefetch(true)
        .with_address_limit_checking(true)
        .with_suppress_suspended_interrupt(true);
    let s = run(&m, &mut d, c);
    let fl = s.flags;
    assert_eq!(fl.key(), 6);
    assert!(fl.suspend() && fl.format1() && fl.prefetch() && fl.address_limit_checking());
    assert!(fl.suppress_suspended_interrupt() && !fl.initial_status_interrupt());
    assert_eq!((fl.fctl(), fl.actl(), fl.stctl()), (fctl::START, 0, FINAL));
}

#[test]
fn format0_program() {
    let m = mem();
    let w = Ccw0 {
        cmd: 0x01,
        cda: 0x2000,
        flags: f().with_cc(true),
        count: 3,
    };
    // Format-0 TIC with a non-zero high nibble and flags/count (ignored in format 0).
    let tic = Ccw0 {
        cmd: 0x18,
        cda: 0x3000,
        flags: f().with_sli(true),
        count: 9,
    };
    let r = Ccw0 {
        cmd: 0x02,
        cda: 0x2100,
        flags: f(),
        count: 2,
    };
    put(&m, 0x1000, &w.to_bytes());
    put(&m, 0x1008, &tic.to_bytes());
    put(&m, 0x3000, &r.to_bytes());
    put(&m, 0x2000, b"xyz");
    let mut d = LoopbackDevice::new();
    let s = run(&m, &mut d, OrbControls::new());
    assert_eq!((s.dstat, s.cstat, s.cpa), (CEDE, 0, 0x3008));
    assert!(!s.flags.format1());
    assert_eq!(d.written(), b"xyz");
    assert_eq!(get(&m, 0x2100, 2), pat(0, 2));
}

#[test]
fn ccw_address_checks() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    // Misaligned channel-program address.
    let mut o = orb(ctl());
    o.cpa = 0x1004;
    let s = run_to_completion(&o, &m, &mut d, 10)[0];
    assert_pc(s, 0x100c);
    assert_eq!(s.dstat, 0);
    // Format 0: beyond 24 bits.
    o.ctl = OrbControls::new();
    o.cpa = 0x0100_0000;
    assert_pc(run_to_completion(&o, &m, &mut d, 10)[0], 0x0100_0008);
    // Format 1: bit 0 set.
    o.ctl = ctl();
    o.cpa = 0x8000_1000;
    assert_pc(run_to_completion(&o, &m, &mut d, 10)[0], 0x8000_1008);
    // Unmapped storage: addressing -> program check.
    o.cpa = 0x20_0000;
    assert_pc(run_to_completion(&o, &m, &mut d, 10)[0], 0x20_0008);
    // Address 0 (QEMU's rule, which the translator applies too), even with a valid CCW there.
    put(&m, 0, &c1(0x03, f(), 0, 0));
    o.cpa = 0;
    assert_pc(run_to_completion(&o, &m, &mut d, 10)[0], 8);
    assert!(d.commands().is_empty());
}

#[test]
fn invalid_command_codes() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    prog(&m, PROG as u64, &[c1(0x00, f(), 1, 0x2000)]);
    let s = run(&m, &mut d, ctl());
    assert_pc(s, 0x1008);
    assert_eq!(s.count, 1);
    // Format 1: xxxx1000 other than 0x08 is not a TIC.
    prog(&m, PROG as u64, &[c1(0x18, f(), 0, 0x2000)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    assert!(d.commands().is_empty());
}

#[test]
fn tic_rules() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    // Good TIC.
    prog(&m, PROG as u64, &[c1(0x08, f(), 0, 0x1800)]);
    prog(&m, 0x1800, &[c1(0x03, f(), 0, 0)]);
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.cstat, s.cpa), (0, 0x1808));
    // Misaligned TIC target: CPA = TIC + 8.
    prog(&m, PROG as u64, &[c1(0x08, f(), 0, 0x1804)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    // TIC target unmapped: CPA = TIC + 8 (Hercules).
    prog(&m, PROG as u64, &[c1(0x08, f(), 0, 0x20_0000)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    // TIC to address 0, an invalid CCW address even when a CCW is there: TIC + 8, as the
    // translator reports it (found by the translate fuzzer: the channel ran the CCW at 0).
    put(&m, 0, &c1(0x03, f(), 0, 0));
    prog(&m, PROG as u64, &[c1(0x08, f(), 0, 0)]);
    let mut d0 = LoopbackDevice::new();
    assert_pc(run(&m, &mut d0, ctl()), 0x1008);
    assert!(d0.commands().is_empty());
    // TIC to TIC.
    prog(&m, PROG as u64, &[c1(0x08, f(), 0, 0x1800)]);
    prog(&m, 0x1800, &[c1(0x08, f(), 0, 0x1900)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1808);
    // Format-1 TIC with flags or count.
    prog(&m, PROG as u64, &[c1(0x08, f().with_cc(true), 0, 0x1800)]);
    prog(&m, 0x1800, &[c1(0x03, f(), 0, 0)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    prog(&m, PROG as u64, &[c1(0x08, f(), 1, 0x1800)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
}

#[test]
fn count_zero_rules() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    // Format 0 count 0 on a non-TIC.
    let c0 = Ccw0 {
        cmd: 0x03,
        cda: 0,
        flags: f(),
        count: 0,
    };
    put(&m, PROG as u64, &c0.to_bytes());
    assert_pc(run(&m, &mut d, OrbControls::new()), 0x1008);
    // Format 1 count 0 without data chaining is fine (immediate).
    prog(&m, PROG as u64, &[c1(0x03, f(), 0, 0)]);
    assert_eq!(run(&m, &mut d, ctl()).cstat, 0);
    // Format 1 count 0 with CD (Hercules): program check.
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x01, f().with_cd(true), 0, 0x2000),
            c1(0x01, f(), 4, 0x2000),
        ],
    );
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    // ... and a data-chained CCW with count 0.
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x01, f().with_cd(true), 4, 0x2000),
            c1(0x01, f(), 0, 0x2000),
        ],
    );
    d.length = Length::Fixed(8);
    let s = run(&m, &mut d, ctl());
    assert_pc(s, 0x1010);
    assert_eq!(s.dstat, CEDE);
}

#[test]
fn data_chaining_gathers_through_tic() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x01, f().with_cd(true), 3, 0x2000),
            c1(0x08, f(), 0, 0x1800),
        ],
    );
    // Command code of a data-chained CCW is ignored (0x00 would be invalid).
    prog(&m, 0x1800, &[c1(0x00, f(), 2, 0x3000)]);
    put(&m, 0x2000, b"abc");
    put(&m, 0x3000, b"de");
    let mut d = LoopbackDevice::new();
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.cstat, s.cpa, s.count), (0, 0x1808, 0));
    assert_eq!(d.written(), b"abcde");
    assert_eq!(d.commands().len(), 1);
    assert_eq!(d.commands()[0].count, 5);
}

#[test]
fn scatter_residual_and_incorrect_length() {
    let m = mem();
    let chain = [
        c1(0x02, f().with_cd(true), 4, 0x2000),
        c1(0x02, f().with_cd(true), 4, 0x3000),
        c1(0x02, f().with_cc(true), 4, 0x4000),
        c1(0x03, f(), 0, 0),
    ];
    prog(&m, PROG as u64, &chain);
    let mut d = LoopbackDevice::new();
    d.length = Length::Fixed(6);
    // Device stops inside the second CCW (which has CD): IL, chain ends, residual 2.
    let s = run(&m, &mut d, ctl());
    assert_eq!(
        (s.cstat, s.count, s.cpa),
        (cstat::INCORRECT_LENGTH, 2, 0x1010)
    );
    assert_eq!(s.flags.stctl(), FINAL_ALERT);
    assert_eq!(get(&m, 0x2000, 4), pat(0, 4));
    assert_eq!(get(&m, 0x3000, 4), [pat(4, 2), vec![0, 0]].concat());
    // Device stops inside the last CCW: IL without SLI ends the chain...
    d.length = Length::Fixed(10);
    let s = run(&m, &mut d, ctl());
    assert_eq!(
        (s.cstat, s.count, s.cpa),
        (cstat::INCORRECT_LENGTH, 2, 0x1018)
    );
    assert_eq!(d.commands().len(), 2);
    // ...and SLI suppresses it; command chaining continues.
    let mut last = chain;
    last[2] = c1(0x02, f().with_cc(true).with_sli(true), 4, 0x4000);
    prog(&m, PROG as u64, &last);
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.cstat, s.cpa, s.count), (0, 0x1020, 0));
    assert_eq!(d.commands().len(), 4);
    // More data than offered: IL with residual 0, suppressed by SLI.
    d.length = Length::Fixed(20);
    prog(&m, PROG as u64, &[c1(0x02, f(), 4, 0x2000)]);
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.cstat, s.count), (cstat::INCORRECT_LENGTH, 0));
    prog(&m, PROG as u64, &[c1(0x02, f().with_sli(true), 4, 0x2000)]);
    assert_eq!(run(&m, &mut d, ctl()).cstat, 0);
}

#[test]
fn incorrect_length_suppression_mode() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    // NOOP with a count: immediate operation, IL unless SLI or ORB L (format 1).
    prog(&m, PROG as u64, &[c1(0x03, f(), 8, 0x2000)]);
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.cstat, s.count), (cstat::INCORRECT_LENGTH, 8));
    let s = run(&m, &mut d, ctl().with_incorrect_length_suppression(true));
    assert_eq!((s.cstat, s.count), (0, 8));
    // L applies to immediate operations only.
    d.length = Length::Fixed(2);
    prog(&m, PROG as u64, &[c1(0x02, f(), 8, 0x2000)]);
    let s = run(&m, &mut d, ctl().with_incorrect_length_suppression(true));
    assert_eq!(s.cstat, cstat::INCORRECT_LENGTH);
}

#[test]
fn direct_address_limits() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    let r = Ccw0 {
        cmd: 0x02,
        cda: 0xFF_FFFE,
        flags: f(),
        count: 4,
    };
    put(&m, PROG as u64, &r.to_bytes());
    let s = run(&m, &mut d, OrbControls::new());
    assert_pc(s, 0x1008);
    prog(&m, PROG as u64, &[c1(0x02, f(), 4, 0x7FFF_FFFE)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    prog(&m, PROG as u64, &[c1(0x02, f(), 4, 0x8000_0000)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    assert!(d.commands().is_empty());
    // Running into unmapped storage: program check at the first unmapped page, the bytes
    // before it are stored, residual counts from there.
    prog(&m, PROG as u64, &[c1(0x02, f(), 0x20, 0xF_FFF0)]);
    let s = run(&m, &mut d, ctl());
    assert_pc(s, 0x1008);
    assert_eq!(s.count, 0x10);
    assert_eq!(get(&m, 0xF_FFF0, 16), pat(0, 16));
}

#[test]
fn ida_format1_and_format2() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    // Format-1 IDAWs: first anywhere, next on a 2 KiB boundary.
    prog(
        &m,
        PROG as u64,
        &[c1(0x02, f().with_ida(true), 0x810, 0x1800)],
    );
    put(
        &m,
        0x1800,
        &[0x00, 0x00, 0x27, 0xF0, 0x00, 0x00, 0x50, 0x00],
    );
    let mut run1 = ChannelRun::new(&orb(ctl()));
    run1.set_trace(true);
    let Step::Done(s) = run1.step(&m, &mut d) else {
        panic!()
    };
    assert_eq!((s.cstat, s.count), (0, 0));
    assert_eq!(
        run1.transfers(),
        [
            Transfer {
                addr: 0x27F0,
                len: 0x10,
                input: true
            },
            Transfer {
                addr: 0x5000,
                len: 0x800,
                input: true
            },
        ]
    );
    assert_eq!(get(&m, 0x27F0, 0x10), pat(0, 0x10));
    assert_eq!(get(&m, 0x5000, 4), pat(0x10, 4));
    // Later IDAW not on a block boundary.
    put(&m, 0x1804, &0x5010u32.to_be_bytes());
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    // Format-1 IDAW with bit 0 set.
    put(&m, 0x1800, &0x8000_2000u32.to_be_bytes());
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    // IDAL misaligned for format 2 (needs 8).
    prog(
        &m,
        PROG as u64,
        &[c1(0x02, f().with_ida(true), 0x10, 0x1804)],
    );
    let c2 = ctl().with_format2_idaw(true);
    assert_pc(run(&m, &mut d, c2), 0x1008);
    // Format 2, 4 KiB blocks: one IDAW covers up to the 4 KiB boundary.
    prog(
        &m,
        PROG as u64,
        &[c1(0x01, f().with_ida(true), 0x1010, 0x1800)],
    );
    put(&m, 0x1800, &0x6FF8u64.to_be_bytes());
    put(&m, 0x1808, &0x8000u64.to_be_bytes());
    put(&m, 0x1810, &0x9000u64.to_be_bytes());
    put(&m, 0x6FF8, b"01234567");
    put(&m, 0x8000, b"89");
    let before = d.written().len();
    let s = run(&m, &mut d, c2);
    assert_eq!(s.cstat, 0);
    assert_eq!(&d.written()[before..before + 10], b"0123456789");
    assert_eq!(d.written().len() - before, 0x1010);
    // The same list with 2 KiB blocks: each IDAW covers at most 2 KiB, so a fourth is used.
    put(&m, 0x1818, &0xA000u64.to_be_bytes());
    put(&m, 0xA000, b"zz");
    let before = d.written().len();
    let s = run(&m, &mut d, c2.with_idaw_2k(true));
    assert_eq!(s.cstat, 0);
    assert_eq!(&d.written()[before + 0x1008..], b"zz\0\0\0\0\0\0");
}

#[test]
fn read_backward_direct_and_ida() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    // Direct: designated address is the highest byte; data[0] goes there.
    prog(&m, PROG as u64, &[c1(0x0C, f(), 4, 0x2003)]);
    assert_eq!(run(&m, &mut d, ctl()).cstat, 0);
    let p = pat(0, 4);
    assert_eq!(get(&m, 0x2000, 4), vec![p[3], p[2], p[1], p[0]]);
    // Underflow below address 0.
    prog(&m, PROG as u64, &[c1(0x0C, f(), 4, 0x2)]);
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    // IDA backward: first IDAW anywhere (down to its block start), later ones must
    // designate a block's last byte.
    prog(&m, PROG as u64, &[c1(0x0C, f().with_ida(true), 6, 0x1800)]);
    put(&m, 0x1800, &0x3001u32.to_be_bytes());
    put(&m, 0x1804, &0x47FFu32.to_be_bytes());
    assert_eq!(run(&m, &mut d, ctl()).cstat, 0);
    let p = pat(4, 6);
    assert_eq!(get(&m, 0x3000, 2), vec![p[1], p[0]]);
    assert_eq!(get(&m, 0x47FC, 4), vec![p[5], p[4], p[3], p[2]]);
    put(&m, 0x1804, &0x4800u32.to_be_bytes());
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
}

#[test]
fn skip_flag() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    put(&m, 0x2000, &[0xAA; 8]);
    // Input with skip: count consumed, nothing stored (even at an unmapped address).
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x02, f().with_skp(true).with_cd(true), 4, 0x20_0000),
            c1(0x02, f(), 4, 0x2000),
        ],
    );
    let mut r = ChannelRun::new(&orb(ctl()));
    r.set_trace(true);
    let Step::Done(s) = r.step(&m, &mut d) else {
        panic!()
    };
    assert_eq!((s.cstat, s.count), (0, 0));
    assert_eq!(get(&m, 0x2000, 4), pat(4, 4));
    assert_eq!(
        r.transfers(),
        [Transfer {
            addr: 0x2000,
            len: 4,
            input: true
        }]
    );
    // Output: skip ignored.
    prog(&m, PROG as u64, &[c1(0x01, f().with_skp(true), 2, 0x2000)]);
    put(&m, 0x2000, b"hi");
    run(&m, &mut d, ctl());
    assert_eq!(d.written(), b"hi");
}

fn midaw(flags: MidawFlags, count: u16, data: u64) -> [u8; 16] {
    Midaw {
        reserved: 0,
        flags,
        count,
        data,
    }
    .to_bytes()
}

#[test]
fn mida_rules() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    let on = ctl().with_midaw(true);
    let mf = MidawFlags::new;
    prog(
        &m,
        PROG as u64,
        &[c1(0x02, f().with_mida(true), 12, 0x1800)],
    );
    put(&m, 0x1800, &midaw(mf(), 4, 0x2FFC));
    put(&m, 0x1810, &midaw(mf().with_skip(true), 4, 0x20_0000));
    put(&m, 0x1820, &midaw(mf().with_last(true), 4, 0x5000));
    let s = run(&m, &mut d, on);
    assert_eq!((s.cstat, s.count), (0, 0));
    assert_eq!(get(&m, 0x2FFC, 4), pat(0, 4));
    assert_eq!(get(&m, 0x5000, 4), pat(8, 4));
    // Without the ORB bit; with IDA; with skip on the CCW.
    assert_pc(run(&m, &mut d, ctl()), 0x1008);
    prog(
        &m,
        PROG as u64,
        &[c1(0x02, f().with_mida(true).with_ida(true), 12, 0x1800)],
    );
    assert_pc(run(&m, &mut d, on), 0x1008);
    prog(
        &m,
        PROG as u64,
        &[c1(0x02, f().with_mida(true).with_skp(true), 12, 0x1800)],
    );
    assert_pc(run(&m, &mut d, on), 0x1008);
    // MIDAL not quadword aligned.
    prog(
        &m,
        PROG as u64,
        &[c1(0x02, f().with_mida(true), 12, 0x1808)],
    );
    assert_pc(run(&m, &mut d, on), 0x1008);
    prog(
        &m,
        PROG as u64,
        &[c1(0x02, f().with_mida(true), 12, 0x1800)],
    );
    // Count 0; reserved bits; crossing 4 KiB; sum over the CCW count; last too early.
    let cases: [[u8; 16]; 5] = [
        midaw(mf().with_last(true), 0, 0x5000),
        {
            let mut b = midaw(mf().with_last(true), 4, 0x5000);
            b[2] = 1;
            b
        },
        midaw(mf(), 8, 0x2FFC),
        midaw(mf(), 13, 0x5000),
        midaw(mf().with_last(true), 2, 0x5000),
    ];
    for c in cases {
        put(&m, 0x1800, &c);
        assert_pc(run(&m, &mut d, on), 0x1008);
    }
    // Reserved flag bits.
    put(&m, 0x1800, &midaw(mf().with_reserved(1), 4, 0x5000));
    assert_pc(run(&m, &mut d, on), 0x1008);
}

#[test]
fn command_chaining_and_status_modifier() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    d.status_modifier_on = Some(0x07);
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x07, f().with_cc(true), 0, 0),
            c1(0x01, f(), 1, 0x2000), // skipped
            c1(0x03, f().with_cc(true), 0, 0),
            c1(0x13, f(), 0, 0),
        ],
    );
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.dstat, s.cstat, s.cpa), (CEDE, 0, 0x1020));
    let codes: Vec<(u8, bool, Option<u8>, u32)> = d
        .commands()
        .iter()
        .map(|c| (c.code, c.chained, c.prev_code, c.seq))
        .collect();
    assert_eq!(
        codes,
        [
            (0x07, false, None, 0),
            (0x03, true, Some(0x07), 1),
            (0x13, true, Some(0x03), 2)
        ]
    );
}

/// A device that presents status modifier from a command it did not declare (the translator
/// prepared no slot after the chain's end for it) has it dropped: no skip.
#[test]
fn status_modifier_from_an_undeclared_command_is_dropped() {
    let m = mem();
    let mut d = LoopbackDevice::new();
    d.status_modifier_on = Some(0x07);
    d.declared_status_modifier = vccw::ccw::CommandSet::of(&[0x31]);
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x07, f().with_cc(true), 0, 0),
            c1(0x03, f(), 0, 0), // not skipped
            c1(0x13, f(), 0, 0),
        ],
    );
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.dstat, s.cstat, s.cpa), (CEDE, 0, 0x1010));
    let codes: Vec<u8> = d.commands().iter().map(|c| c.code).collect();
    assert_eq!(codes, [0x07, 0x03]);
}

#[test]
fn unit_check_and_exception_end_the_chain() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x03, f().with_cc(true), 0, 0),
            c1(0x13, f().with_cc(true), 0, 0),
            c1(0x03, f(), 0, 0),
        ],
    );
    let mut d = LoopbackDevice::new();
    d.unit_check_on = Some(0x13);
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.dstat, s.cpa), (CEDE | dstat::UNIT_CHECK, 0x1010));
    assert_eq!(s.flags.stctl(), FINAL_ALERT);
    assert_eq!(d.commands().len(), 2);
    let mut d = LoopbackDevice::new();
    d.unit_exception_on = Some(0x13);
    let s = run(&m, &mut d, ctl());
    assert_eq!((s.dstat, s.cpa), (CEDE | dstat::UNIT_EXCEPTION, 0x1010));
    assert_eq!(d.commands().len(), 2);
}

#[test]
fn pci_intermediate_and_final() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x03, f().with_cc(true).with_pci(true), 0, 0),
            c1(0x03, f().with_pci(true), 0, 0),
        ],
    );
    let mut d = LoopbackDevice::new();
    let mut r = ChannelRun::new(&orb(ctl()));
    let Step::Intermediate(i) = r.step(&m, &mut d) else {
        panic!()
    };
    assert_eq!((i.cstat, i.cpa, i.dstat), (cstat::PCI, 0x1008, 0));
    assert_eq!(i.flags.stctl(), stctl::INTERMEDIATE | stctl::STATUS_PENDING);
    assert_eq!(
        i.flags.actl(),
        actl::SUBCHANNEL_ACTIVE | actl::DEVICE_ACTIVE
    );
    assert_eq!(i.flags.fctl(), fctl::START);
    // PCI on the last CCW is presented with the final status.
    let Step::Done(s) = r.step(&m, &mut d) else {
        panic!()
    };
    assert_eq!(
        (s.cstat, s.cpa, s.flags.stctl()),
        (cstat::PCI, 0x1010, FINAL)
    );
    assert_eq!(r.step(&m, &mut d), Step::Done(s));
}

#[test]
fn initial_status_interruption() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[c1(0x03, f().with_cc(true), 0, 0), c1(0x03, f(), 0, 0)],
    );
    let mut d = LoopbackDevice::new();
    let all = run_to_completion(
        &orb(ctl().with_initial_status_interrupt(true)),
        &m,
        &mut d,
        10,
    );
    assert_eq!(all.len(), 2);
    assert!(all[0].flags.zero_cc());
    assert_eq!(
        all[0].flags.stctl(),
        stctl::INTERMEDIATE | stctl::STATUS_PENDING
    );
    assert!(!all[1].flags.zero_cc());
}

#[test]
fn suspend_and_resume() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x03, f().with_cc(true), 0, 0),
            c1(0x01, f().with_s(true), 2, 0x2000),
        ],
    );
    put(&m, 0x2000, b"ok");
    let mut d = LoopbackDevice::new();
    // S without ORB suspend control: program check before the CCW runs.
    let s = run(&m, &mut d, ctl());
    assert_pc(s, 0x1010);
    assert!(d.written().is_empty());
    let c = ctl().with_suspend(true);
    let mut r = ChannelRun::new(&orb(c));
    assert_eq!(r.step(&m, &mut d), Step::Continue);
    let Step::Suspended(Some(s)) = r.step(&m, &mut d) else {
        panic!()
    };
    assert_eq!(s.flags.actl(), actl::SUSPENDED);
    assert_eq!(s.flags.stctl(), SUSPENDED_STCTL);
    assert_eq!((s.cpa, s.count, s.dstat, s.cstat), (0x1010, 2, 0, 0));
    assert!(d.written().is_empty());
    assert_eq!(r.step(&m, &mut d), Step::Suspended(None));
    // Resume refetches the CCW: still S -> suspends again.
    r.resume().unwrap();
    assert!(matches!(r.step(&m, &mut d), Step::Suspended(Some(_))));
    // The program clears S, then resumes.
    put(&m, 0x1008, &c1(0x01, f(), 2, 0x2000));
    r.resume().unwrap();
    let Step::Done(s) = r.step(&m, &mut d) else {
        panic!()
    };
    assert_eq!((s.cstat, s.cpa), (0, 0x1010));
    assert_eq!(d.written(), b"ok");
    assert!(!d.commands().last().unwrap().chained);
    assert_eq!(r.resume(), Err(ResumeError::NotSuspended));
    // Suppressed suspended interruption.
    put(&m, 0x1008, &c1(0x01, f().with_s(true), 2, 0x2000));
    let all = run_to_completion(
        &orb(c.with_suppress_suspended_interrupt(true)),
        &m,
        &mut d,
        10,
    );
    assert!(all.is_empty());
}

#[test]
fn storage_faults() {
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mut m = GuestChannelMemory::with_keys(gm);
    m.set_key(0x2000, 0x30);
    m.set_key(0x3000, 0x38);
    m.set_key(0x4000, 0x48);
    prog(&m, PROG as u64, &[c1(0x02, f(), 4, 0x2000)]);
    let mut d = LoopbackDevice::new();
    // Store with a wrong key: protection check, nothing stored, residual = count.
    let s = run(&m, &mut d, ctl().with_key(5));
    assert_eq!(
        (s.cstat, s.cpa, s.count),
        (cstat::PROTECTION_CHECK, 0x1008, 4)
    );
    assert_eq!(s.dstat, CEDE);
    assert_eq!(s.flags.stctl(), FINAL_ALERT);
    assert_eq!(get(&m, 0x2000, 4), vec![0; 4]);
    assert_eq!(run(&m, &mut d, ctl().with_key(3)).cstat, 0);
    // Fetch-protected output data.
    prog(&m, PROG as u64, &[c1(0x01, f(), 4, 0x3000)]);
    let s = run(&m, &mut d, ctl().with_key(5));
    assert_eq!(s.cstat, cstat::PROTECTION_CHECK);
    // A fetch-protected CCW.
    let mut o = orb(ctl().with_key(5));
    o.cpa = 0x4000;
    let s = run_to_completion(&o, &m, &mut d, 10)[0];
    assert_eq!((s.cstat, s.cpa), (cstat::PROTECTION_CHECK, 0x4008));
    // Key 0 passes everything.
    assert_eq!(run_to_completion(&orb(ctl()), &m, &mut d, 10)[0].cstat, 0);
}

#[test]
fn tic_loop_without_data_ends() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[c1(0x03, f().with_cc(true), 0, 0), c1(0x08, f(), 0, PROG)],
    );
    let mut d = LoopbackDevice::new();
    let mut r = ChannelRun::new(&orb(ctl()));
    let mut steps = 0;
    let s = loop {
        steps += 1;
        assert!(steps < 1000);
        if let Step::Done(s) = r.step(&m, &mut d) {
            break s;
        }
    };
    assert_eq!(s.cstat, cstat::PROGRAM_CHECK);
    // 255 CCWs fetched without data: 128 NOOPs and 127 TICs; the 256th fetch is refused.
    assert_eq!(d.commands().len() as u32, MAX_CCWS_WITHOUT_DATA / 2 + 1);
    // A data-chained TIC loop is bounded as well.
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x01, f().with_cd(true), 8, 0x2000),
            c1(0x08, f(), 0, PROG),
        ],
    );
    let s = run(&m, &mut d, ctl());
    assert_eq!(s.cstat & cstat::PROGRAM_CHECK, cstat::PROGRAM_CHECK);
}

#[test]
fn halt_and_clear_between_ccws() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[c1(0x03, f().with_cc(true), 0, 0), c1(0x03, f(), 0, 0)],
    );
    let mut d = LoopbackDevice::new();
    let mut r = ChannelRun::new(&orb(ctl().with_key(2)));
    assert_eq!(r.step(&m, &mut d), Step::Continue);
    let h = r.halt(&mut d);
    assert_eq!(h.flags.fctl(), fctl::START | fctl::HALT);
    assert_eq!(
        (h.flags.actl(), h.flags.stctl()),
        (0, stctl::STATUS_PENDING)
    );
    assert_eq!(
        (h.dstat, h.cstat, h.cpa, h.flags.key()),
        (dstat::DEVICE_END, 0, 0x1008, 2)
    );
    assert_eq!(d.counts(), (1, 1));
    assert!(r.is_finished());
    assert_eq!(r.step(&m, &mut d), Step::Done(h));
    assert_eq!(d.commands().len(), 1);

    let mut r = ChannelRun::new(&orb(ctl().with_key(2)));
    assert_eq!(r.step(&m, &mut d), Step::Continue);
    let c = r.clear(&mut d);
    assert_eq!(
        c.to_bytes(),
        [0x00, 0x00, 0x10, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(d.counts(), (2, 2));
}

#[test]
fn transfers_only_data_and_merged() {
    let m = mem();
    prog(
        &m,
        PROG as u64,
        &[
            c1(0x01, f().with_cd(true), 0x10, 0x2FF8),
            c1(0x01, f().with_cc(true), 0x8, 0x3008),
            c1(0x02, f(), 0x4, 0x5000),
        ],
    );
    let mut d = LoopbackDevice::new();
    let mut r = ChannelRun::new(&orb(ctl()));
    r.set_trace(true);
    while !matches!(r.step(&m, &mut d), Step::Done(_)) {}
    assert_eq!(
        r.transfers(),
        [
            Transfer {
                addr: 0x2FF8,
                len: 0x18,
                input: false
            },
            Transfer {
                addr: 0x5000,
                len: 4,
                input: true
            },
        ]
    );
    // Tracing off: nothing recorded.
    let mut r = ChannelRun::new(&orb(ctl()));
    while !matches!(r.step(&m, &mut d), Step::Done(_)) {}
    assert!(r.transfers().is_empty());
}

#[test]
fn hostile_memory_never_panics() {
    // A program of random bytes over a small memory must end within the step bound.
    let m = mem();
    let mut seed = 0x1234_5678u32;
    for round in 0..200 {
        for i in 0..64 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            put(&m, PROG as u64 + i * 4, &seed.to_be_bytes());
        }
        let c = OrbControls::from_bits(seed & 0xfffe_ff7e).with_transport_mode(false);
        let mut d = LoopbackDevice::new();
        let all = run_to_completion(&orb(c), &m, &mut d, 600);
        // Every status presented is pending and names the start function.
        for s in &all {
            assert_ne!(s.flags.stctl() & stctl::STATUS_PENDING, 0, "round {round}");
            assert_eq!(s.flags.fctl(), fctl::START, "round {round}");
        }
    }
}

/// Runs the program at PROG over a fresh memory prepared by `setup`, with the loopback device
/// filling the channel's buffer (`chunk` None) or putting its input straight to storage in
/// `chunk`-byte pieces; returns every status, the memory, the traced transfers and the bytes
/// the device produced.
fn run_mode(
    setup: &dyn Fn(&mut Mem),
    c: OrbControls,
    length: Length,
    chunk: Option<usize>,
) -> (Vec<Scsw>, Vec<u8>, Vec<Transfer>, Vec<u8>) {
    let mut m = GuestChannelMemory::with_keys(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
    );
    setup(&mut m);
    let mut d = LoopbackDevice::new();
    d.length = length;
    d.put_chunk = chunk;
    let mut r = ChannelRun::new(&orb(c));
    r.set_trace(true);
    let all = r.run_until_end(&m, &mut d, 600);
    (
        all,
        get(&m, 0, 0x10_0000),
        r.transfers().to_vec(),
        d.produced().to_vec(),
    )
}

/// Direct input (the device puts bytes, stored at once) gives exactly what buffered input
/// gives: statuses, every byte of storage, transfers.
fn assert_same_as_buffered(setup: &dyn Fn(&mut Mem), c: OrbControls, length: Length) {
    let want = run_mode(setup, c, length, None);
    for chunk in [1, 3, 7, 2048, 4096, 1 << 20] {
        let got = run_mode(setup, c, length, Some(chunk));
        assert_eq!(got.0, want.0, "statuses, chunk {chunk}");
        assert_eq!(got.2, want.2, "transfers, chunk {chunk}");
        assert_eq!(got.3, want.3, "produced, chunk {chunk}");
        assert!(got.1 == want.1, "storage differs, chunk {chunk}");
    }
}

#[test]
fn direct_input_matches_buffered_input() {
    let mf = MidawFlags::new;
    let idal = |m: &Mem, at: u64, ws: &[u64]| {
        for (i, w) in ws.iter().enumerate() {
            put(m, at + 8 * i as u64, &w.to_be_bytes());
        }
    };
    let c2 = ctl().with_format2_idaw(true);
    type Case = (Box<dyn Fn(&mut Mem)>, OrbControls, Vec<Length>);
    let lens = || {
        vec![
            Length::AsOffered,
            Length::Fixed(0),
            Length::Fixed(5),
            Length::Fixed(4100),
            Length::Fixed(1 << 16),
        ]
    };
    let cases: Vec<Case> = vec![
        // Direct, across a page boundary, chained to a read backward across one.
        (
            Box::new(|m: &mut Mem| {
                prog(
                    m,
                    PROG as u64,
                    &[
                        c1(0x02, f().with_cc(true).with_sli(true), 0x1100, 0x2FF0),
                        c1(0x0C, f(), 0x30, 0x5010),
                    ],
                )
            }),
            ctl(),
            lens(),
        ),
        // Format-2 IDAWs, forward and backward.
        (
            Box::new(move |m: &mut Mem| {
                prog(
                    m,
                    PROG as u64,
                    &[
                        c1(0x02, f().with_ida(true).with_cc(true), 9000, 0x1800),
                        c1(0x0C, f().with_ida(true), 5000, 0x1900),
                    ],
                );
                idal(m, 0x1800, &[0x8F00, 0xA000, 0xB000]);
                idal(m, 0x1900, &[0xC0FF, 0xDFFF]);
            }),
            c2,
            lens(),
        ),
        // Data chaining with a skipped CCW in the middle.
        (
            Box::new(|m: &mut Mem| {
                prog(
                    m,
                    PROG as u64,
                    &[
                        c1(0x02, f().with_cd(true), 10, 0x3000),
                        c1(0x02, f().with_cd(true).with_skp(true), 10, 0x3100),
                        c1(0x02, f(), 10, 0x3200),
                    ],
                )
            }),
            ctl(),
            vec![Length::AsOffered, Length::Fixed(15), Length::Fixed(25)],
        ),
        // MIDAWs with a skip.
        (
            Box::new(move |m: &mut Mem| {
                prog(m, PROG as u64, &[c1(0x02, f().with_mida(true), 12, 0x1800)]);
                put(m, 0x1800, &midaw(mf(), 4, 0x2FFC));
                put(m, 0x1810, &midaw(mf().with_skip(true), 4, 0x20_0000));
                put(m, 0x1820, &midaw(mf().with_last(true), 4, 0x5000));
            }),
            ctl().with_midaw(true),
            vec![Length::AsOffered, Length::Fixed(6), Length::Fixed(10)],
        ),
        // Storage runs out inside the transfer (addressing), direct and backward.
        (
            Box::new(|m: &mut Mem| {
                prog(
                    m,
                    PROG as u64,
                    &[c1(0x02, f().with_cc(true), 0x2000, 0xFF000)],
                )
            }),
            ctl(),
            lens(),
        ),
        // A protected page in the middle of a chain: the pieces before it stay stored.
        (
            Box::new(|m: &mut Mem| {
                m.set_key(0x4000, 0x30);
                prog(
                    m,
                    PROG as u64,
                    &[
                        c1(0x02, f().with_cd(true), 0x800, 0x3800),
                        c1(0x02, f(), 0x800, 0x4000),
                    ],
                )
            }),
            ctl().with_key(5),
            lens(),
        ),
        // An invalid data-chained CCW after the first: the device decides if it is reached.
        (
            Box::new(|m: &mut Mem| {
                prog(
                    m,
                    PROG as u64,
                    &[c1(0x02, f().with_cd(true), 8, 0x3000), c1(0x02, f(), 0, 0)],
                )
            }),
            ctl(),
            vec![Length::Fixed(4), Length::Fixed(8), Length::Fixed(9)],
        ),
    ];
    for (setup, c, lengths) in &cases {
        for &l in lengths {
            assert_same_as_buffered(setup.as_ref(), *c, l);
        }
    }
    // And the expected values of one: 5 bytes put one at a time, the rest untouched.
    let (s, mem, t, _) = run_mode(&cases[0].0, ctl(), Length::Fixed(5), Some(1));
    // The read backward after it (no SLI) ends with incorrect length, residual 0x2b.
    let last = s.last().unwrap();
    assert_eq!((last.cstat, last.count), (cstat::INCORRECT_LENGTH, 0x2b));
    assert_eq!(&mem[0x2FF0..0x2FF5], &pat(0, 5)[..]);
    // Read backward: the first byte produced is at the highest address.
    assert_eq!(mem[0x5010], LoopbackDevice::pattern(5));
    assert_eq!(mem[0x500c], LoopbackDevice::pattern(9));
    assert_eq!(mem[0x500b], 0);
    assert_eq!(&mem[0x2FF5..0x3000], &[0; 11]);
    assert_eq!(
        t[0],
        Transfer {
            addr: 0x2FF0,
            len: 5,
            input: true
        }
    );
}

#[test]
fn direct_input_matches_buffered_input_on_random_programs() {
    let mut seed = 0x0bad_5eedu32;
    let mut next = move || {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        seed
    };
    for _ in 0..150 {
        let words: Vec<u32> = (0..64).map(|_| next()).collect();
        // Data addresses mostly inside the 1 MiB, CCW commands mostly reads.
        let setup = move |m: &mut Mem| {
            for (i, w) in words.iter().enumerate() {
                let w = if i % 2 == 0 {
                    (w & 0xF0FF_FFFF) | 0x0200_0000
                } else {
                    w & 0x001F_FFFF
                };
                put(m, PROG as u64 + i as u64 * 4, &w.to_be_bytes());
            }
            m.set_key(0x8_0000, 0x38);
        };
        let c = OrbControls::from_bits(next() & 0x00fe_ff7e)
            .with_format1(true)
            .with_transport_mode(false);
        let l = match next() % 3 {
            0 => Length::AsOffered,
            n => Length::Fixed((next() % (0x800 * n)) as usize),
        };
        assert_same_as_buffered(&setup, c, l);
    }
}

/// Puts two bytes but reports `reported` transferred.
struct ShortPut {
    reported: usize,
}

impl vccw::css::DeviceModel for ShortPut {
    fn execute(&mut self, _: &vccw::css::Command, _: &mut [u8]) -> vccw::css::Outcome {
        unreachable!("the channel calls execute_area")
    }

    fn execute_area(
        &mut self,
        _: &vccw::css::Command,
        data: &mut vccw::css::DataArea<'_>,
    ) -> vccw::css::Outcome {
        assert_eq!(data.output(), b"", "a direct input area has no buffer");
        assert_eq!(data.put(b"ab"), 2);
        vccw::css::Outcome::done(self.reported)
    }

    fn sense(&self) -> Vec<u8> {
        vec![0; 32]
    }

    fn identity(&self) -> vccw::css::DeviceIdentity {
        LoopbackDevice::new().identity
    }
}

#[test]
fn direct_input_stores_zeros_for_bytes_transferred_but_not_put() {
    let m = mem();
    put(&m, 0x2000, &[0xEE; 16]);
    prog(&m, PROG as u64, &[c1(0x02, f().with_sli(true), 8, 0x2000)]);
    let s = run_to_completion(&orb(ctl()), &m, &mut ShortPut { reported: 5 }, 10)[0];
    assert_eq!((s.cstat, s.count, s.dstat), (0, 3, CEDE));
    assert_eq!(
        get(&m, 0x2000, 9),
        [b'a', b'b', 0, 0, 0, 0xEE, 0xEE, 0xEE, 0xEE]
    );
    // Reported as 0: the bytes put are stored (the device broke the rule), no fault reported.
    put(&m, 0x2000, &[0xEE; 16]);
    let s = run_to_completion(&orb(ctl()), &m, &mut ShortPut { reported: 0 }, 10)[0];
    assert_eq!((s.cstat, s.count), (0, 8));
}

#[test]
fn restarted_run_behaves_like_a_fresh_one() {
    // One run reused for a data-chained write, a program check, and a read: each program's
    // statuses and storage match those of a fresh run.
    let programs: Vec<(Vec<[u8; 8]>, OrbControls)> = vec![
        (
            vec![
                c1(0x01, f().with_cd(true), 4, 0x2000),
                c1(0x01, f(), 4, 0x2100),
            ],
            ctl(),
        ),
        (vec![c1(0x01, f(), 4, 0x8000_0000)], ctl()),
        (vec![c1(0x02, f().with_sli(true), 64, 0x3000)], ctl()),
    ];
    let (fresh_mem, reused_mem) = (mem(), mem());
    let mut reused: Option<ChannelRun> = None;
    for (ccws, c) in &programs {
        for m in [&fresh_mem, &reused_mem] {
            put(m, 0x2000, b"abcd");
            put(m, 0x2100, b"efgh");
            prog(m, PROG as u64, ccws);
        }
        let want = run_to_completion(&orb(*c), &fresh_mem, &mut LoopbackDevice::new(), 100);
        let run = match reused.as_mut() {
            Some(r) => {
                r.restart(&orb(*c));
                r
            }
            None => reused.insert(ChannelRun::new(&orb(*c))),
        };
        let got = run.run_until_end(&reused_mem, &mut LoopbackDevice::new(), 100);
        assert_eq!(got, want);
        assert_eq!(get(&reused_mem, 0x3000, 64), get(&fresh_mem, 0x3000, 64));
    }
}
