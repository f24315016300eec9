//! One module per subcommand. Each has its clap arguments and a `run` returning the exit code.

pub mod boot;
pub mod carrier;
pub mod demo;
pub mod doctor;
pub mod from_syzbot;
pub mod kernel;
pub mod record;
pub mod replay;
pub mod rootfs;
pub mod run;
pub mod serve;
pub mod snapshot;
pub mod trace;
