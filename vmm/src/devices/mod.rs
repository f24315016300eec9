//! Emulated devices. `legacy` holds the PC platform devices, `virtio` the virtio-mmio ones;
//! `control` is the guest agent's port, `progress` the instrumented code's, `tsc` and `random`
//! what the stimulus's trapped `rdtsc` and rewritten `rdrand`/`rdseed` read.

pub mod control;
pub mod legacy;
pub mod progress;
pub mod random;
pub mod tsc;
pub mod virtio;
