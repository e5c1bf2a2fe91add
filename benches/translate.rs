//! Translation cost: 1-, 16- and 256-CCW chains with direct 4 KiB data, guest IDALs and MIDAW
//! lists, with 1 and with 65,535 mappings in the store.
//!
//! Criterion reports time per translation; with `Throughput::Elements(ccws)` it also reports
//! CCWs per second (ns per CCW = 1e9 / that rate). Each translation includes dropping the
//! program, so every pin is also released.

use std::sync::Arc;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use vccw::ccw::{translate, Ccw1, CcwFlags, Midaw, MidawFlags, TranslateConfig};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig, StoreMmapRegion};
use vccw::orb::{Orb, OrbControls};

const PROG: u64 = 0x1000;
const LISTS: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const RAM: u64 = 16 << 20;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Direct,
    Idal,
    Midaw,
}

fn store(mappings: usize) -> IommuStore {
    let extra = mappings as u64 - 1;
    let region = Arc::new(StoreMmapRegion::new((RAM + extra * 4096) as usize).expect("mmap"));
    let s = IommuStore::new(StoreConfig {
        dma_entry_limit: 65_535,
    });
    s.map_dma(
        0,
        RAM,
        Perm::READ_WRITE,
        Backing::Region {
            region: region.clone(),
            offset: 0,
        },
    )
    .unwrap();
    // The other mappings: one page each, above guest RAM, with gaps so none merge.
    for i in 0..extra {
        s.map_dma(
            (1 << 32) + i * 8192,
            4096,
            Perm::READ_WRITE,
            Backing::Region {
                region: region.clone(),
                offset: RAM + i * 4096,
            },
        )
        .unwrap();
    }
    s
}

fn program(s: &IommuStore, kind: Kind, n: usize) -> Orb {
    let mut ctl = OrbControls::new()
        .with_format1(true)
        .with_format2_idaw(true);
    for i in 0..n as u64 {
        let data = DATA + i * 4096;
        let flags = CcwFlags::new().with_cc(i + 1 < n as u64);
        let ccw = match kind {
            Kind::Direct => Ccw1 {
                cmd: 0x02,
                flags,
                count: 4096,
                cda: data as u32,
            },
            Kind::Idal => {
                let list = LISTS + i * 8;
                s.write(list, &data.to_be_bytes()).unwrap();
                Ccw1 {
                    cmd: 0x02,
                    flags: flags.with_ida(true),
                    count: 4096,
                    cda: list as u32,
                }
            }
            Kind::Midaw => {
                ctl.set_midaw(true);
                let list = LISTS + i * 32;
                // Two halves in different pages: the second half of one page, then the
                // first half of the next (one host IDAL describes it).
                let m = |d: u64, last: bool| Midaw {
                    reserved: 0,
                    flags: MidawFlags::new().with_last(last),
                    count: 2048,
                    data: d,
                };
                s.write(list, &m(data + 2048, false).to_bytes()).unwrap();
                s.write(list + 16, &m(data + 4096, true).to_bytes())
                    .unwrap();
                Ccw1 {
                    cmd: 0x02,
                    flags: flags.with_mida(true),
                    count: 4096,
                    cda: list as u32,
                }
            }
        };
        s.write(PROG + 8 * i, &ccw.to_bytes()).unwrap();
    }
    // End the chain with an invalid CCW: otherwise a longer chain written earlier would be
    // reached speculatively (the slot after the last one is reachable by status modifier).
    s.write(PROG + 8 * n as u64, &[0; 8]).unwrap();
    Orb {
        intparm: 1,
        ctl,
        cpa: PROG as u32,
    }
}

fn chains(c: &mut Criterion) {
    let cfg = TranslateConfig::default();
    let s = store(1);
    let mut g = c.benchmark_group("translate");
    for kind in [Kind::Direct, Kind::Idal, Kind::Midaw] {
        for n in [1usize, 16, 256] {
            let orb = program(&s, kind, n);
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new(format!("{kind:?}"), n), &n, |b, _| {
                b.iter(|| translate(&orb, &s, &cfg).unwrap())
            });
        }
    }
    g.finish();
}

fn mappings(c: &mut Criterion) {
    let cfg = TranslateConfig::default();
    let mut g = c.benchmark_group("translate-256-direct-mappings");
    for maps in [1usize, 65_535] {
        let s = store(maps);
        assert_eq!(s.stats().mappings, maps);
        let orb = program(&s, Kind::Direct, 256);
        g.throughput(Throughput::Elements(256));
        g.bench_with_input(BenchmarkId::from_parameter(maps), &maps, |b, _| {
            b.iter(|| translate(&orb, &s, &cfg).unwrap())
        });
    }
    g.finish();
}

/// The small programs end-to-end paths issue, where the per-program fixed cost dominates.
#[derive(Clone, Copy, Debug)]
enum Small {
    /// Linux dasd_eckd's 4 KiB read: Define Extent (16 bytes), Locate Record (16 bytes),
    /// Read Data MT (4096 bytes through a one-IDAW format-2 IDAL), command-chained.
    DasdRead4k,
    /// SENSE ID (7 bytes), then an 8-byte read, direct addresses, command-chained.
    SenseIdRead,
}

const SMALL_PROG: u64 = 0x3000;
const SMALL_DATA: u64 = 0x40_0000;

fn small_program(s: &IommuStore, which: Small) -> Orb {
    let ccw = |cmd: u8, cc: bool, count: u16, cda: u64| Ccw1 {
        cmd,
        flags: CcwFlags::new().with_cc(cc),
        count,
        cda: cda as u32,
    };
    let ccws = match which {
        Small::DasdRead4k => {
            let list = LISTS + 0x8000;
            let data = SMALL_DATA + 0x1000;
            s.write(list, &data.to_be_bytes()).unwrap();
            let mut rd = ccw(0x86, false, 4096, list);
            rd.flags = rd.flags.with_ida(true);
            vec![
                ccw(0x63, true, 16, SMALL_DATA),
                ccw(0x47, true, 16, SMALL_DATA + 16),
                rd,
            ]
        }
        Small::SenseIdRead => vec![
            ccw(0xe4, true, 7, SMALL_DATA),
            ccw(0x02, false, 8, SMALL_DATA + 0x100),
        ],
    };
    for (i, c) in ccws.iter().enumerate() {
        s.write(SMALL_PROG + 8 * i as u64, &c.to_bytes()).unwrap();
    }
    // An invalid CCW after the last (a status-modifier skip could reach it).
    s.write(SMALL_PROG + 8 * ccws.len() as u64, &[0; 8])
        .unwrap();
    Orb {
        intparm: 1,
        ctl: OrbControls::new()
            .with_format1(true)
            .with_format2_idaw(true),
        cpa: SMALL_PROG as u32,
    }
}

fn small(c: &mut Criterion) {
    let cfg = TranslateConfig::default();
    let s = store(1);
    let mut g = c.benchmark_group("translate-small");
    for which in [Small::DasdRead4k, Small::SenseIdRead] {
        let orb = small_program(&s, which);
        g.bench_function(format!("{which:?}"), |b| {
            b.iter(|| translate(&orb, &s, &cfg).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, chains, mappings, small);

/// `TRANSLATE_LOOP=<case>:<n>` runs `n` translations (and drops) of one case and exits, for
/// instruction counts: `valgrind --tool=callgrind` of `n` minus that of 0 iterations, over
/// `n`. Cases: `dasd` (the 3-CCW DASD read), `senseid` (the 2-CCW program), `direct256`.
fn main() {
    if let Ok(spec) = std::env::var("TRANSLATE_LOOP") {
        let (case, n) = spec.split_once(':').expect("TRANSLATE_LOOP=<case>:<n>");
        let n: usize = n.parse().expect("iteration count");
        let cfg = TranslateConfig::default();
        let s = store(1);
        let orb = match case {
            "dasd" => small_program(&s, Small::DasdRead4k),
            "senseid" => small_program(&s, Small::SenseIdRead),
            "direct256" => program(&s, Kind::Direct, 256),
            "idal256" => program(&s, Kind::Idal, 256),
            "midaw256" => program(&s, Kind::Midaw, 256),
            other => panic!("unknown case {other}"),
        };
        for _ in 0..n {
            std::hint::black_box(translate(std::hint::black_box(&orb), &s, &cfg).unwrap());
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
