//! Emulated devices. `legacy` holds the PC platform devices, `virtio` the virtio-mmio ones.
pub mod virtio;
