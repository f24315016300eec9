//! The host-time watchdog: a thread that kicks the vCPU out of `KVM_RUN` for two reasons.
//!
//! - A wall-clock deadline passed: the run ends, even if the guest spins without exits. A signal
//!   sent just before the vCPU enters `KVM_RUN` would be lost, so the watchdog keeps kicking
//!   every few milliseconds until the run loop stops it.
//! - The guest made no synchronous exit for a stall period (DESIGN.md, "Fallback"): code that
//!   spins on `jiffies`, or a user-mode compute loop, would otherwise never see a timer
//!   interrupt, since interrupts are injected only at exits. The run loop then treats the kick as
//!   a landmark: it moves virtual time to the next timer deadline and injects there. Landmarks are
//!   the one place where host timing decides guest behaviour; a recording logs them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vstate::vcpu::VcpuKicker;

const REKICK_PERIOD: Duration = Duration::from_millis(20);

/// How often the guest is sampled while it makes no synchronous exit. Short, because a guest that
/// does wait for time gets its tick only at a sample (with `clocksource=jiffies` the guest's time
/// is its tick count); the samples themselves change nothing the guest can see.
pub const STALL_PERIOD: Duration = Duration::from_millis(10);

/// The sampling period once the guest is known to be waiting for time (see [`Watchdog::set_hurry`]).
pub const HURRIED_STALL_PERIOD: Duration = Duration::from_millis(2);

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    expired: AtomicBool,
    /// Synchronous exits so far, published by the run loop.
    progress: AtomicU64,
    stalled: AtomicBool,
    /// The guest is in a loop that waits for time: sample it more often, so its ticks come
    /// faster and its time limit passes sooner.
    hurry: AtomicBool,
}

pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// `timeout`: when the run must end (none: never). Stalls are watched for in any case.
    pub fn start(timeout: Option<Duration>, kicker: VcpuKicker) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            expired: AtomicBool::new(false),
            progress: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            hurry: AtomicBool::new(false),
        });
        let deadline = timeout.map(|t| Instant::now() + t);
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("rrr-watchdog".into())
            .spawn(move || watch(&theirs, deadline, kicker))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// True once the deadline has passed.
    pub fn expired(&self) -> bool {
        self.shared.expired.load(Ordering::Acquire)
    }

    /// The run loop reached its `exits`-th synchronous exit.
    pub fn note_progress(&self, exits: u64) {
        self.shared.progress.store(exits, Ordering::Relaxed);
    }

    /// Samples every [`HURRIED_STALL_PERIOD`] instead of every [`STALL_PERIOD`] while set.
    pub fn set_hurry(&self, hurry: bool) {
        self.shared.hurry.store(hurry, Ordering::Relaxed);
    }

    /// Whether the last kick was for a stall (clears the flag).
    pub fn take_stall(&self) -> bool {
        self.shared.stalled.swap(false, Ordering::AcqRel)
    }
}

fn watch(shared: &Shared, deadline: Option<Instant>, kicker: VcpuKicker) {
    let mut stop = crate::bus::lock(&shared.stop);
    let mut seen = u64::MAX;
    loop {
        if *stop {
            return;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            shared.expired.store(true, Ordering::Release);
            kicker.kick();
            stop = shared
                .wake
                .wait_timeout(stop, REKICK_PERIOD)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        } else {
            let progress = shared.progress.load(Ordering::Relaxed);
            if progress == seen {
                shared.stalled.store(true, Ordering::Release);
                kicker.kick();
            }
            seen = progress;
            let period = if shared.hurry.load(Ordering::Relaxed) {
                HURRIED_STALL_PERIOD
            } else {
                STALL_PERIOD
            };
            let wait = deadline.map_or(period, |d| (d - now).min(period));
            stop = shared
                .wake
                .wait_timeout(stop, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *crate::bus::lock(&self.shared.stop) = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_kicks_then_stops_on_drop() {
        let kicker = VcpuKicker::for_current_thread().unwrap();
        let dog = Watchdog::start(Some(Duration::from_millis(10)), kicker).unwrap();
        assert!(!dog.expired());
        // The kick interrupts this sleep (EINTR) but std retries it; only the flag matters.
        let start = Instant::now();
        while !dog.expired() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(dog.expired());
        drop(dog);
    }
}
