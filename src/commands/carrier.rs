//! `rrr carrier run`: run a command inside the carrier (QEMU with AMD-V and real KVM).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Result;

use crate::carrier::{self, CarrierOptions};

#[derive(clap::Subcommand)]
pub enum CarrierCommand {
    /// Run CMD inside the carrier: rrr's stdin becomes its stdin (to end of input), and its
    /// stdout, stderr and exit status become rrr's.
    Run(RunArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Memory of the carrier VM, in MiB.
    #[arg(long, value_name = "MB", default_value_t = CarrierOptions::default().mem_mb)]
    mem: u32,
    /// Virtual CPUs of the carrier VM.
    #[arg(long, value_name = "N", default_value_t = CarrierOptions::default().cpus)]
    cpus: u32,
    /// Another host directory to share writable at the same path (repeatable).
    #[arg(long, value_name = "DIR")]
    share: Vec<PathBuf>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<OsString>,
}

pub fn run(cmd: CarrierCommand) -> Result<i32> {
    match cmd {
        CarrierCommand::Run(args) => {
            let opts = CarrierOptions {
                mem_mb: args.mem,
                cpus: args.cpus,
                shares: args.share,
                env: Vec::new(),
                forwards: Vec::new(),
            };
            carrier::run_in_carrier(&args.cmd, &opts)
        }
    }
}
