//! `rrr demo` (not yet written).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<i32> {
    anyhow::bail!("`rrr demo` is not implemented yet")
}
