//! Fuzz target: the Hercules CKD image parser.
//!
//! Input: `cyl u8`, `head u8`, then the image file. The file is opened from a memfd with
//! `CkdImage::from_file`; the bytes after the 512-byte header are also given to
//! `parse_track` directly as a track of (`cyl`, `head`).
//!
//! Checks: Ok or a typed error with a documented errno; an opened image's geometry matches
//! the file length exactly; every track either parses or fails as media damage (EIO); a
//! parsed track's records lie inside the slot, in order, ending in the end-of-track marker;
//! opening a 3390 device over it never panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vccw::devices::dasd3390::Dasd3390;
use vccw::image::ckd::{
    parse_track, CkdError, CkdImage, CkdOpenOptions, TrackLayout, COUNT_SIZE, DEVHDR_SIZE,
    END_OF_TRACK, HA_SIZE,
};
use vccw_fuzz::{memfd_with, Input};

/// Tracks read per input (a fuzzed geometry can describe thousands).
const MAX_TRACKS: u32 = 256;

fn check_layout(t: &TrackLayout, buf: &[u8]) {
    let mut at = HA_SIZE;
    for r in &t.records {
        assert_eq!(r.offset, at, "records not contiguous");
        at = r.offset + r.count.total_len();
    }
    assert_eq!(t.end, at, "end marker not after the last record");
    assert!(
        t.end + COUNT_SIZE <= buf.len(),
        "end marker outside the slot"
    );
    assert_eq!(buf[t.end..t.end + COUNT_SIZE], END_OF_TRACK);
}

fn check_err(e: &CkdError) {
    let errno = e.errno();
    assert!(
        [libc::EINVAL, libc::EOPNOTSUPP, libc::EIO].contains(&errno),
        "{e}: errno {errno}"
    );
    assert!(
        !matches!(e, CkdError::Io { .. }),
        "host I/O error on a memfd: {e}"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let (cyl, head) = (inp.u8() as u32, inp.u8() as u32);
    let file = inp.rest();

    let track = &file[DEVHDR_SIZE.min(file.len())..];
    match parse_track(track, cyl, head) {
        Ok(t) => check_layout(&t, track),
        Err(e) => {
            check_err(&e);
            assert!(matches!(
                e,
                CkdError::BadHomeAddress { .. } | CkdError::TrackOverflow { .. }
            ));
        }
    }

    let fd = memfd_with(file);
    let opts = CkdOpenOptions {
        read_only: true,
        sync_writes: false,
    };
    let mut img = match CkdImage::from_file(fd, opts) {
        Ok(i) => i,
        Err(e) => return check_err(&e),
    };
    let ts = img.track_size();
    assert_eq!(
        DEVHDR_SIZE as u64 + img.cylinders() as u64 * img.heads() as u64 * ts as u64,
        file.len() as u64,
        "geometry does not match the file"
    );
    let mut buf = vec![0u8; ts];
    let mut n = 0;
    'all: for c in 0..img.cylinders() {
        for h in 0..img.heads() {
            match img.read_track(c, h, &mut buf) {
                Ok(t) => check_layout(&t, &buf),
                Err(e) => {
                    check_err(&e);
                    assert_eq!(e.errno(), libc::EIO, "{e}");
                }
            }
            n += 1;
            if n >= MAX_TRACKS {
                break 'all;
            }
        }
    }
    assert!(matches!(
        img.read_track(img.cylinders(), 0, &mut buf),
        Err(CkdError::TrackOutOfRange { .. })
    ));
    assert!(matches!(
        img.write_track(0, 0, &buf),
        Err(CkdError::ReadOnly)
    ));
    if let Err(e) = Dasd3390::new(img, 0x100) {
        assert_eq!(e.errno(), libc::EINVAL);
    }
});
