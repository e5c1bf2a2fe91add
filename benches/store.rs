//! Pin + unpin cost of the store-only IOMMU: 1 and 16 pages, with 1 and with 65,535
//! mappings in the store. Prints ns per page after the criterion runs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig, StoreMmapRegion, PAGE_SIZE};

const PAGES_PER_MAP: u64 = 16;

/// A store with `n` mappings of 16 pages each, all aliasing one shared region (no per-map
/// mmap, so 65,535 mappings stay under the kernel's map-count limit). Returns the store and
/// the IOVA of a mapping in the middle.
fn store_with(n: u64) -> (IommuStore, u64) {
    let s = IommuStore::new(StoreConfig::default());
    let region = Arc::new(StoreMmapRegion::new((n * PAGES_PER_MAP * PAGE_SIZE) as usize).unwrap());
    for i in 0..n {
        let iova = i * PAGES_PER_MAP * PAGE_SIZE;
        let b = Backing::Region {
            region: Arc::clone(&region),
            offset: iova,
        };
        s.map_dma(iova, PAGES_PER_MAP * PAGE_SIZE, Perm::READ_WRITE, b)
            .unwrap();
    }
    let target = (n / 2) * PAGES_PER_MAP * PAGE_SIZE;
    // Warm the snapshot (the one lazy rebuild) and the page-count leaves.
    drop(
        s.pin(target, PAGES_PER_MAP as usize, Perm::READ_WRITE)
            .unwrap(),
    );
    (s, target)
}

fn bench(c: &mut Criterion) {
    for maps in [1u64, 65_535] {
        let (s, target) = store_with(maps);
        let mut g = c.benchmark_group(format!("pin_unpin/{maps}_mappings"));
        for pages in [1usize, 16] {
            g.throughput(Throughput::Elements(pages as u64));
            g.bench_function(format!("{pages}_pages"), |b| {
                b.iter(|| {
                    drop(black_box(
                        s.pin(black_box(target), pages, Perm::WRITE).unwrap(),
                    ))
                })
            });
        }
        g.finish();
    }
}

fn summary() {
    // Calibration: what one uncontended atomic read-modify-write costs on this machine
    // (a 1-page pin + unpin does about ten, counting the snapshot load).
    let a = std::sync::atomic::AtomicU64::new(0);
    let t = Instant::now();
    for _ in 0..10_000_000u32 {
        black_box(&a).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    let rmw = t.elapsed().as_nanos() as f64 / 1e7;
    println!("\ncalibration: one atomic fetch_add = {rmw:.1} ns");
    println!("ns per page (pin + unpin, 1,000,000 calls each):");
    for maps in [1u64, 65_535] {
        let (s, target) = store_with(maps);
        for pages in [1usize, 16] {
            let iters = 1_000_000u64;
            let t = Instant::now();
            for _ in 0..iters {
                drop(black_box(
                    s.pin(black_box(target), pages, Perm::WRITE).unwrap(),
                ));
            }
            let ns = t.elapsed().as_nanos() as f64 / (iters as f64 * pages as f64);
            println!("  {maps:>6} mappings, {pages:>2} pages/call: {ns:6.1} ns/page");
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
    // The hand-timed summary is a measurement: only when benchmarking, not when `cargo test
    // --all-targets` runs this target once in test mode.
    if std::env::args().any(|a| a == "--bench") {
        summary();
    }
}
