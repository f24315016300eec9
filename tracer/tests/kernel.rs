//! The index over rrr's default guest kernel (built, or taken from the cache, through
//! `rrr-kernels` the way `rrr kernel build` does), checked against gdb, objdump and readelf reading
//! the same vmlinux.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use rrr_tracer::{Index, Location, Reg, ValueKind};

/// rrr's cache directory, found as the binary finds it.
fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("RRR_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("rrr")))
        .unwrap_or_else(|| var("HOME").expect("HOME is set").join(".cache/rrr"))
}

fn vmlinux() -> &'static Path {
    static V: OnceLock<PathBuf> = OnceLock::new();
    V.get_or_init(|| {
        let spec = rrr_kernels::KernelSpec::default();
        rrr_kernels::build(&spec, &cache_dir(), &|_| {})
            .expect("the default guest kernel builds")
            .vmlinux()
    })
}

fn index() -> &'static Index {
    static I: OnceLock<Index> = OnceLock::new();
    I.get_or_init(|| Index::build(vmlinux()).expect("the default kernel indexes"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the tool runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn member_offsets_and_the_current_task_agree_with_gdb() {
    let index = index();
    let members = [
        ("task_struct", "pid"),
        ("task_struct", "tgid"),
        ("task_struct", "comm"),
        ("task_struct", "mm"),
        ("task_struct", "real_parent"),
        ("task_struct", "group_leader"),
        ("task_struct", "flags"),
        ("task_struct", "__state"),
        ("task_struct", "se.vruntime"),
        ("task_struct", "thread.sp"),
        ("file", "f_pos"),
        ("pt_regs", "orig_ax"),
        ("pcpu_hot", "current_task"),
    ];
    let mut gdb = Command::new("gdb");
    gdb.args(["-batch", "-nx"]);
    for (s, m) in members {
        gdb.arg("-ex")
            .arg(format!("print/d (long)&((struct {s} *)0)->{m}"));
    }
    gdb.args(["-ex", "print/d sizeof(struct task_struct)"]);
    gdb.args(["-ex", "print/x (long)&pcpu_hot.current_task"]);
    gdb.arg(vmlinux());
    let out = run(&mut gdb);
    let values: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(_, v)| v.trim()))
        .collect();
    assert_eq!(values.len(), members.len() + 2, "gdb said:\n{out}");
    for ((s, m), want) in members.iter().zip(&values) {
        let got = index.member_offset(s, m);
        assert_eq!(
            got.map(|o| o.to_string()).as_deref(),
            Some(*want),
            "{s}.{m}"
        );
    }
    assert_eq!(
        index.layout("task_struct").unwrap().size.to_string(),
        values[members.len()]
    );

    let task = index.task_layout().unwrap();
    assert_eq!(Some(task.comm), index.member_offset("task_struct", "comm"));
    assert_eq!(task.comm_len, 16);
    // 6.12: `current` lives in pcpu_hot; the default kernel is UP, so a plain variable.
    let cur = index
        .current_task
        .as_ref()
        .expect("current task pointer found");
    assert_eq!(cur.symbol, "pcpu_hot");
    assert_eq!(format!("{:#x}", cur.address), values[members.len() + 1]);
    assert!(!cur.per_cpu);
}

#[test]
fn fentry_sites_are_the_mcount_table_and_really_call_fentry() {
    let index = index();
    // readelf, independently: the table's size from its bounding symbols.
    let syms = run(Command::new("readelf").arg("-sW").arg(vmlinux()));
    let addr = |name: &str| -> u64 {
        let line = syms
            .lines()
            .find(|l| l.split_whitespace().last() == Some(name))
            .unwrap_or_else(|| panic!("{name} not in the symbol table"));
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let entries = (addr("__stop_mcount_loc") - addr("__start_mcount_loc")) / 8;
    assert!(entries > 10_000, "{entries} entries");
    // The table also holds zeroed entries for code the linker discarded; those are no sites.
    let sites = index.fentry_sites.len() as u64;
    assert!(
        sites <= entries && sites * 100 >= entries * 97,
        "{sites} of {entries}"
    );

    let traceable: Vec<_> = index.traceable().collect();
    let with_dwarf = traceable.iter().filter(|(_, _, f)| f.is_some()).count();
    assert!(
        with_dwarf * 10 > traceable.len() * 9,
        "{with_dwarf} of {}",
        traceable.len()
    );

    // objdump, independently: a sample of sites disassemble to `call <__fentry__>`, right at
    // the function's start or after its `endbr64`.
    let step = index.fentry_sites.len() / 8;
    for &site in index.fentry_sites.iter().step_by(step) {
        let dis = run(Command::new("objdump")
            .arg("-d")
            .arg(format!("--start-address={site:#x}"))
            .arg(format!("--stop-address={:#x}", site + 5))
            .arg(vmlinux()));
        assert!(dis.contains("<__fentry__>"), "{site:#x}:\n{dis}");
        if let Some(f) = index
            .function_entered_at(site)
            .or(index.function_entered_at(site - 4))
        {
            assert_eq!(f.fentry, Some(site));
        }
    }

    // The syscall path: the entry code is `noinstr` (not traceable), what it calls is.
    assert!(index.function("do_syscall_64").unwrap().fentry.is_none());
    for name in [
        "ksys_write",
        "do_sys_openat2",
        "vfs_write",
        "__x64_sys_openat",
    ] {
        let f = index
            .function(name)
            .unwrap_or_else(|| panic!("{name} indexed"));
        assert!(f.fentry.is_some(), "{name} is traceable");
        assert!(
            index.units[f.unit as usize].contains("fs/"),
            "{name} is in fs/"
        );
    }
}

#[test]
fn syscall_functions_have_typed_arguments_in_their_registers() {
    let index = index();
    assert!(index.functions.len() > 10_000);
    let f = index.function("do_sys_openat2").unwrap();
    let p: Vec<_> = f
        .params
        .iter()
        .map(|p| {
            (
                p.name.as_deref().unwrap(),
                index.value_kind(p.ty),
                p.location.clone(),
            )
        })
        .collect();
    assert_eq!(
        p[0],
        (
            "dfd",
            ValueKind::Int {
                size: 4,
                signed: true
            },
            Location::Reg(Reg::Rdi)
        )
    );
    assert_eq!(p[1], ("filename", ValueKind::Str, Location::Reg(Reg::Rsi)));
    assert_eq!(
        p[2],
        (
            "how",
            ValueKind::StructPtr {
                name: Some("open_how"),
                union: false
            },
            Location::Reg(Reg::Rdx)
        )
    );
    let w = index.function("ksys_write").unwrap();
    assert_eq!(index.type_name(w.params[2].ty), "size_t");
    assert_eq!(
        index.value_kind(w.ret.unwrap()),
        ValueKind::Int {
            size: 8,
            signed: true
        }
    );
    assert_eq!(index.source_path(f), "fs/open.c");
    // A kernel enum reaches the decoder with its names.
    let e = index
        .functions
        .iter()
        .flat_map(|f| &f.params)
        .find_map(|p| match index.value_kind(p.ty) {
            ValueKind::Enum { enumerators, .. } if !enumerators.is_empty() => Some(enumerators),
            _ => None,
        });
    assert!(e.is_some(), "some kernel function takes an enum");
    // Symbols name what DWARF does not describe (assembly entry code).
    let entry = index.symbol("entry_SYSCALL_64").expect("entry symbol");
    assert_eq!(
        index.name_at(entry.address).map(|(n, _)| n),
        Some("entry_SYSCALL_64")
    );
}

#[test]
fn addresses_map_back_to_functions_and_agree_with_the_symbols() {
    let index = index();
    // (Cold parts: our -Os kernel has none; the user-binary test covers them.)
    for f in index.functions.iter().step_by(97) {
        let at = index
            .function_at(f.entry)
            .expect("an entry is inside its function");
        assert_eq!(at.entry, f.entry, "{}", f.name);
        // DWARF and the ELF symbol table agree on the entry of an external function (a static
        // variable may have the same name: `pt_regs_offset` is both).
        if f.external {
            if let Some(s) = index
                .symbol(&f.name)
                .filter(|s| s.kind == rrr_tracer::SymbolKind::Function)
            {
                assert_eq!(s.address, f.entry, "{}", f.name);
            }
        }
    }
}

/// gdb's own reading of the location lists (`info scope`) for a sample of traceable functions:
/// wherever the index says a parameter is in a register at entry, gdb must name the same
/// register for the range that holds the entry address.
#[test]
fn entry_registers_agree_with_gdbs_location_lists() {
    let index = index();
    let sample: Vec<&rrr_tracer::Function> = index
        .functions
        .iter()
        .filter(|f| f.fentry.is_some() && !f.params.is_empty())
        .filter(|f| index.functions_named(&f.name).count() == 1)
        .step_by(301)
        .take(40)
        .collect();
    assert!(sample.len() >= 30, "{} functions sampled", sample.len());
    let mut gdb = Command::new("gdb");
    gdb.args(["-batch", "-nx"]);
    for f in &sample {
        gdb.arg("-ex").arg(format!("info scope *{:#x}", f.entry));
    }
    gdb.arg(vmlinux());
    let out = run(&mut gdb);
    let scopes: Vec<&str> = out.split("Scope for ").skip(1).collect();
    assert_eq!(scopes.len(), sample.len(), "gdb said:\n{out}");

    let mut compared = 0;
    for (f, scope) in sample.iter().zip(scopes) {
        for p in &f.params {
            let (Some(name), Location::Reg(reg)) = (&p.name, &p.location) else {
                continue;
            };
            let Some(gdb_reg) = gdb_register_at(scope, name, f.entry) else {
                continue;
            };
            assert_eq!(gdb_reg, reg.name(), "{} parameter {name}", f.name);
            compared += 1;
        }
    }
    eprintln!("{compared} parameters compared with gdb");
    assert!(compared >= 40, "only {compared} parameters compared");
}

/// The register gdb names for `symbol` at `pc` in one `info scope` block, if it names one:
/// "a variable in $reg", or the value the register had at entry (`DW_OP_entry_value(reg)`).
fn gdb_register_at(scope: &str, symbol: &str, pc: u64) -> Option<String> {
    let start = scope.find(&format!("Symbol {symbol} is "))?;
    let block = &scope[start..];
    let block = &block[..block.find(", length").unwrap_or(block.len())];
    let reg_of = |text: &str| -> Option<String> {
        let name = |rest: &str| {
            rest.split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .map(str::to_owned)
        };
        if let Some(i) = text.find("a variable in $") {
            return name(&text[i + "a variable in $".len()..]);
        }
        let ops: Vec<&str> = text.lines().filter(|l| l.contains(": DW_OP_")).collect();
        match ops.as_slice() {
            [a, b, c]
                if a.contains("DW_OP_entry_value")
                    && b.contains("DW_OP_reg")
                    && c.contains("DW_OP_stack_value") =>
            {
                name(&b[b.find("[$")? + 2..])
            }
            _ => None,
        }
    };
    if !block.contains("multi-location") {
        return reg_of(block);
    }
    // Each range's text runs to the next range (the first may follow a "Base address" on its
    // line).
    let mut ranges: Vec<&str> = block.split("Range 0x").skip(1).collect();
    ranges.retain(|r| {
        let parsed = r.split_once('-').and_then(|(lo, rest)| {
            let hi = rest.strip_prefix("0x")?.split(':').next()?;
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        });
        parsed.is_some_and(|(lo, hi)| (lo..hi).contains(&pc))
    });
    ranges.first().and_then(|r| reg_of(r))
}

/// The same kernel and thread count give the same bytes (a cache can be compared or shared),
/// and the thread count changes nothing a query sees.
#[test]
fn the_index_is_deterministic() {
    use rrr_tracer::BuildOptions;
    let two = || Index::build_with(vmlinux(), BuildOptions { threads: 2 }).unwrap();
    let a = two();
    assert!(a.to_bytes() == two().to_bytes(), "two builds differ");
    let one = Index::build_with(vmlinux(), BuildOptions { threads: 1 }).unwrap();
    assert_eq!(one.functions.len(), a.functions.len());
    assert_eq!(one.layouts.len(), a.layouts.len());
    for (name, layout) in &one.layouts {
        let other = &a.layouts[name];
        assert_eq!(layout.size, other.size, "struct {name}");
        let offsets = |l: &rrr_tracer::Layout| -> Vec<(Option<String>, u64)> {
            l.members
                .iter()
                .map(|m| (m.name.clone(), m.offset))
                .collect()
        };
        assert_eq!(offsets(layout), offsets(other), "struct {name}");
    }
    for (f, g) in one.functions.iter().zip(&a.functions) {
        assert_eq!((&f.name, f.entry, &f.ranges), (&g.name, g.entry, &g.ranges));
        let sig = |i: &Index, f: &rrr_tracer::Function| -> Vec<String> {
            f.params.iter().map(|p| i.type_name(p.ty)).collect()
        };
        assert_eq!(sig(&one, f), sig(&a, g), "{}", f.name);
    }
}

#[test]
fn return_sites_are_the_ret_instructions_objdump_shows() {
    let index = index();
    let f = index
        .function("do_sys_openat2")
        .expect("do_sys_openat2 is indexed");
    let fi = index
        .functions
        .iter()
        .position(|g| std::ptr::eq(g, f))
        .unwrap() as u32;
    let ours: Vec<u64> = index
        .return_sites
        .iter()
        .filter(|s| s.function == fi)
        .map(|s| s.address)
        .collect();
    assert!(!ours.is_empty(), "do_sys_openat2 returns somewhere");
    let range = &f.ranges[0];
    let listing = run(Command::new("objdump")
        .arg("-d")
        .arg(format!("--start-address={:#x}", range.start))
        .arg(format!("--stop-address={:#x}", range.end))
        .arg(vmlinux()));
    // A kernel built with return thunks (rrr's default) returns through `jmp` to the thunk.
    let objdump: Vec<u64> = listing
        .lines()
        .filter(|l| {
            l.contains("\tret") || l.ends_with(" ret") || l.contains("<__x86_return_thunk>")
        })
        .filter_map(|l| u64::from_str_radix(l.trim().split(':').next()?, 16).ok())
        .collect();
    let in_first_range: Vec<u64> = ours
        .iter()
        .copied()
        .filter(|a| range.contains(*a))
        .collect();
    assert_eq!(in_first_range, objdump, "rets in {listing}");
}

#[test]
fn system_call_signatures_come_from_the_syscall_define_bodies() {
    let index = index();
    let shown = |call: &str| -> Vec<String> {
        index.syscalls[call]
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    index.type_name(p.ty),
                    p.name.as_deref().unwrap_or("?")
                )
            })
            .collect()
    };
    assert_eq!(
        shown("openat"),
        [
            "int dfd",
            "const char * filename",
            "int flags",
            "umode_t mode"
        ]
    );
    assert_eq!(shown("close"), ["unsigned int fd"]);
    assert!(index.syscalls.len() > 200, "{}", index.syscalls.len());
}

#[test]
fn a_kernel_without_dwarf_is_traced_from_its_symbols() {
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("vmlinux");
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(vmlinux())
        .arg(&stripped));
    let index = Index::build(&stripped).unwrap();
    assert!(!index.has_dwarf());
    let f = index
        .function("do_sys_openat2")
        .expect("named by its symbol");
    assert!(f.params.is_empty());
    assert!(f.fentry.is_some(), "its __fentry__ site is attached");
    assert!(
        index.return_sites.len() > 1000,
        "{}",
        index.return_sites.len()
    );
}
