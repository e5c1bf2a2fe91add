//! `vccw load` for a few seconds with small numbers: the report must show I/O done, no
//! errors, no leaked mappings, pins, irqfds or fds, and a clean server stop.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use vccw::loadtest::{run_load, LoadOptions};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vccw"))
}

#[test]
fn load_report_has_no_errors_and_no_leaks() {
    let opts = LoadOptions {
        exe: Some(exe()),
        devices: 2,
        clients: 2,
        duration: Duration::from_secs(3),
        // Under qemu-user I/O is ~8x slower: fewer I/Os per connection so that clients
        // still reconnect within the 3 s.
        ios_per_connection: (20 / common::slowdown()).max(2),
    };
    let r = run_load(&opts).expect("load test ran");
    let mut text = Vec::new();
    r.print(&mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert_eq!(r.errors, 0, "{text}");
    assert!(r.leaks.is_empty(), "{text}");
    assert!(r.clean_stop, "{text}");
    assert!(r.ios > 0, "{text}");
    assert!(r.bytes > 0, "{text}");
    // Both kinds ran, and clients reconnected (after `ios_per_connection` I/Os).
    for k in ["3390 read", "3390 write", "3490 read", "3490 write"] {
        let l = r.latency.get(k).unwrap_or_else(|| panic!("no {k}: {text}"));
        assert!(
            l.count > 0 && l.p50_us <= l.p99_us && l.p99_us <= l.max_us,
            "{text}"
        );
    }
    assert!(r.connects > 4, "{text}");
    assert_eq!(r.fds.0, r.fds.1, "{text}");
    for (dev, after) in &r.stats.1 {
        assert_eq!(after["mappings"], 0, "{dev}: {text}");
        assert_eq!(after["pinned"], 0, "{dev}: {text}");
        assert_eq!(after["irqfds"], 0, "{dev}: {text}");
        assert!(after["starts"] > 0, "{dev}: {text}");
    }
    assert!(r.passed(), "{text}");
    assert!(text.contains("RESULT ok"), "{text}");
}

#[test]
fn load_command_exits_zero_and_prints_the_report() {
    let out = common::command(exe())
        .args(["load", "--devices", "2", "--clients", "1", "--seconds", "1"])
        .output()
        .expect("run vccw load");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("errors: 0"), "{text}");
    assert!(text.contains("leaks: 0"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("throughput: ")),
        "{text}"
    );
    assert!(text.ends_with("RESULT ok\n"), "{text}");
    // Usage errors exit 2.
    let bad = common::command(exe())
        .args(["load", "--seconds", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
