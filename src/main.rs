//! `rrr`: deterministic record and replay for Linux kernel bugs.
//!
//! The binary is thin: it parses the command line, sets up logging, and hands each subcommand to
//! its module in `commands/`. The work lives in the workspace's library crates.

mod cache;
mod carrier;
mod commands;
mod digest;
mod gdb;
mod machine;
mod position;
mod progress;
mod syzbot;
mod trace;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rrr", version, about, propagate_version = true)]
struct Cli {
    /// More detail on stderr (repeat for more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check this machine: KVM (hardware or software), the carrier, build tools, the cache.
    Doctor(commands::doctor::Args),
    /// Build kernels (the default guest kernel, a local tree, a full config, or the carrier).
    #[command(subcommand)]
    Kernel(commands::kernel::KernelCommand),
    /// Run a command inside the carrier: a QEMU VM with an emulated AMD-V CPU and real KVM.
    #[command(subcommand)]
    Carrier(commands::carrier::CarrierCommand),
    /// Boot a kernel in rrr's VMM and stream its console.
    Boot(commands::boot::Args),
    /// Build root filesystem images.
    #[command(subcommand)]
    Rootfs(commands::rootfs::RootfsCommand),
    /// Boot the machine to the agent's READY and save it (once per kernel); prints the path.
    Snapshot(commands::snapshot::Args),
    /// Build the kernel and rootfs, restore the snapshot (or boot), and run a stimulus once.
    Run(commands::run::Args),
    /// From a syzbot bug (extid, id or URL) to a run of its reproducer on its kernel.
    FromSyzbot(commands::from_syzbot::Args),
    /// `rrr run` from the machine's snapshot, writing a recording that replays exactly.
    Record(commands::record::Args),
    /// Replay a recording: the same console, the same verdict, every checkpoint checked.
    Replay(commands::replay::Args),
    /// Replay a recording with the trace pass: a Perfetto trace of every kernel call and
    /// system call, per task, with typed arguments.
    Trace(commands::trace::Args),
    /// Serve a trace on 127.0.0.1 to the Perfetto UI and print the link that opens it.
    Serve(commands::serve::Args),
    /// The README's main job: doctor, default kernel, example stimulus, end to end.
    Demo(commands::demo::Args),
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Doctor(args) => commands::doctor::run(args),
        Command::Kernel(cmd) => commands::kernel::run(cmd),
        Command::Carrier(cmd) => commands::carrier::run(cmd),
        Command::Boot(args) => commands::boot::run(args),
        Command::Rootfs(cmd) => commands::rootfs::run(cmd),
        Command::Snapshot(args) => commands::snapshot::run(args),
        Command::Run(args) => commands::run::run(args),
        Command::Record(args) => commands::record::run(args),
        Command::Replay(args) => commands::replay::run(args),
        Command::Trace(args) => commands::trace::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::FromSyzbot(args) => commands::from_syzbot::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("rrr: error: {err:#}");
            std::process::exit(1);
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
