//! The image boots under plain QEMU (TCG, no rrr VMM): the agent mounts, finds no VMM on the
//! control port, runs /stimulus and restarts the machine (microvm has no ACPI power-off).
//! The kernel is rrr's default guest kernel (`rrr kernel build`, cached), or `RRR_TEST_VMLINUX`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/stimuli")
        .join(name)
}

/// The guest kernel: `RRR_TEST_VMLINUX`, else the default one `rrr kernel build` prints.
fn guest_vmlinux() -> PathBuf {
    if let Some(path) = std::env::var_os("RRR_TEST_VMLINUX") {
        return PathBuf::from(path);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["kernel", "build"])
        .output()
        .expect("cannot start rrr");
    assert!(
        out.status.success(),
        "rrr kernel build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("vmlinux")
}

/// Boots `image` and returns the console output. `-no-reboot` and the agent's restart end QEMU;
/// the timeout is a safety net.
fn boot(vmlinux: &Path, image: &Path) -> String {
    let output = Command::new("timeout")
        .arg("120")
        .arg("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(vmlinux)
        .args(["-append", "console=ttyS0 root=/dev/vda rw panic=-1"])
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=qcow2,if=none,snapshot=on",
            image.display()
        ))
        .args(["-device", "virtio-blk-device,drive=root"])
        .output()
        .expect("qemu-system-x86_64 runs");
    let console = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "qemu failed ({}): {}\n{console}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    console
}

#[test]
fn agent_runs_the_stimulus_and_ends_the_machine_under_plain_qemu() {
    let vmlinux = guest_vmlinux();
    let cache = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    for (stimulus, expected) in [
        ("hello.c", "rrr-agent: stimulus exited with status 0"),
        ("exit3.c", "rrr-agent: stimulus exited with status 3"),
        (
            "disk_rw.c",
            "disk_rw: 1 MiB written, synced, read back and verified",
        ),
    ] {
        let image = rrr_rootfs::build(
            &rrr_rootfs::RootfsSpec::new(example(stimulus)),
            cache.path(),
        )
        .unwrap();
        let console = boot(&vmlinux, &image.path);
        for line in [
            "rrr-agent: no rrr VMM on port 0x790",
            expected,
            "rrr-agent: restarting (without rrr",
        ] {
            assert!(
                console.contains(line),
                "{stimulus}: no {line:?} in:\n{console}"
            );
        }
        if stimulus == "hello.c" {
            assert!(console.contains("hello from rrr"), "{console}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(300));
}
