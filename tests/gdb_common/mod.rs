//! What the gdb test binaries share: a recording to debug, and one real GNU gdb session in batch
//! mode against `rrr replay REC --gdb`.
//!
//! Where this host's KVM is software-only the replay runs in the carrier, which has no network:
//! QEMU listens on the host's loopback port and carries gdb's bytes to rrr inside over a
//! virtio-serial port, so gdb runs here on the host as a user would run it.

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const RRR: &str = env!("CARGO_BIN_EXE_rrr");

pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory for one test, under `group`.
pub fn test_dir(group: &str, name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(group)
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The default kernel's vmlinux (cached; `rrr kernel build` prints its directory).
pub fn vmlinux() -> PathBuf {
    let out = Command::new(RRR)
        .args(["kernel", "build"])
        .output()
        .expect("cannot start rrr");
    assert!(out.status.success(), "{}", text(&out.stderr));
    PathBuf::from(text(&out.stdout).trim()).join("vmlinux")
}

/// A recording of `examples/stimuli/open_write_close.c` in `dir`.
pub fn record_open_write_close(dir: &Path) -> PathBuf {
    let rec = dir.join("ow.rrr");
    let stimulus = root().join("examples/stimuli/open_write_close.c");
    let out = Command::new(RRR)
        .args(["record", stimulus.to_str().unwrap(), "-o"])
        .arg(&rec)
        .arg("--quiet")
        .output()
        .expect("cannot start rrr");
    assert!(
        out.status.success(),
        "rrr record failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    rec
}

/// One gdb session against a replay.
pub struct GdbSession {
    /// Where the replay served gdb.
    pub addr: String,
    /// What the replay printed up to the line that says how to connect.
    pub banner: String,
    /// gdb's output.
    pub said: String,
    /// The replay's stdout, then its stderr.
    pub replay: String,
    /// Whether the replay exited with success (it matched its recording).
    pub ok: bool,
}

impl GdbSession {
    /// Everything, for an assertion's message.
    pub fn context(&self) -> String {
        format!(
            "gdb said:\n{}\nrrr replay said:\n{}\n{}",
            self.said, self.banner, self.replay
        )
    }
}

/// Starts `rrr replay REC --gdb` on a free loopback port, waits for the line that says how to
/// connect, and runs gdb in batch mode with `init` (its `-iex` options) and `commands` after
/// `target remote`.
pub fn gdb_session(rec: &Path, vmlinux: &Path, init: &[String], commands: &[String]) -> GdbSession {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut replay = Command::new(RRR)
        .args(["replay", rec.to_str().unwrap(), "--quiet", "--gdb", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start rrr replay");
    let mut stdout = replay.stdout.take().unwrap();
    let stdout_reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stdout.read_to_string(&mut all);
        all
    });
    // The replay says when gdb may connect (at READY) and how.
    let mut stderr = BufReader::new(replay.stderr.take().unwrap());
    let mut banner = String::new();
    let started = Instant::now();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("rrr replay --gdb ended before waiting for gdb:\n{banner}");
        }
        banner.push_str(&line);
        if line.contains("target remote") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "{banner}");
    }
    let stderr_reader = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
        rest
    });
    let mut gdb = Command::new("timeout");
    gdb.args(["900", "gdb", "-batch", "-nx"]);
    for option in init {
        gdb.args(["-iex", option]);
    }
    // A replay that answers late (the carrier on a loaded machine) must not be given up on.
    gdb.args(["-iex", "set remotetimeout 60"]).arg(vmlinux);
    gdb.args(["-ex", &format!("target remote {addr}")]);
    for c in commands {
        gdb.args(["-ex", c]);
    }
    let out = gdb
        .output()
        .expect("cannot start gdb (scripts/setup installs it)");
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let status = replay.wait().unwrap();
    let replay_out = stdout_reader.join().unwrap();
    let replay_err = stderr_reader.join().unwrap();
    GdbSession {
        addr,
        banner,
        said,
        replay: format!("{replay_out}\n{replay_err}"),
        ok: status.success(),
    }
}
