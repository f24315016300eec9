//! Moving an rrr command into the carrier: the same command line, run again in there.
//!
//! The carrier sees the host's root read-only at the same paths, and the working directory, the
//! cache and the shares at the same paths writable; but `/tmp`, `/run` and `/dev/shm` are its
//! own (fresh tmpfs). So a command line is re-executed word for word, except that a word naming
//! an existing host path the carrier would not see (a reproducer downloaded to `/tmp`) gets its
//! directory shared and is rewritten to its canonical path. Nothing here knows any subcommand's
//! flags: a new subcommand gets this for free. What a command hands its inner self besides its
//! command line (a kernel or image it already built) goes through environment variables, which
//! the carrier passes on; the paths in them are made reachable the same way.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

use super::CarrierOptions;

/// Host directories the carrier mounts its own file systems over: what is under them on the
/// host is hidden inside unless shared. (`/dev`, `/proc` and `/sys` are hidden too, but what a
/// command line names there means the carrier's own, like `/dev/null`.)
const HIDDEN_ROOTS: [&str; 3] = ["/tmp", "/run", "/dev/shm"];

/// What a command hands over to its copy inside the carrier, besides its command line.
#[derive(Debug, Default)]
pub struct Handover {
    /// Environment variables for the command inside (values that name host paths are made
    /// reachable like command-line words).
    pub env: Vec<(OsString, OsString)>,
    /// Existing host directories the command inside writes to.
    pub writable: Vec<PathBuf>,
    /// The words to run after the program name, when not this process's own (a command that
    /// runs another on the user's behalf, as `rrr demo` runs `rrr run`).
    pub command_line: Option<Vec<OsString>>,
}

/// Reruns this rrr inside the carrier with the same command line (paths made reachable, see the
/// module doc) and `handover`; returns its exit status.
pub fn reexec_in_carrier(handover: Handover) -> Result<i32> {
    eprintln!(
        "rrr: this host's KVM is software-only; running inside the carrier (QEMU with AMD-V)"
    );
    // The carrier's root is this host's root, so this path is valid in there too.
    let exe = std::fs::read_link("/proc/self/exe").context("cannot find the rrr executable")?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let cache = crate::cache::cache_dir()?;
    // What the carrier shares writable in any case (see `shares`).
    let always: Vec<PathBuf> = [cwd.clone(), cache]
        .into_iter()
        .filter(|dir| !super::is_root(dir))
        .collect();
    let mut reach = Reach::new(&cwd, &always);
    let mut cmd = vec![exe.into_os_string()];
    let words = match handover.command_line {
        Some(words) => words,
        None => std::env::args_os().skip(1).collect(),
    };
    for word in words {
        cmd.push(reach.word(&word)?);
    }
    let mut opts = CarrierOptions::default();
    for (name, value) in handover.env {
        let value = reach.word(&value)?;
        opts.env.push((name, value));
    }
    for dir in &handover.writable {
        reach.writable(dir)?;
    }
    opts.shares = reach.shares;
    tracing::debug!(?cmd, shares = ?opts.shares, "re-executing in the carrier");
    super::run_in_carrier(&cmd, &opts)
}

/// Which host paths the carrier sees, and the shares added so it sees more.
struct Reach {
    cwd: PathBuf,
    /// Canonical directories shared writable at their own path.
    shared: Vec<PathBuf>,
    /// The shares this command line added.
    shares: Vec<PathBuf>,
}

impl Reach {
    /// `always` are the directories every carrier shares (the working directory, the cache).
    fn new(cwd: &Path, always: &[PathBuf]) -> Self {
        Reach {
            cwd: cwd.to_owned(),
            shared: always
                .iter()
                .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
                .collect(),
            shares: Vec::new(),
        }
    }

    /// The word as the command inside must get it: unchanged unless it names an existing host
    /// path the carrier would not see (also as the value of `--flag=VALUE`).
    fn word(&mut self, word: &OsStr) -> Result<OsString> {
        let bytes = word.as_bytes();
        if let Some(eq) = bytes
            .starts_with(b"--")
            .then(|| bytes.iter().position(|&b| b == b'='))
        {
            if let Some(eq) = eq {
                let (flag, value) = (&bytes[..=eq], &bytes[eq + 1..]);
                let mut out = flag.to_vec();
                out.extend_from_slice(self.path(OsStr::from_bytes(value))?.as_bytes());
                return Ok(OsString::from_vec(out));
            }
            return Ok(word.to_owned());
        }
        self.path(word)
    }

    fn path(&mut self, word: &OsStr) -> Result<OsString> {
        if word.is_empty() {
            return Ok(word.to_owned());
        }
        let lexical = normalize(&self.cwd.join(word));
        // Only what exists can be shared; anything else is not a path (or not one yet).
        let Ok(meta) = lexical.symlink_metadata() else {
            return Ok(word.to_owned());
        };
        // A bare name is in the working directory, which the carrier sees, unless it is a link
        // out of it. Other bare names are left alone: they are subcommands and values as often
        // as files (`rrr run` from `/` must not share `/run`).
        if !word.as_bytes().contains(&b'/') && !meta.file_type().is_symlink() {
            return Ok(word.to_owned());
        }
        let Ok(canonical) = std::fs::canonicalize(&lexical) else {
            return Ok(word.to_owned());
        };
        if self.visible(&lexical) && self.visible(&canonical) {
            return Ok(word.to_owned());
        }
        if !self.visible(&canonical) {
            let dir = if canonical.is_dir() {
                canonical.clone()
            } else {
                canonical.parent().unwrap_or(Path::new("/")).to_owned()
            };
            self.share(dir);
        }
        Ok(canonical.into_os_string())
    }

    /// Shares `dir` (which the command inside writes) unless it is already writable in there.
    fn writable(&mut self, dir: &Path) -> Result<()> {
        let canonical = std::fs::canonicalize(dir)
            .with_context(|| format!("cannot share {} with the carrier", dir.display()))?;
        if !self.shared.iter().any(|s| canonical.starts_with(s)) {
            self.share(canonical);
        }
        Ok(())
    }

    fn share(&mut self, dir: PathBuf) {
        tracing::info!(dir = %dir.display(), "sharing a directory named on the command line with the carrier");
        self.shared.push(dir.clone());
        self.shares.push(dir);
    }

    /// Whether the carrier sees this absolute path as the host does.
    fn visible(&self, path: &Path) -> bool {
        self.shared.iter().any(|s| path.starts_with(s))
            || !HIDDEN_ROOTS.iter().any(|root| path.starts_with(root))
    }
}

/// `path` without `.` and `..` components, lexically (as the kernel would walk it if no
/// component were a symlink).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under /tmp (hidden in the carrier) and one that is not, as the carrier's
    /// working directory.
    struct Rig {
        tmp: tempfile::TempDir,
        cwd: tempfile::TempDir,
    }

    impl Rig {
        fn new() -> Self {
            let tmp = tempfile::Builder::new().tempdir_in("/tmp").unwrap();
            // /var/tmp is on the host's root, which the carrier sees.
            let cwd = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
            Rig { tmp, cwd }
        }

        fn reach(&self) -> Reach {
            Reach::new(self.cwd.path(), &[self.cwd.path().to_owned()])
        }
    }

    fn words(reach: &mut Reach, words: &[&OsStr]) -> Vec<OsString> {
        words.iter().map(|w| reach.word(w).unwrap()).collect()
    }

    #[test]
    fn a_file_under_tmp_gets_its_directory_shared_and_the_rest_is_unchanged() {
        let rig = Rig::new();
        let dir = rig.tmp.path().join("x");
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("exit3.c");
        std::fs::write(&file, "").unwrap();
        std::fs::write(rig.cwd.path().join("local.c"), "").unwrap();
        let mut reach = rig.reach();
        let got = words(
            &mut reach,
            &[
                "run".as_ref(),
                file.as_os_str(),
                "--time-limit".as_ref(),
                "30".as_ref(),
                "local.c".as_ref(),
                "/usr/bin/env".as_ref(),
                "/nonexistent/x".as_ref(),
                "--run-dir=/tmp/does-not-exist-yet".as_ref(),
            ],
        );
        let canonical = std::fs::canonicalize(&file).unwrap();
        assert_eq!(got[1], canonical.as_os_str());
        assert_eq!(&got[..1], ["run"]);
        assert_eq!(
            &got[2..],
            [
                "--time-limit",
                "30",
                "local.c",
                "/usr/bin/env",
                "/nonexistent/x",
                "--run-dir=/tmp/does-not-exist-yet"
            ]
        );
        assert_eq!(reach.shares, [canonical.parent().unwrap()]);
    }

    #[test]
    fn flag_values_directories_and_symlinks_into_tmp_are_reachable() {
        let rig = Rig::new();
        let tmp = std::fs::canonicalize(rig.tmp.path()).unwrap();
        for dir in ["boot", "other"] {
            std::fs::create_dir(tmp.join(dir)).unwrap();
            std::fs::write(tmp.join(dir).join("initrd.gz"), "").unwrap();
        }
        let initrd = tmp.join("boot/initrd.gz");
        // A link in the working directory (visible) pointing into /tmp (hidden).
        std::os::unix::fs::symlink(&initrd, rig.cwd.path().join("link")).unwrap();
        let mut reach = rig.reach();
        assert_eq!(reach.word("link".as_ref()).unwrap(), initrd.as_os_str());
        // Once shared, the directory's files are reachable as they are named.
        let mut flag = OsString::from("--initrd=");
        flag.push(&initrd);
        assert_eq!(reach.word(&flag).unwrap(), flag);
        let other = tmp.join("other/initrd.gz");
        let mut flag = OsString::from("--initrd=");
        flag.push(&other);
        assert_eq!(reach.word(&flag).unwrap(), flag);
        assert_eq!(reach.word(tmp.as_os_str()).unwrap(), tmp.as_os_str());
        assert_eq!(
            reach.shares,
            [tmp.join("boot"), tmp.join("other"), tmp.clone()]
        );
    }

    #[test]
    fn writable_directories_are_shared_unless_already_writable() {
        let rig = Rig::new();
        let inside = rig.cwd.path().join("runs");
        std::fs::create_dir(&inside).unwrap();
        let mut reach = rig.reach();
        reach.writable(&inside).unwrap();
        assert!(reach.shares.is_empty(), "{:?}", reach.shares);
        reach.writable(rig.tmp.path()).unwrap();
        assert_eq!(
            reach.shares,
            [std::fs::canonicalize(rig.tmp.path()).unwrap()]
        );
        assert!(reach.writable(Path::new("/nonexistent/run")).is_err());
    }

    #[test]
    fn bare_words_from_the_root_directory_stay_words() {
        let mut reach = Reach::new(Path::new("/"), &[]);
        let got = words(
            &mut reach,
            &["run".as_ref(), "tmp".as_ref(), "/tmp/..".as_ref()],
        );
        assert_eq!(got, ["run", "tmp", "/tmp/.."]);
        assert!(reach.shares.is_empty(), "{:?}", reach.shares);
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(Path::new("/a/b/../c/./d")), Path::new("/a/c/d"));
        assert_eq!(normalize(Path::new("/../tmp")), Path::new("/tmp"));
    }
}
