//! A 16550A UART (COM1), the guest console.
//!
//! Output is immediate: a byte written to THR goes straight to the host writer, so the
//! transmitter is always empty (LSR THRE and TEMT set) and a THR write re-arms the THRE
//! interrupt at once. Input comes from [`Serial::queue_input`] into a bounded queue that plays
//! the part of the receive FIFO; the run loop sends only what [`Serial::receive_room`] allows
//! (RTS/CTS flow control), so typed-ahead input waits for the guest instead of being lost. The IRQ4 line is a level recomputed
//! after every access, gated by MCR OUT2 as on a PC.
//!
//! Simplified against the datasheet:
//! - Baud rate, word length, parity and break (LCR, divisor latch) are stored and read back but
//!   do not affect timing: nothing is serialized, so there are no framing or parity errors.
//! - The receive FIFO's trigger level and the character timeout are not modelled: any queued
//!   input raises "received data available" (IIR 0x04). Clearing the receive FIFO drops at most
//!   16 bytes (the FIFO's depth); the rest of the queue is still "on the wire".
//! - Overrun (LSR OE) is reported only when [`Serial::queue_input`] has to drop bytes because
//!   the queue is full.
//! - Outside loopback the modem inputs read as connected (DCD, DSR, CTS) and never change.
//! - In loopback mode the IRQ output is off (the OUT2 pin is forced inactive); looped-back
//!   bytes go to the receive queue.

use std::collections::VecDeque;
use std::io::Write;

use crate::bus::{BusDevice, DeviceContext};
use crate::irq::{isa, IrqLines};

/// I/O base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// A UART decodes eight ports.
pub const SERIAL_PORT_LEN: u64 = 8;
/// Most guest-bound bytes kept waiting; more are dropped.
pub const INPUT_QUEUE_LIMIT: usize = 64 * 1024;
/// Depth of the 16550A receive FIFO.
const FIFO_DEPTH: usize = 16;

// Register offsets.
const DATA: u64 = 0;
const IER: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDI: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IER_RLSI: u8 = 0x04;
const IER_MSI: u8 = 0x08;
const IER_MASK: u8 = 0x0f;

const IIR_NO_INT: u8 = 0x01;
const IIR_MSI: u8 = 0x00;
const IIR_THRI: u8 = 0x02;
const IIR_RDI: u8 = 0x04;
const IIR_RLSI: u8 = 0x06;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_DELTAS: u8 = 0x0f;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;
/// A host terminal is always "connected".
const MSR_CONNECTED: u8 = MSR_DCD | MSR_DSR | MSR_CTS;

/// The UART's registers and receive FIFO: everything but the host writer its output goes to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    input: Vec<u8>,
    ier: u8,
    lcr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    divisor_low: u8,
    divisor_high: u8,
    fifo_enabled: bool,
    line_errors: u8,
    thr_empty_interrupt: bool,
}

/// The 16550A behind COM1.
pub struct Serial {
    output: Box<dyn Write + Send>,
    input: VecDeque<u8>,
    ier: u8,
    lcr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    divisor_low: u8,
    divisor_high: u8,
    fifo_enabled: bool,
    /// Error bits of LSR (only OE here), cleared by reading LSR.
    line_errors: u8,
    /// The "THR empty" interrupt is latched: set when THR empties or THRI is enabled, cleared
    /// by an IIR read that reports it or by a THR write.
    thr_empty_interrupt: bool,
    output_failed: bool,
    /// Bytes the guest has transmitted (host-side, not part of the snapshot state): a replay
    /// that goes back in time (`rrr replay --gdb`'s reverse execution) sets it back and the
    /// bytes below `silent_until` are not written again, since the output already holds them.
    transmitted: u64,
    silent_until: u64,
}

impl Serial {
    pub fn new(output: Box<dyn Write + Send>) -> Self {
        Serial {
            output,
            input: VecDeque::new(),
            ier: 0,
            lcr: 0,
            mcr: 0,
            msr: MSR_CONNECTED,
            scr: 0,
            // 115200 baud, what firmware usually leaves behind.
            divisor_low: 1,
            divisor_high: 0,
            fifo_enabled: false,
            line_errors: 0,
            thr_empty_interrupt: false,
            output_failed: false,
            transmitted: 0,
            silent_until: 0,
        }
    }

    /// How many bytes the guest has transmitted.
    pub fn transmitted(&self) -> u64 {
        self.transmitted
    }

    /// Goes back to when `count` bytes had been transmitted: the guest transmits the same bytes
    /// again as its replay goes forward (it is deterministic), and those already written out
    /// are not written twice.
    pub fn rewind_output(&mut self, count: u64) {
        self.silent_until = self.silent_until.max(self.transmitted);
        self.transmitted = count;
    }

    pub fn save(&self) -> SerialState {
        SerialState {
            input: self.input.iter().copied().collect(),
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            msr: self.msr,
            scr: self.scr,
            divisor_low: self.divisor_low,
            divisor_high: self.divisor_high,
            fifo_enabled: self.fifo_enabled,
            line_errors: self.line_errors,
            thr_empty_interrupt: self.thr_empty_interrupt,
        }
    }

    /// Puts the saved registers and FIFO back; the output keeps going to this UART's writer.
    pub fn restore_state(&mut self, state: &SerialState) {
        self.input = state.input.iter().copied().collect();
        self.ier = state.ier;
        self.lcr = state.lcr;
        self.mcr = state.mcr;
        self.msr = state.msr;
        self.scr = state.scr;
        self.divisor_low = state.divisor_low;
        self.divisor_high = state.divisor_high;
        self.fifo_enabled = state.fifo_enabled;
        self.line_errors = state.line_errors;
        self.thr_empty_interrupt = state.thr_empty_interrupt;
    }

    /// Queues bytes for the guest to read. Past [`INPUT_QUEUE_LIMIT`] bytes are dropped (and
    /// reported to the guest as an overrun).
    pub fn queue_input(&mut self, bytes: &[u8], irqs: &mut IrqLines) {
        let taken = bytes.len().min(self.input_space());
        self.input.extend(&bytes[..taken]);
        if taken < bytes.len() {
            tracing::warn!(
                dropped = bytes.len() - taken,
                "serial input queue full: dropping guest-bound bytes"
            );
            self.line_errors |= LSR_OE;
        }
        self.update_irq(irqs);
    }

    /// How many bytes the host should send now, playing RTS/CTS flow control: none until the
    /// guest raises RTS ("ready to receive") with the UART's interrupt routed to the PIC (OUT2)
    /// and the receive interrupt enabled, then as many as the FIFO has room for. The rest waits
    /// "on the wire" with the host. Linux raises RTS last when it opens the tty; before that its
    /// probe and start-up clear the FIFO several times (and toggling FIFO mode clears it too),
    /// so input sent earlier would be lost.
    pub fn receive_room(&self) -> usize {
        let ready = MCR_OUT2 | MCR_RTS;
        if self.ier & IER_RDI == 0 || self.mcr & ready != ready || self.looping() {
            return 0;
        }
        FIFO_DEPTH.saturating_sub(self.input.len())
    }

    /// How many more bytes [`Serial::queue_input`] accepts.
    pub fn input_space(&self) -> usize {
        INPUT_QUEUE_LIMIT.saturating_sub(self.input.len())
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    fn looping(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// The highest-priority pending interrupt's IIR identification, if any.
    fn interrupt_id(&self) -> Option<u8> {
        if self.ier & IER_RLSI != 0 && self.line_errors != 0 {
            Some(IIR_RLSI)
        } else if self.ier & IER_RDI != 0 && !self.input.is_empty() {
            Some(IIR_RDI)
        } else if self.ier & IER_THRI != 0 && self.thr_empty_interrupt {
            Some(IIR_THRI)
        } else if self.ier & IER_MSI != 0 && self.msr & MSR_DELTAS != 0 {
            Some(IIR_MSI)
        } else {
            None
        }
    }

    fn update_irq(&self, irqs: &mut IrqLines) {
        let enabled = self.mcr & MCR_OUT2 != 0 && !self.looping();
        irqs.set_level(isa::COM1, enabled && self.interrupt_id().is_some());
    }

    fn transmit(&mut self, byte: u8) {
        let looping = self.looping();
        if !looping {
            self.transmitted += 1;
        }
        if looping {
            if self.input.len() < INPUT_QUEUE_LIMIT {
                self.input.push_back(byte);
            } else {
                self.line_errors |= LSR_OE;
            }
        } else if self.transmitted <= self.silent_until {
            // Written out before a rewind.
        } else if let Err(error) = self
            .output
            .write_all(&[byte])
            .and_then(|()| self.output.flush())
        {
            if !self.output_failed {
                self.output_failed = true;
                tracing::warn!(%error, "serial output failed; further guest output may be lost");
            }
        }
        // The byte left at once: THR is empty again.
        self.thr_empty_interrupt = true;
    }

    fn set_ier(&mut self, value: u8) {
        let value = value & IER_MASK;
        let changed = self.ier ^ value;
        self.ier = value;
        // Enabling THRI while THR is empty raises the interrupt (Linux's startup test relies
        // on it); disabling it forgets a pending one.
        if changed & IER_THRI != 0 {
            self.thr_empty_interrupt = value & IER_THRI != 0;
        }
    }

    fn set_fcr(&mut self, value: u8) {
        let enable = value & FCR_ENABLE != 0;
        if enable != self.fifo_enabled || (enable && value & FCR_CLEAR_RX != 0) {
            let fifo_bytes = self.input.len().min(FIFO_DEPTH);
            self.input.drain(..fifo_bytes);
        }
        self.fifo_enabled = enable;
    }

    fn set_mcr(&mut self, value: u8) {
        self.mcr = value & MCR_MASK;
        let status = if self.looping() {
            // Loopback wires the outputs back to the inputs.
            let bit = |mask: u8, to: u8| if self.mcr & mask != 0 { to } else { 0 };
            bit(MCR_RTS, MSR_CTS)
                | bit(MCR_DTR, MSR_DSR)
                | bit(MCR_OUT1, MSR_RI)
                | bit(MCR_OUT2, MSR_DCD)
        } else {
            MSR_CONNECTED
        };
        let old = self.msr;
        let changed = old ^ status;
        let mut deltas = old & MSR_DELTAS;
        if changed & MSR_CTS != 0 {
            deltas |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            deltas |= MSR_DDSR;
        }
        if old & MSR_RI != 0 && status & MSR_RI == 0 {
            deltas |= MSR_TERI;
        }
        if changed & MSR_DCD != 0 {
            deltas |= MSR_DDCD;
        }
        self.msr = status | deltas;
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        match offset {
            DATA if self.dlab() => self.divisor_low,
            DATA => self.input.pop_front().unwrap_or(0),
            IER if self.dlab() => self.divisor_high,
            IER => self.ier,
            IIR_FCR => {
                let id = self.interrupt_id();
                if id == Some(IIR_THRI) {
                    self.thr_empty_interrupt = false;
                }
                let fifo = if self.fifo_enabled {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                id.unwrap_or(IIR_NO_INT) | fifo
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let ready = if self.input.is_empty() { 0 } else { LSR_DR };
                let value = LSR_THRE | LSR_TEMT | ready | self.line_errors;
                self.line_errors = 0;
                value
            }
            MSR => {
                let value = self.msr;
                self.msr &= !MSR_DELTAS;
                value
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            DATA if self.dlab() => self.divisor_low = value,
            DATA => self.transmit(value),
            IER if self.dlab() => self.divisor_high = value,
            IER => self.set_ier(value),
            IIR_FCR => self.set_fcr(value),
            LCR => self.lcr = value,
            MCR => self.set_mcr(value),
            SCR => self.scr = value,
            // LSR and MSR writes are factory-test features; ignored.
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_register(offset.saturating_add(i as u64));
        }
        self.update_irq(cx.irqs);
    }

    fn write(&mut self, cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.write_register(offset.saturating_add(i as u64), *byte);
        }
        self.update_irq(cx.irqs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualTime;
    use crate::irq::IrqChange;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        serial: Serial,
        sink: Sink,
        irqs: IrqLines,
        /// The IRQ4 level as last driven.
        line: bool,
    }

    impl Rig {
        fn new() -> Self {
            let sink = Sink::default();
            Rig {
                serial: Serial::new(Box::new(sink.clone())),
                sink,
                irqs: IrqLines::new(),
                line: false,
            }
        }

        fn track(&mut self) {
            for change in self.irqs.drain() {
                match change {
                    IrqChange::Level(irq, level) if irq == isa::COM1 => self.line = level,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }

        fn out(&mut self, offset: u64, value: u8) {
            let mut cx = DeviceContext {
                now: VirtualTime::ZERO,
                irqs: &mut self.irqs,
            };
            self.serial.write(&mut cx, COM1_BASE, offset, &[value]);
            self.track();
        }

        fn inb(&mut self, offset: u64) -> u8 {
            let mut cx = DeviceContext {
                now: VirtualTime::ZERO,
                irqs: &mut self.irqs,
            };
            let mut data = [0u8];
            self.serial.read(&mut cx, COM1_BASE, offset, &mut data);
            self.track();
            data[0]
        }

        fn input(&mut self, bytes: &[u8]) {
            self.serial.queue_input(bytes, &mut self.irqs);
            self.track();
        }
    }

    #[test]
    fn linux_autoconfig_finds_a_16550a() {
        let mut rig = Rig::new();
        // IER existence test.
        let saved = rig.inb(IER);
        rig.out(IER, 0);
        assert_eq!(rig.inb(IER) & 0x0f, 0);
        rig.out(IER, 0x0f);
        assert_eq!(rig.inb(IER) & 0x0f, 0x0f);
        rig.out(IER, saved);
        // Loopback test: LOOP | OUT2 | RTS reads back DCD | CTS.
        let save_mcr = rig.inb(MCR);
        rig.out(MCR, 0x1a);
        assert_eq!(rig.inb(MSR) & 0xf0, 0x90);
        rig.out(MCR, save_mcr);
        // FIFO type.
        rig.out(LCR, 0xbf);
        rig.out(IIR_FCR, 0);
        rig.out(LCR, 0);
        rig.out(IIR_FCR, 0x01);
        assert_eq!(rig.inb(IIR_FCR) & 0xc0, 0xc0);
        // Scratch register.
        rig.out(SCR, 0xa5);
        assert_eq!(rig.inb(SCR), 0xa5);
        // Only the low IER bits exist.
        rig.out(IER, 0xff);
        assert_eq!(rig.inb(IER), 0x0f);
    }

    #[test]
    fn divisor_latch_is_behind_dlab() {
        let mut rig = Rig::new();
        rig.out(LCR, 0x83);
        rig.out(DATA, 0x0c);
        rig.out(IER, 0x00);
        rig.out(LCR, 0x03);
        assert!(rig.sink.0.lock().unwrap().is_empty(), "DLL is not THR");
        assert_eq!(rig.inb(IER), 0);
        rig.out(LCR, 0x83);
        assert_eq!(rig.inb(DATA), 0x0c);
        assert_eq!(rig.inb(LCR), 0x83);
    }

    #[test]
    fn output_goes_to_the_writer_and_lsr_stays_empty() {
        let mut rig = Rig::new();
        for byte in b"hi\n" {
            rig.out(DATA, *byte);
            assert_eq!(rig.inb(LSR) & 0x60, 0x60);
        }
        assert_eq!(rig.sink.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn thre_interrupt_follows_the_16550_rules() {
        let mut rig = Rig::new();
        rig.out(MCR, MCR_OUT2 | MCR_RTS | MCR_DTR);
        assert!(!rig.line);
        // Enabling THRI with THR empty raises it.
        rig.out(IER, IER_THRI);
        assert!(rig.line);
        // Reading IIR that reports THRE clears it.
        assert_eq!(rig.inb(IIR_FCR), IIR_THRI);
        assert!(!rig.line);
        assert_eq!(rig.inb(IIR_FCR), IIR_NO_INT);
        // Toggling IER re-raises it (Linux's UART_BUG_THRE test expects this).
        rig.out(IER, 0);
        rig.out(IER, IER_THRI);
        assert!(rig.line);
        // A THR write re-arms it once the byte has gone.
        assert_eq!(rig.inb(IIR_FCR), IIR_THRI);
        rig.out(DATA, b'x');
        assert!(rig.line);
        // Disabling THRI drops the line.
        rig.out(IER, 0);
        assert!(!rig.line);
    }

    #[test]
    fn out2_gates_the_line() {
        let mut rig = Rig::new();
        rig.out(IER, IER_THRI);
        assert!(!rig.line, "OUT2 low: no IRQ on a PC");
        rig.out(MCR, MCR_OUT2);
        assert!(rig.line);
        rig.out(MCR, MCR_OUT2 | MCR_LOOP);
        assert!(!rig.line, "loopback disconnects the IRQ");
    }

    #[test]
    fn received_data_interrupt_and_reads() {
        let mut rig = Rig::new();
        rig.out(MCR, MCR_OUT2);
        rig.out(IIR_FCR, 0x01);
        rig.out(IER, IER_RDI);
        assert!(!rig.line);
        assert_eq!(rig.inb(LSR) & LSR_DR, 0);
        rig.input(b"ab");
        assert!(rig.line);
        assert_eq!(rig.inb(IIR_FCR), 0xc0 | IIR_RDI);
        assert_eq!(rig.inb(LSR) & LSR_DR, LSR_DR);
        assert_eq!(rig.inb(DATA), b'a');
        assert!(rig.line);
        assert_eq!(rig.inb(DATA), b'b');
        assert!(!rig.line);
        assert_eq!(rig.inb(LSR) & LSR_DR, 0);
        assert_eq!(rig.inb(IIR_FCR), 0xc0 | IIR_NO_INT);
    }

    #[test]
    fn received_data_outranks_thre() {
        let mut rig = Rig::new();
        rig.out(MCR, MCR_OUT2);
        rig.out(IER, IER_RDI | IER_THRI);
        rig.input(b"z");
        assert_eq!(rig.inb(IIR_FCR), IIR_RDI);
        assert_eq!(rig.inb(DATA), b'z');
        // THRE is still latched: reading IIR now reports and clears it.
        assert_eq!(rig.inb(IIR_FCR), IIR_THRI);
        assert_eq!(rig.inb(IIR_FCR), IIR_NO_INT);
    }

    #[test]
    fn loopback_echoes_data_and_modem_lines() {
        let mut rig = Rig::new();
        rig.out(MCR, MCR_LOOP);
        // Entering loopback dropped DCD, DSR and CTS: deltas reported once.
        assert_eq!(rig.inb(MSR), MSR_DDCD | MSR_DDSR | MSR_DCTS);
        assert_eq!(rig.inb(MSR), 0);
        rig.out(DATA, 0x55);
        assert!(rig.sink.0.lock().unwrap().is_empty());
        assert_eq!(rig.inb(LSR) & LSR_DR, LSR_DR);
        assert_eq!(rig.inb(DATA), 0x55);
        rig.out(MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(rig.inb(MSR), MSR_RI);
        rig.out(MCR, MCR_LOOP);
        assert_eq!(rig.inb(MSR), MSR_TERI);
    }

    #[test]
    fn modem_status_interrupt() {
        let mut rig = Rig::new();
        rig.out(IER, IER_MSI);
        rig.out(MCR, MCR_LOOP | MCR_DTR);
        rig.out(MCR, MCR_OUT2);
        // Back out of loopback: the lines changed again, and OUT2 now lets the IRQ through.
        assert!(rig.line);
        assert_eq!(rig.inb(IIR_FCR), IIR_MSI);
        let _ = rig.inb(MSR);
        assert!(!rig.line);
    }

    #[test]
    fn fifo_clear_drops_at_most_the_fifo() {
        let mut rig = Rig::new();
        rig.out(IIR_FCR, 0x01);
        rig.input(&[7u8; 20]);
        rig.out(IIR_FCR, 0x03);
        let mut left = 0;
        while rig.inb(LSR) & LSR_DR != 0 {
            rig.inb(DATA);
            left += 1;
        }
        assert_eq!(left, 4);
    }

    #[test]
    fn input_waits_until_the_guest_is_ready_to_receive() {
        let mut rig = Rig::new();
        assert_eq!(rig.serial.receive_room(), 0);
        // The probe's IER test, before the port is started.
        rig.out(IER, 0x0f);
        assert_eq!(rig.serial.receive_room(), 0);
        rig.out(IER, 0);
        rig.out(IIR_FCR, 0x07);
        rig.out(MCR, MCR_OUT2 | MCR_DTR);
        rig.out(IER, IER_RLSI | IER_RDI);
        assert_eq!(rig.serial.receive_room(), 0, "RTS not raised yet");
        rig.out(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        assert_eq!(rig.serial.receive_room(), FIFO_DEPTH);
        rig.input(b"abc");
        assert_eq!(rig.serial.receive_room(), FIFO_DEPTH - 3);
        // A console write masks the interrupts for a moment: the line holds.
        rig.out(IER, 0);
        assert_eq!(rig.serial.receive_room(), 0);
        rig.out(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS);
        rig.out(IER, IER_RDI);
        assert_eq!(rig.serial.receive_room(), 0, "no host input in loopback");
    }

    #[test]
    fn full_queue_drops_and_reports_overrun() {
        let mut rig = Rig::new();
        rig.out(MCR, MCR_OUT2);
        rig.out(IER, IER_RLSI);
        rig.input(&vec![1u8; INPUT_QUEUE_LIMIT - 1]);
        assert_eq!(rig.serial.input_space(), 1);
        assert!(!rig.line);
        rig.input(b"xyz");
        assert_eq!(rig.serial.input_space(), 0);
        assert!(rig.line);
        assert_eq!(rig.inb(IIR_FCR), IIR_RLSI);
        assert_eq!(rig.inb(LSR) & LSR_OE, LSR_OE);
        assert_eq!(rig.inb(LSR) & LSR_OE, 0);
        assert!(!rig.line);
    }

    #[test]
    fn failing_writer_does_not_stop_the_uart() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("gone"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut serial = Serial::new(Box::new(Broken));
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        serial.write(&mut cx, COM1_BASE, DATA, b"abcd");
        let mut lsr = [0u8];
        serial.read(&mut cx, COM1_BASE, LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
        // Out-of-range offsets (a wide access at the end) read as 0xff.
        let mut wide = [0u8; 2];
        serial.read(&mut cx, COM1_BASE, 7, &mut wide);
        assert_eq!(wide[1], 0xff);
        serial.write(&mut cx, COM1_BASE, u64::MAX, &[1, 2]);
    }
}
