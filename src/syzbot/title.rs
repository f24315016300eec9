//! Does the crash we saw match the bug? Titles are compared as syzbot compares them: after its
//! dynamic-part replacements (syzkaller `pkg/report`: executor names, addresses, line numbers,
//! function offsets, CPU and other numbers become placeholders), its sanitising (control
//! characters dropped, spaces collapsed, 120 characters), and without the dashboard's ` (N)`
//! suffix for a bug that recurred after a fix.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// How a crash title relates to the bug's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TitleMatch {
    /// The same title after normalisation.
    Same,
    /// The same bug class and function, another access kind (syzbot's alternative titles:
    /// a KASAN `Read` for a `Write`, `slab-use-after-free` for `use-after-free`).
    Similar,
    Different,
}

struct Replacement {
    re: Regex,
    with: &'static str,
}

static REPLACEMENTS: LazyLock<Vec<Replacement>> = LazyLock::new(|| {
    let r = |re: &str, with| Replacement {
        re: Regex::new(re).expect("static regex"),
        with,
    };
    vec![
        r(r"syz-executor\.?[0-9]+((/|:)[0-9]+)?", "syz-executor"),
        r(r"syzkaller[0-9]+((/|:)[0-9]+)?", "syzkaller"),
        r(r"([^a-zA-Z0-9])(?:0x)?[0-9a-f]{6,}", "${1}ADDR"),
        r(r"([0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})", "IP"),
        r(r"(\.\w+)(:[0-9]+)+", "${1}:LINE"),
        r(r"([a-zA-Z][a-zA-Z0-9_.]+)\+0x[0-9a-z]+/0x[0-9a-z]+", "${1}"),
        r(r"CPU#[0-9]+", "CPU"),
        r(r"(\W)(\d+)(\W|$)", "${1}NUM${3}"),
        r(r"(\d+){7,}", "NUM"),
    ]
});

static RECURRENCE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r" \([0-9]+\)$").expect("static regex"));

/// `title` as syzbot would file it.
pub fn normalize(title: &str) -> String {
    let mut text = title.trim().to_owned();
    text = RECURRENCE.replace(&text, "").into_owned();
    for rep in REPLACEMENTS.iter() {
        // Matches can overlap ("0,1,2"): repeat until nothing changes, as syzkaller does.
        loop {
            let next = rep.re.replace_all(&text, rep.with).into_owned();
            if next == text {
                break;
            }
            text = next;
        }
    }
    sanitize(&text)
}

fn sanitize(title: &str) -> String {
    let mut out = String::with_capacity(title.len());
    let mut prev = ' ';
    for ch in title.chars().take(120) {
        let ch = if ch == '\t' { ' ' } else { ch };
        if (ch as u32) < 0x20 || (ch as u32) >= 0x7f {
            continue;
        }
        if ch == ' ' && prev == ' ' {
            continue;
        }
        out.push(ch);
        prev = ch;
    }
    out.trim().to_owned()
}

/// The title with its access kind folded, for [`TitleMatch::Similar`].
fn fold(title: &str) -> String {
    title
        .replace("slab-use-after-free", "use-after-free")
        .replace("vmalloc-out-of-bounds", "out-of-bounds")
        .replace("slab-out-of-bounds", "out-of-bounds")
        .replace("global-out-of-bounds", "out-of-bounds")
        .replace("stack-out-of-bounds", "out-of-bounds")
        .replace(" Read in ", " in ")
        .replace(" Write in ", " in ")
        .replace(" Read ", " ")
        .replace(" Write ", " ")
}

pub fn compare(bug_title: &str, seen: &str) -> TitleMatch {
    let (a, b) = (normalize(bug_title), normalize(seen));
    if a == b {
        TitleMatch::Same
    } else if fold(&a) == fold(&b) {
        TitleMatch::Similar
    } else {
        TitleMatch::Different
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_parts_are_replaced_as_syzkaller_does() {
        assert_eq!(
            normalize("INFO: task hung in syz-executor.3:4321"),
            "INFO: task hung in syz-executor"
        );
        assert_eq!(
            normalize("BUG: unable to handle kernel paging request at ffffffffa0001234"),
            "BUG: unable to handle kernel paging request at ADDR"
        );
        assert_eq!(
            normalize("WARNING in ip6_fragment+0x1052/0x2d80"),
            "WARNING in ip6_fragment"
        );
        assert_eq!(
            normalize("kernel BUG at fs/ext4/inode.c:2745!"),
            "kernel BUG at fs/ext4/inode.c:LINE!"
        );
        assert_eq!(
            normalize("BUG: soft lockup - CPU#1  stuck for 22s!"),
            "BUG: soft lockup - CPU stuck for 22s!"
        );
        // Digits inside names survive.
        assert_eq!(
            normalize("WARNING in cfg80211_connect"),
            "WARNING in cfg80211_connect"
        );
    }

    #[test]
    fn the_recurrence_suffix_is_not_part_of_the_bug() {
        assert_eq!(
            compare(
                "WARNING in ext4_fill_super (2)",
                "WARNING in ext4_fill_super"
            ),
            TitleMatch::Same
        );
    }

    #[test]
    fn access_kinds_make_a_similar_title() {
        assert_eq!(
            compare(
                "KASAN: slab-use-after-free Read in hci_conn_del",
                "KASAN: use-after-free Write in hci_conn_del"
            ),
            TitleMatch::Similar
        );
        assert_eq!(
            compare(
                "KASAN: use-after-free Read in foo",
                "KASAN: use-after-free Read in bar"
            ),
            TitleMatch::Different
        );
        assert_eq!(
            compare("WARNING in foo", "general protection fault in foo"),
            TitleMatch::Different
        );
    }
}
