//! Kernel `.config` text: parsing, and checking that what rrr asked for survived Kconfig.
//!
//! `merge_config.sh` and `olddefconfig` silently drop an option whose dependencies are not met.
//! A kernel missing one of rrr's options boots and then fails in confusing ways, so every option
//! a fragment asks for is checked against the final `.config`, and a drop is an error that names
//! the option and the dependencies Kconfig declares for it.

use std::collections::BTreeMap;
use std::path::Path;

/// One option's state in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `CONFIG_X=<value>` (`y`, `m`, a number or a quoted string, kept verbatim).
    Set(String),
    /// `# CONFIG_X is not set`.
    NotSet,
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Set(v) => f.write_str(v),
            Value::NotSet => f.write_str("not set"),
        }
    }
}

/// The options of a config file or fragment, by name without the `CONFIG_` prefix, in file order
/// of last assignment (later lines win, as in Kconfig).
pub type Options = BTreeMap<String, Value>;

/// Parses `.config` or fragment text. Comments other than "is not set" and blank lines are skipped.
pub fn parse(text: &str) -> Options {
    let mut options = Options::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# CONFIG_") {
            if let Some(name) = rest.strip_suffix(" is not set") {
                options.insert(name.to_owned(), Value::NotSet);
            }
        } else if let Some(rest) = line.strip_prefix("CONFIG_") {
            if let Some((name, value)) = rest.split_once('=') {
                options.insert(name.to_owned(), Value::Set(value.to_owned()));
            }
        }
    }
    options
}

/// An option a fragment asked for that the final config does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub name: String,
    pub wanted: Value,
    pub got: Value,
}

/// Options in `wanted` whose final value differs. "Not set" is satisfied by absence.
pub fn dropped(wanted: &Options, final_config: &Options) -> Vec<Dropped> {
    wanted
        .iter()
        .filter_map(|(name, want)| {
            let got = final_config.get(name).cloned().unwrap_or(Value::NotSet);
            (got != *want).then(|| Dropped {
                name: name.clone(),
                wanted: want.clone(),
                got,
            })
        })
        .collect()
}

/// A readable report of dropped options, one per line, with the `depends on` lines the source
/// tree's Kconfig files declare for each (when `source` is given and they can be found).
pub fn report(dropped: &[Dropped], source: Option<&Path>) -> String {
    let names: Vec<&str> = dropped.iter().map(|d| d.name.as_str()).collect();
    let deps = source
        .map(|s| kconfig_dependencies(s, &names))
        .unwrap_or_default();
    let mut out = String::new();
    for d in dropped {
        out.push_str(&format!(
            "  CONFIG_{}: asked {}, got {}",
            d.name, d.wanted, d.got
        ));
        match deps.get(&d.name) {
            Some(list) if !list.is_empty() => {
                let joined = if list.len() == 1 {
                    list[0].clone()
                } else {
                    let parts: Vec<String> = list.iter().map(|e| parenthesize(e)).collect();
                    parts.join(" && ")
                };
                out.push_str(&format!(" (Kconfig: depends on {joined})"))
            }
            Some(_) => {}
            None if source.is_some() => out.push_str(" (no such option in this source tree)"),
            None => {}
        }
        out.push('\n');
    }
    out.push_str(
        "  fix: add the missing dependencies to a --fragment, or drop the conflicting option",
    );
    out
}

/// Wraps an `||` expression so joining several with `&&` keeps its meaning.
fn parenthesize(expr: &str) -> String {
    if expr.contains("||") {
        format!("({expr})")
    } else {
        expr.to_owned()
    }
}

/// The `depends on` expressions of each named option, from every `Kconfig*` file of the tree.
/// An option with no `depends on` maps to an empty list; an option not found is absent.
pub fn kconfig_dependencies(source: &Path, names: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![source.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if kind.is_dir() && !name.starts_with('.') && name != "Documentation" {
                stack.push(path);
            } else if kind.is_file() && name.starts_with("Kconfig") {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    scan_kconfig(&text, names, &mut found);
                }
            }
        }
    }
    found
}

/// Collects the dependencies of `config NAME` blocks in one Kconfig file: the enclosing
/// `if EXPR` blocks of that file, then the block's own `depends on` lines.
fn scan_kconfig(text: &str, names: &[&str], found: &mut BTreeMap<String, Vec<String>>) {
    let mut current: Option<String> = None;
    let mut ifs: Vec<String> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        let mut words = trimmed.splitn(2, char::is_whitespace);
        let keyword = words.next().unwrap_or("");
        let rest = words.next().unwrap_or("").trim();
        match keyword {
            "config" | "menuconfig" => {
                current = names.contains(&rest).then(|| rest.to_owned());
                if let Some(name) = &current {
                    let list = found.entry(name.clone()).or_default();
                    for cond in &ifs {
                        push_unique(list, cond);
                    }
                }
            }
            "if" => {
                ifs.push(rest.to_owned());
                current = None;
            }
            "endif" => {
                ifs.pop();
                current = None;
            }
            "choice" | "endchoice" | "menu" | "endmenu" | "source" | "comment" => current = None,
            "depends" => {
                if let (Some(name), Some(expr)) = (&current, rest.strip_prefix("on")) {
                    push_unique(found.entry(name.clone()).or_default(), expr.trim());
                }
            }
            _ => {}
        }
    }
}

fn push_unique(list: &mut Vec<String>, expr: &str) {
    if !list.iter().any(|e| e == expr) {
        list.push(expr.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FINAL: &str = "\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_64BIT=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_NR_UARTS=4
CONFIG_CMDLINE=\"console=ttyS0\"
# CONFIG_KVM_GUEST is not set
# CONFIG_PVH is not set
";

    #[test]
    fn parses_set_unset_and_verbatim_values() {
        let opts = parse(FINAL);
        assert_eq!(opts["64BIT"], Value::Set("y".into()));
        assert_eq!(opts["SERIAL_8250_NR_UARTS"], Value::Set("4".into()));
        assert_eq!(opts["CMDLINE"], Value::Set("\"console=ttyS0\"".into()));
        assert_eq!(opts["KVM_GUEST"], Value::NotSet);
        assert!(!opts.contains_key("Automatically"));
    }

    #[test]
    fn later_assignments_win() {
        let opts = parse("CONFIG_SMP=y\n# CONFIG_SMP is not set\n");
        assert_eq!(opts["SMP"], Value::NotSet);
    }

    #[test]
    fn reports_only_what_kconfig_changed() {
        let wanted = parse(
            "CONFIG_64BIT=y\nCONFIG_PVH=y\nCONFIG_SERIAL_8250_NR_UARTS=8\n\
             # CONFIG_KVM_GUEST is not set\n# CONFIG_MODULES is not set\nCONFIG_VIRTIO_BLK=y\n",
        );
        let got = dropped(&wanted, &parse(FINAL));
        let names: Vec<&str> = got.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["PVH", "SERIAL_8250_NR_UARTS", "VIRTIO_BLK"]);
        assert_eq!(got[1].got, Value::Set("4".into()));
        assert_eq!(got[2].got, Value::NotSet);
    }

    #[test]
    fn the_required_fragment_is_satisfied_by_itself() {
        let required = parse(crate::fragments::REQUIRED);
        assert!(dropped(&required, &required).is_empty());
        assert!(required.contains_key("DEBUG_INFO_DWARF5"));
        assert_eq!(required["KVM_GUEST"], Value::NotSet);
    }

    #[test]
    fn report_names_dependencies_from_kconfig() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("arch/x86")).unwrap();
        std::fs::write(
            dir.path().join("arch/x86/Kconfig"),
            "config PVH\n\tbool \"PVH\"\n\tdepends on X86_64 || X86_32\n\tdepends on PARAVIRT\n\n\
             if BLK_DEV\nconfig VIRTIO_BLK\n\ttristate\n\tdepends on VIRTIO\nendif\n\
             config OTHER\n\tbool\n\tdepends on FOO\n",
        )
        .unwrap();
        let dropped = [
            Dropped {
                name: "PVH".into(),
                wanted: Value::Set("y".into()),
                got: Value::NotSet,
            },
            Dropped {
                name: "VIRTIO_BLK".into(),
                wanted: Value::Set("y".into()),
                got: Value::NotSet,
            },
            Dropped {
                name: "NOPE".into(),
                wanted: Value::Set("y".into()),
                got: Value::NotSet,
            },
        ];
        let text = report(&dropped, Some(dir.path()));
        assert!(
            text.contains("CONFIG_PVH: asked y, got not set (Kconfig: depends on (X86_64 || X86_32) && PARAVIRT)"),
            "{text}"
        );
        assert!(
            text.contains("CONFIG_NOPE: asked y, got not set (no such option"),
            "{text}"
        );
        assert!(!text.contains("FOO"));
    }
}
