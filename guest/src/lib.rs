//! Code that runs inside the guest, and the protocol it speaks with the VMM.
//!
//! The agent (`guest/agent/agent.c`) is PID 1 of every rootfs rrr builds. It is C, built with
//! `gcc -static`, because the guest has no Rust toolchain target here and the agent must be tiny.

pub mod agent;
pub mod protocol;
