//! syzbot: the dashboard client (bug JSON, texts, cache, rate limit), the kernel at a crash's
//! commit, the config rrr builds from syzbot's, how the reproducer is built, and whether a crash
//! title is the bug's. `commands::from_syzbot` runs these as stages.

pub mod bugref;
pub mod client;
pub mod config;
pub mod error;
pub mod git;
pub mod repro;
pub mod schema;
pub mod title;

pub use bugref::BugRef;
pub use client::Client;

/// The local syzbot the end-to-end tests use, for the unit tests too.
#[cfg(test)]
#[path = "../../tests/common/syzbot_server.rs"]
mod test_server;
