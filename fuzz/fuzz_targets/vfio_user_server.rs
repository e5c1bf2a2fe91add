//! Fuzz target: the vfio-user server loop over a hostile message stream.
//!
//! Input: byte 0 bit 0 prepends a valid VERSION (so the fuzzer starts inside a negotiated
//! session), bit 1 sends the rest in pieces of `byte 1` + 1 bytes (exercising partial
//! reads); the rest is the raw client-to-server byte stream (headers and payloads as the
//! client would write them; no fds). The server runs on its own thread against a small
//! in-memory backend; the client side writes the stream, shuts down its write side and
//! reads replies until EOF.
//!
//! Checks: no panic; `serve_connection` returns (within a time bound) and calls
//! `disconnected`; the reply stream is a whole number of messages, each a well-formed
//! reply header (type reply, known flags only, size covering the header, error replies
//! header-only with a non-zero errno), one per command at most.

#![no_main]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vccw::vfio_user::protocol::{Capabilities, Command, Header, Version, HEADER_SIZE};
use vccw::vfio_user::server::{
    serve_connection, DeviceDesc, DmaBacking, IrqDesc, RegionDesc, ServerConfig, VfioUserBackend,
};

const FLAGS_CCW_RESET: u32 = (1 << 4) | 1; // VFIO_DEVICE_FLAGS_CCW | _RESET
const REGION_READ: u32 = 1;
const REGION_WRITE: u32 = 2;
const TIME_BOUND: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Backend {
    regs: Mutex<Vec<u8>>,
    maps: Mutex<BTreeMap<u64, u64>>,
    disconnected: AtomicBool,
}

impl VfioUserBackend for Backend {
    fn device_info(&self) -> DeviceDesc {
        DeviceDesc {
            flags: FLAGS_CCW_RESET,
            num_regions: 3,
            num_irqs: 2,
        }
    }
    fn region_info(&self, index: u32) -> Result<RegionDesc, i32> {
        let (size, flags, cap_type) = match index {
            0 => (64, REGION_READ | REGION_WRITE, None),
            1 => (16, REGION_READ | REGION_WRITE, Some((2, 1))),
            2 => (12, REGION_READ, Some((2, 2))),
            _ => panic!("server passed unchecked region index {index}"),
        };
        Ok(RegionDesc {
            size,
            flags,
            cap_type,
        })
    }
    fn irq_info(&self, index: u32) -> Result<IrqDesc, i32> {
        assert!(index < 2, "server passed unchecked irq index {index}");
        Ok(IrqDesc {
            flags: 1, // VFIO_IRQ_INFO_EVENTFD
            count: 1,
        })
    }
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<usize, i32> {
        let size = self.region_info(index)?.size;
        assert!(offset + buf.len() as u64 <= size, "read past region end");
        if index == 0 {
            let r = self.regs.lock().unwrap();
            buf.copy_from_slice(&r[offset as usize..offset as usize + buf.len()]);
        } else {
            buf.fill(0xee);
        }
        Ok(buf.len())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<usize, i32> {
        let size = self.region_info(index)?.size;
        assert!(offset + data.len() as u64 <= size, "write past region end");
        assert!(
            index != 2,
            "write to a read-only region reached the backend"
        );
        if index == 0 {
            self.regs.lock().unwrap()[offset as usize..offset as usize + data.len()]
                .copy_from_slice(data);
        }
        if data.first() == Some(&0xff) {
            return Err(libc::EIO);
        }
        Ok(data.len())
    }
    fn set_irqs(
        &self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
        _bools: &[u8],
    ) -> Result<(), i32> {
        assert!(index < 2 && start as u64 + count as u64 <= 1);
        assert!(fds.is_empty(), "no fds are sent");
        Ok(())
    }
    fn reset(&self) -> Result<(), i32> {
        self.regs.lock().unwrap().fill(0);
        Ok(())
    }
    fn dma_map(
        &self,
        iova: u64,
        size: u64,
        _prot: (bool, bool),
        backing: DmaBacking,
    ) -> Result<(), i32> {
        assert!(matches!(backing, DmaBacking::Client), "no fds are sent");
        assert_eq!((iova | size) % 4096, 0, "unaligned map reached the backend");
        let end = iova.checked_add(size).ok_or(libc::EINVAL)?;
        if size == 0 {
            return Err(libc::EINVAL);
        }
        let mut m = self.maps.lock().unwrap();
        if m.range(..end)
            .next_back()
            .is_some_and(|(&a, &s)| a + s > iova)
        {
            return Err(libc::EEXIST);
        }
        if m.len() >= 64 {
            return Err(libc::ENOSPC);
        }
        m.insert(iova, size);
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, size: u64, all: bool) -> Result<u64, i32> {
        let mut m = self.maps.lock().unwrap();
        if all {
            let n = m.values().sum();
            m.clear();
            return Ok(n);
        }
        match m.get(&iova) {
            Some(&s) if s == size => {
                m.remove(&iova);
                Ok(size)
            }
            _ => Err(libc::EINVAL),
        }
    }
    fn disconnected(&self) {
        self.maps.lock().unwrap().clear();
        self.disconnected.store(true, Ordering::SeqCst);
    }
}

fn version_message() -> Vec<u8> {
    let payload = Version {
        major: 0,
        minor: 1,
        caps: Some(Capabilities {
            max_msg_fds: Some(8),
            max_data_xfer_size: Some(4096),
            pgsizes: Some(4096),
            max_dma_maps: Some(64),
            write_multiple: Some(true),
        }),
    }
    .encode();
    let mut m = Header::command(0, Command::Version, payload.len())
        .encode()
        .to_vec();
    m.extend_from_slice(&payload);
    m
}

/// Counts the commands (non-reply headers) a stream holds, as far as it parses.
fn count_commands(stream: &[u8]) -> usize {
    let mut n = 0;
    let mut s = stream;
    while let Ok(h) = Header::decode(s) {
        if !h.is_reply() {
            n += 1;
        }
        let size = (h.size as usize).max(HEADER_SIZE);
        if size > s.len() {
            break;
        }
        s = &s[size..];
    }
    n
}

fn check_replies(replies: &[u8], sent: &[u8]) {
    let mut s = replies;
    let mut n = 0;
    while !s.is_empty() {
        let h = Header::decode(s).expect("reply stream ends inside a header");
        h.validate()
            .unwrap_or_else(|e| panic!("malformed reply header {h:?}: {e}"));
        assert!(h.is_reply(), "server sent a command {h:?}");
        assert!(!h.no_reply(), "reply with NO_REPLY {h:?}");
        let size = h.size as usize;
        assert!(
            size >= HEADER_SIZE && size <= s.len(),
            "reply {h:?} truncated"
        );
        if h.is_error() {
            assert_eq!(size, HEADER_SIZE, "error reply with payload {h:?}");
            assert!(h.error != 0 && h.error < 4096, "bad errno in {h:?}");
        } else {
            assert_eq!(h.error, 0, "error field in a success reply {h:?}");
        }
        s = &s[size..];
        n += 1;
    }
    let cmds = count_commands(sent);
    assert!(n <= cmds.max(1), "{n} replies to {cmds} commands");
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let (piece, rest) = match rest.split_first() {
        Some((&p, r)) if ctl & 2 != 0 => (p as usize + 1, r),
        _ => (usize::MAX, rest),
    };
    let mut stream = Vec::new();
    if ctl & 1 != 0 {
        stream.extend_from_slice(&version_message());
    }
    stream.extend_from_slice(rest);

    let (mut client, server) = UnixStream::pair().expect("socketpair");
    client.set_read_timeout(Some(TIME_BOUND)).unwrap();
    client.set_write_timeout(Some(TIME_BOUND)).unwrap();
    let backend = Backend {
        regs: Mutex::new(vec![0; 64]),
        ..Backend::default()
    };
    let config = ServerConfig {
        max_data_xfer_size: 4096,
        dma_timeout: Duration::from_millis(10),
        ..ServerConfig::default()
    };
    let replies = std::thread::scope(|s| {
        let srv = s.spawn(|| serve_connection(&backend, server, &config));
        let mut reader = client.try_clone().unwrap();
        let rd = s.spawn(move || {
            let mut out = Vec::new();
            match reader.read_to_end(&mut out) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("reading replies: {e} (server hung?)"),
            }
            out
        });
        for chunk in stream.chunks(piece.min(stream.len().max(1))) {
            // The server may close first (bad header, failed negotiation): stop writing.
            if client.write_all(chunk).is_err() {
                break;
            }
        }
        let _ = client.shutdown(Shutdown::Write);
        let replies = rd.join().expect("reader");
        // The server's result is free to be an error (bad header, negotiation): it returned.
        let _ = srv.join().expect("server thread panicked");
        replies
    });
    assert!(
        backend.disconnected.load(Ordering::SeqCst),
        "disconnected not called"
    );
    check_replies(&replies, &stream);
});
