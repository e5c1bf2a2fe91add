//! The hand-off floors every I/O path here pays, shared by the benchmarks: a blocking
//! wake-up (eventfd) and a spinning hand-off (atomic), each measured as a ping-pong between
//! two threads. Both return the time of `iters` one-way hand-offs (criterion `iter_custom`
//! convention); divide by `iters` for one.

use std::hint::spin_loop;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};

/// `iters` blocking wake-ups each way through two eventfds, halved.
pub fn eventfd_oneway(iters: u64) -> Duration {
    let ping = Arc::new(EventFd::from_flags(EfdFlags::empty()).expect("eventfd"));
    let pong = Arc::new(EventFd::from_flags(EfdFlags::empty()).expect("eventfd"));
    let (pi, po) = (ping.clone(), pong.clone());
    let b = thread::spawn(move || {
        for _ in 0..iters {
            pi.read().expect("read");
            po.write(1).expect("write");
        }
    });
    let t0 = Instant::now();
    for _ in 0..iters {
        ping.write(1).expect("write");
        pong.read().expect("read");
    }
    let t = t0.elapsed();
    b.join().unwrap();
    t / 2
}

/// `iters` signals of an eventfd that nobody waits on, each consumed by a non-blocking read
/// on the same thread: the cost of the notification alone when no thread must be woken
/// (what an I/O completed inline pays).
#[allow(dead_code)] // not every bench uses every floor
pub fn eventfd_signal(iters: u64) -> Duration {
    let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd");
    let t0 = Instant::now();
    for _ in 0..iters {
        e.write(1).expect("write");
        e.read().expect("read");
    }
    t0.elapsed()
}

/// `iters` spinning hand-offs each way through one atomic, halved.
pub fn spin_oneway(iters: u64) -> Duration {
    let x = Arc::new(AtomicU64::new(0));
    let y = x.clone();
    let b = thread::spawn(move || {
        for i in 0..iters {
            while y.load(Ordering::Acquire) != 2 * i + 1 {
                spin_loop();
            }
            y.store(2 * i + 2, Ordering::Release);
        }
    });
    let t0 = Instant::now();
    for i in 0..iters {
        x.store(2 * i + 1, Ordering::Release);
        while x.load(Ordering::Acquire) != 2 * i + 2 {
            spin_loop();
        }
    }
    let t = t0.elapsed();
    b.join().unwrap();
    t / 2
}
