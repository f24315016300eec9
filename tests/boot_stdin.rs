//! `rrr boot` forwards its stdin to the guest's console, end to end: on a host whose KVM is
//! software-only that is through the carrier (`rrr carrier run` forwards stdin to the command)
//! and then the VMM's serial port.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const RRR: &str = env!("CARGO_BIN_EXE_rrr");
/// What the guest prints once it reads its console, and after it has read a line.
const READY: &str = "rrr-test: marker=READ_LINE_READY";
const LINE_MARKER: &str = "rrr-test: line=";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a `rrr kernel build` (cached after the first) and returns the directory it prints.
fn kernel_build(args: &[&str]) -> PathBuf {
    let out = Command::new(RRR)
        .args(["kernel", "build"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the rrr binary");
    assert!(
        out.status.success(),
        "`rrr kernel build {}` failed:\n{}",
        args.join(" "),
        text(&out.stderr)
    );
    PathBuf::from(text(&out.stdout).trim().lines().last().unwrap_or(""))
}

/// An initramfs holding only the static init that reads a line (`guest/test-init/read_line.c`).
fn read_line_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/test-init/read_line.c");
    let cc = Command::new("gcc")
        .args(["-O2", "-static", "-o"])
        .arg(root.join("init"))
        .arg(&src)
        .output()
        .expect("gcc is needed to build the test init");
    assert!(cc.status.success(), "gcc failed:\n{}", text(&cc.stderr));
    let cpio = dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            cpio.display()
        ))
        .status()
        .expect("cpio is needed to build the test initramfs");
    assert!(status.success(), "cpio failed");
    cpio
}

/// Boots the read-line init with `line` (newline included) already waiting on stdin, as in
/// `echo ... | rrr boot`, closes stdin and returns everything. The input reaches the UART long
/// before the kernel opens the console; the VMM holds it "on the wire" until the driver enables
/// its receive interrupt, so the FIFO clears of the driver's start-up cannot drop it.
fn boot_and_type(line: &str) -> Output {
    let kernel = kernel_build(&[]);
    assert!(
        kernel.join("vmlinux").is_file(),
        "no vmlinux in {}",
        kernel.display()
    );
    // Built outside the time limit below.
    kernel_build(&["--carrier"]);
    // Under the target directory, not /tmp: the carrier shares the working tree, not the
    // host's /tmp.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let initrd = read_line_initramfs(dir.path());

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
