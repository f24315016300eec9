//! The virtual TSC port: what the stimulus's `rdtsc`/`rdtscp` read instead of the host's TSC.
//!
//! A KVM VMM cannot trap `rdtsc`, and the hardware TSC runs in host time. So the stimulus
//! runtime (`guest/agent/traps.c`) makes the instruction fault (`PR_SET_TSC`) and reads this port
//! instead: a synchronous exit at a point that replays itself, answered from virtual time, so the
//! value repeats on every run and never goes backwards.
//!
//! The 64-bit value is little endian across the port's 8 bytes; every access reads the TSC of
//! its own exit, so the runtime reads high, low, high and retries if the high half moved.

use rrr_guest::protocol::TSC_KHZ;

use crate::bus::{BusDevice, DeviceContext};
use crate::clock::VirtualTime;

/// The device at [`rrr_guest::protocol::TSC_PORT`]. It holds no state: the TSC is a function of
/// virtual time, which snapshots already carry.
#[derive(Debug, Clone, Default)]
pub struct TscPort;

/// The TSC at `now`: [`TSC_KHZ`] ticks per virtual millisecond, from 0 when the VM was created
/// (as a TSC starts at reset).
pub fn tsc_at(now: VirtualTime) -> u64 {
    let ticks = u128::from(now.as_nanos()) * u128::from(TSC_KHZ) / 1_000_000;
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

impl BusDevice for TscPort {
    fn read(&mut self, cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &mut [u8]) {
        let bytes = tsc_at(cx.now).to_le_bytes();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(data.len()).min(bytes.len());
        data.fill(0);
        data[..end - start].copy_from_slice(&bytes[start..end]);
    }

    fn write(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, _data: &[u8]) {
        // Read-only: the guest cannot set the virtual TSC.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;

    fn read(now_ns: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::from_nanos(now_ns),
            irqs: &mut irqs,
        };
        let mut data = vec![0xaa; len];
        TscPort.read(&mut cx, 0, offset, &mut data);
        data
    }

    #[test]
    fn the_tsc_counts_500_mhz_of_virtual_time() {
        assert_eq!(TSC_KHZ, 500_000);
        assert_eq!(tsc_at(VirtualTime::ZERO), 0);
        assert_eq!(tsc_at(VirtualTime::from_nanos(2_000)), 1_000);
        assert_eq!(tsc_at(VirtualTime::from_nanos(1_000_000_000)), 500_000_000);
        assert_eq!(tsc_at(VirtualTime::from_nanos(u64::MAX)), u64::MAX / 2);
    }

    #[test]
    fn halves_are_read_at_offsets_0_and_4() {
        let now = 40_000_000_000_000; // 2 * 10^13 ticks: above 2^32
        let tsc = tsc_at(VirtualTime::from_nanos(now));
        let low = u32::from_le_bytes(read(now, 0, 4).try_into().unwrap());
        let high = u32::from_le_bytes(read(now, 4, 4).try_into().unwrap());
        assert_eq!((u64::from(high) << 32) | u64::from(low), tsc);
        assert_ne!(high, 0);
        // Narrower and stray accesses read their bytes, or zeros past the end; never a panic.
        assert_eq!(read(now, 1, 1), [tsc.to_le_bytes()[1]]);
        assert_eq!(read(now, 6, 4)[2..], [0, 0]);
    }
}
