//! rrr's build-time patches to the guest kernel, applied to a private copy of the source tree.
//!
//! 1. **The progress counter** (`kernel/kcov.c`). With `CONFIG_KCOV_INSTRUMENT_ALL`, gcc calls
//!    `__sanitizer_cov_trace_pc()` at every basic block of instrumented code. The patch makes
//!    that function count its calls and write one byte to rrr's progress port every
//!    [`PROGRESS_INTERVAL`] of them: a synchronous VM exit at a point that replays itself, where
//!    the VMM can advance virtual time and inject timer interrupts (DESIGN.md, "A software
//!    progress counter instead of a PMU"). KCOV's own behaviour is kept: the count comes first,
//!    then the original body runs unchanged.
//! 2. **No TSC behind the cleared CPUID bit** (`asm/timex.h`, `asm/tsc.h`). x86-64 kernels read
//!    the TSC in `random_get_entropy()` and `get_cycles()` even when `clearcpuid=tsc` took the
//!    feature away, because `CONFIG_X86_TSC` is always set there; the random pool then mixes host
//!    time at every interrupt and two runs print different random bytes. The patch makes both
//!    respect the feature bit, so they fall back to the (jiffies) clocksource.
//!
//! Why at build time rather than by the VMM rewriting code in guest memory at load: every kernel
//! rrr runs is built by this driver from source (the default one and syzbot's), so the compiler
//! places the counter, nothing has to decode or relocate instructions (which change with every
//! compiler and config), and the patches are part of the source identity, hence of the build's
//! cache key.
//!
//! The source tree is shared (the carrier kernel builds from the same tree, out of tree, and
//! gets no patch), so it is never written to: the patched tree is a hard-linked copy under the
//! cache with its own copies of the patched files, made once and named by the original identity
//! and the patches.

use std::path::{Path, PathBuf};
use std::process::Command;

use rrr_guest::protocol::{
    PROGRESS_FROM_KERNEL, PROGRESS_INTERVAL, PROGRESS_PORT, TRACE_DATA_SIZE, TRACE_DATA_SYMBOL,
    TRACE_TEXT_SIZE, TRACE_TEXT_SYMBOL,
};
use sha2::{Digest, Sha256};

use crate::error::KernelError;
use crate::source::{run_capture, ResolvedSource};

/// The file the progress counter goes into, relative to the source tree.
pub const KCOV_C: &str = "kernel/kcov.c";
/// The function head the count is inserted after.
const ANCHOR: &str = "void notrace __sanitizer_cov_trace_pc(void)\n{\n";
/// Written inside a patched copy once it is complete.
const MARKER: &str = ".rrr-patched";

/// The code placed before `__sanitizer_cov_trace_pc`.
fn helper() -> String {
    format!(
        r#"
/*
 * rrr: a progress counter for deterministic record and replay. Every {PROGRESS_INTERVAL} calls of
 * __sanitizer_cov_trace_pc() write one byte to I/O port {PROGRESS_PORT:#x}: a VM exit at a
 * point that replays itself, where rrr can let timers fire. xadd reads and increments in one
 * instruction, so an interrupt handler's own calls never lose or repeat a count (rrr runs one
 * CPU: no lock prefix needed).
 */
static unsigned long rrr_progress_count;

static __always_inline void rrr_progress_tick(void)
{{
	unsigned long count = 1;

	asm volatile("xaddq %0, %1" : "+r"(count), "+m"(rrr_progress_count));
	if (unlikely(((count + 1) & {mask:#x}UL) == 0))
		asm volatile("outb %b0, %w1" : : "a"((unsigned char){tag:#x}), "Nd"((unsigned short){PROGRESS_PORT:#x}));
}}

/*
 * rrr: room for the trace pass's probes. The tracer writes a jump over each traced function's
 * __fentry__ NOP and over each `ret; int3; int3; int3; int3` return site (what
 * CONFIG_MITIGATION_RETHUNK's return thunk jumps become without the mitigation) to stubs it
 * writes into {text}; they append a record of the call to {data}, which it drains at its exits.
 * No code refers to either; a trace puts back the int3s and zeroes it found. Both go into the
 * plain .text and .bss input sections, which the linker script places inside _stext.._etext
 * and the kernel's .bss (a section of their own would be an orphan, placed after _etext).
 */
asm(".pushsection .text, \"ax\"\n"
    ".balign 4096\n"
    ".globl {text}\n"
    "{text}:\n"
    ".fill {text_size:#x}, 1, 0xcc\n"
    ".popsection\n"
    ".pushsection .bss, \"aw\"\n"
    ".balign 4096\n"
    ".globl {data}\n"
    "{data}:\n"
    ".skip {data_size:#x}\n"
    ".popsection\n");

"#,
        mask = PROGRESS_INTERVAL - 1,
        tag = PROGRESS_FROM_KERNEL,
        text = TRACE_TEXT_SYMBOL,
        text_size = TRACE_TEXT_SIZE,
        data = TRACE_DATA_SYMBOL,
        data_size = TRACE_DATA_SIZE,
    )
}

/// The line placed first in the function body.
const CALL: &str = "\trrr_progress_tick();\n";

/// The TSC test both `random_get_entropy()` and `get_cycles()` make in Linux 5.18 to 6.12.
const TSC_TEST: &str =
    "\tif (!IS_ENABLED(CONFIG_X86_TSC) &&\n\t    !cpu_feature_enabled(X86_FEATURE_TSC))\n";
/// What it becomes.
const TSC_TEST_PATCHED: &str = "\t/* rrr: no TSC once clearcpuid=tsc cleared it (host time is not replayable). */\n\tif (!cpu_feature_enabled(X86_FEATURE_TSC))\n";

/// One rewrite: `find` must occur exactly once in `file`, and becomes `replace`.
struct Patch {
    file: &'static str,
    find: String,
    replace: String,
}

fn patches() -> Vec<Patch> {
    vec![
        Patch {
            file: KCOV_C,
            find: ANCHOR.into(),
            replace: format!("{}{ANCHOR}{CALL}", helper()),
        },
        Patch {
            file: "arch/x86/include/asm/timex.h",
            find: TSC_TEST.into(),
            replace: TSC_TEST_PATCHED.into(),
        },
        Patch {
            file: "arch/x86/include/asm/tsc.h",
            find: TSC_TEST.into(),
            replace: TSC_TEST_PATCHED.into(),
        },
    ]
}

/// Each file rrr patches and the text it must hold once: enough for a stand-in tree (tests of
/// the build driver) to take the patches as a real tree does.
pub fn patch_anchors() -> Vec<(&'static str, String)> {
    patches().into_iter().map(|p| (p.file, p.find)).collect()
}

impl Patch {
    /// `original` patched, or why this kernel's file cannot take the patch.
    fn apply(&self, original: &str) -> Result<String, String> {
        if original.contains(&self.replace) {
            return Err("it is already patched".into());
        }
        match original.matches(self.find.as_str()).count() {
            1 => Ok(original.replacen(self.find.as_str(), &self.replace, 1)),
            0 => Err(format!("no `{}` in it", self.find.trim())),
            _ => Err(format!("`{}` appears more than once", self.find.trim())),
        }
    }
}

/// `kcov.c` with the counter, or why this kernel's `kcov.c` cannot take it.
pub fn patch_kcov(original: &str) -> Result<String, String> {
    patches()[0].apply(original)
}

/// What the patches add to a source identity: changes whenever any patch does.
pub fn identity_suffix() -> String {
    let mut hasher = Sha256::new();
    for patch in patches() {
        for part in [patch.file, &patch.find, &patch.replace] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    format!("+rrr-patches:{}", &hex::encode(hasher.finalize())[..16])
}

/// The identity of `identity` with the patches applied.
pub fn patched_identity(identity: &str) -> String {
    format!("{identity}{}", identity_suffix())
}

/// A patched copy of `source` under `cache_dir/sources/`, one per source tree: made on first
/// use and made again when the tree's contents change. Its place depends only on where the tree
/// is, so a local tree's objects (kept per source directory) survive edits and the next build
/// is an incremental `make`.
pub fn patched_source(
    source: &ResolvedSource,
    cache_dir: &Path,
    progress: &dyn Fn(crate::Progress),
) -> Result<ResolvedSource, KernelError> {
    let identity = patched_identity(&source.identity);
    let place = format!("{}{}", source.dir.display(), identity_suffix());
    let name = hex::encode(Sha256::digest(place.as_bytes()));
    let sources = cache_dir.join("sources");
    let dir = sources.join(format!("patched-{}", &name[..16]));
    let current = std::fs::read_to_string(dir.join(MARKER)).ok();
    if current.as_deref().map(str::trim_end) != Some(identity.as_str()) {
        progress(crate::Progress::Stage(crate::Stage::Patch));
        tracing::info!("patching a copy of the source (rrr's progress counter, no TSC)");
        make_patched_copy(&source.dir, &sources, &dir, &identity)?;
    }
    Ok(ResolvedSource { dir, identity })
}

fn make_patched_copy(
    src: &Path,
    parent: &Path,
    dest: &Path,
    identity: &str,
) -> Result<(), KernelError> {
    let mut patched = Vec::new();
    for patch in patches() {
        let path = src.join(patch.file);
        let original = std::fs::read_to_string(&path).map_err(KernelError::io(&path))?;
        let text = patch
            .apply(&original)
            .map_err(|reason| KernelError::Patch {
                path: path.clone(),
                reason,
            })?;
        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(KernelError::io(&path))?;
        patched.push((patch.file, text, mtime));
    }
    std::fs::create_dir_all(parent).map_err(KernelError::io(parent))?;
    let tmp = parent.join(format!(".patch-{}", crate::store::unique_suffix()));
    let result = (|| {
        copy_tree(src, &tmp)?;
        for (file, text, mtime) in &patched {
            // The copy's file is a hard link to the shared tree's: unlink it before writing.
            let target = tmp.join(file);
            std::fs::remove_file(&target).map_err(KernelError::io(&target))?;
            std::fs::write(&target, text).map_err(KernelError::io(&target))?;
            // The original's time: a copy made again after an edit elsewhere must not make
            // every file that includes these headers look new to make.
            std::fs::File::options()
                .write(true)
                .open(&target)
                .and_then(|f| f.set_modified(*mtime))
                .map_err(KernelError::io(&target))?;
        }
        let marker = tmp.join(MARKER);
        std::fs::write(&marker, format!("{identity}\n")).map_err(KernelError::io(&marker))?;
        if dest.exists() {
            // A copy of the tree as it was before an edit, or an interrupted one.
            std::fs::remove_dir_all(dest).map_err(KernelError::io(dest))?;
        }
        let done = |d: &Path| {
            std::fs::read_to_string(d.join(MARKER)).is_ok_and(|m| m.trim_end() == identity)
        };
        match std::fs::rename(&tmp, dest) {
            // Another process finished the same copy first; theirs is as good as ours.
            Err(_) if done(dest) => Ok(()),
            other => other.map_err(KernelError::io(dest)),
        }
    })();
    if tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Copies a tree as hard links (seconds, no space), or as a plain copy where the cache is on
/// another filesystem than the tree.
fn copy_tree(src: &Path, dest: &Path) -> Result<(), KernelError> {
    let linked = run_capture(Command::new("cp").arg("-al").arg(src).arg(dest));
    if linked.is_ok() {
        return Ok(());
    }
    tracing::debug!(error = ?linked, "hard-linked copy failed; copying");
    if dest.exists() {
        std::fs::remove_dir_all(dest).map_err(KernelError::io(dest))?;
    }
    run_capture(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(src)
            .arg(dest),
    )
    .map(|_| ())
}

/// Where the patched `kcov.c` of a patched tree is (for messages and tests).
pub fn kcov_path(tree: &Path) -> PathBuf {
    tree.join(KCOV_C)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The function as Linux 6.12 has it (abridged after the declarations).
    const KCOV_612: &str =
        "static notrace unsigned long canonicalize_ip(unsigned long ip)\n{\n\treturn ip;\n}\n\n\
        /*\n * Entry point from instrumented code.\n */\n\
        void notrace __sanitizer_cov_trace_pc(void)\n{\n\tstruct task_struct *t;\n\
        \tunsigned long *area;\n\n\tt = current;\n\tif (!check_kcov_mode(KCOV_MODE_TRACE_PC, t))\n\
        \t\treturn;\n}\nEXPORT_SYMBOL(__sanitizer_cov_trace_pc);\n";

    #[test]
    fn the_count_comes_first_and_the_body_is_kept() {
        let patched = patch_kcov(KCOV_612).unwrap();
        let head = patched.find(ANCHOR).unwrap();
        let helper_at = patched
            .find("static __always_inline void rrr_progress_tick")
            .unwrap();
        assert!(helper_at < head, "the helper must precede its use");
        let body = &patched[head + ANCHOR.len()..];
        assert!(body.starts_with("\trrr_progress_tick();\n\tstruct task_struct *t;"));
        assert!(body.contains("check_kcov_mode(KCOV_MODE_TRACE_PC, t)"));
        // Everything the original had is still there, in order.
        let without: String = patched.replacen(&helper(), "", 1).replacen(CALL, "", 1);
        assert_eq!(without, KCOV_612);
    }

    #[test]
    fn the_port_mask_and_tag_come_from_the_protocol() {
        let text = helper();
        assert!(text.contains(&format!("{PROGRESS_PORT:#x}")));
        assert!(text.contains(&format!("{:#x}UL", PROGRESS_INTERVAL - 1)));
        assert!(text.contains(&format!("{PROGRESS_FROM_KERNEL:#x}")));
        assert!(PROGRESS_INTERVAL.is_power_of_two());
    }

    #[test]
    fn unexpected_sources_are_refused() {
        assert!(patch_kcov("void f(void)\n{\n}\n")
            .unwrap_err()
            .contains("no `"));
        let twice = format!("{KCOV_612}{KCOV_612}");
        assert!(patch_kcov(&twice).unwrap_err().contains("more than once"));
        let patched = patch_kcov(KCOV_612).unwrap();
        assert!(patch_kcov(&patched).unwrap_err().contains("already"));
    }

    #[test]
    fn the_identity_names_the_patch() {
        let id = patched_identity("debian:linux-source-6.12=1");
        assert!(
            id.starts_with("debian:linux-source-6.12=1+rrr-patches:"),
            "{id}"
        );
        assert_eq!(id, patched_identity("debian:linux-source-6.12=1"));
    }

    /// The TSC test as Linux 6.12's `asm/timex.h` has it.
    const TIMEX_612: &str = "static inline unsigned long random_get_entropy(void)\n{\n\
        \tif (!IS_ENABLED(CONFIG_X86_TSC) &&\n\t    !cpu_feature_enabled(X86_FEATURE_TSC))\n\
        \t\treturn random_get_entropy_fallback();\n\treturn rdtsc();\n}\n";

    #[test]
    fn the_tsc_is_read_only_while_its_feature_bit_is_set() {
        let patch = &patches()[1];
        let patched = patch.apply(TIMEX_612).unwrap();
        assert!(!patched.contains("IS_ENABLED(CONFIG_X86_TSC)"), "{patched}");
        assert!(patched.contains(
            "\tif (!cpu_feature_enabled(X86_FEATURE_TSC))\n\t\treturn random_get_entropy_fallback();"
        ));
        assert!(patch.apply(&patched).unwrap_err().contains("already"));
    }

    #[test]
    fn a_patched_copy_leaves_the_original_alone() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("linux");
        std::fs::create_dir_all(src.join("kernel")).unwrap();
        std::fs::create_dir_all(src.join("arch/x86/include/asm")).unwrap();
        std::fs::write(src.join(KCOV_C), KCOV_612).unwrap();
        std::fs::write(src.join("arch/x86/include/asm/timex.h"), TIMEX_612).unwrap();
        std::fs::write(src.join("arch/x86/include/asm/tsc.h"), TIMEX_612).unwrap();
        std::fs::write(src.join("Makefile"), "all:\n").unwrap();
        let source = ResolvedSource {
            dir: src.clone(),
            identity: "tree:x".into(),
        };
        let patched = patched_source(&source, dir.path(), &|_| {}).unwrap();
        assert_ne!(patched.dir, src);
        assert_eq!(patched.identity, patched_identity("tree:x"));
        assert_eq!(std::fs::read_to_string(src.join(KCOV_C)).unwrap(), KCOV_612);
        let text = std::fs::read_to_string(kcov_path(&patched.dir)).unwrap();
        assert!(text.contains("rrr_progress_tick();"));
        let timex = std::fs::read_to_string(patched.dir.join("arch/x86/include/asm/timex.h"));
        assert!(timex.unwrap().contains("rrr: no TSC"));
        assert_eq!(
            std::fs::read_to_string(src.join("arch/x86/include/asm/timex.h")).unwrap(),
            TIMEX_612
        );
        assert!(patched.dir.join("Makefile").is_file());
        // A second call finds the copy.
        let again = patched_source(&source, dir.path(), &|_| panic!("copied twice")).unwrap();
        assert_eq!(again.dir, patched.dir);
    }
}
