//! Everything that can go wrong building a kernel, each with what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "this kernel is built with clang (its config was made by clang, CONFIG_CC_IS_CLANG=y, or --llvm was given), which needs clang, ld.lld and LLVM's binutils, and they are not all installed: `sudo apt-get install clang lld llvm`"
    )]
    NoClang,

    #[error("cannot run `{command}` (is it installed? try `sudo scripts/setup`)")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}){detail}")]
    Command {
        command: String,
        status: String,
        detail: String,
    },

    #[error(
        "the Debian kernel source is not installed ({tarball} is missing): \
         run `sudo apt-get install linux-source-6.12` or pass --source DIR"
    )]
    DebianSourceMissing { tarball: PathBuf },

    #[error("{path} is not a kernel source tree (no Makefile and Kconfig there)")]
    NotASourceTree { path: PathBuf },

    #[error("the kernel's gdb scripts (lx-dmesg, lx-ps, ...) cannot be made for {dir}: {reason}")]
    GdbScripts { dir: PathBuf, reason: String },

    #[error("base config {path} cannot be read")]
    BaseConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("config fragment {path} cannot be read")]
    Fragment {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Kconfig did not keep options rrr asked for:\n{report}")]
    OptionsDropped { report: String },

    #[error(
        "cannot apply rrr's guest-kernel patch to {path}: {reason}; rrr's patches \
         (kernels/src/patches.rs) expect that file as Linux 6.x has it"
    )]
    Patch { path: PathBuf, reason: String },

    #[error("the kernel build failed; full log: {log}\n{errors}")]
    BuildFailed { log: PathBuf, errors: String },

    #[error(
        "the built {vmlinux} has no DWARF (.debug_info), which the tracer needs; \
         check that the config keeps CONFIG_DEBUG_INFO_DWARF5=y{detail}"
    )]
    NoDwarf { vmlinux: PathBuf, detail: String },
}

impl KernelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| KernelError::Io { path, source }
    }
}
