//! `rrr rootfs` (not yet written).

#[derive(clap::Subcommand)]
pub enum RootfsCommand {}

pub fn run(cmd: RootfsCommand) -> anyhow::Result<i32> {
    match cmd {}
}
