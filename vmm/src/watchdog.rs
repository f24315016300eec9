//! The host-time watchdog: a thread that, once a wall-clock deadline passes, kicks the vCPU out
//! of `KVM_RUN` so a guest spinning without exits still ends.
//!
//! A kick is not a synchronous exit: the run loop neither ticks virtual time nor injects there.
//! A signal sent just before the vCPU enters `KVM_RUN` would be lost, so the watchdog keeps
//! kicking every few milliseconds until the run loop stops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vstate::vcpu::VcpuKicker;

const REKICK_PERIOD: Duration = Duration::from_millis(20);

struct Shared {
    stop: Mutex<bool>,
    wake: Condvar,
    expired: AtomicBool,
}

pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(timeout: Duration, kicker: VcpuKicker) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            expired: AtomicBool::new(false),
        });
        let deadline = Instant::now() + timeout;
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
}

fn watch(shared: &Shared, deadline: Instant, kicker: VcpuKicker) {
    let mut stop = crate::bus::lock(&shared.stop);
    loop {
        if *stop {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            shared.expired.store(true, Ordering::Release);
            kicker.kick();
            stop = shared
                .wake
                .wait_timeout(stop, REKICK_PERIOD)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        } else {
            stop = shared
                .wake
                .wait_timeout(stop, deadline - now)
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
        let dog = Watchdog::start(Duration::from_millis(10), kicker).unwrap();
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
