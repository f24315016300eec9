//! Compiling the stimulus (the way syzkaller builds reproducers) and the guest agent.

use std::path::{Path, PathBuf};

use crate::tool::{combined, GCC};
use crate::traps::{self, TrapReport};
use crate::RootfsError;

/// Where the stimulus's source directory appears in its debug info, so the binary (and the image)
/// does not depend on where the user keeps the file.
pub const STIMULUS_SOURCE_DIR: &str = "/rrr/stimulus";

/// What to compile and how.
#[derive(Debug, Clone)]
pub struct StimulusBuild<'a> {
    pub source: &'a Path,
    pub m32: bool,
    pub extra_cflags: &'a [String],
    /// Fed to `-frandom-seed` so gcc's few random choices repeat.
    pub seed: &'a str,
}

/// Instrumentation for the stimulus: a call to `__sanitizer_cov_trace_pc()` at every basic block,
/// answered by rrr's runtime (`guest/agent/trace_pc.c`), which makes every 65536th one a progress
/// exit so user code without system calls is preempted at deterministic points.
pub const TRACE_PC_FLAG: &str = "-fsanitize-coverage=trace-pc";

/// Hooks at every entry and exit of the stimulus's functions, answered by rrr's runtime
/// (`guest/agent/func_probes.c`): two calls that do nothing while recording and replaying, and
/// that the trace pass turns into probes, so the trace shows the stimulus's own functions.
pub const FUNC_HOOKS_FLAG: &str = "-finstrument-functions";

/// Compiles the stimulus into `out` with `gcc -O2 -g -pthread`, [`TRACE_PC_FLAG`] and
/// [`FUNC_HOOKS_FLAG`], static,
/// symbols kept, linked with rrr's runtime, its `rdrand`/`rdseed` rewritten into traps
/// ([`crate::traps`]). Links as `-static-pie` where the toolchain can and falls back to
/// `-static`. No `-Werror`: reproducers are generated code and warn a lot.
pub fn compile_stimulus(
    build: &StimulusBuild,
    work: &Path,
    out: &Path,
) -> Result<TrapReport, RootfsError> {
    let source = build
        .source
        .canonicalize()
        .map_err(|error| RootfsError::StimulusUnreadable {
            path: build.source.to_path_buf(),
            error,
        })?;
    let (dir, name) = split(&source)?;
    if build.m32 {
        check_multilib(work)?;
    }
    let object = work.join("stimulus.o");

    // Compiling from the source's own directory keeps gcc's messages short (`hello.c:3:5: ...`)
    // and, with the prefix map, keeps the host path out of the debug info.
    let mut compile = GCC.command();
    compile
        .current_dir(dir)
        .args([
            "-O2",
            "-g",
            "-pthread",
            TRACE_PC_FLAG,
            FUNC_HOOKS_FLAG,
            "-c",
        ])
        .args(common_flags(build))
        .arg(format!(
            "-ffile-prefix-map={}={STIMULUS_SOURCE_DIR}",
            dir.display()
        ))
        .arg("-o")
        .arg(&object)
        .arg(name);
    let output = GCC.output(&mut compile)?;
    if !output.status.success() {
        return Err(RootfsError::CompileFailed {
            file: source,
            diagnostics: combined(&output),
        });
    }
    log_warnings(&source, &output);
    let runtime = compile_runtime(build, work)?;

    let mut last = String::new();
    for link_mode in ["-static-pie", "-static"] {
        let mut link = GCC.command();
        link.args(["-O2", "-g", "-pthread", link_mode])
            .args(common_flags(build))
            .arg("-o")
            .arg(out)
            .arg(&object)
            .args(&runtime);
        let output = GCC.output(&mut link)?;
        if output.status.success() {
            tracing::info!(stimulus = %source.display(), link_mode, "stimulus compiled");
            return rewrite_traps(&source, out);
        }
        last = combined(&output);
        tracing::debug!(link_mode, diagnostics = %last, "link attempt failed");
    }
    Err(RootfsError::LinkFailed {
        file: source,
        diagnostics: last,
    })
}

/// Rewrites the linked binary's `rdrand`/`rdseed` in place (see [`crate::traps`]).
fn rewrite_traps(source: &Path, binary: &Path) -> Result<TrapReport, RootfsError> {
    let mut image = std::fs::read(binary)
        .map_err(RootfsError::io(format!("cannot read {}", binary.display())))?;
    let report = traps::rewrite_elf(&mut image).map_err(|error| RootfsError::Traps {
        file: source.to_path_buf(),
        error,
    })?;
    if !report.trapped.is_empty() {
        let addresses: Vec<String> = report
            .trapped
            .iter()
            .map(|site| format!("{} {:#x}", site.kind.name(), site.address))
            .collect();
        tracing::info!(
            stimulus = %source.display(),
            "rdtsc/rdtscp answered from virtual time at run time: {}",
            addresses.join(", ")
        );
    }
    if !report.rewritten.is_empty() {
        std::fs::write(binary, &image).map_err(RootfsError::io(format!(
            "cannot write {}",
            binary.display()
        )))?;
    }
    Ok(report)
}

/// The stimulus runtime's objects (`trace_pc.c`, `traps.c`, `func_probes.c`), built like the stimulus (same word
/// size) but neither instrumented (the trace-pc hook would call itself) nor with the user's extra
/// flags (which may instrument).
fn compile_runtime(build: &StimulusBuild, work: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    let dir = work.join("runtime-src");
    write_guest_sources(&dir)?;
    let mut objects = Vec::new();
    for source in rrr_guest::agent::RUNTIME_SOURCES {
        let object = work.join(Path::new(source).with_extension("o"));
        let mut compile = GCC.command();
        compile
            .current_dir(&dir)
            .args(["-O2", "-Wall", "-c"])
            .arg(format!("-frandom-seed={}", build.seed));
        if build.m32 {
            compile.arg("-m32");
        }
        compile.arg("-o").arg(&object).arg(source);
        let output = GCC.output(&mut compile)?;
        if !output.status.success() {
            return Err(RootfsError::RuntimeCompileFailed {
                diagnostics: combined(&output),
            });
        }
        objects.push(object);
    }
    Ok(objects)
}

/// Writes the guest's C sources (agent, runtime, protocol header) side by side into `dir`.
fn write_guest_sources(dir: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(dir)
        .map_err(RootfsError::io(format!("cannot create {}", dir.display())))?;
    for (name, text) in rrr_guest::agent::SOURCES {
        std::fs::write(dir.join(name), text)
            .map_err(RootfsError::io(format!("cannot write {name}")))?;
    }
    Ok(())
}

fn common_flags(build: &StimulusBuild) -> Vec<String> {
    let mut flags = vec![format!("-frandom-seed={}", build.seed)];
    if build.m32 {
        flags.push("-m32".into());
    }
    flags.extend(build.extra_cflags.iter().cloned());
    flags
}

fn split(source: &Path) -> Result<(&Path, &std::ffi::OsStr), RootfsError> {
    match (source.parent(), source.file_name()) {
        (Some(dir), Some(name)) if source.extension().is_some_and(|e| e == "c") => Ok((dir, name)),
        _ => Err(RootfsError::StimulusNotC {
            path: source.to_path_buf(),
        }),
    }
}

/// A 32-bit static link needs gcc-multilib's crt files and libc.a; without them gcc's own message
/// (`bits/libc-header-start.h: No such file`) does not say what to install.
fn check_multilib(work: &Path) -> Result<(), RootfsError> {
    let probe = work.join("m32-probe.c");
    std::fs::write(&probe, "#include <stdio.h>\nint main(void) { return 0; }\n")
        .map_err(RootfsError::io("cannot write the -m32 probe"))?;
    let output = GCC.output(
        GCC.command()
            .args(["-m32", "-static", "-o"])
            .arg(work.join("m32-probe"))
            .arg(&probe),
    )?;
    if output.status.success() {
        Ok(())
    } else {
        Err(RootfsError::MultilibMissing {
            diagnostics: combined(&output),
        })
    }
}

fn log_warnings(source: &Path, output: &std::process::Output) {
    let text = combined(output);
    if !text.is_empty() {
        tracing::info!(stimulus = %source.display(), "gcc warnings:\n{text}");
    }
}

/// Compiles the embedded agent source into `out` (`gcc -O2 -static -Wall`).
pub fn compile_agent(work: &Path, out: &Path) -> Result<(), RootfsError> {
    let dir = work.join("agent-src");
    write_guest_sources(&dir)?;
    let output = GCC.output(
        GCC.command()
            .current_dir(&dir)
            .args(["-O2", "-static", "-Wall", "-o"])
            .arg(out)
            .arg("agent.c"),
    )?;
    if !output.status.success() {
        return Err(RootfsError::AgentCompileFailed {
            diagnostics: combined(&output),
        });
    }
    let warnings = combined(&output);
    if !warnings.is_empty() {
        tracing::warn!("the guest agent compiled with warnings:\n{warnings}");
    }
    Ok(())
}
