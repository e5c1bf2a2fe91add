//! vccw as a service: every device on its own vfio-user socket, in one process.
//!
//! * [`backend`]: [`backend::CcwBackend`], one vfio-ccw device as a vfio-user backend.
//! * [`listener`]: [`listener::DeviceListener`], a device's socket and threads.
//! * [`mirror`]: [`mirror::IoMirror`], the read-only mmap mirror of the I/O region.
//! * [`serve`]: the `vccw serve` command: images, devices, ready lines, signals, shutdown.
//! * [`demo`]: the `vccw demo` command (server and guest as child processes).
//!
//! See `docs/service.md` for the threading design.

pub mod backend;
pub mod demo;
pub mod listener;
pub mod mirror;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use thiserror::Error;

use crate::css::subchannel::{EmulatedSubchannel, SubchannelConfig};
use crate::devices::dasd3390::{Dasd3390, Dasd3390Options};
use crate::devices::tape3490::{Tape3490, Tape3490Config};
use crate::driver::{DeviceConfig, VfioCcwDevice};
use crate::image::awstape::{AwsTape, OpenMode};
use crate::image::ckd::{CkdImage, DeviceHeader};
use crate::iommu_store::{IommuStore, StoreConfig};
use crate::vfio_user::server::ServerConfig;

use backend::CcwBackend;
use listener::DeviceListener;

/// Default data directory of `vccw serve`.
pub const DEFAULT_DATA_DIR: &str = "vccw-data";
/// Cylinders of the 3390 image `vccw serve` creates by default.
pub const DEFAULT_CYLINDERS: u32 = 5;
/// Volume serial of a created image.
pub const DEFAULT_VOLSER: &str = "VCCW01";
/// First device number given to DASDs (then 0101, ...).
pub const FIRST_DASD_DEVNO: u16 = 0x0100;
/// First device number given to tapes (then 0181, ...).
pub const FIRST_TAPE_DEVNO: u16 = 0x0180;

/// Why `vccw serve` failed.
#[derive(Debug, Error)]
pub enum ServiceError {
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: io::Error,
    },
    /// An image exists but cannot be used.
    #[error("{path}: {detail}")]
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The device could not be opened (its errno).
    #[error("device {devno:04x}: cannot open (errno {errno})")]
    Device {
        /// Device number.
        devno: u16,
        /// errno.
        errno: i32,
    },
    /// A kernel vfio-ccw mdev could not be opened (its errno; ENOSYS off Linux).
    #[error("mdev {uuid}: {detail} (errno {errno})")]
    Mdev {
        /// The mdev's UUID.
        uuid: String,
        /// Why.
        detail: String,
        /// errno.
        errno: i32,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ServiceError {
    let what = what.into();
    move |source| ServiceError::Io { what, source }
}

/// Kind of a served device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A 3390 DASD on a Hercules CKD image.
    Dasd3390,
    /// A 3490 tape drive on an AWSTAPE file.
    Tape3490,
    /// A real subchannel through a kernel vfio-ccw mdev (Linux).
    Mdev,
}

impl DeviceKind {
    /// "3390", "3490" or "mdev" (as the ready line prints it).
    pub fn label(&self) -> &'static str {
        match self {
            DeviceKind::Dasd3390 => "3390",
            DeviceKind::Tape3490 => "3490",
            DeviceKind::Mdev => "mdev",
        }
    }
}

/// Options of `vccw serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where default images are created.
    pub data_dir: PathBuf,
    /// Where sockets go (default: the data directory).
    pub socket_dir: Option<PathBuf>,
    /// DASD images to serve (none, no tapes and no mdevs: create and serve the defaults).
    pub dasd: Vec<PathBuf>,
    /// Tape files to serve.
    pub tape: Vec<PathBuf>,
    /// UUIDs of kernel vfio-ccw mdevs to serve (Linux only).
    pub mdev: Vec<String>,
    /// Cylinders of a created default image.
    pub cylinders: u32,
    /// The transport's options (e.g. [`ServerConfig::poll`], the readers' busy poll).
    pub server: ServerConfig,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            socket_dir: None,
            dasd: Vec::new(),
            tape: Vec::new(),
            mdev: Vec::new(),
            cylinders: DEFAULT_CYLINDERS,
            server: ServerConfig::default(),
        }
    }
}

/// A device being served.
pub struct ServedDevice {
    /// Device number (0.0.xxxx).
    pub devno: u16,
    /// Kind.
    pub kind: DeviceKind,
    /// Image file, or for an mdev its sysfs directory (`/sys/bus/mdev/devices/UUID`).
    pub image: PathBuf,
    listener: DeviceListener,
    /// A handle on the image, for the final fsync (none for an mdev).
    sync_file: Option<File>,
}

impl std::fmt::Debug for ServedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedDevice")
            .field("devno", &self.devno)
            .field("kind", &self.kind)
            .field("image", &self.image)
            .finish()
    }
}

impl ServedDevice {
    /// The socket path.
    pub fn socket(&self) -> &Path {
        self.listener.path()
    }

    /// The line printed when the device is ready: `ready 0.0.0100 3390 /path/dasd0.sock`.
    pub fn ready_line(&self) -> String {
        format!(
            "ready 0.0.{:04x} {} {}",
            self.devno,
            self.kind.label(),
            self.socket().display()
        )
    }

    /// One stats line (see [`backend::BackendStats`]).
    pub fn stats_line(&self) -> String {
        format!(
            "stats 0.0.{:04x} {}",
            self.devno,
            self.listener.backend().stats()
        )
    }

    /// Stops serving (disconnect, device reset, threads joined, socket removed), then
    /// flushes the image to stable storage.
    pub fn stop(self) -> io::Result<()> {
        let ServedDevice {
            listener,
            sync_file,
            ..
        } = self;
        listener.shutdown();
        // The listener's threads are gone, so this drops the device and its channel
        // thread (or closes the mdev); the image's writes all went to the file.
        match sync_file {
            Some(f) => f.sync_all(),
            None => Ok(()),
        }
    }
}

/// Creates a 3390 image, printing a percentage on stderr while it takes long.
pub fn create_dasd_image(path: &Path, cylinders: u32, volser: &str) -> Result<(), ServiceError> {
    let h = DeviceHeader::new_3390();
    let total = 512 + cylinders as u64 * h.heads as u64 * h.track_size as u64;
    let (p, v) = (path.to_path_buf(), volser.to_string());
    let worker = std::thread::spawn(move || CkdImage::create_3390(&p, cylinders, Some(&v)));
    let t0 = Instant::now();
    let mut shown = false;
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        if t0.elapsed() > Duration::from_millis(300) {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            eprint!(
                "\rcreating {}: {:3}%",
                path.display(),
                (len * 100 / total.max(1)).min(100)
            );
            shown = true;
        }
    }
    if shown {
        eprintln!("\rcreating {}: 100%", path.display());
    }
    match worker.join() {
        Ok(Ok(img)) => img.sync().map_err(|e| ServiceError::Image {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
        Ok(Err(e)) => Err(ServiceError::Image {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }),
        Err(_) => Err(ServiceError::Image {
            path: path.to_path_buf(),
            detail: "image creation panicked".into(),
        }),
    }
}

fn start_device(
    devno: u16,
    kind: DeviceKind,
    image: &Path,
    socket: &Path,
    server: ServerConfig,
) -> Result<ServedDevice, ServiceError> {
    let img_err = |detail: String| ServiceError::Image {
        path: image.to_path_buf(),
        detail,
    };
    let model: Box<dyn crate::css::device::DeviceModel> = match kind {
        DeviceKind::Dasd3390 => Box::new(
            Dasd3390::open(
                image,
                Dasd3390Options {
                    devnum: devno,
                    ..Default::default()
                },
            )
            .map_err(|e| img_err(format!("not a usable 3390 image: {e}")))?,
        ),
        DeviceKind::Mdev => {
            return Err(img_err("an mdev is started with start_mdev".into()));
        }
        DeviceKind::Tape3490 => {
            let tape = AwsTape::open(image, OpenMode::ReadWrite)
                .map_err(|e| img_err(format!("not a usable AWSTAPE file: {e}")))?;
            Box::new(Tape3490::with_tape(
                tape,
                Tape3490Config {
                    dev_num: devno,
                    ..Default::default()
                },
            ))
        }
    };
    let sync_file = File::open(image).map_err(io_err(format!("open {}", image.display())))?;
    let sync_file = Some(sync_file);
    let sch = EmulatedSubchannel::new(
        model,
        SubchannelConfig {
            devno,
            ..Default::default()
        },
    )
    .map_err(io_err("start the channel thread"))?;
    let store = IommuStore::new(StoreConfig::default());
    let dev = VfioCcwDevice::new(Arc::new(sch), store.clone(), DeviceConfig::default());
    let name = format!("0.0.{devno:04x}");
    let backend = CcwBackend::new(dev, store, &name)
        .map_err(|errno| ServiceError::Device { devno, errno })?;
    let listener = DeviceListener::start(socket, Arc::new(backend), server)
        .map_err(io_err(format!("listen on {}", socket.display())))?;
    Ok(ServedDevice {
        devno,
        kind,
        image: image.to_path_buf(),
        listener,
        sync_file,
    })
}

/// Serves the kernel vfio-ccw mdev `uuid` on `socket`: a [`VfioCcwDevice`] over an
/// [`crate::mdev::MdevSubchannel`] sharing the device's store. The device number is the real
/// subchannel's (from its SCHIB), or 0 when the SCHIB region is missing.
#[cfg(target_os = "linux")]
pub fn start_mdev(
    uuid: &str,
    socket: &Path,
    server: ServerConfig,
) -> Result<ServedDevice, ServiceError> {
    use crate::driver::Subchannel;
    use crate::mdev::MdevSubchannel;
    let mdev = MdevSubchannel::open(uuid).map_err(|e| ServiceError::Mdev {
        uuid: uuid.to_string(),
        detail: e.to_string(),
        errno: e.errno(),
    })?;
    let devno = match mdev.store_schib() {
        Ok(s) if s.pmcw.flags.devno_valid() => s.pmcw.devno,
        _ => 0,
    };
    let store = IommuStore::new(StoreConfig::default());
    // Without the store the mdev cannot map the translated program's pages: every start
    // would end with condition code 3.
    mdev.attach_store(store.clone());
    let dev = VfioCcwDevice::new(mdev, store.clone(), DeviceConfig::default());
    let backend = CcwBackend::new(dev, store, &format!("0.0.{devno:04x}"))
        .map_err(|errno| ServiceError::Device { devno, errno })?;
    let listener = DeviceListener::start(socket, Arc::new(backend), server)
        .map_err(io_err(format!("listen on {}", socket.display())))?;
    Ok(ServedDevice {
        devno,
        kind: DeviceKind::Mdev,
        image: PathBuf::from(format!("/sys/bus/mdev/devices/{uuid}")),
        listener,
        sync_file: None,
    })
}

/// Off Linux there is no vfio-ccw: always [`ServiceError::Mdev`] with ENOSYS.
#[cfg(not(target_os = "linux"))]
pub fn start_mdev(
    uuid: &str,
    _socket: &Path,
    _server: ServerConfig,
) -> Result<ServedDevice, ServiceError> {
    Err(ServiceError::Mdev {
        uuid: uuid.to_string(),
        detail: "vfio-ccw mdevs exist only on Linux".into(),
        errno: libc::ENOSYS,
    })
}

/// Creates (or reuses) the default images and starts every device of `opts`. With only
/// mdevs given, no image is created.
pub fn start_devices(opts: &ServeOptions) -> Result<Vec<ServedDevice>, ServiceError> {
    let (mut dasd, mut tape) = (opts.dasd.clone(), opts.tape.clone());
    if dasd.is_empty() && tape.is_empty() && opts.mdev.is_empty() {
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(io_err(format!("create {}", opts.data_dir.display())))?;
        let d = opts.data_dir.join("dasd0.ckd");
        if !d.exists() {
            create_dasd_image(&d, opts.cylinders, DEFAULT_VOLSER)?;
        }
        let t = opts.data_dir.join("tape0.aws");
        if !t.exists() {
            AwsTape::create(&t).map_err(|e| ServiceError::Image {
                path: t.clone(),
                detail: e.to_string(),
            })?;
        }
        dasd.push(d);
        tape.push(t);
    }
    let sdir = opts.socket_dir.clone().unwrap_or(opts.data_dir.clone());
    std::fs::create_dir_all(&sdir).map_err(io_err(format!("create {}", sdir.display())))?;
    let mut out = Vec::new();
    for (i, d) in dasd.iter().enumerate() {
        let sock = sdir.join(format!("dasd{i}.sock"));
        out.push(start_device(
            FIRST_DASD_DEVNO + i as u16,
            DeviceKind::Dasd3390,
            d,
            &sock,
            opts.server.clone(),
        )?);
    }
    for (i, t) in tape.iter().enumerate() {
        let sock = sdir.join(format!("tape{i}.sock"));
        out.push(start_device(
            FIRST_TAPE_DEVNO + i as u16,
            DeviceKind::Tape3490,
            t,
            &sock,
            opts.server.clone(),
        )?);
    }
    for (i, uuid) in opts.mdev.iter().enumerate() {
        out.push(start_mdev(
            uuid,
            &sdir.join(format!("mdev{i}.sock")),
            opts.server.clone(),
        )?);
    }
    Ok(out)
}

/// `vccw serve`: serves the devices until SIGINT or SIGTERM, printing the ready lines on
/// `out`. SIGUSR1 prints one stats line per device on stderr. On exit every client is
/// disconnected (in-flight I/O cleared by the device reset), images are fsynced, mdevs
/// closed and sockets removed.
pub fn serve(opts: &ServeOptions, out: &mut dyn Write) -> Result<(), ServiceError> {
    // Blocked before any thread exists, so every thread inherits the mask and the signals
    // are only ever read from the signalfd.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.add(Signal::SIGUSR1);
    mask.thread_block()
        .map_err(|e| io_err("block signals")(e.into()))?;
    let sfd = SignalFd::new(&mask).map_err(|e| io_err("signalfd")(e.into()))?;
    let devices = start_devices(opts)?;
    for d in &devices {
        writeln!(out, "{}", d.ready_line()).map_err(io_err("stdout"))?;
    }
    writeln!(out, "serving {} devices", devices.len()).map_err(io_err("stdout"))?;
    out.flush().map_err(io_err("stdout"))?;
    loop {
        match sfd.read_signal() {
            Ok(Some(info)) if info.ssi_signo == Signal::SIGUSR1 as u32 => {
                for d in &devices {
                    eprintln!("{}", d.stats_line());
                }
            }
            Ok(Some(info)) => {
                tracing::info!(signal = info.ssi_signo, "stopping");
                break;
            }
            Ok(None) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io_err("read signalfd")(e.into())),
        }
    }
    let n = devices.len();
    let mut failed = None;
    for d in devices {
        let img = d.image.clone();
        if let Err(e) = d.stop() {
            failed = Some(io_err(format!("fsync {}", img.display()))(e));
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    eprintln!("vccw serve: stopped {n} devices, images flushed, sockets removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdev_only_creates_no_images_and_reports_the_errno() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let opts = ServeOptions {
            data_dir: data.clone(),
            mdev: vec!["../../etc".into()],
            ..Default::default()
        };
        let e = start_devices(&opts).unwrap_err();
        let want = if cfg!(target_os = "linux") {
            libc::EINVAL
        } else {
            libc::ENOSYS
        };
        assert!(
            matches!(e, ServiceError::Mdev { errno, .. } if errno == want),
            "{e}"
        );
        assert!(!data.join("dasd0.ckd").exists());
        assert!(!data.join("tape0.aws").exists());
        // A well-formed UUID of no mdev: the sysfs link is missing.
        #[cfg(target_os = "linux")]
        {
            let opts = ServeOptions {
                mdev: vec!["00000000-0000-0000-0000-000000000000".into()],
                ..opts
            };
            let e = start_devices(&opts).unwrap_err();
            assert!(
                matches!(e, ServiceError::Mdev { errno, .. } if errno == libc::ENOENT),
                "{e}"
            );
        }
        assert_eq!(DeviceKind::Mdev.label(), "mdev");
    }
}
