//! The kernel's own gdb scripts (`lx-dmesg`, `lx-ps`, `lx-symbols`, ...) for a cached build.
//!
//! Kbuild generates them (`make scripts_gdb`: Python that imports the `linux` package, and a
//! `constants.py` made from the build's config) in the object directory; that target does not
//! need `CONFIG_GDB_SCRIPTS`, so any cached build gets them in a second or two, when first
//! asked for, without a rebuild. A `vmlinux-gdb.py` next to the cached `vmlinux` then loads them:
//! gdb auto-loads `OBJFILE-gdb.py` from the objfile's directory once that directory is on its
//! auto-load safe path.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::KernelError;

/// What gdb auto-loads next to a build's `vmlinux`.
pub const SCRIPT_NAME: &str = "vmlinux-gdb.py";

/// Makes sure `build_dir` (a cached build: `vmlinux`, `.config`, `build.json`) has the kernel's
/// gdb scripts, and returns the path of the `vmlinux-gdb.py` that loads them.
pub fn ensure(build_dir: &Path) -> Result<PathBuf, KernelError> {
    let script = build_dir.join(SCRIPT_NAME);
    if script.is_file() {
        return Ok(script);
    }
    let meta_path = build_dir.join("build.json");
    let meta: serde_json::Value = std::fs::read(&meta_path)
        .map_err(KernelError::io(&meta_path))
        .and_then(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| KernelError::GdbScripts {
                dir: build_dir.to_owned(),
                reason: format!("{} is not valid JSON: {e}", meta_path.display()),
            })
        })?;
    let field = |name: &str| meta.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let unusable = |reason: String| KernelError::GdbScripts {
        dir: build_dir.to_owned(),
        reason,
    };
    let source = field("source_dir")
        .map(PathBuf::from)
        .ok_or_else(|| unusable("build.json does not name the source tree".into()))?;
    let obj = match field("obj_dir") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let key = field("key").ok_or_else(|| unusable("build.json has no key".into()))?;
            let kernels = build_dir
                .parent()
                .ok_or_else(|| unusable("the build is not in a kernel cache".into()))?;
            crate::store::Store::at(kernels).obj_dir(&key)
        }
    };
    if !source.join("scripts/gdb/vmlinux-gdb.py").is_file() {
        return Err(unusable(format!(
            "the source tree {} is gone or has no scripts/gdb",
            source.display()
        )));
    }
    // The scripts' constants come from the config: the object directory must still hold this
    // build (an edited --source tree rebuilds in the same one).
    let same_config =
        std::fs::read(obj.join(".config")).ok() == std::fs::read(build_dir.join(".config")).ok();
    if !same_config {
        return Err(unusable(format!(
            "its object directory {} no longer holds this build; `rrr kernel build` with the same inputs makes it again",
            obj.display()
        )));
    }
    let clang = field("compiler").is_some_and(|c| c.contains("clang"));
    let mut make = Command::new("make");
    make.arg("-s")
        .arg("-C")
        .arg(&source)
        .arg(format!("O={}", obj.display()));
    if clang {
        make.arg("LLVM=1");
    }
    make.arg("scripts_gdb");
    let out = make.output().map_err(|source| KernelError::Spawn {
        command: "make scripts_gdb".into(),
        source,
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
        return Err(KernelError::Command {
            command: format!(
                "make -C {} O={} scripts_gdb",
                source.display(),
                obj.display()
            ),
            status: out.status.to_string(),
            detail: format!(
                ":\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    let inner = obj.join(SCRIPT_NAME);
    if !inner.exists() {
        return Err(unusable(format!(
            "make scripts_gdb made no {}",
            inner.display()
        )));
    }
    // The loader finds `linux/` through `__file__`, which gdb leaves at this wrapper's path when
    // it sources another file from it: the package's directory goes on the path first.
    let text = format!(
        "# Written by rrr: loads the kernel's own gdb scripts (lx-dmesg, lx-ps, lx-symbols, ...),\n\
         # generated for this build in its object directory.\n\
         import gdb\n\
         import sys\n\
         sys.path.insert(0, \"{}\")\n\
         gdb.execute(\"source {}\")\n",
        obj.join("scripts/gdb").display(),
        inner.display()
    );
    let tmp = build_dir.join(format!(".{SCRIPT_NAME}.{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(KernelError::io(&tmp))?;
    std::fs::rename(&tmp, &script).map_err(KernelError::io(&script))?;
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::ensure;
    use crate::KernelError;

    #[test]
    fn a_build_without_its_object_directory_says_so() {
        let cache = tempfile::tempdir().unwrap();
        let kernels = cache.path().join("kernels");
        let build = kernels.join("k1");
        let source = cache.path().join("src");
        std::fs::create_dir_all(source.join("scripts/gdb")).unwrap();
        std::fs::write(source.join("scripts/gdb/vmlinux-gdb.py"), "").unwrap();
        std::fs::create_dir_all(&build).unwrap();
        std::fs::write(build.join(".config"), "CONFIG_X=y\n").unwrap();

        // No build.json: not a build rrr made.
        assert!(matches!(ensure(&build), Err(KernelError::Io { .. })));

        let meta = serde_json::json!({"key": "k1", "source_dir": source});
        std::fs::write(build.join("build.json"), meta.to_string()).unwrap();
        let err = ensure(&build).unwrap_err().to_string();
        assert!(err.contains("no longer holds this build"), "{err}");

        // The object directory rebuilt with another config is refused the same way.
        let obj = kernels.join("obj/k1");
        std::fs::create_dir_all(&obj).unwrap();
        std::fs::write(obj.join(".config"), "CONFIG_X=n\n").unwrap();
        let err = ensure(&build).unwrap_err().to_string();
        assert!(err.contains("no longer holds this build"), "{err}");

        // A source tree that is gone.
        std::fs::remove_dir_all(&source).unwrap();
        let err = ensure(&build).unwrap_err().to_string();
        assert!(err.contains("is gone or has no scripts/gdb"), "{err}");
    }
}
