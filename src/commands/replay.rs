//! `rrr replay REC [--partial]`: restores the snapshot the recording started from, inserts the
//! recorded stimulus, and feeds the log back: console input at its exits, landmarks at their
//! recorded states, every checkpoint checked, and at the end the final state hash, the console
//! and the verdict compared. The first difference stops the replay with a report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rrr_vmm::rr::log::{Header, Recording, Tail};
use rrr_vmm::rr::{ExecMode, Plain, Replayer, RrError};
use rrr_vmm::run_loop::RunError;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::run::{self, Finished, Ready, Session};
use crate::gdb::conn::Endpoint;
use crate::gdb::{Debugger, GdbReplay};
use crate::machine::{MachineSpec, StartKind};
use crate::trace::{
    self, EmitFilter, Introspection, ObservationFile, Observer, Sink, TraceArgs, TracedReplay,
    Tracer,
};

/// The host-time limit of a replay under gdb: a week (the user decides when it goes on).
const GDB_HOST_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

#[derive(clap::Args)]
pub struct Args {
    /// The recording (`rrr record -o REC`).
    pub recording: PathBuf,
    /// Replay an incomplete recording (cut short by Ctrl-C, a kill or a full disk) up to its
    /// last whole record.
    #[arg(long)]
    pub partial: bool,
    /// Do not stream the guest console (it is still saved in the run directory).
    #[arg(long, short)]
    pub quiet: bool,
    /// Where to keep the console and the summary (default: a new directory under the cache).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Run on this host's /dev/kvm even if it is software-only (no carrier).
    #[arg(long)]
    pub direct: bool,
    /// Print the recording's header and records instead of replaying it.
    #[arg(long)]
    pub dump: bool,
    /// The kernel build directory or vmlinux (default: where it was when recorded); its hash
    /// must be the recorded one.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The base rootfs image (default: where it was when recorded); its hash must be the
    /// recorded one.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Trace the replay: every kernel function call (or those the filters keep) with its
    /// arguments and return value, and the system calls, per task, as a Perfetto trace.
    #[arg(long)]
    pub trace: bool,
    #[command(flatten)]
    pub trace_args: TraceArgs,
    /// Serve the GDB remote protocol on the replay (loopback only; default 127.0.0.1:1234): it
    /// waits at READY for gdb, with breakpoints, single steps and watchpoints that leave the
    /// recording's timeline alone. Use it as `rrr replay REC --gdb [ADDR:PORT]`.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        num_args = 0..=1,
        default_missing_value = crate::gdb::DEFAULT_ADDR,
        conflicts_with = "trace"
    )]
    pub gdb: Option<String>,
    /// Inside the carrier: gdb's bytes come over the carrier's virtio-serial port, which QEMU
    /// connects to the `--gdb` address on the host.
    #[arg(long, hide = true, requires = "gdb")]
    pub gdb_carrier_port: bool,
    /// Inside the carrier: write the trace pass's observations to this file, not the trace
    /// (the host writes the trace from them after the replay, natively).
    #[arg(long, hide = true, value_name = "FILE", requires = "trace")]
    pub trace_observations: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<i32> {
    let started = Instant::now();
    let recording = Recording::read(&args.recording)
        .with_context(|| format!("cannot replay {}", args.recording.display()))?;
    if args.dump {
        dump(&recording);
        return Ok(0);
    }
    check_usable(&recording, &args)?;
    let gdb_addr = args
        .gdb
        .as_deref()
        .map(crate::gdb::parse_addr)
        .transpose()?;
    if gdb_addr.is_some() && args.trace {
        bail!("--gdb and --trace cannot be combined yet: trace the recording with `rrr trace`, then debug it with `rrr replay --gdb`");
    }
    let header = &recording.header;
    let kernel = match &args.kernel {
        Some(path) => super::boot::resolve_kernel(path)?,
        None if Path::new(&header.kernel_path).is_file() => PathBuf::from(&header.kernel_path),
        None => super::kernel::ensure_default_kernel()?.vmlinux(),
    };
    let rootfs = match &args.rootfs {
        Some(path) => path.clone(),
        None if Path::new(&header.rootfs_path).is_file() => PathBuf::from(&header.rootfs_path),
        None => super::rootfs::ensure_base_rootfs()?,
    };
    let spec = MachineSpec {
        kernel: kernel.clone(),
        rootfs: rootfs.clone(),
        mem_mib: header.config.mem_mib,
        append: header.config.append.clone(),
        seed: header.config.seed,
        progress_interval: header.config.progress_interval,
    };
    let expected = spec.expected_identity()?;
    if let Some(difference) = header.snapshot.difference(&expected) {
        bail!(
            "the recording {} was made from another snapshot: {difference}; it was recorded with the kernel {} and the rootfs {}: pass --kernel and --rootfs with those (the same contents) to replay or trace it",
            args.recording.display(),
            header.kernel_path,
            header.rootfs_path
        );
    }
    let run_dir = match &args.run_dir {
        Some(dir) => dir.clone(),
        None => crate::cache::cache_dir()?.join("runs").join(format!(
            "replay-{}-{}",
            Path::new(&header.stimulus_name)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        )),
    };
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create the run directory {}", run_dir.display()))?;
    let stimulus_binary = run_dir.join("stimulus.bin");
    std::fs::write(&stimulus_binary, &header.stimulus)
        .with_context(|| format!("cannot write {}", stimulus_binary.display()))?;
    // The trace's index and filters are checked here, before any VM (or carrier) starts: a
    // filter that matches nothing is an error in a second, not after a boot.
    let traced = if args.trace {
        let index = trace::load_index(&kernel)?;
        let functions = trace::choose_functions(&index, &args.trace_args)?;
        Some((index, functions))
    } else {
        None
    };
    // gdb's `lx-` commands are the kernel's own scripts, made once per cached build (on the
    // host, where `make` and the source tree are).
    if gdb_addr.is_some() && !args.gdb_carrier_port {
        if let Some(dir) = kernel.parent() {
            if let Err(err) = rrr_kernels::gdb_scripts::ensure(dir) {
                eprintln!(
                    "rrr: warning: {}; gdb works without the lx- commands",
                    anyhow::Error::from(err)
                        .chain()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(": ")
                );
            }
        }
    }
    let run_args = run::Args {
        stimulus: PathBuf::from(&header.stimulus_name),
        kernel: Some(kernel.clone()),
        time_limit: header.config.time_limit_secs,
        // Generous: a replay stopped by host time would only report that as a divergence. Under
        // gdb the guest stands still for as long as the user looks at it.
        timeout: Some(if gdb_addr.is_some() {
            GDB_HOST_TIMEOUT_SECS
        } else {
            header.config.host_timeout_secs.saturating_mul(2)
        }),
        mem: header.config.mem_mib,
        append: header.config.append.clone(),
        m32: false,
        seed: header.config.seed,
        progress_interval: header.config.progress_interval,
        direct: args.direct,
        quiet: args.quiet,
        run_dir: Some(run_dir.clone()),
        boot: false,
        stdin: false,
        rootfs: Some(rootfs.clone()),
        stimulus_binary: Some(stimulus_binary.clone()),
    };
    if run::needs_carrier(args.direct) {
        let run_dir = std::path::absolute(&run_dir).unwrap_or(run_dir);
        let recording_path =
            std::path::absolute(&args.recording).unwrap_or_else(|_| args.recording.clone());
        let mut cmd: Vec<std::ffi::OsString> = vec![
            std::env::current_exe()
                .context("cannot find the rrr executable")?
                .into(),
            "replay".into(),
            recording_path.clone().into(),
            "--kernel".into(),
            kernel.into(),
            "--rootfs".into(),
            rootfs.into(),
            "--run-dir".into(),
            run_dir.clone().into(),
        ];
        if args.partial {
            cmd.push("--partial".into());
        }
        if args.quiet {
            cmd.push("--quiet".into());
        }
        let trace_output = std::path::absolute(args.trace_args.output_for(&recording_path))
            .unwrap_or_else(|_| args.trace_args.output_for(&recording_path));
        let observations = run_dir.join("trace.observations");
        if args.trace {
            let mut words = TraceArgs {
                output: Some(trace_output.clone()),
                ..args.trace_args.clone()
            }
            .to_words();
            cmd.push("--trace".into());
            cmd.append(&mut words);
            // rrr's own code runs emulated in the carrier: there it only observes, and the
            // trace is written here, natively.
            cmd.push("--trace-observations".into());
            cmd.push(observations.clone().into());
        }
        let mut opts = crate::carrier::CarrierOptions::default();
        if let Some(addr) = gdb_addr {
            cmd.extend([
                "--gdb".into(),
                addr.to_string().into(),
                "--gdb-carrier-port".into(),
            ]);
            opts.forwards
                .push((crate::gdb::conn::CARRIER_PORT.to_owned(), addr));
        }
        opts.shares.extend(
            [
                recording_path.parent(),
                run_args.run_dir.as_deref(),
                args.trace.then(|| trace_output.parent()).flatten(),
            ]
            .into_iter()
            .flatten()
            .map(Path::to_path_buf),
        );
        // The trace is written here while the carrier replays, from the observations as they
        // arrive (a file left by an earlier run in this directory is not one of them).
        let _ = std::fs::remove_file(&observations);
        let carrier_stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = match traced {
            Some((index, _)) => {
                let job = TraceJob {
                    index,
                    header: recording.header.clone(),
                    filter: EmitFilter {
                        pids: args.trace_args.pids.clone(),
                        depth: args.trace_args.depth,
                    },
                    observations: observations.clone(),
                    output: trace_output.clone(),
                    carrier_stopped: carrier_stopped.clone(),
                };
                Some(
                    std::thread::Builder::new()
                        .name("trace-writer".into())
                        .spawn(move || job.follow())
                        .context("cannot start the trace writer")?,
                )
            }
            None => None,
        };
        let code = crate::carrier::run_in_carrier(&cmd, &opts);
        carrier_stopped.store(true, std::sync::atomic::Ordering::Release);
        let stopped_at = Instant::now();
        let written = writer.map(|w| {
            let spinner =
                crate::progress::spinner(format!("writing the trace {}", trace_output.display()));
            let written = w
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the trace writer panicked")));
            spinner.finish_and_clear();
            written
        });
        let code = code?;
        eprintln!(
            "rrr: total wall time {:.1} s (carrier and VM)",
            started.elapsed().as_secs_f64()
        );
        match written.map(|w| w.and_then(|w| w.report(&run_dir, &trace_output, stopped_at))) {
            Some(Err(err)) if code != 0 => eprintln!(
                "rrr: the replay did not end well, and its trace could not be written either: {err:#}"
            ),
            Some(other) => other?,
            None => {}
        }
        return Ok(code);
    }

    let records = recording.records.len();
    let trace_output = args.trace_args.output_for(&args.recording);
    let header = recording.header.clone();
    let replayer = Replayer::new(recording);
    let mode = if let Some(addr) = gdb_addr {
        let endpoint = if args.gdb_carrier_port {
            Endpoint::carrier_port()?
        } else {
            Endpoint::listen(addr)?
        };
        let debugger = Debugger::new(endpoint, crate::gdb::banner(addr, &kernel));
        ReplayMode::Gdb(Box::new(GdbReplay::new(replayer, debugger)))
    } else if let Some((index, functions)) = traced {
        let filter = EmitFilter {
            pids: args.trace_args.pids.clone(),
            depth: args.trace_args.depth,
        };
        let mut intro = Introspection::new(index)?;
        intro.know_stimulus(&header.stimulus_name, &header.stimulus);
        let intro = std::sync::Arc::new(intro);
        let sink: Box<dyn Sink> = match &args.trace_observations {
            Some(path) => Box::new(ObservationFile::create(path)?),
            None => Box::new(Tracer::new(intro.clone(), &trace_output, filter)?),
        };
        let observer = Observer::new(intro, &functions, sink);
        ReplayMode::Traced(Box::new(TracedReplay { replayer, observer }))
    } else {
        ReplayMode::Plain(replayer)
    };
    let mut session = ReplaySession {
        header,
        mode: Some(mode),
        plain: Plain,
    };
    let replayed = run::run_vm(
        &run_args,
        &spec.kernel,
        &spec.rootfs,
        &stimulus_binary,
        run_args.run_dir.as_deref().unwrap_or(Path::new(".")),
        &mut session,
    );
    let summary = match replayed {
        Ok(summary) => summary,
        Err(err) => {
            if let Some(RrError::Divergence(d)) = err
                .chain()
                .find_map(|e| e.downcast_ref::<RrError>())
                .or_else(|| {
                    err.chain()
                        .find_map(|e| e.downcast_ref::<RunError>())
                        .and_then(|e| match e {
                            RunError::Rr(rr) => Some(rr),
                            _ => None,
                        })
                })
            {
                println!();
                println!("rrr: {d}");
                return Ok(2);
            }
            return Err(err);
        }
    };
    run::print_summary(&summary);
    if let Some(stats) = summary
        .rr
        .as_ref()
        .and_then(|rr| rr.get("trace"))
        .filter(|t| !t.is_null() && args.trace_observations.is_none())
    {
        print_trace(&trace_output, stats);
    }
    match summary.rr.as_ref().and_then(|rr| rr["partial_end"].as_u64()) {
        Some(exits) => println!(
            "rrr: replayed the partial recording up to its last whole record (exit {exits}): every checkpoint on the way matched"
        ),
        None => println!(
            "rrr: the replay matches the recording: {records} events, every checkpoint, the console, the verdict and the final state"
        ),
    }
    Ok(0)
}

/// Prints the header and the records. A closed stdout (`rrr replay --dump REC | head`) ends the
/// listing quietly.
fn dump(recording: &Recording) {
    let _ = write_dump(&mut std::io::stdout().lock(), recording);
}

fn write_dump(out: &mut impl std::io::Write, recording: &Recording) -> std::io::Result<()> {
    let h = &recording.header;
    writeln!(
        out,
        "rrr {} recording of {} ({} bytes of stimulus), from {} at exit {} ({} ns); {:?}; tail {:?}, {} bytes",
        h.rrr_version,
        h.stimulus_name,
        h.stimulus.len(),
        h.snapshot_path,
        h.start_exits,
        h.start_time_ns,
        h.config,
        recording.tail,
        recording.file_bytes
    )?;
    for (i, record) in recording.records.iter().enumerate() {
        writeln!(out, "{:5} {record:x?}", i + 1)?;
    }
    out.flush()
}

/// Refuses what cannot be replayed, before any VM exists.
fn check_usable(recording: &Recording, args: &Args) -> Result<()> {
    let this = env!("CARGO_PKG_VERSION");
    if recording.header.rrr_version != this {
        bail!(
            "the recording {} was made by rrr {}; this is rrr {this}, whose VM may run differently: replay it with rrr {}",
            args.recording.display(),
            recording.header.rrr_version,
            recording.header.rrr_version
        );
    }
    if let Tail::Incomplete { partial } = recording.tail {
        if !args.partial {
            bail!(
                "the recording {} is incomplete: it has no end record ({} whole records{}), so the recorder was stopped early (Ctrl-C, a kill, a full disk); `rrr replay --partial` replays it up to its last whole record",
                args.recording.display(),
                recording.records.len(),
                if partial > 0 {
                    format!(", then {partial} bytes of a cut one")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

/// Where the trace is, what is in it, and how to open it.
/// Where the trace is and how to open it. A closed stdout (`rrr trace REC | head`) cuts the
/// lines short, not the command: the trace is written by then.
fn print_trace(output: &Path, stats: &serde_json::Value) {
    let _ = write_trace_lines(&mut std::io::stdout().lock(), output, stats);
}

fn write_trace_lines(
    out: &mut impl std::io::Write,
    output: &Path,
    stats: &serde_json::Value,
) -> std::io::Result<()> {
    let n = |k: &str| stats[k].as_u64().unwrap_or(0);
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    // The probes' counts come with the replay's summary, which a stopped replay did not write.
    let probes = match stats["probes"].as_u64() {
        Some(probes) => format!("; {probes} probes, {} of them in-guest", n("stub_sites")),
        None => String::new(),
    };
    writeln!(
        out,
        "rrr: trace: {} events ({} kernel calls, {} system calls, {} calls in the stimulus, {} tasks, {} switches{probes}), {:.1} MiB",
        n("events"),
        n("entries"),
        n("syscalls"),
        n("user_entries"),
        n("tasks"),
        n("switches"),
        size as f64 / (1024.0 * 1024.0)
    )?;
    writeln!(out, "rrr: the trace is {}", output.display())?;
    writeln!(
        out,
        "rrr: open it in Perfetto: rrr serve {}   (then {})",
        output.display(),
        rrr_perfetto::ui_link(
            rrr_perfetto::DEFAULT_PORT,
            &output.file_name().unwrap_or_default().to_string_lossy()
        )
    )
}

/// The replay's mode: plain, or with the trace pass.
enum ReplayMode {
    Plain(Replayer),
    Traced(Box<TracedReplay>),
    Gdb(Box<GdbReplay>),
}

struct ReplaySession {
    header: Header,
    mode: Option<ReplayMode>,
    plain: Plain,
}

impl Session for ReplaySession {
    fn mode(&mut self) -> &mut dyn ExecMode {
        match &mut self.mode {
            Some(ReplayMode::Plain(replayer)) => replayer,
            Some(ReplayMode::Traced(traced)) => traced.as_mut(),
            Some(ReplayMode::Gdb(gdb)) => gdb.as_mut(),
            None => &mut self.plain,
        }
    }

    fn dirty_log(&self) -> bool {
        true
    }

    fn stimulus(&self) -> Option<&[u8]> {
        Some(&self.header.stimulus)
    }

    fn at_ready(&mut self, ready: &Ready<'_>) -> Result<()> {
        let header = &self.header;
        let snapshot = ready.report.snapshot.as_deref().unwrap_or(Path::new(""));
        if snapshot != Path::new(&header.snapshot_path) {
            bail!(
                "this machine's snapshot is {}, the recording started from {}: another CPU model, kernel command line or rrr build",
                snapshot.display(),
                header.snapshot_path
            );
        }
        if let Some(difference) = header
            .snapshot
            .description
            .difference(&ready.vmm.description)
        {
            bail!(
                "the snapshot shows the guest another machine than the recording's: {difference}"
            );
        }
        let at = (ready.state.stats.exits, ready.state.clock.now().as_nanos());
        if at != (header.start_exits, header.start_time_ns) {
            let retaken = if ready.report.kind == StartKind::Restored {
                ""
            } else {
                " (the snapshot file was gone and was taken again; this boot did not reach READY where the recorded one did)"
            };
            bail!(
                "the snapshot stands at READY at exit {} ({} ns), the recording started at exit {} ({} ns){retaken}",
                at.0,
                at.1,
                header.start_exits,
                header.start_time_ns
            );
        }
        match &mut self.mode {
            Some(ReplayMode::Traced(traced)) => {
                traced
                    .observer
                    .start(ready.vmm, at.0, ready.state.clock.now())?
            }
            Some(ReplayMode::Gdb(gdb)) => {
                gdb.debugger.attach(ready.vmm, ready.state.stats.exits)?
            }
            _ => {}
        }
        Ok(())
    }

    fn planned_end(&self, err: &RunError) -> Option<(String, u64)> {
        match err {
            RunError::Rr(RrError::EndOfPartial { exits }) => Some((
                format!("replayed to the end of the partial recording (exit {exits})"),
                *exits,
            )),
            _ => None,
        }
    }

    fn finish(&mut self, end: &Finished<'_>) -> Result<Option<serde_json::Value>> {
        let mode = self
            .mode
            .take()
            .context("the run ended before READY: nothing was replayed")?;
        let ReplayMode::Gdb(gdb) = mode else {
            return self.finish_checks(mode, end);
        };
        let stats = gdb.checkpoint_stats();
        let GdbReplay {
            replayer,
            mut debugger,
            ..
        } = *gdb;
        eprintln!(
            "rrr: gdb: {} checkpoints kept {:.1} MiB; went back to one {} times",
            stats.count,
            stats.bytes as f64 / (1 << 20) as f64,
            debugger.rewinds
        );
        // The guest's memory is its own again before anything hashes it; gdb then hears how the
        // replay ended (exit code 0: it matched the recording).
        debugger.lift();
        let checked = self.finish_checks(ReplayMode::Plain(replayer), end);
        debugger.ended(if checked.is_ok() { 0 } else { 2 });
        checked
    }
}

impl ReplaySession {
    /// The end of the replay against the recording's end.
    fn finish_checks(
        &mut self,
        mode: ReplayMode,
        end: &Finished<'_>,
    ) -> Result<Option<serde_json::Value>> {
        let (mut replayer, trace) = match mode {
            ReplayMode::Plain(replayer) => (replayer, None),
            ReplayMode::Gdb(gdb) => (gdb.replayer, None),
            ReplayMode::Traced(traced) => {
                let TracedReplay {
                    replayer,
                    mut observer,
                } = *traced;
                // The guest's memory is its own again before anything hashes it.
                observer.lift(end.vmm)?;
                let (observed, written) = observer.finish(end.stats.virtual_time)?;
                let mut stats = serde_json::to_value(observed)?;
                if let (Some(map), Some(written)) = (stats.as_object_mut(), written) {
                    if let serde_json::Value::Object(more) = serde_json::to_value(written)? {
                        map.extend(more);
                    }
                }
                (replayer, Some(stats))
            }
        };
        if let Some(exits) = end
            .summary
            .vm_end
            .starts_with("replayed to the end of the partial recording")
            .then_some(end.stats.exits)
        {
            return Ok(Some(json!({
                "partial_end": exits,
                "stats": replayer.stats(),
                "trace": trace,
            })));
        }
        let recorded = replayer
            .finish(
                end.vmm,
                &end.summary.vm_end,
                end.stats.exits,
                end.stats.virtual_time,
            )?
            .clone();
        let console_sha256 = hex::encode(Sha256::digest(end.console));
        if console_sha256 != recorded.console_sha256 {
            bail!(RrError::Divergence(Box::new(rrr_vmm::rr::Divergence {
                event: 0,
                exits: end.stats.exits,
                expected: format!(
                    "console after READY with sha256 {}",
                    recorded.console_sha256
                ),
                seen: format!("console after READY with sha256 {console_sha256}"),
                last_exits: Vec::new(),
            })));
        }
        let verdict = run::verdict(end.summary);
        if verdict != recorded.verdict {
            bail!(RrError::Divergence(Box::new(rrr_vmm::rr::Divergence {
                event: 0,
                exits: end.stats.exits,
                expected: recorded.verdict.clone(),
                seen: verdict,
                last_exits: Vec::new(),
            })));
        }
        Ok(Some(json!({
            "matched": true,
            "state_hash": format!("{:#018x}", recorded.state_hash),
            "stats": replayer.stats(),
            "trace": trace,
        })))
    }
}

/// The trace of a replay in the carrier, written here (natively) from the observations the
/// replay makes there.
struct TraceJob {
    index: rrr_tracer::Index,
    header: Header,
    filter: EmitFilter,
    observations: PathBuf,
    output: PathBuf,
    /// Set when the carrier has stopped: no more observations come.
    carrier_stopped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A trace written from observations.
struct WrittenTrace {
    /// `None` if the replay never started observing (it failed before).
    stats: Option<crate::trace::tracer::TraceStats>,
    whole: bool,
    /// Time the writer worked (not waiting for observations).
    busy: std::time::Duration,
    finished: Instant,
}

impl TraceJob {
    fn follow(self) -> Result<WrittenTrace> {
        let started = Instant::now();
        let mut intro = Introspection::new(self.index)?;
        intro.know_stimulus(&self.header.stimulus_name, &self.header.stimulus);
        let mut tracer = Tracer::new(std::sync::Arc::new(intro), &self.output, self.filter)?;
        let followed =
            ObservationFile::follow_into(&self.observations, &mut tracer, &self.carrier_stopped);
        let followed = match followed {
            Ok(followed) => followed,
            // The replay failed before it observed anything.
            Err(_) if !self.observations.exists() => {
                tracer.abandon();
                return Ok(WrittenTrace::nothing(started));
            }
            Err(err) => return Err(err),
        };
        if followed.end_ns.is_none() && tracer.stats().events == 0 {
            // The replay stopped (an error, Ctrl-C) before anything was traced: no trace.
            tracer.abandon();
            let _ = std::fs::remove_file(&self.observations);
            return Ok(WrittenTrace::nothing(started));
        }
        // Open slices end where the replay did (or at the last event, if it stopped early: a
        // replay stopped by Ctrl-C is written all the same, up to the last observation).
        let end_ns = followed.end_ns.unwrap_or(0);
        let stats = tracer.finish(end_ns)?;
        let _ = std::fs::remove_file(&self.observations);
        Ok(WrittenTrace {
            stats: Some(stats),
            whole: followed.end_ns.is_some(),
            busy: started.elapsed().saturating_sub(followed.waited),
            finished: Instant::now(),
        })
    }
}

fn read_summary(run_dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = run_dir.join("summary.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is not a run summary", path.display())
            })?))
        }
        Err(_) => Ok(None),
    }
}

impl WrittenTrace {
    /// No trace: the replay stopped before it traced anything.
    fn nothing(started: Instant) -> WrittenTrace {
        WrittenTrace {
            stats: None,
            whole: false,
            busy: started.elapsed(),
            finished: Instant::now(),
        }
    }

    /// Adds the trace's counts and the writer's times to the run summary, and says where the
    /// trace is. `stopped_at`: when the carrier stopped (the writer's time after it is what
    /// writing the trace added to the replay).
    fn report(self, run_dir: &Path, output: &Path, stopped_at: Instant) -> Result<()> {
        let Some(stats) = self.stats else {
            return Ok(());
        };
        if !self.whole {
            eprintln!("rrr: the replay stopped before its end: the trace shows it up to there");
        }
        let mut shown = serde_json::to_value(stats)?;
        if let Some(map) = shown.as_object_mut() {
            map.insert("write_ns".into(), json!(self.busy.as_nanos() as u64));
            let after = self.finished.saturating_duration_since(stopped_at);
            map.insert(
                "write_after_replay_ns".into(),
                json!(after.as_nanos() as u64),
            );
        }
        if let Some(mut summary) = read_summary(run_dir)? {
            let trace = &mut summary["rr"]["trace"];
            if let (Some(map), serde_json::Value::Object(more)) = (trace.as_object_mut(), &shown) {
                map.extend(more.clone());
            } else {
                *trace = shown.clone();
            }
            shown = trace.clone();
            let path = run_dir.join("summary.json");
            std::fs::write(&path, serde_json::to_vec_pretty(&summary)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        print_trace(output, &shown);
        Ok(())
    }
}
