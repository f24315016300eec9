//! virtio-blk: one request queue served synchronously on the guest's QueueNotify exit.

mod request;

use std::collections::HashSet;
use std::mem::{discriminant, Discriminant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::disk::DiskBackend;
use super::{VirtioDevice, VirtioDeviceState, VirtioError, VirtioStateError};
pub use request::RequestError;

pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Data segments per request: the queue minus the header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The serial number GET_ID returns (`/sys/block/vda/serial`).
pub const SERIAL: &[u8] = b"rrr-disk";

/// `struct virtio_blk_config` up to and including `blk_size`.
const CONFIG_LEN: usize = 24;

pub struct Block {
    disk: Box<dyn DiskBackend>,
    capacity: u64,
    config: [u8; CONFIG_LEN],
    scratch: Vec<u8>,
    /// Kinds of bad request already logged, so a hostile driver cannot flood the log.
    logged: HashSet<Discriminant<RequestError>>,
}

impl Block {
    pub fn new(disk: Box<dyn DiskBackend>) -> Self {
        // A trailing partial sector cannot be addressed by the guest, so it is not offered.
        let capacity = disk.capacity_bytes() / SECTOR_SIZE * SECTOR_SIZE;
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&(capacity / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Block {
            disk,
            capacity,
            config,
            scratch: vec![0; request::CHUNK],
            logged: HashSet::new(),
        }
    }

    pub fn disk(&self) -> &dyn DiskBackend {
        self.disk.as_ref()
    }

    /// Serves one chain; returns the used length (bytes written into guest memory).
    fn serve(&mut self, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let mem = chain.memory();
        let head = chain.head_index();
        let parsed = request::Chain::parse(chain.clone(), QUEUE_SIZE as usize, mem);
        let chain = match parsed {
            Ok(chain) => chain,
            Err(e) => {
                self.log_once(head, &e);
                return 0;
            }
        };
        let (written, result) =
            chain.execute(self.disk.as_mut(), self.capacity, mem, &mut self.scratch);
        let status = match &result {
            Ok(()) => VIRTIO_BLK_S_OK as u8,
            Err(e) => {
                self.log_once(head, e);
                e.status().unwrap_or(0)
            }
        };
        // `parse` checked that the status byte is in guest memory. The used length is 32 bits:
        // a guest that asked for more than that is told the most it can be told.
        crate::vstate::memory::note_host_write(chain.status_addr().0, 1);
        let used = match mem.write_obj(status, chain.status_addr()) {
            Ok(()) => written.saturating_add(1),
            Err(e) => {
                tracing::warn!(head, "virtio-blk: status byte unwritable: {e}");
                written
            }
        };
        u32::try_from(used).unwrap_or(u32::MAX)
    }

    fn log_once(&mut self, head: u16, e: &RequestError) {
        if self.logged.insert(discriminant(e)) {
            tracing::warn!(head, "virtio-blk: bad request: {e}");
        } else {
            tracing::trace!(head, "virtio-blk: bad request: {e}");
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE;
        if self.disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let start = offset.min(CONFIG_LEN as u64) as usize;
        let end = offset
            .saturating_add(data.len() as u64)
            .min(CONFIG_LEN as u64) as usize;
        data[..end - start].copy_from_slice(&self.config[start..end]);
    }

    /// Nothing in our config space is writable (no writeback toggle is offered).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "virtio-blk: config write ignored");
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        if index != 0 {
            return Err(VirtioError::NoSuchQueue(index));
        }
        let broken = |source| VirtioError::Queue { queue: 0, source };
        // Collected first because the used ring cannot be written while the iterator borrows
        // the queue; there are at most QUEUE_SIZE chains.
        let chains: Vec<_> = queue.iter(mem).map_err(broken)?.collect();
        if chains.is_empty() {
            return Ok(false);
        }
        for chain in chains {
            let head = chain.head_index();
            let len = self.serve(chain);
            // A head index outside the table means the available ring itself is garbage.
            queue.add_used(mem, head, len).map_err(broken)?;
        }
        // The used ring: flags, index, the elements and the event word.
        crate::vstate::memory::note_host_write(
            queue.used_ring(),
            6 + 8 * usize::from(queue.size()),
        );
        queue.needs_notification(mem).map_err(broken)
    }

    fn reset(&mut self) {}

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block {
            disk: self.disk.save_state(),
        }
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let VirtioDeviceState::Block { disk } = state;
        self.disk.restore_state(disk)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
