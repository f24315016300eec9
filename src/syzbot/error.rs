//! Everything that can go wrong between a syzbot bug reference and a kernel tree, each naming what
//! it was working on (the URL, the repository, the commit) and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SyzbotError {
    #[error(
        "`{input}` is not a syzbot bug: pass an extid (e.g. 60db9f652c92d5bacba4), a 40-hex bug id, \
         or a dashboard URL (https://syzkaller.appspot.com/bug?extid=... or ?id=...)"
    )]
    BadReference { input: String },

    #[error("cannot reach {url}: {detail} (use --offline to work from the cache, or --syzbot-url for a mirror)")]
    Unreachable { url: String, detail: String },

    #[error("{url} answered HTTP {code} {reason}")]
    Status {
        url: String,
        code: u16,
        reason: String,
    },

    #[error(
        "{url} kept answering HTTP 429 (rate limited) after {attempts} attempts; try again later"
    )]
    RateLimited { url: String, attempts: u32 },

    #[error("the answer from {url} is not valid syzbot bug JSON: {source}")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{url} is not in the cache, and --offline forbids fetching it")]
    NotCached { url: String },

    #[error("syzbot has no bug {reference} (tried {tried})")]
    NoSuchBug { reference: String, tried: String },

    #[error("bug \"{title}\" has no crashes listed")]
    NoCrashes { title: String },

    #[error(
        "bug \"{title}\" has no C reproducer in any of its {crashes} crashes; rrr needs one \
         (pass --repro FILE with your own, or pick a crash with --crash N)"
    )]
    NoCReproducer { title: String, crashes: usize },

    #[error("bug \"{title}\" has {count} crashes; --crash {index} is out of range (0..{count})")]
    CrashOutOfRange {
        title: String,
        index: usize,
        count: usize,
    },

    #[error("crash {index} of bug \"{title}\" has no {field}")]
    MissingField {
        title: String,
        index: usize,
        field: &'static str,
    },

    #[error("kernel-source-git `{link}` names neither a repository nor a commit rrr understands")]
    BadSourceLink { link: String },

    #[error("commit {commit} is not in {repo} (git said: {detail})")]
    CommitMissing {
        repo: String,
        commit: String,
        detail: String,
    },

    #[error("`{command}` failed: {detail}")]
    Git { command: String, detail: String },

    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SyzbotError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SyzbotError::Io { path, source }
    }
}
