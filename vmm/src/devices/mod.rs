//! Emulated devices. `legacy` holds the PC platform devices, `virtio` the virtio-mmio ones;
//! `control` is the guest agent's port, `progress` the instrumented code's.

pub mod control;
pub mod legacy;
pub mod progress;
pub mod virtio;
