//! From syzbot's kernel config to the one rrr builds: rrr's needs added, and what slows a run
//! but the bug does not need removed.
//!
//! The decision reads the evidence a user would: the bug's title, the crash report, the
//! reproducer (it names the devices it opens) and, for a `WARNING`, the kernel source line that
//! warned (a `lockdep_assert_held()` there needs lockdep). Only options the base config sets are
//! turned off, each with its reason, so the list printed is exactly what changed.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;
use rrr_kernels::config::{parse, Value};

/// What the decision is made from.
#[derive(Debug, Clone, Default)]
pub struct Evidence<'a> {
    pub title: &'a str,
    pub report: &'a str,
    pub repro: &'a str,
    /// The source line of the report's `WARNING: ... at FILE:LINE`, when the tree has it.
    pub warning_site: Option<String>,
}

impl<'a> Evidence<'a> {
    pub fn new(title: &'a str, report: &'a str, repro: &'a str) -> Evidence<'a> {
        Evidence {
            title,
            report,
            repro,
            warning_site: None,
        }
    }

    /// Reads the line the report's `WARNING` points at from the kernel tree `source`.
    pub fn with_source(mut self, source: &Path) -> Evidence<'a> {
        self.warning_site = warning_site(self.report).and_then(|(file, line)| {
            let text = std::fs::read_to_string(source.join(file)).ok()?;
            text.lines().nth(line.checked_sub(1)?).map(str::to_owned)
        });
        self
    }

    fn title_starts(&self, prefixes: &[&str]) -> bool {
        prefixes.iter().any(|p| self.title.starts_with(p))
    }

    fn any_text_contains(&self, needles: &[&str]) -> bool {
        let haystack = format!("{}\n{}\n{}", self.title, self.report, self.repro).to_lowercase();
        needles.iter().any(|n| haystack.contains(n))
    }
}

static WARNING_AT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"WARNING: CPU: \d+ PID: \d+ at ([A-Za-z0-9_\-./]+):(\d+)").expect("static regex")
});

/// `(file, line)` of the first `WARNING: CPU: N PID: N at file:line` in a report.
pub fn warning_site(report: &str) -> Option<(String, usize)> {
    let caps = WARNING_AT.captures(report)?;
    Some((caps[1].to_owned(), caps[2].parse().ok()?))
}

/// Titles of lockdep's own reports (kernel/locking/lockdep.c and RCU's lockdep checks).
const LOCKDEP_TITLES: &[&str] = &[
    "possible deadlock",
    "inconsistent lock state",
    "possible circular locking",
    "possible recursive locking",
    "possible irq lock inversion",
    "suspicious RCU usage",
    "bad unlock balance",
    "held lock freed",
    "trying to register non-static key",
    "lock held when returning to user space",
    "lock held at task exit time",
    "MAX_LOCKDEP",
    "looking up invalid subclass",
    "bad contention detected",
    "lockdep",
];

fn needs_lockdep(e: &Evidence) -> bool {
    LOCKDEP_TITLES.iter().any(|t| e.title.contains(t))
        || e.report.contains("lockdep_assert")
        || e.report.contains("include/linux/lockdep.h")
        || e.report.contains("lockdep_is_held")
        || e.warning_site
            .as_deref()
            .is_some_and(|l| l.contains("lockdep"))
}

/// One group of options turned off together unless the evidence says the bug needs them.
struct Rule {
    what: &'static str,
    /// Top-level switches: turning these off drops the rest through Kconfig.
    options: &'static [&'static str],
    needed: fn(&Evidence) -> bool,
}

const RULES: &[Rule] = &[
    Rule {
        what: "KASAN",
        options: &["KASAN"],
        // A general protection fault on a KASAN kernel hits KASAN's shadow first: without
        // KASAN the same bug is titled `BUG: kernel NULL pointer dereference`.
        needed: |e| {
            e.title_starts(&["KASAN:"])
                || e.report.contains("BUG: KASAN:")
                || e.report.contains("KASAN: null-ptr-deref")
                || e.report.contains("KASAN: maybe wild-memory-access")
                || e.report.contains("KASAN: probably user-memory-access")
        },
    },
    Rule {
        what: "KMSAN",
        options: &["KMSAN"],
        needed: |e| e.title_starts(&["KMSAN:"]) || e.report.contains("BUG: KMSAN:"),
    },
    Rule {
        what: "KCSAN",
        options: &["KCSAN"],
        needed: |e| e.title_starts(&["KCSAN:"]) || e.report.contains("BUG: KCSAN:"),
    },
    Rule {
        what: "KFENCE",
        options: &["KFENCE"],
        needed: |e| e.title_starts(&["KFENCE:"]) || e.report.contains("BUG: KFENCE:"),
    },
    Rule {
        what: "UBSAN",
        options: &["UBSAN"],
        needed: |e| e.title_starts(&["UBSAN:"]) || e.report.contains("UBSAN:"),
    },
    Rule {
        what: "kmemleak",
        options: &["DEBUG_KMEMLEAK"],
        needed: |e| e.title_starts(&["memory leak in"]) || e.report.contains("kmemleak"),
    },
    Rule {
        what: "lockdep",
        options: &[
            "PROVE_LOCKING",
            "DEBUG_LOCK_ALLOC",
            "LOCK_STAT",
            "DEBUG_LOCKDEP",
            "PROVE_RAW_LOCK_NESTING",
            "DEBUG_WW_MUTEX_SLOWPATH",
        ],
        needed: needs_lockdep,
    },
    Rule {
        what: "the hung-task detector",
        options: &["DETECT_HUNG_TASK", "BOOTPARAM_HUNG_TASK_PANIC"],
        needed: |e| {
            e.title_starts(&["INFO: task hung", "INFO: task can't die"])
                || e.report.contains("blocked for more than")
        },
    },
    Rule {
        what: "USB",
        options: &["USB_SUPPORT"],
        needed: |e| e.any_text_contains(&["usb", "hid_", "hidraw", "uhid", "gadget"]),
    },
    Rule {
        what: "sound",
        options: &["SOUND"],
        needed: |e| e.any_text_contains(&["snd_", "sound/", "/dev/snd", "alsa"]),
    },
    Rule {
        what: "wireless (cfg80211, mac80211)",
        options: &["WLAN", "CFG80211", "MAC80211"],
        needed: |e| e.any_text_contains(&["80211", "wiphy", "hwsim", "wlan", "wifi"]),
    },
    Rule {
        what: "Bluetooth",
        options: &["BT"],
        needed: |e| {
            e.any_text_contains(&[
                "bluetooth",
                "hci_",
                "l2cap",
                "rfcomm",
                "vhci",
                "hidp",
                "bnep",
            ])
        },
    },
    Rule {
        what: "DRM (graphics)",
        options: &["DRM"],
        needed: |e| e.any_text_contains(&["drm_", "/dev/dri", "drivers/gpu"]),
    },
    Rule {
        what: "media (V4L, DVB)",
        options: &["MEDIA_SUPPORT"],
        needed: |e| {
            e.any_text_contains(&[
                "media_",
                "drivers/media",
                "v4l",
                "vb2_",
                "dvb",
                "vivid",
                "/dev/video",
            ])
        },
    },
    Rule {
        what: "NFC",
        options: &["NFC"],
        needed: |e| e.any_text_contains(&["nfc"]),
    },
];

/// One option that differs from syzbot's config, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub option: String,
    pub from: Value,
    pub to: Value,
    pub why: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CONFIG_{}: {} -> {} ({})",
            self.option, self.from, self.to, self.why
        )
    }
}

/// syzbot's config made rrr's.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The base config with the removals applied (rrr's additions are fragments, merged after).
    pub base: String,
    /// The fragments merged over it, besides `rrr-required.config` (the kernels crate adds that).
    pub fragments: Vec<&'static str>,
    pub removed: Vec<Change>,
    pub added: Vec<Change>,
    /// What the evidence said each group is kept for.
    pub kept: Vec<String>,
    /// The config was made by clang (`CONFIG_CC_IS_CLANG=y`).
    pub clang: bool,
}

impl Plan {
    /// A readable list of every change, one per line.
    pub fn changes_text(&self) -> String {
        let mut out = String::new();
        for c in self.added.iter().chain(&self.removed) {
            out.push_str(&format!("{c}\n"));
        }
        for k in &self.kept {
            out.push_str(&format!("kept: {k}\n"));
        }
        out
    }
}

/// Plans the config for a bug. `reduce: false` (`--keep-config`) only adds rrr's needs.
pub fn plan(syzbot_config: &str, evidence: &Evidence, reduce: bool) -> Plan {
    let base = parse(syzbot_config);
    let is_on = |name: &str| matches!(base.get(name), Some(Value::Set(v)) if v != "n");
    let mut off = BTreeSet::new();
    let mut removed = Vec::new();
    let mut kept = Vec::new();
    if reduce {
        for rule in RULES {
            let present: Vec<&str> = rule.options.iter().copied().filter(|o| is_on(o)).collect();
            if present.is_empty() {
                continue;
            }
            if (rule.needed)(evidence) {
                kept.push(format!("{} (the bug needs it)", rule.what));
                continue;
            }
            for option in present {
                off.insert(option);
                removed.push(Change {
                    option: option.to_owned(),
                    from: base[option].clone(),
                    to: Value::NotSet,
                    why: format!("{} slows the run and this bug does not need it", rule.what),
                });
            }
        }
    }
    let mut text = String::with_capacity(syzbot_config.len());
    for line in syzbot_config.lines() {
        let name = line
            .strip_prefix("CONFIG_")
            .and_then(|rest| rest.split_once('='))
            .map(|(name, _)| name);
        match name {
            Some(name) if off.contains(name) => {
                text.push_str(&format!("# CONFIG_{name} is not set\n"))
            }
            _ => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }

    let fragments = vec![rrr_kernels::fragments::SYZBOT];
    let mut added = Vec::new();
    let wanted = parse(&format!(
        "{}\n{}",
        rrr_kernels::fragments::REQUIRED,
        rrr_kernels::fragments::SYZBOT
    ));
    for (name, want) in &wanted {
        let had = base.get(name).cloned().unwrap_or(Value::NotSet);
        if had != *want {
            added.push(Change {
                option: name.clone(),
                from: had,
                to: want.clone(),
                why: "rrr needs it".into(),
            });
        }
    }
    Plan {
        base: text,
        fragments,
        removed,
        added,
        kept,
        clang: is_on("CC_IS_CLANG"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options of a syzbot upstream config that the rules look at (an excerpt).
    const SYZBOT_CONFIG: &str = "\
CONFIG_CC_VERSION_TEXT=\"gcc (Debian 12.2.0-14) 12.2.0\"
CONFIG_CC_IS_GCC=y
CONFIG_KASAN=y
CONFIG_KASAN_GENERIC=y
CONFIG_KASAN_INLINE=y
CONFIG_KFENCE=y
CONFIG_UBSAN=y
CONFIG_UBSAN_BOUNDS=y
CONFIG_PROVE_LOCKING=y
CONFIG_DEBUG_LOCK_ALLOC=y
CONFIG_LOCKDEP=y
CONFIG_DETECT_HUNG_TASK=y
CONFIG_DEFAULT_HUNG_TASK_TIMEOUT=140
CONFIG_BOOTPARAM_HUNG_TASK_PANIC=y
CONFIG_USB_SUPPORT=y
CONFIG_USB_RAW_GADGET=y
CONFIG_SOUND=y
CONFIG_BT=y
CONFIG_WLAN=y
CONFIG_CFG80211=y
CONFIG_MAC80211=y
CONFIG_DRM=y
CONFIG_MEDIA_SUPPORT=y
CONFIG_NFC=y
# CONFIG_KMSAN is not set
CONFIG_KCOV=y
CONFIG_KCOV_INSTRUMENT_ALL=y
CONFIG_KVM_GUEST=y
";

    const KASAN_UAF: &str = "\
==================================================================
BUG: KASAN: slab-use-after-free in hci_conn_del+0x6f4/0x730 net/bluetooth/hci_conn.c:1153
Read of size 8 at addr ffff88807b1c8a18 by task kworker/u5:2/5103

CPU: 0 PID: 5103 Comm: kworker/u5:2 Not tainted 6.7.0-rc1-syzkaller #0
Workqueue: hci0 hci_power_off
Call Trace:
 <TASK>
 __dump_stack lib/dump_stack.c:88 [inline]
 dump_stack_lvl+0xd9/0x1b0 lib/dump_stack.c:106
 print_report+0xc4/0x620 mm/kasan/report.c:475
 kasan_report+0xda/0x110 mm/kasan/report.c:588
 hci_conn_del+0x6f4/0x730 net/bluetooth/hci_conn.c:1153
 hci_conn_hash_flush+0x18c/0x260 net/bluetooth/hci_conn.c:2581
 hci_dev_close_sync+0x5b2/0x1140 net/bluetooth/hci_sync.c:5021
 process_one_work+0x884/0x15c0 kernel/workqueue.c:2630
 lock_acquire+0x1ae/0x520 kernel/locking/lockdep.c:5753
 </TASK>
";

    const WARNING: &str = "\
------------[ cut here ]------------
WARNING: CPU: 1 PID: 5071 at fs/ext4/inode.c:3 ext4_write_inode+0x4f8/0x5c0 fs/ext4/inode.c:3
Modules linked in:
CPU: 1 PID: 5071 Comm: syz-executor.2 Not tainted 6.8.0-syzkaller-05271-gf99c5f563c17 #0
RIP: 0010:ext4_write_inode+0x4f8/0x5c0 fs/ext4/inode.c:3
Call Trace:
 <TASK>
 write_inode fs/fs-writeback.c:1498 [inline]
 __writeback_single_inode+0x9f3/0xdd0 fs/fs-writeback.c:1715
 </TASK>
";

    const LOCKDEP: &str = "\
======================================================
WARNING: possible circular locking dependency detected
6.9.0-rc4-syzkaller #0 Not tainted
------------------------------------------------------
syz-executor.0/5093 is trying to acquire lock:
ffff88802a5b4958 (&ei->xattr_sem){++++}-{3:3}, at: ext4_xattr_set_handle+0x15c/0x1530 fs/ext4/xattr.c:2366

but task is already holding lock:
ffff88802a5b4c20 (&ea_inode->i_rwsem#8/1){+.+.}-{3:3}, at: inode_lock include/linux/fs.h:795 [inline]
 -> #1 (&ea_inode->i_rwsem#8/1){+.+.}-{3:3}:
       lock_acquire+0x1b1/0x560 kernel/locking/lockdep.c:5754
       down_write+0x3a/0x50 kernel/locking/rwsem.c:1579
";

    const HUNG: &str = "\
INFO: task syz-executor.0:5102 blocked for more than 143 seconds.
      Not tainted 6.6.0-rc7-syzkaller-00142-g888cf78c29e2 #0
\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.
task:syz-executor.0  state:D stack:26512 pid:5102  ppid:5067   flags:0x00004006
Call Trace:
 <TASK>
 context_switch kernel/sched/core.c:5382 [inline]
 __schedule+0xee1/0x59f0 kernel/sched/core.c:6695
 __flush_work+0x5c6/0xa10 kernel/workqueue.c:3410
";

    const GPF: &str = "\
general protection fault, probably for non-canonical address 0xdffffc0000000003: 0000 [#1] PREEMPT SMP KASAN
KASAN: null-ptr-deref in range [0x0000000000000018-0x000000000000001f]
CPU: 0 PID: 5087 Comm: syz-executor187 Not tainted 6.5.0-syzkaller #0
RIP: 0010:usb_gadget_udc_reset+0x2c/0xa0 drivers/usb/gadget/udc/core.c:1132
Call Trace:
 <TASK>
 raw_ioctl+0x1f4/0x2c0 drivers/usb/gadget/legacy/raw_gadget.c:1287
";

    fn removed(plan: &Plan) -> Vec<&str> {
        plan.removed.iter().map(|c| c.option.as_str()).collect()
    }

    #[test]
    fn kasan_use_after_free_keeps_kasan_and_bluetooth() {
        let e = Evidence::new(
            "KASAN: slab-use-after-free Read in hci_conn_del",
            KASAN_UAF,
            "",
        );
        let plan = plan(SYZBOT_CONFIG, &e, true);
        let gone = removed(&plan);
        assert!(
            !gone.contains(&"KASAN") && !gone.contains(&"BT"),
            "{gone:?}"
        );
        for option in [
            "KFENCE",
            "UBSAN",
            "PROVE_LOCKING",
            "DETECT_HUNG_TASK",
            "USB_SUPPORT",
            "SOUND",
            "MAC80211",
            "DRM",
            "MEDIA_SUPPORT",
            "NFC",
        ] {
            assert!(gone.contains(&option), "{option} kept: {gone:?}");
        }
        assert!(plan.base.contains("# CONFIG_PROVE_LOCKING is not set\n"));
        assert!(plan.base.contains("CONFIG_KASAN=y\n"));
        // Options below a switch are left to Kconfig.
        assert!(plan.base.contains("CONFIG_KASAN_INLINE=y\n"));
        assert!(!plan.clang);
    }

    #[test]
    fn a_plain_warning_loses_kasan_and_lockdep() {
        let e = Evidence::new("WARNING in ext4_write_inode", WARNING, "");
        let gone = removed(&plan(SYZBOT_CONFIG, &e, true)).join(" ");
        for option in [
            "KASAN",
            "PROVE_LOCKING",
            "DEBUG_LOCK_ALLOC",
            "DETECT_HUNG_TASK",
            "USB_SUPPORT",
        ] {
            assert!(
                gone.split(' ').any(|o| o == option),
                "{option} kept: {gone}"
            );
        }
    }

    #[test]
    fn a_warning_from_lockdep_assert_keeps_lockdep() {
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("fs/ext4")).unwrap();
        let file = tree.path().join("fs/ext4/inode.c");
        std::fs::write(
            &file,
            "int f(void)\n{\n\tlockdep_assert_held(&ei->i_data_sem);\n",
        )
        .unwrap();
        let e = Evidence::new("WARNING in ext4_write_inode", WARNING, "").with_source(tree.path());
        assert_eq!(
            e.warning_site.as_deref(),
            Some("\tlockdep_assert_held(&ei->i_data_sem);")
        );
        let plan = plan(SYZBOT_CONFIG, &e, true);
        assert!(!removed(&plan).contains(&"PROVE_LOCKING"));
        assert!(
            plan.kept.iter().any(|k| k.starts_with("lockdep")),
            "{:?}",
            plan.kept
        );

        std::fs::write(&file, "int f(void)\n{\n\tWARN_ON(1);\n").unwrap();
        let e = Evidence::new("WARNING in ext4_write_inode", WARNING, "").with_source(tree.path());
        assert!(removed_of(&e).contains(&"PROVE_LOCKING"));
    }

    fn plan_of(e: &Evidence) -> Plan {
        plan(SYZBOT_CONFIG, e, true)
    }

    fn removed_of(e: &Evidence) -> Vec<&'static str> {
        let plan = plan_of(e);
        RULES
            .iter()
            .flat_map(|r| r.options.iter().copied())
            .filter(|o| plan.removed.iter().any(|c| c.option == *o))
            .collect()
    }

    #[test]
    fn a_lockdep_report_keeps_lockdep_only() {
        let e = Evidence::new("possible deadlock in ext4_xattr_set_handle", LOCKDEP, "");
        let gone = removed_of(&e);
        assert!(!gone.contains(&"PROVE_LOCKING") && !gone.contains(&"DEBUG_LOCK_ALLOC"));
        assert!(
            gone.contains(&"KASAN") && gone.contains(&"DETECT_HUNG_TASK"),
            "{gone:?}"
        );
    }

    #[test]
    fn a_hung_task_keeps_the_detector() {
        let e = Evidence::new("INFO: task hung in __flush_work", HUNG, "");
        let gone = removed_of(&e);
        assert!(
            !gone.contains(&"DETECT_HUNG_TASK") && !gone.contains(&"BOOTPARAM_HUNG_TASK_PANIC")
        );
        assert!(
            gone.contains(&"KASAN") && gone.contains(&"PROVE_LOCKING"),
            "{gone:?}"
        );
    }

    #[test]
    fn a_general_protection_fault_on_kasan_keeps_kasan_and_its_subsystem() {
        let repro = "int fd = open(\"/dev/raw-gadget\", O_RDWR);";
        let e = Evidence::new(
            "general protection fault in usb_gadget_udc_reset",
            GPF,
            repro,
        );
        let gone = removed_of(&e);
        assert!(
            !gone.contains(&"KASAN") && !gone.contains(&"USB_SUPPORT"),
            "{gone:?}"
        );
        assert!(gone.contains(&"BT") && gone.contains(&"SOUND") && gone.contains(&"PROVE_LOCKING"));
    }

    #[test]
    fn keep_config_only_adds_what_rrr_needs() {
        let e = Evidence::new("WARNING in ext4_write_inode", WARNING, "");
        let plan = plan(SYZBOT_CONFIG, &e, false);
        assert!(plan.removed.is_empty());
        assert_eq!(plan.base, SYZBOT_CONFIG);
        let added: Vec<&str> = plan.added.iter().map(|c| c.option.as_str()).collect();
        // syzbot's configs have KCOV already; kvm-clock must go, PVH must come.
        assert!(
            added.contains(&"KVM_GUEST") && added.contains(&"PVH"),
            "{added:?}"
        );
        assert!(!added.contains(&"KCOV"));
        let text = plan.changes_text();
        assert!(
            text.contains("CONFIG_KVM_GUEST: y -> not set (rrr needs it)"),
            "{text}"
        );
    }

    #[test]
    fn clang_configs_are_recognised() {
        let config = format!("{SYZBOT_CONFIG}CONFIG_CC_IS_CLANG=y\n");
        assert!(plan(&config, &Evidence::default(), true).clang);
    }
}
