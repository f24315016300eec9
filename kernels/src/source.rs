//! Where the kernel source comes from, and what identifies its contents for the cache.
//!
//! The default is Debian's `linux-source-6.12` package: its tarball is extracted once under the
//! cache, atomically (a temporary directory renamed into place, with a marker written last inside
//! it), so an interrupted extraction is never mistaken for a complete tree.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::KernelError;
use crate::{Progress, Source, Stage};

/// The Debian package whose tarball is the default source.
pub const DEBIAN_PACKAGE: &str = "linux-source-6.12";
/// Marker file written inside a completely extracted tree.
const MARKER: &str = ".rrr-extracted";

/// A source tree on disk and a string that changes whenever its contents do.
#[derive(Debug, Clone)]
pub struct ResolvedSource {
    pub dir: PathBuf,
    pub identity: String,
}

/// The Debian tarball's path.
pub fn debian_tarball() -> PathBuf {
    PathBuf::from(format!("/usr/src/{DEBIAN_PACKAGE}.tar.xz"))
}

/// The installed version of the Debian source package, from dpkg.
pub fn debian_version() -> Result<String, KernelError> {
    let out = run_capture(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Version}"])
            .arg(DEBIAN_PACKAGE),
    )?;
    let version = out.trim().to_owned();
    if version.is_empty() {
        return Err(KernelError::DebianSourceMissing {
            tarball: debian_tarball(),
        });
    }
    Ok(version)
}

/// Finds (and if needed extracts) the source and computes its identity.
pub fn resolve(
    source: &Source,
    cache_dir: &Path,
    progress: &dyn Fn(Progress),
) -> Result<ResolvedSource, KernelError> {
    match source {
        Source::Debian => resolve_debian(cache_dir, progress),
        Source::Tree(dir) => resolve_tree(dir),
    }
}

fn resolve_debian(
    cache_dir: &Path,
    progress: &dyn Fn(Progress),
) -> Result<ResolvedSource, KernelError> {
    let tarball = debian_tarball();
    if !tarball.is_file() {
        return Err(KernelError::DebianSourceMissing { tarball });
    }
    let version = debian_version()?;
    let sources = cache_dir.join("sources");
    let dir = sources.join(format!("{DEBIAN_PACKAGE}_{version}"));
    if !dir.join(MARKER).is_file() {
        progress(Progress::Stage(Stage::Extract));
        progress(Progress::Step(&tarball.display().to_string()));
        extract(
            &tarball,
            &sources,
            &dir,
            &format!("{DEBIAN_PACKAGE}\t{version}\n"),
        )?;
    }
    Ok(ResolvedSource {
        dir,
        identity: format!("debian:{DEBIAN_PACKAGE}={version}"),
    })
}

/// Extracts `tarball` (one top-level directory) to `dest`, via a temporary directory next to it.
fn extract(tarball: &Path, parent: &Path, dest: &Path, marker: &str) -> Result<(), KernelError> {
    std::fs::create_dir_all(parent).map_err(KernelError::io(parent))?;
    let tmp = parent.join(format!(".extract-{}", crate::store::unique_suffix()));
    std::fs::create_dir(&tmp).map_err(KernelError::io(&tmp))?;
    let result = (|| {
        run_capture(
            Command::new("tar")
                .arg("-xf")
                .arg(tarball)
                .arg("-C")
                .arg(&tmp),
        )?;
        let top = single_subdir(&tmp)?;
        std::fs::write(top.join(MARKER), marker).map_err(KernelError::io(top.join(MARKER)))?;
        if dest.exists() {
            // An earlier, interrupted extraction left a tree without its marker.
            std::fs::remove_dir_all(dest).map_err(KernelError::io(dest))?;
        }
        match std::fs::rename(&top, dest) {
            // Someone else finished the same extraction first; theirs is as good as ours.
            Err(_) if dest.join(MARKER).is_file() => Ok(()),
            other => other.map_err(KernelError::io(dest)),
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn single_subdir(dir: &Path) -> Result<PathBuf, KernelError> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(KernelError::io(dir))? {
        let entry = entry.map_err(KernelError::io(dir))?;
        if entry.path().is_dir() {
            dirs.push(entry.path());
        }
    }
    match dirs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(KernelError::NotASourceTree {
            path: dir.to_path_buf(),
        }),
    }
}

fn resolve_tree(dir: &Path) -> Result<ResolvedSource, KernelError> {
    let dir = std::fs::canonicalize(dir).map_err(|_| KernelError::NotASourceTree {
        path: dir.to_path_buf(),
    })?;
    if !dir.join("Makefile").is_file() || !dir.join("Kconfig").is_file() {
        return Err(KernelError::NotASourceTree { path: dir });
    }
    let identity = tree_identity(&dir)?;
    Ok(ResolvedSource { dir, identity })
}

/// What names a local tree's contents, so an edited tree never returns the build from before
/// the edit (kernel developers edit their trees all day).
///
/// - A git checkout: `git:<HEAD>`, plus, when anything differs from HEAD, a hash of the
///   uncommitted diff and of every untracked file that is not ignored (names and contents).
/// - Any other tree: `tree:<path>:<kernelversion>:<hash>`, where the hash covers every file's
///   relative path, size, modification time (ns), change time and inode. That is what `make`
///   itself trusts to decide what to rebuild, and a stat of the tree's ~90,000 files takes a
///   fraction of a second where hashing their 1.5 GB would take many seconds per lookup.
pub fn tree_identity(dir: &Path) -> Result<String, KernelError> {
    let head = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--verify", "-q", "HEAD"])
        .output();
    if let Ok(out) = head {
        let is_toplevel = git_toplevel(dir).as_deref() == Some(dir);
        if out.status.success() && is_toplevel {
            let rev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            return match git_changes(dir)? {
                None => Ok(format!("git:{rev}")),
                Some(hash) => Ok(format!("git:{rev}-dirty:{}", &hash[..16])),
            };
        }
    }
    let version = run_capture(
        Command::new("make")
            .args(["-s", "--no-print-directory", "-C"])
            .arg(dir)
            .arg("kernelversion"),
    )?;
    let manifest = stat_manifest(dir)?;
    Ok(format!(
        "tree:{}:{}:{}",
        dir.display(),
        version.trim(),
        &manifest[..16]
    ))
}

/// A hash of everything in a git checkout that HEAD does not hold (the diff against HEAD, and
/// untracked files that are not ignored), or `None` when there is nothing.
fn git_changes(dir: &Path) -> Result<Option<String>, KernelError> {
    let git = |args: &[&str]| -> Result<Vec<u8>, KernelError> {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .map_err(|source| KernelError::Spawn {
                command: format!("git {}", args.join(" ")),
                source,
            })?;
        if !out.status.success() {
            return Err(KernelError::Command {
                command: format!("git -C {} {}", dir.display(), args.join(" ")),
                status: out.status.to_string(),
                detail: format!(":\n{}", String::from_utf8_lossy(&out.stderr).trim_end()),
            });
        }
        Ok(out.stdout)
    };
    let diff = git(&["diff", "--no-ext-diff", "--binary", "HEAD"])?;
    let untracked = git(&["ls-files", "--others", "--exclude-standard", "-z"])?;
    if diff.is_empty() && untracked.is_empty() {
        return Ok(None);
    }
    let mut hasher = Sha256::new();
    hash_part(&mut hasher, &diff);
    for name in untracked.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let path = dir.join(std::ffi::OsStr::from_bytes(name));
        hash_part(&mut hasher, name);
        // A symlink or a file that vanished meanwhile is named, not read.
        if path.symlink_metadata().is_ok_and(|m| m.is_file()) {
            let contents = std::fs::read(&path).map_err(KernelError::io(&path))?;
            hash_part(&mut hasher, &contents);
        }
    }
    Ok(Some(hex::encode(hasher.finalize())))
}

/// Length-prefixed, so no two different lists of parts hash alike by concatenation.
fn hash_part(hasher: &mut Sha256, part: &[u8]) {
    hasher.update((part.len() as u64).to_le_bytes());
    hasher.update(part);
}

/// A hash of the tree's metadata: every entry's path relative to `root`, its type, size,
/// modification and change times and inode (a symlink's target too), in a fixed order.
fn stat_manifest(root: &Path) -> Result<String, KernelError> {
    use std::os::unix::fs::MetadataExt;
    let mut hasher = Sha256::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries = std::fs::read_dir(&dir)
            .map_err(KernelError::io(&dir))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(KernelError::io(&dir))?;
        entries.sort();
        for path in entries {
            let meta = path.symlink_metadata().map_err(KernelError::io(&path))?;
            let relative = path.strip_prefix(root).unwrap_or(&path);
            hash_part(&mut hasher, relative.as_os_str().as_bytes());
            let kind: &[u8] = if meta.is_dir() {
                b"d"
            } else if meta.file_type().is_symlink() {
                b"l"
            } else {
                b"f"
            };
            hash_part(&mut hasher, kind);
            // Not the ctime: rrr's own patched copy of a tree hard-links its files, which moves
            // their ctime without changing a byte, and would make every build a new key.
            for n in [
                meta.size(),
                meta.mtime() as u64,
                meta.mtime_nsec() as u64,
                meta.ino(),
            ] {
                hasher.update(n.to_le_bytes());
            }
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(KernelError::io(&path))?;
                hash_part(&mut hasher, target.as_os_str().as_bytes());
            } else if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The top of the git work tree containing `dir`, so a plain tree inside some unrelated
/// repository is not identified by that repository's HEAD.
fn git_toplevel(dir: &Path) -> Option<PathBuf> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--show-toplevel"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        let top = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        std::fs::canonicalize(&top).unwrap_or(top)
    })
}

/// First line of `gcc --version` (or clang's): the compiler is part of every cache key.
pub fn compiler_version(toolchain: crate::Toolchain) -> Result<String, KernelError> {
    match toolchain {
        crate::Toolchain::Gcc => version_line("gcc"),
        crate::Toolchain::Llvm => {
            version_line("clang").map_err(|_| KernelError::NoClang)?;
            // LLVM=1 also needs LLVM's linker and binutils.
            version_line("ld.lld").map_err(|_| KernelError::NoClang)?;
            version_line("llvm-objcopy").map_err(|_| KernelError::NoClang)?;
            version_line("clang")
        }
    }
}

fn version_line(program: &str) -> Result<String, KernelError> {
    let out = run_capture(Command::new(program).arg("--version"))?;
    Ok(out.lines().next().unwrap_or("").to_owned())
}

/// Runs a short command and returns its stdout; a failure carries its stderr.
pub(crate) fn run_capture(cmd: &mut Command) -> Result<String, KernelError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| KernelError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(KernelError::Command {
            command,
            status: out.status.to_string(),
            detail: format!(":\n{}", stderr.trim_end()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_tree(dir: &Path) {
        std::fs::write(
            dir.join("Makefile"),
            "kernelversion:\n\t@echo 6.99.0-test\n",
        )
        .unwrap();
        std::fs::write(dir.join("Kconfig"), "").unwrap();
    }

    fn git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn plain_tree_identity_names_path_and_version_and_follows_every_edit() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        std::fs::create_dir_all(dir.path().join("kernel")).unwrap();
        let file = dir.path().join("kernel/fork.c");
        std::fs::write(&file, "int x;\n").unwrap();
        let first = resolve_tree(dir.path()).unwrap().identity;
        let canon = std::fs::canonicalize(dir.path()).unwrap();
        assert!(
            first.starts_with(&format!("tree:{}:6.99.0-test:", canon.display())),
            "{first}"
        );
        assert_eq!(first, resolve_tree(dir.path()).unwrap().identity);

        // An edit that keeps the size, as a one-character fix does.
        std::fs::write(&file, "int y;\n").unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let edited = resolve_tree(dir.path()).unwrap().identity;
        assert_ne!(first, edited, "an edited file must change the identity");

        std::fs::write(dir.path().join("kernel/new.c"), "").unwrap();
        let added = resolve_tree(dir.path()).unwrap().identity;
        assert_ne!(edited, added, "a new file must change the identity");
    }

    #[test]
    fn git_tree_identity_follows_head_and_uncommitted_changes() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        git(dir.path(), &["init", "-q"]);
        git(dir.path(), &["add", "."]);
        git(dir.path(), &["commit", "-q", "-m", "x"]);
        let clean = tree_identity(dir.path()).unwrap();
        assert!(
            clean.starts_with("git:") && !clean.contains("dirty"),
            "{clean}"
        );

        std::fs::write(dir.path().join("Kconfig"), "config A\n").unwrap();
        let dirty = tree_identity(dir.path()).unwrap();
        assert!(dirty.starts_with(&format!("{clean}-dirty:")), "{dirty}");
        std::fs::write(dir.path().join("Kconfig"), "config B\n").unwrap();
        let dirtier = tree_identity(dir.path()).unwrap();
        assert_ne!(dirty, dirtier);

        // `git diff HEAD` does not show untracked files; the identity must.
        git(dir.path(), &["checkout", "-q", "--", "Kconfig"]);
        assert_eq!(tree_identity(dir.path()).unwrap(), clean);
        std::fs::write(dir.path().join("new.c"), "int a;\n").unwrap();
        let untracked = tree_identity(dir.path()).unwrap();
        assert!(
            untracked.starts_with(&format!("{clean}-dirty:")),
            "{untracked}"
        );
        std::fs::write(dir.path().join("new.c"), "int b;\n").unwrap();
        assert_ne!(untracked, tree_identity(dir.path()).unwrap());
        // Ignored files (in-tree build products) are not part of the source.
        std::fs::remove_file(dir.path().join("new.c")).unwrap();
        std::fs::write(dir.path().join(".gitignore"), "*.o\n").unwrap();
        git(dir.path(), &["add", ".gitignore"]);
        git(dir.path(), &["commit", "-q", "-m", "ignore"]);
        let committed = tree_identity(dir.path()).unwrap();
        std::fs::write(dir.path().join("fork.o"), "obj").unwrap();
        assert_eq!(tree_identity(dir.path()).unwrap(), committed);
    }

    #[test]
    fn a_directory_without_makefile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = resolve_tree(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("not a kernel source tree"),
            "{err}"
        );
    }

    #[test]
    fn extraction_is_atomic_and_marked() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("pkg/linux-x");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("Makefile"), "").unwrap();
        let tarball = dir.path().join("x.tar");
        run_capture(
            Command::new("tar")
                .arg("-cf")
                .arg(&tarball)
                .arg("-C")
                .arg(dir.path().join("pkg"))
                .arg("linux-x"),
        )
        .unwrap();
        let parent = dir.path().join("sources");
        let dest = parent.join("linux-x_1");
        extract(&tarball, &parent, &dest, "x\t1\n").unwrap();
        assert!(dest.join("Makefile").is_file());
        assert_eq!(
            std::fs::read_to_string(dest.join(MARKER)).unwrap(),
            "x\t1\n"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&parent).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary directory left behind");
    }
}
