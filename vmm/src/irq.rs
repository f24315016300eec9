//! Interrupt lines between devices and the 8259 PIC pair.
//!
//! Devices never call into the PIC or KVM. They set the level of their ISA line (or pulse it) in
//! an [`IrqLines`] lent to them for the duration of an access or a timer callback; the run loop
//! then hands the changes to the PIC and decides at the next synchronous exit whether to inject.

/// Number of ISA interrupt lines behind the master and slave 8259.
pub const ISA_IRQ_COUNT: u8 = 16;

/// An ISA interrupt line number, 0..16. Construction checks the range so a bad line number
/// cannot reach the PIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IsaIrq(u8);

impl IsaIrq {
    pub const fn new(line: u8) -> Option<Self> {
        if line < ISA_IRQ_COUNT {
            Some(IsaIrq(line))
        } else {
            None
        }
    }

    pub const fn line(self) -> u8 {
        self.0
    }
}

/// The well-known ISA lines of a PC.
pub mod isa {
    use super::IsaIrq;
    pub const PIT: IsaIrq = IsaIrq(0);
    pub const KEYBOARD: IsaIrq = IsaIrq(1);
    pub const CASCADE: IsaIrq = IsaIrq(2);
    pub const COM2: IsaIrq = IsaIrq(3);
    pub const COM1: IsaIrq = IsaIrq(4);
    /// First line handed to virtio-mmio devices (5, 6, 7, 9, 10, 11 are free on our board).
    pub const VIRTIO_FIRST: IsaIrq = IsaIrq(5);
    pub const RTC: IsaIrq = IsaIrq(8);
}

/// Pending line changes produced by devices since the run loop last drained them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IrqLines {
    /// Bit n set: line n's level is being set; the level itself is in `levels`.
    level_changes: u16,
    levels: u16,
    /// Bit n set: line n was pulsed (raised then lowered), which an edge-triggered PIC latches.
    pulses: u16,
}

/// One change for the PIC, in the order the PIC should apply it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChange {
    Level(IsaIrq, bool),
    Pulse(IsaIrq),
}

impl IrqLines {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_level(&mut self, irq: IsaIrq, high: bool) {
        let bit = 1u16 << irq.0;
        self.level_changes |= bit;
        if high {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
    }

    pub fn pulse(&mut self, irq: IsaIrq) {
        self.pulses |= 1u16 << irq.0;
    }

    pub fn is_empty(&self) -> bool {
        self.level_changes == 0 && self.pulses == 0
    }

    /// Takes every pending change, lowest line first; pulses come after level changes of the
    /// same line so that a pulse is never swallowed by a level set in the same batch.
    pub fn drain(&mut self) -> Vec<IrqChange> {
        let mut changes = Vec::new();
        for line in 0..ISA_IRQ_COUNT {
            let bit = 1u16 << line;
            let irq = IsaIrq(line);
            if self.level_changes & bit != 0 {
                changes.push(IrqChange::Level(irq, self.levels & bit != 0));
            }
            if self.pulses & bit != 0 {
                changes.push(IrqChange::Pulse(irq));
            }
        }
        *self = IrqLines::default();
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_lines_past_fifteen() {
        assert!(IsaIrq::new(15).is_some());
        assert!(IsaIrq::new(16).is_none());
    }

    #[test]
    fn drains_in_line_order_and_empties() {
        let mut lines = IrqLines::new();
        lines.pulse(isa::COM1);
        lines.set_level(isa::PIT, true);
        lines.set_level(isa::COM1, false);
        assert_eq!(
            lines.drain(),
            vec![
                IrqChange::Level(isa::PIT, true),
                IrqChange::Level(isa::COM1, false),
                IrqChange::Pulse(isa::COM1),
            ]
        );
        assert!(lines.is_empty());
    }
}
