//! rrr's KVM virtual machine monitor.
//!
//! The VMM is built for determinism first (see `shared/DESIGN.md`, "Determinism without a PMU"):
//! one vCPU, no in-kernel irqchip, every device emulated in userspace on the vCPU thread, and
//! interrupts injected only at synchronous exits. Virtual time ([`clock::VirtualClock`]) advances
//! with guest progress, never with the host clock.
//!
//! Building a VM is [`builder::build_vm`]; running it is [`run_loop::run`].

pub mod arch;
pub mod builder;
pub mod bus;
pub mod clock;
pub mod config;
pub mod description;
pub mod devices;
pub mod exit_ring;
pub mod host;
pub mod irq;
pub mod persist;
pub mod rr;
pub mod run_loop;
pub mod stall;
pub mod vstate;
pub mod watchdog;
