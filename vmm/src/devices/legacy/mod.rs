//! The PC platform devices: pure, deterministic state machines.
//!
//! Every device here implements [`crate::bus::BusDevice`], reads time only from the
//! [`crate::bus::DeviceContext`] (or an argument), and raises interrupts only through
//! [`crate::irq::IrqLines`]. None touches KVM, threads or the host clock.

pub mod cmos;
pub mod debug_port;
pub mod i8042;
pub mod pic;
pub mod pit;
pub mod serial;

pub use cmos::Cmos;
pub use debug_port::DebugPort;
pub use i8042::I8042;
pub use pic::PicPair;
pub use pit::Pit;
pub use serial::Serial;

use rrr_guest::protocol::{
    CONTROL_PORT, CONTROL_PORT_LEN, PROGRESS_PORT, PROGRESS_PORT_LEN, RANDOM_PORT, RANDOM_PORT_LEN,
    TSC_PORT, TSC_PORT_LEN,
};

/// Which of the board's devices decodes a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoardDevice {
    Pic,
    Pit,
    I8042,
    Cmos,
    DebugPort,
    Serial,
    Control,
    Progress,
    Tsc,
    Random,
}

/// One port range the board decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub base: u64,
    pub len: u64,
    pub owner: BoardDevice,
    pub name: &'static str,
}

const fn range(base: u64, len: u64, owner: BoardDevice, name: &'static str) -> PortRange {
    PortRange {
        base,
        len,
        owner,
        name,
    }
}

/// Every port-I/O range of our board, in address order: the one list the builder places
/// devices from. Anything else is open bus.
pub const BOARD_PORTS: &[PortRange] = &[
    range(
        pic::PIC_MASTER_BASE,
        pic::PIC_PORT_LEN,
        BoardDevice::Pic,
        "8259 master",
    ),
    range(
        pit::PIT_BASE,
        pit::PIT_PORT_LEN,
        BoardDevice::Pit,
        "8254 PIT",
    ),
    range(
        i8042::I8042_DATA,
        i8042::I8042_PORT_LEN,
        BoardDevice::I8042,
        "i8042 data",
    ),
    range(
        pit::PORT_B,
        pit::PORT_B_LEN,
        BoardDevice::Pit,
        "port B (PIT gate 2, speaker)",
    ),
    range(
        i8042::I8042_COMMAND,
        i8042::I8042_PORT_LEN,
        BoardDevice::I8042,
        "i8042 status/command",
    ),
    range(
        cmos::CMOS_BASE,
        cmos::CMOS_PORT_LEN,
        BoardDevice::Cmos,
        "MC146818 RTC/CMOS",
    ),
    range(
        debug_port::DEBUG_PORT,
        debug_port::DEBUG_PORT_LEN,
        BoardDevice::DebugPort,
        "POST code sink",
    ),
    range(
        pic::PIC_SLAVE_BASE,
        pic::PIC_PORT_LEN,
        BoardDevice::Pic,
        "8259 slave",
    ),
    range(
        serial::COM1_BASE,
        serial::SERIAL_PORT_LEN,
        BoardDevice::Serial,
        "16550A COM1",
    ),
    range(pic::ELCR_BASE, pic::ELCR_PORT_LEN, BoardDevice::Pic, "ELCR"),
    range(
        CONTROL_PORT as u64,
        CONTROL_PORT_LEN as u64,
        BoardDevice::Control,
        "rrr control port",
    ),
    range(
        PROGRESS_PORT as u64,
        PROGRESS_PORT_LEN as u64,
        BoardDevice::Progress,
        "rrr progress port",
    ),
    range(
        TSC_PORT as u64,
        TSC_PORT_LEN as u64,
        BoardDevice::Tsc,
        "rrr virtual TSC port",
    ),
    range(
        RANDOM_PORT as u64,
        RANDOM_PORT_LEN as u64,
        BoardDevice::Random,
        "rrr random port",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_ports_are_sorted_and_disjoint() {
        for pair in BOARD_PORTS.windows(2) {
            assert!(
                pair[0].base + pair[0].len <= pair[1].base,
                "{:?} overlaps or precedes {:?}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn every_range_fits_a_bus() {
        let mut bus = crate::bus::Bus::new(crate::bus::BusKind::Pio);
        for port in BOARD_PORTS {
            let device = std::sync::Arc::new(std::sync::Mutex::new(DebugPort::new()));
            bus.insert(port.base, port.len, device).unwrap();
        }
    }
}
