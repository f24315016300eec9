//! `rrr kernel` (not yet written).

#[derive(clap::Subcommand)]
pub enum KernelCommand {}

pub fn run(cmd: KernelCommand) -> anyhow::Result<i32> {
    match cmd {}
}
