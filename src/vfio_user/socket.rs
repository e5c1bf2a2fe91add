//! A vfio-user message stream over a `UnixStream`: one header + payload per message, file
//! descriptors as `SCM_RIGHTS` ancillary data.
//!
//! Received descriptors become `OwnedFd` as soon as `recvmsg` returns (with `MSG_CMSG_CLOEXEC`),
//! so every error path closes them by dropping. Limits on the number of fds and on the message
//! size are checked before any payload buffer is allocated; a message that breaks a limit is
//! drained (in bounded chunks) so the stream stays in step and the peer can be told why.

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

/// One `recvmsg` into `buf`, appending any received fds to `fds`. Returns the bytes read
/// (0 at EOF). Retries on EINTR.
fn recv_some(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, std::io::Error> {
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let r = match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
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
fn drain(fd: RawFd, mut n: usize) -> Result<(), std::io::Error> {
    let mut scratch = vec![0u8; 64 * 1024];
    let mut junk = Vec::new();
    while n > 0 {
        let want = n.min(scratch.len());
        let got = recv_some(fd, &mut scratch[..want], &mut junk)?;
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
    let mut fds = Vec::new();
    let mut hdr = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        let n = match recv_some(fd, &mut hdr[got..], &mut fds) {
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
        drain(fd, size - HEADER_SIZE)?;
        return Err(RecvError::TooLarge {
            header,
            size,
            max: limits.max_msg_size,
        });
    }
    let mut payload = vec![0u8; size - HEADER_SIZE];
    let mut got = 0;
    while got < payload.len() {
        let n = recv_some(fd, &mut payload[got..], &mut fds)?;
        if n == 0 {
            return Err(RecvError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        got += n;
    }
    if fds.len() > limits.max_fds {
        return Err(RecvError::TooManyFds {
            header,
            got: fds.len(),
            max: limits.max_fds,
        });
    }
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
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
    if fds.len() > SCM_MAX_FD {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let fd = stream.as_raw_fd();
    let hdr = header.encode();
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let total = HEADER_SIZE + payload.len();
    let mut sent = 0;
    while sent < total {
        let (h, p) = if sent < HEADER_SIZE {
            (&hdr[sent..], payload)
        } else {
            (&hdr[..0], &payload[sent - HEADER_SIZE..])
        };
        let iov = [IoSlice::new(h), IoSlice::new(p)];
        let cmsg = [ControlMessage::ScmRights(&raw)];
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
