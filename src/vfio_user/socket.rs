//! A vfio-user message stream over a `UnixStream`: one header + payload per message, file
//! descriptors as `SCM_RIGHTS` ancillary data.
//!
//! Received descriptors become `OwnedFd` as soon as `recvmsg` returns (with `MSG_CMSG_CLOEXEC`),
//! so every error path closes them by dropping. Limits on the number of fds and on the message
//! size are checked before any payload buffer is allocated; a message that breaks a limit is
//! drained (in bounded chunks) so the stream stays in step and the peer can be told why.
//!
//! [`recv_message`] reads one message with two `recvmsg` calls (header, payload) and never
//! reads past it; [`MessageReader`] keeps a buffer per stream and so usually needs one call
//! per message (the server's and the client's receive paths use it).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use thiserror::Error;

use super::protocol::{Header, ProtoError, HEADER_SIZE};

/// Linux's `SCM_MAX_FD`: the most descriptors one `sendmsg` can carry. The receive buffer has
/// room for this many, so the kernel never truncates the ancillary data (a truncated cmsg
/// could not be walked, and the descriptors in it would leak).
pub const SCM_MAX_FD: usize = 253;

/// A whole received message.
#[derive(Debug)]
pub struct Message {
    /// Its header (validated).
    pub header: Header,
    /// Payload (`header.size - 16` bytes).
    pub payload: Vec<u8>,
    /// Descriptors that came with it.
    pub fds: Vec<OwnedFd>,
}

/// Limits applied when receiving.
#[derive(Clone, Copy, Debug)]
pub struct RecvLimits {
    /// Most fds accepted in one message (at most [`SCM_MAX_FD`]).
    pub max_fds: usize,
    /// Largest message accepted, header included.
    pub max_msg_size: usize,
}

/// Receive failure.
#[derive(Debug, Error)]
pub enum RecvError {
    /// The socket failed, or the peer closed in the middle of a message: the stream is unusable.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The socket's receive timeout (`SO_RCVTIMEO`) passed before the first byte of a
    /// message: nothing was consumed, the stream is still in step (ETIMEDOUT).
    #[error("no message within the receive timeout")]
    TimedOut,
    /// The header is unusable (size smaller than a header, unknown type or flag bits): the
    /// stream cannot be trusted any more.
    #[error("bad header: {0}")]
    BadHeader(ProtoError),
    /// The message was larger than allowed; it was drained and its fds closed (E2BIG).
    #[error("message of {size} bytes exceeds {max}")]
    TooLarge {
        /// Its header.
        header: Header,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// More fds than allowed; the message was drained and all its fds closed (EINVAL).
    #[error("{got} fds exceed the limit of {max}")]
    TooManyFds {
        /// Its header.
        header: Header,
        /// Fds received.
        got: usize,
        /// The limit.
        max: usize,
    },
}

impl RecvError {
    /// For a recoverable error, the header of the offending message and the errno to answer.
    pub fn reply_errno(&self) -> Option<(Header, i32)> {
        match self {
            RecvError::TooLarge { header, .. } => Some((*header, libc::E2BIG)),
            RecvError::TooManyFds { header, .. } => Some((*header, libc::EINVAL)),
            _ => None,
        }
    }
}

fn io_err(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Room for one `SCM_RIGHTS` message of [`SCM_MAX_FD`] descriptors (`CMSG_SPACE`: the
/// header and the data, each rounded up to the alignment of `size_t`).
const CMSG_BUF: usize = {
    let a = std::mem::size_of::<usize>();
    let hdr = std::mem::size_of::<libc::cmsghdr>().div_ceil(a) * a;
    hdr + (SCM_MAX_FD * std::mem::size_of::<RawFd>()).div_ceil(a) * a
};

/// Ancillary-data buffer for `recvmsg`, aligned for the `cmsghdr` the kernel writes at its
/// start. Kept by its owner and reused: one per call would be an allocation per message.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

impl CmsgBuf {
    fn new() -> Box<CmsgBuf> {
        Box::new(CmsgBuf([0; CMSG_BUF]))
    }
}

/// One `recvmsg` into `buf`, appending any received fds to `fds`. Returns the bytes read
/// (0 at EOF). Retries on EINTR. `flags` adds to `MSG_CMSG_CLOEXEC` (`MSG_DONTWAIT`: a
/// poll that reads).
fn recv_some(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    cmsg: &mut CmsgBuf,
    flags: MsgFlags,
) -> Result<usize, std::io::Error> {
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let r = match recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut cmsg.0[..]),
            MsgFlags::MSG_CMSG_CLOEXEC | flags,
        ) {
            Ok(r) => r,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        };
        let bytes = r.bytes;
        // The buffer holds SCM_MAX_FD descriptors, so truncation cannot happen for SCM_RIGHTS
        // on Linux; if it does anyway, the stream is not trusted any more.
        let cmsgs = r.cmsgs().map_err(io_err)?;
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for f in raw {
                    // SAFETY: the kernel just installed `f` in this process for us (SCM_RIGHTS);
                    // nothing else owns it, so taking ownership here is sound and ensures it
                    // is closed on every path.
                    fds.push(unsafe { OwnedFd::from_raw_fd(f) });
                }
            }
        }
        return Ok(bytes);
    }
}

/// Read and discard `n` bytes (and close any fds that ride along).
fn drain(fd: RawFd, mut n: usize, cmsg: &mut CmsgBuf) -> Result<(), std::io::Error> {
    let mut scratch = vec![0u8; 64 * 1024];
    let mut junk = Vec::new();
    while n > 0 {
        let want = n.min(scratch.len());
        let got = recv_some(fd, &mut scratch[..want], &mut junk, cmsg, MsgFlags::empty())?;
        junk.clear();
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        n -= got;
    }
    Ok(())
}

/// Receive one message. `Ok(None)`: the peer closed cleanly between messages.
pub fn recv_message(stream: &UnixStream, limits: RecvLimits) -> Result<Option<Message>, RecvError> {
    let fd = stream.as_raw_fd();
    let mut cmsg = CmsgBuf::new();
    let mut fds = Vec::new();
    let mut hdr = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        let n = match recv_some(fd, &mut hdr[got..], &mut fds, &mut cmsg, MsgFlags::empty()) {
            Ok(n) => n,
            Err(e) if got == 0 && e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(RecvError::TimedOut)
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(RecvError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    let header = Header::decode(&hdr).map_err(RecvError::BadHeader)?;
    header.validate().map_err(RecvError::BadHeader)?;
    let size = header.size as usize;
    if size > limits.max_msg_size {
        drop(fds);
        drain(fd, size - HEADER_SIZE, &mut cmsg)?;
        return Err(RecvError::TooLarge {
            header,
            size,
            max: limits.max_msg_size,
        });
    }
    let mut payload = vec![0u8; size - HEADER_SIZE];
    let mut got = 0;
    while got < payload.len() {
        let n = recv_some(
            fd,
            &mut payload[got..],
            &mut fds,
            &mut cmsg,
            MsgFlags::empty(),
        )?;
        if n == 0 {
            return Err(RecvError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    Message::checked(header, payload, fds, limits).map(Some)
}

impl Message {
    /// The message, unless it carried more fds than `limits` allow (they are closed).
    fn checked(
        header: Header,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
        limits: RecvLimits,
    ) -> Result<Message, RecvError> {
        if fds.len() > limits.max_fds {
            return Err(RecvError::TooManyFds {
                header,
                got: fds.len(),
                max: limits.max_fds,
            });
        }
        Ok(Message {
            header,
            payload,
            fds,
        })
    }
}

/// Bytes a [`MessageReader`] asks for per `recvmsg`.
pub const READ_BUF: usize = 64 * 1024;

/// Largest payload buffer [`MessageReader::recycle`] keeps.
const MAX_SPARE: usize = 8 * 1024;

/// Receives whole messages from one stream, usually with a single `recvmsg` per message:
/// it reads as much as is there (up to [`READ_BUF`]) and keeps what belongs to the next
/// messages. [`recv_message`] needs two (header, then payload).
///
/// Which message received fds belong to: Linux's stream `recvmsg` stops right after the
/// segment that carried descriptors, and a sender puts them on the first byte of a message
/// sent with one `sendmsg` (vccw, QEMU and libvfio-user all do). So the fds a call brings
/// belong to the message holding the *last* byte that call read. A peer that breaks the
/// convention only confuses its own messages: every fd is still owned, validated by the
/// command it ends up with, and closed on every path.
pub struct MessageReader {
    buf: Box<[u8]>,
    /// Unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]` (the next unread byte).
    pos: u64,
    /// Received fds, with the stream offset of the last byte their `recvmsg` read.
    fds: std::collections::VecDeque<(u64, Vec<OwnedFd>)>,
    cmsg: Box<CmsgBuf>,
    /// A payload buffer handed back by [`MessageReader::recycle`], used for the next message.
    spare: Vec<u8>,
}

impl std::fmt::Debug for MessageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageReader")
            .field("buffered", &(self.end - self.start))
            .field("pos", &self.pos)
            .finish()
    }
}

impl Default for MessageReader {
    fn default() -> Self {
        MessageReader::new()
    }
}

impl MessageReader {
    /// An empty reader.
    pub fn new() -> MessageReader {
        MessageReader {
            buf: vec![0u8; READ_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            pos: 0,
            fds: std::collections::VecDeque::new(),
            cmsg: CmsgBuf::new(),
            spare: Vec::new(),
        }
    }

    /// Hands back a received payload the caller is done with, so that the next message's
    /// payload needs no allocation. Large buffers are not kept.
    pub fn recycle(&mut self, mut payload: Vec<u8>) {
        if payload.capacity() <= MAX_SPARE && payload.capacity() > self.spare.capacity() {
            payload.clear();
            self.spare = payload;
        }
    }

    /// Bytes received and not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Consumes `n` buffered bytes.
    fn consume(&mut self, n: usize) {
        self.start += n;
        self.pos += n as u64;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn note_fds(&mut self, last: u64, got: Vec<OwnedFd>) {
        if !got.is_empty() {
            self.fds.push_back((last, got));
        }
    }

    /// Busy-polls the stream for up to `budget` while nothing is buffered: non-blocking
    /// reads into the buffer (a `recvmsg` with `MSG_DONTWAIT` is the readiness test and the
    /// read at once, so a message that is already there costs no extra `poll`). Returns when
    /// something was read, at EOF or on an error (the next [`MessageReader::recv`] reports
    /// both), or when `budget` has passed. Fds read here are kept with their stream offsets
    /// as in `recv`.
    ///
    /// Returns false when the budget ran out with nothing received (a fruitless poll).
    pub fn poll(&mut self, stream: &UnixStream, budget: std::time::Duration) -> bool {
        if self.buffered() != 0 || budget.is_zero() {
            return true;
        }
        let fd = stream.as_raw_fd();
        let mut t0 = None;
        loop {
            match self.fill_with(fd, MsgFlags::MSG_DONTWAIT) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Data; or EOF/an error, which the blocking read meets again and reports.
                _ => return true,
            }
            // The clock only once the first try found nothing.
            let t = *t0.get_or_insert_with(std::time::Instant::now);
            if t.elapsed() >= budget {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// One `recvmsg` appending to the buffer; returns the bytes read (0: EOF).
    fn fill(&mut self, fd: RawFd) -> Result<usize, std::io::Error> {
        self.fill_with(fd, MsgFlags::empty())
    }

    fn fill_with(&mut self, fd: RawFd, flags: MsgFlags) -> Result<usize, std::io::Error> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut got = Vec::new();
        let n = recv_some(
            fd,
            &mut self.buf[self.end..],
            &mut got,
            &mut self.cmsg,
            flags,
        )?;
        self.end += n;
        let last = (self.pos + self.buffered() as u64).saturating_sub(1);
        self.note_fds(last, got);
        Ok(n)
    }

    /// Reads `out.len()` bytes straight from the socket (the buffer is empty).
    fn read_direct(&mut self, fd: RawFd, out: &mut [u8]) -> Result<(), std::io::Error> {
        let mut done = 0;
        while done < out.len() {
            let mut got = Vec::new();
            let n = recv_some(
                fd,
                &mut out[done..],
                &mut got,
                &mut self.cmsg,
                MsgFlags::empty(),
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.pos += n as u64;
            self.note_fds(self.pos - 1, got);
            done += n;
        }
        Ok(())
    }

    /// Takes the fds of the message ending before stream offset `end`.
    fn take_fds(&mut self, end: u64) -> Vec<OwnedFd> {
        let mut out = Vec::new();
        while self.fds.front().is_some_and(|(last, _)| *last < end) {
            if let Some((_, f)) = self.fds.pop_front() {
                out.extend(f);
            }
        }
        out
    }

    /// Receive one message, as [`recv_message`] (same errors and limits; `TimedOut` only
    /// when nothing of the next message had arrived).
    pub fn recv(
        &mut self,
        stream: &UnixStream,
        limits: RecvLimits,
    ) -> Result<Option<Message>, RecvError> {
        let fd = stream.as_raw_fd();
        while self.buffered() < HEADER_SIZE {
            let n = match self.fill(fd) {
                Ok(n) => n,
                Err(e) if self.buffered() == 0 && e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(RecvError::TimedOut)
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if self.buffered() == 0 {
                    return Ok(None);
                }
                return Err(RecvError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
        let header = Header::decode(&self.buf[self.start..self.start + HEADER_SIZE])
            .map_err(RecvError::BadHeader)?;
        header.validate().map_err(RecvError::BadHeader)?;
        let size = header.size as usize;
        let end = self.pos + size as u64;
        if size > limits.max_msg_size {
            // Skip it (buffered part, then the rest in bounded reads) and close its fds.
            let here = self.buffered().min(size);
            self.consume(here);
            let mut rest = size - here;
            let mut scratch = vec![0u8; rest.min(READ_BUF)];
            while rest > 0 {
                let n = rest.min(scratch.len());
                self.read_direct(fd, &mut scratch[..n])?;
                rest -= n;
            }
            drop(self.take_fds(end));
            return Err(RecvError::TooLarge {
                header,
                size,
                max: limits.max_msg_size,
            });
        }
        self.consume(HEADER_SIZE);
        let len = size - HEADER_SIZE;
        let here = self.buffered().min(len);
        // Copied, not zeroed first: the whole message is usually buffered already.
        let mut payload = std::mem::take(&mut self.spare);
        payload.clear();
        payload.reserve_exact(len);
        payload.extend_from_slice(&self.buf[self.start..self.start + here]);
        self.consume(here);
        if here < len {
            payload.resize(len, 0);
            // Exactly the rest, so nothing of the next message is read here.
            self.read_direct(fd, &mut payload[here..])?;
        }
        let fds = self.take_fds(end);
        Message::checked(header, payload, fds, limits).map(Some)
    }
}

/// Send one message: header and payload in one `sendmsg` carrying `fds`, then the rest if the
/// kernel took only part (fds go with the first byte). `MSG_NOSIGNAL`: a closed peer is an
/// EPIPE error, not a signal.
pub fn send_message(
    stream: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), std::io::Error> {
    send_message_parts(stream, header, payload, &[], fds)
}

/// As [`send_message`] with the payload in two parts (`head` then `tail`, e.g. a
/// REGION_WRITE's fixed part and its data), gathered by the one `sendmsg` instead of
/// copied into one buffer first. `header.size` must count both.
pub fn send_message_parts(
    stream: &UnixStream,
    header: &Header,
    head: &[u8],
    tail: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), std::io::Error> {
    const MAX_INLINE_FDS: usize = 4;
    if fds.len() > SCM_MAX_FD {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let fd = stream.as_raw_fd();
    let hdr = header.encode();
    // Raw descriptors on the stack for the usual few, on the heap beyond.
    let mut few = [0 as RawFd; MAX_INLINE_FDS];
    let many: Vec<RawFd>;
    let raw: &[RawFd] = if fds.len() <= MAX_INLINE_FDS {
        for (r, f) in few.iter_mut().zip(fds) {
            *r = f.as_raw_fd();
        }
        &few[..fds.len()]
    } else {
        many = fds.iter().map(|f| f.as_raw_fd()).collect();
        &many
    };
    let total = HEADER_SIZE + head.len() + tail.len();
    let mut sent = 0;
    while sent < total {
        // What is left of header, head and tail after `sent` bytes.
        let h0 = sent.min(HEADER_SIZE);
        let a0 = sent.saturating_sub(HEADER_SIZE).min(head.len());
        let b0 = sent
            .saturating_sub(HEADER_SIZE + head.len())
            .min(tail.len());
        let iov = [
            IoSlice::new(&hdr[h0..]),
            IoSlice::new(&head[a0..]),
            IoSlice::new(&tail[b0..]),
        ];
        let cmsg = [ControlMessage::ScmRights(raw)];
        let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
            &cmsg
        } else {
            &[]
        };
        match sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const LIM: RecvLimits = RecvLimits {
        max_fds: 4,
        max_msg_size: 1 << 20,
    };

    fn hdr(id: u16, payload: usize) -> Header {
        Header {
            id,
            command: 3,
            size: (HEADER_SIZE + payload) as u32,
            flags: 0,
            error: 0,
        }
    }

    fn memfd(tag: &str) -> OwnedFd {
        nix::sys::memfd::memfd_create(tag, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap()
    }

    fn fd_name(f: &OwnedFd) -> String {
        std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn pipelined_messages_keep_bytes_and_fds_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        let (f1, f3a, f3b) = (memfd("one"), memfd("three-a"), memfd("three-b"));
        // Sent before anything is read, so one recvmsg can see several of them.
        send_message(&a, &hdr(0, 5), b"zero!", &[]).unwrap();
        send_message(&a, &hdr(1, 3), b"one", &[f1.as_fd()]).unwrap();
        send_message(&a, &hdr(2, 0), b"", &[]).unwrap();
        send_message(&a, &hdr(3, 7), b"three..", &[f3a.as_fd(), f3b.as_fd()]).unwrap();
        let big = vec![0xA5u8; READ_BUF + 1000];
        send_message(&a, &hdr(4, big.len()), &big, &[]).unwrap();
        let mut r = MessageReader::new();
        let m0 = r.recv(&b, LIM).unwrap().unwrap();
        assert_eq!(
            (m0.header.id, &m0.payload[..], m0.fds.len()),
            (0, &b"zero!"[..], 0)
        );
        let m1 = r.recv(&b, LIM).unwrap().unwrap();
        assert_eq!((m1.header.id, &m1.payload[..]), (1, &b"one"[..]));
        assert_eq!(m1.fds.len(), 1);
        assert!(fd_name(&m1.fds[0]).contains("memfd:one"));
        let m2 = r.recv(&b, LIM).unwrap().unwrap();
        assert_eq!((m2.header.id, m2.payload.len(), m2.fds.len()), (2, 0, 0));
        let m3 = r.recv(&b, LIM).unwrap().unwrap();
        assert_eq!(&m3.payload[..], b"three..");
        let names: Vec<String> = m3.fds.iter().map(fd_name).collect();
        assert!(
            names[0].contains("three-a") && names[1].contains("three-b"),
            "{names:?}"
        );
        let m4 = r.recv(&b, LIM).unwrap().unwrap();
        assert_eq!(
            (m4.header.id, m4.payload == big, m4.fds.len()),
            (4, true, 0)
        );
        drop(a);
        assert!(r.recv(&b, LIM).unwrap().is_none());
    }

    #[test]
    fn parts_are_sent_as_one_message_even_when_the_kernel_takes_part() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = memfd("parts");
        // Small: one sendmsg, fds on the first byte.
        send_message_parts(&a, &hdr(1, 5), b"ab", b"cde", &[f.as_fd()]).unwrap();
        // Larger than the socket buffer: the kernel takes it in pieces, cut anywhere
        // (inside the header, the head or the tail), while the peer reads.
        let head: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let tail: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let n = head.len() + tail.len();
        let (h2, t2) = (head.clone(), tail.clone());
        let sender = std::thread::spawn(move || {
            send_message_parts(&a, &hdr(2, n), &h2, &t2, &[]).unwrap();
            send_message_parts(&a, &hdr(3, 0), &[], &[], &[]).unwrap();
            a
        });
        let lim = RecvLimits {
            max_fds: 4,
            max_msg_size: 1 << 20,
        };
        let mut r = MessageReader::new();
        let m = r.recv(&b, lim).unwrap().unwrap();
        assert_eq!(
            (m.header.id, &m.payload[..], m.fds.len()),
            (1, &b"abcde"[..], 1)
        );
        assert!(fd_name(&m.fds[0]).contains("memfd:parts"));
        r.recycle(m.payload);
        let m = r.recv(&b, lim).unwrap().unwrap();
        assert_eq!(m.header.id, 2);
        assert_eq!(m.payload.len(), n);
        assert!(m.payload[..head.len()] == head[..] && m.payload[head.len()..] == tail[..]);
        // Too big to keep: the next payload is still right.
        r.recycle(m.payload);
        let m = r.recv(&b, lim).unwrap().unwrap();
        assert_eq!((m.header.id, m.payload.len()), (3, 0));
        drop(sender.join().unwrap());
        assert!(r.recv(&b, lim).unwrap().is_none());
    }

    /// The reused ancillary buffer holds the most fds one message can carry: none is lost
    /// to truncation (which would fail the receive).
    #[test]
    fn cmsg_buffer_holds_scm_max_fd() {
        assert!(CMSG_BUF >= nix::cmsg_space!([RawFd; SCM_MAX_FD]).capacity());
        let (a, b) = UnixStream::pair().unwrap();
        let f = memfd("many");
        let many: Vec<BorrowedFd<'_>> = (0..SCM_MAX_FD).map(|_| f.as_fd()).collect();
        send_message(&a, &hdr(1, 1), b"x", &many).unwrap();
        let lim = RecvLimits {
            max_fds: SCM_MAX_FD,
            max_msg_size: 64,
        };
        let mut r = MessageReader::new();
        let m = r.recv(&b, lim).unwrap().unwrap();
        assert_eq!(m.fds.len(), SCM_MAX_FD);
        assert!(m.fds.iter().all(|g| fd_name(g).contains("memfd:many")));
    }

    #[test]
    fn limits_eof_and_timeouts() {
        let (a, b) = UnixStream::pair().unwrap();
        let small = RecvLimits {
            max_fds: 1,
            max_msg_size: 64,
        };
        let (f1, f2) = (memfd("x"), memfd("y"));
        // Too large (dropped with its fd), then too many fds, then a good one.
        send_message(&a, &hdr(7, 100), &[1u8; 100], &[f1.as_fd()]).unwrap();
        send_message(&a, &hdr(8, 1), &[2], &[f1.as_fd(), f2.as_fd()]).unwrap();
        send_message(&a, &hdr(9, 2), &[3, 4], &[]).unwrap();
        let mut r = MessageReader::new();
        match r.recv(&b, small) {
            Err(RecvError::TooLarge { header, size, .. }) => {
                assert_eq!((header.id, size), (7, 116))
            }
            other => panic!("{other:?}"),
        }
        match r.recv(&b, small) {
            Err(RecvError::TooManyFds { header, got, .. }) => assert_eq!((header.id, got), (8, 2)),
            other => panic!("{other:?}"),
        }
        let m = r.recv(&b, small).unwrap().unwrap();
        assert_eq!(
            (m.header.id, &m.payload[..], m.fds.len()),
            (9, &[3u8, 4][..], 0)
        );
        // Nothing there: a receive timeout is TimedOut and the stream stays usable.
        b.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        assert!(matches!(r.recv(&b, small), Err(RecvError::TimedOut)));
        send_message(&a, &hdr(10, 0), &[], &[]).unwrap();
        assert_eq!(r.recv(&b, small).unwrap().unwrap().header.id, 10);
        // Half a header, then silence: no longer in step (Io), not TimedOut.
        use std::io::Write;
        (&a).write_all(&hdr(11, 4).encode()[..10]).unwrap();
        assert!(matches!(r.recv(&b, small), Err(RecvError::Io(_))));
        // A header with an impossible size is a bad header.
        let (a, b) = UnixStream::pair().unwrap();
        let mut h = hdr(1, 0).encode();
        h[4..8].copy_from_slice(&8u32.to_ne_bytes());
        (&a).write_all(&h).unwrap();
        let mut r = MessageReader::new();
        assert!(matches!(r.recv(&b, small), Err(RecvError::BadHeader(_))));
        // EOF in the middle of a payload.
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&hdr(1, 8).encode()).unwrap();
        (&a).write_all(&[0u8; 3]).unwrap();
        drop(a);
        let mut r = MessageReader::new();
        assert!(matches!(r.recv(&b, small), Err(RecvError::Io(_))));
    }
}
