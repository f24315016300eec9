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
