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
        #[cfg(target_os = "linux")]
        Cmd::Mdev { cmd } => cmd_mdev(cmd),
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
