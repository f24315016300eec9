//! `rrr carrier` (not yet written).

#[derive(clap::Subcommand)]
pub enum CarrierCommand {}

pub fn run(cmd: CarrierCommand) -> anyhow::Result<i32> {
    match cmd {}
}
