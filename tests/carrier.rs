//! `rrr carrier run` end to end. Each carrier costs seconds to boot under QEMU's emulator, so
//! the checks are grouped where they can be: one carrier runs a script that exercises several
//! things at once. Stdin gets its own runs, since each case is a different stdin.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn carrier_run(cwd: &Path, cmd: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["carrier", "run", "--"])
        .args(cmd)
        .current_dir(cwd)
        .env("RRR_TEST_MARK", "it's here")
        .output()
        .unwrap()
}

#[test]
fn runs_commands_with_kvm_separate_streams_exit_status_and_shared_cwd() {
    let dir = tempfile::tempdir().unwrap();
    // Real KVM (kvm_amd on an SVM CPU), the caller's environment and working directory, a file
    // written inside appearing outside, separate byte-exact streams, the exit status.
    let script = "test -c /dev/kvm && grep -qw svm /proc/cpuinfo || exit 99; \
                  test \"$RRR_IN_CARRIER\" = 1 || exit 98; \
                  test \"$RRR_TEST_MARK\" = \"it's here\" || exit 97; \
                  echo written inside > shared.txt; \
                  printf 'out\\n'; printf 'a\\r\\nb\\n' >&2; printf 'err\\n' >&2; exit 7";
    let out = carrier_run(dir.path(), &["sh", "-c", script]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stderr:\n{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(stderr.ends_with("a\r\nb\nerr\n"), "stderr: {stderr:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("shared.txt")).unwrap(),
        "written inside\n"
    );
}

#[test]
fn a_carrier_that_never_boots_is_started_again_then_given_up_on() {
    // `init=/bin/cat` on the carrier's kernel command line: PID 1 is cat on the console, so
    // rrr's script never runs and never says the carrier is up, as when the emulated CPU stalls.
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["carrier", "run", "--", "true"])
        .current_dir(dir.path())
        .env("RRR_CARRIER_CMDLINE", "init=/bin/cat")
        .env("RRR_CARRIER_BOOT_LIMIT_SECS", "8")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .matches("the carrier's kernel did not boot within 8 s")
            .count(),
        2,
        "one restart, then the error: {stderr}"
    );
    assert!(stderr.contains("starting the carrier again"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(120), "{stderr}");
}

#[test]
fn false_exits_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = carrier_run(dir.path(), &["false"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn binary_output_is_byte_exact_and_a_signal_becomes_128_plus_signo() {
    let dir = tempfile::tempdir().unwrap();
    let script = "head -c 300000 /dev/urandom > blob.bin && cat blob.bin && kill -9 $$";
    let out = carrier_run(dir.path(), &["sh", "-c", script]);
    assert_eq!(
        out.status.code(),
        Some(137),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blob = std::fs::read(dir.path().join("blob.bin")).unwrap();
    assert_eq!(blob.len(), 300000);
    assert!(
        out.stdout == blob,
        "stdout differs from the file written inside"
    );
}

/// Runs `rrr carrier run -- CMD` with `input` on its stdin, then closes it (`None`: stdin is
/// /dev/null) or keeps it open until the run ends (`keep_open`, like a terminal nobody types
/// in). A run that does not end within the limit is killed and fails the test: the point of
/// several of these checks is that nothing hangs.
fn carrier_run_with_stdin(
    cwd: &Path,
    cmd: &[&str],
    input: Option<&[u8]>,
    keep_open: bool,
) -> Output {
    // Build (or find) the carrier kernel first, so the time limit covers only the run.
    let built = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["kernel", "build", "--carrier"])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["carrier", "run", "--"])
        .args(cmd)
        .current_dir(cwd)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Write from a thread: the command's output must be drained while the input goes in.
    let writer = child.stdin.take().map(|mut stdin| {
        let input = input.unwrap().to_vec();
        std::thread::spawn(move || {
            // A run that fails early stops reading; its output tells why.
            let _ = stdin.write_all(&input);
            // Dropping it is the end of input.
            keep_open.then_some(stdin)
        })
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pid = child.id();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output().unwrap();
        let _ = done_tx.send(());
        out
    });
    if done_rx.recv_timeout(Duration::from_secs(300)).is_err() {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("`rrr carrier run` did not end within 300 s (killed)");
    }
    // Held open until here when `keep_open`: the run ended with its stdin still open.
    drop(writer.map(|w| w.join().unwrap()));
    waiter.join().unwrap()
}

#[test]
fn stdin_reaches_the_command_byte_exact_and_its_end_is_end_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = b"abc\0def\n";
    let out = carrier_run_with_stdin(dir.path(), &["cat"], Some(input), false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, input);
}

#[test]
fn a_null_stdin_is_end_of_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = carrier_run_with_stdin(dir.path(), &["cat"], None, false);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "{:?}", out.stdout);
}

#[test]
fn a_large_stdin_arrives_whole_and_a_stdin_that_never_ends_does_not_hold_up_the_end() {
    let dir = tempfile::tempdir().unwrap();
    // More than every buffer on the way (pipe, socket, virtqueue), so the copy must wait for
    // the command; the command stops after exactly this much and never sees an end of input.
    let input: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let out = carrier_run_with_stdin(dir.path(), &["head", "-c", "1000000"], Some(&input), true);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == input,
        "stdout differs from stdin ({} bytes)",
        out.stdout.len()
    );
}

/// A process's parent and start time (clock ticks since boot), from `/proc/PID/stat`; `None`
/// when it is gone or a zombie (dead, waiting to be reaped).
fn parent_and_start(pid: u32) -> Option<(u32, u64, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    // After the command: state, ppid, ..., starttime (field 22 of the whole line).
    let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((
        fields.get(1)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
        comm,
    ))
}

/// The carrier QEMU started by `parent`, as (pid, start time).
fn qemu_child_of(parent: u32) -> Option<(u32, u64)> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let (ppid, start, comm) = parent_and_start(pid)?;
        (ppid == parent && comm.starts_with("qemu-system")).then_some((pid, start))
    })
}

/// Whether the process `pid` that started at `start` still runs (and not a new one by that pid).
fn still_running(pid: u32, start: u64) -> bool {
    parent_and_start(pid).is_some_and(|(_, s, _)| s == start)
}

/// Starts `rrr ARGS`, waits until its carrier QEMU runs, sends rrr `signal`, and checks that
/// rrr ends and that its QEMU ends with it: a carrier must never outlive its rrr.
fn a_signal_to_rrr_ends_its_carrier(args: &[&str], signal: i32) {
    let built = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["kernel", "build", "--carrier"])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = std::time::Instant::now();
    let (qemu, qemu_start) = loop {
        if let Some(found) = qemu_child_of(child.id()) {
            break found;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "rrr {args:?} ended ({status}) before its carrier started:\n{}",
                stderr()
            );
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!(
                "rrr {args:?} started no carrier within 300 s:\n{}",
                stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let QEMU get going (it is starting the carrier's kernel), then signal rrr alone.
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            // SAFETY: the carrier this test's rrr started.
            unsafe { libc::kill(qemu as i32, libc::SIGKILL) };
            panic!(
                "rrr did not end within 60 s of signal {signal}:\n{}",
                stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while still_running(qemu, qemu_start) {
        if std::time::Instant::now() > deadline {
            // SAFETY: as above.
            unsafe { libc::kill(qemu as i32, libc::SIGKILL) };
            panic!(
                "the carrier QEMU (pid {qemu}) outlived rrr ({status}) after signal {signal}:\n{}",
                stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if signal != libc::SIGKILL {
        assert_eq!(status.code(), Some(128 + signal), "{}", stderr());
        assert!(stderr().contains("the carrier was stopped"), "{}", stderr());
    }
}

#[test]
fn sigterm_sighup_and_sigint_to_rrr_carrier_run_stop_its_carrier() {
    for signal in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        a_signal_to_rrr_ends_its_carrier(&["carrier", "run", "--", "sleep", "600"], signal);
    }
}

#[test]
fn sigterm_and_sigkill_to_rrr_run_end_its_carrier() {
    let stimulus = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/stimuli/spin_forever.c");
    let stimulus = stimulus.to_str().unwrap();
    // `kill -TERM`, as `timeout` and CI runners do, and SIGKILL, which no handler sees: the
    // kernel ends the carrier (PR_SET_PDEATHSIG), as for any other end of rrr (a panic).
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        a_signal_to_rrr_ends_its_carrier(
            &["run", stimulus, "--time-limit", "120", "--quiet"],
            signal,
        );
    }
}
