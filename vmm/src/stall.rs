//! When a guest that makes no synchronous exit gets a host-timed timer tick (a "landmark",
//! DESIGN.md's fallback).
//!
//! Every landmark is a point where host timing decides guest behaviour, so they must be rare.
//! Most long stretches without an exit are bounded work that ends on its own (clearing BSS,
//! ftrace patching 20,000 call sites, initialising the memory map): ticking into them only
//! reorders the guest's asynchronous work from run to run. What truly needs a tick is a guest
//! that waits for time to pass without exiting:
//!
//! - a kernel spin-wait (`cpu_relax()` until `jiffies` moves): it changes no register between
//!   iterations, so two samples with the same RIP and the same registers prove it;
//!   The same holds for a user-mode `for (;;);`;
//! - a loop that never ends but changes state (a stimulus computing forever, or the runaway
//!   kernel loop a reproducer finds): after a grace period it gets ticks at the normal stall
//!   rate, so time limits pass and the kernel's own lockup detectors can see it.
//!
//! Where the vCPU happens to be (user or kernel mode) says nothing: system calls and page faults
//! are not VM exits, so a sample in user mode does not mean user mode ran all along.

use std::time::{Duration, Instant};

/// Work without exits that is still allowed to finish on its own. The longest bounded stretch
/// in a boot is the kernel's early setup before its first port access: about 0.4 s in the
/// carrier on an idle machine, so this leaves room for a loaded one.
pub const RUNAWAY_AFTER: Duration = Duration::from_secs(2);

/// Exits between two stalls below which the second continues the first (an interrupt handler
/// ran in between, then the guest went back to the same loop).
const CONTINUATION_EXITS: u64 = 64;

/// Distinct register states remembered within one stall.
const MAX_SAMPLES: usize = 256;

/// What the run loop saw at a stall kick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallSample {
    pub rip: u64,
    /// A digest of every general-purpose register and the flags.
    pub state: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandmarkCause {
    Spinning,
    Runaway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the guest run on untouched.
    Wait,
    Landmark(LandmarkCause),
}

/// One stretch without synchronous exits, as seen through the watchdog's kicks.
#[derive(Debug)]
struct Stall {
    exits: u64,
    started: Instant,
    seen: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct StallTracker {
    current: Option<Stall>,
    /// Exit count at the last landmark given to a runaway loop.
    last_unbounded: Option<u64>,
}

impl StallTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The watchdog found the guest at `exits` synchronous exits for a stall period.
    pub fn observe(&mut self, exits: u64, sample: StallSample, now: Instant) -> Verdict {
        let stall = match &mut self.current {
            Some(stall) if stall.exits == exits => stall,
            current => current.insert(Stall {
                exits,
                started: now,
                seen: Vec::new(),
            }),
        };
        let verdict = if stall.seen.contains(&(sample.rip, sample.state)) {
            Verdict::Landmark(LandmarkCause::Spinning)
        } else if now.duration_since(stall.started) >= RUNAWAY_AFTER
            || self
                .last_unbounded
                .is_some_and(|at| exits.saturating_sub(at) < CONTINUATION_EXITS)
        {
            Verdict::Landmark(LandmarkCause::Runaway)
        } else {
            if stall.seen.len() < MAX_SAMPLES {
                stall.seen.push((sample.rip, sample.state));
            }
            Verdict::Wait
        };
        if let Verdict::Landmark(cause) = verdict {
            self.current = None;
            if cause == LandmarkCause::Runaway {
                self.last_unbounded = Some(exits);
            }
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rip: u64, state: u64) -> StallSample {
        StallSample { rip, state }
    }

    const TICK: Duration = Duration::from_millis(10);

    #[test]
    fn bounded_kernel_work_is_left_alone() {
        let mut tracker = StallTracker::new();
        let t0 = Instant::now();
        for i in 0..20u64 {
            let verdict = tracker.observe(5, sample(0x1000 + i, i), t0 + TICK * i as u32);
            assert_eq!(verdict, Verdict::Wait, "sample {i}");
        }
    }

    #[test]
    fn a_repeated_state_is_a_spin_wait() {
        let mut tracker = StallTracker::new();
        let t0 = Instant::now();
        assert_eq!(tracker.observe(7, sample(0x10, 1), t0), Verdict::Wait);
        assert_eq!(
            tracker.observe(7, sample(0x14, 1), t0 + TICK),
            Verdict::Wait
        );
        assert_eq!(
            tracker.observe(7, sample(0x10, 1), t0 + TICK * 2),
            Verdict::Landmark(LandmarkCause::Spinning)
        );
        // The same RIP with other registers is progress, not a spin.
        assert_eq!(tracker.observe(9, sample(0x10, 1), t0), Verdict::Wait);
        assert_eq!(
            tracker.observe(9, sample(0x10, 2), t0 + TICK),
            Verdict::Wait
        );
    }

    #[test]
    fn samples_from_an_earlier_stall_do_not_count() {
        let mut tracker = StallTracker::new();
        let t0 = Instant::now();
        assert_eq!(tracker.observe(1, sample(0x10, 1), t0), Verdict::Wait);
        assert_eq!(tracker.observe(200, sample(0x10, 1), t0), Verdict::Wait);
    }

    #[test]
    fn a_runaway_kernel_loop_gets_ticks_after_the_grace_period_and_then_at_every_stall() {
        let mut tracker = StallTracker::new();
        let t0 = Instant::now();
        let mut t = t0;
        let mut state = 0;
        let verdict = loop {
            state += 1;
            match tracker.observe(50, sample(0x20, state), t) {
                Verdict::Wait => t += TICK,
                other => break other,
            }
        };
        assert_eq!(verdict, Verdict::Landmark(LandmarkCause::Runaway));
        assert!(t - t0 >= RUNAWAY_AFTER);
        // The tick's handler made a few exits; the loop goes on and is ticked at once.
        assert_eq!(
            tracker.observe(60, sample(0x20, state + 1), t + TICK),
            Verdict::Landmark(LandmarkCause::Runaway)
        );
        // Long after, a new stall gets its grace period again.
        assert_eq!(
            tracker.observe(10_000, sample(0x20, state + 2), t + TICK * 2),
            Verdict::Wait
        );
    }
}
