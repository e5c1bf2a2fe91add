//! Type1 store-only IOMMU: one test per rule, asserting the exact errno.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vccw::iommu_store::{
    Backing, IommuStore, Perm, PinnedPages, StoreConfig, StoreError, StoreMmapRegion,
    UnmapListener, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE;

fn store() -> IommuStore {
    IommuStore::new(StoreConfig::default())
}

fn errno<T: std::fmt::Debug>(r: Result<T, StoreError>) -> i32 {
    r.expect_err("expected an error").errno()
}

fn anon(s: &IommuStore, iova: u64, size: u64, perm: Perm) {
    s.map_dma(iova, size, perm, Backing::Anonymous).unwrap();
}

fn shared_region(size: usize) -> Arc<StoreMmapRegion> {
    Arc::new(StoreMmapRegion::new(size).unwrap())
}

/// Reads one byte through a pinned page's host address.
fn peek(pins: &PinnedPages, i: usize, off: usize) -> u8 {
    let p = pins.pages()[i];
    assert!(off < P as usize);
    // SAFETY: the page is pinned (its mapping is alive while `pins` lives) and `off` is
    // inside the page.
    unsafe { std::ptr::read_volatile((p.host_addr as *const u8).add(off)) }
}

fn poke(pins: &PinnedPages, i: usize, off: usize, v: u8) {
    let p = pins.pages()[i];
    assert!(p.writable && off < P as usize);
    // SAFETY: as in `peek`; the page is pinned for write in a read-write mapping.
    unsafe { std::ptr::write_volatile((p.host_addr as *mut u8).add(off), v) }
}

// ---------------------------------------------------------------- MAP

#[test]
fn map_without_read_or_write_is_einval() {
    let s = store();
    let none = Perm {
        read: false,
        write: false,
    };
    assert_eq!(
        errno(s.map_dma(0, P, none, Backing::Anonymous)),
        libc::EINVAL
    );
    assert_eq!(s.stats().mappings, 0);
}

#[test]
fn map_zero_size_is_einval() {
    assert_eq!(
        errno(store().map_dma(0, 0, Perm::READ, Backing::Anonymous)),
        libc::EINVAL
    );
}

#[test]
fn map_unaligned_iova_size_or_offset_is_einval() {
    let s = store();
    assert_eq!(
        errno(s.map_dma(0x800, P, Perm::READ, Backing::Anonymous)),
        libc::EINVAL
    );
    assert_eq!(
        errno(s.map_dma(0, P + 1, Perm::READ, Backing::Anonymous)),
        libc::EINVAL
    );
    let region = shared_region(4 * P as usize);
    let b = Backing::Region {
        region,
        offset: 0x10,
    };
    assert_eq!(errno(s.map_dma(0, P, Perm::READ, b)), libc::EINVAL);
    assert_eq!(s.stats().mappings, 0);
}

#[test]
fn map_that_wraps_is_einval_but_ending_at_top_is_legal() {
    let s = store();
    let top = u64::MAX - P + 1;
    assert_eq!(
        errno(s.map_dma(top, 2 * P, Perm::READ_WRITE, Backing::Anonymous)),
        libc::EINVAL
    );
    anon(&s, top, P, Perm::READ_WRITE);
    s.write(u64::MAX - 3, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    s.read(u64::MAX - 3, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    let pins = s.pin(top, 1, Perm::READ).unwrap();
    assert_eq!(peek(&pins, 0, P as usize - 1), 4);
    drop(pins);
    assert_eq!(s.unmap_dma(top, P, false).unwrap(), P);
}

#[test]
fn map_overlap_is_eexist() {
    let s = store();
    anon(&s, 0x10 * P, 4 * P, Perm::READ);
    for (iova, size) in [
        (0x10 * P, 4 * P),   // same
        (0x11 * P, P),       // inside
        (0xf * P, 2 * P),    // over the start
        (0x13 * P, 2 * P),   // over the end
        (0x8 * P, 0x20 * P), // covering
    ] {
        assert_eq!(
            errno(s.map_dma(iova, size, Perm::READ, Backing::Anonymous)),
            libc::EEXIST
        );
    }
    // Adjacent on both sides is fine.
    anon(&s, 0xf * P, P, Perm::READ);
    anon(&s, 0x14 * P, P, Perm::READ);
    assert_eq!(s.stats().mappings, 3);
}

#[test]
fn map_past_entry_limit_is_enospc() {
    let s = IommuStore::new(StoreConfig { dma_entry_limit: 3 });
    for i in 0..3 {
        anon(&s, i * 2 * P, P, Perm::READ);
    }
    assert_eq!(s.info().dma_avail, 0);
    assert_eq!(
        errno(s.map_dma(0x100 * P, P, Perm::READ, Backing::Anonymous)),
        libc::ENOSPC
    );
    // Overlap is reported before the limit, as type1 does.
    assert_eq!(
        errno(s.map_dma(0, P, Perm::READ, Backing::Anonymous)),
        libc::EEXIST
    );
    s.unmap_dma(0, P, false).unwrap();
    anon(&s, 0x100 * P, P, Perm::READ);
}

#[test]
fn default_limit_65535_maps_then_enospc_without_quadratic_cost() {
    let s = store();
    let n = 65_535u64;
    let region = shared_region(((n + 1) * P) as usize);
    let t = std::time::Instant::now();
    for i in 0..n {
        let b = Backing::Region {
            region: Arc::clone(&region),
            offset: i * P,
        };
        s.map_dma(i * P, P, Perm::READ_WRITE, b).unwrap();
        if i % 4096 == 0 {
            // Interleaved lookups force rebuilds: still only ~16 of them.
            let _ = s.storage_key(0).unwrap();
        }
    }
    let b = Backing::Region {
        region: Arc::clone(&region),
        offset: n * P,
    };
    assert_eq!(errno(s.map_dma(n * P, P, Perm::READ, b)), libc::ENOSPC);
    assert_eq!(s.info().dma_avail, 0);
    // A pin at the end goes through the (once rebuilt) snapshot.
    s.write((n - 1) * P + 5, &[0xab]).unwrap();
    let pins = s.pin((n - 1) * P, 1, Perm::READ).unwrap();
    assert_eq!(peek(&pins, 0, 5), 0xab);
    drop(pins);
    assert_eq!(s.unmap_dma(0, 0, true).unwrap(), n * P);
    // Generous bound (debug build, shared CI core, x8 under qemu-user): catches O(n^2)
    // behaviour (minutes).
    let bound = if std::env::var_os("VCCW_UNDER_QEMU").is_some() {
        240
    } else {
        30
    };
    assert!(
        t.elapsed() < Duration::from_secs(bound),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn file_backing_is_shared_and_refused_past_eof() {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(&vec![0x5a; 2 * P as usize]).unwrap();
    let s = store();
    let b = |off| Backing::File {
        file: f.try_clone().unwrap(),
        offset: off,
    };
    assert_eq!(errno(s.map_dma(0, 3 * P, Perm::READ, b(0))), libc::EINVAL);
    assert_eq!(errno(s.map_dma(0, 2 * P, Perm::READ, b(P))), libc::EINVAL);
    assert_eq!(errno(s.map_dma(0, P, Perm::READ, b(7))), libc::EINVAL);
    s.map_dma(0, P, Perm::READ_WRITE, b(P)).unwrap();
    let mut buf = [0u8; 2];
    s.read(P - 2, &mut buf).unwrap();
    assert_eq!(buf, [0x5a, 0x5a]);
    s.write(0, b"hi").unwrap();
    let mut back = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, P).unwrap();
    assert_eq!(&back, b"hi", "MAP_SHARED: the file sees the store's write");
}

#[test]
fn file_backing_read_only_fd_with_write_perm_is_eacces() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0; P as usize]).unwrap();
    let ro = std::fs::File::open(f.path()).unwrap();
    let s = store();
    let b = Backing::File {
        file: ro.try_clone().unwrap(),
        offset: 0,
    };
    assert_eq!(errno(s.map_dma(0, P, Perm::READ_WRITE, b)), libc::EACCES);
    s.map_dma(
        0,
        P,
        Perm::READ,
        Backing::File {
            file: ro,
            offset: 0,
        },
    )
    .unwrap();
}

#[test]
fn region_backing_shares_memory_and_checks_bounds() {
    let region = shared_region(4 * P as usize);
    let s = store();
    let b = |off| Backing::Region {
        region: Arc::clone(&region),
        offset: off,
    };
    assert_eq!(
        errno(s.map_dma(0, 2 * P, Perm::READ, b(3 * P))),
        libc::EINVAL
    );
    s.map_dma(0x1000 * P, 2 * P, Perm::READ_WRITE, b(2 * P))
        .unwrap();
    s.write(0x1000 * P + 1, &[7]).unwrap();
    // SAFETY: offset 2P + 1 is inside the 4-page region we own an Arc of.
    let v = unsafe { std::ptr::read_volatile(region.as_ptr().add(2 * P as usize + 1)) };
    assert_eq!(v, 7);
}

// ---------------------------------------------------------------- UNMAP

#[test]
fn unmap_unaligned_or_zero_size_is_einval() {
    let s = store();
    anon(&s, 0, 4 * P, Perm::READ);
    assert_eq!(errno(s.unmap_dma(0x10, P, false)), libc::EINVAL);
    assert_eq!(errno(s.unmap_dma(0, P + 1, false)), libc::EINVAL);
    assert_eq!(errno(s.unmap_dma(0, 0, false)), libc::EINVAL);
    assert_eq!(
        errno(s.unmap_dma(u64::MAX - P + 1, 2 * P, false)),
        libc::EINVAL
    );
    assert_eq!(s.stats().mappings, 1);
}

#[test]
fn unmap_bisecting_a_mapping_is_einval() {
    let s = store();
    anon(&s, 0x10 * P, 4 * P, Perm::READ);
    assert_eq!(
        errno(s.unmap_dma(0x11 * P, 4 * P, false)),
        libc::EINVAL,
        "start inside"
    );
    assert_eq!(
        errno(s.unmap_dma(0, 0x12 * P, false)),
        libc::EINVAL,
        "end inside"
    );
    assert_eq!(
        errno(s.unmap_dma(0x11 * P, P, false)),
        libc::EINVAL,
        "both inside"
    );
    assert_eq!(s.stats().mappings, 1);
}

#[test]
fn unmap_of_empty_range_returns_zero() {
    let s = store();
    anon(&s, 0x10 * P, P, Perm::READ);
    assert_eq!(s.unmap_dma(0x20 * P, 0x10 * P, false).unwrap(), 0);
    assert_eq!(s.stats().mappings, 1);
}

#[test]
fn unmap_returns_bytes_of_whole_mappings_in_range() {
    let s = store();
    anon(&s, 0x10 * P, 2 * P, Perm::READ);
    anon(&s, 0x14 * P, 3 * P, Perm::READ);
    anon(&s, 0x30 * P, P, Perm::READ);
    assert_eq!(s.unmap_dma(0x8 * P, 0x18 * P, false).unwrap(), 5 * P);
    assert_eq!(s.stats().mappings, 1);
    assert_eq!(errno(s.read(0x10 * P, &mut [0u8; 1])), libc::EINVAL, "gone");
}

#[test]
fn unmap_all_needs_zero_iova_and_size_and_returns_total() {
    let s = store();
    anon(&s, 0, P, Perm::READ);
    anon(&s, 0x100 * P, 3 * P, Perm::READ);
    assert_eq!(errno(s.unmap_dma(0, P, true)), libc::EINVAL);
    assert_eq!(errno(s.unmap_dma(P, 0, true)), libc::EINVAL);
    assert_eq!(s.unmap_dma(0, 0, true).unwrap(), 4 * P);
    assert_eq!(s.stats().mappings, 0);
    assert_eq!(s.unmap_dma(0, 0, true).unwrap(), 0);
}

// ---------------------------------------------------------------- VADDR

#[test]
fn vaddr_invalidate_needs_exact_match() {
    let s = store();
    anon(&s, 0x10 * P, 2 * P, Perm::READ);
    assert_eq!(errno(s.invalidate_vaddr(0x10 * P, P)), libc::EINVAL);
    assert_eq!(errno(s.invalidate_vaddr(0x0, 0x20 * P)), libc::EINVAL);
    assert_eq!(errno(s.invalidate_vaddr(0x11 * P, P)), libc::EINVAL);
    s.invalidate_vaddr(0x10 * P, 2 * P).unwrap();
    assert_eq!(
        errno(s.invalidate_vaddr(0x10 * P, 2 * P)),
        libc::EINVAL,
        "twice"
    );
    assert_eq!(s.stats().invalid_vaddrs, 1);
}

#[test]
fn vaddr_update_needs_exact_match_of_an_invalidated_mapping() {
    let s = store();
    anon(&s, 0x10 * P, 2 * P, Perm::READ);
    assert_eq!(
        errno(s.update_vaddr(0x10 * P, 2 * P, Backing::Anonymous)),
        libc::EINVAL,
        "valid"
    );
    s.invalidate_vaddr(0x10 * P, 2 * P).unwrap();
    assert_eq!(
        errno(s.update_vaddr(0x10 * P, P, Backing::Anonymous)),
        libc::EINVAL
    );
    assert_eq!(
        errno(s.update_vaddr(0x40 * P, P, Backing::Anonymous)),
        libc::ENOENT
    );
    s.update_vaddr(0x10 * P, 2 * P, Backing::Anonymous).unwrap();
    assert_eq!(s.stats().invalid_vaddrs, 0);
}

#[test]
fn pin_or_read_while_vaddr_invalid_is_ebusy_then_update_restores() {
    let s = store();
    anon(&s, 0, 2 * P, Perm::READ_WRITE);
    s.set_storage_key(P, 0x30).unwrap();
    s.write(0, &[1]).unwrap();
    let old = s.pin(0, 1, Perm::READ).unwrap();
    s.invalidate_vaddr(0, 2 * P).unwrap();
    assert_eq!(errno(s.pin(0, 1, Perm::READ)), libc::EBUSY);
    assert_eq!(errno(s.read(0, &mut [0u8; 1])), libc::EBUSY);
    assert_eq!(errno(s.write(0, &[0u8; 1])), libc::EBUSY);
    assert_eq!(peek(&old, 0, 0), 1, "an existing pin keeps the old memory");
    let region = shared_region(2 * P as usize);
    // SAFETY: offset 0 is inside the region we own an Arc of.
    unsafe { std::ptr::write_volatile(region.as_ptr(), 9) };
    s.update_vaddr(0, 2 * P, Backing::Region { region, offset: 0 })
        .unwrap();
    let new = s.pin(0, 2, Perm::READ).unwrap();
    assert_eq!(peek(&new, 0, 0), 9, "the new memory");
    assert_eq!(new.pages()[1].storage_key, 0x30, "keys carry over");
    assert_eq!(s.stats().pinned_pages, 3);
}

// ---------------------------------------------------------------- PIN

#[test]
fn pin_of_unmapped_page_is_einval_and_releases_what_it_took() {
    let s = store();
    anon(&s, 0, 4 * P, Perm::READ_WRITE);
    assert_eq!(errno(s.pin(0x100 * P, 1, Perm::READ)), libc::EINVAL);
    assert_eq!(
        errno(s.pin(2 * P, 3, Perm::READ)),
        libc::EINVAL,
        "runs off the end"
    );
    assert_eq!(s.stats().pinned_pages, 0);
    // The partially taken pages are really free: an unmap completes at once.
    s.set_unmap_timeout(Duration::from_millis(1));
    assert_eq!(s.unmap_dma(0, 4 * P, false).unwrap(), 4 * P);
}

#[test]
fn pin_with_permission_mismatch_is_eperm() {
    let s = store();
    anon(&s, 0, P, Perm::READ);
    anon(&s, P, P, Perm::WRITE);
    assert_eq!(errno(s.pin(0, 1, Perm::WRITE)), libc::EPERM);
    assert_eq!(errno(s.pin(0, 1, Perm::READ_WRITE)), libc::EPERM);
    assert_eq!(errno(s.pin(P, 1, Perm::READ)), libc::EPERM);
    assert_eq!(
        errno(s.pin(0, 2, Perm::READ)),
        libc::EPERM,
        "second page write-only"
    );
    assert_eq!(s.stats().pinned_pages, 0);
    assert!(s.pin(0, 1, Perm::READ).is_ok());
}

#[test]
fn pin_count_and_alignment_are_checked() {
    let s = store();
    anon(&s, 0, 1024 * P, Perm::READ);
    assert_eq!(errno(s.pin(0, 513, Perm::READ)), libc::EINVAL);
    assert_eq!(errno(s.pin(0, 0, Perm::READ)), libc::EINVAL);
    assert_eq!(errno(s.pin(0x10, 1, Perm::READ)), libc::EINVAL);
    let none = Perm {
        read: false,
        write: false,
    };
    assert_eq!(errno(s.pin(0, 1, none)), libc::EINVAL);
    assert_eq!(
        errno(s.pin(u64::MAX - P + 1, 2, Perm::READ)),
        libc::EINVAL,
        "wraps"
    );
    let all = s.pin(0, 512, Perm::READ).unwrap();
    assert_eq!(all.len(), 512);
    assert_eq!(all.pages()[511].iova, 511 * P);
}

#[test]
fn pin_spans_mappings_and_drop_unpins_exactly_once() {
    let s = store();
    anon(&s, 0, 2 * P, Perm::READ_WRITE);
    anon(&s, 2 * P, 2 * P, Perm::READ_WRITE);
    let a = s.pin(P, 2, Perm::WRITE).unwrap();
    let b = s.pin(P, 3, Perm::READ).unwrap();
    assert_eq!(s.stats().pinned_pages, 5);
    let iovas: Vec<u64> = a.pages().iter().map(|p| p.iova).collect();
    assert_eq!(iovas, vec![P, 2 * P]);
    assert!(a.pages().iter().all(|p| p.writable));
    assert!(b.pages().iter().all(|p| !p.writable));
    poke(&a, 1, 3, 0xee);
    let mut v = [0u8; 1];
    s.read(2 * P + 3, &mut v).unwrap();
    assert_eq!(v[0], 0xee, "the host address is the mapping's memory");
    drop(a);
    assert_eq!(s.stats().pinned_pages, 3);
    drop(b);
    assert_eq!(s.stats().pinned_pages, 0);
}

struct Releaser {
    held: Mutex<Vec<PinnedPages>>,
    calls: AtomicUsize,
    store: IommuStore,
}

impl UnmapListener for Releaser {
    fn unmap_pinned(&self, iova: u64, size: u64) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Would deadlock if the unmap held a store lock.
        let _ = self.store.stats();
        assert_eq!((iova, size), (0, 2 * P));
        self.held.lock().unwrap().clear();
    }
}

#[test]
fn unmap_with_pins_calls_listener_then_completes() {
    let s = store();
    anon(&s, 0, 2 * P, Perm::READ_WRITE);
    anon(&s, 8 * P, P, Perm::READ);
    let l = Arc::new(Releaser {
        held: Mutex::new(vec![
            s.pin(0, 2, Perm::WRITE).unwrap(),
            s.pin(P, 1, Perm::READ).unwrap(),
        ]),
        calls: AtomicUsize::new(0),
        store: s.clone(),
    });
    let weak: std::sync::Weak<dyn UnmapListener> = Arc::downgrade(&l) as _;
    s.register_unmap_listener(weak);
    assert_eq!(s.unmap_dma(0, 0x10 * P, false).unwrap(), 3 * P);
    assert_eq!(
        l.calls.load(Ordering::SeqCst),
        1,
        "once, for the pinned mapping only"
    );
    assert_eq!(s.stats(), Default::default());
}

#[test]
fn unmap_with_unreleased_pins_is_ebusy_and_keeps_the_mapping() {
    let s = store();
    s.set_unmap_timeout(Duration::from_millis(30));
    anon(&s, 0, P, Perm::READ_WRITE);
    s.write(0, &[42]).unwrap();
    let pins = s.pin(0, 1, Perm::READ).unwrap();
    let t = std::time::Instant::now();
    assert_eq!(errno(s.unmap_dma(0, P, false)), libc::EBUSY);
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert_eq!(s.stats().mappings, 1);
    assert_eq!(peek(&pins, 0, 0), 42);
    // The mapping is usable again.
    let again = s.pin(0, 1, Perm::READ).unwrap();
    drop((pins, again));
    assert_eq!(s.unmap_dma(0, P, false).unwrap(), P);
}

#[test]
fn pin_keeps_memory_alive_until_dropped_on_another_thread() {
    let s = store();
    anon(&s, 0, P, Perm::READ_WRITE);
    s.write(0, &[0x77]).unwrap();
    let pins = s.pin(0, 1, Perm::READ).unwrap();
    let s2 = s.clone();
    let unmapper = std::thread::spawn(move || s2.unmap_dma(0, 0, true));
    std::thread::sleep(Duration::from_millis(20));
    // The unmap is waiting; new pins in the dying range fail, old ones still read.
    assert_eq!(errno(s.pin(0, 1, Perm::READ)), libc::EINVAL);
    assert_eq!(peek(&pins, 0, 0), 0x77);
    drop(pins);
    assert_eq!(unmapper.join().unwrap().unwrap(), P);
    assert_eq!(errno(s.pin(0, 1, Perm::READ)), libc::EINVAL);
}

#[test]
fn pin_versus_unmap_race_never_leaves_a_pin_on_unmapped_memory() {
    for round in 0..20 {
        let s = store();
        anon(&s, 0, 16 * P, Perm::READ_WRITE);
        s.write(0, &[round as u8 + 1]).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let mut threads = vec![];
        for t in 0..3u64 {
            let (s, done) = (s.clone(), Arc::clone(&done));
            threads.push(std::thread::spawn(move || {
                let mut ok = 0u32;
                loop {
                    let was_done = done.load(Ordering::SeqCst);
                    match s.pin(t * P, 16 - t as usize, Perm::READ) {
                        Ok(p) => {
                            assert!(!was_done, "pin succeeded after the unmap returned");
                            if t == 0 {
                                assert_eq!(peek(&p, 0, 0), round as u8 + 1);
                            }
                            ok += 1;
                        }
                        Err(e) => {
                            assert_eq!(e.errno(), libc::EINVAL, "{e}");
                            if was_done {
                                return ok;
                            }
                        }
                    }
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(s.unmap_dma(0, 16 * P, false).unwrap(), 16 * P);
        done.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.stats(), Default::default());
    }
}

// ---------------------------------------------------------------- READ / WRITE

#[test]
fn read_write_check_permissions_and_move_nothing_on_fault() {
    let s = store();
    anon(&s, 0, P, Perm::READ_WRITE);
    anon(&s, P, P, Perm::READ);
    anon(&s, 2 * P, P, Perm::WRITE);
    assert_eq!(errno(s.write(P, &[1])), libc::EPERM);
    assert_eq!(errno(s.read(2 * P, &mut [0u8; 1])), libc::EPERM);
    assert_eq!(errno(s.read(3 * P, &mut [0u8; 1])), libc::EINVAL);
    assert_eq!(
        errno(s.write(P - 1, &[9, 9])),
        libc::EPERM,
        "crosses into read-only"
    );
    let mut b = [0u8; 1];
    s.read(P - 1, &mut b).unwrap();
    assert_eq!(b[0], 0, "the faulting write moved nothing");
    assert_eq!(
        errno(s.read(u64::MAX, &mut [0u8; 2])),
        libc::EINVAL,
        "wraps"
    );
    s.read(0, &mut []).unwrap();
    let mut span = [0u8; 2];
    s.read(P - 1, &mut span).unwrap();
}

// ---------------------------------------------------------------- STORAGE KEYS

#[test]
fn storage_keys_default_zero_per_page_and_reach_pins() {
    let s = store();
    anon(&s, 0, 4 * P, Perm::READ);
    assert_eq!(s.storage_key(3 * P).unwrap(), 0);
    s.set_storage_key(P + 0x123, 0x98).unwrap(); // ACC 9, fetch protection
    assert_eq!(s.storage_key(P).unwrap(), 0x98);
    assert_eq!(s.storage_key(2 * P).unwrap(), 0);
    let pins = s.pin(0, 3, Perm::READ).unwrap();
    let keys: Vec<u8> = pins.pages().iter().map(|p| p.storage_key).collect();
    assert_eq!(keys, vec![0, 0x98, 0]);
    assert_eq!(
        errno(s.set_storage_key(P, 0x91)),
        libc::EINVAL,
        "bit 7 reserved"
    );
    assert_eq!(errno(s.set_storage_key(9 * P, 0x10)), libc::EINVAL);
    assert_eq!(errno(s.storage_key(9 * P)), libc::EINVAL);
}

// ---------------------------------------------------------------- DIRTY

#[test]
fn dirty_bitmap_argument_rules_are_einval() {
    let s = store();
    anon(&s, 0, 4 * P, Perm::READ_WRITE);
    assert_eq!(
        errno(s.dirty_bitmap(0, 4 * P, P)),
        libc::EINVAL,
        "not started"
    );
    s.dirty_start().unwrap();
    assert_eq!(
        errno(s.dirty_bitmap(0, 4 * P, 2 * P)),
        libc::EINVAL,
        "pgsize"
    );
    assert_eq!(errno(s.dirty_bitmap(0, 0, P)), libc::EINVAL, "size 0");
    assert_eq!(
        errno(s.dirty_bitmap(0x10, 4 * P, P)),
        libc::EINVAL,
        "unaligned"
    );
    assert_eq!(errno(s.dirty_bitmap(P, 4 * P, P)), libc::EINVAL, "bisects");
    assert_eq!(s.dirty_bitmap(0, 8 * P, P).unwrap(), vec![0]);
    s.dirty_stop().unwrap();
    assert_eq!(errno(s.dirty_bitmap(0, 4 * P, P)), libc::EINVAL, "stopped");
}

#[test]
fn dirty_bits_for_writes_and_write_pins_cleared_on_read_unless_pinned() {
    let s = store();
    anon(&s, 0, 4 * P, Perm::READ_WRITE);
    anon(&s, 64 * P, 2 * P, Perm::READ_WRITE);
    s.write(3 * P, &[1]).unwrap(); // before START: forgotten
    s.dirty_start().unwrap();
    s.write(P + 10, &[1]).unwrap();
    s.write(65 * P, &[1]).unwrap();
    let wp = s.pin(2 * P, 1, Perm::WRITE).unwrap();
    let _rp = s.pin(3 * P, 1, Perm::READ).unwrap();
    let want0 = (1u64 << 1) | (1 << 2);
    assert_eq!(s.dirty_bitmap(0, 66 * P, P).unwrap(), vec![want0, 1 << 1]);
    // Cleared on read, except the page still pinned for write.
    assert_eq!(s.dirty_bitmap(0, 66 * P, P).unwrap(), vec![1 << 2, 0]);
    drop(wp);
    assert_eq!(
        s.dirty_bitmap(0, 4 * P, P).unwrap(),
        vec![1 << 2],
        "reported once more"
    );
    assert_eq!(s.dirty_bitmap(0, 4 * P, P).unwrap(), vec![0]);
    // Offsets are relative to the queried iova.
    s.write(65 * P, &[1]).unwrap();
    assert_eq!(s.dirty_bitmap(64 * P, 2 * P, P).unwrap(), vec![1 << 1]);
}

#[test]
fn dirty_start_marks_pages_already_pinned_for_write() {
    let s = store();
    anon(&s, 0, 2 * P, Perm::READ_WRITE);
    let wp = s.pin(P, 1, Perm::WRITE).unwrap();
    s.dirty_start().unwrap();
    assert_eq!(s.dirty_bitmap(0, 2 * P, P).unwrap(), vec![1 << 1]);
    drop(wp);
    assert_eq!(s.dirty_bitmap(0, 2 * P, P).unwrap(), vec![1 << 1]);
    assert_eq!(s.dirty_bitmap(0, 2 * P, P).unwrap(), vec![0]);
}

// ---------------------------------------------------------------- INFO

#[test]
fn info_reports_page_sizes_ranges_and_dma_avail() {
    let s = IommuStore::new(StoreConfig {
        dma_entry_limit: 10,
    });
    anon(&s, 0, P, Perm::READ);
    let i = s.info();
    assert_eq!(i.pgsize_bitmap, 4096);
    assert_eq!(i.iova_ranges, vec![(0, u64::MAX)]);
    assert_eq!(i.dma_avail, 9);
    assert_eq!(StoreConfig::default().dma_entry_limit, 65_535);
}

#[test]
fn errno_values_match_the_uapi() {
    assert_eq!(StoreError::Invalid("x").errno(), 22);
    assert_eq!(StoreError::NotMapped(0).errno(), 22);
    assert_eq!(StoreError::Exists { iova: 0, size: 1 }.errno(), 17);
    assert_eq!(StoreError::NoSpace(1).errno(), 28);
    assert_eq!(StoreError::NoEntry(0).errno(), 2);
    assert_eq!(StoreError::Permission(0).errno(), 1);
    assert_eq!(StoreError::VaddrInvalid(0).errno(), 16);
    assert_eq!(StoreError::Access.errno(), 13);
}

#[test]
fn store_and_pins_are_send_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<IommuStore>();
    send::<PinnedPages>();
}

// ---------------------------------------------------------------- MODEL CHECK

mod model {
    use super::*;
    use proptest::prelude::*;

    /// The type1 rules written the naive way: a list of (iova, size).
    #[derive(Default)]
    struct Model(Vec<(u64, u64)>);

    impl Model {
        fn map(&mut self, iova: u64, size: u64, limit: usize) -> Result<(), i32> {
            if size == 0 || iova % P != 0 || size % P != 0 {
                return Err(libc::EINVAL);
            }
            let last = iova.checked_add(size - 1).ok_or(libc::EINVAL)?;
            if self
                .0
                .iter()
                .any(|&(i, s)| i <= last && iova <= i + (s - 1))
            {
                return Err(libc::EEXIST);
            }
            if self.0.len() >= limit {
                return Err(libc::ENOSPC);
            }
            self.0.push((iova, size));
            Ok(())
        }

        fn unmap(&mut self, iova: u64, size: u64) -> Result<u64, i32> {
            if size == 0 || iova % P != 0 || size % P != 0 {
                return Err(libc::EINVAL);
            }
            let last = iova.checked_add(size - 1).ok_or(libc::EINVAL)?;
            for &(i, s) in &self.0 {
                let l = i + (s - 1);
                if (i < iova && iova <= l) || (i <= last && last < l) {
                    return Err(libc::EINVAL);
                }
            }
            let before: u64 = self.0.iter().map(|m| m.1).sum();
            self.0.retain(|&(i, _)| !(iova <= i && i <= last));
            Ok(before - self.0.iter().map(|m| m.1).sum::<u64>())
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Map(u64, u64),
        Unmap(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small page numbers so ranges collide often; occasional unaligned values.
        let addr = prop_oneof![9 => (0u64..24).prop_map(|p| p * P), 1 => 0u64..0x18000];
        let size = prop_oneof![9 => (0u64..6).prop_map(|p| p * P), 1 => 0u64..0x6000];
        prop_oneof![
            (addr.clone(), size.clone()).prop_map(|(a, s)| Op::Map(a, s)),
            (addr, size).prop_map(|(a, s)| Op::Unmap(a, s)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn store_matches_naive_model(ops in proptest::collection::vec(op(), 1..40)) {
            let limit = 6usize;
            let s = IommuStore::new(StoreConfig { dma_entry_limit: limit as u32 });
            let mut m = Model::default();
            for op in ops {
                match op {
                    Op::Map(i, sz) => {
                        let got = s.map_dma(i, sz, Perm::READ, Backing::Anonymous).map_err(|e| e.errno());
                        prop_assert_eq!(got, m.map(i, sz, limit), "map {:#x}+{:#x}", i, sz);
                    }
                    Op::Unmap(i, sz) => {
                        let got = s.unmap_dma(i, sz, false).map_err(|e| e.errno());
                        prop_assert_eq!(got, m.unmap(i, sz), "unmap {:#x}+{:#x}", i, sz);
                    }
                }
                prop_assert_eq!(s.stats().mappings, m.0.len());
                // Every page the model maps is readable, others are not.
                for p in 0..30u64 {
                    let mapped = m.0.iter().any(|&(i, sz)| i <= p * P && p * P < i + sz);
                    prop_assert_eq!(s.read(p * P, &mut [0u8; 1]).is_ok(), mapped);
                }
            }
        }
    }
}
