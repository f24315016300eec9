//! `rrr carrier run` end to end. Each carrier costs seconds to boot under QEMU's emulator, so
//! the checks are grouped: one carrier runs a script that exercises several things at once.

use std::process::{Command, Output};

fn carrier_run(cwd: &std::path::Path, cmd: &[&str]) -> Output {
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
