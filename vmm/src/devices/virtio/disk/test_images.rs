//! Test images made by the real `qemu-img`, so the reader is checked against qemu's writer.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A raw file and its qcow2 conversion, deleted with the directory.
pub struct TestImage {
    pub dir: tempfile::TempDir,
    pub raw: Vec<u8>,
    pub qcow2: PathBuf,
}

/// Deterministic, position-dependent bytes with zero holes, so that qemu-img leaves some
/// clusters unallocated and a misplaced cluster shows up as a mismatch.
pub fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|i| {
            // A 192 KiB hole every 512 KiB.
            if (i / (64 << 10)) % 8 >= 5 {
                return 0;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (Debian package qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Converts `raw` with `qemu-img convert -O qcow2 <options>`.
pub fn make_qcow2(raw: Vec<u8>, options: &[&str]) -> TestImage {
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("disk.raw");
    let qcow2 = dir.path().join("disk.qcow2");
    std::fs::write(&raw_path, &raw).unwrap();
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(options);
    args.push(raw_path.to_str().unwrap());
    args.push(qcow2.to_str().unwrap());
    qemu_img(&args);
    TestImage { dir, raw, qcow2 }
}

/// A fingerprint of a file's bytes and modification time, to prove it was never written.
pub fn fingerprint(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    let meta = std::fs::metadata(path).unwrap();
    (std::fs::read(path).unwrap(), meta.modified().unwrap())
}
