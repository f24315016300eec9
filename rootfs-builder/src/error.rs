//! What can go wrong while building a rootfs, each with what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    // The I/O errors are part of the message, not a `source`: anyhow's `{:#}` would print the
    // reason twice.
    #[error("cannot read the stimulus {path}: {error}")]
    StimulusUnreadable {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("the stimulus {path} is not a C source file (expected a name ending in .c)")]
    StimulusNotC { path: PathBuf },

    #[error("`{tool}` was not found; install it with `apt-get install {package}`")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },

    #[error("cannot compile {file}:\n{diagnostics}")]
    CompileFailed { file: PathBuf, diagnostics: String },

    #[error("cannot link {file} statically:\n{diagnostics}")]
    LinkFailed { file: PathBuf, diagnostics: String },

    #[error(
        "-m32 needs the 32-bit C library, which gcc cannot find; \
         install it with `apt-get install gcc-multilib`\n{diagnostics}"
    )]
    MultilibMissing { diagnostics: String },

    #[error("cannot compile the guest agent (a bug in rrr):\n{diagnostics}")]
    AgentCompileFailed { diagnostics: String },

    #[error(
        "cannot compile rrr's stimulus runtime (trace-pc, traps) (a bug in rrr):\n{diagnostics}"
    )]
    RuntimeCompileFailed { diagnostics: String },

    #[error("{file}: {error}")]
    Traps {
        file: PathBuf,
        error: crate::traps::TrapError,
    },

    #[error(
        "{path} is not a statically linked busybox ({why}); \
         install one with `apt-get install busybox-static`"
    )]
    BusyboxUnusable { path: PathBuf, why: String },

    #[error("`{command}` failed ({status}):\n{output}")]
    ToolFailed {
        command: String,
        status: std::process::ExitStatus,
        output: String,
    },

    #[error("`qemu-img check` found problems in {path}:\n{report}")]
    ImageCheckFailed { path: PathBuf, report: String },

    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
}

impl RootfsError {
    /// An I/O error with a sentence saying what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |error| RootfsError::Io { what, error }
    }
}
