//! Fuzz target: channel commands against the 3490 model over a real (tmpfs) AWSTAPE file.
//!
//! A small tape (two blocks, a tape mark, a block, two tape marks) is written once per
//! process and restored before every input. Input: `cfg u8` (bit 0: a 64 KiB tape with a
//! 4 KiB early-warning zone; bit 1: start with no tape loaded; bit 2: 4 KiB segments), then
//! commands as `vccw_fuzz::run_commands` decodes them.
//!
//! Checks: per command (see `run_commands`); afterwards the file still opens with
//! `AwsTape::open` (every header verified) and respects the configured size limit.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vccw::devices::tape3490::{Tape3490, Tape3490Config};
use vccw::image::awstape::{AwsTape, OpenMode};
use vccw_fuzz::{run_commands, scratch_dir, Input};

const MAX_SIZE: u64 = 64 * 1024;

struct Fixture {
    path: PathBuf,
    pristine: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = scratch_dir("tape").join("t.aws");
        let mut t = AwsTape::create(&path).expect("create tape");
        t.write_block(&[0xC1; 80]).unwrap();
        t.write_block(&(0..=255u8).cycle().take(5000).collect::<Vec<_>>())
            .unwrap();
        t.write_tape_mark().unwrap();
        t.write_block(&[0x40; 800]).unwrap();
        t.write_tape_mark().unwrap();
        t.write_tape_mark().unwrap();
        drop(t);
        let pristine = std::fs::read(&path).expect("read tape");
        Fixture { path, pristine }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    std::fs::write(&f.path, &f.pristine).unwrap();
    let mut inp = Input::new(data);
    let cfg_byte = inp.u8();
    let limited = cfg_byte & 1 != 0;
    let cfg = Tape3490Config {
        max_size: limited.then_some(MAX_SIZE),
        eot_margin: 4096,
        ..Tape3490Config::default()
    };
    let mut dev = if cfg_byte & 2 != 0 {
        Tape3490::new(cfg)
    } else {
        let mut t = AwsTape::open(&f.path, OpenMode::ReadWrite).expect("open pristine tape");
        if cfg_byte & 4 != 0 {
            t.set_chunk_len(4096);
        }
        Tape3490::with_tape(t, cfg)
    };
    run_commands(&mut inp, &mut dev);
    drop(dev);

    let t = AwsTape::open(&f.path, OpenMode::ReadOnly)
        .unwrap_or_else(|e| panic!("tape malformed after the commands: {e}"));
    if limited {
        assert!(
            t.len() <= MAX_SIZE.max(f.pristine.len() as u64),
            "tape grew past its limit"
        );
    }
});
