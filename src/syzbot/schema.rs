//! The dashboard's bug JSON (`/bug?extid=...&json=1`), the choice of one crash, and the two
//! shapes of `kernel-source-git`.
//!
//! Unknown fields are ignored and missing ones default, so a dashboard that adds or drops a
//! field does not break rrr; what rrr needs is checked when a crash is picked.

use serde::{Deserialize, Serialize};

use super::error::SyzbotError;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Bug {
    pub version: u32,
    pub title: String,
    pub id: String,
    pub status: String,
    pub first_crash: String,
    pub last_crash: String,
    pub crashes: Vec<Crash>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Crash {
    pub title: String,
    pub syz_reproducer: String,
    pub c_reproducer: String,
    pub repro_opts: String,
    pub kernel_config: String,
    pub kernel_source_git: String,
    pub kernel_source_commit: String,
    pub syzkaller_git: String,
    pub syzkaller_commit: String,
    pub crash_report_link: String,
}

/// One crash, with everything rrr takes from it checked present.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Picked {
    pub index: usize,
    pub crash: Crash,
    pub source: KernelSource,
}

/// Where the kernel of a crash came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSource {
    pub repo: String,
    pub commit: String,
}

impl Bug {
    /// Crash `index`, or the first with a C reproducer.
    pub fn pick(&self, index: Option<usize>) -> Result<Picked, SyzbotError> {
        if self.crashes.is_empty() {
            return Err(SyzbotError::NoCrashes {
                title: self.title.clone(),
            });
        }
        let index = match index {
            Some(i) if i >= self.crashes.len() => {
                return Err(SyzbotError::CrashOutOfRange {
                    title: self.title.clone(),
                    index: i,
                    count: self.crashes.len(),
                })
            }
            Some(i) => i,
            None => self
                .crashes
                .iter()
                .position(|c| !c.c_reproducer.trim().is_empty())
                .ok_or_else(|| SyzbotError::NoCReproducer {
                    title: self.title.clone(),
                    crashes: self.crashes.len(),
                })?,
        };
        let crash = &self.crashes[index];
        let missing = |field| SyzbotError::MissingField {
            title: self.title.clone(),
            index,
            field,
        };
        if crash.c_reproducer.trim().is_empty() {
            return Err(missing("c-reproducer"));
        }
        if crash.kernel_config.trim().is_empty() {
            return Err(missing("kernel-config"));
        }
        if crash.kernel_source_git.trim().is_empty() {
            return Err(missing("kernel-source-git"));
        }
        let source = KernelSource::parse(&crash.kernel_source_git, &crash.kernel_source_commit)?;
        Ok(Picked {
            index,
            crash: crash.clone(),
            source,
        })
    }
}

impl KernelSource {
    /// `kernel-source-git` is a repository URL (since 2026-02-27) or, before, a commit-log link:
    /// `<repo>/log/?id=<hash>` (cgit, git.kernel.org) or `<repo>/commits/<hash>` (GitHub). The
    /// commit field wins when both name one: it is the dashboard's own record of the build.
    pub fn parse(link: &str, commit_field: &str) -> Result<KernelSource, SyzbotError> {
        let bad = || SyzbotError::BadSourceLink {
            link: link.to_owned(),
        };
        let link = unescape(link.trim());
        let (repo, linked) = if let Some((repo, query)) = link
            .split_once("/log/?")
            .or_else(|| link.split_once("/commit/?"))
        {
            let hash = query
                .split('&')
                .find_map(|p| p.strip_prefix("id="))
                .ok_or_else(bad)?;
            (repo.to_owned(), Some(hash.to_owned()))
        } else if let Some((repo, hash)) = link
            .split_once("/commits/")
            .or_else(|| link.split_once("/commit/"))
        {
            (repo.to_owned(), Some(hash.trim_end_matches('/').to_owned()))
        } else {
            (link.clone(), None)
        };
        let commit = match commit_field.trim() {
            "" => linked.ok_or_else(bad)?,
            c => c.to_owned(),
        };
        if repo.is_empty() || !is_commit(&commit) {
            return Err(bad());
        }
        Ok(KernelSource {
            repo: repo.trim_end_matches('/').to_owned(),
            commit: commit.to_ascii_lowercase(),
        })
    }
}

fn is_commit(s: &str) -> bool {
    (7..=40).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The dashboard's links are HTML-escaped (`&amp;`) and sometimes arrive JSON-escaped twice
/// (a literal `\u0026`).
pub fn unescape(link: &str) -> String {
    link.replace("\\u0026", "&")
        .replace("&amp;", "&")
        .replace("&#38;", "&")
}

/// An absolute URL for a dashboard link, relative (`/text?tag=ReproC&x=...`) or absolute.
pub fn resolve_link(base: &str, link: &str) -> String {
    let link = unescape(link.trim());
    if link.starts_with("http://") || link.starts_with("https://") {
        return link;
    }
    let base = base.trim_end_matches('/');
    if link.starts_with('/') {
        format!("{base}{link}")
    } else {
        format!("{base}/{link}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "ffa8a4b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7";

    #[test]
    fn both_shapes_of_kernel_source_git() {
        let cgit = format!(
            "https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git/log/?id={HASH}"
        );
        let want = KernelSource {
            repo: "https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git".into(),
            commit: HASH.into(),
        };
        assert_eq!(KernelSource::parse(&cgit, "").unwrap(), want);
        assert_eq!(KernelSource::parse(&cgit, HASH).unwrap(), want);
        let github = format!("https://github.com/google/kmsan/commits/{HASH}");
        assert_eq!(
            KernelSource::parse(&github, "").unwrap(),
            KernelSource {
                repo: "https://github.com/google/kmsan".into(),
                commit: HASH.into()
            }
        );
        let plain = "https://git.kernel.org/pub/scm/linux/kernel/git/netdev/net.git";
        assert_eq!(
            KernelSource::parse(plain, &HASH.to_uppercase()).unwrap(),
            KernelSource {
                repo: plain.into(),
                commit: HASH.into()
            }
        );
        // A repository URL alone does not say which commit.
        assert!(KernelSource::parse(plain, "").is_err());
        assert!(KernelSource::parse(&format!("{plain}/log/?h=master"), "").is_err());
    }

    #[test]
    fn links_are_relative_and_escaped() {
        assert_eq!(
            resolve_link("http://127.0.0.1:8080/", "/text?tag=ReproC&amp;x=1234abcd"),
            "http://127.0.0.1:8080/text?tag=ReproC&x=1234abcd"
        );
        assert_eq!(
            resolve_link(
                "https://syzkaller.appspot.com",
                "text?tag=KernelConfig\\u0026x=9"
            ),
            "https://syzkaller.appspot.com/text?tag=KernelConfig&x=9"
        );
        assert_eq!(
            resolve_link("https://m", "https://other/text?x=1"),
            "https://other/text?x=1"
        );
    }

    fn crash(c: &str) -> Crash {
        Crash {
            c_reproducer: c.into(),
            kernel_config: "/text?tag=KernelConfig&x=1".into(),
            kernel_source_git: "https://example/linux.git".into(),
            kernel_source_commit: HASH.into(),
            ..Crash::default()
        }
    }

    #[test]
    fn the_first_crash_with_a_c_reproducer_is_picked() {
        let bug = Bug {
            title: "WARNING in foo".into(),
            crashes: vec![crash(""), crash("/text?tag=ReproC&x=2"), crash("/x")],
            ..Bug::default()
        };
        assert_eq!(bug.pick(None).unwrap().index, 1);
        assert_eq!(bug.pick(Some(2)).unwrap().index, 2);
        let err = bug.pick(Some(0)).unwrap_err().to_string();
        assert!(
            err.contains("crash 0") && err.contains("c-reproducer"),
            "{err}"
        );
        let err = bug.pick(Some(3)).unwrap_err().to_string();
        assert!(err.contains("out of range"), "{err}");
        let none = Bug {
            title: "t".into(),
            crashes: vec![crash(""), crash(" ")],
            ..Bug::default()
        };
        let err = none.pick(None).unwrap_err().to_string();
        assert!(
            err.contains("no C reproducer in any of its 2 crashes"),
            "{err}"
        );
    }
}
