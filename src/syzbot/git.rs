//! The kernel at a syzbot commit, without cloning a kernel repository: one bare repository per
//! remote under the cache, a `--depth 1` fetch of just the commit, and one worktree per commit.
//!
//! Layout under `<cache>/syzbot/git/`:
//! - `repos/<hash of the URL>.git`: the bare repository (shallow; objects of every commit fetched);
//! - `trees/<commit>/`: its worktree at that commit, complete once `trees/<commit>.done` exists.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::error::SyzbotError;
use super::schema::KernelSource;

/// A checked-out kernel tree and whether this call had to fetch it.
#[derive(Debug, Clone)]
pub struct Checkout {
    pub dir: PathBuf,
    pub fetched: bool,
}

/// The worktree for `source`, fetched and checked out if it is not in the cache yet.
/// `offline` refuses to fetch.
pub fn checkout(
    source: &KernelSource,
    cache_dir: &Path,
    offline: bool,
    progress: &dyn Fn(&str),
) -> Result<Checkout, SyzbotError> {
    let root = cache_dir.join("syzbot").join("git");
    let tree = root.join("trees").join(&source.commit);
    let done = root.join("trees").join(format!("{}.done", source.commit));
    if done.is_file() && tree.join("Makefile").exists() {
        return Ok(Checkout {
            dir: tree,
            fetched: false,
        });
    }
    let repo = root.join("repos").join(format!(
        "{}.git",
        &hex::encode(Sha256::digest(source.repo.as_bytes()))[..16]
    ));
    if !repo.join("HEAD").is_file() {
        std::fs::create_dir_all(&repo).map_err(SyzbotError::io(&repo))?;
        git(&repo, &["init", "-q", "--bare"])?;
        let _ = std::fs::write(repo.join("rrr-remote"), format!("{}\n", source.repo));
    }
    let have = git(
        &repo,
        &["cat-file", "-e", &format!("{}^{{commit}}", source.commit)],
    )
    .is_ok();
    if !have {
        if offline {
            return Err(SyzbotError::Git {
                command: format!("git fetch {} {}", source.repo, source.commit),
                detail: "the commit is not in the cache and --offline forbids fetching".into(),
            });
        }
        progress(&format!(
            "fetching {} from {}",
            short(&source.commit),
            source.repo
        ));
        fetch(&repo, source)?;
    }
    if tree.exists() {
        // An interrupted checkout: start it again.
        let _ = git(&repo, &["worktree", "remove", "--force", &path_str(&tree)]);
        let _ = std::fs::remove_dir_all(&tree);
        let _ = git(&repo, &["worktree", "prune"]);
    }
    progress(&format!("checking out {}", short(&source.commit)));
    std::fs::create_dir_all(tree.parent().expect("trees has a parent"))
        .map_err(SyzbotError::io(&tree))?;
    git(
        &repo,
        &[
            "worktree",
            "add",
            "--detach",
            "-f",
            &path_str(&tree),
            &source.commit,
        ],
    )?;
    std::fs::write(&done, format!("{}\n{}\n", source.repo, source.commit))
        .map_err(SyzbotError::io(&done))?;
    Ok(Checkout {
        dir: tree,
        fetched: !have,
    })
}

fn fetch(repo: &Path, source: &KernelSource) -> Result<(), SyzbotError> {
    // Fetching by hash needs the server's consent (`uploadpack.allowReachableSHA1InWant`, on at
    // git.kernel.org and GitHub); protocol v2 asks for it by default.
    let result = git(
        repo,
        &[
            "-c",
            "protocol.version=2",
            "fetch",
            "-q",
            "--depth",
            "1",
            "--no-tags",
            &source.repo,
            &source.commit,
        ],
    );
    match result {
        Ok(_) => Ok(()),
        Err(SyzbotError::Git { detail, .. }) if is_missing_object(&detail) => {
            Err(SyzbotError::CommitMissing {
                repo: source.repo.clone(),
                commit: source.commit.clone(),
                detail,
            })
        }
        Err(SyzbotError::Git { command, detail }) => Err(SyzbotError::Git {
            command,
            detail: format!("{detail} (cannot fetch from {})", source.repo),
        }),
        Err(other) => Err(other),
    }
}

/// git's ways of saying the server has no such commit.
fn is_missing_object(stderr: &str) -> bool {
    let s = stderr.to_lowercase();
    s.contains("not our ref")
        || s.contains("couldn't find remote ref")
        || s.contains("no such remote ref")
        || s.contains("unadvertised object")
        || s.contains("remote error: upload-pack: not our ref")
        || s.contains("server does not allow request for unadvertised object")
}

fn git(repo: &Path, args: &[&str]) -> Result<String, SyzbotError> {
    let command = format!("git {}", args.join(" "));
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        // A test harness or a user's environment must not point git elsewhere.
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .map_err(|err| SyzbotError::Git {
            command: command.clone(),
            detail: format!("cannot run git: {err}"),
        })?;
    if !out.status.success() {
        return Err(SyzbotError::Git {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remote with two commits; returns its file:// URL and both hashes.
    fn remote(dir: &Path) -> (String, String, String) {
        let run = |args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        run(&["init", "-q"]);
        std::fs::write(dir.join("Makefile"), "# v1\n").unwrap();
        std::fs::write(dir.join("Kconfig"), "").unwrap();
        run(&["add", "."]);
        run(&["commit", "-q", "-m", "one"]);
        let first = run(&["rev-parse", "HEAD"]);
        std::fs::write(dir.join("Makefile"), "# v2\n").unwrap();
        run(&["commit", "-q", "-am", "two"]);
        let second = run(&["rev-parse", "HEAD"]);
        (format!("file://{}", dir.display()), first, second)
    }

    #[test]
    fn fetches_one_commit_shallow_then_reuses_it() {
        let upstream = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let (url, first, second) = remote(upstream.path());
        let source = KernelSource {
            repo: url.clone(),
            commit: first.clone(),
        };
        let got = checkout(&source, cache.path(), false, &|_| {}).unwrap();
        assert!(got.fetched);
        assert_eq!(
            std::fs::read_to_string(got.dir.join("Makefile")).unwrap(),
            "# v1\n"
        );
        // Shallow: the newer commit was not fetched along.
        let repo = got.dir.join(".git");
        assert!(repo.is_file(), "a worktree has a .git file");
        let again = checkout(&source, cache.path(), true, &|_| {}).unwrap();
        assert!(!again.fetched);
        assert_eq!(again.dir, got.dir);
        let identity = rrr_kernels::source::tree_identity(&got.dir).unwrap();
        assert_eq!(identity, format!("git:{first}"));

        // Offline, a commit never fetched is an error that says so.
        let other = KernelSource {
            repo: url,
            commit: second,
        };
        let err = checkout(&other, cache.path(), true, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("--offline"), "{err}");
        assert!(checkout(&other, cache.path(), false, &|_| {}).is_ok());
    }

    #[test]
    fn a_commit_missing_from_the_remote_is_named() {
        let upstream = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let (url, _, _) = remote(upstream.path());
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let source = KernelSource {
            repo: url.clone(),
            commit: missing.into(),
        };
        let err = checkout(&source, cache.path(), false, &|_| {}).unwrap_err();
        assert!(matches!(err, SyzbotError::CommitMissing { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(missing) && text.contains(&url), "{text}");
    }

    #[test]
    fn an_unreachable_remote_is_named() {
        let cache = tempfile::tempdir().unwrap();
        let source = KernelSource {
            repo: "file:///nonexistent/rrr-test/linux.git".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
        };
        let err = checkout(&source, cache.path(), false, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/rrr-test/linux.git"), "{err}");
    }
}
