//! Running the host tools a build needs (gcc, mke2fs, debugfs, qemu-img), with errors that say
//! which package to install when one is missing.

use std::process::{Command, Output};

use crate::RootfsError;

/// A host program and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const GCC: Tool = Tool {
    program: "gcc",
    package: "gcc",
};
pub const MKE2FS: Tool = Tool {
    program: "mke2fs",
    package: "e2fsprogs",
};
pub const DEBUGFS: Tool = Tool {
    program: "debugfs",
    package: "e2fsprogs",
};
pub const QEMU_IMG: Tool = Tool {
    program: "qemu-img",
    package: "qemu-utils",
};

impl Tool {
    pub fn command(self) -> Command {
        Command::new(self.program)
    }

    /// Runs to completion and returns the output whatever the exit status; only a failure to
    /// start is an error here.
    pub fn output(self, cmd: &mut Command) -> Result<Output, RootfsError> {
        tracing::debug!(command = %describe(cmd), "running");
        cmd.output().map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => RootfsError::ToolMissing {
                tool: self.program,
                package: self.package,
            },
            _ => RootfsError::Io {
                what: format!("cannot run `{}`", describe(cmd)),
                error: err,
            },
        })
    }

    /// Runs to completion and fails with the tool's own output unless it exits 0.
    pub fn run(self, cmd: &mut Command) -> Result<Output, RootfsError> {
        let output = self.output(cmd)?;
        if !output.status.success() {
            return Err(RootfsError::ToolFailed {
                command: describe(cmd),
                status: output.status,
                output: combined(&output),
            });
        }
        Ok(output)
    }
}

/// The command line, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// stdout then stderr, trimmed: what a user would have seen in a terminal.
pub fn combined(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.trim_end().to_string()
}
