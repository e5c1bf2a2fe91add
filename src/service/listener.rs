//! One socket per device: [`DeviceListener`] accepts clients for one [`CcwBackend`], one
//! connection at a time.
//!
//! Threads: the listener thread polls the listening socket and a stop eventfd. An accepted
//! client gets a connection thread running [`serve_connection`] (which adds its own reader
//! thread). While that connection lives, a second client is refused cleanly: its first
//! message is answered with an error reply carrying EBUSY, then the socket is closed.
//! Devices share nothing, so I/O on one device never waits for another.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::backend::CcwBackend;
use crate::vfio_user::server::{serve_connection, ServerConfig};
use crate::vfio_user::socket::{recv_message, send_message, RecvLimits};

/// How long a refused second client has to send its first message.
const REFUSE_TIMEOUT: Duration = Duration::from_millis(500);

/// A device's listening socket and its threads.
pub struct DeviceListener {
    path: PathBuf,
    backend: Arc<CcwBackend>,
    stop: Arc<EventFd>,
    current: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceListener")
            .field("path", &self.path)
            .finish()
    }
}

/// Binds `path` (mode 0600). An existing socket nobody listens on is replaced; a live one
/// is an error (EADDRINUSE), and so is any other existing file.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl DeviceListener {
    /// Binds the device's socket at `path` and starts its listener thread.
    pub fn start(
        path: &Path,
        backend: Arc<CcwBackend>,
        config: ServerConfig,
    ) -> io::Result<DeviceListener> {
        let listener = bind(path)?;
        let stop = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        let current = Arc::new(Mutex::new(None));
        let (b, s, c) = (backend.clone(), stop.clone(), current.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vccw-listen-{}", backend.name()))
            .spawn(move || listen_loop(listener, b, s, c, config))?;
        Ok(DeviceListener {
            path: path.to_path_buf(),
            backend,
            stop,
            current,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device served.
    pub fn backend(&self) -> &Arc<CcwBackend> {
        &self.backend
    }

    /// Stops accepting, disconnects the client (the backend then unmaps its memory and
    /// resets the device, which clears any I/O in flight), waits for the threads and
    /// removes the socket.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        let Some(t) = self.thread.take() else { return };
        let _ = self.stop.write(1);
        if let Some(s) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if t.join().is_err() {
            tracing::error!(dev = %self.backend.name(), "listener thread panicked");
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %e, "could not remove the socket");
        }
    }
}

impl Drop for DeviceListener {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn listen_loop(
    listener: UnixListener,
    backend: Arc<CcwBackend>,
    stop: Arc<EventFd>,
    current: Arc<Mutex<Option<UnixStream>>>,
    config: ServerConfig,
) {
    let mut conn: Option<JoinHandle<()>> = None;
    loop {
        let (lr, sr) = {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!(dev = %backend.name(), %e, "poll failed; listener stops");
                    break;
                }
            }
            (fds[0].revents(), fds[1].revents())
        };
        if sr.is_some_and(|r| !r.is_empty()) {
            break;
        }
        if lr.is_none_or(|r| r.is_empty()) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(dev = %backend.name(), %e, "accept failed");
                continue;
            }
        };
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!(dev = %backend.name(), %e, "socket setup failed");
            continue;
        }
        if conn.as_ref().is_some_and(|h| !h.is_finished()) && !ends_soon(conn.as_ref()) {
            tracing::info!(dev = %backend.name(), "second client refused (EBUSY)");
            refuse(stream);
            continue;
        }
        if let Some(h) = conn.take() {
            let _ = h.join();
        }
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(dev = %backend.name(), %e, "socket clone failed");
                continue;
            }
        };
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone);
        let (b, cur, cfg) = (backend.clone(), current.clone(), config.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("vccw-conn-{}", backend.name()))
            .spawn(move || {
                tracing::info!(dev = %b.name(), "client connected");
                if let Err(e) = serve_connection(&*b, stream, &cfg) {
                    tracing::info!(dev = %b.name(), %e, "connection ended");
                }
                *cur.lock().unwrap_or_else(|p| p.into_inner()) = None;
            });
        match spawned {
            Ok(h) => conn = Some(h),
            Err(e) => tracing::error!(dev = %backend.name(), %e, "cannot start a connection"),
        }
    }
    if let Some(s) = current.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    if let Some(h) = conn.take() {
        let _ = h.join();
    }
}

/// Whether the connection thread ends within a short grace period. A client that reconnects
/// right after its previous connection closed must not be refused because the old thread is
/// still returning from its cleanup (its mappings and pins are already gone by then).
fn ends_soon(conn: Option<&JoinHandle<()>>) -> bool {
    const GRACE: std::time::Duration = std::time::Duration::from_millis(200);
    let Some(h) = conn else { return true };
    let t0 = std::time::Instant::now();
    while !h.is_finished() {
        if t0.elapsed() >= GRACE {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

/// Answers the first message of a client that cannot be served now with EBUSY.
fn refuse(stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(REFUSE_TIMEOUT));
    let limits = RecvLimits {
        max_fds: 0,
        max_msg_size: 64 * 1024,
    };
    let header = match recv_message(&stream, limits) {
        Ok(Some(m)) => Some(m.header),
        Ok(None) => None,
        Err(e) => e.reply_errno().map(|(h, _)| h),
    };
    if let Some(h) = header.filter(|h| !h.is_reply()) {
        let _ = send_message(&stream, &h.error_reply(libc::EBUSY), &[], &[]);
    }
}
