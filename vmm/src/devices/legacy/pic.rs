//! The cascaded 8259A programmable interrupt controller pair of a PC, with its ELCR.
//!
//! The master's IR2 input is the slave's INT output. The run loop feeds line changes in with
//! [`PicPair::apply`], looks at [`PicPair::interrupt_pending`] (the INTR pin) and, when it can
//! inject, runs the INTA cycle with [`PicPair::acknowledge`].
//!
//! Simplified against the datasheet:
//! - Special fully nested mode (ICW4 bit 4) is stored but only affects the master's own IR2
//!   priority check, as in QEMU; buffered mode and 8080 call addresses are ignored.
//! - ICW1's LTIM bit (all inputs level triggered) is ignored; a PC selects level mode per line
//!   through the ELCR, which is emulated.
//! - INTA with the INTR pin low does not happen here: [`PicPair::acknowledge`] returns `None`
//!   instead of the spurious IRQ7 a real master would give, because the run loop re-checks
//!   before injecting. A slave that has lost its request by INTA time gives the spurious IRQ15
//!   as real hardware does.
//! - A pulse on a line the ELCR makes level triggered is lost (raised then lowered before any
//!   INTA), as on hardware; level devices must use levels.

use crate::bus::{BusDevice, DeviceContext};
use crate::irq::IrqChange;

/// I/O base of the master 8259 (command at +0, data/IMR at +1).
pub const PIC_MASTER_BASE: u64 = 0x20;
/// I/O base of the slave 8259.
pub const PIC_SLAVE_BASE: u64 = 0xa0;
/// I/O base of the edge/level control registers (master at +0, slave at +1).
pub const ELCR_BASE: u64 = 0x4d0;
/// Each 8259 decodes two ports.
pub const PIC_PORT_LEN: u64 = 2;
/// The ELCR pair decodes two ports.
pub const ELCR_PORT_LEN: u64 = 2;

/// Master input the slave cascades into.
const CASCADE_LINE: u8 = 2;
/// IRQ 0, 1 and 2 are always edge triggered on a PC.
const MASTER_ELCR_MASK: u8 = 0xf8;
/// IRQ 8 (RTC) and 13 (FPU) are always edge triggered on a PC.
const SLAVE_ELCR_MASK: u8 = 0xde;
/// The lowest-priority line, reported when an INTA finds no request.
const SPURIOUS_LINE: u8 = 7;

/// Where a chip is in its initialization sequence: which ICW the next data-port write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum InitState {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Chip {
    /// Interrupt request register.
    irr: u8,
    /// In-service register.
    isr: u8,
    /// Interrupt mask register (OCW1).
    imr: u8,
    /// The input pins as last driven, to detect rising edges.
    pins: u8,
    /// Lines in level-triggered mode (ELCR).
    elcr: u8,
    elcr_mask: u8,
    vector_base: u8,
    init: InitState,
    needs_icw4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    /// OCW3 RR/RIS: reads of the command port return ISR instead of IRR.
    read_isr: bool,
    /// OCW3 P: the next read is a poll.
    poll: bool,
    /// The line with the lowest priority is `priority_add - 1`; rotation moves it.
    priority_add: u8,
    is_master: bool,
}

impl Chip {
    fn new(is_master: bool) -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0,
            pins: 0,
            elcr: 0,
            elcr_mask: if is_master {
                MASTER_ELCR_MASK
            } else {
                SLAVE_ELCR_MASK
            },
            vector_base: 0,
            init: InitState::Ready,
            needs_icw4: false,
            single: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            priority_add: 0,
            is_master,
        }
    }

    /// Drives input pin `line` (0..8).
    fn set_pin(&mut self, line: u8, high: bool) {
        let bit = 1u8 << (line & 7);
        if self.elcr & bit != 0 {
            // Level triggered: the request follows the pin.
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if high && self.pins & bit == 0 {
            self.irr |= bit;
        }
        if high {
            self.pins |= bit;
        } else {
            self.pins &= !bit;
        }
    }

    /// Priority (0 highest) of the best line in `mask`, 8 when empty.
    fn priority(&self, mask: u8) -> u8 {
        (0..8u8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The line this chip would present to the CPU now, if any (the INT output).
    fn best_request(&self) -> Option<u8> {
        let request = self.priority(self.irr & !self.imr);
        if request == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.is_master {
            // The slave may interrupt its own in-service request in this mode.
            in_service &= !(1 << CASCADE_LINE);
        }
        (request < self.priority(in_service)).then_some((request + self.priority_add) & 7)
    }

    /// The INTA cycle's effect on this chip for `line`.
    fn acknowledge_line(&mut self, line: u8) {
        let bit = 1u8 << (line & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (line + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        // A level-triggered request stays until the device drops its line.
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    /// Poll mode read: acknowledges like INTA and returns 0x80 | line, or 0.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.best_request() {
            Some(line) => {
                self.acknowledge_line(line);
                0x80 | line
            }
            None => 0,
        }
    }

    fn read(&mut self, port: u64) -> u8 {
        if self.poll {
            return self.poll_read();
        }
        match (port, self.read_isr) {
            (0, false) => self.irr,
            (0, true) => self.isr,
            _ => self.imr,
        }
    }

    fn write(&mut self, port: u64, value: u8) {
        if port == 0 {
            self.write_command(value);
        } else {
            self.write_data(value);
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            self.icw1(value);
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            self.ocw2(value);
        }
    }

    fn icw1(&mut self, value: u8) {
        // Initialization clears the request, service and mask registers and the edge
        // detectors; the pins themselves stay where the devices drive them, so a line held
        // high needs a new rising edge, as the datasheet says.
        let (pins, elcr) = (self.pins, self.elcr);
        *self = Chip::new(self.is_master);
        self.pins = pins;
        self.elcr = elcr;
        self.init = InitState::Icw2;
        self.needs_icw4 = value & 0x01 != 0;
        self.single = value & 0x02 != 0;
        if value & 0x08 != 0 {
            tracing::debug!(
                master = self.is_master,
                "8259 ICW1 asks for level mode; PC boards use the ELCR, ignored"
            );
        }
    }

    fn ocw2(&mut self, value: u8) {
        let line = value & 7;
        match value >> 5 {
            // Clear / set rotate in automatic EOI mode.
            0 => self.rotate_on_auto_eoi = false,
            4 => self.rotate_on_auto_eoi = true,
            // Non-specific EOI, optionally rotating.
            cmd @ (1 | 5) => {
                let priority = self.priority(self.isr);
                if priority != 8 {
                    let served = (priority + self.priority_add) & 7;
                    self.isr &= !(1 << served);
                    if cmd == 5 {
                        self.priority_add = (served + 1) & 7;
                    }
                }
            }
            // Specific EOI.
            3 => self.isr &= !(1 << line),
            // Set priority: `line` becomes the lowest.
            6 => self.priority_add = (line + 1) & 7,
            // Rotate on specific EOI.
            7 => {
                self.isr &= !(1 << line);
                self.priority_add = (line + 1) & 7;
            }
            // 2: no operation.
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init {
            InitState::Ready => self.imr = value,
            InitState::Icw2 => {
                self.vector_base = value & 0xf8;
                self.init = match (self.single, self.needs_icw4) {
                    (false, _) => InitState::Icw3,
                    (true, true) => InitState::Icw4,
                    (true, false) => InitState::Ready,
                };
            }
            InitState::Icw3 => {
                // The cascade wiring of a PC is fixed (slave on IR2), whatever ICW3 says.
                self.init = if self.needs_icw4 {
                    InitState::Icw4
                } else {
                    InitState::Ready
                };
            }
            InitState::Icw4 => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init = InitState::Ready;
            }
        }
    }

    fn set_elcr(&mut self, value: u8) {
        self.elcr = value & self.elcr_mask;
    }
}

/// The master/slave 8259A pair and the ELCR of a PC.
/// Pure state: the pair is its own snapshot state (see [`crate::persist::Persist`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PicPair {
    master: Chip,
    slave: Chip,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    pub fn new() -> Self {
        PicPair {
            master: Chip::new(true),
            slave: Chip::new(false),
        }
    }

    /// Applies one line change from a device.
    pub fn apply(&mut self, change: IrqChange) {
        match change {
            IrqChange::Level(irq, high) => self.set_line(irq.line(), high),
            IrqChange::Pulse(irq) => {
                self.set_line(irq.line(), true);
                self.set_line(irq.line(), false);
            }
        }
    }

    /// The INTR pin: the master has a request the CPU should take.
    pub fn interrupt_pending(&self) -> bool {
        self.master.best_request().is_some()
    }

    /// The INTA cycle: the vector to inject, with IRR/ISR updated as the 8259s do.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let line = self.master.best_request()?;
        let vector = if line == CASCADE_LINE && !self.master.single {
            let slave_line = match self.slave.best_request() {
                Some(slave_line) => {
                    self.slave.acknowledge_line(slave_line);
                    slave_line
                }
                // The slave's request went away since it raised INT.
                None => SPURIOUS_LINE,
            };
            self.slave.vector_base.wrapping_add(slave_line)
        } else {
            self.master.vector_base.wrapping_add(line)
        };
        self.master.acknowledge_line(line);
        self.update_cascade();
        tracing::trace!(line, vector, "8259 acknowledge");
        Some(vector)
    }

    fn set_line(&mut self, line: u8, high: bool) {
        if line < 8 {
            self.master.set_pin(line, high);
        } else {
            self.slave.set_pin(line & 7, high);
            self.update_cascade();
        }
    }

    /// Drives the master's IR2 from the slave's INT output.
    fn update_cascade(&mut self) {
        let slave_int = self.slave.best_request().is_some();
        self.master.set_pin(CASCADE_LINE, slave_int);
    }

    fn read_byte(&mut self, base: u64, offset: u64) -> u8 {
        let value = match base {
            PIC_MASTER_BASE => self.master.read(offset),
            PIC_SLAVE_BASE => self.slave.read(offset),
            ELCR_BASE if offset == 0 => self.master.elcr,
            ELCR_BASE => self.slave.elcr,
            _ => 0xff,
        };
        // A poll read acknowledges.
        self.update_cascade();
        value
    }

    fn write_byte(&mut self, base: u64, offset: u64, value: u8) {
        match base {
            PIC_MASTER_BASE => self.master.write(offset, value),
            PIC_SLAVE_BASE => self.slave.write(offset, value),
            ELCR_BASE if offset == 0 => self.master.set_elcr(value),
            ELCR_BASE => self.slave.set_elcr(value),
            _ => tracing::debug!(
                base = format_args!("{base:#x}"),
                "8259 write at a range it does not own"
            ),
        }
        self.update_cascade();
    }
}

impl BusDevice for PicPair {
    fn read(&mut self, _cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &mut [u8]) {
        // A wider access is a run of byte cycles on consecutive ports.
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(base, offset.saturating_add(i as u64) & 1);
        }
    }

    fn write(&mut self, _cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.write_byte(base, offset.saturating_add(i as u64) & 1, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualTime;
    use crate::irq::{isa, IrqLines, IsaIrq};

    fn out(pic: &mut PicPair, port: u64, value: u8) {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let base = port & !1;
        pic.write(&mut cx, base, port & 1, &[value]);
    }

    fn inb(pic: &mut PicPair, port: u64) -> u8 {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut data = [0u8];
        pic.read(&mut cx, port & !1, port & 1, &mut data);
        data[0]
    }

    fn irq(line: u8) -> IsaIrq {
        IsaIrq::new(line).unwrap()
    }

    /// What Linux's `init_8259A(0)` writes, then the masks it restores.
    fn linux_init(pic: &mut PicPair, auto_eoi: bool, master_mask: u8, slave_mask: u8) {
        out(pic, 0x21, 0xff);
        out(pic, 0xa1, 0xff);
        out(pic, 0x20, 0x11);
        out(pic, 0x21, 0x30);
        out(pic, 0x21, 0x04);
        out(pic, 0x21, if auto_eoi { 0x03 } else { 0x01 });
        out(pic, 0xa0, 0x11);
        out(pic, 0xa1, 0x38);
        out(pic, 0xa1, 0x02);
        out(pic, 0xa1, 0x01);
        out(pic, 0x21, master_mask);
        out(pic, 0xa1, slave_mask);
    }

    /// Linux's `mask_and_ack_8259A` EOI for `line`.
    fn linux_eoi(pic: &mut PicPair, line: u8) {
        if line >= 8 {
            out(pic, 0xa0, 0x60 + (line & 7));
            out(pic, 0x20, 0x60 + 2);
        } else {
            out(pic, 0x20, 0x60 + line);
        }
    }

    #[test]
    fn probe_reads_back_the_mask() {
        let mut pic = PicPair::new();
        out(&mut pic, 0x21, 0xff);
        assert_eq!(inb(&mut pic, 0x21), 0xff);
        out(&mut pic, 0xa1, 0x5a);
        assert_eq!(inb(&mut pic, 0xa1), 0x5a);
    }

    #[test]
    fn linux_init_then_priority_order_and_eoi() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0xfa, 0xff);
        assert!(!pic.interrupt_pending());
        pic.apply(IrqChange::Pulse(isa::COM1));
        pic.apply(IrqChange::Pulse(isa::PIT));
        assert!(pic.interrupt_pending());
        // IRQ0 first, and while it is in service IRQ4 waits.
        assert_eq!(pic.acknowledge(), Some(0x30));
        assert!(!pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), None);
        // Unmask IRQ4: still blocked by the higher-priority IRQ0 in service.
        out(&mut pic, 0x21, 0xea);
        assert!(!pic.interrupt_pending());
        // ISR visible through OCW3.
        out(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x01);
        out(&mut pic, 0x20, 0x0a);
        assert_eq!(inb(&mut pic, 0x20), 0x10);
        linux_eoi(&mut pic, 0);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x34));
        linux_eoi(&mut pic, 4);
        assert!(!pic.interrupt_pending());
        out(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0);
    }

    #[test]
    fn masked_line_waits_in_irr() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0xff, 0xff);
        pic.apply(IrqChange::Pulse(isa::PIT));
        assert!(!pic.interrupt_pending());
        assert_eq!(inb(&mut pic, 0x20), 0x01);
        out(&mut pic, 0x21, 0xfe);
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn higher_priority_nests_over_lower_in_service() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0x00, 0xff);
        pic.apply(IrqChange::Pulse(isa::COM1));
        assert_eq!(pic.acknowledge(), Some(0x34));
        pic.apply(IrqChange::Pulse(isa::PIT));
        assert_eq!(pic.acknowledge(), Some(0x30));
        // Non-specific EOI retires the highest priority in service first.
        out(&mut pic, 0x20, 0x20);
        out(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x10);
    }

    #[test]
    fn slave_lines_cascade_through_irq2() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0xfb, 0xfe);
        pic.apply(IrqChange::Pulse(isa::RTC));
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x38));
        assert!(!pic.interrupt_pending());
        // A second slave request waits until both EOIs are done.
        out(&mut pic, 0xa1, 0xfc);
        pic.apply(IrqChange::Pulse(irq(9)));
        assert!(!pic.interrupt_pending());
        linux_eoi(&mut pic, 8);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x39));
        linux_eoi(&mut pic, 9);
        assert!(!pic.interrupt_pending());
        // The master's IR2 outranks IR4.
        out(&mut pic, 0x21, 0xeb);
        pic.apply(IrqChange::Pulse(isa::COM1));
        pic.apply(IrqChange::Pulse(irq(9)));
        assert_eq!(pic.acknowledge(), Some(0x39));
        linux_eoi(&mut pic, 9);
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn slave_request_masked_before_inta_is_spurious_irq15() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0xfb, 0xfe);
        pic.apply(IrqChange::Pulse(isa::RTC));
        // IR2 is latched on the master (edge); the slave then loses its request.
        out(&mut pic, 0xa1, 0xff);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), Some(0x3f));
        out(&mut pic, 0xa0, 0x0b);
        assert_eq!(
            inb(&mut pic, 0xa0),
            0,
            "spurious IRQ15 sets no slave ISR bit"
        );
    }

    #[test]
    fn edge_lines_latch_only_on_rising_edges() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0x00, 0xff);
        pic.apply(IrqChange::Level(isa::COM1, true));
        assert_eq!(pic.acknowledge(), Some(0x34));
        linux_eoi(&mut pic, 4);
        // Held high: no new request.
        pic.apply(IrqChange::Level(isa::COM1, true));
        assert!(!pic.interrupt_pending());
        pic.apply(IrqChange::Level(isa::COM1, false));
        pic.apply(IrqChange::Level(isa::COM1, true));
        assert_eq!(pic.acknowledge(), Some(0x34));
    }

    #[test]
    fn elcr_level_lines_follow_the_pin() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0x00, 0x00);
        // IRQ 0-2 cannot be level triggered; IRQ 5 and 10 can.
        out(&mut pic, 0x4d0, 0xff);
        assert_eq!(inb(&mut pic, 0x4d0), 0xf8);
        out(&mut pic, 0x4d1, 0xff);
        assert_eq!(inb(&mut pic, 0x4d1), 0xde);
        pic.apply(IrqChange::Level(irq(5), true));
        assert_eq!(pic.acknowledge(), Some(0x35));
        linux_eoi(&mut pic, 5);
        // Still high after EOI: requested again.
        assert_eq!(pic.acknowledge(), Some(0x35));
        linux_eoi(&mut pic, 5);
        pic.apply(IrqChange::Level(irq(5), false));
        assert!(!pic.interrupt_pending());
        // Through the cascade too.
        pic.apply(IrqChange::Level(irq(10), true));
        assert_eq!(pic.acknowledge(), Some(0x3a));
        linux_eoi(&mut pic, 10);
        assert_eq!(pic.acknowledge(), Some(0x3a));
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, true, 0xfe, 0xff);
        pic.apply(IrqChange::Pulse(isa::PIT));
        assert_eq!(pic.acknowledge(), Some(0x30));
        out(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0);
        pic.apply(IrqChange::Pulse(isa::PIT));
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn poll_mode_acknowledges() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0x00, 0xff);
        out(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0, "nothing pending");
        pic.apply(IrqChange::Pulse(isa::COM1));
        out(&mut pic, 0x20, 0x0c);
        assert_eq!(inb(&mut pic, 0x20), 0x84);
        out(&mut pic, 0x20, 0x0b);
        assert_eq!(inb(&mut pic, 0x20), 0x10);
    }

    #[test]
    fn rotation_changes_priority() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0x00, 0xff);
        // Set priority: IR3 lowest, so IR4 is now highest.
        out(&mut pic, 0x20, 0xc3);
        pic.apply(IrqChange::Pulse(isa::PIT));
        pic.apply(IrqChange::Pulse(isa::COM1));
        assert_eq!(pic.acknowledge(), Some(0x34));
        // Rotate on non-specific EOI: IR4 becomes lowest, IR5 highest, IR0 still pending.
        out(&mut pic, 0x20, 0xa0);
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn reinit_clears_requests_but_keeps_elcr() {
        let mut pic = PicPair::new();
        linux_init(&mut pic, false, 0x00, 0xff);
        out(&mut pic, 0x4d0, 0x20);
        pic.apply(IrqChange::Pulse(isa::COM1));
        linux_init(&mut pic, false, 0x00, 0xff);
        assert!(!pic.interrupt_pending());
        assert_eq!(inb(&mut pic, 0x4d0), 0x20);
    }

    #[test]
    fn wide_and_odd_accesses_do_not_panic() {
        let mut pic = PicPair::new();
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut data = [0u8; 4];
        pic.write(&mut cx, ELCR_BASE, 0, &[0xff, 0xff]);
        pic.read(&mut cx, ELCR_BASE, 0, &mut data[..2]);
        assert_eq!(&data[..2], &[0xf8, 0xde]);
        pic.read(&mut cx, 0x1234, u64::MAX, &mut data);
        pic.write(&mut cx, 0x1234, u64::MAX, &data);
        for value in 0..=255u8 {
            out(&mut pic, 0x20, value);
            out(&mut pic, 0x21, value);
            out(&mut pic, 0xa0, value);
            out(&mut pic, 0xa1, value.rotate_left(3));
            pic.apply(IrqChange::Pulse(irq(value & 15)));
            let _ = pic.acknowledge();
            let _ = inb(&mut pic, 0x20);
        }
    }
}
