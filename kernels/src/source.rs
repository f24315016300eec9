//! Where the kernel source comes from, and what identifies its contents for the cache.
//!
//! The default is Debian's `linux-source-6.12` package: its tarball is extracted once under the
//! cache, atomically (a temporary directory renamed into place, with a marker written last inside
//! it), so an interrupted extraction is never mistaken for a complete tree.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::KernelError;
use crate::Source;

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
    progress: &dyn Fn(&str),
) -> Result<ResolvedSource, KernelError> {
    match source {
        Source::Debian => resolve_debian(cache_dir, progress),
        Source::Tree(dir) => resolve_tree(dir),
    }
}

fn resolve_debian(
    cache_dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<ResolvedSource, KernelError> {
    let tarball = debian_tarball();
    if !tarball.is_file() {
        return Err(KernelError::DebianSourceMissing { tarball });
    }
    let version = debian_version()?;
    let sources = cache_dir.join("sources");
    let dir = sources.join(format!("{DEBIAN_PACKAGE}_{version}"));
    if !dir.join(MARKER).is_file() {
        progress(&format!("extracting {}", tarball.display()));
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

/// `git:<HEAD>` (plus a hash of the uncommitted diff when dirty) for a git checkout, otherwise
/// `tree:<path>:<kernelversion>`.
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
            let diff = Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["diff", "--no-ext-diff", "--binary", "HEAD"])
                .output()
                .map_err(|source| KernelError::Spawn {
                    command: "git diff".into(),
                    source,
                })?;
            if diff.stdout.is_empty() {
                return Ok(format!("git:{rev}"));
            }
            let hash = hex::encode(Sha256::digest(&diff.stdout));
            return Ok(format!("git:{rev}-dirty:{}", &hash[..16]));
        }
    }
    let version = run_capture(
        Command::new("make")
            .args(["-s", "--no-print-directory", "-C"])
            .arg(dir)
            .arg("kernelversion"),
    )?;
    Ok(format!("tree:{}:{}", dir.display(), version.trim()))
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

/// First line of `gcc --version`: the compiler is part of every cache key.
pub fn compiler_version() -> Result<String, KernelError> {
    let out = run_capture(Command::new("gcc").arg("--version"))?;
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
    fn plain_tree_is_identified_by_path_and_kernelversion() {
        let dir = tempfile::tempdir().unwrap();
        fake_tree(dir.path());
        let resolved = resolve_tree(dir.path()).unwrap();
        let canon = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            resolved.identity,
            format!("tree:{}:6.99.0-test", canon.display())
        );
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
