//! The 8254 programmable interval timer and port 0x61 ("system control port B").
//!
//! Counters are a function of virtual time: a channel remembers when it started counting and
//! derives its count and output from `cx.now`, so reading it twice at the same virtual time gives
//! the same answer and nothing depends on how often the guest polls. Channel 0 drives IRQ0; the
//! run loop asks [`Pit::next_deadline`] when to wake a halted guest and calls [`Pit::advance`].
//! Channel 2's gate and output are wired to port 0x61 bits 0 and 5, which Linux's PIT
//! calibration loops poll.
//!
//! Simplified against the datasheet:
//! - BCD counting (control word bit 0) is stored and reported in the status byte, but the
//!   counter counts in binary.
//! - A new count written to a running mode 2/3 channel takes effect at once instead of at the
//!   end of the current period, and the one-clock delay between writing a count and the
//!   counter loading it is not modelled.
//! - Mode 3 with an odd count uses the even-count waveform (QEMU does the same).
//! - At reset no channel counts (no BIOS has programmed them); the guest programs channel 0.
//! - Bit 4 of port 0x61 (the DRAM refresh toggle) flips on every read rather than every 15 µs,
//!   so loops waiting for it always progress.
//! - IRQ0 is delivered as a pulse at each rising edge of channel 0's output; when several edges
//!   were missed (the guest ran long without exits) only one pulse is given.

use crate::bus::{BusDevice, DeviceContext};
use crate::clock::VirtualTime;
use crate::irq::{isa, IrqLines};

/// I/O base of the 8254: counters 0-2 at +0..+2, the control word at +3.
pub const PIT_BASE: u64 = 0x40;
/// The 8254 decodes four ports.
pub const PIT_PORT_LEN: u64 = 4;
/// System control port B.
pub const PORT_B: u64 = 0x61;
/// Port B is one port.
pub const PORT_B_LEN: u64 = 1;
/// The 8254's input clock on a PC.
pub const PIT_FREQUENCY_HZ: u64 = 1_193_182;

const NANOS_PER_SEC: u64 = 1_000_000_000;
const CONTROL_PORT_OFFSET: u64 = 3;
/// Port B bits the guest may write: gate 2, speaker data, parity and channel check enables.
const PORT_B_WRITABLE: u8 = 0x0f;
const PORT_B_GATE2: u8 = 0x01;
const PORT_B_REFRESH: u8 = 0x10;
const PORT_B_OUT2: u8 = 0x20;

/// Whole input-clock ticks in `ns` nanoseconds.
fn ticks_in(ns: u64) -> u64 {
    // ns * F / 1e9 <= ns, so the result fits.
    (u128::from(ns) * u128::from(PIT_FREQUENCY_HZ) / u128::from(NANOS_PER_SEC)) as u64
}

/// The first nanosecond by which `ticks` whole ticks have elapsed.
fn nanos_for(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * u128::from(NANOS_PER_SEC)).div_ceil(u128::from(PIT_FREQUENCY_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// How the counter's 16 bits are read and written (control word bits 5-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Access {
    Low,
    High,
    LowHigh,
}

impl Access {
    fn bits(self) -> u8 {
        match self {
            Access::Low => 1,
            Access::High => 2,
            Access::LowHigh => 3,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct Channel {
    /// Counting mode 0-5.
    mode: u8,
    access: Access,
    bcd: bool,
    /// The initial count, 1..=65536 (a written 0 means 65536).
    reload: u32,
    /// Low byte of a LowHigh count being written.
    pending_low: Option<u8>,
    /// LowHigh reads of the live counter: the high byte comes next.
    read_high_next: bool,
    latched_count: Option<u16>,
    latch_high_next: bool,
    latched_status: Option<u8>,
    /// A count was written that the counter has not started on (status bit 6).
    null_count: bool,
    gate: bool,
    /// The counter is running a count (loaded, or triggered in modes 1 and 5).
    armed: bool,
    /// Counting is suspended by a low gate.
    paused: bool,
    /// Start of the current counting stretch.
    start: VirtualTime,
    /// Ticks counted before `start` (stretches before a gate pause).
    ticks_before: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            mode: 0,
            access: Access::LowHigh,
            bcd: false,
            reload: 0x1_0000,
            pending_low: None,
            read_high_next: false,
            latched_count: None,
            latch_high_next: false,
            latched_status: None,
            null_count: false,
            gate,
            armed: false,
            paused: false,
            start: VirtualTime::ZERO,
            ticks_before: 0,
        }
    }

    /// A low gate suspends counting in these modes; in 1 and 5 the gate only triggers.
    fn gate_pauses(&self) -> bool {
        matches!(self.mode, 0 | 2 | 3 | 4)
    }

    fn start_counting(&mut self, now: VirtualTime) {
        self.armed = true;
        self.start = now;
        self.ticks_before = 0;
        self.paused = self.gate_pauses() && !self.gate;
    }

    /// Input-clock ticks counted since the count started.
    fn elapsed(&self, now: VirtualTime) -> u64 {
        if self.paused {
            self.ticks_before
        } else {
            self.ticks_before
                .saturating_add(ticks_in(now.saturating_sub(self.start)))
        }
    }

    fn count_at(&self, now: VirtualTime) -> u16 {
        if !self.armed {
            return self.reload as u16;
        }
        let n = u64::from(self.reload);
        let d = self.elapsed(now);
        let count = match self.mode {
            2 => n - d % n,
            3 => n - (d % n * 2) % n,
            _ => n.wrapping_sub(d),
        };
        // 65536 reads as 0, and a mode 0 counter wraps past zero.
        count as u16
    }

    fn output_at(&self, now: VirtualTime) -> bool {
        if !self.armed {
            return self.mode != 0;
        }
        if matches!(self.mode, 2 | 3) && !self.gate {
            return true;
        }
        let n = u64::from(self.reload);
        let d = self.elapsed(now);
        match self.mode {
            0 | 1 => d >= n,
            // Low for the one clock while the count is 1.
            2 => d % n != n - 1,
            3 => d % n < n.div_ceil(2),
            _ => d != n,
        }
    }

    /// The first tick after `d` at which the output rises.
    fn next_rising_edge(&self, d: u64) -> Option<u64> {
        let n = u64::from(self.reload);
        match self.mode {
            0 | 1 => (d < n).then_some(n),
            2 | 3 => (d / n).checked_add(1)?.checked_mul(n),
            _ => (d <= n).then_some(n + 1),
        }
    }

    /// When the output next rises after `now`, if the counter is running.
    fn next_edge_time(&self, now: VirtualTime) -> Option<VirtualTime> {
        if !self.armed || self.paused {
            return None;
        }
        let edge = self.next_rising_edge(self.elapsed(now))?;
        let since_start = edge.checked_sub(self.ticks_before)?;
        Some(self.start.saturating_add_nanos(nanos_for(since_start)))
    }

    fn status(&self, now: VirtualTime) -> u8 {
        (u8::from(self.output_at(now)) << 7)
            | (u8::from(self.null_count) << 6)
            | (self.access.bits() << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn latch_count(&mut self, now: VirtualTime) {
        // A second latch before the first is read is ignored.
        if self.latched_count.is_none() {
            self.latched_count = Some(self.count_at(now));
            self.latch_high_next = false;
        }
    }

    fn latch_status(&mut self, now: VirtualTime) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status(now));
        }
    }

    fn program(&mut self, control: u8, access: Access) {
        let mode = (control >> 1) & 7;
        // Modes 6 and 7 are aliases of 2 and 3.
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.access = access;
        self.bcd = control & 1 != 0;
        self.pending_low = None;
        self.read_high_next = false;
        self.latched_count = None;
        self.latched_status = None;
        self.null_count = true;
        // Writing a control word stops the counter until a count is written.
        self.armed = false;
        self.paused = false;
    }

    fn write_count(&mut self, now: VirtualTime, value: u8) {
        let count = match (self.access, self.pending_low.take()) {
            (Access::Low, _) => u16::from(value),
            (Access::High, _) => u16::from(value) << 8,
            (Access::LowHigh, Some(low)) => u16::from_le_bytes([low, value]),
            (Access::LowHigh, None) => {
                self.pending_low = Some(value);
                if self.mode == 0 {
                    // The first byte of a new count stops a mode 0 counter.
                    self.armed = false;
                }
                return;
            }
        };
        self.reload = if count == 0 {
            0x1_0000
        } else {
            u32::from(count)
        };
        self.null_count = false;
        if matches!(self.mode, 1 | 5) {
            // These modes wait for a rising gate.
            return;
        }
        self.start_counting(now);
    }

    fn read(&mut self, now: VirtualTime) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        if let Some(count) = self.latched_count {
            let [low, high] = count.to_le_bytes();
            return match self.access {
                Access::Low => {
                    self.latched_count = None;
                    low
                }
                Access::High => {
                    self.latched_count = None;
                    high
                }
                Access::LowHigh if self.latch_high_next => {
                    self.latched_count = None;
                    self.latch_high_next = false;
                    high
                }
                Access::LowHigh => {
                    self.latch_high_next = true;
                    low
                }
            };
        }
        let [low, high] = self.count_at(now).to_le_bytes();
        match self.access {
            Access::Low => low,
            Access::High => high,
            Access::LowHigh => {
                self.read_high_next = !self.read_high_next;
                if self.read_high_next {
                    low
                } else {
                    high
                }
            }
        }
    }

    fn set_gate(&mut self, now: VirtualTime, high: bool) {
        let rising = high && !self.gate;
        let falling = !high && self.gate;
        self.gate = high;
        match self.mode {
            1 | 5 if rising && !self.null_count => self.start_counting(now),
            // A rising gate restarts the count in modes 2 and 3.
            2 | 3 if rising && self.armed => self.start_counting(now),
            0 | 4 if self.armed && falling => {
                self.ticks_before = self.elapsed(now);
                self.paused = true;
            }
            0 | 4 if self.armed && rising => {
                self.start = now;
                self.paused = false;
            }
            2 | 3 if self.armed && falling => {
                self.ticks_before = self.elapsed(now);
                self.paused = true;
            }
            _ => {}
        }
    }
}

/// The 8254 with its three channels and port 0x61.
/// Pure state: the PIT is its own snapshot state (see [`crate::persist::Persist`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Pit {
    channels: [Channel; 3],
    /// The guest-written bits of port 0x61.
    port_b: u8,
    refresh_toggle: bool,
    /// When channel 0's output next rises (IRQ0).
    next_irq: Option<VirtualTime>,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    pub fn new() -> Self {
        Pit {
            // Gates 0 and 1 are tied high on a PC; gate 2 follows port 0x61 bit 0.
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port_b: 0,
            refresh_toggle: false,
            next_irq: None,
        }
    }

    /// The next time channel 0 will raise IRQ0.
    pub fn next_deadline(&self) -> Option<VirtualTime> {
        self.next_irq
    }

    /// Raises IRQ0 if channel 0's output rose at or before `now`.
    pub fn advance(&mut self, now: VirtualTime, irqs: &mut IrqLines) {
        let Some(deadline) = self.next_irq else {
            return;
        };
        if deadline > now {
            return;
        }
        irqs.pulse(isa::PIT);
        // Edges between `deadline` and `now` could not have been seen by the guest separately.
        self.next_irq = self.channels[0].next_edge_time(now);
        tracing::trace!(?deadline, next = ?self.next_irq, "PIT IRQ0");
    }

    fn reschedule(&mut self, now: VirtualTime) {
        self.next_irq = self.channels[0].next_edge_time(now);
    }

    fn write_control(&mut self, now: VirtualTime, value: u8) {
        let select = value >> 6;
        if select == 3 {
            self.read_back(now, value);
            return;
        }
        let channel = &mut self.channels[usize::from(select)];
        match (value >> 4) & 3 {
            0 => channel.latch_count(now),
            1 => channel.program(value, Access::Low),
            2 => channel.program(value, Access::High),
            _ => channel.program(value, Access::LowHigh),
        }
    }

    fn read_back(&mut self, now: VirtualTime, value: u8) {
        let latch_count = value & 0x20 == 0;
        let latch_status = value & 0x10 == 0;
        for (index, channel) in self.channels.iter_mut().enumerate() {
            if value & (2 << index) == 0 {
                continue;
            }
            if latch_count {
                channel.latch_count(now);
            }
            if latch_status {
                channel.latch_status(now);
            }
        }
    }

    fn read_port_b(&mut self, now: VirtualTime) -> u8 {
        self.refresh_toggle = !self.refresh_toggle;
        let mut value = self.port_b & PORT_B_WRITABLE;
        if self.refresh_toggle {
            value |= PORT_B_REFRESH;
        }
        if self.channels[2].output_at(now) {
            value |= PORT_B_OUT2;
        }
        value
    }

    fn write_port_b(&mut self, now: VirtualTime, value: u8) {
        self.port_b = value & PORT_B_WRITABLE;
        self.channels[2].set_gate(now, value & PORT_B_GATE2 != 0);
    }

    fn read_byte(&mut self, now: VirtualTime, base: u64, offset: u64) -> u8 {
        match (base, offset) {
            (PORT_B, _) => self.read_port_b(now),
            (_, 0..=2) => self.channels[offset as usize].read(now),
            // The control word register cannot be read.
            _ => 0xff,
        }
    }

    fn write_byte(&mut self, now: VirtualTime, base: u64, offset: u64, value: u8) {
        match (base, offset) {
            (PORT_B, _) => self.write_port_b(now, value),
            (_, 0..=2) => self.channels[offset as usize].write_count(now, value),
            (_, CONTROL_PORT_OFFSET) => self.write_control(now, value),
            _ => {}
        }
        self.reschedule(now);
    }
}

impl BusDevice for Pit {
    fn read(&mut self, cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_byte(cx.now, base, offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, cx: &mut DeviceContext<'_>, base: u64, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.write_byte(cx.now, base, offset.saturating_add(i as u64), *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqChange;

    const MS: u64 = 1_000_000;

    fn at(ns: u64) -> VirtualTime {
        VirtualTime::from_nanos(ns)
    }

    fn out(pit: &mut Pit, now: VirtualTime, port: u64, value: u8) {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now,
            irqs: &mut irqs,
        };
        let (base, offset) = if port == PORT_B {
            (PORT_B, 0)
        } else {
            (PIT_BASE, port - PIT_BASE)
        };
        pit.write(&mut cx, base, offset, &[value]);
        assert!(
            irqs.is_empty(),
            "port writes never raise IRQ0 by themselves"
        );
    }

    fn inb(pit: &mut Pit, now: VirtualTime, port: u64) -> u8 {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now,
            irqs: &mut irqs,
        };
        let (base, offset) = if port == PORT_B {
            (PORT_B, 0)
        } else {
            (PIT_BASE, port - PIT_BASE)
        };
        let mut data = [0u8];
        pit.read(&mut cx, base, offset, &mut data);
        data[0]
    }

    /// Linux's `pit_set_periodic` at HZ=1000.
    fn periodic_hz1000(pit: &mut Pit, now: VirtualTime) {
        out(pit, now, 0x43, 0x34);
        out(pit, now, 0x40, (1193 & 0xff) as u8);
        out(pit, now, 0x40, (1193 >> 8) as u8);
    }

    fn latch_ch0(pit: &mut Pit, now: VirtualTime) -> u16 {
        out(pit, now, 0x43, 0x00);
        let low = inb(pit, now, 0x40);
        let high = inb(pit, now, 0x40);
        u16::from_le_bytes([low, high])
    }

    #[test]
    fn tick_conversions_round_trip() {
        assert_eq!(ticks_in(NANOS_PER_SEC), PIT_FREQUENCY_HZ);
        for ticks in [0, 1, 2, 1193, 65536, 1 << 40] {
            let ns = nanos_for(ticks);
            assert!(ticks_in(ns) >= ticks);
            if ns > 0 {
                assert!(ticks_in(ns - 1) < ticks);
            }
        }
        assert_eq!(nanos_for(u64::MAX), u64::MAX);
    }

    #[test]
    fn unprogrammed_pit_has_no_deadline() {
        let pit = Pit::new();
        assert_eq!(pit.next_deadline(), None);
    }

    #[test]
    fn mode2_at_hz1000_fires_every_millisecond() {
        let mut pit = Pit::new();
        let start = at(5 * MS);
        periodic_hz1000(&mut pit, start);
        let period = nanos_for(1193);
        assert!((999_000..1_000_200).contains(&period), "{period}");
        let mut irqs = IrqLines::new();
        let mut last = start;
        for k in 1..=5u64 {
            let deadline = pit.next_deadline().unwrap();
            assert_eq!(deadline, at(start.as_nanos() + nanos_for(1193 * k)));
            assert!(deadline > last);
            // Nothing just before the deadline.
            pit.advance(at(deadline.as_nanos() - 1), &mut irqs);
            assert!(irqs.is_empty());
            pit.advance(deadline, &mut irqs);
            assert_eq!(irqs.drain(), vec![IrqChange::Pulse(isa::PIT)]);
            last = deadline;
        }
    }

    #[test]
    fn missed_periods_pulse_once_and_skip_ahead() {
        let mut pit = Pit::new();
        periodic_hz1000(&mut pit, VirtualTime::ZERO);
        let mut irqs = IrqLines::new();
        let late = at(10 * MS + MS / 2);
        pit.advance(late, &mut irqs);
        assert_eq!(irqs.drain(), vec![IrqChange::Pulse(isa::PIT)]);
        let next = pit.next_deadline().unwrap();
        assert!(next > late && next < at(11 * MS + MS / 10), "{next:?}");
        pit.advance(late, &mut irqs);
        assert!(irqs.is_empty());
    }

    #[test]
    fn latched_count_decreases_with_time() {
        let mut pit = Pit::new();
        periodic_hz1000(&mut pit, VirtualTime::ZERO);
        let first = latch_ch0(&mut pit, at(100_000));
        let second = latch_ch0(&mut pit, at(400_000));
        assert!(first <= 1193 && second < first, "{first} {second}");
        assert_eq!(first, 1193 - ticks_in(100_000) as u16);
        // The same time reads the same count, however often.
        assert_eq!(latch_ch0(&mut pit, at(400_000)), second);
        // Reloads after a period.
        let wrapped = latch_ch0(&mut pit, at(1_100_000));
        assert!(wrapped > second);
    }

    #[test]
    fn latch_holds_its_value_until_read() {
        let mut pit = Pit::new();
        periodic_hz1000(&mut pit, VirtualTime::ZERO);
        out(&mut pit, at(100_000), 0x43, 0x00);
        // A second latch is ignored; reading later still gives the first value.
        out(&mut pit, at(300_000), 0x43, 0x00);
        let low = inb(&mut pit, at(500_000), 0x40);
        let high = inb(&mut pit, at(500_000), 0x40);
        assert_eq!(
            u16::from_le_bytes([low, high]),
            1193 - ticks_in(100_000) as u16
        );
    }

    #[test]
    fn mode0_one_shot_fires_once() {
        let mut pit = Pit::new();
        out(&mut pit, VirtualTime::ZERO, 0x43, 0x30);
        out(&mut pit, VirtualTime::ZERO, 0x40, 100);
        assert_eq!(pit.next_deadline(), None, "half a count does not start it");
        out(&mut pit, at(1_000), 0x40, 0);
        let deadline = pit.next_deadline().unwrap();
        assert_eq!(deadline, at(1_000 + nanos_for(100)));
        let mut irqs = IrqLines::new();
        pit.advance(deadline, &mut irqs);
        assert_eq!(irqs.drain().len(), 1);
        assert_eq!(pit.next_deadline(), None);
    }

    #[test]
    fn control_word_stops_channel0() {
        let mut pit = Pit::new();
        periodic_hz1000(&mut pit, VirtualTime::ZERO);
        assert!(pit.next_deadline().is_some());
        // clockevent_i8253_disable: mode word, zero count, mode word again.
        out(&mut pit, at(10), 0x43, 0x30);
        out(&mut pit, at(10), 0x40, 0);
        out(&mut pit, at(10), 0x40, 0);
        out(&mut pit, at(10), 0x43, 0x30);
        assert_eq!(pit.next_deadline(), None);
    }

    #[test]
    fn mode4_one_shot_fires_after_count_plus_one() {
        let mut pit = Pit::new();
        out(&mut pit, VirtualTime::ZERO, 0x43, 0x38);
        out(&mut pit, VirtualTime::ZERO, 0x40, 10);
        out(&mut pit, VirtualTime::ZERO, 0x40, 0);
        assert_eq!(pit.next_deadline(), Some(at(nanos_for(11))));
    }

    #[test]
    fn channel2_calibration_through_port_b() {
        let mut pit = Pit::new();
        // pit_calibrate_tsc: gate high, speaker off; mode 0 lohi; 50 ms latch.
        let value = (inb(&mut pit, at(0), PORT_B) & !0x02) | 0x01;
        out(&mut pit, at(0), PORT_B, value);
        out(&mut pit, at(0), 0x43, 0xb0);
        let latch = (PIT_FREQUENCY_HZ / 20) as u16;
        out(&mut pit, at(1_000), 0x42, latch as u8);
        out(&mut pit, at(1_000), 0x42, (latch >> 8) as u8);
        assert_eq!(inb(&mut pit, at(2_000), PORT_B) & 0x20, 0);
        let done = 1_000 + nanos_for(u64::from(latch));
        assert_eq!(inb(&mut pit, at(done - 1), PORT_B) & 0x20, 0);
        assert_eq!(inb(&mut pit, at(done), PORT_B) & 0x20, 0x20);
        // Channel 2 never touches IRQ0.
        assert_eq!(pit.next_deadline(), None);
        // The gate and speaker bits read back.
        assert_eq!(inb(&mut pit, at(done), PORT_B) & 0x0f, 0x01);
    }

    #[test]
    fn low_gate_suspends_channel2_in_mode0() {
        let mut pit = Pit::new();
        out(&mut pit, at(0), PORT_B, 0x00);
        out(&mut pit, at(0), 0x43, 0xb0);
        out(&mut pit, at(0), 0x42, 0xe8);
        out(&mut pit, at(0), 0x42, 0x03);
        // Gate low: the counter has not started.
        assert_eq!(inb(&mut pit, at(10 * MS), PORT_B) & 0x20, 0);
        out(&mut pit, at(10 * MS), PORT_B, 0x01);
        let done = 10 * MS + nanos_for(1000);
        assert_eq!(inb(&mut pit, at(done - 1), PORT_B) & 0x20, 0);
        assert_eq!(inb(&mut pit, at(done), PORT_B) & 0x20, 0x20);
    }

    #[test]
    fn quick_calibrate_reads_msb_live() {
        let mut pit = Pit::new();
        out(&mut pit, at(0), PORT_B, 0x01);
        out(&mut pit, at(0), 0x43, 0xb0);
        out(&mut pit, at(0), 0x42, 0xff);
        out(&mut pit, at(0), 0x42, 0xff);
        let _ = inb(&mut pit, at(0), 0x42);
        assert_eq!(inb(&mut pit, at(0), 0x42), 0xff);
        // 256 ticks later the MSB has dropped by one.
        let t = nanos_for(256);
        let _ = inb(&mut pit, at(t), 0x42);
        assert_eq!(inb(&mut pit, at(t), 0x42), 0xfe);
    }

    #[test]
    fn refresh_bit_toggles_on_reads() {
        let mut pit = Pit::new();
        let a = inb(&mut pit, at(0), PORT_B) & 0x10;
        let b = inb(&mut pit, at(0), PORT_B) & 0x10;
        assert_ne!(a, b);
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let mut pit = Pit::new();
        out(&mut pit, at(0), 0x43, 0x34);
        // Status after the control word: null count, lohi, mode 2, output high.
        out(&mut pit, at(0), 0x43, 0xe2);
        assert_eq!(inb(&mut pit, at(0), 0x40), 0b1111_0100);
        out(&mut pit, at(0), 0x40, 0xa9);
        out(&mut pit, at(0), 0x40, 0x04);
        out(&mut pit, at(0), 0x43, 0xc2);
        assert_eq!(inb(&mut pit, at(0), 0x40), 0b1011_0100);
        assert_eq!(inb(&mut pit, at(0), 0x40), 0xa9);
        assert_eq!(inb(&mut pit, at(0), 0x40), 0x04);
    }

    #[test]
    fn lobyte_only_access_and_zero_count() {
        let mut pit = Pit::new();
        out(&mut pit, at(0), 0x43, 0x14);
        out(&mut pit, at(0), 0x40, 0);
        // 0 means 65536 (binary); mode 2 with lobyte access reads the low byte.
        assert_eq!(pit.next_deadline(), Some(at(nanos_for(0x1_0000))));
        assert_eq!(inb(&mut pit, at(0), 0x40), 0);
        assert_eq!(inb(&mut pit, at(nanos_for(1)), 0x40), 0xff);
    }

    #[test]
    fn arbitrary_writes_never_panic() {
        let mut pit = Pit::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut irqs = IrqLines::new();
        for step in 0..20_000u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let now = at(step * 997);
            let port = [0x40, 0x41, 0x42, 0x43, PORT_B][(seed % 5) as usize];
            let value = (seed >> 8) as u8;
            if seed & 0x100_0000 != 0 {
                out(&mut pit, now, port, value);
            } else {
                let _ = inb(&mut pit, now, port);
            }
            pit.advance(now, &mut irqs);
            if let Some(deadline) = pit.next_deadline() {
                assert!(deadline > now, "{deadline:?} {now:?}");
            }
        }
        pit.advance(at(u64::MAX), &mut irqs);
    }
}
