//! Port 0x80, the POST-code port: a sink for the `outb` delays and POST codes kernels write.
//!
//! Without it every such write would go to the open-bus path and its log. Nothing is kept: the
//! value is not guest-visible anywhere else, and reads give the open-bus 0xff.

use crate::bus::{BusDevice, DeviceContext};

/// The POST-code port.
pub const DEBUG_PORT: u64 = 0x80;
/// It decodes one port.
pub const DEBUG_PORT_LEN: u64 = 1;

/// Swallows writes to port 0x80.
#[derive(Debug, Clone, Default)]
pub struct DebugPort;

impl DebugPort {
    pub fn new() -> Self {
        DebugPort
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualTime;
    use crate::irq::IrqLines;

    #[test]
    fn swallows_writes_and_reads_open_bus() {
        let mut port = DebugPort::new();
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        port.write(&mut cx, DEBUG_PORT, 0, &[0x42]);
        let mut data = [0u8; 2];
        port.read(&mut cx, DEBUG_PORT, 0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert!(irqs.is_empty());
    }
}
