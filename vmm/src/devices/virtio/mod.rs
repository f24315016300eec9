//! virtio-mmio devices.
//!
//! Everything runs on the vCPU thread: a guest write to QueueNotify is an MMIO exit, the device
//! processes the whole available ring right there, and the transport raises the device's ISA
//! line. There are no ioeventfds, irqfds or worker threads, so the order in which requests
//! complete and interrupts rise depends only on the guest's exits, which replay themselves.

pub mod block;
pub mod disk;
pub mod mmio;
#[cfg(test)]
pub(crate) mod test_driver;

use vm_memory::GuestMemoryMmap;

pub use block::Block;
pub use mmio::{cmdline_entry, MmioTransport, MMIO_BASE, MMIO_WINDOW};

/// A fatal guest error on a queue: the transport marks the device DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("virtqueue {queue}: {source}")]
    Queue {
        queue: usize,
        source: virtio_queue::Error,
    },
    #[error("no virtqueue {0}")]
    NoSuchQueue(usize),
}

/// A virtio device behind a transport. The transport owns the queues and negotiation; the
/// device only knows its features, its config space and how to serve a queue.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size (a power of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Every feature bit the device offers, including the transport's VIRTIO_F_VERSION_1.
    fn features(&self) -> u64;
    /// Reads the device-specific config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Serves every available chain of queue `index`. Returns whether the driver must be
    /// interrupted (something was put on the used ring). Malformed requests are answered or
    /// consumed by the device; an error here means the queue itself is broken.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError>;
    /// The driver reset the device (status 0).
    fn reset(&mut self);
    /// The device's own state for a snapshot (the transport saves the queues).
    fn save_state(&self) -> VirtioDeviceState;
    /// Puts back a saved state into a device built the same way.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError>;
}

/// A virtio device's own state in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioDeviceState {
    Block { disk: disk::DiskState },
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioStateError {
    #[error("the saved state is for a {saved} device, this one is {this}")]
    WrongDevice {
        saved: &'static str,
        this: &'static str,
    },
    #[error("the saved state has {saved} virtqueues, the device has {this}")]
    QueueCount { saved: usize, this: usize },
    #[error("virtqueue {queue}: the saved state is invalid: {source}")]
    Queue {
        queue: usize,
        source: virtio_queue::Error,
    },
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
}
