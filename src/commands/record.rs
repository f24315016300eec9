//! `rrr record PROG.c [-o REC]`: what `rrr run` does, from the machine's snapshot, writing a
//! recording (`rrr_vmm::rr::log`) that `rrr replay` replays exactly: the snapshot's identity,
//! the compiled stimulus, the run's configuration, every input from outside the guest with the
//! exit at which it entered, checkpoints, and the end with a hash of the final state.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rrr_vmm::persist::SnapshotIdentity;
use rrr_vmm::rr::log::{End, Header, RecordingWriter, RunConfig};
use rrr_vmm::rr::{ExecMode, Plain, Recorder, CHECKPOINT_INTERVAL};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::run::{self, Finished, Prepared, Ready, Session};

#[derive(clap::Args)]
#[group(skip)]
pub struct Args {
    #[command(flatten)]
    pub run: run::Args,
    /// Where to write the recording (default: `recording.rrr` in the run directory).
    #[arg(short = 'o', long = "output", value_name = "REC")]
    pub output: Option<PathBuf>,
    /// Then replay it with the trace pass (`rrr trace`) and print where the trace is.
    #[arg(long)]
    pub trace: bool,
    #[command(flatten)]
    pub trace_args: crate::trace::TraceArgs,
}

pub fn run(args: Args) -> Result<i32> {
    run_as(args, None)
}

/// `rrr record` from `words` (what would follow `rrr record` on a command line), for commands
/// that record on the user's behalf: in the carrier, these words are what runs.
pub fn run_words(words: &[std::ffi::OsString]) -> Result<i32> {
    #[derive(clap::Parser)]
    #[command(name = "rrr record")]
    struct Line {
        #[command(flatten)]
        args: Args,
    }
    let argv = std::iter::once("rrr record".into()).chain(words.iter().cloned());
    let line = <Line as clap::Parser>::try_parse_from(argv)?;
    let mut command_line = vec![std::ffi::OsString::from("record")];
    command_line.extend(words.iter().cloned());
    run_as(line.args, Some(command_line))
}

fn run_as(args: Args, command_line: Option<Vec<std::ffi::OsString>>) -> Result<i32> {
    if args.run.boot {
        bail!("rrr record starts from the machine's snapshot (a replay restores it); --boot is for rrr run");
    }
    let started = Instant::now();
    let prepared = run::prepare(&args.run)?;
    let run_dir = prepared.run_dir.clone();
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| run_dir.join("recording.rrr"));
    let output = std::path::absolute(&output).unwrap_or(output);
    let output_dir = output
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    std::fs::create_dir_all(&output_dir)
        .with_context(|| format!("cannot create {}", output_dir.display()))?;
    if run::needs_carrier(args.run.direct) {
        // The same command line runs inside: a given -o is made reachable like every path
        // word, and the default output lies in the run directory the handover names.
        return run::carrier_handover(&prepared, command_line, &[output_dir], started);
    }
    let Prepared {
        kernel,
        rootfs,
        stimulus_binary,
        run_dir,
    } = prepared;
    let mut session = RecordSession {
        output: output.clone(),
        kernel: kernel.clone(),
        rootfs: rootfs.clone(),
        recorder: None,
        stimulus: Vec::new(),
        plain: Plain,
    };
    let summary = run::run_vm(
        &args.run,
        &kernel,
        &rootfs,
        &stimulus_binary,
        &run_dir,
        &mut session,
    )?;
    run::print_summary(&summary);
    let bytes = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    println!(
        "rrr: recording saved to {} ({bytes} bytes); replay it with `rrr replay {}`",
        output.display(),
        output.display()
    );
    if !args.trace {
        return Ok(0);
    }
    println!("rrr: tracing the recording (a replay with the trace pass)");
    super::replay::run(super::replay::Args {
        recording: output,
        partial: false,
        quiet: true,
        run_dir: None,
        direct: args.run.direct,
        dump: false,
        kernel: Some(kernel),
        rootfs: Some(rootfs),
        trace: true,
        trace_args: args.trace_args,
        gdb: None,
        gdb_carrier_port: false,
        trace_observations: None,
    })
}

struct RecordSession {
    output: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    /// Exists from READY on.
    recorder: Option<Recorder>,
    /// The stimulus binary as the header logged it (from READY on).
    stimulus: Vec<u8>,
    plain: Plain,
}

impl Session for RecordSession {
    fn mode(&mut self) -> &mut dyn ExecMode {
        match &mut self.recorder {
            Some(recorder) => recorder,
            None => &mut self.plain,
        }
    }

    fn dirty_log(&self) -> bool {
        true
    }

    fn stimulus(&self) -> Option<&[u8]> {
        (!self.stimulus.is_empty()).then_some(self.stimulus.as_slice())
    }

    fn at_ready(&mut self, ready: &Ready<'_>) -> Result<()> {
        let Some(snapshot) = &ready.report.snapshot else {
            bail!("no snapshot was used or made, so there is nothing a replay could start from");
        };
        let expected = ready.spec.expected_identity()?;
        let args = ready.args;
        let stimulus = std::fs::read(ready.stimulus_binary).with_context(|| {
            format!(
                "cannot read the stimulus binary {}",
                ready.stimulus_binary.display()
            )
        })?;
        let header = Header {
            rrr_version: env!("CARGO_PKG_VERSION").to_owned(),
            snapshot: SnapshotIdentity {
                rrr_version: expected.rrr_version,
                kernel_sha256: expected.kernel_sha256,
                rootfs_sha256: expected.rootfs_sha256,
                description: ready.vmm.description.clone(),
            },
            snapshot_path: snapshot.display().to_string(),
            kernel_path: self.kernel.display().to_string(),
            rootfs_path: self.rootfs.display().to_string(),
            config: RunConfig {
                time_limit_secs: args.time_limit,
                host_timeout_secs: args
                    .timeout
                    .unwrap_or(u64::from(args.time_limit) + run::BOOT_ALLOWANCE_SECS),
                mem_mib: args.mem,
                append: args.append.clone(),
                checkpoint_interval: CHECKPOINT_INTERVAL,
                seed: args.seed,
                progress_interval: args.progress_interval,
            },
            start_exits: ready.state.stats.exits,
            start_time_ns: ready.state.clock.now().as_nanos(),
            stimulus_name: args
                .stimulus
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "stimulus".into()),
            stimulus,
        };
        self.stimulus = header.stimulus.clone();
        let writer = RecordingWriter::create(&self.output, header)?;
        self.recorder = Some(Recorder::new(writer, CHECKPOINT_INTERVAL));
        Ok(())
    }

    fn finish(&mut self, end: &Finished<'_>) -> Result<Option<serde_json::Value>> {
        let mut recorder = self
            .recorder
            .take()
            .context("the run ended before READY: nothing was recorded")?;
        let state_hash = recorder.final_hash(end.vmm)?;
        let stats = recorder.stats();
        let writer = recorder.finish(End {
            vm_end: end.summary.vm_end.clone(),
            exits: end.stats.exits,
            time_ns: end.stats.virtual_time.as_nanos(),
            state_hash,
            console_sha256: hex::encode(Sha256::digest(end.console)),
            verdict: run::verdict(end.summary),
        })?;
        Ok(Some(json!({
            "recording": writer.path(),
            "recording_bytes": writer.bytes(),
            "records": writer.records(),
            "checkpoint_interval": CHECKPOINT_INTERVAL,
            "stats": stats,
            "state_hash": format!("{state_hash:#018x}"),
        })))
    }
}
