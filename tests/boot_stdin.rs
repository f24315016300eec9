//! `rrr boot` forwards its stdin to the guest's console, end to end: on a host whose KVM is
//! software-only that is through the carrier (`rrr carrier run` forwards stdin to the command)
//! and then the VMM's serial port.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};

use common::{default_kernel, initramfs_with_init, text, RRR};
/// What the guest prints once it reads its console, and after it has read a line.
const READY: &str = "rrr-test: marker=READ_LINE_READY";
const LINE_MARKER: &str = "rrr-test: line=";

/// Boots the read-line init with `line` (newline included) already waiting on stdin, as in
/// `echo ... | rrr boot`, closes stdin and returns everything. The input reaches the UART long
/// before the kernel opens the console; the VMM holds it "on the wire" until the driver raises
/// RTS, so the FIFO clears of the driver's start-up cannot drop it.
fn boot_and_type(line: &str) -> Output {
    let kernel = default_kernel();
    // Under the target directory, not /tmp: the carrier shares the working tree, not the
    // host's /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let initrd = initramfs_with_init(dir.path(), "guest/test-init/read_line.c");

    let mut child = Command::new(RRR)
        .args(["boot", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--timeout", "300"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    stdin.write_all(line.as_bytes()).unwrap();
    drop(stdin);
    let console = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let _ = stdout.read_to_end(&mut seen);
        seen
    });
    let errors = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let _ = stderr.read_to_end(&mut seen);
        seen
    });

    // A boot that never gets ready ends by itself (`--timeout`), which closes the channel.
    let status = child.wait().unwrap();
    Output {
        status,
        stdout: console.join().unwrap(),
        stderr: errors.join().unwrap(),
    }
}

#[test]
fn a_line_piped_into_rrr_boot_reaches_the_guest_console() {
    let out = boot_and_type("hello from the host's stdin\n");
    let console = text(&out.stdout);
    let err = text(&out.stderr);
    assert!(
        out.status.success(),
        "rrr boot failed ({}):\n--- stderr\n{err}\n--- console\n{console}",
        out.status
    );
    assert!(
        console.contains(READY),
        "the read-line init never started:\n{console}\n{err}"
    );
    let got = console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(LINE_MARKER));
    assert_eq!(
        got,
        Some("hello from the host's stdin"),
        "the guest did not read the line:\n--- console\n{console}\n--- stderr\n{err}"
    );
    assert!(err.contains("powered off"), "{err}");
}
