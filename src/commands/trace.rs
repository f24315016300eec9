//! `rrr trace REC [filters]`: replays a recording with the trace pass and writes the Perfetto
//! trace (`rrr replay --trace` under its own name); `--serve` then serves it to the UI.

use std::path::PathBuf;

use anyhow::Result;

use super::replay;
use crate::trace::TraceArgs;

#[derive(clap::Args)]
pub struct Args {
    /// The recording (`rrr record -o REC`).
    pub recording: PathBuf,
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Trace an incomplete recording up to its last whole record.
    #[arg(long)]
    pub partial: bool,
    /// Stream the guest console while replaying.
    #[arg(long)]
    pub console: bool,
    /// Run on this host's /dev/kvm even if it is software-only (no carrier).
    #[arg(long)]
    pub direct: bool,
    /// The kernel build directory or vmlinux the recording was made with (default: where it
    /// was when recorded); its hash must be the recorded one.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// The base rootfs image (default: where it was when recorded).
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Serve the trace to the Perfetto UI when it is written (as `rrr serve` does).
    #[arg(long)]
    pub serve: bool,
    /// The port `--serve` listens on.
    #[arg(long, default_value_t = rrr_perfetto::DEFAULT_PORT)]
    pub port: u16,
}

pub fn run(args: Args) -> Result<i32> {
    let output = args.trace.output_for(&args.recording);
    let code = replay::run(replay::Args {
        recording: args.recording,
        partial: args.partial,
        quiet: !args.console,
        run_dir: None,
        direct: args.direct,
        dump: false,
        kernel: args.kernel,
        rootfs: args.rootfs,
        trace: true,
        trace_args: TraceArgs {
            output: Some(output.clone()),
            ..args.trace
        },
        gdb: None,
        gdb_carrier_port: false,
        trace_observations: None,
    })?;
    if code != 0 || !args.serve {
        return Ok(code);
    }
    super::serve::serve(&output, args.port)
}
