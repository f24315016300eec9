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
use crate::machine::{MachineSpec, StartKind};

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
    run::prefer_read_snapshot_memory();
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
            "the recording {} was made from another snapshot: {difference}",
            args.recording.display()
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
    let run_args = run::Args {
        stimulus: PathBuf::from(&header.stimulus_name),
        kernel: Some(kernel.clone()),
        time_limit: header.config.time_limit_secs,
        // Generous: a replay stopped by host time would only report that as a divergence.
        timeout: Some(header.config.host_timeout_secs.saturating_mul(2)),
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
            std::path::absolute(&run_dir).unwrap_or(run_dir).into(),
        ];
        if args.partial {
            cmd.push("--partial".into());
        }
        if args.quiet {
            cmd.push("--quiet".into());
        }
        let mut opts = crate::carrier::CarrierOptions::default();
        opts.shares.extend(
            [recording_path.parent(), run_args.run_dir.as_deref()]
                .into_iter()
                .flatten()
                .map(Path::to_path_buf),
        );
        let code = crate::carrier::run_in_carrier(&cmd, &opts)?;
        eprintln!(
            "rrr: total wall time {:.1} s (carrier and VM)",
            started.elapsed().as_secs_f64()
        );
        return Ok(code);
    }

    let records = recording.records.len();
    let mut session = ReplaySession {
        header: recording.header.clone(),
        replayer: Some(Replayer::new(recording)),
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

struct ReplaySession {
    header: Header,
    replayer: Option<Replayer>,
    plain: Plain,
}

impl Session for ReplaySession {
    fn mode(&mut self) -> &mut dyn ExecMode {
        match &mut self.replayer {
            Some(replayer) => replayer,
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
        let mut replayer = self
            .replayer
            .take()
            .context("the run ended before READY: nothing was replayed")?;
        if let Some(exits) = end
            .summary
            .vm_end
            .starts_with("replayed to the end of the partial recording")
            .then_some(end.stats.exits)
        {
            return Ok(Some(json!({
                "partial_end": exits,
                "stats": replayer.stats(),
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
        })))
    }
}
