//! Hand-off floors between two threads on this machine, and the emulated subchannel's
//! start -> interrupt round trip with and without the channel thread's spin.
//!
//! * `eventfd`: one-way cost of a blocking wake-up (A writes an eventfd, B blocked in
//!   `read()` answers through another; round trip / 2).
//! * `condvar`: one-way cost of a Mutex + Condvar ping-pong (round trip / 2).
//! * `spin`: one-way cost of a ping-pong through one `AtomicU64`, both threads spinning
//!   (round trip / 2).
//! * `subchannel/spin_*`: `start()` of a 1-CCW program on a loopback device until the event
//!   sink has seen the final interrupt (full round trip; the caller spins on an atomic the
//!   sink sets, so the caller side costs no wake-up), the program run by the channel thread
//!   (`InlinePolicy::OFF`).
//! * `subchannel/inline`: the same with the default inline policy: START runs the program and
//!   delivers the interrupt on the calling thread (no hand-off at all).
//!
//! After the criterion groups it prints the channel thread's spin statistics and CPU time
//! per I/O, back to back and with 200 us between I/Os (the worst case for spinning).
//!
//! Run: `cargo bench --bench handoff -- --warm-up-time 1 --measurement-time 3`

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use vccw::ccw::{translate, Ccw1, CcwFlags, HostProgram, TranslateConfig};
use vccw::css::{
    EmulatedSubchannel, InlinePolicy, LoopbackDevice, SpinPolicy, SubchannelConfig, SubchannelEvent,
};
use vccw::iommu_store::{Backing, IommuStore, Perm, StoreConfig};
use vccw::orb::{Orb, OrbControls};

#[path = "common/floors.rs"]
mod floors;

fn condvar_oneway(iters: u64) -> Duration {
    // The counter is odd when B owes an answer.
    let pair = Arc::new((Mutex::new(0u64), Condvar::new(), Condvar::new()));
    let p = pair.clone();
    let b = thread::spawn(move || {
        let (m, to_b, to_a) = &*p;
        for i in 0..iters {
            let mut g = m.lock().unwrap();
            while *g != 2 * i + 1 {
                g = to_b.wait(g).unwrap();
            }
            *g += 1;
            to_a.notify_one();
        }
    });
    let (m, to_b, to_a) = &*pair;
    let t0 = Instant::now();
    for i in 0..iters {
        let mut g = m.lock().unwrap();
        *g += 1;
        to_b.notify_one();
        while *g != 2 * i + 2 {
            g = to_a.wait(g).unwrap();
        }
    }
    let t = t0.elapsed();
    b.join().unwrap();
    t / 2
}

/// A subchannel whose sink bumps `done`, and a 1-CCW (WRITE 4 bytes) host program.
struct Rig {
    sub: EmulatedSubchannel,
    done: Arc<AtomicU64>,
    prog: Arc<HostProgram>,
    _store: IommuStore,
}

fn rig(spin: SpinPolicy, inline: InlinePolicy) -> Rig {
    let store = IommuStore::new(StoreConfig::default());
    store
        .map_dma(0x10000, 0x10000, Perm::READ_WRITE, Backing::Anonymous)
        .unwrap();
    let ccw = Ccw1 {
        cmd: 0x01,
        flags: CcwFlags::new(),
        count: 4,
        cda: 0x11000,
    };
    store.write(0x10000, &ccw.to_bytes()).unwrap();
    let orb = Orb {
        intparm: 1,
        ctl: OrbControls::new().with_format1(true).with_lpm(0x80),
        cpa: 0x10000,
    };
    let prog = Arc::new(translate(&orb, &store, &TranslateConfig::default()).unwrap());
    let cfg = SubchannelConfig {
        devno: 0x0100,
        chpid: 0,
        spin,
        inline,
    };
    let sub = EmulatedSubchannel::new(Box::new(LoopbackDevice::new()), cfg).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    sub.set_event_sink(Arc::new(move |ev| {
        if let SubchannelEvent::Interrupt(_) = ev {
            d.fetch_add(1, Ordering::Release);
        }
    }));
    Rig {
        sub,
        done,
        prog,
        _store: store,
    }
}

impl Rig {
    /// One start -> final interrupt round trip.
    fn io(&self) {
        let before = self.done.load(Ordering::Acquire);
        let cc = self.sub.start(self.prog.clone());
        assert_eq!(cc, 0);
        while self.done.load(Ordering::Acquire) == before {
            spin_loop();
        }
    }
}

fn cpu_time() -> Duration {
    let mut r = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the rusage struct we pass; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, r.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: zero-initialised and filled by a successful getrusage.
    let r = unsafe { r.assume_init() };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(us(r.ru_utime) + us(r.ru_stime))
}

/// Prints spin statistics and process CPU per I/O for `n` I/Os with `gap` between them.
fn cpu_report(name: &str, spin: SpinPolicy, inline: InlinePolicy, n: u32, gap: Duration) {
    let r = rig(spin, inline);
    let c0 = cpu_time();
    let t0 = Instant::now();
    for _ in 0..n {
        r.io();
        if !gap.is_zero() {
            thread::sleep(gap);
        }
    }
    let wall = t0.elapsed();
    let cpu = cpu_time() - c0;
    let st = r.sub.handoff_stats();
    println!(
        "{name}: {n} I/Os, gap {gap:?}: wall {:.1} us/IO, process CPU {:.1} us/IO, \
         channel spin {:.1} us/IO, picked up by spin {} / parked {}, ended inline {}",
        wall.as_secs_f64() * 1e6 / n as f64,
        cpu.as_secs_f64() * 1e6 / n as f64,
        st.spin_ns as f64 / 1e3 / n as f64,
        st.spin_hits,
        st.parks,
        st.inline_done
    );
}

fn floors(c: &mut Criterion) {
    // These are floors only on an idle machine: print the load they were taken under.
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average: {}", l.trim());
    }
    let mut g = c.benchmark_group("handoff_oneway");
    g.bench_function("eventfd", |b| b.iter_custom(floors::eventfd_oneway));
    g.bench_function("condvar", |b| b.iter_custom(condvar_oneway));
    g.bench_function("spin", |b| b.iter_custom(floors::spin_oneway));
    g.finish();

    let cases = [
        ("spin_50us", SpinPolicy::default(), InlinePolicy::OFF),
        ("spin_off", SpinPolicy::OFF, InlinePolicy::OFF),
        ("inline", SpinPolicy::default(), InlinePolicy::default()),
    ];
    let mut g = c.benchmark_group("subchannel_roundtrip");
    for (name, spin, inline) in cases {
        let r = rig(spin, inline);
        g.bench_function(name, |b| b.iter(|| r.io()));
    }
    g.finish();

    for (name, spin, inline) in cases {
        cpu_report(name, spin, inline, 20_000, Duration::ZERO);
        cpu_report(name, spin, inline, 2_000, Duration::from_micros(200));
    }
}

criterion_group!(benches, floors);
criterion_main!(benches);
