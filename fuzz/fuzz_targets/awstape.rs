//! Fuzz target: the AWSTAPE file parser and tape motion.
//!
//! Input: `locate u8`, then the tape file (opened read-only through `/proc/self/fd` of a
//! memfd with `AwsTape::open`, which verifies every header).
//!
//! Checks: Ok or a typed "malformed" error (EINVAL/EFBIG); an opened tape reads forward to
//! the end of data crossing exactly the records `map()` lists, every block no longer than
//! `MAX_BLOCK_LEN` or the file, then backward to the load point crossing them in reverse;
//! Locate Block lands on the block id asked for; writes are refused.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vccw::image::awstape::{AwsError, AwsTape, OpenMode, Record, MAX_BLOCK_LEN};
use vccw_fuzz::{fd_path, memfd_with, Input};

fn check_err(e: &AwsError) {
    assert!(e.is_malformed(), "not a format error: {e}");
    assert!([libc::EINVAL, libc::EFBIG].contains(&e.errno()), "{e}");
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let locate = inp.u8() as u32;
    let file = inp.rest();
    let fd = memfd_with(file);
    let mut tape = match AwsTape::open(fd_path(&fd), OpenMode::ReadOnly) {
        Ok(t) => t,
        Err(e) => return check_err(&e),
    };
    assert!(tape.at_load_point());
    assert_eq!(tape.len(), file.len() as u64);
    let map = tape.map().expect("map of a verified tape");
    tape.rewind();

    let mut buf = Vec::new();
    let mut seen = Vec::new();
    loop {
        let at = tape.position();
        let r = tape
            .read_forward(&mut buf)
            .expect("read of a verified tape");
        match r {
            Record::EndOfData => break,
            Record::Block { len, segments } => {
                assert_eq!(buf.len(), len);
                // A zero-length block (first and last segment, no data) is accepted as one.
                assert!(len <= MAX_BLOCK_LEN && len as u64 <= tape.len());
                assert!(segments >= 1);
            }
            Record::TapeMark => {}
            Record::LoadPoint => panic!("load point moving forward"),
        }
        assert!(tape.position() > at && tape.position() <= tape.len());
        seen.push((at, r));
        assert_eq!(tape.block_id() as usize, seen.len());
    }
    assert!(tape.at_end_of_data());
    let listed: Vec<_> = map.iter().map(|m| (m.offset, m.record)).collect();
    assert_eq!(seen, listed, "forward reads and map() disagree");

    for (at, r) in seen.iter().rev() {
        let got = tape
            .read_backward(&mut buf)
            .expect("backward read of a verified tape");
        assert_eq!(got, *r);
        assert_eq!(tape.position(), *at);
    }
    assert!(tape.at_load_point());
    assert_eq!(tape.read_backward(&mut buf).unwrap(), Record::LoadPoint);

    let target = locate % (seen.len() as u32 + 2);
    match tape.locate(target) {
        Ok(true) => {
            assert!(target as usize <= seen.len());
            assert_eq!(tape.block_id(), target);
        }
        Ok(false) => assert!(target as usize > seen.len() && tape.at_end_of_data()),
        Err(e) => panic!("locate on a verified tape: {e}"),
    }
    assert!(matches!(tape.write_block(b"x"), Err(AwsError::ReadOnly)));
    drop(fd);
});
