//! `rrr kernel build` end to end: builds the default guest kernel (minutes on a cold cache,
//! seconds when cached), then checks the result and the cache hit.

use std::process::Command;

use object::{Object, ObjectSection};

fn rrr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rrr"))
}

#[test]
fn builds_the_guest_kernel_then_hits_the_cache() {
    let first = rrr().args(["kernel", "build"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "rrr kernel build failed:\n{stderr}");
    let stdout = String::from_utf8(first.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "stdout must be one line: {stdout:?}"
    );
    let dir = std::path::PathBuf::from(stdout.trim_end());
    assert!(dir.is_dir(), "{} is not a directory", dir.display());
    assert!(dir.join("bzImage").is_file());
    let config = std::fs::read_to_string(dir.join(".config")).unwrap();
    assert!(config.contains("CONFIG_DEBUG_INFO_DWARF5=y"));
    assert!(
        config.contains("# CONFIG_KVM_GUEST is not set") || !config.contains("CONFIG_KVM_GUEST=y")
    );
    assert!(!config.contains("CONFIG_SMP=y"));

    let vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    let elf = object::File::parse(&*vmlinux).unwrap();
    let debug_info = elf
        .section_by_name(".debug_info")
        .expect("vmlinux has .debug_info");
    assert!(
        debug_info.size() > 1 << 20,
        "suspiciously small .debug_info"
    );

    let second = rrr().args(["kernel", "build"]).output().unwrap();
    assert!(second.status.success());
    assert_eq!(String::from_utf8(second.stdout).unwrap(), stdout);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("cached"),
        "second build should be a cache hit: {stderr}"
    );
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let out = rrr()
        .args(["kernel", "build", "--config", "/nonexistent/syzbot.config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/syzbot.config") && stderr.contains("cannot be read"),
        "{stderr}"
    );
}

#[test]
fn a_missing_source_tree_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = rrr()
        .args(["kernel", "build", "--source"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a kernel source tree"), "{stderr}");
}

/// A stand-in for a kernel tree: just enough of kbuild for rrr's build driver (Kconfig targets,
/// `merge_config.sh`, `make O=DIR vmlinux bzImage`, kbuild's step lines), where "vmlinux" is
/// every `init/*.c` compiled together with DWARF. It builds in a fraction of a second, so the cache's reaction to edits can be tested
/// through the real `rrr kernel build` without a real kernel build.
fn fake_kernel_tree(dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("scripts/kconfig")).unwrap();
    std::fs::create_dir_all(dir.join("init")).unwrap();
    std::fs::write(
        dir.join("Makefile"),
        "O ?= .\n\
         kernelversion:\n\t@echo 6.99.0-fake\n\
         tinyconfig:\n\t@echo CONFIG_FAKE=y > $(O)/.config\n\
         olddefconfig:\n\t@true\n\
         vmlinux:\n\t@echo '  CC      init/main.o'\n\t@cat $(sort $(wildcard init/*.c)) > $(O)/all.c\n\t\
         @echo '  LD      vmlinux'\n\t@gcc -g -c -x c -o $(O)/vmlinux $(O)/all.c\n\
         bzImage: vmlinux\n\tmkdir -p $(O)/arch/x86/boot && cp $(O)/vmlinux $(O)/arch/x86/boot/bzImage\n\
         .PHONY: kernelversion tinyconfig olddefconfig vmlinux bzImage\n",
    )
    .unwrap();
    std::fs::write(dir.join("Kconfig"), "").unwrap();
    // `merge_config.sh -m -O DIR BASE FRAGMENT...`: later lines win, as they do in Kconfig.
    std::fs::write(
        dir.join("scripts/kconfig/merge_config.sh"),
        "shift; shift; out=$1; shift; cat \"$@\" > \"$out/.config\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("init/main.c"), version("first")).unwrap();
    // Every guest kernel gets rrr's source patches (the progress counter, no TSC); the stand-in
    // holds the text they rewrite, in files its Makefile never compiles.
    for (file, anchor) in rrr_kernels::patches::patch_anchors() {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("/* stand-in */\n{anchor}}}\n")).unwrap();
    }
}

/// A C file whose object holds `text`.
fn version(text: &str) -> String {
    format!(
        "const char version_{}[] = \"{text} version\";\n",
        text.len()
    )
}

/// `rrr kernel build --source TREE` with its own cache: the build's directory, its vmlinux and
/// what it printed on stderr.
fn build_tree(
    tree: &std::path::Path,
    cache: &std::path::Path,
) -> (std::path::PathBuf, Vec<u8>, String) {
    let out = rrr()
        .args(["kernel", "build", "--source"])
        .arg(tree)
        .env("RRR_CACHE_DIR", cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "rrr kernel build failed:\n{stderr}");
    let dir = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim_end());
    let vmlinux = std::fs::read(dir.join("vmlinux")).unwrap();
    (dir, vmlinux, stderr)
}

fn holds(vmlinux: &[u8], text: &str) -> bool {
    vmlinux.windows(text.len()).any(|w| w == text.as_bytes())
}

#[test]
fn an_edited_tree_builds_a_new_vmlinux_in_the_same_object_directory() {
    let cache = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    fake_kernel_tree(tree.path());
    let (first_dir, first, stderr) = build_tree(tree.path(), cache.path());
    assert!(holds(&first, "first version"));
    // Off a terminal, each stage gets a line when it begins and one with its time when it ends.
    for stage in ["config", "compile", "link", "DWARF"] {
        assert!(
            stderr.contains(&format!("rrr: guest kernel: {stage}...\n"))
                && stderr.contains(&format!("rrr: guest kernel: {stage} done in ")),
            "no progress lines for {stage}:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("rrr: guest kernel: compile done in ") && stderr.contains(", 1 step\n"),
        "{stderr}"
    );
    assert_eq!(build_tree(tree.path(), cache.path()).0, first_dir);

    std::fs::write(tree.path().join("init/main.c"), version("second")).unwrap();
    let (second_dir, second, _) = build_tree(tree.path(), cache.path());
    assert!(
        holds(&second, "second version") && !holds(&second, "first version"),
        "the build from before the edit came back"
    );
    assert_ne!(second_dir, first_dir);

    // The objects of a tree are kept across edits: the next build is an incremental make.
    let objects: Vec<_> = std::fs::read_dir(cache.path().join("kernels/obj"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".lock"))
        .collect();
    assert_eq!(
        objects.len(),
        1,
        "one object directory per tree: {objects:?}"
    );
}

#[test]
fn a_new_untracked_file_in_a_git_tree_builds_a_new_vmlinux() {
    let cache = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    fake_kernel_tree(tree.path());
    for args in [
        &["init", "-q"][..],
        &["add", "."],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "x",
        ],
    ] {
        let ok = Command::new("git")
            .arg("-C")
            .arg(tree.path())
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }
    let (_, committed, _) = build_tree(tree.path(), cache.path());
    assert!(holds(&committed, "first version"));
    // `git diff HEAD` does not show a new file; the build must.
    std::fs::write(tree.path().join("init/new.c"), version("untracked")).unwrap();
    let (_, with_new, _) = build_tree(tree.path(), cache.path());
    assert!(holds(&with_new, "first version") && holds(&with_new, "untracked version"));
}

/// A kernel built with clang (a syzbot config made by clang, or `--llvm`) on a machine without
/// clang fails at once, saying what to install: here with a PATH that has every command of this
/// machine but clang and LLVM's tools.
#[test]
fn a_clang_build_without_clang_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for sys in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let Ok(entries) = std::fs::read_dir(sys) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let llvm = name.starts_with("clang")
                || name.starts_with("ld.lld")
                || name.starts_with("lld")
                || name.starts_with("llvm-");
            let link = bin.join(&*name);
            if !llvm && !link.exists() {
                let _ = std::os::unix::fs::symlink(entry.path(), link);
            }
        }
    }
    let started = std::time::Instant::now();
    let out = rrr()
        .args(["kernel", "build", "--llvm"])
        .env("PATH", &bin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("built with clang") && err.contains("apt-get install clang lld llvm"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "refused before configuring anything"
    );
}
