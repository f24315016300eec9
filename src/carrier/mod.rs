//! The carrier: a QEMU-TCG VM with an emulated AMD-V CPU, where KVM has hardware semantics.
//!
//! On a host whose `/dev/kvm` is software-only, rrr reruns itself in here. The carrier boots a
//! small kernel whose root filesystem is the host's own root (9p, read-only), so the very same
//! binaries run inside; the current directory, the cache and any extra shares are mounted
//! writable at their host paths. A generated init script runs the command with our stdin and
//! reports its exit status on the console; QEMU ends when init does.

mod qemu;
mod reexec;
mod script;
mod stdin;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use reexec::{reexec_in_carrier, Handover};
use script::Share;

/// Set inside the carrier, so rrr there runs its VMM directly instead of nesting carriers.
pub const IN_CARRIER_ENV: &str = "RRR_IN_CARRIER";

/// True when this process runs inside a carrier.
pub fn inside_carrier() -> bool {
    std::env::var_os(IN_CARRIER_ENV).is_some_and(|v| v == "1")
}

/// The carrier VM's size and the host directories it may write.
#[derive(Debug, Clone)]
pub struct CarrierOptions {
    pub mem_mb: u32,
    pub cpus: u32,
    /// Extra host directories shared writable at the same path (the current directory and the
    /// cache always are).
    pub shares: Vec<PathBuf>,
    /// Environment variables for the command, on top of (and overriding) this process's own.
    pub env: Vec<(OsString, OsString)>,
    /// TCP listeners QEMU opens on the host, each carried into the carrier as the virtio-serial
    /// port of that name (the carrier has no network): `rrr replay --gdb` there.
    pub forwards: Vec<(String, std::net::SocketAddr)>,
}

impl Default for CarrierOptions {
    fn default() -> Self {
        CarrierOptions {
            mem_mb: 2048,
            cpus: 2,
            shares: Vec::new(),
            env: Vec::new(),
            forwards: Vec::new(),
        }
    }
}

/// Runs `cmd` inside the carrier with this process's environment, working directory and stdin,
/// its stdout and stderr copied to ours; returns its exit status (128+signal if it was killed).
pub fn run_in_carrier(cmd: &[OsString], opts: &CarrierOptions) -> Result<i32> {
    if cmd.is_empty() {
        bail!("no command given to run in the carrier");
    }
    if inside_carrier() {
        bail!("already inside the carrier ({IN_CARRIER_ENV}=1): carriers do not nest");
    }
    which_qemu()?;
    let kernel = crate::commands::kernel::ensure_carrier_kernel()?;
    let cache = crate::cache::cache_dir()?;
    for attempt in 1.. {
        let run = RunDir::create(&cache)?;
        let result = run_with(cmd, opts, &kernel.vmlinux(), &cache, &run);
        match &result {
            Ok(_) => run.remove(),
            Err(_) => tracing::info!(dir = %run.path.display(), "kept the failed carrier run"),
        }
        // Nothing ran inside a carrier that never booted: it is safe to start another.
        match result {
            Err(err) if attempt < BOOT_ATTEMPTS && err.is::<BootStalled>() => {
                eprintln!("rrr: {err:#}; starting the carrier again");
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

/// How long the carrier's kernel may take to boot and mount its file systems (a few seconds
/// normally, tens under load; `RRR_CARRIER_BOOT_LIMIT_SECS` sets another), and how many
/// carriers are started before giving up.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
const BOOT_LIMIT_ENV: &str = "RRR_CARRIER_BOOT_LIMIT_SECS";
const BOOT_ATTEMPTS: u32 = 2;

fn boot_limit() -> Duration {
    let Ok(value) = std::env::var(BOOT_LIMIT_ENV) else {
        return BOOT_LIMIT;
    };
    match value.parse() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            tracing::warn!("{BOOT_LIMIT_ENV}={value:?} is not a number of seconds; ignored");
            BOOT_LIMIT
        }
    }
}

/// The carrier's kernel did not get as far as running rrr's script. Seen once on the 2-core
/// machine with two carriers loading it: QEMU 7.2's emulated CPU 1 stopped taking timer
/// interrupts early in boot, and the kernel reported RCU stalls on it for good.
#[derive(Debug, thiserror::Error)]
#[error("the carrier's kernel did not boot within {} s (last lines of its console, {console}:\n{tail})", boot_limit().as_secs())]
struct BootStalled {
    console: String,
    tail: String,
}

/// Watches a carrier's boot: stops QEMU (`pid`) if the console shows no start marker within
/// [`boot_limit`], unless `done` (QEMU was waited for) comes first.
struct BootWatchdog {
    thread: JoinHandle<()>,
    done: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
}

impl BootWatchdog {
    fn start(console: PathBuf, nonce: String, pid: i32) -> BootWatchdog {
        let limit = boot_limit();
        let done = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(AtomicBool::new(false));
        let (stop, flag) = (done.clone(), stalled.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(500));
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                if script::started(&text, &nonce) || script::exit_status(&text, &nonce).is_some() {
                    return;
                }
                if started.elapsed() >= limit {
                    flag.store(true, Ordering::SeqCst);
                    // SAFETY: QEMU is our child and not yet waited for (`done` is not set), so
                    // the pid is still its.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return;
                }
            }
        });
        BootWatchdog {
            thread,
            done,
            stalled,
        }
    }

    /// QEMU has been waited for. Returns whether the watchdog stopped it.
    fn finish(self) -> bool {
        self.done.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        self.stalled.load(Ordering::SeqCst)
    }
}

/// Looks QEMU up in PATH before a carrier kernel build can start. (A search, not a trial run of
/// `qemu --version`, which cost 80 ms of every carrier start.)
fn which_qemu() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(qemu::QEMU))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if !found {
        bail!("{}", qemu_missing());
    }
    Ok(())
}

fn qemu_missing() -> String {
    format!(
        "{} is not installed; the carrier needs it: run `sudo scripts/setup` \
         (or `sudo apt-get install --no-install-recommends qemu-system-x86`)",
        qemu::QEMU
    )
}

/// The per-run directory under the cache: init script, console log, FIFOs. Unique per run, so
/// carriers can run side by side.
struct RunDir {
    path: PathBuf,
    nonce: String,
}

impl RunDir {
    fn create(cache: &Path) -> Result<Self> {
        let nonce = rrr_kernels::store::unique_suffix();
        let path = cache.join("carrier").join("runs").join(&nonce);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        // The kernel command line is split at spaces: the init path must not contain any.
        if path
            .as_os_str()
            .as_bytes()
            .iter()
            .any(u8::is_ascii_whitespace)
        {
            bail!(
                "the cache directory {} contains whitespace, which the carrier's kernel command \
                 line cannot carry; set RRR_CACHE_DIR to a path without spaces",
                cache.display()
            );
        }
        Ok(RunDir { path, nonce })
    }

    fn remove(&self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove {}: {err}", self.path.display());
        }
    }
}

fn run_with(
    cmd: &[OsString],
    opts: &CarrierOptions,
    vmlinux: &Path,
    cache: &Path,
    run: &RunDir,
) -> Result<i32> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let shares = shares(&cwd, cache, &opts.shares)?;
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(name, _)| name != IN_CARRIER_ENV && !opts.env.iter().any(|(n, _)| n == name))
        .collect();
    env.extend(opts.env.iter().cloned());
    env.push((IN_CARRIER_ENV.into(), "1".into()));

    let init = run.path.join("init.sh");
    let fstab = run.path.join("fstab");
    std::fs::write(&fstab, script::fstab(&shares))
        .with_context(|| format!("cannot write {}", fstab.display()))?;
    let script = script::Script {
        nonce: &run.nonce,
        fstab: &fstab,
        cwd: &cwd,
        env: &env,
        cmd,
    };
    write_executable(&init, &script.render())?;
    let console_log = run.path.join("console.log");
    let stdout_fifo = run.path.join("stdout.fifo");
    let stderr_fifo = run.path.join("stderr.fifo");
    mkfifo(&stdout_fifo)?;
    mkfifo(&stderr_fifo)?;

    let launch = qemu::Launch {
        vmlinux,
        mem_mb: opts.mem_mb,
        cpus: opts.cpus.max(1),
        init: &init,
        console_log: &console_log,
        stdout_fifo: &stdout_fifo,
        stderr_fifo: &stderr_fifo,
        shares: &shares,
        forwards: &opts.forwards,
    };
    let (qemu_stdin, input) = stdin::forward()?;
    let started = Instant::now();
    let out_pump = pump(stdout_fifo.clone(), std::io::stdout());
    let err_pump = pump(stderr_fifo.clone(), std::io::stderr());
    tracing::debug!(args = ?launch.args(), "starting the carrier");
    // From here until QEMU has been waited for, a SIGINT, SIGTERM or SIGHUP stops QEMU first.
    let signals = interrupt::Guard::install();
    let mut qemu = Command::new(qemu::QEMU);
    qemu.args(launch.args())
        .stdin(qemu_stdin)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut qemu);
    let mut child = qemu.spawn().map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(qemu_missing()),
        _ => anyhow::Error::new(err).context(format!("cannot start {}", qemu::QEMU)),
    })?;
    signals.watch(child.id() as i32);
    let watchdog = BootWatchdog::start(console_log.clone(), run.nonce.clone(), child.id() as i32);
    let mut qemu_stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut qemu_stderr);
    }
    let status = child.wait().context("cannot wait for QEMU");
    let stalled = watchdog.finish();
    let status = status?;
    // Only now may our end of the stdin socket close (see `stdin`). The copying thread is not
    // joined: it may sit in a read of a terminal that never ends.
    drop(input);
    tracing::info!(seconds = started.elapsed().as_secs_f64(), %status, "carrier ended");
    // If QEMU died before opening a FIFO, its reader still waits in open(): release it.
    for fifo in [&stdout_fifo, &stderr_fifo] {
        release_reader(fifo);
    }
    let _ = out_pump.join();
    let _ = err_pump.join();

    if let Some(signal) = signals.received() {
        eprintln!("rrr: {}; the carrier was stopped", interrupt::name(signal));
        return Ok(128 + signal);
    }
    drop(signals);
    let console = std::fs::read_to_string(&console_log).unwrap_or_default();
    if stalled {
        return Err(BootStalled {
            console: console_log.display().to_string(),
            tail: tail(&console, 8),
        }
        .into());
    }
    if let Some(code) = script::exit_status(&console, &run.nonce) {
        return Ok(code);
    }
    let why = if let Some(what) = script::setup_error(&console, &run.nonce) {
        format!("setting up the carrier failed: {what}")
    } else if !status.success() {
        format!("QEMU failed ({status}): {}", qemu_stderr.trim())
    } else {
        "the carrier stopped without reporting the command's exit status (kernel panic?)".into()
    };
    bail!(
        "{why}\nlast lines of the carrier console ({}):\n{}",
        console_log.display(),
        tail(&console, 25)
    )
}

/// The writable shares: the working directory, the cache and the caller's, canonical and
/// deduplicated, parents first so a child share is mounted on top of its parent. A working
/// directory of `/` is not shared: the carrier's root is the host's already (read-only).
fn shares(cwd: &Path, cache: &Path, extra: &[PathBuf]) -> Result<Vec<Share>> {
    let mut paths = Vec::new();
    let cwd = Some(cwd).filter(|cwd| !is_root(cwd));
    for path in cwd
        .into_iter()
        .chain([cache])
        .chain(extra.iter().map(PathBuf::as_path))
    {
        let canonical = std::fs::canonicalize(path)
            .with_context(|| format!("cannot share {} with the carrier", path.display()))?;
        if !canonical.is_dir() {
            bail!(
                "cannot share {} with the carrier: not a directory",
                path.display()
            );
        }
        if canonical == Path::new("/") {
            bail!("cannot share / writable with the carrier; run from a subdirectory");
        }
        if !paths.contains(&canonical) {
            paths.push(canonical);
        }
    }
    paths.sort_by_key(|p| p.components().count());
    Ok(paths
        .into_iter()
        .enumerate()
        .map(|(i, path)| Share {
            path,
            tag: format!("rrr{i}"),
        })
        .collect())
}

/// Whether `path` is the root directory (which the carrier sees read-only, and never shares).
pub(crate) fn is_root(path: &Path) -> bool {
    std::fs::canonicalize(path).is_ok_and(|p| p == Path::new("/"))
}

fn write_executable(path: &Path, contents: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot make {} executable", path.display()))
}

fn mkfifo(path: &Path) -> Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("bad path {}", path.display()))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
        let err = std::io::Error::last_os_error();
        bail!("cannot create the FIFO {}: {err}", path.display());
    }
    Ok(())
}

/// Copies everything written to the FIFO to `sink` until QEMU closes it. When `sink` fails (our
/// stdout was a pipe whose reader left, as in `rrr run x.c | head -n 1`), the FIFO is still
/// drained to the end: QEMU writes it synchronously, so a FIFO nobody reads stops the whole
/// carrier, and the command inside must run to its end (its run record is complete only then).
fn pump(fifo: PathBuf, mut sink: impl Write + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut file = match std::fs::File::open(&fifo) {
            Ok(f) => f,
            Err(err) => {
                tracing::warn!("cannot open {}: {err}", fifo.display());
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut sink_open = true;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if sink_open {
                        if let Err(err) = sink.write_all(&buf[..n]).and_then(|()| sink.flush()) {
                            tracing::debug!(
                                "{} cannot be copied on ({err}); the rest is discarded",
                                fifo.display()
                            );
                            sink_open = false;
                        }
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// Opens the FIFO for writing without blocking and closes it: a reader still blocked in open()
/// returns and then sees end of file. Without a waiting reader this fails, which is fine.
fn release_reader(fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// QEMU gets SIGKILL when this process ends, however it ends (a SIGKILL, a panic, an exit
/// while the carrier runs): a carrier must never outlive its rrr, spinning at full CPU. The
/// kernel sends it when the *thread* that spawned QEMU ends, so the carrier is spawned from the
/// thread that waits for it.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, raise).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody would send the signal.
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
}

/// SIGINT, SIGTERM and SIGHUP while a carrier runs (Ctrl-C, `timeout`, a CI runner, a closed
/// terminal): stop QEMU, let the run's cleanup happen as usual, and exit with 128 + the signal.
/// Outside a carrier run the signals keep their default action (ending rrr at once).
mod interrupt {
    use super::*;

    const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

    /// The QEMU to stop, once spawned (0: none yet).
    static QEMU_PID: AtomicI32 = AtomicI32::new(0);
    /// The signal received while the guard was installed (0: none).
    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(signal: libc::c_int) {
        // Only async-signal-safe work here: atomics and kill(2).
        RECEIVED.store(signal, Ordering::SeqCst);
        let pid = QEMU_PID.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// The handlers, installed for one carrier run; the previous actions come back on drop.
    pub struct Guard {
        previous: Vec<(libc::c_int, libc::sigaction)>,
    }

    impl Guard {
        pub fn install() -> Guard {
            QEMU_PID.store(0, Ordering::SeqCst);
            RECEIVED.store(0, Ordering::SeqCst);
            let mut previous = Vec::new();
            for signal in SIGNALS {
                // SAFETY: a zeroed sigaction is a valid value; the handler is async-signal-safe.
                unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                    action.sa_flags = libc::SA_RESTART;
                    libc::sigemptyset(&mut action.sa_mask);
                    let mut old: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(signal, &action, &mut old) == 0 {
                        previous.push((signal, old));
                    } else {
                        tracing::warn!(
                            signal,
                            "cannot handle the signal: {}",
                            std::io::Error::last_os_error()
                        );
                    }
                }
            }
            Guard { previous }
        }

        /// QEMU is running as `pid`; a signal that came before it existed stops it at once.
        pub fn watch(&self, pid: i32) {
            QEMU_PID.store(pid, Ordering::SeqCst);
            if RECEIVED.load(Ordering::SeqCst) != 0 {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }

        pub fn received(&self) -> Option<i32> {
            Some(RECEIVED.load(Ordering::SeqCst)).filter(|&s| s != 0)
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            QEMU_PID.store(0, Ordering::SeqCst);
            for (signal, old) in &self.previous {
                // SAFETY: restoring the action sigaction returned.
                unsafe { libc::sigaction(*signal, old, std::ptr::null_mut()) };
            }
        }
    }

    pub fn name(signal: i32) -> &'static str {
        match signal {
            libc::SIGINT => "interrupted (SIGINT)",
            libc::SIGTERM => "terminated (SIGTERM)",
            libc::SIGHUP => "hung up (SIGHUP)",
            _ => "stopped by a signal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_canonical_unique_and_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        let child = dir.path().join("a/b");
        std::fs::create_dir_all(&child).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let got = shares(&child, dir.path(), &[root.join("a/b/../b")]).unwrap();
        let paths: Vec<&Path> = got.iter().map(|s| s.path.as_path()).collect();
        assert_eq!(paths, [root.as_path(), root.join("a/b").as_path()]);
        assert_eq!(got[0].tag, "rrr0");
        assert_eq!(got[1].tag, "rrr1");
    }

    #[test]
    fn a_working_directory_of_root_is_not_shared_but_root_is_refused_as_a_share() {
        let dir = tempfile::tempdir().unwrap();
        let got = shares(Path::new("/"), dir.path(), &[]).unwrap();
        let paths: Vec<&Path> = got.iter().map(|s| s.path.as_path()).collect();
        assert_eq!(paths, [std::fs::canonicalize(dir.path()).unwrap()]);
        let err = shares(dir.path(), dir.path(), &["/".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("cannot share /"), "{err:#}");
    }

    #[test]
    fn a_missing_share_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = shares(dir.path(), Path::new("/nonexistent-x"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent-x"), "{err:#}");
    }

    #[test]
    fn tail_keeps_the_last_lines_without_carriage_returns() {
        assert_eq!(tail("a\r\nb\r\nc\r\n", 2), "b\nc");
    }
}
