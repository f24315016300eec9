//! rrr's KVM virtual machine monitor.
//!
//! The VMM is built for determinism first (see `shared/DESIGN.md`, "Determinism without a PMU"):
//! one vCPU, no in-kernel irqchip, every device emulated in userspace on the vCPU thread, and
//! interrupts injected only at synchronous exits. Virtual time ([`clock::VirtualClock`]) advances
//! with guest progress, never with the host clock.

pub mod bus;
pub mod clock;
pub mod crash;
pub mod devices;
pub mod host;
pub mod irq;
