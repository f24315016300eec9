//! The virtio-mmio transport, modern (version 2) register layout (virtio 1.2, section 4.2.2).
//!
//! The transport owns feature negotiation, the device status and the virtqueues; the device
//! behind it only serves queues. Guest mistakes in configuration (a bad queue size, rings
//! outside guest memory, a broken available ring) put the device in DEVICE_NEEDS_RESET, as the
//! spec asks, instead of touching memory the guest did not offer.

use std::collections::BTreeSet;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{VirtioDevice, VirtioDeviceState, VirtioStateError};
use crate::bus::{BusDevice, DeviceContext};
use crate::irq::{IrqLines, IsaIrq};

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Where the first virtio-mmio device goes; device n is at `MMIO_BASE + n * MMIO_WINDOW`.
pub const MMIO_BASE: u64 = 0xd000_0000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"rrr\0");
const CONFIG_SPACE: u64 = VIRTIO_MMIO_CONFIG as u64;
/// What Linux reads from SHMLenLow/High to learn that a shared-memory region does not exist.
const NO_SHM: u32 = u32::MAX;

/// The Linux command-line entry that declares a device (`VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn cmdline_entry(base: u64, irq: IsaIrq) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{}", irq.line())
}

/// One virtqueue as the driver configured it (mirrors `virtio_queue::QueueState`, which has no
/// serde support).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers, its queues and the device behind it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    pub queues: Vec<QueueSnapshot>,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
    pub device: VirtioDeviceState,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: IsaIrq,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    /// Guest mistakes already logged, so a misbehaving driver cannot flood the log.
    logged: BTreeSet<(&'static str, u64)>,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IsaIrq) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| {
                // Sizes come from our own device code, never from the guest.
                Queue::new(max).expect("virtio device declares an invalid queue size")
            })
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            logged: BTreeSet::new(),
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt_status,
            device: self.device.save_state(),
        }
    }

    /// Puts a saved state back into a transport built the same way (same device, same slot).
    /// Nothing is changed unless all of it fits.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), VirtioStateError> {
        if state.queues.len() != self.queues.len() {
            return Err(VirtioStateError::QueueCount {
                saved: state.queues.len(),
                this: self.queues.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(queue, q)| {
                Queue::try_from(virtio_queue::QueueState::from(q))
                    .map_err(|source| VirtioStateError::Queue { queue, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.device.restore_state(&state.device)?;
        self.queues = queues;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        Ok(())
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    fn log_once(&mut self, what: &'static str, value: u64) {
        if self.logged.insert((what, value)) {
            tracing::warn!(
                device = self.device.device_type(),
                value = format_args!("{value:#x}"),
                "virtio-mmio: {what}"
            );
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => NO_SHM,
            // The config space never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                self.log_once("read of an unknown or write-only register", offset);
                0
            }
        }
    }

    fn write_register(&mut self, irqs: &mut IrqLines, offset: u64, value: u32) {
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_config(irqs, offset as u32, value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(irqs, value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(irqs, value),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status &= !value;
                if self.interrupt_status == 0 {
                    irqs.set_level(self.irq, false);
                }
            }
            VIRTIO_MMIO_STATUS => self.write_status(irqs, value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.log_once("write to an unknown or read-only register", offset),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER == 0
            || self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            self.log_once(
                "driver features written outside negotiation",
                u64::from(value),
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel if value != 0 => {
                self.log_once("driver features in a nonexistent word", u64::from(sel))
            }
            _ => {}
        }
    }

    fn write_status(&mut self, irqs: &mut IrqLines, value: u32) {
        if value == 0 {
            self.reset(irqs);
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set, never the driver's.
        let mut new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if new & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
        {
            let offered = self.device.features();
            let extra = self.driver_features & !offered;
            if extra != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Leaving FEATURES_OK clear is how the spec says "no" (3.1.1, step 6).
                self.log_once("driver features refused", self.driver_features);
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
            } else {
                let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
                self.queues
                    .iter_mut()
                    .for_each(|q| q.set_event_idx(event_idx));
            }
        }
        self.status = new | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    fn reset(&mut self, irqs: &mut IrqLines) {
        tracing::debug!(device = self.device.device_type(), "virtio-mmio reset");
        self.device.reset();
        self.queues.iter_mut().for_each(|q| q.reset());
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        if self.interrupt_status != 0 {
            self.interrupt_status = 0;
            irqs.set_level(self.irq, false);
        }
    }

    fn write_queue_config(&mut self, irqs: &mut IrqLines, register: u32, value: u32) {
        let configurable = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0;
        let sel = u64::from(self.queue_sel);
        let Some(queue) = self.queues.get_mut(self.queue_sel as usize) else {
            self.log_once("configuration of a nonexistent queue", sel);
            return;
        };
        if !configurable || queue.ready() {
            self.log_once(
                "queue configured while live or before FEATURES_OK",
                u64::from(register),
            );
            return;
        }
        // Each address arrives as two 32-bit halves; the LOW registers sit 4 bytes below HIGH.
        let high_half = register & 4 != 0;
        let splice = |old: u64| {
            let v = u64::from(value);
            GuestAddress(if high_half {
                (old & 0xffff_ffff) | (v << 32)
            } else {
                (old & !0xffff_ffff) | v
            })
        };
        let result = match register {
            VIRTIO_MMIO_QUEUE_NUM => queue.try_set_size(u16::try_from(value).unwrap_or(0)),
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(splice(queue.desc_table()))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                queue.try_set_avail_ring_address(splice(queue.avail_ring()))
            }
            _ => queue.try_set_used_ring_address(splice(queue.used_ring())),
        };
        if let Err(e) = result {
            self.needs_reset(
                irqs,
                &format!("queue {sel}: {e} (register {register:#x} = {value:#x})"),
            );
        }
    }

    fn write_queue_ready(&mut self, irqs: &mut IrqLines, value: u32) {
        let sel = self.queue_sel;
        let broken = self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0;
        let Some(queue) = self.queues.get_mut(sel as usize) else {
            self.log_once("QueueReady on a nonexistent queue", u64::from(sel));
            return;
        };
        if value == 0 {
            queue.set_ready(false);
            return;
        }
        if broken || queue.ready() {
            return;
        }
        // `is_valid` only looks at a queue marked ready, so mark it and take it back on failure.
        queue.set_ready(true);
        if !queue.is_valid(&self.mem) {
            queue.set_ready(false);
            self.needs_reset(irqs, &format!("queue {sel} rings lie outside guest memory"));
        }
    }

    fn notify(&mut self, irqs: &mut IrqLines, index: u32) {
        let live = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0;
        if !live {
            self.log_once(
                "notify while the device is not live",
                u64::from(self.status),
            );
            return;
        }
        let Some(queue) = self.queues.get_mut(index as usize).filter(|q| q.ready()) else {
            self.log_once("notify of a nonexistent or unready queue", u64::from(index));
            return;
        };
        match self.device.process_queue(index as usize, queue, &self.mem) {
            Ok(true) => self.raise(irqs, VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(e) => self.needs_reset(irqs, &e.to_string()),
        }
    }

    /// The device cannot go on until the driver resets it (virtio 1.2, 2.1.2).
    fn needs_reset(&mut self, irqs: &mut IrqLines, why: &str) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        tracing::warn!(
            device = self.device.device_type(),
            "virtio-mmio device needs reset: {why}"
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.raise(irqs, VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn raise(&mut self, irqs: &mut IrqLines, cause: u32) {
        if self.interrupt_status == 0 {
            irqs.set_level(self.irq, true);
        }
        self.interrupt_status |= cause;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // The spec allows only aligned 32-bit register accesses.
            self.log_once("register read that is not 32-bit aligned", offset);
            data.fill(0);
        }
    }

    fn write(&mut self, cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
        } else if let (Ok(bytes), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            self.write_register(cx.irqs, offset, u32::from_le_bytes(bytes));
        } else {
            self.log_once("register write that is not 32-bit aligned", offset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::{
        Driver, AVAIL_RING, DESC_TABLE, MEM_SIZE, USED_RING,
    };
    use crate::devices::virtio::VirtioError;
    use crate::irq::isa;

    /// Offers VERSION_1 and one feature in the high word; completes nothing.
    struct Dummy;

    const HIGH_FEATURE: u64 = 1 << 33;

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256]
        }
        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | HIGH_FEATURE | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn process_queue(
            &mut self,
            _index: usize,
            _queue: &mut Queue,
            _mem: &GuestMemoryMmap,
        ) -> Result<bool, VirtioError> {
            Ok(true)
        }
        fn reset(&mut self) {}
        fn save_state(&self) -> VirtioDeviceState {
            VirtioDeviceState::Block {
                disk: crate::devices::virtio::disk::DiskState::Unchanged,
            }
        }
        fn restore_state(&mut self, _: &VirtioDeviceState) -> Result<(), VirtioStateError> {
            Ok(())
        }
    }

    fn driver() -> Driver {
        Driver::new(Box::new(Dummy))
    }

    #[test]
    fn cmdline_entry_uses_linux_syntax() {
        assert_eq!(
            cmdline_entry(MMIO_BASE, isa::VIRTIO_FIRST),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn identifies_itself_and_exposes_64_bit_features_and_config() {
        let mut d = driver();
        assert_eq!(d.read32(VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(d.read32(VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        d.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.read32(VIRTIO_MMIO_DEVICE_FEATURES), 0b11);
        d.write32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(d.read32(VIRTIO_MMIO_DEVICE_FEATURES), 0);
        assert_eq!(d.read32(0x104), 0x05050505, "config offset 4");
        assert_eq!(d.read32(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn refuses_features_without_version_1_or_not_offered() {
        let mut d = driver();
        assert!(!d.negotiate(1), "VERSION_1 missing");
        // Offered features are accepted; a bit the device never offered is not.
        assert!(d.negotiate(1 << VIRTIO_F_VERSION_1 | HIGH_FEATURE));
        d.write32(VIRTIO_MMIO_STATUS, 0);
        d.write32(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
        d.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        d.write32(VIRTIO_MMIO_DRIVER_FEATURES, 1 | 1 << 5);
        d.write32(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(
            d.read32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK,
            0
        );
    }

    #[test]
    fn rings_outside_guest_memory_need_a_reset() {
        let mut d = driver();
        assert!(d.negotiate(u64::MAX));
        d.setup_queue(DESC_TABLE, AVAIL_RING, MEM_SIZE - 16);
        assert_eq!(d.read32(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_ne!(
            d.read32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        // No DRIVER_OK yet, so no config interrupt.
        assert!(!d.line_high());
        d.probe();
        assert_eq!(
            d.read32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(d.read32(VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn bad_queue_size_and_alignment_need_a_reset() {
        for (register, value) in [
            (VIRTIO_MMIO_QUEUE_NUM, 3),
            (VIRTIO_MMIO_QUEUE_NUM, 512),
            (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008),
            (VIRTIO_MMIO_QUEUE_USED_LOW, 0x4002),
        ] {
            let mut d = driver();
            assert!(d.negotiate(u64::MAX));
            d.write32(register, value);
            assert_ne!(
                d.read32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
                0,
                "{register:#x} = {value:#x}"
            );
            d.write32(VIRTIO_MMIO_QUEUE_READY, 1);
            assert_eq!(d.read32(VIRTIO_MMIO_QUEUE_READY), 0);
        }
    }

    #[test]
    fn queue_cannot_be_moved_while_live_and_notify_needs_driver_ok() {
        let mut d = driver();
        assert!(d.negotiate(u64::MAX));
        d.setup_queue(DESC_TABLE, AVAIL_RING, USED_RING);
        // Before DRIVER_OK a notify does nothing.
        d.write32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(!d.line_high());
        d.write32(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
        assert_eq!(d.transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        d.probe();
        d.write32(VIRTIO_MMIO_QUEUE_NOTIFY, 5); // no such queue
        assert!(!d.line_high());
        d.write32(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(d.line_high());
        assert_eq!(
            d.read32(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        d.write32(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert!(!d.line_high());
    }

    #[test]
    fn odd_sized_register_accesses_are_ignored() {
        let mut d = driver();
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: crate::clock::VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut byte = [0xffu8; 1];
        d.transport.read(&mut cx, 0, 0, &mut byte);
        assert_eq!(byte, [0]);
        let mut word = [0xffu8; 4];
        d.transport.read(&mut cx, 0, 2, &mut word);
        assert_eq!(word, [0; 4]);
        d.transport
            .write(&mut cx, 0, VIRTIO_MMIO_STATUS.into(), &[1]);
        assert_eq!(d.read32(VIRTIO_MMIO_STATUS), 0);
        d.write32(0x0fc0, 1); // unknown register
    }
}
