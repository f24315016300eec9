//! `rrr kernel build` end to end: builds the default guest kernel (minutes on a cold cache,
//! seconds when cached), then checks the result and the cache hit.

use std::process::Command;

use object::{Object, ObjectSection};

fn rrr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rrr"))
}

#[test]
fn builds_the_guest_kernel_then_hits_the_cache() {
    let first = rrr().args(["kernel", "build"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "rrr kernel build failed:\n{stderr}");
    let stdout = String::from_utf8(first.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout must be one line: {stdout:?}"
    );
    let dir = std::path::PathBuf::from(stdout.trim_end());
    assert!(dir.is_dir(), "{} is not a directory", dir.display());
    assert!(dir.join("bzImage").is_file());
    let config = std::fs::read_to_string(dir.join(".config")).unwrap();
    assert!(config.contains("CONFIG_DEBUG_INFO_DWARF5=y"));
    assert!(
        config.contains("# CONFIG_KVM_GUEST is not set") || !config.contains("CONFIG_KVM_GUEST=y")
    );
    assert!(!config.contains("CONFIG_SMP=y"));

    let vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    let elf = object::File::parse(&*vmlinux).unwrap();
    let debug_info = elf
        .section_by_name(".debug_info")
        .expect("vmlinux has .debug_info");
    assert!(
        debug_info.size() > 1 << 20,
        "suspiciously small .debug_info"
    );

    let second = rrr().args(["kernel", "build"]).output().unwrap();
    assert!(second.status.success());
    assert_eq!(String::from_utf8(second.stdout).unwrap(), stdout);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("cached"),
        "second build should be a cache hit: {stderr}"
    );
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let out = rrr()
        .args(["kernel", "build", "--config", "/nonexistent/syzbot.config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/syzbot.config") && stderr.contains("cannot be read"),
        "{stderr}"
    );
}

#[test]
fn a_missing_source_tree_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = rrr()
        .args(["kernel", "build", "--source"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a kernel source tree"), "{stderr}");
}
