//! The port-I/O and MMIO buses: ordered maps of non-overlapping ranges to devices.
//!
//! The run loop only dispatches: a PIO exit goes to the PIO bus, an MMIO exit to the MMIO bus.
//! Devices see an offset into their own range and a [`DeviceContext`] carrying virtual time and
//! the interrupt lines; they never see KVM, the host clock, or which execution mode is running.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::clock::VirtualTime;
use crate::irq::IrqLines;

/// What a device may use during one access.
pub struct DeviceContext<'a> {
    pub now: VirtualTime,
    pub irqs: &'a mut IrqLines,
}

/// A device on a bus. `base` is the start of the range the access hit (a device inserted at
/// several ranges, like the PIC pair, tells them apart by it) and `offset` is relative to it.
pub trait BusDevice: Send {
    fn read(&mut self, cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &[u8]);
}

/// Devices are shared between the bus and the run loop (which asks the PIC what to inject and
/// the PIT for its next deadline). Everything runs on the vCPU thread, so the locks never contend.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around the address space")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device already at {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

/// Which bus an access came from; only used to make the open-bus log readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Pio,
    Mmio,
}

struct Slot {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices. Accesses that hit no device read as all-ones (open bus) and
/// writes are dropped; each such address is logged once.
pub struct Bus {
    kind: BusKind,
    slots: BTreeMap<u64, Slot>,
    logged_unhandled: BTreeSet<u64>,
}

impl Bus {
    pub fn new(kind: BusKind) -> Self {
        Bus {
            kind,
            slots: BTreeMap::new(),
            logged_unhandled: BTreeSet::new(),
        }
    }

    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let clash = self
            .slots
            .range(..end)
            .next_back()
            .filter(|(b, s)| **b + s.len > base);
        if let Some((other_base, other)) = clash {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: *other_base,
                other_len: other.len,
            });
        }
        self.slots.insert(base, Slot { len, device });
        Ok(())
    }

    /// The device holding `addr`, with the offset of `addr` inside it. An access that starts in a
    /// device but runs past its end is not the device's: it is treated as unhandled.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64, u64)> {
        let (base, slot) = self.slots.range(..=addr).next_back()?;
        let offset = addr - *base;
        let last = offset.checked_add(size.max(1) as u64 - 1)?;
        (last < slot.len).then_some((&slot.device, *base, offset))
    }

    /// Returns false when no device handled the access (the data is then all-ones).
    pub fn read(&mut self, cx: &mut DeviceContext<'_>, addr: u64, data: &mut [u8]) -> bool {
        if let Some((device, base, offset)) = self.find(addr, data.len()) {
            lock(device).read(cx, base, offset, data);
            return true;
        }
        data.fill(0xff);
        self.log_unhandled(addr, data.len(), "read");
        false
    }

    /// Returns false when no device handled the access (the write is dropped).
    pub fn write(&mut self, cx: &mut DeviceContext<'_>, addr: u64, data: &[u8]) -> bool {
        if let Some((device, base, offset)) = self.find(addr, data.len()) {
            lock(device).write(cx, base, offset, data);
            return true;
        }
        self.log_unhandled(addr, data.len(), "write");
        false
    }

    fn log_unhandled(&mut self, addr: u64, size: usize, what: &str) {
        if self.logged_unhandled.insert(addr) {
            tracing::debug!(bus = ?self.kind, addr = format_args!("{addr:#x}"), size, "unhandled {what}: open bus");
        }
    }
}

/// Locks a device. A poisoned lock means a device panicked on this same thread; its state is
/// still the best we have, and the panic itself is reported where it happened.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        last: Vec<u8>,
    }

    impl BusDevice for Echo {
        fn read(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, data: &[u8]) {
            self.last = data.to_vec();
        }
    }

    fn echo() -> SharedDevice {
        Arc::new(Mutex::new(Echo { last: Vec::new() }))
    }

    #[test]
    fn dispatches_by_range_and_reads_open_bus_elsewhere() {
        let mut bus = Bus::new(BusKind::Pio);
        bus.insert(0x3f8, 8, echo()).unwrap();
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut byte = [0u8; 1];
        assert!(bus.read(&mut cx, 0x3fd, &mut byte));
        assert_eq!(byte, [5]);
        assert!(!bus.read(&mut cx, 0x400, &mut byte));
        assert_eq!(byte, [0xff]);
        // Straddling the end of the device is not the device's access.
        let mut word = [0u8; 2];
        assert!(!bus.read(&mut cx, 0x3ff, &mut word));
        assert_eq!(word, [0xff, 0xff]);
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new(BusKind::Mmio);
        bus.insert(0x1000, 0x100, echo()).unwrap();
        assert!(matches!(
            bus.insert(0x10f0, 0x20, echo()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x0f80, 0x100, echo()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x2000, 0, echo()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x1100, 0x100, echo()).unwrap();
    }
}
