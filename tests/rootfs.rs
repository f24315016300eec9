//! `rrr rootfs build` end to end: the real binary, real gcc, mke2fs and qemu-img.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/stimuli")
        .join(name)
}

/// `rrr rootfs build ARGS` with its own cache directory.
fn rrr_rootfs_build(cache: &Path, args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rrr"))
        .args(["rootfs", "build"])
        .args(args)
        .env("RRR_CACHE_DIR", cache)
        .env_remove("RUST_LOG")
        .output()
        .expect("rrr runs")
}

fn stdout_path(output: &Output) -> PathBuf {
    assert!(
        output.status.success(),
        "rrr failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stdout must be only the image path: {stdout:?}"
    );
    PathBuf::from(lines[0])
}

fn tool(cmd: &mut Command) -> String {
    let output = cmd.output().expect("tool runs");
    assert!(output.status.success(), "{cmd:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn builds_a_checked_qcow2_with_agent_stimulus_and_busybox() {
    let cache = tempfile::tempdir().unwrap();
    let hello = example("hello.c");
    let output = rrr_rootfs_build(cache.path(), &["--stimulus".as_ref(), hello.as_os_str()]);
    let image = stdout_path(&output);
    assert!(image.is_file(), "{}", image.display());

    tool(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&image),
    );
    let info = tool(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&image),
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");

    let raw = cache.path().join("look.raw");
    tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&image)
            .arg(&raw),
    );
    let ls = |dir: &str| {
        tool(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("ls -l {dir}"))
                .arg(&raw),
        )
    };
    let root = ls("/");
    for name in [
        "init", "stimulus", "bin", "etc", "tmp", "proc", "sys", "dev",
    ] {
        assert!(
            root.split_whitespace().any(|word| word == name),
            "/{name} is not in the image:\n{root}"
        );
    }
    assert!(ls("/bin").contains("busybox"));

    // The same input again is a cache hit: the same path, and fast.
    let started = std::time::Instant::now();
    let again = stdout_path(&rrr_rootfs_build(
        cache.path(),
        &["--stimulus".as_ref(), hello.as_os_str()],
    ));
    assert_eq!(again, image);
    assert!(
        started.elapsed().as_secs_f64() < 2.0,
        "{:?}",
        started.elapsed()
    );

    // --out copies the image and prints that path.
    let out = cache.path().join("copy.qcow2");
    let copied = stdout_path(&rrr_rootfs_build(
        cache.path(),
        &[
            "--stimulus".as_ref(),
            hello.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
    ));
    assert_eq!(copied, out);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&image).unwrap());
}

#[test]
fn a_stimulus_that_does_not_compile_shows_gccs_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("typo.c");
    std::fs::write(&bad, "int main(void) { retrun 0; }\n").unwrap();
    let output = rrr_rootfs_build(dir.path(), &["--stimulus".as_ref(), bad.as_os_str()]);
    assert!(!output.status.success());
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("typo.c"), "{stderr}");
    assert!(
        stderr.contains("retrun"),
        "gcc's diagnostic is missing: {stderr}"
    );
}

#[test]
fn a_missing_stimulus_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-file.c");
    let output = rrr_rootfs_build(dir.path(), &["--stimulus".as_ref(), missing.as_os_str()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-file.c"), "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
}
