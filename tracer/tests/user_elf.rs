//! The index over a real user binary, compiled here with `gcc -g -O2` from `data/probe.c`. The
//! program prints its own `offsetof`/`sizeof` numbers, which the index must match.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rrr_tracer::{Index, IndexError, Location, Reg, Type, ValueKind};

fn compile(dir: &Path) -> PathBuf {
    compile_source(dir, "probe")
}

fn compile_source(dir: &Path, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/{name}.c"));
    let out = dir.join(name);
    let cc = Command::new("gcc")
        // Keep a `.data..percpu` section as its own section, as the kernel's linker script does
        // (the default script would fold it into `.data`).
        .args(["-g", "-O2", "-Wl,--unique=.data..percpu", "-o"])
        .arg(&out)
        .arg(&src)
        .output()
        .expect("gcc is needed for the index tests");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    out
}

/// What the compiled program says about its own layouts.
fn compiler_layouts(binary: &Path) -> HashMap<String, u64> {
    let out = Command::new(binary).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

#[test]
fn functions_parameters_types_and_locations_of_a_user_binary() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path());
    let index = Index::build(&bin).unwrap();
    assert!(index.has_dwarf());

    let f = index.function("probe_fn").expect("probe_fn is indexed");
    assert!(index.units[f.unit as usize].ends_with("probe.c"));
    assert!(f.external);
    let names: Vec<_> = f
        .params
        .iter()
        .map(|p| p.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, ["a", "s", "o", "c", "n", "b", "m", "opaque"]);
    let kinds: Vec<_> = f.params.iter().map(|p| index.value_kind(p.ty)).collect();
    assert_eq!(
        kinds[0],
        ValueKind::Int {
            size: 4,
            signed: true
        }
    );
    assert_eq!(kinds[1], ValueKind::Str);
    assert_eq!(
        kinds[2],
        ValueKind::StructPtr {
            name: Some("outer"),
            union: false
        }
    );
    match kinds[3] {
        ValueKind::Enum {
            enumerators,
            signed,
            flags,
            ..
        } => {
            assert!(signed);
            assert!(!flags);
            assert_eq!(
                enumerators,
                [("RED".into(), 0), ("GREEN".into(), 5), ("BLUE".into(), -2)]
            );
        }
        other => panic!("enum color decoded as {other:?}"),
    }
    // A typedef chain ends at the integer.
    assert_eq!(index.type_name(f.params[4].ty), "my_size_t");
    assert_eq!(
        kinds[4],
        ValueKind::Int {
            size: 8,
            signed: false
        }
    );
    assert_eq!(kinds[5], ValueKind::Bool);
    assert!(matches!(kinds[6], ValueKind::Enum { flags: true, .. }));
    assert_eq!(kinds[7], ValueKind::Pointer);
    assert_eq!(index.type_name(f.params[1].ty), "const char *");
    assert_eq!(index.type_name(f.params[2].ty), "struct outer *");
    let ret = f.ret.expect("probe_fn returns long");
    assert_eq!(
        index.value_kind(ret),
        ValueKind::Int {
            size: 8,
            signed: true
        }
    );

    // SysV: six integer registers, then the stack above the return address.
    let locs: Vec<_> = f.params.iter().map(|p| p.location.clone()).collect();
    let regs = [Reg::Rdi, Reg::Rsi, Reg::Rdx, Reg::Rcx, Reg::R8, Reg::R9];
    for (loc, reg) in locs.iter().zip(regs) {
        assert!(
            *loc == Location::Reg(reg) || *loc == Location::Abi(reg),
            "{loc:?} is not {reg:?}"
        );
    }
    assert_eq!(locs[6], Location::Stack(8));
    assert_eq!(locs[7], Location::Stack(16));

    let many = index.function("many_args").unwrap();
    assert_eq!(many.params[7].location, Location::Stack(16));

    // Addresses: the entry matches the ELF symbol, and lookups by address agree.
    let sym = index.symbol("probe_fn").unwrap();
    assert_eq!(sym.address, f.entry);
    let inside = f.ranges[0].start + 3;
    assert_eq!(index.function_at(inside).unwrap().name, "probe_fn");
    assert_eq!(index.name_at(inside), Some(("probe_fn", 3)));

    // The always-inline helper is an inlined instance inside probe_fn.
    let fi = index
        .functions
        .iter()
        .position(|x| x.name == "probe_fn")
        .unwrap() as u32;
    let inl = index.inlined_in(fi);
    assert!(inl
        .iter()
        .any(|i| i.name == "twice" && f.ranges.iter().any(|r| r.contains(i.entry))));

    // A hot/cold split function: one function, two ranges, found from either.
    let split = index.function("split_fn").unwrap();
    assert_eq!(split.ranges.len(), 2, "{:?}", split.ranges);
    let cold = split
        .ranges
        .iter()
        .find(|r| !r.contains(split.entry))
        .unwrap();
    assert_eq!(index.function_at(cold.start + 1).unwrap().name, "split_fn");
    assert!(index.symbol("split_fn.cold").is_some());

    // No __mcount_loc in a user binary: nothing is traceable through fentry.
    assert!(index.fentry_sites.is_empty());
    assert!(index.current_task.is_none());
}

#[test]
fn member_offsets_match_the_compilers_offsetof() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path());
    let want = compiler_layouts(&bin);
    let index = Index::build(&bin).unwrap();
    for (path, key) in [
        ("id", "outer.id"),
        ("in", "outer.in"),
        ("in.tag", "outer.in.tag"),
        ("word", "outer.word"), // through an anonymous union
        ("hi", "outer.hi"),     // through an anonymous struct in it
        ("name", "outer.name"),
        ("next", "outer.next"),
    ] {
        assert_eq!(
            index.member_offset("outer", path),
            Some(want[key]),
            "outer.{path}"
        );
    }
    assert_eq!(index.layout("outer").unwrap().size, want["sizeof.outer"]);
    assert_eq!(index.layout("inner").unwrap().size, want["sizeof.inner"]);
    let tag = index.member("outer", "in.tag").unwrap();
    assert!(matches!(
        index.types.get(tag.ty),
        Type::Array { count: Some(7), .. }
    ));
    let flag = index.member("outer", "flag").unwrap();
    assert_eq!(flag.bits.map(|(_, size)| size), Some(3));
    assert!(matches!(
        index.member("outer", "nope"),
        Err(IndexError::NoMember { .. })
    ));
    assert!(matches!(
        index.member("nope", "id"),
        Err(IndexError::NoStruct(_))
    ));
}

#[test]
fn the_index_survives_its_cache_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::build(&compile(dir.path())).unwrap();
    let bytes = index.to_bytes();
    let back = Index::from_bytes(&bytes).unwrap();
    assert_eq!(back.functions, index.functions);
    assert_eq!(back.symbols, index.symbols);
    assert_eq!(back.layouts, index.layouts);
    assert_eq!(back.function("probe_fn"), index.function("probe_fn"));
    assert_eq!(
        back.member_offset("outer", "hi"),
        index.member_offset("outer", "hi")
    );
    let file = dir.path().join("probe.idx");
    index.save(&file).unwrap();
    assert_eq!(Index::load(&file).unwrap().functions, index.functions);
    // A cache from another format version is refused, not misread.
    let mut old = bytes.clone();
    old[8] ^= 0xff;
    assert!(matches!(
        Index::from_bytes(&old),
        Err(IndexError::CacheFormat)
    ));
    assert!(Index::from_bytes(&bytes[..bytes.len() / 2]).is_err());
}

#[test]
fn without_dwarf_the_symbols_still_name_the_code() {
    let dir = tempfile::tempdir().unwrap();
    let bin = compile(dir.path());
    let stripped = dir.path().join("probe-nodebug");
    let st = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&bin)
        .arg(&stripped)
        .status()
        .expect("objcopy is needed");
    assert!(st.success());
    let index = Index::build(&stripped).unwrap();
    assert!(!index.has_dwarf());
    let sym = index.symbol("probe_fn").expect("the symbol table survives");
    assert_eq!(index.name_at(sym.address + 2), Some(("probe_fn", 2)));
    // The functions come from the symbols: names and ranges, no parameters.
    let f = index
        .function("probe_fn")
        .expect("a function from the symbol");
    assert_eq!((f.entry, f.params.len()), (sym.address, 0));
    assert_eq!(f.ranges[0].end - f.ranges[0].start, sym.size);
}

#[test]
fn a_file_that_is_not_elf_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmlinux");
    std::fs::write(&path, b"not an elf file at all").unwrap();
    let err = Index::build(&path).unwrap_err();
    assert!(matches!(err, IndexError::Elf { .. }), "{err}");
    assert!(err.to_string().contains("vmlinux"));
    let err = Index::build(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(err, IndexError::Read { .. }), "{err}");
}

#[test]
fn a_current_task_in_the_per_cpu_section_is_per_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::build(&compile_source(dir.path(), "percpu")).unwrap();
    let cur = index.current_task.as_ref().expect("current_task found");
    assert_eq!(cur.symbol, "current_task");
    assert_eq!(cur.address, index.symbol("current_task").unwrap().address);
    assert!(
        cur.per_cpu,
        "a variable in .data..percpu is read through GS"
    );
}
