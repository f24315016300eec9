//! The directory tree that becomes the ext4 image: the agent as /init, the stimulus, busybox and
//! its applets, the directories a syzkaller reproducer expects, and a minimal /etc.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::RootfsError;

/// Every file's timestamps in the image, so equal inputs give equal bytes (2020-01-01 UTC).
pub const FIXED_EPOCH: i64 = 1_577_836_800;

/// Directories and their modes. Mount points are here too: the agent mounts over them.
const DIRECTORIES: &[(&str, u32)] = &[
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("dev", 0o755),
    ("dev/pts", 0o755),
    ("dev/shm", 0o1777),
    ("proc", 0o555),
    ("sys", 0o555),
    ("sys/fs/cgroup", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("root", 0o700),
    ("home", 0o755),
    ("mnt", 0o755),
    ("etc", 0o755),
    ("var/tmp", 0o1777),
    ("var/log", 0o755),
];

const ETC_FILES: &[(&str, &str)] = &[
    (
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ),
    ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
    ("etc/hostname", "rrr\n"),
    ("etc/hosts", "127.0.0.1 localhost rrr\n::1 localhost\n"),
    ("etc/resolv.conf", ""),
];

/// The inputs of the tree, already built.
pub struct TreeInputs<'a> {
    pub agent: &'a Path,
    /// Baked in as `/stimulus`; `None` for the base image, whose stimulus comes on its own disk.
    pub stimulus: Option<&'a Path>,
    pub busybox: &'a [u8],
    pub applets: &'a [PathBuf],
}

/// Fills `root` (an empty directory) and returns every path in it (relative, parents first).
pub fn assemble(root: &Path, inputs: &TreeInputs) -> Result<Vec<PathBuf>, RootfsError> {
    for (dir, mode) in DIRECTORIES {
        make_dir(root, dir, *mode)?;
    }
    copy_exec(inputs.agent, &root.join("init"))?;
    if let Some(stimulus) = inputs.stimulus {
        copy_exec(stimulus, &root.join("stimulus"))?;
    }
    write_file(&root.join("bin/busybox"), inputs.busybox, 0o755)?;
    link(root, "sbin/init", "/init")?;
    for (path, text) in ETC_FILES {
        write_file(&root.join(path), text.as_bytes(), 0o644)?;
    }
    for applet in inputs.applets {
        // Our own files win over applets of the same name (busybox has an `init` too).
        if root.join(applet).symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = applet.parent() {
            make_dir(root, parent, 0o755)?;
        }
        link(root, applet, "/bin/busybox")?;
    }
    let paths = walk(root)?;
    for path in &paths {
        set_fixed_times(&root.join(path))?;
    }
    set_fixed_times(root)?;
    Ok(paths)
}

fn make_dir(root: &Path, dir: impl AsRef<Path>, mode: u32) -> Result<(), RootfsError> {
    let path = root.join(dir);
    std::fs::create_dir_all(&path)
        .map_err(RootfsError::io(format!("cannot create {}", path.display())))?;
    set_mode(&path, mode)
}

fn copy_exec(from: &Path, to: &Path) -> Result<(), RootfsError> {
    std::fs::copy(from, to).map_err(RootfsError::io(format!(
        "cannot copy {} to {}",
        from.display(),
        to.display()
    )))?;
    set_mode(to, 0o755)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), RootfsError> {
    std::fs::write(path, bytes)
        .map_err(RootfsError::io(format!("cannot write {}", path.display())))?;
    set_mode(path, mode)
}

fn link(root: &Path, at: impl AsRef<Path>, target: &str) -> Result<(), RootfsError> {
    let path = root.join(at);
    symlink(target, &path).map_err(RootfsError::io(format!("cannot link {}", path.display())))
}

/// Explicit modes, so the host's umask does not leak into the image.
fn set_mode(path: &Path, mode: u32) -> Result<(), RootfsError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(RootfsError::io(format!("cannot chmod {}", path.display())))
}

/// All paths under `root`, relative, sorted (so parents come before children).
fn walk(root: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    let mut paths = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(root.join(&dir))
            .map_err(RootfsError::io(format!("cannot list {}", dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(RootfsError::io("cannot list the rootfs tree"))?;
            let path = dir.join(entry.file_name());
            let kind = entry
                .file_type()
                .map_err(RootfsError::io("cannot stat the rootfs tree"))?;
            if kind.is_dir() {
                pending.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// mke2fs -d copies each file's timestamps; pinning them (without following symlinks) is one of
/// the things that make the image reproducible.
fn set_fixed_times(path: &Path) -> Result<(), RootfsError> {
    let mut c_path = path.as_os_str().as_bytes().to_vec();
    c_path.push(0);
    let time = libc::timespec {
        tv_sec: FIXED_EPOCH as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: c_path is NUL-terminated and outlives the call; times points at two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr().cast(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(RootfsError::Io {
            what: format!("cannot set the times of {}", path.display()),
            error: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn tree_has_init_stimulus_busybox_and_fixed_times() {
        let scratch = tempfile::tempdir().unwrap();
        let agent = scratch.path().join("agent");
        let stimulus = scratch.path().join("stim");
        std::fs::write(&agent, b"agent").unwrap();
        std::fs::write(&stimulus, b"stim").unwrap();
        let root = scratch.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let applets = [PathBuf::from("bin/sh"), PathBuf::from("sbin/init")];
        let paths = assemble(
            &root,
            &TreeInputs {
                agent: &agent,
                stimulus: Some(&stimulus),
                busybox: b"bb",
                applets: &applets,
            },
        )
        .unwrap();

        assert_eq!(std::fs::read(root.join("init")).unwrap(), b"agent");
        assert_eq!(std::fs::read(root.join("stimulus")).unwrap(), b"stim");
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        // busybox's own init applet must not replace the agent.
        assert_eq!(
            std::fs::read_link(root.join("sbin/init")).unwrap(),
            Path::new("/init")
        );
        let tmp = std::fs::metadata(root.join("tmp")).unwrap();
        assert_eq!(tmp.mode() & 0o7777, 0o1777);
        for path in &paths {
            let meta = root.join(path).symlink_metadata().unwrap();
            assert_eq!(meta.mtime(), FIXED_EPOCH, "{}", path.display());
        }
        assert!(paths.contains(&PathBuf::from("etc/resolv.conf")));
    }
}
