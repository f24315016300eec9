//! What the user typed to name a bug: an extid, a bug id, or a dashboard URL.
//!
//! syzbot has two keys for a bug: the extid (20 hex digits, in the `Reported-by` email) and the id
//! (40 hex, the hash of the title). A bare hex string could be either, so it is tried as an extid
//! first and as an id after, as the dashboard's own links would.

use super::error::SyzbotError;

/// A reference to one bug on the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BugRef {
    /// `bug?extid=`.
    Extid(String),
    /// `bug?id=`.
    Id(String),
    /// A bare key: tried as an extid, then as an id.
    Either(String),
}

impl BugRef {
    /// Parses an extid, an id, or a `bug?extid=` / `bug?id=` URL on any host (syzkaller.appspot.com,
    /// its alias syzbot.org, or a mirror). HTML-escaped query separators (`&amp;`) are accepted.
    pub fn parse(input: &str) -> Result<BugRef, SyzbotError> {
        let bad = || SyzbotError::BadReference {
            input: input.to_owned(),
        };
        let text = input.trim();
        if text.contains('/') || text.contains('?') || text.contains('=') {
            let query = text.split_once('?').map(|(_, q)| q).ok_or_else(bad)?;
            let query = query.replace("&amp;", "&").replace("\\u0026", "&");
            let query = query.split('#').next().unwrap_or("");
            for pair in query.split('&') {
                match pair.split_once('=') {
                    Some(("extid", value)) if is_key(value) => {
                        return Ok(BugRef::Extid(value.to_ascii_lowercase()))
                    }
                    Some(("id", value)) if is_key(value) => {
                        return Ok(BugRef::Id(value.to_ascii_lowercase()))
                    }
                    _ => {}
                }
            }
            return Err(bad());
        }
        if is_key(text) {
            Ok(BugRef::Either(text.to_ascii_lowercase()))
        } else {
            Err(bad())
        }
    }

    /// The key itself.
    pub fn key(&self) -> &str {
        match self {
            BugRef::Extid(k) | BugRef::Id(k) | BugRef::Either(k) => k,
        }
    }

    /// The JSON query paths to try, in order.
    pub fn queries(&self) -> Vec<String> {
        let extid = |k: &str| format!("/bug?extid={k}&json=1");
        let id = |k: &str| format!("/bug?id={k}&json=1");
        match self {
            BugRef::Extid(k) => vec![extid(k)],
            BugRef::Id(k) => vec![id(k)],
            BugRef::Either(k) => vec![extid(k), id(k)],
        }
    }
}

impl std::fmt::Display for BugRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BugRef::Extid(k) => write!(f, "extid={k}"),
            BugRef::Id(k) => write!(f, "id={k}"),
            BugRef::Either(k) => f.write_str(k),
        }
    }
}

/// syzbot keys are hex; the length bounds keep a typo'd word from being sent to the server.
fn is_key(s: &str) -> bool {
    (8..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_keys_are_tried_as_extid_then_id() {
        let r = BugRef::parse("60db9f652c92d5bacba4").unwrap();
        assert_eq!(r, BugRef::Either("60db9f652c92d5bacba4".into()));
        assert_eq!(
            r.queries(),
            [
                "/bug?extid=60db9f652c92d5bacba4&json=1",
                "/bug?id=60db9f652c92d5bacba4&json=1"
            ]
        );
    }

    #[test]
    fn urls_on_every_host_and_escaping() {
        let id = "1e4b3f2bd4b1fa0e5f1b7ad7f1c4bc5a4e0f9b1d";
        for (input, want) in [
            (
                "https://syzkaller.appspot.com/bug?extid=60db9f652c92d5bacba4",
                BugRef::Extid("60db9f652c92d5bacba4".into()),
            ),
            (
                "https://syzbot.org/bug?extid=60DB9F652C92D5BACBA4",
                BugRef::Extid("60db9f652c92d5bacba4".into()),
            ),
            (
                &format!("https://syzkaller.appspot.com/bug?id={id}"),
                BugRef::Id(id.into()),
            ),
            (
                &format!("syzkaller.appspot.com/bug?json=1&amp;id={id}"),
                BugRef::Id(id.into()),
            ),
            (&format!("bug?id={id}#crashes"), BugRef::Id(id.into())),
        ] {
            assert_eq!(BugRef::parse(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn nonsense_is_refused_with_the_forms_that_work() {
        for input in [
            "",
            "hello",
            "https://syzkaller.appspot.com/upstream",
            "bug?extid=zz",
            "12",
        ] {
            let err = BugRef::parse(input).unwrap_err().to_string();
            assert!(err.contains("is not a syzbot bug"), "{input}: {err}");
            assert!(err.contains("extid"), "{err}");
        }
    }
}
