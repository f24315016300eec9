//! The progress port: where instrumented guest code reports that it ran
//! [`PROGRESS_INTERVAL`](rrr_guest::protocol::PROGRESS_INTERVAL) more basic blocks (DESIGN.md, "A software progress counter").
//!
//! The kernel's KCOV hook and the stimulus's trace-pc runtime each write one byte here every
//! [`PROGRESS_INTERVAL`](rrr_guest::protocol::PROGRESS_INTERVAL) blocks. The write is a synchronous exit at a point that replays itself;
//! the run loop then advances virtual time by what that much code costs
//! ([`ProgressPort::take_elapsed`]) instead of the plain per-exit quantum, so virtual time follows
//! executed code, like QEMU's icount, and timer interrupts reach code that makes no other exit.
//!
//! The guest is not trusted: the byte only sorts the count (kernel, user, other) for the run
//! summary; every write of any width costs the same, bounded, time.

use serde::{Deserialize, Serialize};

use rrr_guest::protocol::{PROGRESS_FROM_KERNEL, PROGRESS_FROM_USER};

use crate::bus::{BusDevice, DeviceContext};

/// Progress writes seen, by who said it wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressCounts {
    /// From the kernel's KCOV hook.
    pub kernel: u64,
    /// From the stimulus's trace-pc runtime.
    pub user: u64,
    /// Any other byte (nothing rrr builds writes one).
    pub other: u64,
}

impl ProgressCounts {
    pub fn total(&self) -> u64 {
        self.kernel + self.user + self.other
    }
}

/// The device at [`rrr_guest::protocol::PROGRESS_PORT`].
#[derive(Debug, Clone)]
pub struct ProgressPort {
    /// Virtual nanoseconds one write stands for: the interval times the cost of one block.
    write_ns: u64,
    /// Time owed for writes since the last [`ProgressPort::take_elapsed`].
    pending_ns: Option<u64>,
    counts: ProgressCounts,
}

impl ProgressPort {
    /// `interval`: basic blocks per write (the guest's [`PROGRESS_INTERVAL`](rrr_guest::protocol::PROGRESS_INTERVAL)); `block_ns`:
    /// virtual nanoseconds per block.
    pub fn new(interval: u64, block_ns: u64) -> Self {
        ProgressPort {
            write_ns: block_ns.saturating_mul(interval),
            pending_ns: None,
            counts: ProgressCounts::default(),
        }
    }

    /// The virtual time the progress writes of the current exit stand for, if it made any. A
    /// string `outsb` of several bytes is several writes, one exit.
    pub fn take_elapsed(&mut self) -> Option<u64> {
        self.pending_ns.take()
    }

    pub fn counts(&self) -> ProgressCounts {
        self.counts
    }

    /// The counts saved in a snapshot (nothing is pending between exits, when snapshots are
    /// taken).
    pub fn restore_counts(&mut self, counts: ProgressCounts) {
        self.counts = counts;
    }
}

impl BusDevice for ProgressPort {
    fn read(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, data: &mut [u8]) {
        // Nothing to read: open bus, and no progress.
        data.fill(0xff);
    }

    fn write(&mut self, _cx: &mut DeviceContext<'_>, _base: u64, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(&PROGRESS_FROM_KERNEL) => self.counts.kernel += 1,
            Some(&PROGRESS_FROM_USER) => self.counts.user += 1,
            _ => self.counts.other += 1,
        }
        self.pending_ns = Some(self.pending_ns.unwrap_or(0).saturating_add(self.write_ns));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualTime;
    use crate::irq::IrqLines;
    use rrr_guest::protocol::PROGRESS_INTERVAL;

    fn out(port: &mut ProgressPort, data: &[u8]) {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        port.write(&mut cx, 0, 0, data);
        assert!(irqs.is_empty());
    }

    #[test]
    fn a_write_stands_for_an_interval_of_blocks_once() {
        let mut port = ProgressPort::new(PROGRESS_INTERVAL, 3);
        assert_eq!(port.take_elapsed(), None);
        out(&mut port, &[PROGRESS_FROM_KERNEL]);
        assert_eq!(port.take_elapsed(), Some(3 * PROGRESS_INTERVAL));
        assert_eq!(port.take_elapsed(), None, "time is owed once per write");
        // Two writes in one exit (a string outsb) owe twice.
        out(&mut port, &[PROGRESS_FROM_USER]);
        out(&mut port, &[PROGRESS_FROM_USER]);
        assert_eq!(port.take_elapsed(), Some(6 * PROGRESS_INTERVAL));
    }

    #[test]
    fn counts_are_sorted_by_the_guests_word_but_cost_the_same() {
        let mut port = ProgressPort::new(PROGRESS_INTERVAL, 1);
        out(&mut port, &[PROGRESS_FROM_KERNEL]);
        out(&mut port, &[PROGRESS_FROM_USER]);
        out(&mut port, &[0x99, 0x99, 0x99, 0x99]);
        assert_eq!(
            port.counts(),
            ProgressCounts {
                kernel: 1,
                user: 1,
                other: 1
            }
        );
        assert_eq!(port.counts().total(), 3);
        assert_eq!(port.take_elapsed(), Some(3 * PROGRESS_INTERVAL));
    }

    #[test]
    fn reads_are_open_bus_and_a_huge_cost_saturates() {
        let mut port = ProgressPort::new(PROGRESS_INTERVAL, u64::MAX);
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::ZERO,
            irqs: &mut irqs,
        };
        let mut data = [0u8; 2];
        port.read(&mut cx, 0, 0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        out(&mut port, &[PROGRESS_FROM_KERNEL]);
        out(&mut port, &[PROGRESS_FROM_KERNEL]);
        assert_eq!(port.take_elapsed(), Some(u64::MAX));
    }
}
