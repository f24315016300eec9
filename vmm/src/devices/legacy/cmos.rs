//! The MC146818 real-time clock and its 128 bytes of CMOS RAM.
//!
//! The clock reads a configurable epoch (Unix seconds, fixed when the VM is built, so recorded
//! with the run) plus virtual time; it never reads the host clock. Guest writes to the time
//! registers move an offset, so `hwclock --systohc` works and stays deterministic.
//!
//! Simplified against the datasheet:
//! - No periodic, alarm or update-ended interrupts: register C always reads 0 and IRQ8 is never
//!   raised. The alarm registers are plain RAM.
//! - The time registers are computed on each read in the format register B selects, so
//!   changing DM or 24/12 converts them (a real chip would reinterpret the stored bytes).
//! - The day-of-week register is derived from the date; writes to it are ignored.
//! - The divider bits of register A are stored but do not stop the clock.
//! - UIP (register A bit 7) is set during the last 244 µs of every virtual second, so guests
//!   that wait for it to clear see the usual handshake at deterministic points.
//! - The index port is write-only on hardware; reading it gives 0xff here.

use crate::bus::{BusDevice, DeviceContext};
use crate::clock::VirtualTime;

/// I/O base of the RTC: index at +0, data at +1.
pub const CMOS_BASE: u64 = 0x70;
/// The RTC decodes two ports.
pub const CMOS_PORT_LEN: u64 = 2;

const NANOS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;
/// How long before each second's end the update-in-progress flag is up.
const UIP_WINDOW_NS: u64 = 244_000;
const RAM_SIZE: usize = 128;

// Register indices.
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const DAY_OF_WEEK: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 = Sunday.
    weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let (month, day) = (i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_secs(secs: i64) -> DateTime {
    let days = secs.div_euclid(SECS_PER_DAY);
    let of_day = secs.rem_euclid(SECS_PER_DAY);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    DateTime {
        year,
        month,
        day,
        hour: (of_day / 3600) as u8,
        minute: (of_day / 60 % 60) as u8,
        second: (of_day % 60) as u8,
        // 1970-01-01 was a Thursday.
        weekday: (days + 4).rem_euclid(7) as u8,
    }
}

fn secs_from_civil(t: &DateTime) -> i64 {
    // Saturating: an epoch near the end of i64 time plus a guest-written year must not overflow.
    days_from_civil(t.year, t.month, t.day)
        .saturating_mul(SECS_PER_DAY)
        .saturating_add(i64::from(t.hour) * 3600 + i64::from(t.minute) * 60 + i64::from(t.second))
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10 % 10) << 4) | (value % 10)
}

fn from_bcd(value: u8) -> u8 {
    (value >> 4) * 10 + (value & 0x0f)
}

/// The MC146818 RTC with its CMOS RAM.
/// Pure state: the CMOS is its own snapshot state (see [`crate::persist::Persist`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Cmos {
    epoch_unix_secs: i64,
    /// Seconds the guest moved the clock by, relative to epoch + virtual time.
    offset_secs: i64,
    /// While register B's SET bit is up the clock stands still at this time.
    frozen_secs: Option<i64>,
    index: u8,
    #[serde(with = "crate::persist::byte_array")]
    ram: [u8; RAM_SIZE],
}

impl Cmos {
    pub fn new(epoch_unix_secs: u64) -> Self {
        let mut ram = [0u8; RAM_SIZE];
        // 32.768 kHz time base, 1024 Hz rate: what firmware leaves behind.
        ram[usize::from(REG_A)] = 0x26;
        ram[usize::from(REG_B)] = B_24H;
        ram[usize::from(REG_D)] = D_VRT;
        Cmos {
            epoch_unix_secs: i64::try_from(epoch_unix_secs).unwrap_or(i64::MAX),
            offset_secs: 0,
            frozen_secs: None,
            index: 0,
            ram,
        }
    }

    fn virtual_secs(now: VirtualTime) -> i64 {
        // u64 nanoseconds / 1e9 always fits in an i64.
        (now.as_nanos() / NANOS_PER_SEC) as i64
    }

    fn now_secs(&self, now: VirtualTime) -> i64 {
        self.frozen_secs.unwrap_or_else(|| {
            self.epoch_unix_secs
                .saturating_add(Self::virtual_secs(now))
                .saturating_add(self.offset_secs)
        })
    }

    fn set_now_secs(&mut self, now: VirtualTime, secs: i64) {
        match &mut self.frozen_secs {
            Some(frozen) => *frozen = secs,
            None => {
                self.offset_secs = secs
                    .saturating_sub(self.epoch_unix_secs)
                    .saturating_sub(Self::virtual_secs(now));
            }
        }
    }

    fn binary(&self) -> bool {
        self.ram[usize::from(REG_B)] & B_BINARY != 0
    }

    fn encode(&self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            to_bcd(value)
        }
    }

    fn decode(&self, value: u8) -> u8 {
        if self.binary() {
            value
        } else {
            from_bcd(value)
        }
    }

    fn update_in_progress(&self, now: VirtualTime) -> bool {
        self.frozen_secs.is_none()
            && now.as_nanos() % NANOS_PER_SEC >= NANOS_PER_SEC - UIP_WINDOW_NS
    }

    fn read_register(&self, now: VirtualTime, index: u8) -> u8 {
        let t = civil_from_secs(self.now_secs(now));
        match index {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            DAY_OF_WEEK => self.encode(t.weekday + 1),
            DAY_OF_MONTH => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u8),
            CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u8),
            REG_A if self.update_in_progress(now) => self.ram[usize::from(REG_A)] | A_UIP,
            // No interrupt sources are emulated, so no flags.
            REG_C => 0,
            _ => self.ram[usize::from(index)],
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.ram[usize::from(REG_B)] & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.ram[usize::from(REG_B)] & B_24H != 0 {
            return self.decode(value).min(23);
        }
        let pm = value & HOUR_PM != 0;
        let twelve = self.decode(value & !HOUR_PM) % 12;
        twelve + if pm { 12 } else { 0 }
    }

    fn write_register(&mut self, now: VirtualTime, index: u8, value: u8) {
        match index {
            SECONDS | MINUTES | HOURS | DAY_OF_MONTH | MONTH | YEAR | CENTURY => {
                self.write_time_field(now, index, value);
            }
            DAY_OF_WEEK => {}
            REG_A => self.ram[usize::from(REG_A)] = value & !A_UIP,
            REG_B => {
                let was_set = self.ram[usize::from(REG_B)] & B_SET != 0;
                let set = value & B_SET != 0;
                if set && !was_set {
                    self.frozen_secs = Some(self.now_secs(now));
                } else if !set && was_set {
                    if let Some(frozen) = self.frozen_secs.take() {
                        self.set_now_secs(now, frozen);
                    }
                }
                self.ram[usize::from(REG_B)] = value;
            }
            // Read-only status registers.
            REG_C | REG_D => {}
            _ => self.ram[usize::from(index)] = value,
        }
    }

    /// Replaces one field of the current time. Out-of-range values (bad BCD, month 0) are
    /// clamped so that nothing the guest writes can make the clock fail.
    fn write_time_field(&mut self, now: VirtualTime, index: u8, value: u8) {
        let mut t = civil_from_secs(self.now_secs(now));
        match index {
            SECONDS => t.second = self.decode(value).min(59),
            MINUTES => t.minute = self.decode(value).min(59),
            HOURS => t.hour = self.decode_hour(value),
            DAY_OF_MONTH => t.day = self.decode(value).clamp(1, 31),
            MONTH => t.month = self.decode(value).clamp(1, 12),
            YEAR => {
                let century = t.year.div_euclid(100);
                t.year = century * 100 + i64::from(self.decode(value) % 100);
            }
            _ => {
                let in_century = t.year.rem_euclid(100);
                t.year = i64::from(self.decode(value) % 100) * 100 + in_century;
            }
        }
        self.set_now_secs(now, secs_from_civil(&t));
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.saturating_add(i as u64) {
                1 => self.read_register(cx.now, self.index),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, cx: &mut DeviceContext<'_>, _base: u64, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            match offset.saturating_add(i as u64) {
                // Bit 7 of the index is the NMI mask, which has nothing to mask here.
                0 => self.index = byte & 0x7f,
                1 => self.write_register(cx.now, self.index, *byte),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;

    /// 2024-02-29 23:59:58 UTC, a Thursday.
    const LEAP_EVE: u64 = 1_709_251_198;

    fn read(cmos: &mut Cmos, now_ns: u64, index: u8) -> u8 {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::from_nanos(now_ns),
            irqs: &mut irqs,
        };
        cmos.write(&mut cx, CMOS_BASE, 0, &[index | 0x80]);
        let mut data = [0u8];
        cmos.read(&mut cx, CMOS_BASE, 1, &mut data);
        assert!(irqs.is_empty());
        data[0]
    }

    fn write(cmos: &mut Cmos, now_ns: u64, index: u8, value: u8) {
        let mut irqs = IrqLines::new();
        let mut cx = DeviceContext {
            now: VirtualTime::from_nanos(now_ns),
            irqs: &mut irqs,
        };
        cmos.write(&mut cx, CMOS_BASE, 0, &[index, value]);
    }

    fn clock(cmos: &mut Cmos, now_ns: u64) -> [u8; 8] {
        [
            SECONDS,
            MINUTES,
            HOURS,
            DAY_OF_WEEK,
            DAY_OF_MONTH,
            MONTH,
            YEAR,
            CENTURY,
        ]
        .map(|index| read(cmos, now_ns, index))
    }

    #[test]
    fn calendar_round_trips() {
        for secs in [
            0i64,
            951_782_400,
            LEAP_EVE as i64,
            4_102_444_800,
            -1,
            -86_400 * 365,
        ] {
            let t = civil_from_secs(secs);
            assert_eq!(secs_from_civil(&t), secs, "{t:?}");
        }
        let t = civil_from_secs(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 4));
    }

    #[test]
    fn bcd_time_is_epoch_plus_virtual_time() {
        let mut cmos = Cmos::new(LEAP_EVE);
        // sec, min, hour, weekday (Thursday = 5), day, month, year, century.
        assert_eq!(
            clock(&mut cmos, 0),
            [0x58, 0x59, 0x23, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        // Three virtual seconds later it is 1 March, a Friday.
        assert_eq!(
            clock(&mut cmos, 3 * NANOS_PER_SEC + 5),
            [0x01, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24, 0x20]
        );
    }

    #[test]
    fn binary_and_twelve_hour_modes() {
        let mut cmos = Cmos::new(LEAP_EVE);
        write(&mut cmos, 0, REG_B, B_BINARY);
        assert_eq!(clock(&mut cmos, 0), [58, 59, 0x80 | 11, 5, 29, 2, 24, 20]);
        write(&mut cmos, 0, REG_B, 0);
        assert_eq!(read(&mut cmos, 0, HOURS), 0x80 | 0x11);
        assert_eq!(
            read(&mut cmos, 3 * NANOS_PER_SEC, HOURS),
            0x12,
            "midnight is 12 AM"
        );
    }

    #[test]
    fn uip_is_set_at_the_end_of_each_second() {
        let mut cmos = Cmos::new(0);
        assert_eq!(read(&mut cmos, 0, REG_A), 0x26);
        assert_eq!(
            read(&mut cmos, NANOS_PER_SEC - UIP_WINDOW_NS - 1, REG_A),
            0x26
        );
        assert_eq!(read(&mut cmos, NANOS_PER_SEC - UIP_WINDOW_NS, REG_A), 0xa6);
        assert_eq!(read(&mut cmos, 5 * NANOS_PER_SEC - 1, REG_A), 0xa6);
        assert_eq!(read(&mut cmos, 5 * NANOS_PER_SEC, REG_A), 0x26);
        // UIP cannot be written.
        write(&mut cmos, 0, REG_A, 0xa6);
        assert_eq!(read(&mut cmos, 0, REG_A), 0x26);
    }

    #[test]
    fn status_registers() {
        let mut cmos = Cmos::new(0);
        assert_eq!(read(&mut cmos, 0, REG_C), 0);
        assert_eq!(read(&mut cmos, 0, REG_D), D_VRT);
        write(&mut cmos, 0, REG_D, 0);
        assert_eq!(read(&mut cmos, 0, REG_D), D_VRT);
    }

    #[test]
    fn guest_sets_the_clock_like_hwclock() {
        let mut cmos = Cmos::new(LEAP_EVE);
        let t0 = 10 * NANOS_PER_SEC;
        write(&mut cmos, t0, REG_B, B_SET | B_24H);
        for (index, value) in [
            (SECONDS, 0x30),
            (MINUTES, 0x15),
            (HOURS, 0x08),
            (DAY_OF_MONTH, 0x04),
            (MONTH, 0x07),
            (YEAR, 0x99),
            (CENTURY, 0x19),
        ] {
            write(&mut cmos, t0, index, value);
        }
        // Frozen while SET is up, and UIP stays clear.
        assert_eq!(read(&mut cmos, t0 + 5 * NANOS_PER_SEC, SECONDS), 0x30);
        assert_eq!(read(&mut cmos, t0 + NANOS_PER_SEC - 1, REG_A) & A_UIP, 0);
        write(&mut cmos, t0 + 7 * NANOS_PER_SEC, REG_B, B_24H);
        // Runs again from the set time: 1999-07-04 08:15:30, a Sunday.
        assert_eq!(
            clock(&mut cmos, t0 + 9 * NANOS_PER_SEC),
            [0x32, 0x15, 0x08, 0x01, 0x04, 0x07, 0x99, 0x19]
        );
    }

    #[test]
    fn ram_bytes_and_nmi_bit() {
        let mut cmos = Cmos::new(0);
        write(&mut cmos, 0, 0x0e, 0x42);
        write(&mut cmos, 0, 0x7f, 0x43);
        // Index 0xff is 0x7f with the NMI-disable bit.
        write(&mut cmos, 0, 0xff, 0x44);
        assert_eq!(read(&mut cmos, 0, 0x0e), 0x42);
        assert_eq!(read(&mut cmos, 0, 0x7f), 0x44);
        assert_eq!(read(&mut cmos, 0, 0x01), 0, "alarm registers are RAM");
    }

    #[test]
    fn garbage_writes_never_panic() {
        let mut cmos = Cmos::new(u64::MAX);
        for index in 0..=255u8 {
            for value in [0x00, 0x09, 0x99, 0xff, 0x80, 0x3f] {
                write(&mut cmos, 0, index, value);
                let _ = read(&mut cmos, u64::MAX, index);
            }
        }
        let mut cmos = Cmos::new(0);
        write(&mut cmos, 0, REG_B, B_BINARY);
        for index in [SECONDS, MINUTES, HOURS, DAY_OF_MONTH, MONTH, YEAR, CENTURY] {
            write(&mut cmos, 0, index, 0xff);
        }
        let _ = clock(&mut cmos, 0);
    }
}
