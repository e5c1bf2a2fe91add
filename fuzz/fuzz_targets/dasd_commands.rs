//! Fuzz target: channel commands against the 3390 model over a real (tmpfs) CKD image.
//!
//! A 1-cylinder 3390 image is created once per process (`CkdImage::create_3390`, with a
//! volume label) and restored before every input. Input: `ready u8` (bit 0 clear: device
//! not ready for the first half), then commands as `vccw_fuzz::run_commands` decodes them.
//!
//! Checks: per command (see `run_commands`); afterwards the image still opens and every
//! track parses (home address right, records inside the slot, end marker present).

#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vccw::devices::dasd3390::{Dasd3390, Dasd3390Options};
use vccw::image::ckd::{CkdImage, CkdOpenOptions};
use vccw_fuzz::{run_commands, scratch_dir, Input};

struct Fixture {
    path: PathBuf,
    pristine: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = scratch_dir("dasd").join("vol.3390");
        drop(CkdImage::create_3390(&path, 1, Some("FUZZ01")).expect("create image"));
        let pristine = std::fs::read(&path).expect("read image");
        Fixture { path, pristine }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&f.path)
            .unwrap();
        file.write_all_at(&f.pristine, 0).unwrap();
        file.set_len(f.pristine.len() as u64).unwrap();
    }
    let mut inp = Input::new(data);
    let ready = inp.u8() & 1 != 0;
    let mut dev = Dasd3390::open(
        &f.path,
        Dasd3390Options {
            open: CkdOpenOptions::default(),
            devnum: 0x200,
        },
    )
    .expect("open pristine image");
    dev.set_ready(ready);
    run_commands(&mut inp, &mut dev);
    dev.set_ready(true);
    run_commands(&mut inp, &mut dev);
    drop(dev);

    let img = CkdImage::open(
        &f.path,
        CkdOpenOptions {
            read_only: true,
            sync_writes: false,
        },
    )
    .expect("image no longer opens");
    assert_eq!(
        std::fs::metadata(&f.path).unwrap().len(),
        f.pristine.len() as u64
    );
    let mut buf = vec![0u8; img.track_size()];
    for c in 0..img.cylinders() {
        for h in 0..img.heads() {
            if let Err(e) = img.read_track(c, h, &mut buf) {
                panic!("track {c}/{h} malformed after the commands: {e}");
            }
        }
    }
});
