//! A test stand-in for Linux's virtio_mmio + virtio_ring drivers: it programs the transport
//! through its registers in the order Linux does and builds split-ring chains by hand, so tests
//! can also build the chains Linux never would.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::bus::{BusDevice, DeviceContext};
use crate::clock::VirtualTime;
use crate::irq::{IrqChange, IrqLines, IsaIrq};

pub const MEM_SIZE: u64 = 1 << 20;
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x3000;
pub const USED_RING: u64 = 0x4000;
pub const QUEUE_SIZE: u16 = 256;
pub const IRQ: IsaIrq = crate::irq::isa::VIRTIO_FIRST;

/// Device-writable buffer.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Device-readable buffer.
pub const R: u16 = 0;

pub struct Driver {
    pub transport: MmioTransport,
    pub mem: GuestMemoryMmap,
    irqs: IrqLines,
    line_high: bool,
    avail_idx: u16,
    used_idx: u16,
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self::with_memory(device, MEM_SIZE)
    }

    /// A driver whose guest has `mem_size` bytes of RAM (allocated as it is touched).
    pub fn with_memory(device: Box<dyn VirtioDevice>, mem_size: u64) -> Self {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]).unwrap();
        Driver {
            transport: MmioTransport::new(device, mem.clone(), IRQ),
            mem,
            irqs: IrqLines::new(),
            line_high: false,
            avail_idx: 0,
            used_idx: 0,
        }
    }

    pub fn read32(&mut self, offset: u32) -> u32 {
        let mut data = [0u8; 4];
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut self.irqs,
        };
        self.transport
            .read(&mut cx, 0, u64::from(offset), &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write32(&mut self, offset: u32, value: u32) {
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut self.irqs,
        };
        self.transport
            .write(&mut cx, 0, u64::from(offset), &value.to_le_bytes());
    }

    /// The level of the device's interrupt line as the PIC would see it.
    pub fn line_high(&mut self) -> bool {
        for change in self.irqs.drain() {
            match change {
                IrqChange::Level(irq, high) if irq == IRQ => self.line_high = high,
                other => panic!("unexpected interrupt change {other:?}"),
            }
        }
        self.line_high
    }

    fn add_status(&mut self, bits: u32) {
        let status = self.read32(VIRTIO_MMIO_STATUS);
        self.write32(VIRTIO_MMIO_STATUS, status | bits);
    }

    /// Feature negotiation as `virtio_dev_probe` does it; returns whether FEATURES_OK stuck.
    pub fn negotiate(&mut self, wanted: u64) -> bool {
        assert_eq!(self.read32(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read32(VIRTIO_MMIO_VERSION), 2);
        assert_ne!(self.read32(VIRTIO_MMIO_DEVICE_ID), 0);
        self.write32(VIRTIO_MMIO_STATUS, 0);
        self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.add_status(VIRTIO_CONFIG_S_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2 {
            self.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read32(VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * sel);
        }
        let features = offered & wanted;
        for sel in 0..2 {
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            self.write32(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK);
        self.read32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    /// Queue 0 set up as `vm_setup_vq` does, at the given ring addresses.
    pub fn setup_queue(&mut self, desc: u64, avail: u64, used: u64) {
        self.write32(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(self.read32(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(
            self.read32(VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(QUEUE_SIZE)
        );
        self.write32(VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
        for (low, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, used),
        ] {
            self.write32(low, addr as u32);
            self.write32(low + 4, (addr >> 32) as u32);
        }
        self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// The whole probe: negotiate everything offered, set up queue 0, DRIVER_OK.
    pub fn probe(&mut self) {
        assert!(self.negotiate(u64::MAX), "features refused");
        self.setup_queue(DESC_TABLE, AVAIL_RING, USED_RING);
        assert_eq!(self.read32(VIRTIO_MMIO_QUEUE_READY), 1);
        self.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        self.avail_idx = 0;
        self.used_idx = 0;
    }

    /// Writes descriptor `index` of the table.
    pub fn put_descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + u64::from(index) * 16);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, at).unwrap();
    }

    /// Offers `head`, notifies, and returns the used element (id, len) if one was added.
    pub fn offer(&mut self, head: u16) -> Option<(u32, u32)> {
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
        self.write32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let used: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        if used == self.used_idx {
            return None;
        }
        let elem = USED_RING + 4 + 8 * u64::from(self.used_idx % QUEUE_SIZE);
        self.used_idx = self.used_idx.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        Some((id, len))
    }

    /// Lays `buffers` (addr, len, R/W) out as one chain from descriptor 0 and offers it.
    pub fn submit(&mut self, buffers: &[(u64, u32, u16)]) -> Option<(u32, u32)> {
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let more = i + 1 < buffers.len();
            let next_flag = if more { VRING_DESC_F_NEXT as u16 } else { 0 };
            self.put_descriptor(i as u16, addr, len, flags | next_flag, i as u16 + 1);
        }
        self.offer(0)
    }
}
