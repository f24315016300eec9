//! Builds real images with real gcc, mke2fs and qemu-img, and looks inside them.

use std::path::{Path, PathBuf};
use std::process::Command;

use rrr_rootfs::{build, RootfsError, RootfsSpec};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/stimuli")
        .join(name)
}

fn run(cmd: &mut Command) -> String {
    let output = cmd.output().expect("tool runs");
    assert!(output.status.success(), "{cmd:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `debugfs -R 'ls -l DIR'` on the ext4 inside a qcow2.
fn ls_in_image(qcow2: &Path, dir: &str, scratch: &Path) -> String {
    let raw = scratch.join("look.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(qcow2)
        .arg(&raw));
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("ls -l {dir}"))
        .arg(&raw))
}

#[test]
fn hello_image_is_complete_cached_and_reproducible() {
    let cache = tempfile::tempdir().unwrap();
    let spec = RootfsSpec::new(example("hello.c"));
    let first = build(&spec, cache.path()).unwrap();
    assert!(!first.cached);
    assert!(first.path.starts_with(cache.path().join("rootfs")));
    assert!(first.stimulus_binary.is_file());

    let listing = ls_in_image(&first.path, "/", cache.path());
    for name in [
        "init", "stimulus", "bin", "sbin", "etc", "tmp", "proc", "sys", "dev", "root",
    ] {
        assert!(
            listing.split_whitespace().any(|word| word == name),
            "/{name} missing from the image:\n{listing}"
        );
    }
    let bin = ls_in_image(&first.path, "/bin", cache.path());
    assert!(bin.contains("busybox") && bin.contains(" sh"), "{bin}");
    // Owned by root, whoever built it: `ls -l` shows "mode (links) uid gid".
    let init_line = listing
        .lines()
        .find(|l| l.ends_with(" init"))
        .unwrap()
        .to_string();
    let fields: Vec<_> = init_line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["0", "0"], "{init_line}");

    let again = build(&spec, cache.path()).unwrap();
    assert!(again.cached);
    assert_eq!(again.path, first.path);

    // The same inputs in a fresh cache give the same bytes, also a second later (timestamps
    // from the clock would show up here).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let other_cache = tempfile::tempdir().unwrap();
    let rebuilt = build(&spec, other_cache.path()).unwrap();
    assert!(!rebuilt.cached);
    assert_eq!(rebuilt.key, first.key);
    assert!(
        std::fs::read(&rebuilt.path).unwrap() == std::fs::read(&first.path).unwrap(),
        "rebuilding the same inputs changed the image"
    );
}

#[test]
fn compile_errors_show_gccs_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("broken.c");
    std::fs::write(&bad, "int main(void) { return undeclared_thing; }\n").unwrap();
    let err = build(&RootfsSpec::new(&bad), dir.path()).unwrap_err();
    assert!(matches!(err, RootfsError::CompileFailed { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("broken.c"), "{text}");
    assert!(text.contains("undeclared_thing"), "{text}");
}

#[test]
fn missing_and_non_c_stimuli_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.c");
    let err = build(&RootfsSpec::new(&missing), dir.path()).unwrap_err();
    assert!(
        matches!(err, RootfsError::StimulusUnreadable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("nope.c"));

    let text = dir.path().join("prog.txt");
    std::fs::write(&text, "int main(){}").unwrap();
    let err = build(&RootfsSpec::new(&text), dir.path()).unwrap_err();
    assert!(matches!(err, RootfsError::StimulusNotC { .. }), "{err}");
}

#[test]
fn m32_needs_multilib_or_works() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RootfsSpec {
        m32: true,
        ..RootfsSpec::new(example("exit3.c"))
    };
    match build(&spec, dir.path()) {
        Ok(image) => assert!(image.path.is_file()),
        Err(err @ RootfsError::MultilibMissing { .. }) => {
            assert!(err.to_string().contains("apt-get install gcc-multilib"))
        }
        Err(err) => panic!("unexpected error: {err}"),
    }
}

#[test]
fn the_stimulus_counts_basic_blocks_and_writes_the_port_only_when_granted() {
    // A loop of 200,000 basic blocks crosses the progress interval: with the agent's grant
    // announced, the runtime writes the port, which a host process may not (SIGSEGV); without
    // it, the same binary runs to the end. So the instrumentation is there and the guard works.
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("loop.c");
    std::fs::write(
        &source,
        "volatile unsigned long sink;\n\
         int main(void) { for (unsigned long i = 0; i < 200000; i++) sink += i; return 0; }\n",
    )
    .unwrap();
    let image = build(&RootfsSpec::new(&source), dir.path()).unwrap();
    let symbols = run(Command::new("nm").arg(&image.stimulus_binary));
    assert!(
        symbols.contains(" T __sanitizer_cov_trace_pc"),
        "no trace-pc runtime in the stimulus:\n{symbols}"
    );
    let plain = Command::new(&image.stimulus_binary)
        .env_remove(rrr_guest::protocol::PROGRESS_ENV)
        .status()
        .unwrap();
    assert!(plain.success(), "{plain}");
    let granted = Command::new(&image.stimulus_binary)
        .env(rrr_guest::protocol::PROGRESS_ENV, "1")
        .status()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        granted.signal(),
        Some(SIGSEGV),
        "the runtime never wrote the progress port: {granted}"
    );
}

/// The signal of a user-mode `outb` without an I/O permission (x86-64 Linux).
const SIGSEGV: i32 = 11;

/// The signal of an invalid instruction (x86-64 Linux).
const SIGILL: i32 = 4;

fn signal_of(status: std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.signal()
}

#[test]
fn rdrand_and_rdseed_are_rewritten_into_traps_the_runtime_answers() {
    // Outside rrr (no RRR_TRAPS) the rewritten sites are answered from getrandom() and rdtsc
    // runs natively, so the stimulus's own checks (flags, register widths, monotonic TSC) run
    // here, on the host, through the same SIGILL handler the guest uses.
    let cache = tempfile::tempdir().unwrap();
    let spec = RootfsSpec::new(example("torture/tsc_rand.c"));
    let binary = rrr_rootfs::build_stimulus(&spec, cache.path()).unwrap();
    let report = binary.traps.expect("compiled now, so scanned now");
    // rdrand and rdseed: a 64-bit (in a loop), a 32-bit, a 16-bit and one into r9 each.
    assert_eq!(report.rewritten.len(), 8, "{report:?}");
    let note = report.note().unwrap();
    assert!(note.starts_with("rrr: rewrote 8 rdrand/rdseed"), "{note}");
    assert!(report.trapped.len() >= 3, "rdtsc, rdtscp: {report:?}");

    // The binary holds the markers now: a second scan finds the first one (and would refuse
    // to take it for a genuine ud1).
    let mut image = std::fs::read(&binary.path).unwrap();
    match rrr_rootfs::traps::rewrite_elf(&mut image) {
        Err(rrr_rootfs::traps::TrapError::MarkerCollision { address, .. }) => {
            assert_eq!(address, report.rewritten[0].address)
        }
        other => panic!("the rewritten binary scans as {other:?}"),
    }

    let output = Command::new(&binary.path)
        .env_remove(rrr_guest::protocol::TRAPS_ENV)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("tsc_rand: done"),
        "{}\n{stdout}",
        output.status
    );
    assert!(stdout.contains("tsc_rand: rdseed r9 "), "{stdout}");

    // With the grant announced but no port (a host process), the handler's port read faults,
    // and that fault, not its own, ends the program as any other SIGSEGV would: no loop.
    let granted = Command::new(&binary.path)
        .env(rrr_guest::protocol::TRAPS_ENV, "1")
        .output()
        .unwrap();
    assert_eq!(signal_of(granted.status), Some(SIGSEGV), "{granted:?}");
}

#[test]
fn a_genuine_trap_still_kills_and_a_lookalike_of_rrrs_marker_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    let source = cache.path().join("trap.c");
    std::fs::write(&source, "int main(void) { __builtin_trap(); }\n").unwrap();
    let binary = rrr_rootfs::build_stimulus(&RootfsSpec::new(&source), cache.path()).unwrap();
    let status = Command::new(&binary.path).status().unwrap();
    assert_eq!(signal_of(status), Some(SIGILL), "{status}");

    let source = cache.path().join("ud1.c");
    std::fs::write(
        &source,
        "int main(void) { __asm__ volatile(\".byte 0x0f, 0xb9, 0xf0\"); return 0; }\n",
    )
    .unwrap();
    let err = rrr_rootfs::build_stimulus(&RootfsSpec::new(&source), cache.path()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, RootfsError::Traps { .. })
            && text.contains("ud1.c")
            && text.contains("0f b9 f0")
            && text.contains(" in main+0x"),
        "{text}"
    );
}
