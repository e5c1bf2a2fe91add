//! `vccw demo`: the whole service on one machine, in three processes.
//!
//! Creates a temporary data directory, starts `vccw serve` there as a child, waits for its
//! ready lines, runs `vccw guest` (another child) against every socket, then stops the
//! server with SIGTERM and checks that it exits 0 and removed its sockets.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the server may take to print its ready lines.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the server may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The `vccw` binary (default: this executable).
    pub exe: Option<PathBuf>,
    /// Records / blocks per device.
    pub records: u32,
    /// Keep the data directory afterwards.
    pub keep: bool,
}

/// One device the server announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    /// "0.0.0100".
    pub devno: String,
    /// "3390" / "3490".
    pub kind: String,
    /// Socket path.
    pub socket: PathBuf,
}

/// Parses `ready 0.0.0100 3390 /path/dasd0.sock`.
pub fn parse_ready(line: &str) -> Option<ReadyLine> {
    let rest = line.strip_prefix("ready ")?;
    let mut it = rest.splitn(3, ' ');
    let devno = it.next()?.to_string();
    let kind = it.next()?.to_string();
    let socket = PathBuf::from(it.next()?);
    Some(ReadyLine {
        devno,
        kind,
        socket,
    })
}

/// Waits for `child` to exit within `timeout`; kills it otherwise.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus, String> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(s);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no exit within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `exe serve` with `args` and waits for its ready lines.
pub fn start_server(exe: &Path, args: &[&str]) -> Result<(Child, Vec<ReadyLine>), String> {
    let child = exe_command(exe)
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {} serve: {e}", exe.display()))?;
    await_ready(child)
}

/// Waits for a spawned `vccw serve` (stdout piped) to print its ready lines and `serving N
/// devices`; kills it if that does not come within the ready timeout.
pub fn await_ready(mut child: Child) -> Result<(Child, Vec<ReadyLine>), String> {
    let stdout = child.stdout.take().ok_or("no server stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut ready = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(r) = parse_ready(&line) {
                    ready.push(r);
                } else if line.starts_with("serving ") {
                    return Ok((child, ready));
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("the server did not become ready".into());
            }
        }
    }
}

/// Runs the demo; prints a summary. Err carries what failed.
pub fn run_demo(opts: &DemoOptions) -> Result<(), String> {
    let exe = match &opts.exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?,
    };
    let dir = std::env::temp_dir().join(format!("vccw-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let r = demo_in(&exe, &dir, opts);
    if opts.keep {
        println!("data directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    r
}

fn demo_in(exe: &Path, dir: &Path, opts: &DemoOptions) -> Result<(), String> {
    let t0 = Instant::now();
    println!("== vccw demo: data directory {}", dir.display());
    let d = dir.to_string_lossy().to_string();
    let (mut server, ready) = start_server(exe, &["--data-dir", &d])?;
    println!(
        "== server pid {} ready with {} devices ({} ms)",
        server.id(),
        ready.len(),
        t0.elapsed().as_millis()
    );
    for r in &ready {
        println!("   {} {} {}", r.devno, r.kind, r.socket.display());
    }
    let t1 = Instant::now();
    let records = opts.records.to_string();
    let mut cmd = exe_command(exe);
    cmd.arg("guest").arg("--records").arg(&records);
    for r in &ready {
        cmd.arg(&r.socket);
    }
    let guest = cmd.status();
    let guest_ok = matches!(&guest, Ok(s) if s.success());
    let guest_ms = t1.elapsed().as_millis();
    let pid = Pid::from_raw(server.id() as i32);
    kill(pid, Signal::SIGTERM).map_err(|e| format!("SIGTERM: {e}"))?;
    let status = wait_timeout(&mut server, STOP_TIMEOUT)?;
    let leftover: Vec<&ReadyLine> = ready.iter().filter(|r| r.socket.exists()).collect();
    println!("== summary");
    println!(
        "   guest workload ({} devices, {} records each): {} in {guest_ms} ms",
        ready.len(),
        opts.records,
        match &guest {
            Ok(s) if s.success() => "passed".to_string(),
            Ok(s) => format!("FAILED ({s})"),
            Err(e) => format!("FAILED to start ({e})"),
        }
    );
    println!(
        "   server stop on SIGTERM: {}, sockets removed: {}",
        status,
        if leftover.is_empty() { "yes" } else { "NO" }
    );
    if !guest_ok {
        return Err("the guest workload failed".into());
    }
    if !status.success() {
        return Err(format!("the server exited with {status}"));
    }
    if !leftover.is_empty() {
        return Err(format!("sockets left behind: {leftover:?}"));
    }
    println!("== demo passed in {} ms", t0.elapsed().as_millis());
    Ok(())
}

/// A command running `exe`, our own binary. Under qemu-user (the big-endian test suite sets
/// `VCCW_UNDER_QEMU`) there is no binfmt handler, so it goes through `qemu-s390x`.
pub fn exe_command(exe: &Path) -> Command {
    if std::env::var_os("VCCW_UNDER_QEMU").is_some() {
        let mut c = Command::new("qemu-s390x");
        c.arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_parses() {
        let r = parse_ready("ready 0.0.0100 3390 /tmp/a b/dasd0.sock").unwrap();
        assert_eq!(r.devno, "0.0.0100");
        assert_eq!(r.kind, "3390");
        assert_eq!(r.socket, PathBuf::from("/tmp/a b/dasd0.sock"));
        assert!(parse_ready("serving 2 devices").is_none());
        assert!(parse_ready("ready 0.0.0100").is_none());
    }
}
