//! The `vccw` command: translate, run and serve channel programs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vccw::ccw::{translate, TranslateConfig};
use vccw::ccwfile::ProgramFile;
use vccw::iommu_store::{IommuStore, StoreConfig};

#[derive(Parser)]
#[command(
    name = "vccw",
    version,
    about = "A user-space vfio-ccw mediated channel-I/O service"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Translate a channel program written as text and print the host program, its IDALs and
    /// the pinned pages, or the error with its errno and channel status.
    Translate {
        /// The program file (see examples/*.ccw).
        file: PathBuf,
    },
    /// Run a channel program through the whole stack (vfio-ccw device, translator, emulated
    /// subchannel) on a 3390 or 3490 model and print the IRB, sense and the data read.
    /// Exit code 0: channel end + device end without checks; 1: any check or exception;
    /// 2: usage error.
    Run {
        /// A Hercules CKD image to drive as a 3390.
        #[arg(long, conflicts_with = "tape", required_unless_present = "tape")]
        dasd: Option<PathBuf>,
        /// An AWSTAPE file to mount on a 3490.
        #[arg(long)]
        tape: Option<PathBuf>,
        /// Open the image read-write (default: read-only).
        #[arg(long)]
        write: bool,
        /// Seconds to wait for the final interrupt.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// The program file (see examples/dasd-*.ccw, examples/tape-*.ccw).
        program: PathBuf,
    },
    /// Serve vccw devices over vfio-user, one socket per device. With no --dasd/--tape/--mdev,
    /// creates (or reuses) a small 3390 image and an AWSTAPE file in the data directory.
    Serve {
        /// Data directory for the default images.
        #[arg(long, default_value = vccw::service::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// Socket directory (default: the data directory).
        #[arg(long)]
        socket_dir: Option<PathBuf>,
        /// A 3390 CKD image to serve (repeatable).
        #[arg(long)]
        dasd: Vec<PathBuf>,
        /// An AWSTAPE file to serve (repeatable).
        #[arg(long)]
        tape: Vec<PathBuf>,
        /// The UUID of a kernel vfio-ccw mdev to serve, socket mdevN.sock (repeatable).
        #[cfg(target_os = "linux")]
        #[arg(long)]
        mdev: Vec<String>,
        /// Cylinders of a created default 3390 image.
        #[arg(long, default_value_t = vccw::service::DEFAULT_CYLINDERS)]
        cylinders: u32,
        /// Microseconds each connection busy-polls its socket after a message before it
        /// sleeps (0: never; saves the wake-up of a request that comes within it). Default:
        /// 50, or 0 on a machine with one CPU.
        #[arg(long)]
        poll_us: Option<u64>,
    },
    /// Act as a guest: identify each device by SENSE ID and run a verified workload.
    Guest {
        /// Device sockets.
        #[arg(required = true)]
        sockets: Vec<PathBuf>,
        /// Records (3390) or blocks (3490) to write and read back.
        #[arg(long, default_value_t = 16)]
        records: u32,
        /// For a virtio-ccw device (control unit 3832): the capacity in 512-byte sectors
        /// READ_CONF must report.
        #[arg(long)]
        expect_capacity: Option<u64>,
    },
    /// Run the service end to end: a server child, a guest child, clean shutdown.
    Demo {
        /// Records (3390) or blocks (3490) per device.
        #[arg(long, default_value_t = 16)]
        records: u32,
        /// Keep the temporary data directory.
        #[arg(long)]
        keep: bool,
    },
    /// Load-test `vccw serve` (a child on fresh images): M client threads per device
    /// connect, run verified DASD/tape I/O and disconnect for T seconds; reports I/Os,
    /// throughput, p50/p99 latency, errors and leaks (SIGUSR1 stats and fds before/after).
    /// Exit code 0 only with no errors and no leaks.
    Load {
        /// Devices: half (rounded up) 3390 DASD, the rest 3490 tape.
        #[arg(long, default_value_t = 4)]
        devices: u32,
        /// Client threads per device (1..=15).
        #[arg(long, default_value_t = 2)]
        clients: u32,
        /// Seconds the clients run.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// I/Os after which a client disconnects and connects again.
        #[arg(long, default_value_t = 50)]
        ios_per_connection: u32,
    },
    /// Drive a real subchannel through a kernel vfio-ccw mdev (s390x Linux).
    #[cfg(target_os = "linux")]
    Mdev {
        #[command(subcommand)]
        cmd: MdevCmd,
    },
}

/// `vccw mdev ...`.
#[cfg(target_os = "linux")]
#[derive(Subcommand)]
enum MdevCmd {
    /// Run SENSE ID and virtio READ_CONF programs (plain, MIDAW, format 0), HSCH, CSCH and a
    /// SCHIB read through vccw on the mdev; print `RESULT ok|FAIL <check>` lines.
    Probe {
        /// The mdev's UUID.
        #[arg(long)]
        uuid: String,
        /// Pass the guest programs through untranslated (IOVA = guest physical), as QEMU.
        #[arg(long)]
        passthrough: bool,
    },
    /// Median latency of N I/Os through vccw versus the pass-through path, and the ratio.
    Bench {
        /// The mdev's UUID.
        #[arg(long)]
        uuid: String,
        /// I/Os per path.
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Translate { file } => cmd_translate(&file),
        Cmd::Run {
            dasd,
            tape,
            write,
            timeout,
            program,
        } => cmd_run(dasd, tape, write, timeout, program),
        Cmd::Serve {
            data_dir,
            socket_dir,
            dasd,
            tape,
            #[cfg(target_os = "linux")]
            mdev,
            cylinders,
            poll_us,
        } => cmd_serve(vccw::service::ServeOptions {
            data_dir,
            socket_dir,
            dasd,
            tape,
            #[cfg(target_os = "linux")]
            mdev,
            #[cfg(not(target_os = "linux"))]
            mdev: Vec::new(),
            cylinders,
            server: {
                let mut c = vccw::vfio_user::server::ServerConfig::default();
                if let Some(us) = poll_us {
                    c.poll = std::time::Duration::from_micros(us);
                }
                c
            },
        }),
        Cmd::Guest {
            sockets,
            records,
            expect_capacity,
        } => cmd_guest(&sockets, records, expect_capacity),
        Cmd::Demo { records, keep } => cmd_demo(records, keep),
        Cmd::Load {
            devices,
            clients,
            seconds,
            ios_per_connection,
        } => cmd_load(devices, clients, seconds, ios_per_connection),
        #[cfg(target_os = "linux")]
        Cmd::Mdev { cmd } => cmd_mdev(cmd),
    }
}

fn cmd_run(
    dasd: Option<PathBuf>,
    tape: Option<PathBuf>,
    write: bool,
    timeout: u64,
    program: PathBuf,
) -> ExitCode {
    use vccw::runner::{run_program, RunError, RunOptions, Target};
    let target = match (dasd, tape) {
        (Some(d), None) => Target::Dasd(d),
        (None, Some(t)) => Target::Tape(t),
        _ => {
            eprintln!("vccw run: give exactly one of --dasd IMAGE or --tape FILE");
            return ExitCode::from(2);
        }
    };
    let opts = RunOptions {
        target,
        program,
        write,
        timeout: std::time::Duration::from_secs(timeout),
    };
    match run_program(&opts, &mut std::io::stdout().lock()) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(e @ RunError::Usage(_)) => {
            eprintln!("vccw run: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("vccw run: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(target_os = "linux")]
fn cmd_mdev(cmd: MdevCmd) -> ExitCode {
    use vccw::mdev::probe;
    let report = match cmd {
        MdevCmd::Probe {
            uuid,
            passthrough: false,
        } => probe::probe(&uuid),
        MdevCmd::Probe {
            uuid,
            passthrough: true,
        } => probe::probe_passthrough(&uuid),
        MdevCmd::Bench { uuid, count } => probe::bench(&uuid, count),
    };
    if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!("vccw mdev: {} check(s) failed", report.failed);
        ExitCode::from(1)
    }
}

fn load(file: &PathBuf) -> Result<(ProgramFile, IommuStore), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let pf = ProgramFile::parse(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let store = IommuStore::new(StoreConfig::default());
    pf.load(&store)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok((pf, store))
}

fn cmd_translate(file: &PathBuf) -> ExitCode {
    let (pf, store) = match load(file) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("vccw: {e}");
            return ExitCode::from(2);
        }
    };
    println!("guest ORB: {:02x?}", pf.orb.to_bytes());
    match translate(&pf.orb, &store, &TranslateConfig::default()) {
        Ok(p) => {
            print!("{p}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let st = e.channel_status();
            println!("refused: {e}");
            println!(
                "errno: {} ({})",
                e.errno(),
                std::io::Error::from_raw_os_error(e.errno())
            );
            println!(
                "channel status: dstat={:#04x} cstat={:#04x} ({})",
                st.dstat,
                st.cstat,
                describe_status(st.dstat, st.cstat)
            );
            ExitCode::from(1)
        }
    }
}

fn describe_status(dstat: u8, cstat: u8) -> String {
    use vccw::orb::{cstat as c, dstat as d};
    let mut v = Vec::new();
    for (bit, name) in [
        (c::PROGRAM_CHECK, "program check"),
        (c::PROTECTION_CHECK, "protection check"),
        (c::CHANNEL_DATA_CHECK, "channel data check"),
        (c::INCORRECT_LENGTH, "incorrect length"),
    ] {
        if cstat & bit != 0 {
            v.push(name);
        }
    }
    for (bit, name) in [
        (d::UNIT_CHECK, "unit check"),
        (d::UNIT_EXCEPTION, "unit exception"),
    ] {
        if dstat & bit != 0 {
            v.push(name);
        }
    }
    v.join(", ")
}

fn cmd_serve(opts: vccw::service::ServeOptions) -> ExitCode {
    match vccw::service::serve(&opts, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vccw serve: {e}");
            ExitCode::from(1)
        }
    }
}

fn cmd_guest(sockets: &[PathBuf], records: u32, expect_capacity: Option<u64>) -> ExitCode {
    use vccw::client::workload::{run_guest, WorkloadOptions};
    let opts = WorkloadOptions {
        records,
        expect_capacity,
        ..Default::default()
    };
    let mut failed = 0;
    for s in sockets {
        let mut out = std::io::stdout();
        match run_guest(s, &opts, &mut out) {
            Ok(sum) => println!(
                "{}: {:04x} OK: {} I/Os, {} bytes verified",
                s.display(),
                sum.identity.dev_type,
                sum.ios,
                sum.bytes
            ),
            Err(e) => {
                println!("{}: FAILED: {e}", s.display());
                failed += 1;
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn cmd_demo(records: u32, keep: bool) -> ExitCode {
    let opts = vccw::service::demo::DemoOptions {
        exe: None,
        records,
        keep,
    };
    match vccw::service::demo::run_demo(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vccw demo: {e}");
            ExitCode::from(1)
        }
    }
}

fn cmd_load(devices: u32, clients: u32, seconds: f64, ios_per_connection: u32) -> ExitCode {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 86400.0) {
        eprintln!("vccw load: --seconds must be in (0, 86400]");
        return ExitCode::from(2);
    }
    let opts = vccw::loadtest::LoadOptions {
        exe: None,
        devices,
        clients,
        duration: std::time::Duration::from_secs_f64(seconds),
        ios_per_connection,
    };
    match vccw::loadtest::run_load(&opts) {
        Ok(report) => {
            let _ = report.print(&mut std::io::stdout());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("vccw load: {e}");
            ExitCode::from(1)
        }
    }
}
