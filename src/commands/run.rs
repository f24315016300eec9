//! `rrr run PROG.c`: the default (or given) kernel, a rootfs with the stimulus, a boot, GO, and a
//! verdict: how the stimulus ended and whether the kernel crashed.
//!
//! Builds happen on the host (they are slow under emulation); where the host KVM is
//! software-only, only the VM itself moves into the carrier, handed the built kernel and image.
//!
//! The verdict names the first kernel report printed after the stimulus started; reports the
//! kernel printed while it booted are listed apart (`console` says where the split falls).

mod console;

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rrr_guest::protocol::Command as AgentCommand;
use rrr_reports::{CrashDetector, CrashReport};
use rrr_vmm::builder::Vmm;
use rrr_vmm::config::Timeout;
use rrr_vmm::devices::control::ControlEvent;
use rrr_vmm::devices::progress::ProgressCounts;
use rrr_vmm::devices::virtio::disk::MediumSlot;
use rrr_vmm::host::KvmKind;
use rrr_vmm::rr::{ExecMode, Plain};
use rrr_vmm::run_loop::{self, RunEnd, RunError, RunOutcome, RunState, RunStats, Stopped, Until};
use rrr_vmm::stall::LandmarkCounts;

use crate::machine::{AtReady, MachineSpec, StartKind, StartMode, StartReport, Started};
use serde::{Deserialize, Serialize};

/// Host time allowed for the boot and the agent's setup, on top of the stimulus' time limit. A
/// boot inside the carrier takes tens of seconds; on hardware KVM, about one.
pub const BOOT_ALLOWANCE_SECS: u64 = 240;

pub const DEFAULT_MEM_MIB: u64 = 512;

#[derive(clap::Args)]
pub struct Args {
    /// The stimulus: a C program (a syzkaller reproducer, or any program).
    pub stimulus: PathBuf,
    /// A kernel build directory (as printed by `rrr kernel build`) or a vmlinux; default: rrr's
    /// default kernel, built and cached on first use.
    #[arg(long, env = KERNEL_ENV, hide_env = true)]
    pub kernel: Option<PathBuf>,
    /// Seconds the stimulus may run before the agent kills it.
    #[arg(long, default_value_t = 30)]
    pub time_limit: u32,
    /// Host seconds after which the whole VM is stopped (default: the time limit plus a boot
    /// allowance). Catches a guest that stops making progress the agent can see.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Extra kernel parameters, after rrr's own (e.g. `--append "panic_on_warn=1"`, as syzbot
    /// boots its kernels).
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
    /// Build the stimulus as a 32-bit program.
    #[arg(long)]
    pub m32: bool,
    /// The boot entropy, as a number: the kernel's random numbers (getrandom, ASLR) are the same
    /// on every run with the same seed and differ with another.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Basic blocks per progress exit the kernel was built with (only for measuring kernels
    /// built with another interval than rrr's).
    #[arg(long, hide = true, default_value_t = rrr_guest::protocol::PROGRESS_INTERVAL)]
    pub progress_interval: u64,
    /// Run on this host's /dev/kvm even if it is software-only (no carrier).
    #[arg(long)]
    pub direct: bool,
    /// Do not stream the guest console (it is still saved in the run directory).
    #[arg(long, short)]
    pub quiet: bool,
    /// Where to keep the console and the summary (default: a new directory under the cache).
    #[arg(long, env = RUN_DIR_ENV, hide_env = true)]
    pub run_dir: Option<PathBuf>,
    /// Boot the kernel instead of restoring the cached snapshot (no snapshot is used or made).
    #[arg(long)]
    pub boot: bool,
    /// Forward this terminal's stdin to the guest console (`rrr record` logs every byte at the
    /// exit where the guest got it).
    #[arg(long)]
    pub stdin: bool,
    /// The base root filesystem image, already built (`rrr rootfs build` makes one).
    #[arg(long, hide = true, env = ROOTFS_ENV)]
    pub rootfs: Option<PathBuf>,
    /// The stimulus, already compiled (`rrr rootfs stimulus` makes one).
    #[arg(long, hide = true, env = STIMULUS_BINARY_ENV)]
    pub stimulus_binary: Option<PathBuf>,
}

/// What `rrr run` hands its copy inside the carrier, besides its command line: what it already
/// built or chose on the host, so nothing is built (or chosen differently) under emulation.
const KERNEL_ENV: &str = "RRR_RUN_KERNEL";
const ROOTFS_ENV: &str = "RRR_RUN_ROOTFS";
const STIMULUS_BINARY_ENV: &str = "RRR_RUN_STIMULUS_BINARY";
const RUN_DIR_ENV: &str = "RRR_RUN_DIR";

/// How the stimulus ended, as the guest agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StimulusEnd {
    Exited {
        status: u32,
    },
    Signaled {
        signal: u32,
    },
    TimedOut {
        limit_secs: u32,
    },
    SpawnFailed {
        errno: u32,
    },
    /// Started, but the VM ended (a crash, a host timeout) before the agent could report.
    Unfinished,
    /// The agent never got to start it (the guest died during boot or setup).
    NeverStarted,
}

impl std::fmt::Display for StimulusEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StimulusEnd::Exited { status } => write!(f, "exited with status {status}"),
            StimulusEnd::Signaled { signal } => write!(f, "was killed by signal {signal}"),
            StimulusEnd::TimedOut { limit_secs } => {
                write!(
                    f,
                    "ran past its time limit of {limit_secs} s and was killed"
                )
            }
            StimulusEnd::SpawnFailed { errno } => {
                write!(f, "could not be started (errno {errno})")
            }
            StimulusEnd::Unfinished => write!(f, "did not finish: the VM stopped first"),
            StimulusEnd::NeverStarted => write!(f, "never started: the guest stopped before"),
        }
    }
}

/// What `rrr run` found; also written as `summary.json` in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub stimulus: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub stimulus_end: StimulusEnd,
    /// The syzbot-style title of the first kernel report printed after the stimulus started.
    pub crash_title: Option<String>,
    /// Titles of the kernel reports printed before the stimulus started (while the kernel
    /// booted); they are not the stimulus's doing. Full texts in `boot-reports.txt`.
    #[serde(default)]
    pub boot_reports: Vec<String>,
    /// How the VM ended: powered off, rebooted, timed out, or a fault.
    pub vm_end: String,
    pub exits: u64,
    /// Timer ticks given at host-timed points to a guest running without exits (`vmm::stall`):
    /// the one input that can make two runs of the same stimulus differ.
    #[serde(default)]
    pub landmarks: u64,
    /// The same by cause: spin-waits (cheap to replay) and loops with changing state (not).
    #[serde(default)]
    pub landmarks_by_kind: LandmarkCounts,
    /// Interrupt windows that opened early, in an `sti` shadow, and were stepped to their place.
    #[serde(default)]
    pub shadow_steps: u64,
    /// Windows that opened on the `hlt` of `sti; hlt` and were taken as that `hlt`.
    #[serde(default)]
    pub shadowed_halts: u64,
    /// Exits that were progress-port writes of instrumented code (`vmm::devices::progress`).
    #[serde(default)]
    pub progress_exits: u64,
    /// Progress-port writes by source: the kernel's KCOV hook and the stimulus's runtime.
    #[serde(default)]
    pub progress: ProgressCounts,
    /// The boot entropy seed (`--seed`).
    #[serde(default)]
    pub seed: u64,
    pub virtual_time_ns: u64,
    pub host_secs: f64,
    pub console: PathBuf,
    /// How the guest got to READY: booted, or restored from which snapshot, and how long it
    /// took.
    pub start: Option<crate::machine::StartReport>,
    /// What `rrr record` wrote or `rrr replay` checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rr: Option<serde_json::Value>,
}

/// What a run does besides running: nothing (`rrr run`), recording, or replaying. The run
/// itself (start at READY, the stimulus, the console, the verdict) is the same for all three.
pub trait Session {
    /// The execution mode the run loop calls at each exit.
    fn mode(&mut self) -> &mut dyn ExecMode;
    /// Whether the VM's memory must keep KVM's dirty log (for state hashes).
    fn dirty_log(&self) -> bool {
        false
    }
    /// At READY, before the stimulus goes in: the recorder writes its header, the replayer
    /// checks that this is the machine it recorded on.
    fn at_ready(&mut self, _ready: &Ready<'_>) -> Result<()> {
        Ok(())
    }
    /// The stimulus binary's bytes the session logged, if it did: the guest gets exactly these,
    /// not a second read of the file (record and replay must hand the guest the same program,
    /// and a file read twice, or written and read back, on the carrier's 9p share is not
    /// certain to read the same).
    fn stimulus(&self) -> Option<&[u8]> {
        None
    }
    /// A run-loop error that ends the run as the session planned (a partial replay reaching
    /// the end of its log), in words, with the exits counted so far.
    fn planned_end(&self, _err: &RunError) -> Option<(String, u64)> {
        None
    }
    /// After the run: the recorder closes its log, the replayer compares. `console` is what the
    /// guest printed after READY. Returns what to add to the summary.
    fn finish(&mut self, _end: &Finished<'_>) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }
}

/// A plain run.
impl Session for Plain {
    fn mode(&mut self) -> &mut dyn ExecMode {
        self
    }
}

/// The machine at READY, for [`Session::at_ready`].
pub struct Ready<'a> {
    pub spec: &'a MachineSpec,
    pub report: &'a StartReport,
    pub vmm: &'a Vmm,
    pub state: &'a RunState,
    pub stimulus_binary: &'a Path,
    pub args: &'a Args,
}

/// The end of the run, for [`Session::finish`].
pub struct Finished<'a> {
    pub vmm: &'a Vmm,
    pub summary: &'a RunSummary,
    pub stats: &'a RunStats,
    pub console: &'a [u8],
}

pub fn run(args: Args) -> Result<i32> {
    run_as(args, None)
}

/// `command_line`: what the carrier runs, when not this process's own command line.
fn run_as(args: Args, command_line: Option<Vec<OsString>>) -> Result<i32> {
    let started = Instant::now();
    let prepared = prepare(&args)?;
    if needs_carrier(args.direct) {
        return carrier_handover(&prepared, command_line, &[], started);
    }
    let Prepared {
        kernel,
        rootfs,
        stimulus_binary,
        run_dir,
    } = prepared;
    let summary = run_vm(
        &args,
        &kernel,
        &rootfs,
        &stimulus_binary,
        &run_dir,
        &mut Plain,
    )?;
    print_summary(&summary);
    Ok(0)
}

/// The kernel, the base rootfs, the compiled stimulus and the run directory of a run, built or
/// found on the host.
pub struct Prepared {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub stimulus_binary: PathBuf,
    pub run_dir: PathBuf,
}

/// Builds (or finds in the cache) what the run needs, on the host.
pub fn prepare(args: &Args) -> Result<Prepared> {
    if !args.stimulus.is_file() {
        bail!(
            "stimulus {} does not exist or is not a file; pass a C source file",
            args.stimulus.display()
        );
    }
    let kernel = match &args.kernel {
        Some(path) => super::boot::resolve_kernel(path)?,
        None => super::kernel::ensure_default_kernel()?.vmlinux(),
    };
    rrr_vmm::arch::x86_64::kernel::check_kernel(&kernel)?;
    let rootfs = match &args.rootfs {
        Some(image) => image.clone(),
        None => super::rootfs::ensure_base_rootfs()?,
    };
    let stimulus_binary = match &args.stimulus_binary {
        Some(binary) => binary.clone(),
        None => super::rootfs::ensure_stimulus(&args.stimulus, args.m32)?,
    };
    let run_dir = match &args.run_dir {
        Some(dir) => dir.clone(),
        None => new_run_dir(&args.stimulus)?,
    };
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create the run directory {}", run_dir.display()))?;

    Ok(Prepared {
        kernel,
        rootfs,
        stimulus_binary,
        run_dir,
    })
}

/// Whether this run must move into the carrier (software-only KVM, not already inside one).
pub fn needs_carrier(direct: bool) -> bool {
    let kind = KvmKind::detect();
    let needed = !kind.is_hardware() && !direct && !crate::carrier::inside_carrier();
    if needed {
        tracing::info!("host KVM: {kind}; --direct would run on it anyway");
    }
    needed
}

/// Re-executes this command line (or `command_line`) in the carrier, handing over what
/// `prepare` built so nothing is compiled under emulation; `writable` are more host directories
/// the command inside writes. Says the total wall time since `started` when it is over.
pub fn carrier_handover(
    prepared: &Prepared,
    command_line: Option<Vec<OsString>>,
    writable: &[PathBuf],
    started: Instant,
) -> Result<i32> {
    // Digests are memoized in the cache; computing them here, natively, spares the carrier
    // from hashing the kernel under emulation.
    crate::digest::file_sha256(&prepared.kernel)?;
    crate::digest::file_sha256(&prepared.rootfs)?;
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let mut dirs = vec![prepared.run_dir.clone()];
    dirs.extend(writable.iter().cloned());
    let handover = crate::carrier::Handover {
        env: vec![
            (KERNEL_ENV.into(), absolute(&prepared.kernel).into()),
            (ROOTFS_ENV.into(), absolute(&prepared.rootfs).into()),
            (
                STIMULUS_BINARY_ENV.into(),
                absolute(&prepared.stimulus_binary).into(),
            ),
            (RUN_DIR_ENV.into(), absolute(&prepared.run_dir).into()),
        ],
        writable: dirs,
        command_line,
    };
    let code = crate::carrier::reexec_in_carrier(handover)?;
    eprintln!(
        "rrr: total wall time {:.1} s (builds, carrier and VM)",
        started.elapsed().as_secs_f64()
    );
    Ok(code)
}

fn new_run_dir(stimulus: &Path) -> Result<PathBuf> {
    let stem = stimulus
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "stimulus".into());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Ok(crate::cache::cache_dir()?
        .join("runs")
        .join(format!("{stem}-{stamp}-{}", std::process::id())))
}

/// Runs the VM from READY to its end in `session`'s mode, and writes the summary.
pub fn run_vm(
    args: &Args,
    kernel: &Path,
    rootfs: &Path,
    stimulus_binary: &Path,
    run_dir: &Path,
    session: &mut dyn Session,
) -> Result<RunSummary> {
    let console_path = run_dir.join("console.log");
    let mut detector = Arc::new(Mutex::new(CrashDetector::new()));
    let control = console::ControlSlot::default();
    let log = File::create(&console_path)
        .with_context(|| format!("cannot create {}", console_path.display()))?;
    let tee = |detector: &Arc<Mutex<CrashDetector>>| -> Result<console::ConsoleTee> {
        Ok(console::ConsoleTee {
            terminal: (!args.quiet).then(std::io::stdout),
            log: log
                .try_clone()
                .with_context(|| format!("cannot reopen {}", console_path.display()))?,
            detector: detector.clone(),
            control: control.clone(),
        })
    };
    let console = tee(&detector)?;

    let spec = MachineSpec {
        kernel: kernel.to_owned(),
        rootfs: rootfs.to_owned(),
        mem_mib: args.mem,
        append: args.append.clone(),
        seed: args.seed,
        progress_interval: args.progress_interval,
    };
    let mut config = spec.vm_config();
    config.stimulus_time_limit_secs = args.time_limit;
    config.dirty_log = session.dirty_log();
    let host_limit = args
        .timeout
        .unwrap_or(u64::from(args.time_limit) + BOOT_ALLOWANCE_SECS);
    config
        .timeouts
        .push(Timeout::Host(Duration::from_secs(host_limit)));
    let stimulus_slot = MediumSlot::new();
    let disks = spec.disks(&stimulus_slot)?;
    let mode = if args.boot {
        StartMode::Boot
    } else {
        StartMode::Snapshot
    };
    let mut started = crate::machine::start(
        &spec,
        config.clone(),
        Box::new(console),
        disks,
        mode,
        &console_path,
    )?;
    // A recording starts where its replays will: from the snapshot file. The VM that booted
    // and saved it is set aside (whatever the file does not carry would part them).
    if session.dirty_log() {
        if let Started::AtReady(at_ready) = &started {
            if at_ready.report.kind == StartKind::BootedAndSaved {
                if !args.quiet {
                    eprintln!("rrr: {}; restoring it to start from it", at_ready.report);
                }
                drop(started);
                log.set_len(0)
                    .and_then(|()| {
                        std::io::Seek::seek(&mut &log, std::io::SeekFrom::Start(0)).map(drop)
                    })
                    .with_context(|| format!("cannot rewrite {}", console_path.display()))?;
                detector = Arc::new(Mutex::new(CrashDetector::new()));
                started = crate::machine::start(
                    &spec,
                    config,
                    Box::new(tee(&detector)?),
                    spec.disks(&stimulus_slot)?,
                    StartMode::Snapshot,
                    &console_path,
                )?;
            }
        }
    }
    // Console bytes before this offset were printed before READY (the boot log).
    let mut boot_len = 0;
    let (vmm, result, start_report) = match started {
        Started::AtReady(at_ready) => {
            if at_ready.report.kind == StartKind::Restored {
                // The restored guest's console starts at READY: the log and the crash detector
                // get the boot log the snapshot kept, so both read as after a boot.
                (&log)
                    .write_all(&at_ready.boot_console)
                    .with_context(|| format!("cannot write {}", console_path.display()))?;
                rrr_vmm::bus::lock(&detector).feed(&at_ready.boot_console);
            }
            boot_len = log
                .metadata()
                .with_context(|| format!("cannot stat {}", console_path.display()))?
                .len() as usize;
            if !args.quiet {
                eprintln!("rrr: {}", at_ready.report);
            }
            session.at_ready(&Ready {
                spec: &spec,
                report: &at_ready.report,
                vmm: &at_ready.vmm,
                state: &at_ready.state,
                stimulus_binary,
                args,
            })?;
            match session.stimulus() {
                Some(program) => {
                    crate::machine::insert_stimulus_bytes(&stimulus_slot, program, stimulus_binary)?
                }
                None => crate::machine::insert_stimulus(&stimulus_slot, stimulus_binary)?,
            }
            // The VM stands at READY: from here on the tee asks the control port where the
            // split between boot and stimulus falls.
            let _ = control.set(at_ready.vmm.devices.control.clone());
            let AtReady {
                mut vmm,
                state,
                report,
                ..
            } = *at_ready;
            let input = args.stdin.then(super::boot::spawn_stdin_reader);
            let result = match run_loop::run_until_with(
                &mut vmm,
                state,
                input,
                Until::End,
                session.mode(),
            ) {
                Ok(Stopped::Ended(outcome)) => Ok(outcome),
                Ok(Stopped::Ready(_)) => unreachable!("a run until the end does not stop at READY"),
                Err(err) => Err(err),
            };
            (vmm, result, Some(report))
        }
        Started::EndedBeforeReady { vmm, result } => {
            if session.dirty_log() {
                bail!(
                    "the guest ended before READY, so there is no snapshot to record or replay from; see {}",
                    console_path.display()
                );
            }
            (*vmm, result, None)
        }
    };
    let _ = std::io::stdout().flush();
    let (crash, boot_reports) = {
        let detector = rrr_vmm::bus::lock(&detector);
        (detector.report(), detector.boot_reports())
    };

    let (vm_end, stats, host_secs, events) = match result {
        Ok(outcome) => {
            let RunOutcome {
                end,
                stats,
                host_elapsed,
                control_events,
                ..
            } = *outcome;
            let end = match end {
                RunEnd::HostTimeout => format!(
                    "stopped after {host_limit} s of host time: the guest made no progress the agent could report (a stimulus spinning without system calls, or a hung kernel)"
                ),
                other => other.to_string(),
            };
            (end, stats, host_elapsed.as_secs_f64(), control_events)
        }
        Err(RunError::Fault(fault)) => {
            eprintln!("rrr: {fault}");
            let fault = *fault;
            (
                format!("fault: {}", fault.kind),
                fault.stats,
                0.0,
                rrr_vmm::bus::lock(&vmm.devices.control).take_events(),
            )
        }
        Err(other) => match session.planned_end(&other) {
            Some((end, exits)) => (
                end,
                RunStats {
                    exits,
                    ..RunStats::default()
                },
                0.0,
                rrr_vmm::bus::lock(&vmm.devices.control).take_events(),
            ),
            None => return Err(other).context("the VM stopped with an error"),
        },
    };

    let summary = RunSummary {
        stimulus: args.stimulus.clone(),
        kernel: kernel.to_owned(),
        rootfs: rootfs.to_owned(),
        stimulus_end: stimulus_end(&events, args.time_limit),
        crash_title: crash.as_ref().map(|c: &CrashReport| c.title.clone()),
        boot_reports: boot_reports.iter().map(|r| r.title.clone()).collect(),
        vm_end,
        exits: stats.exits,
        landmarks: stats.landmarks,
        landmarks_by_kind: stats.landmark_kinds,
        shadow_steps: stats.shadow_steps,
        shadowed_halts: stats.shadowed_halts,
        progress_exits: stats.progress_exits,
        progress: stats.progress,
        seed: args.seed,
        virtual_time_ns: stats.virtual_time.as_nanos(),
        host_secs,
        console: console_path.clone(),
        start: start_report,
        rr: None,
    };
    if let Some(report) = &crash {
        std::fs::write(run_dir.join("crash.txt"), &report.text)
            .context("cannot save the crash report")?;
    }
    if !boot_reports.is_empty() {
        std::fs::write(
            run_dir.join(BOOT_REPORTS_FILE),
            boot_reports_text(&boot_reports),
        )
        .context("cannot save the boot-time kernel reports")?;
    }
    let console_bytes = std::fs::read(&console_path)
        .with_context(|| format!("cannot read back {}", console_path.display()))?;
    let finished = session.finish(&Finished {
        vmm: &vmm,
        summary: &summary,
        stats: &stats,
        console: console_bytes.get(boot_len..).unwrap_or_default(),
    });
    let mut summary = summary;
    if let Ok(rr) = &finished {
        summary.rr = rr.clone();
    }
    let json = serde_json::to_string_pretty(&summary)?;
    std::fs::write(run_dir.join("summary.json"), json + "\n")
        .context("cannot save the run summary")?;
    finished?;
    Ok(summary)
}

/// The agent's last word about the stimulus.
fn stimulus_end(events: &[(rrr_vmm::clock::VirtualTime, ControlEvent)], limit: u32) -> StimulusEnd {
    let mut end = StimulusEnd::NeverStarted;
    for (_, ControlEvent::Message(message)) in events {
        end = match message.command {
            // After READY the agent got GO and started the stimulus; a stimulus that crashes the
            // kernel at once can do so before the agent's STARTED message.
            AgentCommand::Ready | AgentCommand::Started => StimulusEnd::Unfinished,
            AgentCommand::Exited => StimulusEnd::Exited {
                status: message.argument,
            },
            AgentCommand::Signaled => StimulusEnd::Signaled {
                signal: message.argument,
            },
            AgentCommand::TimedOut => StimulusEnd::TimedOut { limit_secs: limit },
            AgentCommand::SpawnFailed => StimulusEnd::SpawnFailed {
                errno: message.argument,
            },
            _ => continue,
        };
    }
    end
}

/// The boot-time reports' full texts, in the run directory.
const BOOT_REPORTS_FILE: &str = "boot-reports.txt";

fn boot_reports_text(reports: &[CrashReport]) -> String {
    let texts: Vec<&str> = reports.iter().map(|r| r.text.as_str()).collect();
    texts.join("\n\n") + "\n"
}

/// The verdict on stdout. A closed stdout (`rrr run x.c | head -n 1`) is no error: everything is
/// in the run directory already.
/// The verdict: how the stimulus ended and what the kernel did (a replay prints the same).
pub fn verdict(summary: &RunSummary) -> String {
    let kernel = match &summary.crash_title {
        Some(title) => format!("rrr: kernel crashed: {title}"),
        None if summary.stimulus_end == StimulusEnd::NeverStarted => {
            "rrr: kernel: the stimulus never ran, so it caused no crash report".into()
        }
        None => "rrr: kernel: no crash report after the stimulus started".into(),
    };
    format!("rrr: stimulus {}\n{kernel}", summary.stimulus_end)
}

pub fn print_summary(summary: &RunSummary) {
    let _ = write_summary(&mut std::io::stdout().lock(), summary);
}

fn write_summary(out: &mut impl Write, summary: &RunSummary) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(out, "{}", verdict(summary))?;
    if !summary.boot_reports.is_empty() {
        let saved = summary.console.with_file_name(BOOT_REPORTS_FILE);
        writeln!(
            out,
            "rrr: the kernel already reported during boot, before the stimulus started: {}; \
             the verdict above is about the stimulus (boot reports saved to {})",
            summary.boot_reports.join(", "),
            saved.display()
        )?;
    }
    writeln!(
        out,
        "rrr: VM {} after {} exits, {:.3} s virtual, {:.1} s host",
        summary.vm_end,
        summary.exits,
        summary.virtual_time_ns as f64 / 1e9,
        summary.host_secs
    )?;
    writeln!(
        out,
        "rrr: {} progress exits ({} kernel, {} user); {} landmarks ({} spin-wait, {} changing state); seed {}",
        summary.progress_exits,
        summary.progress.kernel,
        summary.progress.user,
        summary.landmarks,
        summary.landmarks_by_kind.spin_wait,
        summary.landmarks_by_kind.changing_state,
        summary.seed
    )?;
    if summary.shadow_steps > 0 {
        writeln!(
            out,
            "rrr: {} interrupt windows opened one instruction early (in an sti shadow) and were stepped to their place",
            summary.shadow_steps
        )?;
    }
    if summary.shadowed_halts > 0 {
        writeln!(
            out,
            "rrr: {} interrupt windows opened on the hlt of sti; hlt and were taken as that hlt",
            summary.shadowed_halts
        )?;
    }
    if let Some(start) = &summary.start {
        writeln!(out, "rrr: start: {start}")?;
    }
    writeln!(out, "rrr: console saved to {}", summary.console.display())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rrr_guest::protocol::Message;
    use rrr_vmm::clock::VirtualTime;

    fn event(command: AgentCommand, argument: u32) -> (VirtualTime, ControlEvent) {
        (
            VirtualTime::ZERO,
            ControlEvent::Message(Message { command, argument }),
        )
    }

    #[test]
    fn the_agents_last_word_decides() {
        assert_eq!(stimulus_end(&[], 5), StimulusEnd::NeverStarted);
        let started = event(AgentCommand::Started, 42);
        assert_eq!(
            stimulus_end(&[event(AgentCommand::Ready, 0)], 5),
            StimulusEnd::Unfinished
        );
        assert_eq!(
            stimulus_end(&[event(AgentCommand::Ready, 0), started], 5),
            StimulusEnd::Unfinished
        );
        assert_eq!(
            stimulus_end(&[started, event(AgentCommand::Exited, 3)], 5),
            StimulusEnd::Exited { status: 3 }
        );
        assert_eq!(
            stimulus_end(&[started, event(AgentCommand::TimedOut, 0)], 5),
            StimulusEnd::TimedOut { limit_secs: 5 }
        );
    }
}
