//! Helpers shared by the `rrr boot` test binaries: the default kernel and an initramfs made of one
//! static test init.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const RRR: &str = env!("CARGO_BIN_EXE_rrr");

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The default guest kernel directory, from `rrr kernel build` (cached after the first build).
pub fn default_kernel() -> PathBuf {
    let out = Command::new(RRR)
        .args(["kernel", "build"])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the rrr binary");
    assert!(
        out.status.success(),
        "`rrr kernel build` failed:\n{}",
        text(&out.stderr)
    );
    let dir = PathBuf::from(text(&out.stdout).trim().lines().last().unwrap_or(""));
    assert!(
        dir.join("vmlinux").is_file(),
        "no vmlinux in {}",
        dir.display()
    );
    dir
}

/// An initramfs in `dir` holding only `/init`, compiled statically from `init_source` (a path
/// relative to the repository).
pub fn initramfs_with_init(dir: &Path, init_source: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(init_source);
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
