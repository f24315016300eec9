//! A minimal i8042 keyboard controller with nothing attached.
//!
//! Enough for Linux's probe not to hang and for the reboot path: the status register, the
//! controller command byte, the self tests, and the reset pulse (command 0xfe, the way Linux's
//! `reboot=kbd` restarts a PC), which the run loop collects with
//! [`I8042::take_reset_request`].
//!
//! Simplified against a real controller:
//! - No keyboard or mouse: bytes written for the devices (data-port writes that are not a
//!   command's argument, and 0xd2-0xd4) are dropped, and the guest's device probes time out.
//! - Unknown controller commands are ignored; the AUX port reports a stuck clock line (0x01) to
//!   its interface test so Linux gives up on it.
//! - The output buffer holds one byte; IRQ1 follows it when the command byte enables it.

use crate::bus::{BusDevice, DeviceContext};
use crate::irq::{isa, IrqLines};

/// The data port.
pub const I8042_DATA: u64 = 0x60;
/// The status (read) and command (write) port.
pub const I8042_COMMAND: u64 = 0x64;
/// Each of the two ports is inserted on its own: one byte wide.
pub const I8042_PORT_LEN: u64 = 1;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
/// The last write went to the command port.
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited.
const STATUS_UNLOCKED: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
const INTERFACE_CLOCK_STUCK_LOW: u8 = 0x01;
/// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_RESET: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

/// What the next data-port write is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Pending {
    None,
    CommandByte,
    OutputPort,
}

/// The i8042 at ports 0x60 and 0x64.
/// Pure state: the controller is its own snapshot state (see [`crate::persist::Persist`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct I8042 {
    command_byte: u8,
    output: Option<u8>,
    pending: Pending,
    last_was_command: bool,
    reset_requested: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    pub fn new() -> Self {
        I8042 {
            // Keyboard interrupt on, POST passed, scancode translation: a typical BIOS's choice.
            command_byte: CTR_KBD_INT | CTR_SYS | CTR_TRANSLATE,
            output: None,
            pending: Pending::None,
            last_was_command: false,
            reset_requested: false,
        }
    }

    /// True once after the guest pulsed the CPU reset line.
    pub fn take_reset_request(&mut self) -> bool {
        std::mem::take(&mut self.reset_requested)
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if self.output.is_some() {
            status |= STATUS_OBF;
        }
        if self.command_byte & CTR_SYS != 0 {
            status |= STATUS_SYS;
        }
        if self.last_was_command {
            status |= STATUS_CMD;
        }
        status
    }

    fn request_reset(&mut self) {
        tracing::info!("guest pulsed the reset line through the i8042");
        self.reset_requested = true;
    }

    fn command(&mut self, command: u8) {
        self.pending = Pending::None;
        match command {
            CMD_READ_CTR => self.output = Some(self.command_byte),
            CMD_WRITE_CTR => self.pending = Pending::CommandByte,
            CMD_AUX_DISABLE => self.command_byte |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.command_byte &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.output = Some(INTERFACE_CLOCK_STUCK_LOW),
            CMD_SELF_TEST => {
                self.command_byte |= CTR_SYS;
                self.output = Some(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.output = Some(INTERFACE_OK),
            CMD_KBD_DISABLE => self.command_byte |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.command_byte &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.output = Some(OUTPUT_PORT_RESET | OUTPUT_PORT_A20),
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::OutputPort,
            // Pulse output lines: a low bit 0 pulses reset (0xfe is the usual one).
            0xf0..=0xff if command & 1 == 0 => self.request_reset(),
            _ => tracing::debug!(
                command = format_args!("{command:#04x}"),
                "i8042 command ignored"
            ),
        }
    }

    fn data(&mut self, value: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::CommandByte => self.command_byte = value,
            Pending::OutputPort if value & OUTPUT_PORT_RESET == 0 => self.request_reset(),
            Pending::OutputPort => {}
            // For the keyboard, which is not there.
            Pending::None => {}
        }
    }

    fn update_irq(&self, irqs: &mut IrqLines) {
        let raised = self.output.is_some() && self.command_byte & CTR_KBD_INT != 0;
        irqs.set_level(isa::KEYBOARD, raised);
    }

    fn read_byte(&mut self, port: u64) -> u8 {
        match port {
            I8042_COMMAND => self.status(),
            // Reading an empty buffer gives the last byte on hardware; 0 is as good.
            I8042_DATA => self.output.take().unwrap_or(0),
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, port: u64, value: u8) {
        self.last_was_command = port == I8042_COMMAND;
        match port {
            I8042_COMMAND => self.command(value),
            I8042_DATA => self.data(value),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &mut [u8]) {
        for byte in data.iter_mut() {
            *byte = self.read_byte(base.saturating_add(offset));
        }
        self.update_irq(cx.irqs);
    }

    fn write(&mut self, cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &[u8]) {
        for byte in data {
            self.write_byte(base.saturating_add(offset), *byte);
        }
        self.update_irq(cx.irqs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualTime;
    use crate::irq::IrqChange;

    fn out(kbd: &mut I8042, port: u64, value: u8) -> Vec<IrqChange> {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        kbd.write(&mut cx, port, 0, &[value]);
        irqs.drain()
    }

    fn inb(kbd: &mut I8042, port: u64) -> u8 {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut data = [0u8];
        kbd.read(&mut cx, port, 0, &mut data);
        data[0]
    }

    /// What Linux's `i8042_command` does: wait for an empty input buffer, write, read the
    /// reply if OBF comes up.
    fn command(kbd: &mut I8042, cmd: u8) -> Option<u8> {
        assert_eq!(inb(kbd, I8042_COMMAND) & 0x02, 0, "input buffer never full");
        out(kbd, I8042_COMMAND, cmd);
        (inb(kbd, I8042_COMMAND) & STATUS_OBF != 0).then(|| inb(kbd, I8042_DATA))
    }

    #[test]
    fn status_is_not_open_bus_and_buffer_starts_empty() {
        let mut kbd = I8042::new();
        let status = inb(&mut kbd, I8042_COMMAND);
        assert_ne!(status, 0xff);
        assert_eq!(status & STATUS_OBF, 0);
    }

    #[test]
    fn self_tests_answer() {
        let mut kbd = I8042::new();
        assert_eq!(command(&mut kbd, CMD_SELF_TEST), Some(0x55));
        assert_eq!(command(&mut kbd, CMD_KBD_TEST), Some(0x00));
        assert_eq!(command(&mut kbd, CMD_AUX_TEST), Some(0x01));
        assert_eq!(inb(&mut kbd, I8042_COMMAND) & STATUS_SYS, STATUS_SYS);
    }

    #[test]
    fn command_byte_round_trips() {
        let mut kbd = I8042::new();
        out(&mut kbd, I8042_COMMAND, CMD_WRITE_CTR);
        out(&mut kbd, I8042_DATA, 0x30);
        assert_eq!(command(&mut kbd, CMD_READ_CTR), Some(0x30));
        out(&mut kbd, I8042_COMMAND, CMD_KBD_ENABLE);
        assert_eq!(command(&mut kbd, CMD_READ_CTR), Some(0x20));
        // A data write with no command pending goes to the (absent) keyboard.
        out(&mut kbd, I8042_DATA, 0xf2);
        assert_eq!(command(&mut kbd, CMD_READ_CTR), Some(0x20));
    }

    #[test]
    fn irq1_follows_the_output_buffer_when_enabled() {
        let mut kbd = I8042::new();
        let changes = out(&mut kbd, I8042_COMMAND, CMD_SELF_TEST);
        assert_eq!(changes, vec![IrqChange::Level(isa::KEYBOARD, true)]);
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut data = [0u8];
        kbd.read(&mut cx, I8042_DATA, 0, &mut data);
        assert_eq!(irqs.drain(), vec![IrqChange::Level(isa::KEYBOARD, false)]);
        // With the interrupt disabled in the command byte, no IRQ.
        out(&mut kbd, I8042_COMMAND, CMD_WRITE_CTR);
        out(&mut kbd, I8042_DATA, 0x00);
        let changes = out(&mut kbd, I8042_COMMAND, CMD_READ_CTR);
        assert_eq!(changes, vec![IrqChange::Level(isa::KEYBOARD, false)]);
    }

    #[test]
    fn reset_pulse_is_reported_once() {
        let mut kbd = I8042::new();
        assert!(!kbd.take_reset_request());
        out(&mut kbd, I8042_COMMAND, 0xff);
        assert!(!kbd.take_reset_request(), "0xff pulses no line");
        out(&mut kbd, I8042_COMMAND, 0xfe);
        assert!(kbd.take_reset_request());
        assert!(!kbd.take_reset_request());
        // Through the output port too.
        out(&mut kbd, I8042_COMMAND, CMD_WRITE_OUTPUT_PORT);
        out(&mut kbd, I8042_DATA, 0x02);
        assert!(kbd.take_reset_request());
    }

    #[test]
    fn every_command_is_harmless() {
        let mut kbd = I8042::new();
        for value in 0..=255u8 {
            out(&mut kbd, I8042_COMMAND, value);
            out(&mut kbd, I8042_DATA, value);
            let _ = inb(&mut kbd, I8042_DATA);
            let _ = inb(&mut kbd, I8042_COMMAND);
        }
    }
}
