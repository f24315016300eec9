//! The dashboard client: blocking HTTP with a disk cache and syzbot's rate limit respected.
//!
//! Every answer that rrr used is kept under `<cache>/syzbot/http/`, named by the SHA-256 of its
//! URL: texts (`/text?tag=...&x=<hash>`) never change, and a bug's JSON is reused too, so a rerun
//! or `--offline` needs no network (`--refresh` fetches the bug again).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::bugref::BugRef;
use super::error::SyzbotError;
use super::schema::{resolve_link, Bug};

pub const DEFAULT_BASE: &str = "https://syzkaller.appspot.com";

/// How long to wait on HTTP 429.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Requests in all, the first included.
    pub attempts: u32,
    /// The wait after the first 429 when the server gives no `Retry-After`; doubled each time.
    pub first_wait: Duration,
    /// No single wait is longer, whatever `Retry-After` says.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_wait: Duration::from_secs(2),
            max_wait: Duration::from_secs(120),
        }
    }
}

pub struct Client {
    base: String,
    cache: PathBuf,
    offline: bool,
    refresh: bool,
    retry: RetryPolicy,
    agent: ureq::Agent,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Network,
    Cache,
}

impl Client {
    /// A client for the dashboard at `base`, caching under `cache_dir/syzbot/http`.
    pub fn new(base: &str, cache_dir: &Path) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            cache: cache_dir.join("syzbot").join("http"),
            offline: false,
            refresh: false,
            retry: RetryPolicy::default(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(20))
                .timeout(Duration::from_secs(120))
                .user_agent(concat!("rrr/", env!("CARGO_PKG_VERSION")))
                .build(),
        }
    }

    /// Never touch the network: answers come from the cache or not at all.
    pub fn offline(mut self, offline: bool) -> Client {
        self.offline = offline;
        self
    }

    /// Fetch the bug's JSON again even when it is cached (texts are immutable and stay cached).
    pub fn refresh(mut self, refresh: bool) -> Client {
        self.refresh = refresh;
        self
    }

    #[cfg(test)]
    pub fn retry(mut self, retry: RetryPolicy) -> Client {
        self.retry = retry;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The bug's JSON: `extid=` first, then `id=` for a bare key. Returns the URL that answered.
    pub fn bug(&self, reference: &BugRef) -> Result<(Bug, String, Origin), SyzbotError> {
        let mut tried = Vec::new();
        for query in reference.queries() {
            let url = format!("{}{query}", self.base);
            let (body, origin) = match self.get(&url, !self.refresh) {
                Ok(found) => found,
                Err(SyzbotError::Status { code: 404, .. }) => {
                    tried.push(url);
                    continue;
                }
                // Offline, a bare key may have been cached under its other form.
                Err(SyzbotError::NotCached { .. }) => {
                    tried.push(url);
                    continue;
                }
                Err(err) => return Err(err),
            };
            let bug: Bug = serde_json::from_slice(&body).map_err(|source| {
                // A bad answer must not be served again from the cache.
                let _ = std::fs::remove_file(self.cache_path(&url));
                SyzbotError::Json {
                    url: url.clone(),
                    source,
                }
            })?;
            return Ok((bug, url, origin));
        }
        if self.offline {
            return Err(SyzbotError::NotCached {
                url: tried.join(", "),
            });
        }
        Err(SyzbotError::NoSuchBug {
            reference: reference.to_string(),
            tried: tried.join(", "),
        })
    }

    /// A dashboard text (reproducer, config, report) by its link as the JSON gives it.
    pub fn text(&self, link: &str) -> Result<(String, String, Origin), SyzbotError> {
        let url = resolve_link(&self.base, link);
        let (body, origin) = self.get(&url, true)?;
        Ok((String::from_utf8_lossy(&body).into_owned(), url, origin))
    }

    fn cache_path(&self, url: &str) -> PathBuf {
        self.cache.join(hex::encode(Sha256::digest(url.as_bytes())))
    }

    /// `url`'s body, from the cache when allowed and present, else from the network (and then
    /// cached).
    fn get(&self, url: &str, use_cache: bool) -> Result<(Vec<u8>, Origin), SyzbotError> {
        let path = self.cache_path(url);
        if use_cache || self.offline {
            if let Ok(body) = std::fs::read(&path) {
                tracing::debug!(url, "syzbot answer from the cache");
                return Ok((body, Origin::Cache));
            }
        }
        if self.offline {
            return Err(SyzbotError::NotCached {
                url: url.to_owned(),
            });
        }
        let body = self.fetch(url)?;
        std::fs::create_dir_all(&self.cache).map_err(SyzbotError::io(&self.cache))?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        std::fs::write(&tmp, &body).map_err(SyzbotError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(SyzbotError::io(&path))?;
        // The URL beside the body, so a person can tell what a cache file is.
        let _ = std::fs::write(path.with_extension("url"), format!("{url}\n"));
        Ok((body, Origin::Network))
    }

    /// One GET, repeated while the server answers 429.
    fn fetch(&self, url: &str) -> Result<Vec<u8>, SyzbotError> {
        let mut backoff = self.retry.first_wait;
        for attempt in 1..=self.retry.attempts {
            tracing::info!(url, attempt, "GET");
            match self.agent.get(url).call() {
                Ok(response) => {
                    let mut body = Vec::new();
                    response
                        .into_reader()
                        .take(64 << 20)
                        .read_to_end(&mut body)
                        .map_err(|err| SyzbotError::Unreachable {
                            url: url.to_owned(),
                            detail: format!("the answer broke off: {err}"),
                        })?;
                    return Ok(body);
                }
                Err(ureq::Error::Status(429, response)) => {
                    if attempt == self.retry.attempts {
                        break;
                    }
                    let asked = response
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let wait = asked.unwrap_or(backoff).min(self.retry.max_wait);
                    tracing::warn!(
                        "{url}: rate limited (HTTP 429), waiting {:.0?} before attempt {}",
                        wait,
                        attempt + 1
                    );
                    std::thread::sleep(wait);
                    backoff = (backoff * 2).min(self.retry.max_wait);
                }
                Err(ureq::Error::Status(code, response)) => {
                    return Err(SyzbotError::Status {
                        url: url.to_owned(),
                        code,
                        reason: response.status_text().to_owned(),
                    })
                }
                Err(ureq::Error::Transport(transport)) => {
                    // Not `to_string()`: ureq repeats the URL there, and ours already names it.
                    let mut detail = transport.kind().to_string();
                    if let Some(message) = transport.message() {
                        detail.push_str(&format!(": {message}"));
                    }
                    if let Some(source) = std::error::Error::source(&transport) {
                        detail.push_str(&format!(": {source}"));
                    }
                    return Err(SyzbotError::Unreachable {
                        url: url.to_owned(),
                        detail,
                    });
                }
            }
        }
        Err(SyzbotError::RateLimited {
            url: url.to_owned(),
            attempts: self.retry.attempts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use crate::syzbot::test_server::{Answer, Server};

    const EXTID: &str = "60db9f652c92d5bacba4";
    const ID: &str = "1e4b3f2bd4b1fa0e5f1b7ad7f1c4bc5a4e0f9b1d";

    fn bug_json(title: &str) -> String {
        serde_json::json!({
            "version": 1,
            "title": title,
            "id": ID,
            "crashes": [{
                "title": title,
                "c-reproducer": "/text?tag=ReproC\u{26}amp;x=abc",
                "kernel-config": "/text?tag=KernelConfig&x=def",
                "kernel-source-git": "https://example.org/linux.git",
                "kernel-source-commit": "0123456789abcdef0123456789abcdef01234567",
            }]
        })
        .to_string()
    }

    fn client(server: &Server, cache: &Path) -> Client {
        Client::new(&server.base, cache).retry(RetryPolicy {
            attempts: 3,
            first_wait: Duration::from_millis(10),
            max_wait: Duration::from_secs(5),
        })
    }

    #[test]
    fn bug_and_texts_are_fetched_once_then_cached() {
        let server = Server::start();
        let cache = tempfile::tempdir().unwrap();
        let query = format!("/bug?extid={EXTID}&json=1");
        server.route(&query, vec![Answer::ok(bug_json("WARNING in foo"))]);
        server.route("/text?tag=ReproC&x=abc", vec![Answer::ok("int main(){}")]);
        let c = client(&server, cache.path());
        let (bug, url, origin) = c.bug(&BugRef::parse(EXTID).unwrap()).unwrap();
        assert_eq!(bug.title, "WARNING in foo");
        assert_eq!(url, format!("{}{query}", server.base));
        assert_eq!(origin, Origin::Network);
        let (text, _, _) = c.text(&bug.crashes[0].c_reproducer).unwrap();
        assert_eq!(text, "int main(){}");

        let (_, _, origin) = c.bug(&BugRef::parse(EXTID).unwrap()).unwrap();
        assert_eq!(origin, Origin::Cache);
        assert_eq!(server.hits(&query), 1);
        let offline = client(&server, cache.path()).offline(true);
        assert!(offline.text("/text?tag=ReproC&amp;x=abc").is_ok());
        let err = offline
            .text("/text?tag=ReproC&x=zzz")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/text?tag=ReproC&x=zzz") && err.contains("--offline"),
            "{err}"
        );
        let (_, _, origin) = client(&server, cache.path())
            .refresh(true)
            .bug(&BugRef::parse(EXTID).unwrap())
            .unwrap();
        assert_eq!(origin, Origin::Network);
        assert_eq!(server.hits(&query), 2);
    }

    #[test]
    fn a_bare_key_falls_back_from_extid_to_id() {
        let server = Server::start();
        let cache = tempfile::tempdir().unwrap();
        server.route(
            &format!("/bug?id={ID}&json=1"),
            vec![Answer::ok(bug_json("KASAN: use-after-free Read in bar"))],
        );
        let c = client(&server, cache.path());
        let (bug, url, _) = c.bug(&BugRef::parse(ID).unwrap()).unwrap();
        assert!(url.contains("?id="), "{url}");
        assert_eq!(bug.title, "KASAN: use-after-free Read in bar");
        assert_eq!(server.hits(&format!("/bug?extid={ID}&json=1")), 1);

        let err = c
            .bug(&BugRef::parse("aaaaaaaaaaaaaaaaaaaa").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no bug") && err.contains("extid=aaaa"),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_names_the_url_and_is_not_cached() {
        let server = Server::start();
        let cache = tempfile::tempdir().unwrap();
        let query = format!("/bug?extid={EXTID}&json=1");
        server.route(
            &query,
            vec![
                Answer::ok("<html>oops</html>"),
                Answer::ok(bug_json("WARNING in foo")),
            ],
        );
        let c = client(&server, cache.path());
        let err = c.bug(&BugRef::Extid(EXTID.into())).unwrap_err();
        assert!(matches!(err, SyzbotError::Json { .. }), "{err}");
        assert!(err.to_string().contains(&query), "{err}");
        // The bad answer was dropped, so the next call asks again.
        assert!(c.bug(&BugRef::Extid(EXTID.into())).is_ok());
        assert_eq!(server.hits(&query), 2);
    }

    #[test]
    fn retry_after_is_respected() {
        let server = Server::start();
        let cache = tempfile::tempdir().unwrap();
        server.route(
            "/text?x=1",
            vec![
                Answer::status(429).header("Retry-After", "1"),
                Answer::ok("config"),
            ],
        );
        let started = Instant::now();
        let (text, _, _) = client(&server, cache.path()).text("/text?x=1").unwrap();
        assert_eq!(text, "config");
        assert!(started.elapsed() >= Duration::from_secs(1), "did not wait");
        assert_eq!(server.hits("/text?x=1"), 2);
    }

    #[test]
    fn endless_429_gives_up_naming_the_url() {
        let server = Server::start();
        let cache = tempfile::tempdir().unwrap();
        server.route("/text?x=2", vec![Answer::status(429)]);
        let err = client(&server, cache.path()).text("/text?x=2").unwrap_err();
        assert!(
            matches!(err, SyzbotError::RateLimited { attempts: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/text?x=2"), "{err}");
        assert_eq!(server.hits("/text?x=2"), 3);
    }

    #[test]
    fn an_unreachable_server_is_named() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = tempfile::tempdir().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let err = Client::new(&base, cache.path())
            .bug(&BugRef::Extid(EXTID.into()))
            .unwrap_err();
        assert!(matches!(err, SyzbotError::Unreachable { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("{base}/bug?extid={EXTID}&json=1")),
            "{text}"
        );
    }
}
