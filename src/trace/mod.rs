//! The trace pass over a replay (`rrr trace`, `rrr replay --trace`): probes in the guest's
//! kernel ([`probes`]), what each hit becomes in the trace ([`tracer`]), values decoded by
//! DWARF type ([`decode`]), guest memory read by virtual address ([`guest`]). The replay itself
//! is the plain one: [`TracedReplay`] wraps the [`Replayer`] and only adds the probes, which
//! neither count as exits nor move virtual time, and are lifted before anything compares guest
//! state.

pub mod decode;
pub mod func_probes;
pub mod guest;
pub mod introspect;
pub mod observe;
pub mod probes;
pub mod stubs;
pub mod tracer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rrr_tracer::Index;
use rrr_vmm::builder::Vmm;
use rrr_vmm::clock::VirtualTime;
use rrr_vmm::rr::{ExecMode, ExitWhat, Replayer, RrError};

pub use introspect::Introspection;
pub use observe::{ObservationFile, Observer, Sink};
pub use tracer::{EmitFilter, Tracer};

/// What to trace. With no filter: every traceable kernel function, from GO to the end.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TraceArgs {
    /// Where to write the trace (default: beside the recording, as `REC.pftrace`).
    #[arg(
        id = "trace_output",
        long = "trace-output",
        value_name = "FILE.pftrace"
    )]
    pub output: Option<PathBuf>,
    /// Only kernel functions whose name matches (a glob: `*` and `?`); repeatable. System
    /// calls and the stimulus's own functions are always traced.
    #[arg(long = "function", value_name = "GLOB")]
    pub functions: Vec<String>,
    /// Only kernel functions from source files under this path (`fs/`, `mm/slub.c`);
    /// repeatable.
    #[arg(long = "source", value_name = "PATH")]
    pub sources: Vec<String>,
    /// Only these tasks (pid or thread-group id); repeatable.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<i32>,
    /// Only this many levels of calls per task (the system call counts as one).
    #[arg(long, value_name = "N")]
    pub depth: Option<u32>,
}

impl TraceArgs {
    /// The options as command-line words (for the carrier, which re-runs the command).
    pub fn to_words(&self) -> Vec<std::ffi::OsString> {
        let mut words: Vec<std::ffi::OsString> = Vec::new();
        if let Some(out) = &self.output {
            words.push("--trace-output".into());
            words.push(std::path::absolute(out).unwrap_or(out.clone()).into());
        }
        for f in &self.functions {
            words.extend(["--function".into(), f.into()]);
        }
        for s in &self.sources {
            words.extend(["--source".into(), s.into()]);
        }
        for p in &self.pids {
            words.extend(["--pid".into(), p.to_string().into()]);
        }
        if let Some(d) = self.depth {
            words.extend(["--depth".into(), d.to_string().into()]);
        }
        words
    }

    /// The trace file for `recording`.
    pub fn output_for(&self, recording: &Path) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| recording.with_extension("pftrace"))
    }
}

/// The kernel's DWARF index, built once per `vmlinux` (by content) and cached.
pub fn load_index(vmlinux: &Path) -> Result<Index> {
    let digest = crate::digest::file_sha256(vmlinux)?;
    let dir = crate::cache::cache_dir()?.join("dwarf");
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the index cache {}", dir.display()))?;
    let path = dir.join(format!("{digest}.idx"));
    if let Ok(index) = Index::load(&path) {
        return Ok(index);
    }
    let spinner = crate::progress::spinner(format!("indexing {}'s DWARF", vmlinux.display()));
    let started = std::time::Instant::now();
    let index = Index::build(vmlinux)
        .with_context(|| format!("cannot index the kernel {}", vmlinux.display()))?;
    spinner.finish_and_clear();
    eprintln!(
        "rrr: indexed {} functions of {} in {:.1} s",
        index.functions.len(),
        vmlinux.display(),
        started.elapsed().as_secs_f64()
    );
    if !index.has_dwarf() {
        eprintln!(
            "rrr: warning: {} has no DWARF: the trace has function names from its symbols but no arguments (build the kernel with CONFIG_DEBUG_INFO)",
            vmlinux.display()
        );
    }
    if let Err(e) = index.save(&path) {
        tracing::warn!("cannot cache the index: {e}");
    }
    Ok(index)
}

/// Which functions get probes: every traceable function in the kernel's permanent text that the
/// filters let through, and the system call wrappers always.
pub fn choose_functions(index: &Index, args: &TraceArgs) -> Result<Vec<u32>> {
    let text = match (index.symbol("_stext"), index.symbol("_etext")) {
        (Some(s), Some(e)) => s.address..e.address,
        _ => bail!("the kernel's symbols have no _stext/_etext: is this a vmlinux?"),
    };
    let mut chosen = Vec::new();
    let mut matched_filter = 0usize;
    for (i, f) in index.functions.iter().enumerate() {
        let Some(site) = f.fentry else { continue };
        if !text.contains(&site) {
            continue;
        }
        let syscall = introspect::SYSCALL_PREFIXES
            .iter()
            .any(|p| f.name.starts_with(p));
        let by_name =
            args.functions.is_empty() || args.functions.iter().any(|g| glob_match(g, &f.name));
        let by_source = args.sources.is_empty() || {
            let path = index.source_path(f);
            args.sources.iter().any(|s| path.starts_with(s.as_str()))
        };
        if by_name && by_source {
            matched_filter += 1;
        }
        if syscall || (by_name && by_source) {
            chosen.push(i as u32);
        }
    }
    if matched_filter == 0 && !(args.functions.is_empty() && args.sources.is_empty()) {
        bail!(
            "no traceable kernel function matches the filters (functions {:?}, sources {:?}); names are C names such as do_sys_openat2 or vfs_*, sources are paths in the kernel tree such as fs/ or mm/slub.c",
            args.functions,
            args.sources
        );
    }
    if chosen.is_empty() {
        bail!("the kernel has no traceable functions (no __fentry__ sites: build it with CONFIG_FUNCTION_TRACER)");
    }
    Ok(chosen)
}

/// `*` any run of characters, `?` any one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A replay with the trace pass: the replayer decides everything about the run; the observer
/// handles the exits its probes cause and drains its stubs' records at every exit.
pub struct TracedReplay {
    pub replayer: Replayer,
    pub observer: Observer,
}

impl ExecMode for TracedReplay {
    rrr_vmm::replayer_passthrough!(replayer);

    fn after_exit(
        &mut self,
        vmm: &mut Vmm,
        exits: u64,
        now: VirtualTime,
        what: ExitWhat,
    ) -> Result<(), RrError> {
        self.observer.exit_seen(vmm, exits, now)?;
        self.replayer.after_exit(vmm, exits, now, what)
    }

    fn probe_hit(&mut self, vmm: &mut Vmm, exits: u64, now: VirtualTime) -> Result<bool, RrError> {
        self.observer.hit(vmm, exits, now)
    }

    fn func_probe(&mut self, vmm: &mut Vmm, exits: u64, now: VirtualTime) -> Result<bool, RrError> {
        self.observer.func_hit(vmm, exits, now)
    }

    fn landmark_due(&mut self, vmm: &mut Vmm, exits: u64) -> Result<bool, RrError> {
        if !self.replayer.landmark_at(exits) {
            return Ok(false);
        }
        // The replayer finds the landmark with its own debug exits and compares registers and
        // written memory: the probes step aside meanwhile (calls in those few instructions are
        // not in the trace).
        let planted = self.observer.planted();
        if planted {
            self.observer.lift(vmm)?;
        }
        let due = self.replayer.landmark_due(vmm, exits);
        if planted {
            self.observer.replant(vmm)?;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs_match_kernel_names() {
        assert!(glob_match("do_sys_open*", "do_sys_openat2"));
        assert!(glob_match("*openat*", "__x64_sys_openat"));
        assert!(glob_match("vfs_?rite", "vfs_write"));
        assert!(glob_match("*", "anything"));
        assert!(!glob_match("vfs_*", "do_vfs_ioctl"));
        assert!(!glob_match("ksys_read", "ksys_readv"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }
}
